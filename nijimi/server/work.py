"""One txt2img/img2img call run on the resident pipeline, in the worker thread: its ``n_iter`` batches through
:meth:`Pipeline.generate <nijimi.pipelines.pipeline.Pipeline.generate>`, progress and interrupts through the step
callback, and each image as a PNG with the metadata ``nijimi generate`` writes (A1111's ``parameters`` and the
recipe), saved to the output folder when asked — by the same atomic, never-overwriting writer as the CLI.

A saved img2img image's recipe names its init image and mask (a ControlNet image's: its control images), so they
are saved too, once per content, as ``inputs/<sha256>.png`` in the output folder; ``nijimi reproduce`` then replays
the image. An image that is only sent (not saved) carries no recipe when such an image exists only in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from nijimi.cli import output_paths, write_png
from nijimi.errors import ConfigError, OutputExistsError
from nijimi.io.files import atomic_write
from nijimi.io.pngmeta import PARAMETERS_KEY, RECIPE_KEY
from nijimi.pipelines.control_maps import ControlSpec
from nijimi.pipelines.images import open_image
from nijimi.pipelines.pipeline import Pipeline
from nijimi.pipelines.request import GenerationRequest
from nijimi.server.a1111 import Call, Outcome
from nijimi.server.errors import Cancelled
from nijimi.server.jobs import Job
from nijimi.ui.recipe import a1111_text, embedding_hashes, png_recipe

INPUTS = "inputs"
"""Subfolder of the output folder that holds the init images and masks of saved img2img images."""


def run_call(pipe: Pipeline, call: Call, job: Job, output: Path) -> Outcome:
    """Generate ``call``'s batches with ``pipe``, batch k from seed ``seed + k × batch`` (A1111's numbering of
    ``n_iter``), and return the images. An interrupt raises :class:`Cancelled` carrying the images of the batches
    that finished (``partial``); the batch being sampled is dropped."""
    outcome = Outcome(model=pipe.name, model_hash=pipe.model_hash)
    job.begin(call.iterations, pipe.latent_rgb)
    first, batch = call.request, call.request.batch
    inputs = _save_inputs(first, output) if call.save_images else {}
    for k in range(call.iterations):
        varied = None if first.variation_seed is None else first.variation_seed + k * batch
        request = first.replace(seed=first.seed + k * batch, variation_seed=varied)
        try:
            gen = pipe.generate(request, callback=lambda info, k=k: job.step(k, info))
        except Cancelled as exc:
            outcome.interrupted = True
            raise Cancelled(str(exc), outcome) from None
        outcome.warnings += [f"{path.name}: {len(keys)} keys fit no module of this model and were left out"
                             for path, keys in gen.lora_unmatched.items()]
        hashes = embedding_hashes(gen.embeddings)
        for i, image in enumerate(gen.images):
            _keep(outcome, pipe, gen.request.single(i), image, inputs, output if call.save_images else None, hashes)
    return outcome


def _keep(outcome: Outcome, pipe: Pipeline, one: GenerationRequest, image: Image.Image, inputs: dict,
          folder: Path | None, hashes: dict[str, str]) -> None:
    """Add one image to ``outcome`` as PNG bytes with metadata, written to ``folder`` first when there is one."""
    text = a1111_text(pipe, one, hashes)
    try:
        recipe = png_recipe(pipe, one.replace(**inputs), embeddings=hashes)
    except ConfigError:  # an in-memory init image: nothing a recipe can name
        recipe = None
    if folder is not None:
        path = write_png(image, output_paths(str(folder), one, False)[0], True, False, text, recipe)
        outcome.files.append(path.name)
        png = path.read_bytes()
    else:
        info = PngImagePlugin.PngInfo()
        info.add_text(PARAMETERS_KEY, text)
        if recipe is not None:
            info.add_text(RECIPE_KEY, json.dumps(recipe, ensure_ascii=False, default=str))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=info)
        png = buffer.getvalue()
    outcome.pngs.append(png)
    outcome.requests.append(one)
    outcome.infotexts.append(text)


def _save_inputs(request: GenerationRequest, output: Path) -> dict[str, Any]:
    """Write the request's in-memory init image (RGB), mask (L) and ControlNet images (RGB), upright, as
    ``inputs/<sha256 of the PNG>.png`` in ``output`` unless such a file is there; returns the request fields naming
    them."""
    saved: dict[str, Any] = {}
    for name, mode in (("init_image", "RGB"), ("mask", "L")):
        image = getattr(request, name)
        if isinstance(image, Image.Image):
            saved[name] = _save_input(image, mode, output)
    if any(isinstance(c, ControlSpec) and isinstance(c.image, Image.Image) for c in request.control):
        saved["control"] = tuple(dataclasses.replace(c, image=_save_input(c.image, "RGB", output))
                                 if isinstance(c, ControlSpec) and isinstance(c.image, Image.Image) else c
                                 for c in request.control)
    return saved


def _save_input(image: Image.Image, mode: str, output: Path) -> str:
    """``image`` in ``mode`` as ``inputs/<sha256>.png`` in ``output`` (written once per content); its path."""
    buffer = io.BytesIO()
    open_image(image, mode).save(buffer, format="PNG")
    data = buffer.getvalue()
    path = output / INPUTS / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        try:
            with atomic_write(path, "wb", overwrite=False) as f:
                f.write(data)
        except OutputExistsError:  # written meanwhile by another job: the same bytes
            pass
    return str(path)
