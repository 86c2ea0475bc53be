"""Reading run directories: metrics, one-line summaries, reports with plots, CLI rendering.

`metrics` and `summary` need only the standard library and yaml; `report` (matplotlib) and
`render` (rich) are imported from their own modules by the commands that use them.
"""

from .metrics import eval_records, read_metrics, series, train_records
from .summary import RunSummary, find_runs, summarize

__all__ = [
    "RunSummary",
    "eval_records",
    "find_runs",
    "read_metrics",
    "series",
    "summarize",
    "train_records",
]
