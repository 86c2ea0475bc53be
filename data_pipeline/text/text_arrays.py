"""Text as numpy arrays: code points, character classes, and deterministic 64-bit word hashes,
so that word-level measures run over many documents in a few vectorised calls.

A word's hash is a polynomial in its code points modulo 2**64, with an odd base so that every
power is invertible and the hash does not depend on where the word starts, mixed with its length
and then through the splitmix64 finaliser. All of it is deterministic: no PYTHONHASHSEED. Results
use hashes only through equality, so two distinct words of one document are confused only if
their 64-bit hashes collide: for text not built to collide, about (distinct words)**2 / 2**65 per
document, below 1e-9 even for a million words.
"""

from __future__ import annotations

import unicodedata
from typing import NamedTuple

import numpy as np

# Character classes, as bits.
SPACE, LETTER, PUNCT, WORD_CHAR = 1, 2, 4, 8

_CHAR_BASE = 0x9E3779B97F4A7C15
_CHAR_BASE_INVERSE = pow(_CHAR_BASE, -1, 1 << 64)
_LENGTH_MIX = 0xD6E8FEB86659FD93


def char_class(char: str) -> int:
    """The class bits of one character: whitespace; punctuation or symbol (Unicode categories
    P* and S*); otherwise a word character, and a letter too when `str.isalpha`."""
    if char.isspace():
        return SPACE
    if unicodedata.category(char)[0] in "PS":
        return PUNCT
    return WORD_CHAR | (LETTER if char.isalpha() else 0)


# A bytes.translate table from an ASCII code to its class bits (the upper half is never used).
_ASCII_CLASSES = bytes(char_class(chr(code)) for code in range(128)) + bytes(128)


def code_points(text: str) -> np.ndarray:
    """The code points of `text`: uint8 when it is ASCII, else uint32 (lone surrogates kept)."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), np.uint8)
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)


def char_classes(text: str, codes: np.ndarray) -> np.ndarray:
    """The class bits (uint8) of each character of `text`, whose code points are `codes`."""
    if codes.dtype == np.uint8:
        return np.frombuffer(text.encode("ascii").translate(_ASCII_CLASSES), np.uint8)
    classes = np.frombuffer(_ASCII_CLASSES, np.uint8)[np.minimum(codes, 255)]
    high = codes >= 128
    distinct, inverse = np.unique(codes[high], return_inverse=True)
    table = np.fromiter(map(char_class, map(chr, distinct.tolist())), np.uint8, len(distinct))
    classes[high] = table[inverse]
    return classes


def mix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, applied in place to a uint64 array, which it returns."""
    values ^= values >> 30
    values *= 0xBF58476D1CE4E5B9
    values ^= values >> 27
    values *= 0x94D049BB133111EB
    values ^= values >> 31
    return values


class Powers(NamedTuple):
    """Powers of the character base modulo 2**64: base**1 .. base**size, and their inverses."""

    up: np.ndarray
    down: np.ndarray

    @classmethod
    def of_size(cls, size: int) -> Powers:
        up = np.cumprod(np.full(size, _CHAR_BASE, np.uint64))
        return cls(up, np.cumprod(np.full(size, _CHAR_BASE_INVERSE, np.uint64)))


def word_hashes(
    codes: np.ndarray, starts: np.ndarray, ends: np.ndarray, powers: Powers | None = None
) -> np.ndarray:
    """A deterministic 64-bit hash (uint64) of each word `codes[start:end]`; `powers` (at least
    one longer than `codes`) may be given to save computing them."""
    size = len(codes)
    if powers is None or len(powers.up) <= size:
        powers = Powers.of_size(size + 1)
    prefix = np.zeros(size + 1, np.uint64)
    terms = np.add(codes, 1, dtype=np.uint64)
    terms *= powers.up[:size]
    np.cumsum(terms, out=prefix[1:])
    hashes = (prefix[ends] - prefix[starts]) * powers.down[starts]
    hashes ^= (ends - starts).astype(np.uint64) * _LENGTH_MIX
    return mix64(hashes)


def hash_words(words: list[str]) -> np.ndarray:
    """`word_hashes` of whole strings (for lists of words given by configuration)."""
    codes = code_points("".join(words))
    lengths = np.fromiter(map(len, words), np.int64, len(words))
    ends = np.cumsum(lengths)
    return word_hashes(codes, ends - lengths, ends)


def runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) of every maximal run of True in a bool array."""
    edges = np.flatnonzero(np.diff(mask.view(np.int8), prepend=0, append=0))
    return edges[0::2], edges[1::2]


def ratios(part: np.ndarray, whole: np.ndarray) -> np.ndarray:
    """part / whole as float64, 0.0 where whole is 0."""
    part = np.asarray(part, np.float64)
    whole = np.asarray(whole, np.float64)
    return np.divide(part, whole, out=np.zeros_like(part), where=whole > 0)
