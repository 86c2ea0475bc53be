"""What the cleaning steps share: the documents flowing through them, and the shape of a filter.

Like datatrove's pipeline steps, each step is a small object that holds its own counts: the
documents it saw and, for a filter, how many each of its rules removed. The clean stage runs
the steps in order over batches of documents and reports every step's counts, which the
manifest lists as they are.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from ..config import FilterConfig
from .measures import TextMeasures


class DocumentBatch:
    """Documents going through the filters together: their texts, the measures they share,
    which are still in (`alive`, indices into `texts`) and, for the others, the rule that
    removed them."""

    def __init__(self, texts: list[str], measures: TextMeasures | None = None) -> None:
        self.texts = texts
        self.measures = measures if measures is not None else TextMeasures(texts)
        self.alive = np.arange(len(texts))
        self.removed_by: list[str | None] = [None] * len(texts)

    def remove(self, failed: np.ndarray, rule: str) -> int:
        """Remove the alive documents `alive[failed]`, removed by `rule`; return how many."""
        for index in self.alive[failed].tolist():
            self.removed_by[index] = rule
        self.alive = self.alive[~failed]
        return int(failed.sum())


class FilterStep:
    """A filter: the rules it owns (`FilterConfig` fields, tried in `RULES` order; `None`
    switches one off), each comparing a measure with its threshold. A document leaves at its
    first failed rule, which is counted."""

    name = "filter"
    RULES: tuple[str, ...] = ()

    def __init__(self, cfg: FilterConfig) -> None:
        active = cfg.active_rules()
        self.rules = [(rule, active[rule]) for rule in self.RULES if rule in active]
        self.seen = 0
        self.removed: Counter[str] = Counter()

    @property
    def active(self) -> bool:
        return bool(self.rules)

    def apply(self, batch: DocumentBatch) -> None:
        self.seen += len(batch.alive)
        for rule, threshold in self.rules:
            if not len(batch.alive):
                return
            if isinstance(threshold, dict):  # an n-gram rule: its sizes in increasing order
                for n in sorted(threshold):
                    if len(batch.alive):
                        values = self.measure(rule, batch.measures, batch.alive, n)
                        self.removed[rule] += batch.remove(values > threshold[n], rule)
                continue
            values = self.measure(rule, batch.measures, batch.alive)
            failed = values < threshold if rule.startswith("min_") else values > threshold
            self.removed[rule] += batch.remove(failed, rule)

    def measure(
        self, rule: str, measures: TextMeasures, docs: np.ndarray, *args: Any
    ) -> np.ndarray:
        """The values rule `rule` bounds: the `TextMeasures` measure named after it."""
        name = rule.removeprefix("min_").removeprefix("max_")
        return getattr(measures, name)(docs, *args)

    def report(self) -> dict[str, Any]:
        removed = {rule: count for rule, count in sorted(self.removed.items()) if count}
        return {"step": self.name, "in": self.seen, "removed": removed}
