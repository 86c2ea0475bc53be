"""Repetition of word n-grams in a run of documents, Gopher's two n-gram measures as datatrove's
GopherRepetitionFilter computes them (Rae et al. 2021, appendix A), vectorised with numpy.

- Top n-gram character fraction: of the n-grams occurring at least twice in a document, the most
  frequent one (the first to occur among equally frequent ones): its characters (its words and
  the n - 1 single spaces between them) times its count, over the document's characters. A
  document in which no n-gram repeats scores 0.
- Duplicate n-gram character fraction: scanning the document's word positions from the start,
  an n-gram seen at an earlier scanned position is a repeat: its characters (its words', no
  separators) are counted and the scan jumps past it; otherwise the n-gram is remembered and the
  scan moves one word on. The repeats' characters, the first occurrences excluded and no
  character counted twice, over the document's characters.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .text_arrays import code_points, ratios, word_hashes

_NGRAM_BASE = 0xC2B2AE3D27D4EB4F


class _Level(NamedTuple):
    """The word n-grams of one size n that occur more than once in their document."""

    positions: np.ndarray  # int64, increasing: the first word of each such occurrence
    hashes: np.ndarray  # uint64: the n-gram hash at each of those positions
    top_chars: np.ndarray  # int64 per document: the top repeated n-gram's characters x count


class NgramIndex:
    """The n-grams of a run of documents, computed size by size.

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
        doc_chars: np.ndarray,
        docs: np.ndarray | None = None,
    ) -> None:
        """`hashes` (uint64): one per word, equal for equal words; `lengths`: the words'
        lengths; `doc_chars`: each document's length in characters, the denominator;
        `docs` (int64, non-decreasing): each word's document, all 0 when None."""
        self._hashes = hashes
        self._docs = np.zeros(len(hashes), np.int64) if docs is None else docs
        self._doc_chars = np.asarray(doc_chars, np.int64)
        self._n_docs = len(self._doc_chars)
        self._bounds = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))
        self._levels: dict[int, _Level] = {}

    @classmethod
    def of_text(cls, text: str) -> NgramIndex:
        """The index of one document: its words are `text.split()`."""
        words = text.split()
        lengths = np.fromiter(map(len, words), np.int64, len(words))
        ends = np.cumsum(lengths)
        hashes = word_hashes(code_points("".join(words)), ends - lengths, ends)
        return cls(hashes, lengths, np.array([len(text)]))

    def top_fractions(self, n: int, alive: np.ndarray | None = None) -> np.ndarray:
        """Per document: the top repeated n-gram's characters times its count, over the
        document's characters (0 without a repeated n-gram)."""
        return ratios(self._level(n, alive).top_chars, self._doc_chars)

    def duplicate_fractions(self, n: int, alive: np.ndarray | None = None) -> np.ndarray:
        """Per document: characters of the repeated n-grams the scan finds, over the
        document's characters."""
        level = self._level(n, alive)
        repeated = np.zeros(self._n_docs, np.int64)
        bounds = self._bounds
        current, seen, skip_until = -1, set(), -1
        # Only positions of n-grams occurring twice can be repeats, and only they change what
        # the scan remembers that matters: the scan is replayed over them alone.
        for position, value, doc in zip(
            level.positions.tolist(),
            level.hashes.tolist(),
            self._docs[level.positions].tolist(),
            strict=True,
        ):
            if doc != current:
                current, seen, skip_until = doc, set(), -1
            if position < skip_until:
                continue
            if value in seen:
                repeated[doc] += bounds[position + n] - bounds[position]
                skip_until = position + n
            else:
                seen.add(value)
        return ratios(repeated, self._doc_chars)

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

    def _within(self, positions: np.ndarray, n: int) -> np.ndarray:
        """Whether the n-grams at `positions` lie inside one document."""
        return self._docs[positions] == self._docs[positions + n - 1]

    def _full_level(self, n: int, alive: np.ndarray | None) -> _Level:
        count = max(len(self._hashes) - n + 1, 0)
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
        top_chars = np.zeros(self._n_docs, np.int64)
        order = np.lexsort((positions, hashes))  # equal n-grams together, in document order
        ordered = hashes[order]
        docs = self._docs[positions[order]]
        same = (ordered[1:] == ordered[:-1]) & (docs[1:] == docs[:-1])
        if not same.any():
            return _Level(positions[:0], hashes[:0], top_chars)
        repeated = np.zeros(len(order), bool)
        repeated[1:] = same
        repeated[:-1] |= same
        keep = np.empty_like(repeated)
        keep[order] = repeated
        starts = np.flatnonzero(np.concatenate(([True], ~same)))
        counts = np.diff(np.append(starts, len(order)))
        starts, counts = starts[counts > 1], counts[counts > 1]
        group_docs = docs[starts]
        firsts = positions[order[starts]]  # each repeated n-gram's first occurrence
        # The most frequent per document, and among those the one occurring first.
        most = np.zeros(self._n_docs, np.int64)
        np.maximum.at(most, group_docs, counts)
        best = counts == most[group_docs]
        earliest = np.full(self._n_docs, np.iinfo(np.int64).max)
        np.minimum.at(earliest, group_docs[best], firsts[best])
        chosen = best & (firsts == earliest[group_docs])
        words = self._bounds[firsts + n] - self._bounds[firsts]
        top_chars[group_docs[chosen]] = (counts * (words + n - 1))[chosen]
        return _Level(positions[keep], hashes[keep], top_chars)


def top_ngram_char_fraction(text: str, n: int) -> float:
    """The top repeated word n-gram's characters times its count, over `len(text)`."""
    return float(NgramIndex.of_text(text).top_fractions(n)[0])


def duplicate_ngram_char_fraction(text: str, n: int) -> float:
    """Characters of the repeated word n-grams (first occurrences excluded), over `len(text)`."""
    return float(NgramIndex.of_text(text).duplicate_fractions(n)[0])
