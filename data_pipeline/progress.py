"""A live progress display for the pipeline's stages: tasks done, and documents, tokens or pairs
per second. Off (silent) when not wanted, e.g. in tests or when stdout is not a terminal."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)


class StageProgress:
    """One bar per stage; `advance(task, tasks, amount)` counts finished tasks and the stage's
    unit (documents, tokens, pairs, edges)."""

    def __init__(self, enabled: bool, console: Console | None = None) -> None:
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description:<22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("tasks"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
            disable=not enabled,
        )
        self._amounts: dict[TaskID, int] = {}
        self._units: dict[TaskID, str] = {}

    def __enter__(self) -> StageProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def stage(self, description: str, total: int, unit: str) -> TaskID:
        task = self._progress.add_task(description, total=total, rate="")
        self._amounts[task] = 0
        self._units[task] = unit
        return task

    def advance(self, task: TaskID, parts: int, amount: int) -> None:
        self._amounts[task] += amount
        elapsed = self._progress.tasks[task].elapsed or 0.0
        rate = self._amounts[task] / elapsed if elapsed > 0 else 0.0
        text = f"{self._amounts[task]:,} {self._units[task]} ({rate:,.0f}/s)"
        self._progress.update(task, advance=parts, rate=text)

    def extend(self, task: TaskID, tasks: int) -> None:
        """A stage found more work (another round of tasks)."""
        total = self._progress.tasks[task].total or 0
        self._progress.update(task, total=total + tasks)
