"""Checkpoints that resume exactly, under the same layout or another, and are never
half-written under a final name.

    checkpoints/
      latest                     the tag of the newest complete checkpoint, replaced atomically
      step_00000300/
        <DeepSpeed's files>      model, optimizer and ZeRO partitions (what a resume under the
                                 same layout loads: bit-identical continuation)
        model/, optimizer/       the same weights and Adam state under canonical names, split
                                 only by TP and PP (`weights.py`): what generation, evaluation,
                                 export and a resume under another layout read
        rng/rank_00000.pt        every rank's torch, numpy and Python random states
        trainer_state.json       step, consumed samples, skipped steps
        config.yaml, tokenizer.json
                                 the resolved configuration and the run's tokenizer
      .staging/                  a checkpoint being written
      .trash/                    old checkpoints, renamed here and deleted in the background
      last_save.json             the last save's step and seconds, and the step's seconds

Every rank writes into `.staging/<tag>`; after a barrier rank 0 renames the directory into
place and only then points `latest` at it, so a crash at any moment leaves the previous
checkpoint as the latest. The last `checkpoint.keep` checkpoints are kept; older ones are
renamed into `.trash/` and deleted by a background thread while training goes on.

A run resumes from DeepSpeed's files when the checkpoint was written by the same layout (TP,
PP, DP, ZeRO stage, precision); otherwise it reshards: every rank slices the canonical weights
and Adam state for its own place in the new layout (`Resume.reshard`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline import atomic

from .weights import CheckpointError, save_layout_independent

TRASH = ".trash"  # old checkpoints being deleted
SAVE_RECORD = "last_save.json"  # how long the last save took; `cluster.grace` reads it
FAULT_ENV = "KILN_TEST_FAULT"  # fault injection for the crash tests, see fault_active


@dataclass
class TrainerState:
    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0

    @classmethod
    def read(cls, checkpoint: Path) -> TrainerState:
        return cls(**json.loads((Path(checkpoint) / "trainer_state.json").read_text()))


@dataclass
class Resume:
    """Where a run continues from, and whether the layout changed since (`reshard`)."""

    checkpoint: Path
    reshard: bool
    written_by: dict


def layout_of(cfg) -> dict:
    """What makes DeepSpeed's own files loadable: the same values in `model/layout.json`."""
    return {
        "tensor": cfg.parallel.tensor,
        "pipeline": cfg.parallel.pipeline,
        "data": cfg.parallel.data,
        "zero_stage": cfg.parallel.zero_stage,
        "precision": cfg.train.precision,
    }


def describe_layout(layout: dict) -> str:
    return (
        f"TP {layout.get('tensor')} x PP {layout.get('pipeline')} x DP {layout.get('data')} "
        f"(ZeRO {layout.get('zero_stage')}, {layout.get('precision')})"
    )


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointManager:
    def __init__(self, run_dir: Path, keep: int, interval: int = 0) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.interval = interval
        # Deleting old checkpoints (terabytes at 70B) runs beside training, one at a time.
        self._deleter: ThreadPoolExecutor | None = None

    def due(self, step: int, last_saved: int | None, stopping: bool = False) -> bool:
        """Whether the loop should save after `step`: every `interval` steps, and when the run
        stops (a signal or the last step), unless `step` is already saved."""
        if step == last_saved:
            return False
        return stopping or bool(self.interval and step % self.interval == 0)

    # -- reading ---------------------------------------------------------------------------
    def latest(self) -> Path | None:
        """The latest complete checkpoint as this process sees it (for messages)."""
        return latest_checkpoint(self.root)

    def agreed_latest(self) -> Path | None:
        """The latest checkpoint as rank 0 sees it, the same tag on every rank: nodes can see
        shared storage at different moments, and a run resumed from two tags would diverge."""
        path = self.latest() if not dist.is_initialized() or dist.get_rank() == 0 else None
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return path
        tag = [path.name if path is not None else None]
        dist.broadcast_object_list(tag, src=0)
        if tag[0] is None:
            return None
        agreed = self.root / tag[0]
        if not (agreed / "trainer_state.json").is_file():
            raise CheckpointError(
                f"rank {dist.get_rank()} does not see checkpoint {agreed}, which rank 0 resumes "
                "from: the run directory must be on storage every node mounts"
            )
        return agreed

    def resume(self, cfg) -> Resume | None:
        """The latest checkpoint (rank 0's `latest`, on every rank) and how to load it; None
        when the run starts afresh."""
        path = self.agreed_latest()
        if path is None:
            return None
        layout_file = path / "model" / "layout.json"
        if not layout_file.is_file():
            raise CheckpointError(f"{path}: no model/layout.json, not a Kiln checkpoint")
        written_by = json.loads(layout_file.read_text())
        same = bool(written_by.get("deepspeed")) and all(
            written_by.get(key) == value for key, value in layout_of(cfg).items()
        )
        return Resume(path, reshard=not same, written_by=written_by)

    def load(self, train_engine, path: Path) -> TrainerState:
        """Restore model, optimizer and random states from DeepSpeed's files (same layout)."""
        engine = train_engine.engine
        loaded, _ = engine.load_checkpoint(
            str(self.root),
            tag=path.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_strict=True,
        )
        if loaded is None:
            raise RuntimeError(f"{path}: DeepSpeed could not load this checkpoint")
        rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
        if rng_file.is_file():
            restore_rng(torch.load(rng_file, weights_only=False))
        return TrainerState.read(path)

    # -- writing ---------------------------------------------------------------------------
    def save(
        self,
        train_engine,
        state: TrainerState,
        config_yaml: str,
        reshardable: bool = True,
        step_seconds: float = 0.0,
    ) -> Path:
        """Write the checkpoint of `state` and make it the latest; record how long the save
        and the step before it took (`last_save.json`, read by `kiln submit` to size the
        schedulers' stop lead time, see `cluster.grace`)."""
        started = time.perf_counter()
        rank = dist.get_rank()
        tag = tag_of(state.step)
        staging = self.root / ".staging"
        final = self.root / tag
        if rank == 0:
            shutil.rmtree(staging / tag, ignore_errors=True)
            (staging / tag).mkdir(parents=True, exist_ok=True)
        dist.barrier()
        train_engine.engine.save_checkpoint(str(staging), tag=tag, save_latest=False)
        save_layout_independent(train_engine, staging / tag, with_optimizer=reshardable)
        rng_dir = staging / tag / "rng"
        rng_dir.mkdir(parents=True, exist_ok=True)
        torch.save(capture_rng(), rng_dir / f"rank_{rank:05d}.pt")
        if rank == 0:
            atomic.write_json(staging / tag / "trainer_state.json", asdict(state))
            atomic.write_text(staging / tag / "config.yaml", config_yaml)
            tokenizer = self.root.parent / "tokenizer.json"
            if tokenizer.is_file():
                shutil.copyfile(tokenizer, staging / tag / "tokenizer.json")
        fault_point("kill-during-save", state.step)
        dist.barrier()
        if rank == 0:
            if final.exists():  # saved at this step before (a resumed run's first save)
                shutil.rmtree(final)
            os.replace(staging / tag, final)
            atomic.write_text(self.root / "latest", tag + "\n")
            self.prune()
        dist.barrier()
        if rank == 0:
            record = {
                "step": state.step,
                "save_s": round(time.perf_counter() - started, 3),
                "step_s": round(step_seconds, 3),
            }
            atomic.write_json(self.root / SAVE_RECORD, record)
        return final

    def prune(self) -> None:
        """Keep the newest `keep` checkpoints: older ones are moved into `.trash/` at once (a
        rename, so no half-deleted checkpoint stays under its name) and deleted in the
        background."""
        complete = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        trash = self.root / TRASH
        for old in complete[: -self.keep]:
            trash.mkdir(exist_ok=True)
            os.replace(old, trash / f"{old.name}.{time.time_ns()}")
        if not trash.is_dir():
            return
        if self._deleter is None:
            self._deleter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-prune")
        self._deleter.submit(_empty, trash)  # queued behind a deletion under way

    def close(self) -> None:
        """Wait for a deletion under way (the process should not exit in the middle)."""
        if self._deleter is not None:
            self._deleter.shutdown(wait=True)
            self._deleter = None


def _empty(directory: Path) -> None:
    """Delete what `directory` holds (what cannot be deleted is left for the next prune)."""
    for entry in list(directory.iterdir()):
        shutil.rmtree(entry, ignore_errors=True)


def resolve_checkpoint(path: Path) -> Path:
    """A run directory means its latest checkpoint; a checkpoint directory means itself."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(f"{path}: no checkpoint there (expected a run directory or step_*)")


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` names under `root` (a run's `checkpoints/`), if complete."""
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if (path / "trainer_state.json").is_file() else None


def fault_active(name: str, step: int) -> bool:
    """Whether the crash tests asked for fault `name` at `step`: KILN_TEST_FAULT holds
    comma-separated `name@STEP`, `name@FIRST-LAST` or `name@FIRST-` items."""
    for item in os.environ.get(FAULT_ENV, "").split(","):
        fault, _, steps = item.strip().partition("@")
        if fault != name or not steps:
            continue
        first, dash, last = steps.partition("-")
        low = int(first)
        high = (int(last) if last else step) if dash else low
        if low <= step <= high:
            return True
    return False


def fault_point(name: str, step: int) -> None:
    """Die here, as a power cut would, when the crash tests ask for it."""
    if fault_active(name, step):
        os.kill(os.getpid(), signal.SIGKILL)


def capture_rng() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
