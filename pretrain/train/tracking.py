"""Where metrics go: `metrics.jsonl` in the run directory, TensorBoard and Weights & Biases.

`MetricsLog` appends one JSON object per line and flushes it, so a crash loses no line it
wrote; on resume, `truncate_after(step)` drops the lines past the checkpoint so each step is
logged once. `TensorBoardSink` writes event files under `run_dir/tensorboard`; a resumed run
first marks the steps past its checkpoint as purged (`SummaryWriter`'s purge_step), so
TensorBoard shows each step once. `WandbTracker` wraps `wandb` (imported only when W&B is on);
its run id lives in `run_dir/wandb_run_id`, so a resumed run continues the same W&B run. Call
them on one rank.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from pretrain.config.schema import WandbConfig

RUN_ID_FILE = "wandb_run_id"
RUN_ID_ALPHABET = string.ascii_lowercase + string.digits


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats as None and tensor or numpy scalars as numbers."""
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Append-only JSON lines, one object per logged step."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Append {"step": step, **metrics} as one line and flush it."""
        line = json.dumps(json_safe({"step": step, **metrics}), allow_nan=False)
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(line + "\n")
        self._file.flush()

    def truncate_after(self, step: int) -> None:
        """Drop the lines whose step is past `step` (and a torn last line), atomically."""
        self.close()
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or record.get("step", step) <= step:
                kept.append(line + "\n")
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as out:
            out.writelines(kept)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class TensorBoardSink:
    """Scalars in TensorBoard event files, flushed at every step so that a dashboard shows
    them live. `start_step`: the checkpoint a run resumed from (0: a fresh start); events of
    later steps that an earlier session wrote are purged, as they are about to be rewritten."""

    def __init__(self, log_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Each finite number (booleans as 0/1) as a scalar of its own name."""
        for key, value in json_safe(metrics).items():
            if isinstance(value, bool | int | float) and value is not None:
                self.writer.add_scalar(key, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run, or nothing when `logging.wandb.mode` is `disabled`."""

    def __init__(self, run: Any = None) -> None:
        self.run = run

    @classmethod
    def start(
        cls,
        run_dir: Path,
        cfg: WandbConfig,
        config_dict: dict[str, Any],
        run_id: str | None = None,
    ) -> WandbTracker:
        """Start or resume the run whose id is `run_id`, else the one in
        `run_dir/wandb_run_id`, else a new one. Files go under `run_dir/wandb`."""
        if cfg.mode == "disabled":
            return cls()
        import wandb

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        run_id = run_id or read_run_id(run_dir) or new_run_id()
        write_run_id(run_dir, run_id)
        run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name,
            mode=cfg.mode,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            config=config_dict,
            settings=wandb.Settings(silent=True),
        )
        return cls(run)

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log the metrics that have a value (None means not measured this step)."""
        if self.run is None:
            return
        values = {key: value for key, value in metrics.items() if value is not None}
        self.run.log(values, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def new_run_id(length: int = 8) -> str:
    """A random W&B run id (wandb's own `generate_id` is not public API in wandb 0.31)."""
    return "".join(secrets.choice(RUN_ID_ALPHABET) for _ in range(length))


def read_run_id(run_dir: Path) -> str | None:
    path = run_dir / RUN_ID_FILE
    if not path.exists():
        return None
    return path.read_text(encoding="utf-8").strip() or None


def write_run_id(run_dir: Path, run_id: str) -> None:
    """Persist `run_id` atomically (temporary name, then rename), unless already there."""
    if read_run_id(run_dir) == run_id:
        return
    tmp = run_dir / f".{RUN_ID_FILE}.tmp"
    tmp.write_text(run_id + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / RUN_ID_FILE)
