"""``find_by_name_and_hash``: the file a recipe names, found by name and checked by hash, folder by folder."""

import pytest

from nijimi.errors import CheckpointError
from nijimi.io.find import find_by_name_and_hash
from nijimi.io.pngmeta import model_hash


def test_first_file_of_the_name_and_hash_wins(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "m.safetensors").write_bytes(b"old")
    (b / "m.ckpt").write_bytes(b"new")
    (b / "m.safetensors").write_bytes(b"new")
    digest = model_hash(b / "m.safetensors")
    assert find_by_name_and_hash("m", digest, [a, b]) == b / "m.safetensors"
    assert find_by_name_and_hash("m.ckpt", digest, [a, b]) == b / "m.ckpt"
    assert find_by_name_and_hash("m", None, [a, b]) == a / "m.safetensors"


def test_a_folder_model_is_found_only_without_a_hash(tmp_path):
    (tmp_path / "sd15").mkdir()
    assert find_by_name_and_hash("sd15", None, [tmp_path]) == tmp_path / "sd15"
    with pytest.raises(CheckpointError, match="model 'sd15' with hash 0123456789 not found"):
        find_by_name_and_hash("sd15", "0123456789", [tmp_path])


def test_missing_or_other_hash_names_what_was_searched_and_found(tmp_path):
    (tmp_path / "ink.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError) as info:
        find_by_name_and_hash("ink", "0123456789", [tmp_path, tmp_path / "none"], "LoRA")
    assert str(info.value) == (f"LoRA 'ink' with hash 0123456789 not found in {tmp_path}, {tmp_path / 'none'}; "
                               f"{tmp_path / 'ink.safetensors'} has hash {model_hash(tmp_path / 'ink.safetensors')}")


@pytest.mark.parametrize("name", ["", "../m", "sub/m"])
def test_a_name_with_a_folder_is_refused(tmp_path, name):
    with pytest.raises(CheckpointError, match="must be a plain file name"):
        find_by_name_and_hash(name, None, [tmp_path])
