"""Checkpoints that resume exactly and are never half-written under a final name.

    checkpoints/
      latest                     the tag of the newest complete checkpoint, replaced atomically
      step_00000300/
        <DeepSpeed's files>      model, optimizer and ZeRO partitions (what a resume loads)
        model/tp00_pp00.safetensors, layout.json
                                 this layout's weights under canonical names (what generation,
                                 export and resharding read, without DeepSpeed)
        rng/rank_00000.pt        every rank's torch, numpy and Python random states
        trainer_state.json       step, consumed samples, skipped steps
        config.yaml, tokenizer.json
                                 the resolved configuration and the run's tokenizer
      .staging/                  a checkpoint being written

Every rank writes into `.staging/<tag>`; after a barrier rank 0 renames the directory into
place and only then points `latest` at it, so a crash at any moment leaves the previous
checkpoint as the latest. The last `checkpoint.keep` checkpoints are kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from data_pipeline import atomic
from pretrain.model.pipeline import canonical_name

FAULT_ENV = "KILN_TEST_FAULT"  # fault injection for the crash tests, see fault_active


@dataclass
class TrainerState:
    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointManager:
    def __init__(self, run_dir: Path, keep: int) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    # -- reading ---------------------------------------------------------------------------
    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def load(self, train_engine) -> TrainerState | None:
        """Restore model, optimizer, random states; the trainer state, or None if none."""
        path = self.latest()
        if path is None:
            return None
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
        state = json.loads((path / "trainer_state.json").read_text())
        return TrainerState(**state)

    # -- writing ---------------------------------------------------------------------------
    def save(self, train_engine, state: TrainerState, config_yaml: str) -> Path:
        rank = dist.get_rank()
        tag = tag_of(state.step)
        staging = self.root / ".staging"
        final = self.root / tag
        if rank == 0:
            shutil.rmtree(staging / tag, ignore_errors=True)
            (staging / tag).mkdir(parents=True, exist_ok=True)
        dist.barrier()
        train_engine.engine.save_checkpoint(str(staging), tag=tag, save_latest=False)
        save_model_shard(train_engine, staging / tag / "model")
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
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        complete = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in complete[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


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


def save_model_shard(train_engine, directory: Path) -> None:
    """This (tensor, pipeline) position's weights under canonical names, written by its
    data-parallel rank 0; ZeRO-3 partitions are gathered first (every rank takes part)."""
    import deepspeed

    parallel = train_engine.parallel
    coords = parallel.coordinates
    module = train_engine.module
    num_layers = train_engine.cfg.model.num_layers
    parameters = list(module.named_parameters())
    gather = train_engine.cfg.parallel.zero_stage == 3
    context = (
        deepspeed.zero.GatheredParameters([p for _, p in parameters], modifier_rank=None)
        if gather
        else contextlib.nullcontext()
    )
    with context:
        if coords.data != 0:
            return
        tensors, partition_dims = {}, {}
        for name, parameter in parameters:
            canonical = canonical_name(name, num_layers)
            if canonical in tensors:
                continue
            tensors[canonical] = parameter.detach().to("cpu").contiguous().clone()
            sharded = getattr(parameter, "tensor_model_parallel", False)
            partition_dims[canonical] = int(parameter.partition_dim) if sharded else None
    directory.mkdir(parents=True, exist_ok=True)
    shard = f"tp{coords.tensor:02d}_pp{coords.pipe:02d}"
    save_file(tensors, str(directory / f"{shard}.safetensors"))
    atomic.write_json(directory / f"{shard}.json", {"partition_dims": partition_dims})
    if parallel.rank == 0:
        layout = parallel.layout
        atomic.write_json(
            directory / "layout.json",
            {"tensor": layout.tensor, "pipeline": layout.pipeline, "format": 1},
        )
