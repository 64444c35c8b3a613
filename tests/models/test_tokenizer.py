import json

import numpy as np
import pytest

from diffusion_np.models.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, WordTokenizer

CAPTIONS = ["a small red circle in the top left", "A large blue square, bottom-right.", "a red square"]


@pytest.fixture
def tok():
    return WordTokenizer.from_captions(CAPTIONS, max_length=8)


def test_special_ids_are_fixed_and_documented(tok):
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.id_to_token[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]


def test_vocabulary_is_sorted_words_of_the_captions(tok):
    words = ["a", "blue", "bottom", "circle", "in", "large", "left", "red", "right", "small", "square", "the",
             "top"]
    assert tok.id_to_token[4:] == words
    assert tok.vocab_size == len(tok) == 4 + len(words)


def test_vocabulary_does_not_depend_on_caption_order():
    a = WordTokenizer.from_captions(CAPTIONS)
    b = WordTokenizer.from_captions(CAPTIONS[::-1])
    assert a.id_to_token == b.id_to_token
    np.testing.assert_array_equal(a.encode(CAPTIONS).ids, b.encode(CAPTIONS).ids)


def test_layout_is_bos_words_eos_then_padding(tok):
    ids, lengths = tok.encode("a red square")
    t = tok.token_to_id
    assert ids.dtype == np.int64 and ids.shape == (1, 8)
    np.testing.assert_array_equal(ids[0], [BOS_ID, t["a"], t["red"], t["square"], EOS_ID, 0, 0, 0])
    np.testing.assert_array_equal(lengths, [5])


def test_batch_and_attention_mask(tok):
    enc = tok.encode(["a red square", "", "blue"])
    assert enc.ids.shape == (3, 8)
    np.testing.assert_array_equal(enc.lengths, [5, 2, 3])
    np.testing.assert_array_equal(enc.attention_mask, enc.ids != PAD_ID)
    np.testing.assert_array_equal(enc.attention_mask.sum(axis=1), enc.lengths)


def test_empty_caption_is_bos_eos_and_padding(tok):
    ids, lengths = tok.encode("")
    np.testing.assert_array_equal(ids[0], [BOS_ID, EOS_ID] + [PAD_ID] * 6)
    assert lengths[0] == 2
    # only punctuation is empty too
    np.testing.assert_array_equal(tok.encode(" ,.!? ").ids, ids)
    assert tok.decode(ids[0]) == ""


def test_round_trip_and_punctuation(tok):
    assert tok.decode(tok.encode("A large blue square, bottom-right.").ids[0]) == "a large blue square bottom right"
    texts = ["a small red circle", "the top left", "in"]
    assert tok.decode(tok.encode(texts).ids) == texts
    assert tok.split("Top-left, RED circle! don't") == ["top", "left", "red", "circle", "don", "t"]
    assert tok.split("under_score  x2") == ["under", "score", "x2"]


def test_unknown_words_become_unk(tok):
    ids, _ = tok.encode("a purple hexagon")
    np.testing.assert_array_equal(ids[0, :5], [BOS_ID, tok.token_to_id["a"], UNK_ID, UNK_ID, EOS_ID])
    assert tok.decode(ids[0]) == "a <unk> <unk>"


def test_decode_keeps_special_tokens_when_asked(tok):
    ids, _ = tok.encode("red")
    assert tok.decode(ids[0], skip_special_tokens=False) == "<bos> red <eos> " + " ".join(["<pad>"] * 5)


def test_truncation_keeps_eos(tok):
    long = "a small red circle in the top left a small red circle"
    ids, lengths = tok.encode(long)
    assert lengths[0] == 8 and ids[0, -1] == EOS_ID
    assert tok.decode(ids[0]) == "a small red circle in the"
    # exactly max_length - 2 words fit without truncation
    ids6, _ = tok.encode("a small red circle in the")
    np.testing.assert_array_equal(ids6, ids)
    tok.encode("a small red circle in the", truncate=False)


def test_too_long_without_truncation_raises(tok):
    with pytest.raises(ValueError, match=r"caption 1 has 7 words but max_length=8 fits 6 .*truncate=True"):
        tok.encode(["red", "a small red circle in the top"], truncate=False)


def test_case_is_kept_when_lowercase_is_false():
    tok = WordTokenizer(["Red", "red"], lowercase=False)
    ids, _ = tok.encode("Red red RED")
    np.testing.assert_array_equal(ids[0, :5], [BOS_ID, 4, 5, UNK_ID, EOS_ID])


def test_save_load_round_trip_through_json(tok):
    data = json.loads(json.dumps(tok.to_dict()))
    again = WordTokenizer.from_dict(data)
    assert again.id_to_token == tok.id_to_token
    assert (again.max_length, again.lowercase) == (tok.max_length, tok.lowercase)
    np.testing.assert_array_equal(again.encode(CAPTIONS).ids, tok.encode(CAPTIONS).ids)


def test_no_vocab_maps_every_word_to_unk():
    tok = WordTokenizer(max_length=4)
    assert tok.vocab_size == 4
    np.testing.assert_array_equal(tok.encode("hello world").ids[0], [BOS_ID, UNK_ID, UNK_ID, EOS_ID])


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"max_length": 1}, ValueError, "max_length must be an int >= 2"),
        ({"max_length": 7.5}, ValueError, "max_length must be an int >= 2"),
        ({"vocab": "red"}, TypeError, "vocab must be a list of strings"),
        ({"vocab": ["red", 3]}, TypeError, "vocab must be a list of strings"),
        ({"vocab": ["red", "red"]}, ValueError, "'red' appears twice"),
        ({"vocab": ["top-left"]}, ValueError, "'top-left' is not a single lower-case word"),
        ({"vocab": ["Red"]}, ValueError, "'Red' is not a single lower-case word"),
        ({"vocab": ["<pad>"]}, ValueError, "'<pad>' is not a single"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        WordTokenizer(**kwargs)


@pytest.mark.parametrize(
    "texts,error,match",
    [
        (None, TypeError, "expects a str or a list of str, got NoneType"),
        (b"red", TypeError, "expects a str or a list of str, got bytes"),
        ([], ValueError, "empty list of captions"),
        (["red", 3], TypeError, "caption 1 is int, not str"),
    ],
)
def test_encode_bad_input(tok, texts, error, match):
    with pytest.raises(error, match=match):
        tok.encode(texts)


@pytest.mark.parametrize(
    "ids,error,match",
    [
        (np.zeros((1, 2, 3), np.int64), ValueError, r"shape \(L,\) or \(B, L\), got \(1, 2, 3\)"),
        (np.zeros(3, np.float32), TypeError, "integer ids, got float32"),
        (np.array([2, 99, 3]), ValueError, r"id 99 is outside the vocabulary \[0, 17\)"),
        (np.array([2, -1, 3]), ValueError, "id -1 is outside"),
    ],
)
def test_decode_bad_input(tok, ids, error, match):
    with pytest.raises(error, match=match):
        tok.decode(ids)


def test_from_dict_rejects_other_dicts(tok):
    with pytest.raises(ValueError, match="made by WordTokenizer.to_dict"):
        WordTokenizer.from_dict({"vocab": []})
    data = tok.to_dict()
    del data["max_length"]
    with pytest.raises(ValueError, match=r"missing keys \['max_length'\]"):
        WordTokenizer.from_dict(data)
    data = tok.to_dict()
    data["special_tokens"] = ["<s>", "</s>"]
    with pytest.raises(ValueError, match="special tokens must be"):
        WordTokenizer.from_dict(data)
