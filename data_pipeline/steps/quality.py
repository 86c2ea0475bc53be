"""Document quality filters after Gopher (Rae et al. 2021, appendix A) and datatrove's
GopherQualityFilter / GopherRepetitionFilter, vectorised with numpy over batches of documents
so that they cost little next to tokenisation.

Definitions (every rule is named by its `FilterConfig` field):

- A *word* is a maximal run of non-whitespace characters (`str.isspace`): the tokens of
  `text.split()`. `min_words` / `max_words` count them.
- `mean_word_length` counts, in each word, the characters that are neither punctuation nor
  symbols (Unicode categories P* and S*), and averages over the words holding at least one such
  character: "Hello," is 5 long and a lone "--" is left out.
- `symbol_word_ratio`: (count of "#" + count of "..." + count of "…") / words.
- `alpha_words_ratio`: words holding a character with `str.isalpha()` / words.
- A *line* is a piece of `text.split("\\n")` holding a non-whitespace character (blank lines
  are not lines). A bullet line starts, after its leading whitespace, with one of `BULLETS`; an
  ellipsis line ends, before its trailing whitespace, with "..." or "…".
- A *paragraph* is a piece of the text between blank lines (split on `\\n\\s*\\n`, which is
  `\\n\\n+` for normalised text) holding a non-whitespace character.
- A line (paragraph) is *repeated* when an equal one, compared exactly, comes earlier:
  `duplicate_line_fraction` is repeated lines / lines, `duplicate_line_char_fraction` the
  characters of the repeated lines / `len(text)`; the same for paragraphs.
- Word n-grams are n consecutive words. The characters of an n-gram are those of its words (no
  separators); both n-gram rules divide by the characters of all words.
  `top_ngram_char_fraction`: the most frequent n-gram's characters times its count (overlapping
  occurrences all count, as in Gopher, so the value can exceed 1, e.g. "a a a a" with n = 2);
  among equally frequent n-grams the longest counts. `duplicate_ngram_char_fraction`: the
  characters of the words inside some occurrence of an n-gram occurring more than once (the
  first occurrence included), each character counted once.

A ratio whose denominator is zero (no words, lines, paragraphs or characters) is 0.0, so a
document without words passes every `max_*` rule and fails `min_mean_word_length` and
`min_alpha_words_ratio` when their thresholds are above zero (after `min_chars` and
`min_words`, which come first and are the natural rules for it). `min_*` rules fail below
their threshold, `max_*` rules above it.

Rules are tried in the order of `RULE_ORDER`, cheapest first, and a document stops at its first
failure; an n-gram rule tries its sizes in increasing order. Documents are checked in chunks
of about 256k characters: the word measures are computed for a whole chunk with a few numpy
calls, the line, paragraph and n-gram measures only for the documents that passed every earlier
rule. A document's result never depends on the other documents of its batch.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Sequence
from functools import cached_property
from itertools import compress
from typing import NamedTuple

import numpy as np

from data_pipeline.config import FilterConfig

RULE_ORDER: tuple[str, ...] = (
    "min_chars",
    "max_chars",
    "min_words",
    "max_words",
    "min_mean_word_length",
    "max_mean_word_length",
    "max_symbol_word_ratio",
    "min_alpha_words_ratio",
    "max_bullet_lines_ratio",
    "max_ellipsis_lines_ratio",
    "max_duplicate_line_fraction",
    "max_duplicate_line_char_fraction",
    "max_duplicate_paragraph_fraction",
    "max_duplicate_paragraph_char_fraction",
    "max_top_ngram_char_fraction",
    "max_duplicate_ngram_char_fraction",
)
"""The order in which `QualityFilter` tries the rules; the first one failed is reported."""

BULLETS: tuple[str, ...] = ("•", "‣", "◦", "⁃", "●", "○", "-", "*", "·")
_ASCII_BULLETS = tuple(bullet for bullet in BULLETS if bullet.isascii())

_NGRAM_RULES = frozenset({"max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction"})
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
# Documents are checked in chunks of about this many characters: numpy calls are paid per chunk,
# not per document, and a chunk's arrays stay small enough for the caches.
_CHUNK_CHARS = 1 << 18

# Character classes, as bits.
_SPACE, _LETTER, _PUNCT, _WORD_CHAR = 1, 2, 4, 8


def _char_class(char: str) -> int:
    """The class bits of one character: whitespace; punctuation or symbol; otherwise a word
    character, and a letter too when `str.isalpha`."""
    if char.isspace():
        return _SPACE
    if unicodedata.category(char)[0] in "PS":
        return _PUNCT
    return _WORD_CHAR | (_LETTER if char.isalpha() else 0)


# A bytes.translate table from an ASCII code to its class bits (the upper half is never used).
_ASCII_CLASSES = bytes(_char_class(chr(code)) for code in range(128)) + bytes(128)

# Hashing. A word's hash is a polynomial in its code points modulo 2**64, with an odd base so
# that every power is invertible and the hash does not depend on where the word starts, mixed
# with its length and then through the splitmix64 finaliser. An n-gram's hash is a polynomial,
# with another odd base, in its words' hashes. All of it is deterministic: no PYTHONHASHSEED.
# Results use hashes only through equality (tie-breaks never look at hash values), so two
# distinct words or n-grams of one document are confused only if their 64-bit hashes collide,
# which for text not built to collide has a probability of about (distinct items)**2 / 2**65
# per document: below 1e-9 even for a million words.
_CHAR_BASE = 0x9E3779B97F4A7C15
_CHAR_BASE_INVERSE = pow(_CHAR_BASE, -1, 1 << 64)
_LENGTH_MIX = 0xD6E8FEB86659FD93
_NGRAM_BASE = 0xC2B2AE3D27D4EB4F


def _code_points(text: str) -> np.ndarray:
    """The code points of `text`: uint8 when it is ASCII, else uint32 (lone surrogates kept)."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), np.uint8)
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)


def _char_classes(text: str, codes: np.ndarray) -> np.ndarray:
    """The class bits (uint8) of each character of `text`, whose code points are `codes`."""
    if codes.dtype == np.uint8:
        return np.frombuffer(text.encode("ascii").translate(_ASCII_CLASSES), np.uint8)
    classes = np.frombuffer(_ASCII_CLASSES, np.uint8)[np.minimum(codes, 255)]
    high = codes >= 128
    distinct, inverse = np.unique(codes[high], return_inverse=True)
    table = np.fromiter(map(_char_class, map(chr, distinct.tolist())), np.uint8, len(distinct))
    classes[high] = table[inverse]
    return classes


def _mix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, applied in place to a uint64 array, which it returns."""
    values ^= values >> 30
    values *= 0xBF58476D1CE4E5B9
    values ^= values >> 27
    values *= 0x94D049BB133111EB
    values ^= values >> 31
    return values


class _Powers(NamedTuple):
    """Powers of the character base modulo 2**64: base**1 .. base**size, and their inverses."""

    up: np.ndarray
    down: np.ndarray

    @classmethod
    def of_size(cls, size: int) -> _Powers:
        up = np.cumprod(np.full(size, _CHAR_BASE, np.uint64))
        return cls(up, np.cumprod(np.full(size, _CHAR_BASE_INVERSE, np.uint64)))


def _word_hashes(
    codes: np.ndarray, starts: np.ndarray, ends: np.ndarray, powers: _Powers | None = None
) -> np.ndarray:
    """A deterministic 64-bit hash (uint64) of each word `codes[start:end]`; `powers` (at least
    one longer than `codes`) may be given to save computing them."""
    size = len(codes)
    if powers is None or len(powers.up) <= size:
        powers = _Powers.of_size(size + 1)
    prefix = np.zeros(size + 1, np.uint64)
    terms = np.add(codes, 1, dtype=np.uint64)
    terms *= powers.up[:size]
    np.cumsum(terms, out=prefix[1:])
    hashes = (prefix[ends] - prefix[starts]) * powers.down[starts]
    hashes ^= (ends - starts).astype(np.uint64) * _LENGTH_MIX
    return _mix64(hashes)


def _ratios(part: np.ndarray, whole: np.ndarray) -> np.ndarray:
    """part / whole as float64, 0.0 where whole is 0."""
    part = np.asarray(part, np.float64)
    whole = np.asarray(whole, np.float64)
    return np.divide(part, whole, out=np.zeros_like(part), where=whole > 0)


class _Level(NamedTuple):
    """The word n-grams of one size n that occur more than once in their document."""

    positions: np.ndarray  # int64, increasing: the first word of each such occurrence
    hashes: np.ndarray  # uint64: the n-gram hash at each of those positions
    max_count: np.ndarray  # int64 per document: count of its most frequent n-gram, 0 if < 2
    top_chars: np.ndarray  # int64 per document: its characters times that count


class NgramIndex:
    """Repetition of word n-grams in a run of documents, computed size by size with numpy.

    The words of all documents lie end to end (those of a document together, the documents in
    order); n-grams never cross documents. Size n is computed from size n - 1 when that is
    known: an n-gram occurring twice starts where an (n - 1)-gram occurring twice is followed by
    another one, so only those positions are hashed and sorted, and the work shrinks as n grows.
    The per-document results do not depend on the other documents of the run.

    `alive` (bool per document), where given, names the documents whose results are wanted;
    results are cached by size, so across calls `alive` may only lose documents."""

    def __init__(
        self,
        hashes: np.ndarray,
        lengths: np.ndarray,
        docs: np.ndarray | None = None,
        n_docs: int = 1,
    ) -> None:
        """`hashes` (uint64): one per word, equal for equal words; `lengths`: the words'
        lengths; `docs` (int64, non-decreasing): each word's document, all 0 when None."""
        self._hashes = hashes
        self._docs = np.zeros(len(hashes), np.int64) if docs is None else docs
        self._n_docs = n_docs
        self._bounds = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))
        self.doc_chars = np.bincount(self._docs, weights=lengths, minlength=n_docs)
        self._levels: dict[int, _Level] = {}

    @classmethod
    def of_words(cls, words: Sequence[str]) -> NgramIndex:
        """The index of one document given as its words."""
        lengths = np.fromiter(map(len, words), np.int64, len(words))
        ends = np.cumsum(lengths)
        hashes = _word_hashes(_code_points("".join(words)), ends - lengths, ends)
        return cls(hashes, lengths)

    def top_fractions(self, n: int, alive: np.ndarray | None = None) -> np.ndarray:
        """Per document: characters of its most frequent n-gram times its count, over its word
        characters."""
        level = self._level(n, alive)
        chars = level.top_chars.astype(np.float64)
        unrepeated = level.max_count < 2
        if alive is not None:
            unrepeated &= alive
        if unrepeated.any():
            chars[unrepeated] = self._longest(n)[unrepeated]
        return _ratios(chars, self.doc_chars)

    def duplicate_fractions(self, n: int, alive: np.ndarray | None = None) -> np.ndarray:
        """Per document: share of its word characters inside n-grams occurring more than once
        in it."""
        positions = self._level(n, alive).positions
        ends = positions + n
        np.minimum(ends[:-1], positions[1:], out=ends[:-1])  # no overlap with the next one
        covered = self._bounds[ends] - self._bounds[positions]
        per_doc = np.bincount(self._docs[positions], weights=covered, minlength=self._n_docs)
        return _ratios(per_doc, self.doc_chars)

    def _level(self, n: int, alive: np.ndarray | None) -> _Level:
        if n < 1:
            raise ValueError(f"an n-gram size is at least 1, not {n}")
        if n not in self._levels:
            known = [size for size in self._levels if size < n]
            if known:
                size = max(known)
                level = self._levels[size]
            else:
                size, level = n, self._full_level(n, alive)
            while size < n:
                size += 1
                level = self._extended_level(level, size, alive)
                self._levels[size] = level
            self._levels[n] = level
        return self._levels[n]

    def _starts(self, n: int) -> int:
        """How many positions an n-gram could start at, crossing documents or not."""
        return max(len(self._hashes) - n + 1, 0)

    def _within(self, positions: np.ndarray, n: int) -> np.ndarray:
        """Whether the n-grams at `positions` lie inside one document."""
        return self._docs[positions] == self._docs[positions + n - 1]

    def _full_level(self, n: int, alive: np.ndarray | None) -> _Level:
        count = self._starts(n)
        hashes = self._hashes[:count].copy()
        for offset in range(1, n):
            hashes *= _NGRAM_BASE
            hashes += self._hashes[offset : offset + count]
        keep = self._docs[:count] == self._docs[n - 1 : n - 1 + count]
        if alive is not None:
            keep &= alive[self._docs[:count]]
        return self._grouped(np.flatnonzero(keep), hashes[keep], n)

    def _extended_level(self, shorter: _Level, n: int, alive: np.ndarray | None) -> _Level:
        """Level n from level n - 1."""
        positions, hashes = shorter.positions, shorter.hashes
        if alive is not None:
            live = alive[self._docs[positions]]
            positions, hashes = positions[live], hashes[live]
        follows = np.flatnonzero(np.diff(positions) == 1)
        follows = follows[self._within(positions[follows], n)]
        positions = positions[follows]
        hashes = hashes[follows] * _NGRAM_BASE + self._hashes[positions + n - 1]
        return self._grouped(positions, hashes, n)

    def _grouped(self, positions: np.ndarray, hashes: np.ndarray, n: int) -> _Level:
        """The level of the n-grams at `positions` (which hold every n-gram occurring more than
        once in its document), whose hashes are `hashes`."""
        max_count = np.zeros(self._n_docs, np.int64)
        top_chars = np.zeros(self._n_docs, np.int64)
        order = np.argsort(hashes, kind="stable")  # equal hashes stay in document order
        ordered = hashes[order]
        docs = self._docs[positions[order]]
        same = (ordered[1:] == ordered[:-1]) & (docs[1:] == docs[:-1])
        if not same.any():
            return _Level(positions[:0], hashes[:0], max_count, top_chars)
        repeated = np.zeros(len(order), bool)
        repeated[1:] = same
        repeated[:-1] |= same
        keep = np.empty_like(repeated)
        keep[order] = repeated
        starts = np.flatnonzero(np.concatenate(([True], ~same)))
        counts = np.diff(np.append(starts, len(order)))
        starts, counts = starts[counts > 1], counts[counts > 1]
        group_docs = docs[starts]
        firsts = positions[order[starts]]
        chars = counts * (self._bounds[firsts + n] - self._bounds[firsts])
        np.maximum.at(max_count, group_docs, counts)
        best = counts == max_count[group_docs]
        np.maximum.at(top_chars, group_docs[best], chars[best])
        return _Level(positions[keep], hashes[keep], max_count, top_chars)

    def _longest(self, n: int) -> np.ndarray:
        """Per document, the characters of its longest n-gram (0 without one)."""
        longest = np.zeros(self._n_docs, np.int64)
        positions = np.arange(self._starts(n))
        positions = positions[self._within(positions, n)]
        chars = self._bounds[positions + n] - self._bounds[positions]
        np.maximum.at(longest, self._docs[positions], chars)
        return longest


def top_ngram_char_fraction(words: Sequence[str], n: int) -> float:
    """Characters covered by the most frequent word n-gram (its length in characters times its
    count; the longest among equally frequent ones) over the characters of all words."""
    return float(NgramIndex.of_words(words).top_fractions(n)[0])


def duplicate_ngram_char_fraction(words: Sequence[str], n: int) -> float:
    """Share of the words' characters lying inside word n-grams that occur more than once
    (each character counted once)."""
    return float(NgramIndex.of_words(words).duplicate_fractions(n)[0])


def _repeats(items: list[str]) -> tuple[int, int]:
    """How many of `items` equal an earlier one, and their characters."""
    distinct = set(items)
    return len(items) - len(distinct), sum(map(len, items)) - sum(map(len, distinct))


class _LineStats(NamedTuple):
    lines: int
    bullet_lines: int
    ellipsis_lines: int
    repeated_lines: int
    repeated_line_chars: int

    @classmethod
    def of(cls, text: str) -> _LineStats:
        lines = text.split("\n")
        stripped = list(map(str.strip, lines))
        joined = "\n" + "\n".join(stripped) + "\n"
        bullets = _ASCII_BULLETS if joined.isascii() else BULLETS
        repeated, repeated_chars = _repeats(list(compress(lines, stripped)))
        return cls(
            lines=len(stripped) - stripped.count(""),
            bullet_lines=sum(joined.count("\n" + bullet) for bullet in bullets),
            ellipsis_lines=joined.count("...\n") + joined.count("…\n"),
            repeated_lines=repeated,
            repeated_line_chars=repeated_chars,
        )


class _ParagraphStats(NamedTuple):
    paragraphs: int
    repeated: int
    repeated_chars: int

    @classmethod
    def of(cls, text: str) -> _ParagraphStats:
        pieces = _PARAGRAPH_BREAK.split(text)
        paragraphs = list(compress(pieces, map(str.strip, pieces)))
        return cls(len(paragraphs), *_repeats(paragraphs))


class _Chunk:
    """The measures of some documents, each computed on first use. A measure takes the
    indices of the documents it is wanted for and returns one value for each."""

    def __init__(self, texts: Sequence[str], powers: _Powers | None = None) -> None:
        self.texts = texts
        self._powers = powers
        self._lengths = np.fromiter(map(len, texts), np.int64, len(texts))
        # Documents are joined with "\n" in between: offsets of each in the joined text.
        self._offsets = np.concatenate(([0], np.cumsum(self._lengths + 1)))[:-1]
        self._lines: dict[int, _LineStats] = {}
        self._paragraphs: dict[int, _ParagraphStats] = {}
        self._index: NgramIndex | None = None

    @cached_property
    def _joined(self) -> str:
        return "\n".join(self.texts)

    @cached_property
    def _codes(self) -> np.ndarray:
        return _code_points(self._joined)

    @cached_property
    def _solid(self) -> np.ndarray:
        """Which characters of the joined text are not whitespace."""
        return (self._classes & _SPACE) == 0

    @cached_property
    def _classes(self) -> np.ndarray:
        return _char_classes(self._joined, self._codes)

    @cached_property
    def _words(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Start and end of each word in the joined text, its document, and the index of each
        document's first word (with the count of all words at the end)."""
        edges = np.flatnonzero(np.diff(self._solid.view(np.int8), prepend=0, append=0))
        starts, ends = edges[0::2], edges[1::2]
        docs = np.searchsorted(self._offsets, starts, side="right") - 1
        firsts = np.searchsorted(starts, np.append(self._offsets, len(self._codes) + 1))
        return starts, ends, docs, firsts

    def _per_doc_words(self, values: np.ndarray) -> np.ndarray:
        """Sum of `values` (one per word) over the words of each document."""
        firsts = self._words[3]
        sums = np.concatenate(([0], np.cumsum(values, dtype=np.int64)))
        return sums[firsts[1:]] - sums[firsts[:-1]]

    @cached_property
    def _word_measures(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per document: words, mean word length, share of alphabetic words."""
        starts, ends = self._words[:2]
        bits = np.bitwise_or.reduceat(self._classes, starts) if len(starts) else starts
        n_words = np.diff(self._words[3])
        punctuation = self._classes & _PUNCT
        bounds = zip(self._offsets.tolist(), (self._offsets + self._lengths).tolist(), strict=True)
        punctuation_chars = [np.count_nonzero(punctuation[a:b]) for a, b in bounds]
        word_chars = self._per_doc_words(ends - starts) - np.array(punctuation_chars, np.int64)
        mean_length = _ratios(word_chars, self._per_doc_words((bits & _WORD_CHAR) > 0))
        alpha = _ratios(self._per_doc_words((bits & _LETTER) > 0), n_words)
        return n_words, mean_length, alpha

    def n_chars(self, docs: np.ndarray) -> np.ndarray:
        return self._lengths[docs]

    def n_words(self, docs: np.ndarray) -> np.ndarray:
        return self._word_measures[0][docs]

    def mean_word_length(self, docs: np.ndarray) -> np.ndarray:
        return self._word_measures[1][docs]

    def alpha_words_ratio(self, docs: np.ndarray) -> np.ndarray:
        return self._word_measures[2][docs]

    def symbol_word_ratio(self, docs: np.ndarray) -> np.ndarray:
        texts = [self.texts[i] for i in docs.tolist()]
        symbols = [text.count("#") + text.count("...") + text.count("…") for text in texts]
        return _ratios(symbols, self.n_words(docs))

    def _line_stats(self, docs: np.ndarray) -> list[_LineStats]:
        for i in docs.tolist():
            if i not in self._lines:
                self._lines[i] = _LineStats.of(self.texts[i])
        return [self._lines[i] for i in docs.tolist()]

    def _line_ratios(self, docs: np.ndarray, field: str, per_chars: bool = False) -> np.ndarray:
        stats = self._line_stats(docs)
        whole = self.n_chars(docs) if per_chars else [s.lines for s in stats]
        return _ratios([getattr(s, field) for s in stats], whole)

    def bullet_lines_ratio(self, docs: np.ndarray) -> np.ndarray:
        return self._line_ratios(docs, "bullet_lines")

    def ellipsis_lines_ratio(self, docs: np.ndarray) -> np.ndarray:
        return self._line_ratios(docs, "ellipsis_lines")

    def duplicate_line_fraction(self, docs: np.ndarray) -> np.ndarray:
        return self._line_ratios(docs, "repeated_lines")

    def duplicate_line_char_fraction(self, docs: np.ndarray) -> np.ndarray:
        return self._line_ratios(docs, "repeated_line_chars", per_chars=True)

    def _paragraph_stats(self, docs: np.ndarray) -> list[_ParagraphStats]:
        for i in docs.tolist():
            if i not in self._paragraphs:
                self._paragraphs[i] = _ParagraphStats.of(self.texts[i])
        return [self._paragraphs[i] for i in docs.tolist()]

    def duplicate_paragraph_fraction(self, docs: np.ndarray) -> np.ndarray:
        stats = self._paragraph_stats(docs)
        return _ratios([s.repeated for s in stats], [s.paragraphs for s in stats])

    def duplicate_paragraph_char_fraction(self, docs: np.ndarray) -> np.ndarray:
        stats = self._paragraph_stats(docs)
        return _ratios([s.repeated_chars for s in stats], self.n_chars(docs))

    def _ngram_index(self, docs: np.ndarray) -> NgramIndex:
        """The n-gram index of the documents `docs`, built on first use (later calls pass
        fewer documents, all among the first ones)."""
        if self._index is None:
            starts, ends, word_docs, _ = self._words
            hashes = _word_hashes(self._codes, starts, ends, self._powers)
            lengths = ends - starts
            if len(docs) < len(self.texts):
                wanted = self._alive(docs)[word_docs]
                hashes, lengths, word_docs = hashes[wanted], lengths[wanted], word_docs[wanted]
            self._index = NgramIndex(hashes, lengths, word_docs, len(self.texts))
        return self._index

    def _alive(self, docs: np.ndarray) -> np.ndarray:
        alive = np.zeros(len(self.texts), bool)
        alive[docs] = True
        return alive

    def top_ngram_char_fraction(self, docs: np.ndarray, n: int) -> np.ndarray:
        return self._ngram_index(docs).top_fractions(n, self._alive(docs))[docs]

    def duplicate_ngram_char_fraction(self, docs: np.ndarray, n: int) -> np.ndarray:
        return self._ngram_index(docs).duplicate_fractions(n, self._alive(docs))[docs]


def _measure(rule: str) -> str:
    """The name of the `_Chunk` measure that `rule` compares with its threshold."""
    measure = rule.removeprefix("min_").removeprefix("max_")
    return {"chars": "n_chars", "words": "n_words"}.get(measure, measure)


class QualityFilter:
    """The active rules of a `FilterConfig`, tried in `RULE_ORDER`."""

    def __init__(self, cfg: FilterConfig) -> None:
        active = cfg.active_rules()
        unknown = sorted(set(active) - set(RULE_ORDER))
        if unknown:
            raise ValueError(f"no quality rule implements {', '.join(unknown)}")
        self._rules: tuple[tuple[str, str, object], ...] = tuple(
            (name, _measure(name), active[name]) for name in RULE_ORDER if name in active
        )
        self._powers = _Powers.of_size(_CHUNK_CHARS + 1)  # enough for every chunk but one text

    def first_failure(self, text: str) -> str | None:
        """The name of the first rule `text` fails, or None when it passes them all."""
        return self.check_batch([text])[0]

    def check_batch(self, texts: list[str]) -> list[str | None]:
        """`first_failure` of each text, computed for many at once."""
        failures: list[str | None] = []
        for start, stop in _chunks(texts):
            failures += self._check_chunk(_Chunk(texts[start:stop], self._powers))
        return failures

    def _check_chunk(self, chunk: _Chunk) -> list[str | None]:
        failures: list[str | None] = [None] * len(chunk.texts)
        alive = np.arange(len(chunk.texts))
        for name, measure_name, threshold in self._rules:
            measure = getattr(chunk, measure_name)
            if name in _NGRAM_RULES:
                assert isinstance(threshold, dict)
                for n in sorted(threshold):
                    if len(alive):
                        failed = measure(alive, n) > threshold[n]
                        alive = _reject(alive, failed, name, failures)
            elif len(alive):
                values = measure(alive)
                failed = values < threshold if name.startswith("min_") else values > threshold
                alive = _reject(alive, failed, name, failures)
        return failures


def _reject(
    alive: np.ndarray, failed: np.ndarray, rule: str, failures: list[str | None]
) -> np.ndarray:
    """Record `rule` as the failure of the documents `alive[failed]`; the others stay alive."""
    for i in alive[failed].tolist():
        failures[i] = rule
    return alive[~failed]


def _chunks(texts: Sequence[str]) -> Iterator[tuple[int, int]]:
    """Consecutive index ranges of `texts`, each of about `_CHUNK_CHARS` characters or one
    longer text."""
    start, chars = 0, 0
    for i, text in enumerate(texts):
        if i > start and chars + len(text) > _CHUNK_CHARS:
            yield start, i
            start, chars = i, 0
        chars += len(text) + 1
    if start < len(texts):
        yield start, len(texts)
