"""Checkpoints that resume exactly, under the same layout or another, written once by every
rank in parallel while training goes on, and never half-written under a final name.

    checkpoints/
      latest                     the tag of the newest complete checkpoint, replaced atomically
      step_00000300/
        .metadata, __N_0.distcp  the training state, one DCP file per rank (`state_pieces`):
                                 fp32 weights (the master weights of a bf16/fp16 run) and
                                 Adam's moments under canonical names, each byte once, and
                                 every rank's torch, numpy and Python random states
        checkpoint.json          format, the layout that wrote it, Adam's step, loss scale
        trainer_state.json       step, consumed samples, skipped steps
        config.yaml, tokenizer.json
                                 the resolved configuration and the run's tokenizer
      .staging/                  a checkpoint being written
      .trash/                    old checkpoints, renamed here and deleted in the background
      last_save.json             the last save's step, its seconds, the step's seconds

A save copies this rank's share of the state to host memory (the training stall) and writes
it in a background thread (`checkpoint.async`, on by default) with DCP over a process group
of its own, into `.staging/<tag>`. Once every rank has written, rank 0 adds the small files,
renames the directory into place and only then points `latest` at it: a crash at any moment
leaves the previous checkpoint as the latest. At most one save is in flight; a save when the
run stops, and the end of the run, wait for it. The last `checkpoint.keep` checkpoints are
kept; older ones are renamed into `.trash/` and deleted in the background.

A resume reads, on every rank, only the regions of each tensor its place in the (possibly
different) layout holds: TP, PP, DP, ZeRO stage and precision may all change.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from data_pipeline import atomic

from . import fault_injection
from .dcp_io import Region, load_regions, save_chunks
from .optimizer_state import OptimizerState
from .state_pieces import MODEL, StateLayout, optimizer_kinds, rank_pieces
from .weights import (
    DESCRIPTION,
    FORMAT,
    CheckpointError,
    load_engine_state,
    load_module_weights,
    read_description,
)

TRASH = ".trash"  # old checkpoints being deleted
STAGING = ".staging"  # checkpoints being written
SAVE_RECORD = "last_save.json"  # how long the last save took; `cluster.grace` reads it
LOSS_SCALER = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


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
    written_by: dict  # the layout that wrote it, and `source` for an imported model
    description: dict


def describe_rank_layout(layout: dict) -> str:
    """A rank layout as a checkpoint records it (`StateLayout.describe()`, `Resume.written_by`),
    in one phrase: `TP 2 x PP 1 x DP 4 (ZeRO 1, bf16)`."""
    return (
        f"TP {layout.get('tensor')} x PP {layout.get('pipeline')} x DP {layout.get('data')} "
        f"(ZeRO {layout.get('zero_stage')}, {layout.get('precision')})"
    )


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rng/rank_{rank:05d}"


class CheckpointManager:
    """Saves, prunes and finds checkpoints. Construct it on every rank at the same point: it
    creates the process group background saves use (collective)."""

    def __init__(
        self, run_dir: Path, keep: int, interval: int = 0, asynchronous: bool = True
    ) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.interval = interval
        self.asynchronous = asynchronous
        # Background saves talk over their own gloo group: collectives of two threads must
        # never share one group, and DCP's coordination needs a CPU backend.
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._writer: ThreadPoolExecutor | None = None
        self._in_flight: Future | None = None
        # Deleting old checkpoints (terabytes at 70B) runs beside training, one at a time.
        self._deleter: ThreadPoolExecutor | None = None
        self.saved_step: int | None = None  # this session's last save, or the resumed step

    def due(self, step: int, stopping: bool = False) -> bool:
        """Whether the loop should save after `step`: every `interval` steps, and when the run
        stops (a signal or the last step), unless `step` is already saved (`saved_step`)."""
        if step == self.saved_step:
            return False
        return stopping or bool(self.interval and step % self.interval == 0)

    # -- reading ---------------------------------------------------------------------------
    def latest(self) -> Path | None:
        """The latest complete checkpoint as this process sees it (for messages)."""
        return latest_checkpoint(self.root)

    def agreed_latest(self) -> Path | None:
        """The latest checkpoint as rank 0 sees it, the same tag on every rank: nodes can see
        shared storage at different moments, and a run resumed from two tags would diverge.
        Rank 0 also clears checkpoints a crash left half-written (before any rank writes)."""
        leader = not dist.is_initialized() or dist.get_rank() == 0
        path = self.latest() if leader else None
        if leader:
            shutil.rmtree(self.root / STAGING, ignore_errors=True)
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

    def resume(self, layout: StateLayout) -> Resume | None:
        """The latest checkpoint (rank 0's `latest`, on every rank) and whether this layout
        differs from the one that wrote it; None when the run starts afresh."""
        path = self.agreed_latest()
        if path is None:
            return None
        description = read_description(path)
        written_by = dict(description["layout"])
        if description.get("source"):
            written_by["source"] = description["source"]
        reshard = description["layout"] != layout.describe()
        return Resume(path, reshard, written_by, description)

    def load_weights(self, module: nn.Module, resume: Resume, layout: StateLayout) -> None:
        """Collective: this rank's slice of every weight, before DeepSpeed wraps the module
        (ZeRO 3 reads its partitions later, in `restore`)."""
        if layout.zero_stage != 3:
            load_module_weights(module, resume.checkpoint, layout, self.group)

    def restore(
        self, module: nn.Module, engine, resume: Resume, layout: StateLayout
    ) -> tuple[TrainerState, bool]:
        """Collective: Adam's state (and the fp32 master weights), the loss scale, this rank's
        random states and the trainer state; also whether Adam's state was there."""
        description = resume.description
        step = description.get("optimizer_step")
        load_engine_state(module, engine, resume.checkpoint, layout, step, self.group)
        scaler = getattr(engine.optimizer, "loss_scaler", None)
        for name, value in (description.get("loss_scale") or {}).items():
            if scaler is not None and hasattr(scaler, name):
                setattr(scaler, name, value)
        state = TrainerState.read(resume.checkpoint)
        engine.global_steps = state.step
        self.saved_step = state.step
        if not resume.reshard:  # the same ranks: each continues its own random streams
            key = rank_file(dist.get_rank() if dist.is_initialized() else 0)
            objects = load_regions(resume.checkpoint, [], [key], self.group)
            restore_rng(objects[key])
        return state, step is not None

    # -- writing ---------------------------------------------------------------------------
    def save(
        self,
        module: nn.Module,
        engine,
        layout: StateLayout,
        state: TrainerState,
        config_yaml: str,
        step_seconds: float = 0.0,
        wait: bool = False,
    ) -> Path:
        """Save `state`: copy this rank's share to host memory, write it in the background
        (or before returning, with `wait` or `checkpoint.async: false`), then make it the
        latest. Records how long it took (`last_save.json`, read by `kiln submit` to size the
        schedulers' stop lead time, see `cluster.grace`)."""
        started = time.perf_counter()
        self.wait()  # one save in flight at a time: host memory for one copy of the state
        kinds = (MODEL, *optimizer_kinds(engine))
        pieces = rank_pieces(module, engine, layout, kinds, for_writing=True)
        chunks = [
            Region(region.key, region.size, region.offsets, staged(region.tensor))
            for piece in pieces
            for region in piece.regions()
        ]
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies to pinned host memory are done
        rank = dist.get_rank() if dist.is_initialized() else 0
        objects = {rank_file(rank): capture_rng()}
        description = {
            "format": FORMAT,
            "layout": layout.describe(),
            "optimizer_step": OptimizerState(engine).step_count() if len(kinds) > 1 else None,
            "loss_scale": loss_scale_of(engine),
        }
        stall = time.perf_counter() - started
        self.saved_step = state.step
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-save")
        self._in_flight = self._writer.submit(
            self._write,
            tag_of(state.step),
            chunks,
            objects,
            description,
            asdict(state),
            config_yaml,
            {"started": started, "stall_s": stall, "step_s": step_seconds},
        )
        if wait or not self.asynchronous:
            self.wait()
        return self.root / tag_of(state.step)

    def _write(
        self,
        tag: str,
        chunks: list[Region],
        objects: dict,
        description: dict,
        trainer_state: dict,
        config_yaml: str,
        timing: dict,
    ) -> None:
        """The background part: every rank writes its file; rank 0 then completes the
        checkpoint and makes it the latest."""
        step = trainer_state["step"]
        if fault_injection.slow_save(step):
            time.sleep(3)  # the crash tests' window for a kill during a background save
        staging = self.root / STAGING / tag
        save_chunks(staging, chunks, objects, self.group)
        if self.group is not None and dist.get_rank() != 0:
            return
        atomic.write_json(staging / DESCRIPTION, description)
        atomic.write_json(staging / "trainer_state.json", trainer_state)
        atomic.write_text(staging / "config.yaml", config_yaml)
        tokenizer = self.root.parent / "tokenizer.json"
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, staging / "tokenizer.json")
        fault_injection.kill_during_save(step)
        final = self.root / tag
        if final.exists():  # saved at this step before (a resumed run's first save)
            shutil.rmtree(final)
        os.replace(staging, final)
        atomic.write_text(self.root / "latest", tag + "\n")
        self.prune()
        record = {
            "step": step,
            "save_s": round(time.perf_counter() - timing["started"], 3),
            "stall_s": round(timing["stall_s"], 3),
            "step_s": round(timing["step_s"], 3),
        }
        atomic.write_json(self.root / SAVE_RECORD, record)

    def wait(self) -> float:
        """Wait for the save in flight, if any (raising its error); the seconds waited."""
        started = time.perf_counter()
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.result()
        return time.perf_counter() - started

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
        """Wait for the save and the deletion under way (the process should not exit in the
        middle of either)."""
        try:
            self.wait()
        finally:
            for executor in (self._writer, self._deleter):
                if executor is not None:
                    executor.shutdown(wait=True)
            self._writer = self._deleter = None


def staged(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of a piece of the state that training will not change under the writer."""
    if tensor.device.type == "cpu":
        return tensor.detach().clone()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor.detach(), non_blocking=True)


def loss_scale_of(engine) -> dict | None:
    """fp16's dynamic loss scale, which a bit-identical resume needs."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None:
        return None
    values = {name: getattr(scaler, name) for name in LOSS_SCALER if hasattr(scaler, name)}
    return {k: v.item() if torch.is_tensor(v) else v for k, v in values.items()}


def _empty(directory: Path) -> None:
    """Delete what `directory` holds (what cannot be deleted is left for the next prune)."""
    for entry in list(directory.iterdir()):
        shutil.rmtree(entry, ignore_errors=True)


def resolve_checkpoint(path: Path) -> Path:
    """A run directory means its latest checkpoint; a checkpoint directory means itself. One
    this Kiln cannot read (another format) is refused here."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        read_description(path)
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            read_description(found)
            return found
    raise CheckpointError(f"{path}: no checkpoint there (expected a run directory or step_*)")


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` names under `root` (a run's `checkpoints/`), if complete."""
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if (path / "trainer_state.json").is_file() else None


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
