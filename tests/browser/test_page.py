"""The page of ``nijimi serve`` in a real browser (headless Chromium): generating with live progress and a preview
that changes step by step, cancelling, the gallery and its downloads, loading settings by dropping an A1111 or
ComfyUI image, painting an inpaint mask, and an explain view. Controls are found by their accessible labels."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
from foreign_images import a1111_png, comfyui_graph, comfyui_png
from PIL import Image, ImageDraw

WATCH = """() => {
  window.seen = {previews: [], progress: []};
  new MutationObserver(() => window.seen.previews.push(document.getElementById("preview").src))
    .observe(document.getElementById("preview"), {attributes: true, attributeFilter: ["src"]});
  new MutationObserver(() => window.seen.progress.push(document.getElementById("progress").value))
    .observe(document.getElementById("status"), {childList: true, characterData: true, subtree: true});
}"""
"""Records every preview image and progress value the page shows (run before Generate)."""


LABELS = {"seed": "Seed", "steps": "Steps", "cfg_scale": "CFG scale", "brush_size": "Brush size",
          "denoising_strength": "Denoising strength"}


def fill(page, **fields) -> None:
    for key, value in fields.items():
        page.get_by_label(LABELS[key], exact=True).fill(str(value))


def generate(page, state: str = "done", **fields) -> None:
    fill(page, **fields)
    page.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_selector(f"#status[data-state={state}]")


def gallery_files(page) -> list[str]:
    return page.locator("#gallery li").evaluate_all("items => items.map(i => i.dataset.file)")


def test_generate_shows_progress_a_changing_preview_and_the_image_in_the_gallery(page, server):
    before = gallery_files(page)
    page.get_by_label("Prompt", exact=True).fill("a blue square on the right")
    page.evaluate(WATCH)
    generate(page, seed=7, steps=12, cfg_scale=6)
    seen = page.evaluate("window.seen")
    previews = [src for src in seen["previews"] if src]
    assert len(set(previews)) >= 3, "the preview changed at least once during sampling, then showed the result"
    steps = [value for value in seen["progress"] if 0 < value < 1]
    assert len(steps) >= 3 and steps == sorted(steps) and seen["progress"][-1] == 1
    assert page.get_by_label("Status", exact=True).text_content() == "Done: 1 image, seed 7"
    files = gallery_files(page)
    assert len(files) == len(before) + 1 and files[1:] == before
    newest = page.locator("#gallery li").first
    assert "a blue square on the right — seed 7, 12 steps, " in newest.text_content()
    assert "CFG 6, 64×64 (txt2img, embedded)" in newest.text_content()
    assert newest.locator("img").evaluate("i => i.complete && i.naturalWidth") == 64
    link = page.get_by_label(f"Download {files[0]}")
    assert link.get_attribute("href") == f"/outputs/{files[0]}"
    download = page.request.get(server[0] + link.get_attribute("href")).body()
    assert download == (server[1] / files[0]).read_bytes()
    parameters = Image.open(io.BytesIO(download)).info["parameters"]
    assert parameters.startswith("a blue square on the right\nNegative prompt: \nSteps: 12, ")
    assert "CFG scale: 6, Seed: 7, Size: 64x64, " in parameters
    final = base64.b64decode(previews[-1].split(",", 1)[1])
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(final))), np.asarray(Image.open(io.BytesIO(
        download))))


def test_cancel_stops_the_run_and_the_next_generate_works(page):
    before = gallery_files(page)
    fill(page, seed=3, steps=400)
    page.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_function("/^Step ([2-9]|\\d\\d)/.test(document.getElementById('status').textContent)")
    page.get_by_role("button", name="Cancel").click()
    page.wait_for_selector("#status[data-state=interrupted]")
    assert page.get_by_label("Status", exact=True).text_content() == "Interrupted (0 images finished)"
    assert page.get_by_role("button", name="Cancel").is_disabled()
    assert gallery_files(page) == before
    generate(page, seed=4, steps=3)
    assert page.get_by_label("Status", exact=True).text_content() == "Done: 1 image, seed 4"
    assert len(gallery_files(page)) == len(before) + 1


def drop(page, path: Path) -> None:
    """Drop ``path`` on the page as a file dragged from the desktop would arrive."""
    page.evaluate("""([b64, name]) => {
      const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
      const files = new DataTransfer();
      files.items.add(new File([bytes], name, {type: "image/png"}));
      document.body.dispatchEvent(new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));
    }""", [base64.b64encode(path.read_bytes()).decode(), path.name])
    page.wait_for_function("document.getElementById('notice').textContent.includes(" + json.dumps(path.name) + ")")


def form(page) -> dict[str, str]:
    labels = ("Prompt", "Negative prompt", "Sampler", "Schedule", "Steps", "CFG scale", "Seed", "Width", "Height")
    return {label: page.get_by_label(label, exact=True).input_value() for label in labels}


def test_dropping_an_a1111_png_fills_the_form(page, tmp_path):
    infotext = ("a green star <lora:pink:0.8>\nNegative prompt: blurry\nSteps: 13, Sampler: Euler a, Schedule type: "
                "Karras, CFG scale: 6.5, Seed: 1234, Size: 64x48, Model: embedded, Version: v1.10.0")
    drop(page, a1111_png(tmp_path / "a1111.png", infotext))
    assert form(page) == {"Prompt": "a green star <lora:pink:0.8>", "Negative prompt": "blurry",
                          "Sampler": "Euler a", "Schedule": "karras", "Steps": "13", "CFG scale": "6.5",
                          "Seed": "1234", "Width": "64", "Height": "48"}
    notice = page.get_by_label("Notice").text_content()
    assert notice.startswith("Loaded the settings of a1111.png (A1111); not reproduced: RNG GPU")


def test_dropping_a_comfyui_png_fills_the_form(page, tmp_path):
    drop(page, comfyui_png(tmp_path / "comfy.png", comfyui_graph()))
    assert form(page) == {"Prompt": "a red circle <lora:pink:0.6:0.8>", "Negative prompt": "blurry",
                          "Sampler": "DPM++ 2M", "Schedule": "karras", "Steps": "3", "CFG scale": "6.5",
                          "Seed": "1234", "Width": "64", "Height": "48"}
    assert page.get_by_label("Notice").text_content().startswith("Loaded the settings of comfy.png (ComfyUI)")


def test_a_painted_mask_is_what_the_server_inpaints_with(page, server, tmp_path):
    init = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(init).ellipse((8, 8, 40, 40), fill="red")
    init.save(tmp_path / "init.png")
    page.get_by_text("Image to image and inpainting").click()
    page.get_by_label("Init image").set_input_files(tmp_path / "init.png")
    canvas = page.get_by_label("Inpaint mask")
    page.wait_for_function("document.getElementById('mask').width === 64")
    fill(page, brush_size=8, denoising_strength=0.9)
    box = canvas.bounding_box()  # shown at 4× its 64×64 pixels: a horizontal stroke through image row 48
    page.mouse.move(box["x"] + box["width"] * 16 / 64, box["y"] + box["height"] * 48 / 64)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 48 / 64, box["y"] + box["height"] * 48 / 64, steps=8)
    page.mouse.up()
    generate(page, seed=5, steps=4)
    newest = gallery_files(page)[0]
    recipe = json.loads(Image.open(server[1] / newest).info["nijimi"])["request"]
    mask = np.asarray(Image.open(recipe["mask"]))
    assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
    rows, columns = np.nonzero(mask)
    assert (rows.min(), rows.max()) in ((44, 51), (44, 52), (43, 52)) and (columns.min(), columns.max()) in (
        (12, 51), (12, 52), (11, 52))
    assert mask[48, 16:48].min() == 255 and mask[:40].max() == 0
    np.testing.assert_array_equal(np.asarray(Image.open(recipe["init_image"])), np.asarray(init))


def test_the_forward_view_of_a_gallery_image_shows_its_panels(page):
    generate(page, seed=9, steps=3)
    page.get_by_role("tab", name="Explain").click()
    page.get_by_label("Explain view").select_option("forward", timeout=5_000)
    page.get_by_label("Image", exact=True).select_option(gallery_files(page)[0])
    page.get_by_role("button", name="Run explain").click()
    page.wait_for_selector("#explain_panels figure img", timeout=60_000)
    panels = page.locator("#explain_panels figure")
    assert panels.count() >= 2
    assert all(w > 0 for w in panels.locator("img").evaluate_all("images => images.map(i => i.naturalWidth)"))
    assert page.get_by_label("Explain status").text_content().endswith(f"{panels.count()} panels")


def test_the_controlnet_slot_sends_a_unit_the_server_uses(page, server, tmp_path):
    control = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(control).ellipse((20, 20, 44, 44), outline="white", width=2)
    control.save(tmp_path / "control.png")
    page.locator("#controlnet summary").click()
    page.get_by_label("Enable ControlNet").check()
    page.get_by_label("Control image").set_input_files(tmp_path / "control.png")
    page.get_by_label("Control module").select_option("none")
    models = page.get_by_label("Control model").locator("option").all_text_contents()
    assert models, "the server lists a ControlNet (the embedded model's)"
    page.get_by_label("Control weight").fill("0.8")
    generate(page, seed=6, steps=3)
    assert page.get_by_label("Notice").is_hidden()
    parameters = Image.open(server[1] / gallery_files(page)[0]).info["parameters"]
    assert f'ControlNet 0: "Module: none, Model: {models[0]}, Weight: 0.8' in parameters
