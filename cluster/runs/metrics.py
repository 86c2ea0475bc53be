"""`metrics.jsonl` as records: one dict per logged line, training and evaluation steps apart.

Rank 0 appends one JSON object per line; a killed run can leave its last line torn, and NaN or
Inf is written as null. Reading skips lines that are not whole JSON objects with an integer
`step`, so a run can be read while it is being written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"

Record = dict[str, Any]


def read_metrics(run_dir: str | Path) -> list[Record]:
    """Every whole record of `run_dir/metrics.jsonl` in file order; [] when there is none."""
    path = Path(run_dir) / METRICS_FILE
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and type(record.get("step")) is int:
            records.append(record)
    return records


def train_records(records: Iterable[Record]) -> list[Record]:
    """Training steps (those with a `loss` key, null for a skipped step), one per step
    (the last line wins), ordered by step."""
    return _last_per_step(record for record in records if "loss" in record)


def eval_records(records: Iterable[Record]) -> list[Record]:
    """Evaluation steps (those with a `val_loss` key), one per step, ordered by step."""
    return _last_per_step(record for record in records if "val_loss" in record)


def series(records: Iterable[Record], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records whose `key` is a finite number."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if is_finite(value):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def is_finite(value: Any) -> bool:
    """A finite int or float (null, booleans and strings are not)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_skipped(record: Record) -> bool:
    """A training step whose update was skipped (non-finite loss or gradient)."""
    return bool(record.get("skipped")) or record.get("loss") is None


def _last_per_step(records: Iterable[Record]) -> list[Record]:
    by_step = {record["step"]: record for record in records}
    return [by_step[step] for step in sorted(by_step)]
