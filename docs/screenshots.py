"""Write the README's screenshots of the ``nijimi serve`` page, ``docs/screenshots/*.png``: the page idle, generating
with its live preview, the gallery, an inpaint mask, and each explain view (``explain-<view>.png``).

Run by hand from the repository root, with the test extras and a system Chromium (as for ``make test``):
``python docs/screenshots.py``. It starts its own server with the embedded model on a free port; each PNG is
reduced to 128 colours to stay small.
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "browser"))
from studio import launch, missing_browser, open_page, start_server, stop_server  # noqa: E402

OUT = Path(__file__).parent / "screenshots"
ADAPTERS = Path(__file__).parents[1] / "nijimi" / "embedded" / "adapters"
PROMPTS = ("a red circle on the left", "a blue square on the right", "a small yellow star in the middle",
           "a green triangle at the top and a purple circle at the bottom")
EXPLAINED = (("forward", PROMPTS[3], ""), ("trajectory", PROMPTS[3], ""),
             ("attention", "a red circle on the left and a blue square on the right", "red, blue, circle, square"),
             ("adapters", "a pink star at the top <lora:pink:1>", ""))
"""Each explain view with the prompt (on the Generate tab) and words it is shown with."""


def save(page, name: str) -> None:
    shot = Image.open(io.BytesIO(page.screenshot()))
    path = OUT / f"{name}.png"
    shot.convert("RGB").quantize(128).save(path, optimize=True)
    print(f"{path} ({path.stat().st_size // 1024} KB)")


def generate(page, prompt: str, seed: int, steps: int = 20) -> None:
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("Seed", exact=True).fill(str(seed))
    page.get_by_label("Steps", exact=True).fill(str(steps))
    page.get_by_role("button", name="Generate", exact=True).click()


def shoot(page, output: Path) -> None:
    save(page, "idle")
    generate(page, PROMPTS[3], 11, steps=300)
    page.wait_for_function("/^Step (1[5-9]|[2-9]\\d)\\//.test(document.getElementById('status').textContent)")
    save(page, "generating")
    page.get_by_role("button", name="Cancel").click()
    page.wait_for_selector("#status[data-state=interrupted]")
    for seed, prompt in enumerate(PROMPTS):
        generate(page, prompt, seed + 1)
        page.wait_for_selector("#status[data-state=done]")
    page.locator("#gallery").scroll_into_view_if_needed()
    save(page, "gallery")
    newest = page.locator("#gallery li").first.get_attribute("data-file")
    page.get_by_text("Image to image and inpainting").click()
    page.get_by_label("Init image").set_input_files(output / newest)
    page.wait_for_function("document.getElementById('mask').width === 64")
    page.get_by_label("Brush size", exact=True).fill("10")
    box = page.get_by_label("Inpaint mask").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.4, steps=10)
    page.mouse.up()
    page.get_by_label("Inpaint mask").scroll_into_view_if_needed()
    save(page, "inpaint")
    page.get_by_role("tab", name="Explain").click()
    if not page.locator("#explain_view option").count():
        print("no explain views on this server: no explain screenshots written")
        return
    for view, prompt, words in EXPLAINED:
        page.get_by_role("tab", name="Generate").click()
        page.get_by_label("Prompt", exact=True).fill(prompt)
        page.get_by_label("Steps", exact=True).fill("8" if view == "trajectory" else "20")
        page.get_by_role("tab", name="Explain").click()
        page.get_by_label("Explain view").select_option(view)
        page.get_by_label("Words", exact=True).fill(words)
        page.get_by_role("button", name="Run explain").click()
        page.wait_for_function("document.getElementById('explain_status').textContent.match(/: \\d+ panels?$/)",
                               timeout=300_000)
        save(page, f"explain-{view}")


def main() -> int:
    why = missing_browser()
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as temp:
        output = Path(temp) / "outputs"
        process, url = start_server(output, "--lora-dir", str(ADAPTERS))
        try:
            with sync_playwright() as playwright:
                context = launch(playwright, Path(temp) / "profile")
                context.set_default_timeout(120_000)
                shoot(open_page(context, url), output)
                context.close()
        finally:
            stop_server(process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
