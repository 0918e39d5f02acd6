"""Files found by A1111's hashes and by name: AutoV2 (10 hex of the SHA-256), the legacy 8-hex model hash (A1111
``modules/sd_models.py``: SHA-256 of the 0x10000 bytes at offset 0x100000), LoRA hashes (``sshs_model_hash`` or the
SHA-256 after the safetensors header, ``modules/hashes.py`` ``addnet_hash_safetensors``), each computed here from the
bytes; digests are cached."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from nijimi.errors import ConfigError
from nijimi.io import pngmeta
from nijimi.io.find import addnet_hash, find_file, hash_matches, legacy_model_hash, lora_hash


@pytest.fixture
def models(tmp_path):
    folder = tmp_path / "models"
    (folder / "sd15").mkdir(parents=True)
    big = bytes(range(256)) * (0x120000 // 256)  # past the legacy hash's window at 1 MiB
    (folder / "sd15" / "anything-v5.safetensors").write_bytes(big)
    (folder / "other.ckpt").write_bytes(b"other model")
    (folder / "notes.txt").write_bytes(b"not a model")
    return folder


def test_model_hashes_as_a1111_computes_them(models):
    path = models / "sd15" / "anything-v5.safetensors"
    data = path.read_bytes()
    assert legacy_model_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert pngmeta.model_hash(path) == hashlib.sha256(data).hexdigest()[:10]
    assert pngmeta.file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert hash_matches(path, "model", legacy_model_hash(path).upper())
    assert not hash_matches(path, "model", "1234567")  # too short to name a file


def test_find_by_hash_name_or_both(models):
    path = models / "sd15" / "anything-v5.safetensors"
    full = hashlib.sha256(path.read_bytes()).hexdigest()
    assert find_file(models, "model", short_hash=full[:10]) == (path, True)
    assert find_file(models, "model", short_hash=legacy_model_hash(path)) == (path, True)
    for name in ("anything-v5", "sd15/anything-v5", "sd15_anything-v5", "sd15/anything-v5.safetensors"):
        assert find_file(models, "model", name=name) == (path, True), name
    assert find_file(models, "model", name="other", short_hash=full[:10]) == (path, True)  # the hash wins
    assert find_file(models, "model", name="other", short_hash="deadbeef00") == (models / "other.ckpt", False)
    assert find_file(models, "model", name="notes") is None and find_file(models, "model", short_hash="00" * 5) is None
    with pytest.raises(ConfigError, match="model folder .*missing does not exist"):
        find_file(models / "missing", "model", name="x")


def test_lora_hash_is_kohyas_unless_the_file_records_one(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.arange(6.0)}, plain)
    data = plain.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert lora_hash(plain) == addnet_hash(plain) == hashlib.sha256(data[8 + header:]).hexdigest()
    recorded = tmp_path / "recorded.safetensors"
    save_file({"w": torch.arange(6.0)}, recorded, metadata={"sshs_model_hash": "ab" * 32})
    assert lora_hash(recorded) == "ab" * 32
    pt = tmp_path / "old.pt"
    pt.write_bytes(b"pickle-free bytes")
    assert lora_hash(pt) == hashlib.sha256(b"pickle-free bytes").hexdigest()
    assert find_file(tmp_path, "lora", name="whatever", short_hash=("ab" * 32)[:12]) == (recorded, True)
    embedding = hashlib.sha256(pt.read_bytes()).hexdigest()[:12]  # TI hashes: 12 digits of the file's SHA-256
    assert find_file(tmp_path, "embedding", name="easynegative", short_hash=embedding) == (pt, True)


def test_digests_are_cached_until_the_file_changes(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(3)}, path)
    addnet_hash(path)
    cache = json.loads((pngmeta.cache_dir() / "addnet_hashes.json").read_text())
    cache[str(path.absolute())][2] = "f" * 64  # a cached value is returned without reading the file
    (pngmeta.cache_dir() / "addnet_hashes.json").write_text(json.dumps(cache))
    assert addnet_hash(path) == "f" * 64
    save_file({"w": torch.ones(4)}, path)
    assert addnet_hash(path) != "f" * 64
