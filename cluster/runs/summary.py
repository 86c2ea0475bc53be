"""One run directory at a glance: where it stands, how fast it goes, when it will finish.

`summarize` reads `config.yaml`, `metrics.jsonl` and `checkpoints/`; the scheduler code passes
the state it knows (pending, running, failed, ...), and without one a local state is inferred
from the files alone. `find_runs` lists the run directories under a folder.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

from .metrics import METRICS_FILE, eval_records, read_metrics, series, train_records

LOSS_WINDOW = 10  # `loss` is the mean of the last this-many finite training losses
RATE_WINDOW = 20  # tokens/s and step time are medians over the last this-many training steps
RUNNING_WITHIN_S = 120.0  # metrics written this recently: the run is taken to be running
SEARCH_DEPTH = 3
RUN_MARKERS = (METRICS_FILE, "submission.json", "checkpoints")


@dataclass(frozen=True)
class RunSummary:
    """What `kiln runs` and `kiln status` show for one run directory."""

    name: str
    path: Path
    state: str  # new | running | stopped | completed, or the scheduler's word
    step: int  # the last training step logged (or checkpointed, if later)
    total_steps: int | None  # train.steps
    loss: float | None  # mean of the last LOSS_WINDOW finite training losses
    val_loss: float | None  # the last finite validation loss
    val_ppl: float | None  # its perplexity
    tokens_per_s: float | None  # median of the last RATE_WINDOW training steps
    eta_s: float | None  # remaining steps x median step_time_s of the last RATE_WINDOW
    last_checkpoint: str | None  # tag in checkpoints/latest, e.g. "step_00000300"
    updated_at: datetime | None  # mtime of metrics.jsonl (UTC)

    @property
    def fraction_done(self) -> float | None:
        if not self.total_steps:
            return None
        return min(self.step / self.total_steps, 1.0)


def summarize(run_dir: str | Path, state: str | None = None) -> RunSummary:
    """Summarise `run_dir`; `state` (from the scheduler) wins over the inferred one."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train, evals = train_records(records), eval_records(records)
    total_steps = read_total_steps(run_dir)
    tag = latest_checkpoint(run_dir)
    checkpointed = checkpoint_step(run_dir, tag) if tag else None
    step = max([record["step"] for record in train] + [checkpointed or 0])
    mtime = _mtime(run_dir / METRICS_FILE)
    if state is None:
        state = infer_state(total_steps, checkpointed, mtime, has_metrics=bool(records))

    _, losses = series(train, "loss")
    _, val_losses = series(evals, "val_loss")
    _, val_ppls = series(evals, "val_ppl")
    recent = train[-RATE_WINDOW:]
    _, rates = series(recent, "tokens_per_s")
    _, step_times = series(recent, "step_time_s")
    eta_s = None
    if state == "completed":
        eta_s = 0.0
    elif total_steps is not None and step_times:
        eta_s = max(total_steps - step, 0) * statistics.median(step_times)
    return RunSummary(
        name=run_dir.name,
        path=run_dir,
        state=state,
        step=step,
        total_steps=total_steps,
        loss=statistics.fmean(losses[-LOSS_WINDOW:]) if losses else None,
        val_loss=val_losses[-1] if val_losses else None,
        val_ppl=val_ppls[-1] if val_ppls else None,
        tokens_per_s=statistics.median(rates) if rates else None,
        eta_s=eta_s,
        last_checkpoint=tag,
        updated_at=datetime.fromtimestamp(mtime, UTC) if mtime is not None else None,
    )


def infer_state(
    total_steps: int | None,
    checkpointed: int | None,
    metrics_mtime: float | None,
    has_metrics: bool,
    now: float | None = None,
) -> str:
    """completed (the latest checkpoint is the last step), running (metrics written in the
    last RUNNING_WITHIN_S seconds), stopped, or new (nothing logged or saved yet)."""
    if total_steps is not None and checkpointed is not None and checkpointed >= total_steps:
        return "completed"
    now = time.time() if now is None else now
    if metrics_mtime is not None and now - metrics_mtime <= RUNNING_WITHIN_S:
        return "running"
    if has_metrics or checkpointed is not None:
        return "stopped"
    return "new"


def read_total_steps(run_dir: Path) -> int | None:
    """`train.steps` of the run's resolved configuration; None if it cannot be read."""
    try:
        tree = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        steps = tree["train"]["steps"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return steps if type(steps) is int else None


def latest_checkpoint(run_dir: Path) -> str | None:
    """The tag in `checkpoints/latest` (e.g. "step_00000300"); None without one."""
    try:
        tag = (run_dir / "checkpoints" / "latest").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return tag or None


def checkpoint_step(run_dir: Path, tag: str) -> int | None:
    """The step a checkpoint holds: its trainer_state.json, else the number in its tag."""
    try:
        state = json.loads((run_dir / "checkpoints" / tag / "trainer_state.json").read_text())
        return int(state["step"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digits = tag.rpartition("_")[2]
    return int(digits) if digits.isdigit() else None


def find_runs(root: str | Path = "runs", depth: int = SEARCH_DEPTH) -> list[Path]:
    """Run directories at `root` or up to `depth` levels below it, sorted: those with a
    config.yaml and one of metrics.jsonl, submission.json or checkpoints/. Hidden folders
    and the inside of a run directory are not searched."""
    found: list[Path] = []
    _search(Path(root), depth, found)
    return sorted(found)


def _search(folder: Path, depth: int, found: list[Path]) -> None:
    if _is_run_dir(folder):
        found.append(folder)
        return
    if depth <= 0:
        return
    try:
        children = [child for child in folder.iterdir() if child.is_dir()]
    except OSError:
        return
    for child in children:
        if not child.name.startswith(".") and not child.is_symlink():
            _search(child, depth - 1, found)


def _is_run_dir(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() and any(
        (folder / marker).exists() for marker in RUN_MARKERS
    )


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None
