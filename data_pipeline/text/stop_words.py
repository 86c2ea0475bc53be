"""Gopher's stop-word rule: a document keeps at least `min_stop_words` occurrences of the
`stop_words` (the, be, to, of, and, that, have, with): real English prose always does."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import FilterConfig
from .base import FilterStep
from .measures import TextMeasures


class StopWordsFilter(FilterStep):
    name = "stop_words"
    RULES = ("min_stop_words",)

    def __init__(self, cfg: FilterConfig) -> None:
        super().__init__(cfg)
        self.stop_words = list(cfg.stop_words)

    def measure(
        self, rule: str, measures: TextMeasures, docs: np.ndarray, *args: Any
    ) -> np.ndarray:
        return measures.stop_words(docs, self.stop_words)
