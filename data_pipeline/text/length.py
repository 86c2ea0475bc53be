"""Document length: characters and words (`data.filters.min_chars` ... `max_words`)."""

from __future__ import annotations

from .base import FilterStep


class LengthFilter(FilterStep):
    name = "length"
    RULES = ("min_chars", "max_chars", "min_words", "max_words")
