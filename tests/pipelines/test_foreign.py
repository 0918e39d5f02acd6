"""A1111 infotexts and ComfyUI API graphs → the GenerationRequest they state (every field asserted), the files they
name found by hash or name, and one warning per thing nijimi cannot reproduce exactly; malformed, cyclic and huge
graphs are one ImageError."""

import hashlib
import shutil

import pytest
import torch
from foreign_images import comfyui_graph
from safetensors.torch import save_file

from nijimi.diffusion.choice import SamplerChoice
from nijimi.embedded import ADAPTERS, WEIGHTS
from nijimi.errors import ConfigError, ImageError, NijimiError
from nijimi.io.find import Folders
from nijimi.io.pngmeta import model_hash, parse_parameters
from nijimi.pipelines.adapters import LoraRequest
from nijimi.pipelines.comfyui import MAX_NODES, from_graph
from nijimi.pipelines.foreign import a1111_schedule, from_infotext, to_request


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An A1111-style install: models/, Lora/ (with a LoRA named otherwise than its tag), VAE/."""
    root = tmp_path_factory.mktemp("webui")
    (root / "models" / "sd15").mkdir(parents=True)
    shutil.copy(WEIGHTS, root / "models" / "sd15" / "shapes.safetensors")
    (root / "Lora").mkdir()
    shutil.copy(ADAPTERS / "pink.safetensors", root / "Lora" / "renamed-pink.safetensors")
    (root / "VAE").mkdir()
    save_file({"decoder.conv_in.weight": torch.zeros(1)}, root / "VAE" / "kl-f8.safetensors")
    return Folders(root / "models", root / "Lora", root / "VAE")


def _pink_hash(folders) -> str:
    path = folders.lora / "renamed-pink.safetensors"
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def test_a1111_infotext_to_request(folders):
    model = folders.model / "sd15" / "shapes.safetensors"
    vae = folders.vae / "kl-f8.safetensors"
    text = (
        "a red circle, <lora:pink:0.5:0.75> (blue:1.2)\n"
        "Negative prompt: blurry\n"
        "Steps: 12, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 64x48, "
        f"Model hash: {model_hash(model)}, Model: renamed, VAE hash: {model_hash(vae)}, VAE: kl-f8.safetensors, "
        "Variation seed: 99, Variation seed strength: 0.25, Seed resize from: 32x32, Clip skip: 2, RNG: CPU, "
        f'Lora hashes: "pink: {_pink_hash(folders)}", Version: v1.10.1'
    )
    imported = to_request(from_infotext(parse_parameters(text)), folders)
    r = imported.request
    assert (imported.model, imported.warnings) == (str(model), ())
    assert (r.prompt, r.negative_prompt) == ("a red circle,  (blue:1.2)", "blurry")
    assert (r.steps, r.sampler, r.guidance, r.seed, r.width, r.height) == (
        12, SamplerChoice("dpm++2m", "karras"), 6.5, 1234, 64, 48)
    assert (r.variation_seed, r.variation_strength, r.seed_resize, r.clip_skip) == (99, 0.25, (32, 32), 2)
    assert r.vae == str(vae) and r.loras == (LoraRequest(folders.lora / "renamed-pink.safetensors", 0.5, 0.75),)
    assert r.eta is None and r.init_image is None and r.batch == 1 and r.lora_dir == str(folders.lora)


def test_an_infotext_without_a_cfg_scale_means_a1111s_default(folders):
    """Not the model's own scale: the embedded model (copied in as shapes.safetensors) names 4, A1111 ran 7."""
    text = "a red circle\nSteps: 3, Seed: 5, Size: 64x64, Model: shapes"
    imported = to_request(from_infotext(parse_parameters(text)), folders)
    assert imported.model == str(folders.model / "sd15" / "shapes.safetensors") and imported.request.guidance == 7.0


def test_a1111_controlnet_units_are_read_back_as_control_flags(folders):
    text = ('a cat\nSteps: 5, Sampler: Euler a, CFG scale: 7, Seed: 3, Size: 64x64, RNG: CPU, ControlNet 0: "Module: '
            'canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 0.9, Resize Mode: Just Resize, Low Vram: False, '
            'Processor Res: 512, Threshold A: 50, Threshold B: 150, Guidance Start: 0.1, Guidance End: 0.8, Pixel '
            'Perfect: True, Control Mode: ControlNet is more important", ControlNet 1: "Module: depth_midas, Model: '
            'control_v11f1p_sd15_depth [cfd03158], Weight: 1"')
    imported = to_request(from_infotext(parse_parameters(text)), folders, "embedded")
    assert imported.request.control == ()
    assert imported.warnings == (
        "ControlNet 0: not reproduced, the metadata does not hold its control image; with the image, add --control "
        "model=control_v11p_sd15_canny,image=IMAGE,pre=canny,scale=0.9,start=0.1,end=0.8,guess=true,low=50,high=150",
        "ControlNet 1: not reproduced, the metadata does not hold its control image; its preprocessor 'depth_midas' "
        "is not one nijimi has")


def test_a1111_warnings_name_what_is_not_reproduced(folders):
    text = (
        "a cat <lora:missing:1>\nSteps: 5, Sampler: Euler a, CFG scale: 7, Seed: 3, Size: 64x64, "
        "Model hash: 0123456789, Model: shapes, Denoising strength: 0.4, ENSD: 31337, Eta: 0.5, "
        "ADetailer model: face_yolov8n.pt, ADetailer confidence: 0.3, ControlNet 0: \"Module: canny\", "
        'VAE: gone.pt, Emphasis: Original, TI hashes: "easynegative: c74b4e810b03", Version: v1.6.0'
    )
    imported = to_request(from_infotext(parse_parameters(text)), folders)
    r = imported.request
    # A1111 before 1.9 ran a bare "Euler a" on k-diffusion's get_sigmas: its Uniform, nijimi's normal
    assert (r.sampler, r.eta, r.steps, r.loras) == (SamplerChoice("euler-a", "normal"), 0.5, 5, ())
    assert imported.warnings == (
        "Denoising strength 0.4: the image was made from another image (img2img), which its metadata does not hold; "
        "generating from noise",
        "RNG GPU: A1111 drew the noise on the GPU; nijimi draws it on the CPU (as A1111 with RNG: CPU), so the "
        "picture differs",
        "ENSD 31337: A1111's eta noise seed delta is not reproduced",
        "ControlNet 0: not reproduced, the metadata does not hold its control image; with the image, add --control "
        "model=FILE,image=IMAGE,pre=canny,resize=crop",
        "ADetailer model, ADetailer confidence: not reproduced (a setting nijimi does not have)",
        "model shapes.safetensors has the image's model name 'shapes' but not its hash 0123456789",
        f"VAE 'gone.pt' not found in {folders.vae} (--vae-dir DIR); decoding with the model's own VAE",
        f"LoRA 'missing' not found in {folders.lora} (--lora-dir DIR); left out",
        "TI hashes: the embeddings easynegative are not applied without --embeddings-dir (their names are read as "
        "words)",
    )
    (folders.model.parent / "embeddings").mkdir(exist_ok=True)
    (folders.model.parent / "embeddings" / "easynegative.safetensors").write_bytes(b"{}")
    text = text.replace('"easynegative: c74b4e810b03"', '"easynegative: c74b4e810b03, badhand: 7dd5ebc7b2ae"')
    with_dir = Folders(folders.model, folders.lora, folders.vae, folders.model.parent / "embeddings")
    imported = to_request(from_infotext(parse_parameters(text)), with_dir)
    assert imported.request.embeddings == (str(with_dir.embedding / "easynegative.safetensors"),)
    assert imported.warnings[-1] == f"TI hashes: not in {with_dir.embedding}: badhand (their names are read as words)"


@pytest.mark.parametrize(("sampler", "schedule", "version", "expected"), [
    ("DPM++ 2M", None, "v1.10.1", "Karras"),           # A1111 ≥ 1.9: Automatic is the sampler's default
    ("DPM++ 2M", "Automatic", None, "Karras"),
    ("DPM++ 2M SDE", "Automatic", None, "Exponential"),
    ("Euler a", "Automatic", None, "Uniform"),
    ("DPM++ 2M", None, "v1.7.0", "Uniform"),            # before 1.9 a bare name ran on uniform timesteps
    ("DPM++ 2M", "Exponential", "v1.10.1", "Exponential"),
])
def test_a1111_schedule_rules(sampler, schedule, version, expected):
    assert a1111_schedule(sampler, schedule, version) == expected


@pytest.mark.parametrize(("line", "expected"), [
    ("Sampler: Euler, Schedule type: Uniform", ("euler", "normal")),      # A1111's Uniform: k-diffusion get_sigmas
    ("Sampler: Euler a, Schedule type: Automatic", ("euler-a", "normal")),
    ("Sampler: Euler, Schedule type: Karras", ("euler", "karras")),
    ("Sampler: DPM++ 2M, Schedule type: Uniform", ("dpm++2m", "normal")),
])
def test_a1111_schedule_types_reproduce_as_a1111_ran_them(folders, line, expected):
    text = f"p\nSteps: 5, {line}, CFG scale: 7, Seed: 3, Size: 64x64, RNG: CPU, Version: v1.10.1"
    imported = to_request(from_infotext(parse_parameters(text)), folders, model="embedded")
    assert imported.request.sampler == SamplerChoice(*expected) and imported.warnings == ()


def test_a1111_combined_sampler_names_and_hires_and_model_errors(folders):
    text = ("p\nSteps: 5, Sampler: DPM++ 2M Karras, Schedule type: Exponential, CFG scale: 7, Seed: 3, "
            "Size: 64x64, Model: nowhere, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, "
            "Denoising strength: 0.5, RNG: CPU")
    settings = from_infotext(parse_parameters(text))
    imported = to_request(settings, folders, model="embedded")
    assert imported.model == "embedded" and imported.request.sampler == SamplerChoice("dpm++2m", "karras")
    assert imported.warnings == ()
    r = imported.request
    assert (r.hires_scale, r.hires_steps, r.hires_upscaler, r.hires_denoise, r.strength) == (2.0, 10, "Latent", 0.5,
                                                                                             0.75)
    with pytest.raises(ConfigError, match=r"model 'nowhere' is not in .*models \(give --model FILE\)"):
        to_request(settings, folders)
    with pytest.raises(ConfigError, match=r"A1111 image made with model 'nowhere': give --model FILE or --models-dir"):
        to_request(settings, Folders())
    with pytest.raises(ConfigError, match="A1111 settings: .*seed -3 must be an integer"):
        to_request(from_infotext(parse_parameters(text.replace("Seed: 3", "Seed: -3"))), folders, "embedded")


def test_comfyui_graph_to_request(folders):
    graph = comfyui_graph(ckpt="sd15/shapes.safetensors", lora="renamed-pink.safetensors")
    graph["12"] = {"class_type": "VAELoader", "inputs": {"vae_name": "kl-f8.safetensors"}}
    graph["8"]["inputs"]["vae"] = ["12", 0]
    graph["3"]["inputs"]["seed"] = ["13", 0]  # a primitive node holds the seed
    graph["13"] = {"class_type": "PrimitiveInt", "inputs": {"value": 777}}
    settings = from_graph(graph)
    assert (settings.prompt, settings.negative_prompt, settings.warnings) == ("a red circle", "blurry", [])
    imported = to_request(settings, folders)
    r = imported.request
    assert (imported.model, imported.warnings) == (str(folders.model / "sd15" / "shapes.safetensors"), ())
    assert (r.steps, r.sampler, r.guidance, r.seed, r.width, r.height, r.clip_skip) == (
        3, SamplerChoice("dpm++2m", "karras"), 6.5, 777, 64, 48, 2)
    assert r.loras == (LoraRequest(folders.lora / "renamed-pink.safetensors", 0.6, 0.8),)
    assert r.vae == str(folders.vae / "kl-f8.safetensors")


def test_comfyui_nodes_that_change_the_result_are_named():
    graph = comfyui_graph(lora=None)
    graph["3"]["class_type"] = "KSamplerAdvanced"
    inputs = graph["3"]["inputs"]
    inputs["noise_seed"] = inputs.pop("seed")
    inputs.update(add_noise="enable", start_at_step=0, end_at_step=2, return_with_leftover_noise="disable")
    inputs["sampler_name"], inputs["scheduler"] = "dpmpp_2m_sde_gpu", "normal"
    graph["20"] = {"class_type": "FreeU_V2", "inputs": {"model": inputs["model"], "b1": 1.3}}
    inputs["model"] = ["20", 0]
    graph["21"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {"positive": ["6", 0], "negative": ["7", 0]}}
    inputs["positive"], inputs["negative"] = ["21", 0], ["21", 1]
    graph["22"] = {"class_type": "KSampler", "inputs": {**graph["3"]["inputs"], "latent_image": ["23", 0]}}
    graph["23"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["3", 0], "scale_by": 1.5}}
    graph["24"] = {"class_type": "ImageUpscaleWithModel", "inputs": {"image": ["8", 0]}}
    graph["8"]["inputs"]["samples"] = ["22", 0]
    graph["9"]["inputs"]["images"] = ["24", 0]
    graph["5"]["inputs"]["batch_size"] = 4
    settings = from_graph(graph)
    assert (settings.prompt, settings.negative_prompt) == ("a red circle", "blurry")
    assert settings.values == {"RNG": "CPU", "Model": "sd15/model.safetensors", "Size": (64, 48), "Steps": 3,
                               "CFG scale": 6.5, "Seed": 1234, "Sampler": "dpmpp_2m_sde", "Schedule type": "Uniform",
                               "Clip skip": 2}
    assert settings.warnings == [
        "ComfyUI node 24 (ImageUpscaleWithModel) is not reproduced",
        "ComfyUI node 23 (LatentUpscaleBy) is not reproduced",
        "ComfyUI batch of 4: only its first image is reproduced",
        "ComfyUI node(s) 22 sample the image again (hires fix or refiner): not reproduced; the first pass is",
        "ComfyUI sampler dpmpp_2m_sde_gpu draws its Brownian noise on the GPU; nijimi's differs",
        "ComfyUI node 3 (KSamplerAdvanced) samples only part of the schedule (denoise, start or end step, or no "
        "added noise): not reproduced, the whole schedule is run",
        "ComfyUI node 20 (FreeU_V2) is not reproduced",
        "ComfyUI node 21 (ControlNetApplyAdvanced) is not reproduced",
    ]


def test_bad_comfyui_graphs_are_one_error():
    cyclic = comfyui_graph(lora=None)
    cyclic["11"]["inputs"]["clip"] = ["30", 0]
    cyclic["30"] = {"class_type": "CLIPSetLastLayer", "inputs": {"stop_at_clip_layer": -1, "clip": ["11", 0]}}
    with pytest.raises(ImageError, match=r"ComfyUI graph has a cycle through node 11 \(CLIPSetLastLayer\)"):
        from_graph(cyclic)
    looped = comfyui_graph(lora=None)
    looped["3"]["inputs"]["latent_image"] = ["3", 0]  # a sampler sampling its own output
    with pytest.raises(ImageError, match="ComfyUI graph has a cycle through node 3"):
        from_graph(looped)
    huge = {str(i): {"class_type": "Note", "inputs": {}} for i in range(MAX_NODES + 1)}
    with pytest.raises(ImageError, match=f"ComfyUI graph has {MAX_NODES + 1} nodes; nijimi reads at most {MAX_NODES}"):
        from_graph(huge)
    dangling = comfyui_graph(lora=None)
    dangling["6"]["inputs"]["clip"] = ["99", 1]
    with pytest.raises(ImageError, match="ComfyUI node 6 clip: links to node 99, which the graph does not have"):
        from_graph(dangling)
    for bad, message in ([1, 2], "not an API graph"), ({"1": {"inputs": {}}}, "node 1: not a node with class_type"):
        with pytest.raises(ImageError, match=message):
            from_graph(bad)
    unsaved = {k: v for k, v in comfyui_graph().items() if k != "9"}
    with pytest.raises(ImageError, match="no SaveImage or PreviewImage node"):
        from_graph(unsaved)


@pytest.mark.parametrize("odd", ["abc", None, [], {"x": 1}, ["999", 0], ["3", "0"], True, -1, 1e308])
def test_any_odd_input_value_is_a_result_or_one_nijimi_error(folders, odd):
    """Every input of every node replaced in turn: from_graph and to_request return or raise NijimiError (the CLI's
    one error line), never another exception."""
    base = comfyui_graph(ckpt="sd15/shapes.safetensors", lora="renamed-pink.safetensors")
    for nid, node in base.items():
        for key in node["inputs"]:
            graph = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in base.items()}
            graph[nid]["inputs"][key] = odd
            try:
                to_request(from_graph(graph), folders)
            except NijimiError:
                pass


@pytest.mark.parametrize("odd", ["abc", "", "-1", "0x0", "1e400", '"a, b: c"', "99999999999999999999999"])
def test_any_odd_a1111_value_is_a_result_or_one_nijimi_error(folders, odd):
    keys = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model", "VAE hash",
            "VAE", "Clip skip", "Variation seed", "Variation seed strength", "Seed resize from", "Eta", "Eta DDIM",
            "ENSD", "RNG", "Lora hashes", "TI hashes", "Denoising strength", "Hires upscale", "Version")
    for key in keys:
        text = f"p <lora:pink:1>\nSteps: 2, Seed: 1, Size: 64x64, Model: shapes, {key}: {odd}"
        try:
            to_request(from_infotext(parse_parameters(text)), folders)
        except NijimiError:
            pass
