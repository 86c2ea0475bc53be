"""Gopher's quality rules (Rae et al. 2021, appendix A; datatrove's GopherQualityFilter): word
length, symbols, bullet and ellipsis lines, alphabetic words. Word counts are `LengthFilter`'s,
stop words `StopWordsFilter`'s."""

from __future__ import annotations

from .base import FilterStep


class GopherQualityFilter(FilterStep):
    name = "gopher_quality"
    RULES = (
        "min_mean_word_length",
        "max_mean_word_length",
        "max_symbol_word_ratio",
        "max_bullet_lines_ratio",
        "max_ellipsis_lines_ratio",
        "min_alpha_words_ratio",
    )
