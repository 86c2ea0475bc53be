"""The document filters, as one object: the filter steps in order over chunks of documents.

`RULE_ORDER` is the order in which the rules are tried, step by step (length, Gopher quality,
stop words, Gopher repetition); a document leaves at its first failed rule. Documents are
checked in chunks of about 256k characters: the word measures are computed for a whole chunk
with a few numpy calls, the line, paragraph and n-gram measures only for the documents that
passed every earlier rule. A document's result never depends on the other documents of its
batch. What each rule measures: `text.measures` and `text.ngrams`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from data_pipeline.config import FilterConfig

from .base import DocumentBatch, FilterStep
from .gopher_quality import GopherQualityFilter
from .gopher_repetition import GopherRepetitionFilter
from .length import LengthFilter
from .measures import BULLETS, TextMeasures
from .ngrams import NgramIndex, duplicate_ngram_char_fraction, top_ngram_char_fraction
from .stop_words import StopWordsFilter
from .text_arrays import Powers

__all__ = [
    "BULLETS",
    "FILTER_STEPS",
    "RULE_ORDER",
    "NgramIndex",
    "QualityFilter",
    "duplicate_ngram_char_fraction",
    "top_ngram_char_fraction",
]

FILTER_STEPS: tuple[type[FilterStep], ...] = (
    LengthFilter,
    GopherQualityFilter,
    StopWordsFilter,
    GopherRepetitionFilter,
)
RULE_ORDER: tuple[str, ...] = tuple(rule for step in FILTER_STEPS for rule in step.RULES)
"""The order in which the rules are tried; the first one failed is reported."""

CHUNK_CHARS = 1 << 18  # numpy calls are paid per chunk; a chunk's arrays stay in cache


class QualityFilter:
    """The filter steps of a `FilterConfig`, each counting what it removed."""

    def __init__(self, cfg: FilterConfig) -> None:
        unknown = sorted(set(cfg.active_rules()) - set(RULE_ORDER))
        if unknown:
            raise ValueError(f"no quality rule implements {', '.join(unknown)}")
        self.steps = [step(cfg) for step in FILTER_STEPS]
        self._powers = Powers.of_size(CHUNK_CHARS + 1)  # enough for every chunk but one text

    def first_failure(self, text: str) -> str | None:
        """The name of the first rule `text` fails, or None when it passes them all."""
        return self.check_batch([text])[0]

    def check_batch(self, texts: list[str]) -> list[str | None]:
        """`first_failure` of each text, computed for many at once."""
        return [rule for batch in self.filtered(texts) for rule in batch.removed_by]

    def filtered(self, texts: Sequence[str]) -> Iterator[DocumentBatch]:
        """The texts in chunks, each through every step: which are left, and why the others
        are not; the chunk's measures stay available for what comes after the filters."""
        active = [step for step in self.steps if step.active]
        for start, stop in _chunks(texts):
            chunk = list(texts[start:stop])
            batch = DocumentBatch(chunk, TextMeasures(chunk, self._powers))
            for step in active:
                step.apply(batch)
            yield batch

    def reports(self) -> list[dict[str, Any]]:
        """Each step's counts: documents seen, and removed per rule."""
        return [step.report() for step in self.steps]


def _chunks(texts: Sequence[str]) -> Iterator[tuple[int, int]]:
    """Consecutive index ranges of `texts`, each of about `CHUNK_CHARS` characters or one
    longer text."""
    start, chars = 0, 0
    for i, text in enumerate(texts):
        if i > start and chars + len(text) > CHUNK_CHARS:
            yield start, i
            start, chars = i, 0
        chars += len(text) + 1
    if start < len(texts):
        yield start, len(texts)
