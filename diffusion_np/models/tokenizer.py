"""A word-level tokenizer for captions: words in, a fixed-length row of integer ids out.

Stable Diffusion's CLIP tokenizer is a byte-level BPE over 49408 tokens. Our
captions come from small generators ("a small red circle in the top left"), so a
tokenizer with one id per word of the captions' vocabulary does the same job and
can be read in a minute. The *layout* of a row is CLIP's::

    <bos> word word ... word <eos> <pad> <pad> ... <pad>        (max_length ids)

Special tokens and their ids (fixed, the same in every vocabulary)::

    <pad> = 0    fills the row after <eos>
    <unk> = 1    any word not in the vocabulary
    <bos> = 2    start of text
    <eos> = 3    end of text; the text encoder's pooled output is taken here
    words = 4, 5, ...  in the order of ``vocab`` (``from_captions`` sorts them)

Splitting: the text is lower-cased (with ``lowercase=True``), then split into
runs of letters and digits; everything else (spaces, punctuation, underscores,
symbols) separates words and is dropped. So "Top-left, RED circle!" gives
``top left red circle`` and "don't" gives ``don t``. Letters are Unicode
letters (``str.isalnum``), not only ASCII.

The empty caption "" (classifier-free guidance's unconditional prompt) gives
``<bos> <eos> <pad> ...``.

Left out on purpose: subword units (BPE), so an unseen word becomes <unk> as a
whole; frequency cut-offs; and CLIP's habit of padding with <eos>.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# a word is a run of letters or digits: \w without the underscore
_WORD = re.compile(r"[^\W_]+")


class Encoding(NamedTuple):
    """What :meth:`WordTokenizer.encode` returns; unpacks as ``ids, lengths = ...``."""

    ids: np.ndarray  # (B, max_length) int64: <bos> words <eos> <pad>...
    lengths: np.ndarray  # (B,) int64: tokens before the padding, <bos> and <eos> included

    @property
    def attention_mask(self) -> np.ndarray:
        """(B, max_length) bool, True on the real tokens (<bos> .. <eos>), False on padding."""
        return np.arange(self.ids.shape[1])[None, :] < self.lengths[:, None]


class WordTokenizer:
    """One id per word of a fixed vocabulary, with CLIP's row layout (see the module docstring).

    Parameters
    ----------
    vocab : the words, in id order (ids 4, 5, ...); None for none (every word is <unk>).
        Each must be a single word as the splitter produces it (letters/digits only, and
        lower case when ``lowercase``), with no repeats.
    max_length : ids per row, <bos> and <eos> included (CLIP: 77); at least 2.
    lowercase : lower-case text before splitting.
    """

    def __init__(self, vocab: list[str] | None = None, max_length: int = 16, lowercase: bool = True):
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
            raise ValueError(f"WordTokenizer: max_length must be an int >= 2 (room for <bos> and <eos>), "
                             f"got {max_length!r}")
        vocab = [] if vocab is None else vocab
        if isinstance(vocab, str) or not all(isinstance(w, str) for w in vocab):
            raise TypeError("WordTokenizer: vocab must be a list of strings")
        seen = set()
        for word in vocab:
            if word in seen:
                raise ValueError(f"WordTokenizer: the word {word!r} appears twice in vocab")
            seen.add(word)
            if _WORD.fullmatch(word) is None or (lowercase and word != word.lower()):
                case = " lower-case" if lowercase else ""
                raise ValueError(
                    f"WordTokenizer: vocab entry {word!r} is not a single{case} word of letters and digits, "
                    "so no text would ever produce it"
                )
        self.max_length = int(max_length)
        self.lowercase = bool(lowercase)
        self.id_to_token: list[str] = [*SPECIAL_TOKENS, *vocab]
        self.token_to_id: dict[str, int] = {t: i for i, t in enumerate(self.id_to_token)}

    # ------------------------------------------------------------------ building
    @classmethod
    def from_captions(cls, captions: list[str], max_length: int = 16, lowercase: bool = True) -> WordTokenizer:
        """The vocabulary of every word in ``captions``, sorted (so the ids do not depend
        on the order of the captions)."""
        words = set()
        for text in _as_list(captions, "from_captions"):
            words.update(_split(text, lowercase))
        return cls(sorted(words), max_length=max_length, lowercase=lowercase)

    # ------------------------------------------------------------------ ids
    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the text encoder's ``vocab_size``)."""
        return len(self.id_to_token)

    def __len__(self) -> int:
        return self.vocab_size

    def split(self, text: str) -> list[str]:
        """The words of ``text`` (see the module docstring for the rule)."""
        if not isinstance(text, str):
            raise TypeError(f"WordTokenizer.split expects a str, got {type(text).__name__}")
        return _split(text, self.lowercase)

    def encode(self, texts: str | list[str], truncate: bool = True) -> Encoding:
        """Captions -> ``Encoding(ids (B, max_length) int64, lengths (B,) int64)``.

        A single string counts as a batch of one. Unknown words become <unk>. A caption
        with more than ``max_length - 2`` words keeps its first ``max_length - 2`` words
        and still ends in <eos> (``truncate=True``), or raises ValueError (``truncate=False``).
        """
        texts = _as_list(texts, "encode")
        n_words = self.max_length - 2  # <bos> and <eos> take two places
        ids = np.full((len(texts), self.max_length), PAD_ID, dtype=np.int64)
        lengths = np.empty(len(texts), dtype=np.int64)
        for b, text in enumerate(texts):  # a Python loop over captions: strings are not arrays
            words = _split(text, self.lowercase)
            if len(words) > n_words:
                if not truncate:
                    raise ValueError(
                        f"WordTokenizer.encode: caption {b} has {len(words)} words but max_length="
                        f"{self.max_length} fits {n_words} (<bos> and <eos> take two); pass truncate=True "
                        "or use a larger max_length"
                    )
                words = words[:n_words]
            row = [BOS_ID, *(self.token_to_id.get(w, UNK_ID) for w in words), EOS_ID]
            ids[b, : len(row)] = row
            lengths[b] = len(row)
        return Encoding(ids, lengths)

    def decode(self, ids, skip_special_tokens: bool = True) -> str | list[str]:
        """ids -> text. (max_length,) gives a str, (B, max_length) a list of str.

        With ``skip_special_tokens`` the text is the words between <bos> and the first
        <eos> (<unk> stays visible as "<unk>"); otherwise every token is written out.
        Words are joined by single spaces, so punctuation and case do not come back.
        """
        arr = np.asarray(ids)
        if arr.ndim not in (1, 2):
            raise ValueError(f"WordTokenizer.decode expects ids of shape (L,) or (B, L), got {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"WordTokenizer.decode expects integer ids, got {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = int(arr.max()) if arr.max() >= self.vocab_size else int(arr.min())
            raise ValueError(f"WordTokenizer.decode: id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if arr.ndim == 2:
            return [self.decode(row, skip_special_tokens) for row in arr]
        tokens = []
        for i in arr.tolist():
            if skip_special_tokens:
                if i == EOS_ID:
                    break
                if i in (PAD_ID, BOS_ID):
                    continue
            tokens.append(self.id_to_token[i])
        return " ".join(tokens)

    # ------------------------------------------------------------------ saving
    def to_dict(self) -> dict:
        """A JSON-ready dict (to store beside a checkpoint); :meth:`from_dict` reads it back."""
        return {
            "type": "WordTokenizer",
            "vocab": self.id_to_token[len(SPECIAL_TOKENS):],
            "special_tokens": list(SPECIAL_TOKENS),
            "max_length": self.max_length,
            "lowercase": self.lowercase,
        }

    @classmethod
    def from_dict(cls, data: dict) -> WordTokenizer:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, dict) or data.get("type") != "WordTokenizer":
            raise ValueError("WordTokenizer.from_dict expects a dict made by WordTokenizer.to_dict "
                             "(with type='WordTokenizer')")
        missing = [k for k in ("vocab", "max_length", "lowercase") if k not in data]
        if missing:
            raise ValueError(f"WordTokenizer.from_dict: missing keys {missing}")
        if list(data.get("special_tokens", SPECIAL_TOKENS)) != list(SPECIAL_TOKENS):
            raise ValueError(f"WordTokenizer.from_dict: special tokens must be {list(SPECIAL_TOKENS)}, "
                             f"got {data['special_tokens']}")
        return cls(list(data["vocab"]), max_length=data["max_length"], lowercase=data["lowercase"])

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length})"


def _split(text: str, lowercase: bool) -> list[str]:
    return _WORD.findall(text.lower() if lowercase else text)


def _as_list(texts, where: str) -> list[str]:
    """A str or a list/tuple of str -> list of str, with errors that say what was wrong."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"WordTokenizer.{where} expects a str or a list of str, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError(f"WordTokenizer.{where} got an empty list of captions")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"WordTokenizer.{where}: caption {i} is {type(text).__name__}, not str")
    return list(texts)
