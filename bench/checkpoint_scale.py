"""What a checkpoint costs, Kiln's format against the one it replaced, side by side in one run.

    .venv/bin/python bench/checkpoint_scale.py [--preset 350m] [--layouts dp4-zero1,...]
        [--seq-length 128] [--out /tmp/kiln-checkpoint-bench]

Four real gloo ranks on this machine train the model preset (fp32, random tokens) under each
layout: DP=4 ZeRO-1, TP=2 x DP=2 ZeRO-1, PP=2 x DP=2 ZeRO-1. After two steps (so that Adam
holds its moments) every rank measures, for each way of saving:

- **kiln**: Kiln's checkpoint (`CheckpointManager.save`): every rank writes its own share once,
  with DCP, in a background thread, once synchronously (`wait=True`) and once asynchronously
  while two more training steps run;
- **before**: what Kiln wrote until now, rebuilt here from the same libraries: DeepSpeed's own
  files (`engine.save_checkpoint`) plus a layout-independent copy of the weights and Adam's
  moments, gathered over the data-parallel group (`safe_get_full_*`, one all-reduce per tensor)
  and written by data-parallel rank 0 of each tensor/pipeline position as safetensors.

Figures (each rank reads its own `/proc/self/io` write count and samples its resident memory
every 2 ms; the table shows the busiest rank):

- disk / unique: bytes on disk per checkpoint over the unique training state (fp32 weights and
  two moments: 12 bytes per parameter); goal <= 1.05;
- busiest / mean: bytes written by the busiest rank over the mean; goal <= 1.3;
- memory / share: the peak resident memory a save adds on the busiest rank over that rank's
  share of the state (unique state / ranks); goal <= 1.5;
- stall async / sync: the time the training loop is blocked by an asynchronous save (the copy
  to host memory) over a synchronous save's; goal <= 0.2. Also shown: how much slower the two
  steps run while the background write goes on, against two steps without a save;
- resume / fresh: start-up until the first step could run (model built, DeepSpeed engine,
  state loaded) over a fresh start's (random initialisation drawn); goal <= 1.2. `before`
  resumed by drawing the initialisation and then loading DeepSpeed's files.

Extrapolation: the per-rank bytes and memory are each rank's share, so they stay constant as
ranks are added in proportion to the model; the printout scales the busiest rank's bytes to
7B and 70B on 64 GPUs at the measured write rate.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pretrain.startup import quiet_imports  # noqa: E402

LAYOUTS = {
    "dp4-zero1": ["parallel.zero_stage=1"],
    "tp2-dp2-zero1": ["parallel.tensor=2", "parallel.zero_stage=1"],
    "pp2-dp2-zero1": ["parallel.pipeline=2", "parallel.zero_stage=1"],
}
WORLD = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def written_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Measure:
    """Seconds, bytes written and peak resident memory added while the block runs."""

    def __enter__(self) -> Measure:
        gc.collect()
        self.base_rss = resident_bytes()
        self.peak = self.base_rss
        self.base_written = written_bytes()
        self.started = time.perf_counter()
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *_exc) -> None:
        self.seconds = time.perf_counter() - self.started
        self._stop.set()
        self._sampler.join()
        self.peak = max(self.peak, resident_bytes())
        self.added = self.peak - self.base_rss
        self.written = written_bytes() - self.base_written


def config_file(preset: str, seq_length: int, directory: Path) -> Path:
    tree = yaml.safe_load((REPO / "configs/train/tiny.yaml").read_text())
    tree.pop("extends", None)
    tree.pop("model", None)
    tree["extends"] = [str(REPO / "configs/model" / f"{preset}.yaml")]
    tree["train"].update(micro_batch_size=1, global_batch_size=WORLD, seq_length=seq_length)
    tree["logging"] = {"wandb": {"mode": "disabled"}}
    path = directory / "bench.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def old_save(engine, module, layout, directory: Path) -> None:
    """The format Kiln wrote until now: DeepSpeed's files plus a gathered canonical copy."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from pretrain.train.optimizer_state import MOMENTS, OptimizerState
    from pretrain.train.state_pieces import canonical_parameters

    engine.save_checkpoint(str(directory), tag="old", save_latest=False)
    writer = layout.data_rank == 0
    parameters = canonical_parameters(module, layout.num_layers)
    shard = f"tp{layout.tensor_rank:02d}_pp{layout.stage:02d}"
    weights = {name: p.detach().clone() for name, p in parameters}
    state = OptimizerState(engine)
    moments = {key: {name: state.read(p, key) for name, p in parameters} for key in MOMENTS}
    if writer:
        (directory / "model").mkdir(parents=True, exist_ok=True)
        save_file(weights, str(directory / "model" / f"{shard}.safetensors"))
        for key, tensors in moments.items():
            save_file(tensors, str(directory / "model" / f"{shard}.{key}.safetensors"))
    dist.barrier()


def directory_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def worker(rank: int, port: int, preset: str, name: str, seq_length: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        OMP_NUM_THREADS="1",
    )
    quiet_imports()
    import logging

    import torch.distributed as dist

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    from pretrain.config import dump_config, load_config, resolve_run
    from pretrain.parallel.layout import Layout, init_distributed, setup_parallel
    from pretrain.train.checkpoint import CheckpointManager, TrainerState
    from pretrain.train.engine import TrainEngine
    from pretrain.train.state_pieces import canonical_parameters
    from pretrain.train.trainer import state_layout

    root = Path(out) / name
    cfg = resolve_run(load_config(Path(out) / "bench.yaml", LAYOUTS[name], world_size=WORLD))
    device = torch.device("cpu")
    init_distributed(device)
    par = cfg.parallel
    parallel = setup_parallel(Layout(par.tensor, par.pipeline, par.data), device)
    layout = state_layout(cfg, parallel)
    generator = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, seq_length + 1), generator=generator)
    batches = [(tokens[:, :-1], tokens[:, 1:])] * cfg.train.gradient_accumulation_steps

    losses: list[float] = []

    def steps(engine, count: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            losses.append(engine.train_step(batches, 1e-4).loss)
        return time.perf_counter() - started

    result: dict = {"rank": rank}
    dist.barrier()
    started = time.perf_counter()
    engine = TrainEngine(cfg, parallel)
    dist.barrier()
    result["fresh_s"] = time.perf_counter() - started
    steps(engine, 2)  # Adam holds its moments from here on
    parameters = sum(p.numel() for _, p in canonical_parameters(engine.module, layout.num_layers))
    result["parameters"] = parameters  # this rank's TP/PP slice (a tied copy counted again)
    state = TrainerState(step=2, consumed_samples=2 * WORLD)
    manager = CheckpointManager(root / "run", keep=10, asynchronous=True)
    module, ds = engine.module, engine.engine
    config_yaml = dump_config(cfg)

    dist.barrier()
    with Measure() as sync:
        manager.save(module, ds, layout, state, config_yaml, wait=True)
    result["kiln_sync"] = vars_of(sync)
    with Measure() as baseline:
        steps(engine, 2)
    result["baseline_steps_s"] = baseline.seconds
    result["baseline_peak"] = baseline.peak
    state = TrainerState(step=4, consumed_samples=4 * WORLD)
    dist.barrier()
    with Measure() as whole:
        blocked = time.perf_counter()
        manager.save(module, ds, layout, state, config_yaml)
        blocked = time.perf_counter() - blocked
        result["overlapped_steps_s"] = steps(engine, 2)
        manager.wait()
    # Memory the background save adds beyond what the same two steps use without one.
    added = max(0, whole.peak - result["baseline_peak"])
    result["kiln_async"] = {**vars_of(whole), "blocked_s": blocked, "added": added}
    dist.barrier()
    old_dir = root / "old"
    with Measure() as old:
        old_save(ds, module, layout, old_dir)
    result["before"] = vars_of(old)
    if rank == 0:
        result["kiln_disk"] = directory_bytes(root / "run/checkpoints/step_00000004")
        result["before_disk"] = directory_bytes(old_dir)
    steps(engine, 1)  # step 7, from the state `before` saved
    manager.close()
    del engine, module, ds
    gc.collect()
    manager = CheckpointManager(root / "run", keep=10, asynchronous=True)
    dist.barrier()
    # Kiln's latest checkpoint holds the state after step 4: the resumed step is step 5.
    started = time.perf_counter()
    resume = manager.resume(layout)
    engine = TrainEngine(
        cfg,
        parallel,
        initialize=False,
        prepare_module=lambda m: manager.load_weights(m, resume, layout),
    )
    manager.restore(engine.module, engine.engine, resume, layout)
    dist.barrier()
    result["kiln_resume_s"] = time.perf_counter() - started
    result["kiln_resumed_step_exact"] = engine.train_step(batches, 1e-4).loss == losses[4]
    del engine
    gc.collect()
    dist.barrier()
    started = time.perf_counter()
    engine = TrainEngine(cfg, parallel)
    engine.engine.load_checkpoint(str(old_dir), tag="old", load_lr_scheduler_states=False)
    dist.barrier()
    result["before_resume_s"] = time.perf_counter() - started
    result["before_resumed_step_exact"] = engine.train_step(batches, 1e-4).loss == losses[6]
    (root / f"rank{rank}.json").write_text(json.dumps(result))
    manager.close()
    dist.destroy_process_group()


def vars_of(measure: Measure) -> dict:
    return {"s": measure.seconds, "written": measure.written, "added": measure.added}


def run_layout(preset: str, name: str, seq_length: int, out: Path) -> list[dict]:
    shutil.rmtree(out / name, ignore_errors=True)
    (out / name).mkdir(parents=True)
    mp.start_processes(
        worker, args=(free_port(), preset, name, seq_length, str(out)), nprocs=WORLD,
        start_method="spawn",
    )  # fmt: skip
    return [json.loads((out / name / f"rank{r}.json").read_text()) for r in range(WORLD)]


def summarise(name: str, ranks: list[dict], unique: int) -> dict:
    share = unique / WORLD
    rank0 = ranks[0]
    row = {"layout": name}
    for side, key in (("kiln", "kiln_sync"), ("before", "before")):
        written = [r[key]["written"] for r in ranks]
        row[f"{side}_disk_ratio"] = rank0[f"{side}_disk"] / unique
        row[f"{side}_busiest_mean"] = max(written) / (sum(written) / len(written))
        row[f"{side}_busiest_gb"] = max(written) / 1e9
        row[f"{side}_written_gb"] = [round(w / 1e9, 3) for w in written]
        row[f"{side}_memory_share"] = max(r[key]["added"] for r in ranks) / share
        row[f"{side}_save_s"] = max(r[key]["s"] for r in ranks)
    row["async_blocked_s"] = max(r["kiln_async"]["blocked_s"] for r in ranks)
    row["async_memory_share"] = max(r["kiln_async"]["added"] for r in ranks) / share
    row["stall_ratio"] = row["async_blocked_s"] / row["kiln_save_s"]
    row["overlap_slowdown"] = max(r["overlapped_steps_s"] for r in ranks) / max(
        r["baseline_steps_s"] for r in ranks
    )
    fresh = max(r["fresh_s"] for r in ranks)
    row["fresh_s"] = fresh
    row["kiln_resume_ratio"] = max(r["kiln_resume_s"] for r in ranks) / fresh
    row["before_resume_ratio"] = max(r["before_resume_s"] for r in ranks) / fresh
    row["resumed_exactly"] = all(
        r["kiln_resumed_step_exact"] and r["before_resumed_step_exact"] for r in ranks
    )
    row["write_gb_s"] = max(r["kiln_sync"]["written"] for r in ranks) / 1e9 / row["kiln_save_s"]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="350m")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "kiln-ckpt-bench")
    args = parser.parse_args()
    quiet_imports()
    from rich.console import Console
    from rich.table import Table

    from pretrain.config import ModelConfig, resolve_model
    from pretrain.model.sizing import count_parameters

    model = yaml.safe_load((REPO / "configs/model" / f"{args.preset}.yaml").read_text())["model"]
    parameters = count_parameters(resolve_model(ModelConfig(**model)))
    unique = parameters * 12
    args.out.mkdir(parents=True, exist_ok=True)
    config_file(args.preset, args.seq_length, args.out)
    rows = []
    for name in args.layouts.split(","):
        started = time.perf_counter()
        ranks = run_layout(args.preset, name, args.seq_length, args.out)
        rows.append(summarise(name, ranks, unique))
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
        shutil.rmtree(args.out / name, ignore_errors=True)
    table = Table(title=f"checkpoints of {args.preset} ({parameters / 1e6:.0f}M parameters, "
                  f"{unique / 1e9:.2f} GB unique state), {WORLD} gloo ranks")  # fmt: skip
    for column in (
        "layout", "format", "disk / unique", "busiest / mean", "busiest GB", "memory / share",
        "save s", "stall async/sync", "steps slowed", "resume / fresh",
    ):  # fmt: skip
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["layout"], "kiln", f"{row['kiln_disk_ratio']:.3f}",
            f"{row['kiln_busiest_mean']:.2f}", f"{row['kiln_busiest_gb']:.2f}",
            f"{row['kiln_memory_share']:.2f} (async {row['async_memory_share']:.2f})",
            f"{row['kiln_save_s']:.1f}", f"{row['stall_ratio']:.3f}",
            f"{row['overlap_slowdown']:.2f}x", f"{row['kiln_resume_ratio']:.2f}",
        )  # fmt: skip
        table.add_row(
            "", "before", f"{row['before_disk_ratio']:.3f}",
            f"{row['before_busiest_mean']:.2f}", f"{row['before_busiest_gb']:.2f}",
            f"{row['before_memory_share']:.2f}", f"{row['before_save_s']:.1f}", "1 (sync)", "",
            f"{row['before_resume_ratio']:.2f}",
        )  # fmt: skip
    Console(width=170).print(table)
    rate = min(r["write_gb_s"] for r in rows)
    for label, billions, gpus in (("7B", 6.74, 64), ("70B", 70.0, 64)):
        per_rank = billions * 1e9 * 12 / gpus / 1e9  # fp32 weights + 2 moments, bf16 adds none
        print(
            f"{label} on {gpus} GPUs: {per_rank:.1f} GB per rank per save (each rank its own "
            f"share), {per_rank / rate:.0f} s at this machine's {rate:.2f} GB/s per rank; the "
            "training loop waits only for the copy to host memory"
        )
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
