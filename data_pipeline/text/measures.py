"""The measures the cleaning steps compare with their thresholds, for a run of documents at once.

`TextMeasures` computes each measure on first use, for the documents a step asks about, and
keeps it: the filter steps share the word split, the character classes and the n-gram index,
and a document's values never depend on the other documents of the run.

Definitions (a rule of `FilterConfig` is named after the measure it bounds):

- A *word* is a maximal run of non-whitespace characters (`str.isspace`): the tokens of
  `text.split()`. `words` counts them; `chars` is `len(text)`.
- `mean_word_length` counts, in each word, the characters that are neither punctuation nor
  symbols (Unicode categories P* and S*), and averages over the words holding at least one such
  character: "Hello," is 5 long and a lone "--" is left out.
- `symbol_word_ratio`: (count of "#" + count of "..." + count of "…") / words.
- `alpha_words_ratio`: words holding a character with `str.isalpha()` / words.
- `stop_words`: how many words, with the punctuation at their ends removed, are one of the stop
  words (compared exactly: "The" is not "the", as in Gopher's reference implementations).
- A *line* is a piece of `text.split("\\n")` holding a non-whitespace character (blank lines
  are not lines). A bullet line starts, after its leading whitespace, with one of `BULLETS`; an
  ellipsis line ends, before its trailing whitespace, with "..." or "…".
- A *paragraph* is a piece of the text between blank lines (split on `\\n\\s*\\n`, which is
  `\\n\\n+` for normalised text) holding a non-whitespace character.
- A line (paragraph) is *repeated* when an equal one, compared exactly, comes earlier:
  `duplicate_line_fraction` is repeated lines / lines, `duplicate_line_char_fraction` the
  characters of the repeated lines / `len(text)`; the same for paragraphs.
- `top_ngram_char_fraction` and `duplicate_ngram_char_fraction`: see `text.ngrams`; both over
  `len(text)`.

A ratio whose denominator is zero (no words, lines, paragraphs or characters) is 0.0.

For near-duplicate detection, `dedup_words` gives each document's *normalised words*: the text
lower-cased, punctuation and symbols deleted, then split on whitespace, as 64-bit hashes, so
that the same words re-wrapped, re-indented or re-punctuated give the same sequence.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cached_property
from itertools import compress
from typing import NamedTuple

import numpy as np

from .ngrams import NgramIndex
from .text_arrays import (
    LETTER,
    PUNCT,
    SPACE,
    WORD_CHAR,
    Powers,
    char_classes,
    code_points,
    hash_words,
    ratios,
    runs,
    word_hashes,
)

BULLETS: tuple[str, ...] = ("•", "‣", "◦", "⁃", "●", "○", "-", "*", "·")
_ASCII_BULLETS = tuple(bullet for bullet in BULLETS if bullet.isascii())
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


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


class TextMeasures:
    """The measures of some documents, each computed on first use. A measure takes the
    indices of the documents it is wanted for and returns one value for each."""

    def __init__(self, texts: Sequence[str], powers: Powers | None = None) -> None:
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
        return code_points(self._joined)

    @cached_property
    def _classes(self) -> np.ndarray:
        return char_classes(self._joined, self._codes)

    @cached_property
    def _words(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Start and end of each word in the joined text, its document, and the index of each
        document's first word (with the count of all words at the end)."""
        starts, ends = runs((self._classes & SPACE) == 0)
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
        punctuation = np.concatenate(([0], np.cumsum((self._classes & PUNCT) > 0)))
        ends_of_docs = self._offsets + self._lengths
        punctuation_chars = punctuation[ends_of_docs] - punctuation[self._offsets]
        word_chars = self._per_doc_words(ends - starts) - punctuation_chars
        mean_length = ratios(word_chars, self._per_doc_words((bits & WORD_CHAR) > 0))
        alpha = ratios(self._per_doc_words((bits & LETTER) > 0), n_words)
        return n_words, mean_length, alpha

    def chars(self, docs: np.ndarray) -> np.ndarray:
        return self._lengths[docs]

    def words(self, docs: np.ndarray) -> np.ndarray:
        return self._word_measures[0][docs]

    def mean_word_length(self, docs: np.ndarray) -> np.ndarray:
        return self._word_measures[1][docs]

    def alpha_words_ratio(self, docs: np.ndarray) -> np.ndarray:
        return self._word_measures[2][docs]

    def symbol_word_ratio(self, docs: np.ndarray) -> np.ndarray:
        texts = [self.texts[i] for i in docs.tolist()]
        symbols = [text.count("#") + text.count("...") + text.count("…") for text in texts]
        return ratios(symbols, self.words(docs))

    def stop_words(self, docs: np.ndarray, stop_words: Sequence[str]) -> np.ndarray:
        """Per document: words that are stop words once the punctuation at their ends is off."""
        starts, ends, word_docs, _ = self._words
        solid = (self._classes & PUNCT) == 0  # a word character (whitespace is never in a word)
        # The first and last non-punctuation character of each word, by the position of the next
        # (previous) such character from every position.
        position = np.arange(len(solid))
        following = np.minimum.accumulate(np.where(solid, position, len(solid))[::-1])[::-1]
        preceding = np.maximum.accumulate(np.where(solid, position, -1))
        first = following[starts] if len(starts) else starts
        last = preceding[ends - 1] + 1 if len(ends) else ends
        stripped = first < ends
        hashes = word_hashes(self._codes, first[stripped], last[stripped], self._powers)
        found = np.isin(hashes, hash_words(list(stop_words)))
        counts = np.bincount(word_docs[stripped][found], minlength=len(self.texts))
        return counts[docs]

    def _line_stats(self, docs: np.ndarray) -> list[_LineStats]:
        for i in docs.tolist():
            if i not in self._lines:
                self._lines[i] = _LineStats.of(self.texts[i])
        return [self._lines[i] for i in docs.tolist()]

    def _line_ratios(self, docs: np.ndarray, field: str, per_chars: bool = False) -> np.ndarray:
        stats = self._line_stats(docs)
        whole = self.chars(docs) if per_chars else [s.lines for s in stats]
        return ratios([getattr(s, field) for s in stats], whole)

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
        return ratios([s.repeated for s in stats], [s.paragraphs for s in stats])

    def duplicate_paragraph_char_fraction(self, docs: np.ndarray) -> np.ndarray:
        stats = self._paragraph_stats(docs)
        return ratios([s.repeated_chars for s in stats], self.chars(docs))

    def _ngram_index(self, docs: np.ndarray) -> NgramIndex:
        """The n-gram index of the documents `docs`, built on first use (later calls pass
        fewer documents, all among the first ones)."""
        if self._index is None:
            starts, ends, word_docs, _ = self._words
            hashes = word_hashes(self._codes, starts, ends, self._powers)
            lengths = ends - starts
            if len(docs) < len(self.texts):
                wanted = self._alive(docs)[word_docs]
                hashes, lengths, word_docs = hashes[wanted], lengths[wanted], word_docs[wanted]
            self._index = NgramIndex(hashes, lengths, self._lengths, word_docs)
        return self._index

    def _alive(self, docs: np.ndarray) -> np.ndarray:
        alive = np.zeros(len(self.texts), bool)
        alive[docs] = True
        return alive

    def top_ngram_char_fraction(self, docs: np.ndarray, n: int) -> np.ndarray:
        return self._ngram_index(docs).top_fractions(n, self._alive(docs))[docs]

    def duplicate_ngram_char_fraction(self, docs: np.ndarray, n: int) -> np.ndarray:
        return self._ngram_index(docs).duplicate_fractions(n, self._alive(docs))[docs]

    def dedup_words(self, docs: np.ndarray) -> list[np.ndarray]:
        """Per document of `docs`: the 64-bit hashes of its normalised words (lower case,
        punctuation and symbols deleted, split on whitespace)."""
        if self._codes.dtype == np.uint8:  # ASCII: lower-case the code points already made
            codes = self._codes.copy()
            codes[(codes >= 65) & (codes <= 90)] += 32
            hashes, firsts = _normalised_words(codes, self._classes, self._offsets)
            return [hashes[firsts[i] : firsts[i + 1]] for i in docs.tolist()]
        lowered = [self.texts[i].lower() for i in docs.tolist()]  # may change lengths
        lengths = np.fromiter(map(len, lowered), np.int64, len(lowered))
        joined = "\n".join(lowered)
        codes = code_points(joined)
        offsets = np.concatenate(([0], np.cumsum(lengths + 1)))[:-1]
        hashes, firsts = _normalised_words(codes, char_classes(joined, codes), offsets)
        return [hashes[firsts[i] : firsts[i + 1]] for i in range(len(lowered))]


def _normalised_words(
    codes: np.ndarray, classes: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the words of a joined text (documents starting at `offsets`) with their
    punctuation and symbols deleted ("don't" is "dont"; words left empty are dropped), and the
    index of each document's first word (the word count at the end)."""
    kept = (classes & PUNCT) == 0
    position = np.concatenate(([0], np.cumsum(kept)))  # index among the kept characters
    starts, ends = runs((classes & SPACE) == 0)
    starts, ends = position[starts], position[ends]
    nonempty = ends > starts
    starts, ends = starts[nonempty], ends[nonempty]
    hashes = word_hashes(codes[kept], starts, ends)
    firsts = np.searchsorted(starts, np.append(position[offsets], position[-1] + 1))
    return hashes, firsts
