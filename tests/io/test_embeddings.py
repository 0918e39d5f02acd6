"""Textual-inversion embedding files: every layout users hold (A1111 ``.pt``, kohya/civitai ``emb_params``
safetensors, diffusers ``learned_embeds``), written here in their exact layouts; refusals name the file and the key;
the library finds embeddings by stem, refuses ambiguous names and other widths; nijimi's own file round-trips."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from nijimi.errors import CheckpointError, ConfigError
from nijimi.io.embeddings import EmbeddingLibrary, read_embedding, save_embedding

VECTORS = torch.randn(3, 768, generator=torch.Generator().manual_seed(0))


def a1111_pt(path, vectors=VECTORS):
    """What A1111's ``Embedding.save`` writes (its training keeps ``vec`` requiring grad)."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone().requires_grad_(True)},
                "name": "someone", "step": 1500, "sd_checkpoint": "a9263745", "sd_checkpoint_name": "v1-5"}, path)
    return path


@pytest.mark.parametrize("layout", ["a1111.pt", "kohya.safetensors", "kohya.pt", "diffusers.bin",
                                    "diffusers.safetensors", "diffusers-1d.bin", "half.safetensors"])
def test_every_layout_reads_to_the_same_vectors(tmp_path, layout):
    path = tmp_path / layout
    vectors = VECTORS[:1] if "1d" in layout else VECTORS
    if layout == "a1111.pt":
        a1111_pt(path)
    elif layout.startswith("kohya"):
        (save_file if path.suffix == ".safetensors" else torch.save)({"emb_params": VECTORS}, path)
    elif layout == "half.safetensors":
        save_file({"emb_params": VECTORS.half()}, path)
        vectors = VECTORS.half().float()
    else:
        token = {"<cat-toy>": VECTORS[0] if "1d" in layout else VECTORS}
        (save_file if path.suffix == ".safetensors" else torch.save)(token, path)
    got = read_embedding(path)
    assert got.dtype == torch.float32 and not got.requires_grad and torch.equal(got, vectors)


def test_sd2_width_and_one_vector(tmp_path):
    save_file({"emb_params": torch.ones(1, 1024)}, tmp_path / "wide.safetensors")
    assert read_embedding(tmp_path / "wide.safetensors").shape == (1, 1024)


@pytest.mark.parametrize(("content", "message"), [
    ({"clip_l": torch.ones(2, 768), "clip_g": torch.ones(2, 1280)},
     "an SDXL embedding \\(keys clip_l and clip_g\\); nijimi runs SD 1.x and 2.x"),
    ({"a": torch.ones(1, 768), "b": torch.ones(1, 768)}, "keys \\['a', 'b'\\] are no embedding layout"),
    ({"emb_params": torch.ones(2, 3, 768)}, "key 'emb_params' has shape \\(2, 3, 768\\); an embedding is"),
    ({"emb_params": torch.ones(76, 768)}, "with 1 to 75 vectors"),
    ({"emb_params": torch.ones(2, 768, dtype=torch.int32)}, "key 'emb_params' holds a torch.int32 tensor"),
])
def test_other_safetensors_contents_are_refused_naming_file_and_key(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    save_file(content, path)
    with pytest.raises(CheckpointError, match=f"^{path}: .*{message}"):
        read_embedding(path)


@pytest.mark.parametrize(("content", "message"), [
    ({"string_to_param": {"*": torch.ones(1, 768), "+": torch.ones(1, 768)}},
     "key 'string_to_param' must map one token to its vectors, got \\['\\*', '\\+'\\]"),
    ({"string_to_param": {"*": "text"}}, "key 'string_to_param.\\*' holds a str"),
    ([torch.ones(1, 768)], "holds a list, not an embedding"),
])
def test_other_pt_contents_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=f"^{path}: {message}"):
        read_embedding(path)


def test_a_pickled_module_is_refused_not_unpickled(tmp_path):
    """The first textual-inversion files held a ``ParameterDict`` module: unpickling it would need its class."""
    path = tmp_path / "old.pt"
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.ones(1, 768))})}, path)
    with pytest.raises(CheckpointError, match=f"^{path}: refusing to unpickle.*ParameterDict"):
        read_embedding(path)


def test_save_embedding_writes_what_a1111_and_kohya_read(tmp_path):
    path = tmp_path / "mine.safetensors"
    save_embedding(VECTORS, path)
    assert list(load_file(path)) == ["emb_params"] and torch.equal(load_file(path)["emb_params"], VECTORS)
    assert torch.equal(read_embedding(path), VECTORS)
    save_embedding(VECTORS, path, half=True)
    assert load_file(path)["emb_params"].dtype == torch.float16


def test_library_finds_files_by_stem_recursively_and_given_files_win(tmp_path):
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    save_embedding(VECTORS, folder / "sub" / "Style.safetensors")
    a1111_pt(folder / "other.pt")
    (folder / "other.preview.png").write_bytes(b"png")
    (folder / "empty.pt").write_bytes(b"")  # A1111 skips empty files too
    mine = tmp_path / "other.safetensors"
    save_embedding(VECTORS[:1], mine)
    library = EmbeddingLibrary(folder, [mine], width=768)
    assert sorted(library.files) == ["Style", "other"]
    assert library.path("Style") == folder / "sub" / "Style.safetensors" and library.path("other") == mine
    assert library.load("other").shape == (1, 768)


def test_library_refuses_other_widths_ambiguous_names_and_missing_paths(tmp_path):
    save_file({"emb_params": torch.ones(2, 1024)}, tmp_path / "wide.safetensors")
    a1111_pt(tmp_path / "twice.pt")
    save_embedding(VECTORS, tmp_path / "twice.safetensors")
    library = EmbeddingLibrary(tmp_path, width=768)
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'wide.safetensors'}: embedding 'wide' is 1024 wide "
                                              "\\(SD 2.x\\); this model's text encoder is 768 wide \\(SD 1.x\\)$"):
        library.load("wide")
    with pytest.raises(ConfigError, match="embedding name 'twice' is ambiguous: .*twice.pt.*twice.safetensors"):
        library.load("twice")
    with pytest.raises(ConfigError, match="embeddings folder .*nowhere does not exist"):
        EmbeddingLibrary(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="embedding file .*none.pt does not exist"):
        EmbeddingLibrary(files=[tmp_path / "none.pt"])
