"""ClipTokenizer against transformers' CLIPTokenizer built from the same merge list, id for id."""

import gzip
import hashlib
import importlib.resources
import json
import random
import unicodedata

import pytest
import torch

from nijimi.errors import ConfigError, PromptError
from nijimi.text.tokenizer import VOCAB_FILE, ClipTokenizer

transformers = pytest.importorskip("transformers")

SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def _reference_byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table, written out independently of nijimi."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    symbols = dict(zip(keep, keep, strict=True))
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = 256 + extra
            extra += 1
    return [chr(symbols[b]) for b in keep] + [chr(symbols[b]) for b in range(256) if b not in keep]


def _write_hf_files(folder) -> None:
    """vocab.json + merges.txt from the shipped merge list, as /work/shared/data/README.md describes."""
    with importlib.resources.files("nijimi").joinpath("data", VOCAB_FILE).open("rb") as raw:
        lines = gzip.decompress(raw.read()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = _reference_byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    _write_hf_files(folder)
    return folder


@pytest.fixture(scope="module")
def reference(hf_folder):
    return transformers.CLIPTokenizer.from_pretrained(hf_folder)


@pytest.fixture(scope="module")
def ours():
    return ClipTokenizer()


WORDS = (
    "a photo of an astronaut riding horse on mars highly detailed portrait woman man cat dog castle forest sunset "
    "cyberpunk city neon lights oil painting by greg rutkowski trending artstation 8k octane render masterpiece best "
    "quality ultra sharp focus bokeh cinematic lighting volumetric fog watercolor sketch anime girl blue eyes red hair "
    "steampunk robot underwater temple mountain lake reflection golden hour studio ghibli unreal engine hdr"
).split()
PUNCT = list(",.!?;:-_()[]{}\"'/\\|@#$%^&*+=<>~`") + ["...", "--", "!!", "(((", ")):", "::", "<3", "=>"]
NUMBERS = ["4k", "8K", "1920x1080", "2.5", "0", "42", "1,000", "3.14159", "v1.5", "1990s", "24mm", "f/1.8", "100%"]
UNICODE = [
    "café", "naïve", "Ångström", "façade", "Zürich", "São Paulo", "élan", "ñandú", "e\u0301cole", "Å", "straße",
    "İstanbul", "ﬁsh", "ＡＢＣ", "Ⅻ", "x²", "½", "ΟΔΟΣ", "Σίσυφος", "Москва", "猫", "東京タワー", "한국어", "ひらがな",
    "カタカナ", "中文提示词", "مرحبا بالعالم", "שלום עולם", "हिन्दी", "ภาษาไทย", "٣", "ǅ", "\u200b", "\u200d",
    "—", "“quoted”", "‘single’", "…", "€", "©", "™", "°", "±", "→",
]
EMOJI = ["😀", "🎨", "👍🏽", "👨\u200d👩\u200d👧", "🏳️\u200d🌈", "❤️", "🔥🔥", "🐱", "🇯🇵", "✨"]
SPACES = [" ", "  ", "\t", "\n", "\r\n", " \t \n ", "\u3000", "\xa0", "\x85", "\u2009", "\x1c", "\x1f", ""]
APOSTROPHES = [
    "it's", "don't", "they're", "we've", "I'm", "you'll", "he'd", "IT'S", "rock'n'roll", "it’s", "''s", "'S", "o'clock"
]
ENTITIES = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&#x27;", "&nbsp;", "&amp;amp;", "&copy;"]
SPECIALS = ["<|endoftext|>", "<|startoftext|>", "<|EndOfText|>", "<|startoftext|>!", "<|endoftext"]
POOLS = [WORDS] * 6 + [PUNCT, NUMBERS, UNICODE, UNICODE, EMOJI, APOSTROPHES, ENTITIES, SPECIALS]


def _random_case(rng: random.Random, word: str) -> str:
    return rng.choice([word, word.upper(), word.capitalize(), word.title()])


def _prompt(rng: random.Random) -> str:
    """One prompt: 0..90 pieces from the pools, joined by random separators (long ones exceed 77 tokens)."""
    n = rng.choice([0, 1, 2, 3, 5, 8, 12, 20, 40, 90])
    parts = []
    for _ in range(n):
        parts.append(_random_case(rng, rng.choice(rng.choice(POOLS))))
        parts.append(rng.choice(SPACES) if rng.random() < 0.3 else rng.choice([" ", ", ", ""]))
    return "".join(parts)


def _prompts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    fixed = ["", " ", "\t\n", "a photo of a cat", "A PHOTO OF A CAT", "<|endoftext|>", "&amp;", "ΟΔΟΣ ΟΔΟΣ"]
    return fixed + [_prompt(rng) for _ in range(count)]


def _random_codepoint_texts(count: int, seed: int = 1) -> list[str]:
    """Strings of random assigned code points. Combining marks (canonical class ≠ 0) are left out: the reference
    normalises with Unicode tables old enough to skip canonical reordering for marks of newer scripts."""
    rng = random.Random(seed)
    pool = [
        cp for cp in range(0x30000)
        if unicodedata.category(chr(cp)) not in ("Cn", "Cs", "Co") and unicodedata.combining(chr(cp)) == 0
    ]
    return ["".join(chr(rng.choice(pool)) for _ in range(rng.randint(1, 30))) for _ in range(count)]


def test_shipped_vocab_file_sha256():
    data = importlib.resources.files("nijimi").joinpath("data", VOCAB_FILE).read_bytes()
    assert hashlib.sha256(data).hexdigest() == SHA256


def test_vocabulary_matches_reference(ours, reference):
    ref_vocab = reference.get_vocab()
    assert ours.vocab_size == len(ref_vocab) == 49408
    assert (ours.bos_token_id, ours.eos_token_id) == (49406, 49407)
    assert all(ours._vocab.encoder[t] == i for t, i in ref_vocab.items())


def test_known_ids(ours):
    assert ours.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert ours("a photo of a cat")[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]


def test_encode_matches_reference_on_prompts(ours, reference):
    prompts = _prompts(1200)
    assert sum(len(reference(p, add_special_tokens=False).input_ids) > 75 for p in prompts) > 100
    mismatches = [p for p in prompts if ours.encode(p) != reference(p, add_special_tokens=False).input_ids]
    assert mismatches == []


def test_encode_matches_reference_on_random_codepoints(ours, reference):
    texts = _random_codepoint_texts(600)
    mismatches = [t for t in texts if ours.encode(t) != reference(t, add_special_tokens=False).input_ids]
    assert mismatches == []


def test_sd1_windows_match_reference(reference):
    prompts = _prompts(150, seed=2)
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    got = ClipTokenizer()(prompts)
    assert got.dtype == torch.long and got.shape == (len(prompts), 77)
    assert torch.equal(got, expected)
    assert got[0].tolist() == [49406, 49407] + [49407] * 75


def test_sd2_windows_pad_with_zero_after_eos(reference):
    """SD 2.x (OpenCLIP) windows: the same ids, then 0 after <|endoftext|> instead of more 49407s."""
    prompts = _prompts(150, seed=2)
    unpadded = reference(prompts, max_length=77, truncation=True).input_ids
    expected = torch.tensor([ids + [0] * (77 - len(ids)) for ids in unpadded])
    got = ClipTokenizer(pad_token_id=0)(prompts)
    assert ClipTokenizer(pad_token_id=0).pad_token_id == 0
    assert torch.equal(got, expected)
    assert got[0].tolist() == [49406, 49407] + [0] * 75


def test_sd2_exclamation_mark_is_an_ordinary_token(hf_folder):
    """transformers' SD 2 tokenizer (pad_token "!") splits every "!" out as its special pad token (id 0); OpenCLIP,
    which SD 2 was trained with, does not. We follow OpenCLIP."""
    sd2_reference = transformers.CLIPTokenizer.from_pretrained(hf_folder, pad_token="!")
    assert sd2_reference("wow!!", add_special_tokens=False).input_ids == [2781, 0, 0]
    assert ClipTokenizer(pad_token_id=0).encode("wow!!") == [2781, 748]
    assert ClipTokenizer(pad_token_id=0).decode([2781, 748]) == "wow !!"


def test_single_string_and_truncation(ours):
    long_prompt = "red " * 100
    window = ours(long_prompt)
    assert window.shape == (1, 77)
    assert window[0].tolist() == [49406] + [736] * 75 + [49407]
    assert len(ours.encode(long_prompt)) == 100
    with pytest.raises(PromptError, match="100 tokens"):
        ours(long_prompt, truncation=False)
    assert torch.equal(ours("red", truncation=False), ours("red"))


def test_decode_matches_reference(ours, reference):
    for prompt in _prompts(300, seed=3):
        ids = ours(prompt)[0].tolist()
        assert ours.decode(ids) == reference.decode(ids)
    rng = random.Random(4)
    for _ in range(300):
        ids = [rng.randrange(49408) for _ in range(rng.randint(0, 20))]
        assert ours.decode(ids) == reference.decode(ids)
    assert ours.decode(torch.tensor([[320, 1125]])) == "a photo"


def test_errors_name_the_value(ours):
    with pytest.raises(PromptError, match="got int"):
        ours.encode(3)
    with pytest.raises(PromptError, match=r"\[49408\]"):
        ours.decode([320, 49408])
    with pytest.raises(ConfigError, match="pad_token_id 50000"):
        ClipTokenizer(pad_token_id=50000)
    with pytest.raises(ConfigError, match="max_length 1"):
        ClipTokenizer(max_length=1)


def test_short_windows():
    tokenizer = ClipTokenizer(max_length=5)
    assert tokenizer("a photo of a cat").tolist() == [[49406, 320, 1125, 539, 49407]]
