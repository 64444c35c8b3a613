"""CLIP's byte-level BPE tokenizer: the one Stable Diffusion 1.x reads its prompts with.

Text becomes integer ids in four steps (Radford et al. 2021, "Learning Transferable
Visual Models From Natural Language Supervision", Sec. 2.4, which takes the BPE of
Sennrich et al. 2016 in the byte-level form of GPT-2, Radford et al. 2019, Sec. 2.2)::

    1. normalise     NFC, every run of white space -> " ", lower case
    2. pre-tokenise  split into words, numbers and punctuation runs with CLIP's pattern
                     <|startoftext|> | <|endoftext|> | 's|'t|'re|'ve|'m|'ll|'d | \\p{L}+ | \\p{N} | [^\\s\\p{L}\\p{N}]+
                     (white space separates pieces and is dropped; each digit is its own piece)
    3. bytes         each piece as UTF-8 bytes, each byte as one printable character
                     (``bytes_to_unicode``: so any text, emoji included, has a spelling and
                     nothing is ever "unknown" with a full vocabulary)
    4. BPE           start from the characters, mark the last one with ``</w>`` (end of word),
                     and repeatedly merge the adjacent pair that comes first in ``merges.txt``
                     until no listed pair is left; look each symbol up in ``vocab.json``

A row for the text encoder is then CLIP's layout, ``max_length`` (77) ids::

    <|startoftext|> tokens ... <|endoftext|> <pad> ... <pad>

with at most ``max_length - 2`` tokens (longer prompts are truncated, keeping the
end token). The ids of the start and end tokens come from the vocabulary (49406 and
49407 in CLIP's). The pad token is configurable: Stable Diffusion 1.x pads with
``<|endoftext|>`` (its ``tokenizer/special_tokens_map.json``), 2.x with ``!`` (id 0).

**The pattern without the ``regex`` package.** CLIP's pattern uses the Unicode classes
``\\p{L}`` (letters: categories Lu, Ll, Lt, Lm, Lo) and ``\\p{N}`` (numbers: Nd, Nl, No),
which Python's ``re`` does not know. Its nearest spellings are approximations:
``[^\\W\\d_]`` ("word characters that are not decimal digits or _") also matches
numbers such as ``²``, ``½`` and ``Ⅻ`` (categories No/Nl are alphanumeric in
Python, so they would join a letter run), and ``\\d`` misses exactly those. Instead we
build the two classes once, from :mod:`unicodedata`, as explicit code-point ranges
(:func:`_unicode_classes`, about 0.4 s on first use), so the pattern is CLIP's exactly;
what can still differ is the Unicode *version* (Python's ``unicodedata.unidata_version``
against the one compiled into the ``regex``/``tokenizers`` libraries) for characters
assigned in between. Likewise ``\\s`` is spelled out as Unicode's White_Space set:
Python's ``\\s`` also matches the separators U+001C..U+001F, which are not white space
in Unicode. Lower-casing is per character (``"Σ"`` becomes ``"σ"`` everywhere), as
the Rust ``tokenizers`` library behind transformers' ``CLIPTokenizer`` does, not
Python's context-aware ``str.lower`` (which writes a final ``"ς"``).

Which reference. We match transformers 5's ``CLIPTokenizer`` (its normaliser is NFC,
white space, lower case). OpenAI's original also runs ``ftfy.fix_text`` (repairs
mojibake, NFC) and un-escapes HTML entities (``&amp;`` -> ``&``); transformers 4's
Python tokenizer without ``ftfy`` instead split Chinese/Japanese characters apart.
Prompts of ordinary text give the same ids under all three.

Left out: ``ftfy``'s text repair and HTML un-escaping (see above), BPE dropout,
returning offsets, attention masks other than :class:`Encoding`'s, and prompt
weighting syntax such as ``(word:1.2)``.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from pathlib import Path

import numpy as np

from diffusion_np.models.tokenizer import Encoding

__all__ = ["CLIPTokenizer", "bytes_to_unicode"]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

#: Unicode's White_Space property (what ``\\s`` means in the regex/tokenizers libraries)
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


# ----------------------------------------------------------------------------- bytes <-> characters
@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """The 256 bytes -> 256 printable characters of GPT-2 and CLIP.

    Bytes that are already printable, non-space Latin-1 characters (``!``..``~``,
    ``¡``..``¬``, ``®``..``ÿ``: 188 of them) stand for themselves; the other 68
    (control characters, space, the soft hyphen, ...) are mapped to U+0100, U+0101, ...
    in order. So every byte string has a spelling of visible characters, and the BPE
    vocabulary never needs a space or a control character in it.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


# ----------------------------------------------------------------------------- the pre-tokenizer
def _ranges(codepoints: list[int]) -> str:
    """Sorted code points -> a regex character-class body of ranges, ``a-zà-ö...``."""
    parts = []
    start = prev = codepoints[0]
    for cp in codepoints[1:] + [-1]:
        if cp != prev + 1:
            parts.append(re.escape(chr(start)) if start == prev else f"{re.escape(chr(start))}-{re.escape(chr(prev))}")
            start = cp
        prev = cp
    return "".join(parts)


@functools.cache
def _unicode_classes() -> tuple[str, str]:
    """Class bodies for ``\\p{L}`` and ``\\p{N}`` from this Python's Unicode database (built once)."""
    letters, numbers = [], []
    for cp in range(0x110000):  # a one-off loop over code points, not over data
        major = unicodedata.category(chr(cp))[0]
        if major == "L":
            letters.append(cp)
        elif major == "N":
            numbers.append(cp)
    return _ranges(letters), _ranges(numbers)


@functools.cache
def _pretokenizer() -> re.Pattern:
    """CLIP's pattern (see the module docstring) compiled for Python's ``re``."""
    L, N = _unicode_classes()
    return re.compile(
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
        rf"|[{L}]+|[{N}]|[^{_WHITE_SPACE}{L}{N}]+",
        re.IGNORECASE,
    )


_NO_MERGE = float("inf")  # the rank of a pair that merges.txt does not list
_SPACE_RUN = re.compile(f"[{_WHITE_SPACE}]+")


def _normalize(text: str) -> str:
    """Step 1: NFC, white-space runs -> one space, per-character lower case."""
    text = unicodedata.normalize("NFC", text)
    text = _SPACE_RUN.sub(" ", text)
    return "".join(c.lower() for c in text)  # per character: no final-sigma rule (see the docstring)


# ----------------------------------------------------------------------------- the tokenizer
class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer (see the module docstring).

    Parameters
    ----------
    vocab : dict str -> int
        ``vocab.json``: every symbol (byte characters, merged pieces, ``...</w>`` word ends)
        and the special tokens, with their ids.
    merges : list of (str, str)
        ``merges.txt``: the pairs to merge, highest priority first.
    max_length : int
        Ids per row, start and end tokens included (77 for Stable Diffusion).
    pad_token : str
        Fills the row after the end token: ``<|endoftext|>`` in SD 1.x, ``!`` in SD 2.x.
    bos_token, eos_token : str
        Start and end of text; their ids come from ``vocab``.
    unk_token : str
        Stands for a symbol missing from the vocabulary (never needed with a full
        byte-level vocabulary; CLIP uses ``<|endoftext|>``).
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        max_length: int = 77,
        pad_token: str = EOS_TOKEN,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        unk_token: str = EOS_TOKEN,
    ) -> None:
        if not isinstance(vocab, dict) or not vocab:
            raise TypeError("CLIPTokenizer: vocab must be a non-empty dict {token: id}")
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
            raise ValueError(f"CLIPTokenizer: max_length must be an int >= 2 (room for the start and end "
                             f"tokens), got {max_length!r}")
        missing = [t for t in (bos_token, eos_token, pad_token, unk_token) if t not in vocab]
        if missing:
            raise ValueError(f"CLIPTokenizer: special token(s) {sorted(set(missing))} are not in the vocabulary")
        self.encoder: dict[str, int] = {str(k): int(v) for k, v in vocab.items()}
        self.decoder: dict[int, str] = {v: k for k, v in self.encoder.items()}
        self.bpe_ranks: dict[tuple[str, str], int] = {}
        for rank, pair in enumerate(merges):
            if len(pair) != 2:
                raise ValueError(f"CLIPTokenizer: merge {rank} is not a pair of symbols: {pair!r}")
            self.bpe_ranks.setdefault((pair[0], pair[1]), rank)  # a repeated pair keeps its first rank
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.max_length = int(max_length)
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_id, self.eos_id = self.encoder[bos_token], self.encoder[eos_token]
        self.pad_id, self.unk_id = self.encoder[pad_token], self.encoder[unk_token]
        self._special = {bos_token: self.bos_id, eos_token: self.eos_id}
        self._cache: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_files(cls, vocab_file, merges_file, **kwargs) -> CLIPTokenizer:
        """Read ``vocab.json`` and ``merges.txt`` (lines ``a b``; a ``#version`` header is skipped)."""
        vocab_path, merges_path = Path(vocab_file), Path(merges_file)
        for path in (vocab_path, merges_path):
            if not path.is_file():
                raise FileNotFoundError(f"CLIPTokenizer: {path} does not exist")
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        merges = []
        for n, line in enumerate(merges_path.read_text(encoding="utf-8").split("\n")):
            if not line.strip() or (n == 0 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"CLIPTokenizer: {merges_path} line {n + 1} is not 'a b': {line!r}")
            merges.append((parts[0], parts[1]))
        return cls(vocab, merges, **kwargs)

    @classmethod
    def from_pretrained(cls, directory, max_length: int | None = None) -> CLIPTokenizer:
        """A diffusers/transformers ``tokenizer/`` folder: ``vocab.json`` and ``merges.txt`` (or the
        ``tokenizer.json`` that transformers 5 writes instead) and, when present,
        ``tokenizer_config.json`` / ``special_tokens_map.json`` for ``model_max_length`` and the
        special tokens (the pad token especially: ``<|endoftext|>`` or ``!``)."""
        directory = Path(directory)
        settings = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the second wins, as in transformers
            path = directory / name
            if path.is_file():
                settings.update(json.loads(path.read_text(encoding="utf-8")))

        def token(key: str, default: str) -> str:
            value = settings.get(key, default)
            return value["content"] if isinstance(value, dict) else (value or default)

        if max_length is None:
            max_length = int(settings.get("model_max_length", 77))
            if max_length > 10_000:  # transformers' "no limit" placeholder (1e30)
                max_length = 77
        kwargs = dict(max_length=max_length, pad_token=token("pad_token", EOS_TOKEN),
                      bos_token=token("bos_token", BOS_TOKEN), eos_token=token("eos_token", EOS_TOKEN),
                      unk_token=token("unk_token", EOS_TOKEN))
        if not (directory / "vocab.json").is_file() and (directory / "tokenizer.json").is_file():
            # transformers 5 saves only tokenizer.json: the same vocabulary and merges inside one JSON
            model = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
            if model.get("type") != "BPE":
                raise ValueError(f"CLIPTokenizer: {directory / 'tokenizer.json'} is not a BPE tokenizer")
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            return cls(model["vocab"], merges, **kwargs)
        return cls.from_files(directory / "vocab.json", directory / "merges.txt", **kwargs)

    # ------------------------------------------------------------------ text -> tokens
    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def __len__(self) -> int:
        return self.vocab_size

    def pre_tokenize(self, text: str) -> list[str]:
        """Steps 1-2: the normalised text's pieces (words, single digits, punctuation runs)."""
        if not isinstance(text, str):
            raise TypeError(f"CLIPTokenizer expects a str, got {type(text).__name__}")
        return _pretokenizer().findall(_normalize(text))

    def bpe(self, piece: str) -> list[str]:
        """Step 4 on one piece already spelled in byte characters: the list of its BPE symbols."""
        if piece in self._cache:
            return self._cache[piece]
        word = [*piece[:-1], piece[-1] + END_OF_WORD]  # the last character carries the end of word
        while len(word) > 1:
            # the adjacent pair that was learned first (lowest rank) ...
            pairs = set(zip(word[:-1], word[1:]))
            best = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, _NO_MERGE))
            if best not in self.bpe_ranks:
                break
            # ... is merged everywhere it occurs, left to right
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[piece] = word
        return word

    def tokenize(self, text: str) -> list[str]:
        """Steps 1-4: the BPE symbols of ``text`` (no start/end tokens)."""
        tokens = []
        for piece in self.pre_tokenize(text):
            if piece in self._special:  # a literal <|startoftext|> / <|endoftext|> in the prompt
                tokens.append(piece)
                continue
            spelled = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))  # step 3
            tokens.extend(self.bpe(spelled))
        return tokens

    def encode_tokens(self, text: str) -> list[int]:
        """The ids of ``text``'s tokens, without start/end tokens, padding or truncation."""
        return [self.encoder.get(t, self.unk_id) for t in self.tokenize(text)]

    def encode(self, texts: str | list[str], truncate: bool = True) -> Encoding:
        """Prompts -> ``Encoding(ids (B, max_length) int64, lengths (B,) int64)`` in CLIP's layout.

        A prompt longer than ``max_length - 2`` tokens keeps its first ``max_length - 2``
        and still ends with the end token (``truncate=True``, what Stable Diffusion does:
        the rest of a long prompt is ignored), or raises ValueError (``truncate=False``).
        ``lengths`` counts the start and end tokens.
        """
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, (list, tuple)) or not texts:
            raise TypeError("CLIPTokenizer.encode expects a str or a non-empty list of str")
        room = self.max_length - 2
        ids = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int64)
        lengths = np.empty(len(texts), dtype=np.int64)
        for b, text in enumerate(texts):  # a loop over prompts: strings are not arrays
            tokens = self.encode_tokens(text)
            if len(tokens) > room:
                if not truncate:
                    raise ValueError(
                        f"CLIPTokenizer.encode: prompt {b} has {len(tokens)} tokens but max_length={self.max_length} "
                        f"fits {room} (the start and end tokens take two); shorten it or pass truncate=True"
                    )
                tokens = tokens[:room]
            row = [self.bos_id, *tokens, self.eos_id]
            ids[b, : len(row)] = row
            lengths[b] = len(row)
        return Encoding(ids, lengths)

    # ------------------------------------------------------------------ ids -> text
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Ids (a 1-D sequence) back to text: symbols joined, ``</w>`` -> space, bytes -> UTF-8.

        With ``skip_special_tokens`` the start, end and pad tokens are dropped. The
        normalisation (case, white space) does not come back.
        """
        special = {self.bos_id, self.eos_id, self.pad_id}
        symbols = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if skip_special_tokens and i in special:
                continue
            if i not in self.decoder:
                raise ValueError(f"CLIPTokenizer.decode: id {i} is not in the vocabulary")
            symbols.append(self.decoder[i])
        raw = bytearray()
        for c in "".join(symbols).replace(END_OF_WORD, " "):  # </w> ended a word: a space
            raw += b" " if c == " " else bytes([self.byte_decoder[c]])
        return raw.decode("utf-8", errors="replace").strip()

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={self.vocab_size}, merges={len(self.bpe_ranks)}, "
                f"max_length={self.max_length})")
