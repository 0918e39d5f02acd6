"""Loading TAESD from the layouts users hold: the published ``taesd_decoder`` / ``taesd_encoder`` single files
(.safetensors and .pth), a folder of them, a diffusers AutoencoderTiny folder; each loaded model decodes and encodes as
diffusers does (≤ 1e-4). The files are synthetic, in the exact key layouts; the renames are exact both ways."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderTiny
from helpers import randomize, rel_err
from safetensors.torch import save_file

from nijimi.errors import CheckpointError
from nijimi.io.taesd import from_diffusers, load_taesd, to_diffusers

TOLERANCE = 1e-4

# madebyollin/taesd's ``Encoder()`` / ``Decoder()`` nn.Sequential positions, written out: c = conv with bias,
# n = conv without bias (stride-2 / after upsampling), b = Block (conv.0, conv.2, conv.4), - = no weights (the
# decoder's Clamp, ReLU and Upsample).
PUBLISHED = {
    "encoder": "c b n b b b n b b b n b b b c",
    "decoder": "- c - b b b - n b b b - n b b b - n b c",
}


def published_keys(part: str) -> list[str]:
    """The keys of ``taesd_{part}.safetensors`` in the order of its module's parameters."""
    names = {"c": ["weight", "bias"], "n": ["weight"], "-": [],
             "b": [f"conv.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")]}
    return [f"{i}.{name}" for i, kind in enumerate(PUBLISHED[part].split()) for name in names[kind]]


def published(theirs: AutoencoderTiny, part: str) -> dict[str, torch.Tensor]:
    """diffusers' half as the published file holds it: the same parameters in order under the published keys."""
    values = [v for k, v in theirs.state_dict().items() if k.startswith(part + ".")]
    keys = published_keys(part)
    assert len(keys) == len(values)
    return {k: v.contiguous() for k, v in zip(keys, values, strict=True)}


@pytest.fixture(scope="module")
def theirs() -> AutoencoderTiny:
    model = AutoencoderTiny().eval()
    randomize(model, 3)
    return model


@pytest.fixture(scope="module")
def sources(tmp_path_factory, theirs) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("taesd")
    theirs.save_pretrained(root / "diffusers")
    (root / "published").mkdir()
    for part in ("encoder", "decoder"):
        save_file(published(theirs, part), root / "published" / f"taesd_{part}.safetensors")
    torch.save(published(theirs, "decoder"), root / "taesd_decoder.pth")
    return {
        "diffusers folder": root / "diffusers",
        "diffusers weights": root / "diffusers" / "diffusion_pytorch_model.safetensors",
        "published folder": root / "published",
        "decoder file": root / "published" / "taesd_decoder.safetensors",
        "encoder file": root / "published" / "taesd_encoder.safetensors",
        "decoder pth": root / "taesd_decoder.pth",
    }


@pytest.mark.parametrize("source", ["diffusers folder", "diffusers weights", "published folder", "decoder file",
                                    "encoder file", "decoder pth"])
@torch.no_grad()
def test_every_layout_matches_diffusers(sources, theirs, source):
    model = load_taesd(sources[source])
    gen = torch.Generator().manual_seed(4)
    z, x = torch.randn(1, 4, 8, 8, generator=gen) * 3, torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    assert (model.encoder is None, model.decoder is None) == (source.startswith("decoder"), source == "encoder file")
    if model.decoder is not None:
        assert rel_err(model.decode_latents(z), theirs.decode(z).sample) < TOLERANCE
    if model.encoder is not None:
        assert rel_err(model.encode_latents(x), theirs.encode(x).latents) < TOLERANCE


def test_module_tree_is_the_published_layout(sources):
    model = load_taesd(sources["published folder"])
    for part in ("encoder", "decoder"):
        assert list(getattr(model, part).state_dict()) == published_keys(part)


def test_renames_round_trip(theirs):
    diffusers = theirs.state_dict()
    native = from_diffusers(diffusers)
    assert "decoder.1.weight" in native and "decoder.19.bias" in native and "encoder.14.bias" in native
    assert to_diffusers(native).keys() == diffusers.keys()
    assert all(native[k] is v for k, v in from_diffusers(to_diffusers(native)).items())


def test_errors(tmp_path, sources, theirs):
    with pytest.raises(CheckpointError, match="no such TAESD"):
        load_taesd(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="neither taesd_decoder"):
        load_taesd(tmp_path)
    save_file({"weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="other.safetensors: not a TAESD decoder"):
        load_taesd(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="encoder.layers.x: not a TAESD key"):
        from_diffusers({"encoder.layers.x": torch.zeros(1)})
    bad = published(theirs, "decoder") | {"3.conv.2.weight": torch.zeros(64, 64, 1, 1)}
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"bad.safetensors: the decoder weights do not fit.*3\.conv\.2\.weight"):
        load_taesd(tmp_path / "bad.safetensors")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "taesd_encoder.safetensors").symlink_to(sources["encoder file"])
    fewer_blocks = {k: v for k, v in published(theirs, "decoder").items() if not k.startswith("18.")}
    save_file(fewer_blocks, mixed / "taesd_decoder.safetensors")
    with pytest.raises(CheckpointError, match="different shapes"):
        load_taesd(mixed)
