"""ComfyUI API graphs (a PNG's ``prompt`` chunk) → :class:`~nijimi.pipelines.foreign.ForeignSettings`.

The API graph maps node ids to ``{"class_type", "inputs"}``; an input is a value or a link ``[node_id,
output_index]``. The image's path is followed backwards from its output node (SaveImage, else PreviewImage):
``images`` → VAEDecode (``samples``, ``vae``) → KSampler (``seed``, ``steps``, ``cfg``, ``sampler_name``,
``scheduler``, ``denoise``) or KSamplerAdvanced (``noise_seed``, …, ``add_noise``, ``start_at_step``,
``end_at_step``) → ``positive``/``negative`` CLIPTextEncode (``text``, ``clip``) and ``latent_image``
EmptyLatentImage (``width``, ``height``, ``batch_size``); the ``model`` and ``clip`` chains run through LoraLoader
(``lora_name``, ``strength_model``, ``strength_clip``; LoraLoaderModelOnly) and CLIPSetLastLayer
(``stop_at_clip_layer``: -2 is A1111's clip skip 2) to CheckpointLoaderSimple (``ckpt_name``; outputs MODEL 0, CLIP
1, VAE 2); VAELoader gives ``vae_name``. A node of any other class on that path is passed through its input of the
same kind (``model``, ``clip``, ``conditioning``, ``samples``, ``images``…) and named in a warning: it changes the
result. A sampler whose latent comes from another sampler is a second pass (hires fix, refiner): the first pass is
read and the later ones named. A link to a scalar node (a primitive) takes that node's one value.

Traversal is bounded: a graph of more than :data:`MAX_NODES` nodes is refused, every walk visits a node at most once
(a cycle is an error), and malformed nodes or links raise ImageError naming the node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nijimi.errors import ImageError
from nijimi.pipelines.foreign import ForeignSettings, LoraRef

MAX_NODES = 10_000
SAMPLERS = ("KSampler", "KSamplerAdvanced")
_OUTPUTS = ("SaveImage", "PreviewImage")
_PASS = {"model": ("model",), "clip": ("clip",), "conditioning": ("conditioning", "conditioning_to", "conditioning_1"),
         "latent": ("samples", "latent", "latent_image"), "image": ("images", "image", "pixels"), "vae": ("vae",)}
_SCHEDULES = {"normal": "Uniform", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
              "simple": "Simple", "ddim_uniform": "DDIM", "beta": "Beta", "kl_optimal": "KL Optimal"}
"""ComfyUI's scheduler names → A1111's schedule types (``comfy/samplers.py``, ``modules/sd_schedulers.py``)."""
Link = list


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str | int) \
        and isinstance(value[1], int) and not isinstance(value[1], bool)


class _Graph:
    """A checked API graph: ``nodes[id] = (class_type, inputs)``."""

    def __init__(self, graph: Any) -> None:
        if not isinstance(graph, dict):
            raise ImageError(f"ComfyUI prompt is not an API graph (a JSON object of nodes) but {type(graph).__name__}")
        if len(graph) > MAX_NODES:
            raise ImageError(f"ComfyUI graph has {len(graph)} nodes; nijimi reads at most {MAX_NODES}")
        self.nodes: dict[str, tuple[str, dict]] = {}
        for nid, node in graph.items():
            if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) \
                    or not isinstance(node.get("inputs", {}), dict):
                raise ImageError(f"ComfyUI node {nid}: not a node with class_type and inputs")
            self.nodes[str(nid)] = (node["class_type"], node.get("inputs", {}))

    def follow(self, link: Any, where: str) -> tuple[str, str, dict, int]:
        """The node a link points at: (id, class_type, inputs, output index)."""
        if not _is_link(link):
            raise ImageError(f"ComfyUI {where}: {str(link)[:80]} is not a link [node, output]")
        nid = str(link[0])
        if nid not in self.nodes:
            raise ImageError(f"ComfyUI {where}: links to node {nid}, which the graph does not have")
        return nid, *self.nodes[nid], link[1]

    def value(self, nid: str, inputs: dict, key: str, warnings: list[str]) -> Any:
        """Input ``key`` of node ``nid``: its value, or the one scalar input of the node it links to."""
        value = inputs.get(key)
        if not _is_link(value):
            return value
        src, cls, src_inputs, _ = self.follow(value, f"node {nid} {key}")
        scalars = [v for v in src_inputs.values() if isinstance(v, str | int | float) and not isinstance(v, bool)]
        if len(scalars) == 1:
            return scalars[0]
        warnings.append(f"ComfyUI node {nid} {key}: comes from node {src} ({cls}), which nijimi cannot evaluate")
        return None


Step = Callable[[str, str, dict, int], Any]
_UNKNOWN = object()


def _walk(g: _Graph, link: Any, kind: str, step: Step, warnings: list[str], where: str) -> None:
    """Follow ``link`` backwards: ``step(id, class, inputs, output)`` handles a node and returns the next link (None:
    done; ``_UNKNOWN``: not its class, passed through its ``kind`` input and named)."""
    seen: set[str] = set()
    while link is not None:
        nid, cls, inputs, out = g.follow(link, where)
        if nid in seen:
            raise ImageError(f"ComfyUI graph has a cycle through node {nid} ({cls})")
        seen.add(nid)
        nxt = step(nid, cls, inputs, out)
        if nxt is _UNKNOWN:
            names = ("negative" if out == 1 else "positive", *_PASS[kind]) if kind == "conditioning" else _PASS[kind]
            nxt = next((inputs[n] for n in names if _is_link(inputs.get(n))), None)
            warnings.append(f"ComfyUI node {nid} ({cls}) is not reproduced" + ("" if nxt else f" (no {kind} input)"))
        link, where = nxt, f"node {nid}"


class _Reader:
    """Collects one image's settings while walking its graph."""

    def __init__(self, g: _Graph) -> None:
        self.g = g
        self.values: dict[str, Any] = {"RNG": "CPU"}  # ComfyUI draws its noise on the CPU
        self.loras: dict[str, LoraRef] = {}
        self.warnings: list[str] = []
        self.prompt = self.negative = ""

    def model_step(self, nid: str, cls: str, inputs: dict, out: int) -> Any:
        if cls.startswith("CheckpointLoader"):
            self.values["Model"] = self.g.value(nid, inputs, "ckpt_name", self.warnings)
            return None
        if cls in ("LoraLoader", "LoraLoaderModelOnly"):
            self._lora(nid, inputs).unet = self._strength(nid, inputs, "strength_model")
            return inputs.get("model")
        return _UNKNOWN

    def clip_step(self, nid: str, cls: str, inputs: dict, out: int) -> Any:
        if cls.startswith("CheckpointLoader"):
            return None
        if cls == "LoraLoader":
            self._lora(nid, inputs).te = self._strength(nid, inputs, "strength_clip")
            return inputs.get("clip")
        if cls == "CLIPSetLastLayer":
            layer = self.g.value(nid, inputs, "stop_at_clip_layer", self.warnings)
            if isinstance(layer, int) and layer < 0:
                self.values.setdefault("Clip skip", -layer)  # the last one applied (met first going back) counts
            return inputs.get("clip")
        return _UNKNOWN

    def _strength(self, nid: str, inputs: dict, key: str) -> float:
        value = self.g.value(nid, inputs, key, self.warnings)
        if not _is_number(value):
            raise ImageError(f"ComfyUI node {nid} {key}: {str(value)[:40]!r} is not a number")
        return float(value)

    def _lora(self, nid: str, inputs: dict) -> LoraRef:
        if nid not in self.loras:
            self.loras[nid] = LoraRef(str(self.g.value(nid, inputs, "lora_name", self.warnings)), 0.0, 0.0)
        return self.loras[nid]

    def text(self, link: Any, which: str) -> str:
        found: list[str] = []

        def step(nid: str, cls: str, inputs: dict, out: int) -> Any:
            if cls != "CLIPTextEncode":
                return _UNKNOWN
            found.append(str(self.g.value(nid, inputs, "text", self.warnings) or ""))
            if which == "positive":
                _walk(self.g, inputs.get("clip"), "clip", self.clip_step, self.warnings, f"node {nid} clip")
            return None

        _walk(self.g, link, "conditioning", step, self.warnings, f"{which} prompt")
        return found[0] if found else ""

    def sampler(self, nid: str, inputs: dict) -> None:
        """Settings of the first-pass sampler ``nid``: its own, its model chain's and its prompts'."""
        cls = self.g.nodes[nid][0]
        seed = "noise_seed" if cls == "KSamplerAdvanced" else "seed"
        links = ("model", "positive", "negative", "latent_image")
        v = {k: self.g.value(nid, inputs, k, self.warnings) for k in inputs if k not in links}
        name = str(v.get("sampler_name") or "")
        if name.endswith("_gpu"):
            name = name[: -len("_gpu")]
            self.warnings.append(f"ComfyUI sampler {name}_gpu draws its Brownian noise on the GPU; nijimi's differs")
        scheduler = str(v.get("scheduler") or "")
        self.values.update({"Steps": v.get("steps"), "CFG scale": v.get("cfg"), "Seed": v.get(seed), "Sampler": name,
                            "Schedule type": _SCHEDULES.get(scheduler, scheduler)})
        steps, start, end, denoise = (v.get(k) for k in ("steps", "start_at_step", "end_at_step", "denoise"))
        partial = (v.get("add_noise") == "disable" or (_is_number(start) and start > 0)
                   or (_is_number(end) and _is_number(steps) and end < steps) or (_is_number(denoise) and denoise < 1))
        if partial:
            self.warnings.append(f"ComfyUI node {nid} ({cls}) samples only part of the schedule (denoise, start or "
                                 "end step, or no added noise): not reproduced, the whole schedule is run")
        _walk(self.g, inputs.get("model"), "model", self.model_step, self.warnings, f"node {nid} model")
        self.prompt = self.text(inputs.get("positive"), "positive")
        self.negative = self.text(inputs.get("negative"), "negative")

    def latent_source(self, nid: str, inputs: dict) -> str | None:
        """Walk the sampler's ``latent_image`` back to an EmptyLatentImage (sets Size) or another sampler (returned:
        this one is a later pass)."""
        earlier: list[str] = []

        def step(src: str, cls: str, src_inputs: dict, out: int) -> Any:
            if cls in SAMPLERS:
                earlier.append(src)
                return None
            if cls == "EmptyLatentImage":
                w, h = (self.g.value(src, src_inputs, k, self.warnings) for k in ("width", "height"))
                self.values["Size"] = (w, h) if isinstance(w, int) and isinstance(h, int) else None
                batch = self.g.value(src, src_inputs, "batch_size", self.warnings)
                if isinstance(batch, int) and batch > 1:
                    self.warnings.append(f"ComfyUI batch of {batch}: only its first image is reproduced")
                return None
            if cls.startswith("VAEEncode"):
                self.warnings.append(f"ComfyUI node {src} ({cls}) starts from an image the metadata does not hold "
                                     "(img2img): generating from noise")
                return None
            return _UNKNOWN

        _walk(self.g, inputs.get("latent_image"), "latent", step, self.warnings, f"node {nid} latent_image")
        return earlier[0] if earlier else None


def _output(g: _Graph) -> tuple[str, list[str]]:
    """The output node of the image (SaveImage first, lowest id) and a warning when there are several."""
    outputs = sorted((nid for nid, (cls, _) in g.nodes.items() if cls in _OUTPUTS),
                     key=lambda nid: (g.nodes[nid][0] != "SaveImage", not nid.isdecimal(), len(nid), nid))
    if not outputs:
        raise ImageError("ComfyUI graph has no SaveImage or PreviewImage node to follow back")
    return outputs[0], [f"ComfyUI graph has {len(outputs)} outputs; reading node {outputs[0]}"][: len(outputs) > 1]


def _final_sampler(g: _Graph, reader: _Reader) -> str:
    """From the output node back through VAEDecode to the sampler; records the VAE."""
    out = _output(g)
    reader.warnings += out[1]
    found: list[str] = []

    def vae_step(nid: str, cls: str, inputs: dict, _: int) -> Any:
        if cls == "VAELoader":
            reader.values["VAE"] = g.value(nid, inputs, "vae_name", reader.warnings)
            return None
        return None if cls.startswith("CheckpointLoader") else _UNKNOWN

    def latent_step(nid: str, cls: str, inputs: dict, _: int) -> Any:
        if cls in SAMPLERS:
            found.append(nid)
            return None
        return _UNKNOWN

    def image_step(nid: str, cls: str, inputs: dict, _: int) -> Any:
        if not cls.startswith("VAEDecode"):
            return _UNKNOWN
        _walk(g, inputs.get("vae"), "vae", vae_step, reader.warnings, f"node {nid} vae")
        _walk(g, inputs.get("samples"), "latent", latent_step, reader.warnings, f"node {nid} samples")
        return None

    _walk(g, g.nodes[out[0]][1].get("images"), "image", image_step, reader.warnings, f"node {out[0]} images")
    if not found:
        raise ImageError(f"ComfyUI graph: no KSampler or KSamplerAdvanced made the image of node {out[0]}")
    return found[0]


def from_graph(graph: Any) -> ForeignSettings:
    """The settings of the image a ComfyUI API graph made (see the module docstring)."""
    g = _Graph(graph)
    reader = _Reader(g)
    sampler, passes = _final_sampler(g, reader), []
    while (earlier := reader.latent_source(sampler, g.nodes[sampler][1])) is not None:
        if earlier in passes or earlier == sampler:
            raise ImageError(f"ComfyUI graph has a cycle through node {earlier}")
        passes.append(sampler)
        sampler = earlier
    if passes:
        reader.warnings.append(f"ComfyUI node(s) {', '.join(passes)} sample the image again (hires fix or refiner): "
                               "not reproduced; the first pass is")
    reader.sampler(sampler, g.nodes[sampler][1])
    values = {k: v for k, v in reader.values.items() if v not in (None, "")}
    return ForeignSettings("ComfyUI", reader.prompt, reader.negative, values, list(reader.loras.values()),
                           list(dict.fromkeys(reader.warnings)))
