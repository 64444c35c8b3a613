"""CLIP's byte-level BPE tokenizer against transformers' CLIPTokenizer, and its own rules.

References: ``tests/fixtures/clip_bpe/reference_ids.json`` (made by ``fixtures/make_tiny_sd.py``
with transformers) on two vocabularies: transformers' own 23-symbol test vocabulary
(``<unk>`` for every other symbol) and a 1196-symbol byte-level BPE trained in the fixture
script in CLIP's layout. "live" recomputes them with the installed transformers.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from diffusion_np.models.clip_tokenizer import CLIPTokenizer, _normalize, _pretokenizer, bytes_to_unicode

FIXTURES = Path(__file__).parents[1] / "fixtures"
BPE = FIXTURES / "clip_bpe"
SOURCES = ["golden", pytest.param("live", marks=pytest.mark.crosscheck)]


def _references(source: str) -> dict:
    if source == "golden":
        return json.loads((BPE / "reference_ids.json").read_text(encoding="utf-8"))
    from fixtures.make_tiny_sd import tokenizer_references

    return tokenizer_references()


@pytest.fixture(scope="module")
def trained() -> CLIPTokenizer:
    return CLIPTokenizer.from_files(BPE / "trained" / "vocab.json", BPE / "trained" / "merges.txt")


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("vocab", ["tiny", "trained"])
def test_ids_match_transformers(source, vocab):
    ref = _references(source)[vocab]
    tok = CLIPTokenizer.from_files(BPE / vocab / "vocab.json", BPE / vocab / "merges.txt", unk_token=ref["unk_token"])
    ids, lengths = tok.encode(ref["prompts"])
    expected = np.array(ref["ids"])
    for prompt, ours, theirs in zip(ref["prompts"], ids, expected):
        assert ours.tolist() == theirs.tolist(), f"prompt {prompt!r}"
    # the length counts start and end tokens: the first end token, or the full row when truncated
    assert (ids[np.arange(len(ids)), lengths - 1] == tok.eos_id).all()


@pytest.mark.crosscheck
def test_tokenizer_json_of_transformers_5_loads(tmp_path):
    """transformers 5 saves tokenizer.json instead of vocab.json + merges.txt: both spellings load alike."""
    from fixtures.make_tiny_sd import PROMPTS, hf_tokenizer

    hf_tokenizer(BPE / "trained").save_pretrained(str(tmp_path))
    assert not (tmp_path / "vocab.json").exists()
    ours = CLIPTokenizer.from_pretrained(tmp_path)
    reference = CLIPTokenizer.from_pretrained(BPE / "trained")
    assert (ours.encode(PROMPTS).ids == reference.encode(PROMPTS).ids).all()


# ----------------------------------------------------------------------------- the pieces
def test_bytes_to_unicode_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    chars = list(table.values())
    assert len(set(chars)) == 256
    assert all(c.isprintable() and not c.isspace() for c in chars)
    assert table[ord("a")] == "a" and table[ord(" ")] == "\u0120"  # GPT-2's famous "Ġ"


def test_layout_special_ids_come_from_the_vocab(trained):
    vocab = json.loads((BPE / "trained" / "vocab.json").read_text(encoding="utf-8"))
    assert trained.bos_id == vocab["<|startoftext|>"] == len(vocab) - 2  # CLIP: 49406 of 49408
    assert trained.eos_id == vocab["<|endoftext|>"] == len(vocab) - 1  # CLIP: 49407
    ids, lengths = trained.encode("")
    assert ids.shape == (1, 77) and lengths.tolist() == [2]
    assert ids[0, :2].tolist() == [trained.bos_id, trained.eos_id]
    assert (ids[0, 2:] == trained.eos_id).all()  # SD 1.x pads with <|endoftext|>


def test_pad_token_is_read_from_the_folder(tmp_path, trained):
    """SD 1.x's special_tokens_map.json says <|endoftext|>, SD 2.x's says "!" (id 0)."""
    sd1 = CLIPTokenizer.from_pretrained(FIXTURES / "tiny_sd" / "tokenizer")
    assert sd1.pad_id == sd1.eos_id and sd1.max_length == 77
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((BPE / "trained" / name).read_bytes())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!"}}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
    sd2 = CLIPTokenizer.from_pretrained(tmp_path)
    ids = sd2.encode("a cat").ids[0]
    assert sd2.pad_id == 0 and ids.shape == (16,) and ids[-1] == 0


def test_truncation_keeps_the_end_token(trained):
    text = " ".join(["cat"] * 100)
    ids, lengths = trained.encode(text)
    assert lengths.tolist() == [77] and ids[0, 0] == trained.bos_id and ids[0, -1] == trained.eos_id
    assert trained.encode_tokens(text)[:75] == ids[0, 1:-1].tolist()
    with pytest.raises(ValueError, match="100 tokens but max_length=77 fits 75"):
        trained.encode(text, truncate=False)


def test_end_of_word_and_merges(trained):
    """Words end in </w>; BPE merges learned pairs and falls back to bytes for the rest."""
    assert trained.tokenize("the") == ["the</w>"]
    tokens = trained.tokenize("zqxj")  # never seen: stays (nearly) byte by byte
    assert "".join(tokens) == "zqxj</w>" and len(tokens) >= 2
    assert trained.tokenize("the the") == ["the</w>", "the</w>"]  # white space separates, then is dropped


def test_unicode_classes_are_exact_not_approximated():
    """\\p{N} numbers such as ² ½ Ⅻ are their own pieces; Python's [^\\W\\d_] would glue them to letters."""
    pieces = _pretokenizer().findall("x² ½cup ⅻ 12")
    assert pieces == ["x", "²", "½", "cup", "ⅻ", "1", "2"]
    assert re.findall(r"[^\W\d_]+", "x²") == ["x²"]  # the approximation this module avoids
    # a combining accent (Mn) is not a letter: with NFC it joins its letter first
    assert _pretokenizer().findall(_normalize("e\u0301te\u0301")) == ["été"]
    assert _pretokenizer().findall("e\u0301") == ["e", "\u0301"]


def test_white_space_is_unicode_white_space():
    """No-break and em spaces are white space; U+001C is not (Python's \\s says it is)."""
    assert _normalize("a\u00a0b\u2003\t c") == "a b c"
    assert _pretokenizer().findall("a\u001cb") == ["a", "\u001c", "b"]


def test_lowercase_is_per_character():
    assert _normalize("ΟΔΟΣ") == "οδοσ"  # no final sigma, as the Rust tokenizers library
    assert _normalize("ΟΔΟΣ") != "ΟΔΟΣ".lower()


def test_non_ascii_round_trips(trained):
    for text in ("café crème", "東京の夜景", "Emoji 🐱🚀"):
        ids = trained.encode(text).ids[0]
        assert trained.decode(ids) == _normalize(text)
    # every piece ends a "word" (</w>), so decoding puts a space after each: CLIP's decode is lossy
    assert trained.decode(trained.encode("it's 12:30!").ids[0]) == "it 's 1 2 : 3 0 !"


def test_literal_special_token_in_a_prompt(trained):
    assert trained.encode_tokens("a <|endoftext|> b")[1] == trained.eos_id


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs(tmp_path, trained):
    with pytest.raises(TypeError, match="expects a str"):
        trained.encode_tokens(3)
    with pytest.raises(TypeError, match="non-empty list"):
        trained.encode([])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        CLIPTokenizer({"a": 0}, [])
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        CLIPTokenizer.from_files(BPE / "trained" / "vocab.json", BPE / "trained" / "merges.txt", max_length=1)
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match="line 2 is not 'a b'"):
        CLIPTokenizer.from_files(BPE / "trained" / "vocab.json", tmp_path / "merges.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CLIPTokenizer.from_files(tmp_path / "nope.json", tmp_path / "merges.txt")
    with pytest.raises(ValueError, match="id 999999 is not in the vocabulary"):
        trained.decode([999999])
