"""A1111's ``<lora:…>`` prompt tags, finding a named LoRA in a folder, the CLI's FILE[:WEIGHT] form."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nijimi.adapters.tags import LoraTag, parse_lora_option, parse_lora_tags, resolve_lora
from nijimi.errors import ConfigError, PromptError


@pytest.mark.parametrize(("prompt", "rest", "tags"), [
    ("a cat <lora:ink:0.8>", "a cat ", [LoraTag("ink", 0.8, 0.8)]),
    ("<lora:ink>, a cat", ", a cat", [LoraTag("ink", 1.0, 1.0)]),
    ("<lora:ink:0.5:1.2> x <lyco:paper:-1>", " x ", [LoraTag("ink", 0.5, 1.2), LoraTag("paper", -1.0, -1.0)]),
    ("<lora:ink:te=0.3:unet=0.9>", "", [LoraTag("ink", 0.3, 0.9)]),
    ("<lora:ink:0.5:unet=2>", "", [LoraTag("ink", 0.5, 2.0)]),
    ("<lora:styles/ink v2:1>", "", [LoraTag("styles/ink v2", 1.0, 1.0)]),
    ("a <hypernet:x:1> cat", "a <hypernet:x:1> cat", []),
    ("no tags (at:1.2)", "no tags (at:1.2)", []),
])
def test_parse_lora_tags(prompt: str, rest: str, tags: list[LoraTag]) -> None:
    assert parse_lora_tags(prompt) == (rest, tags)


@pytest.mark.parametrize(("prompt", "message"), [
    ("<lora:ink:strong>", r"<lora:ink:strong>: 'strong' is not a number"),
    ("<lora::1>", "name is missing"),
    ("<lora:ink:1:1:8>", r"only <lora:name\[:te\[:unet\]\]>"),
    ("<lora:ink:dyn=8>", r"only <lora:name"),
])
def test_bad_tags_name_the_tag(prompt: str, message: str) -> None:
    with pytest.raises(PromptError, match=message):
        parse_lora_tags(prompt)


def make(folder: Path, relative: str, alias: str | None = None) -> Path:
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, path, {"ss_output_name": alias} if alias else None)
    return path


def test_resolve_lora(tmp_path: Path) -> None:
    ink = make(tmp_path, "ink.safetensors")
    nested = make(tmp_path, "styles/ink.safetensors")
    paper = make(tmp_path, "old/paper_v3.safetensors", alias="paper")
    pt = tmp_path / "clay.pt"
    pt.write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a lora")
    assert resolve_lora("styles/ink", tmp_path) == nested  # the relative path wins over the stem
    assert resolve_lora("paper_v3", tmp_path) == paper
    assert resolve_lora("paper", tmp_path) == paper  # kohya's ss_output_name, as A1111 accepts
    assert resolve_lora("clay", tmp_path) == pt
    assert resolve_lora("ink", tmp_path) == ink  # "ink" is the top-level file's relative path
    ink.unlink()
    assert resolve_lora("ink", tmp_path) == nested  # then the only file whose stem is "ink"
    make(tmp_path, "other/ink.safetensors")
    with pytest.raises(ConfigError, match="'ink' is ambiguous"):
        resolve_lora("ink", tmp_path)
    with pytest.raises(ConfigError, match=r"no LoRA named 'notes'.*available: \['clay', 'ink', 'paper_v3'\]"):
        resolve_lora("notes", tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_lora("ink", tmp_path / "missing")


@pytest.mark.parametrize(("text", "want"), [
    ("ink.safetensors", (Path("ink.safetensors"), 1.0, 1.0)),
    ("ink.safetensors:0.7", (Path("ink.safetensors"), 0.7, 0.7)),
    ("dir/ink.safetensors:0.7:1.1", (Path("dir/ink.safetensors"), 0.7, 1.1)),
    ("odd:name.safetensors:2", (Path("odd:name.safetensors"), 2.0, 2.0)),
])
def test_parse_lora_option(text: str, want: tuple) -> None:
    assert parse_lora_option(text) == want
