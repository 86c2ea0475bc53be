"""Gopher's repetition rules (Rae et al. 2021, appendix A; datatrove's GopherRepetitionFilter),
in its order: repeated paragraphs and lines (their share, and their characters' share), then the
top repeated 2-4-gram and the repeated 5-10-grams' characters (see `text.ngrams`)."""

from __future__ import annotations

from .base import FilterStep


class GopherRepetitionFilter(FilterStep):
    name = "gopher_repetition"
    RULES = (
        "max_duplicate_paragraph_fraction",
        "max_duplicate_paragraph_char_fraction",
        "max_duplicate_line_fraction",
        "max_duplicate_line_char_fraction",
        "max_top_ngram_char_fraction",
        "max_duplicate_ngram_char_fraction",
    )
