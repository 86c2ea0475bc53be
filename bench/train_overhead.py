"""Training step time of Kiln's engine against a plain PyTorch loop, same model, same batches,
measured side by side in one process.

    .venv/bin/python bench/train_overhead.py [--config configs/train/tiny.yaml] [--steps 20]
        [--warmup 3] [--device auto|cpu|cuda] [key=value ...]

Kiln: `TrainEngine.train_step`, the real engine (DeepSpeed engine, ZeRO stage and precision of
the configuration, Kiln's non-finite guard, gradient clipping, the loss averaged over the
data-parallel group), in a process group of one (gloo on CPU, NCCL on a GPU) with layout
TP 1 x PP 1 x DP 1.

Plain: the same `Transformer` class, built under the same seed (so the same initial weights),
`torch.optim.AdamW` with the same hyper-parameters and parameter groups (no decay on norm
weights and biases), gradient accumulation over the same micro-batches (each loss divided by the
number of micro-batches), `clip_grad_norm_` with `optim.grad_clip`, `step`, `zero_grad`.
No DeepSpeed. In bf16 (which Kiln runs only with ZeRO >= 1: DeepSpeed keeps the fp32 master
weights) the plain loop keeps fp32 weights and runs forward under `torch.autocast(bf16)`; in
fp16 it adds a `GradScaler`. On a GPU both sides use torch's fused AdamW. On CPU only fp32
runs: megatron-core's linear layers handle autocast on CUDA only (their backward gets bf16
gradients against fp32 weights under CPU autocast).

Both sides see the same batches: uniform random token ids from a seeded `torch.Generator`,
`[micro_batch_size, seq_length + 1]` per micro-batch, `gradient_accumulation_steps`
micro-batches per step, generated before timing (data loading is in neither timing; moving the
batches to the device is in both). Both get the learning rate of the schedule at the same step.
After `--warmup` steps each, `--steps` steps are timed, interleaved one for one, the side that
goes first alternating every step, so that noise from other work on the machine hits both
alike. Printed: the median step time and tokens/s of each side, their ratio kiln/plain (target
<= 1.05), and the per-step losses and gradient norms of both, which should agree: same initial
weights, same data, same update rule. On CPU in fp32 the first step's loss and gradients are
identical; the gradient norms differ by about 5e-6 relative because `clip_grad_norm_` (per-tensor
`vector_norm` in fp32) computes it less exactly than Kiln's fp32 sum of squares (which agrees
with an fp64 norm to 1e-8), so the clipped updates, and later losses, differ in the last digits.
In bf16 the two sides round differently (bf16 weights under DeepSpeed, fp32 weights under
autocast), so expect their losses to agree to a few digits only (not yet run on a GPU).

With `train.compile=true` (the default on GPUs) Kiln compiles each block's norms, rotary
attention and MLP activation, and the plain loop `torch.compile`s each whole block
(`Module.compile`; dynamo breaks its graph at megatron-core's tensor-parallel layers).

The median of the per-step ratios (each Kiln step over the plain step next to it) is printed
too: it is the steadier figure when other work on the machine makes single steps slow.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.step_timing import (  # noqa: E402
    PlainLoop,
    choose_device,
    interleave,
    kiln_engine,
    kiln_side,
    make_batches,
    single_process_group,
)
from pretrain.startup import quiet_imports  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs/train/tiny.yaml")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--show-losses", type=int, default=6, help="steps whose losses to print")
    parser.add_argument("overrides", nargs="*", help="dotted key=value configuration overrides")
    args = parser.parse_args()
    console = Console()

    quiet_imports()
    device = choose_device(args.device)
    from pretrain.config import load_config, resolve_run
    from pretrain.config.errors import ConfigError

    try:
        cfg = resolve_run(load_config(args.config, args.overrides, world_size=1))
    except ConfigError as error:
        sys.exit(str(error))
    par, train = cfg.parallel, cfg.train
    if (par.tensor, par.pipeline) != (1, 1):
        sys.exit("this benchmark runs one process: set parallel.tensor=1 parallel.pipeline=1")
    if device.type == "cpu" and train.precision != "fp32":
        sys.exit(
            f"train.precision = {train.precision}: on CPU this benchmark runs fp32 only (DeepSpeed "
            "has no fp16 on CPU, and megatron-core's linear layers support autocast on CUDA "
            "only, so the plain loop cannot run them under CPU autocast)"
        )

    from pretrain.train.schedule import lr_at

    torch.manual_seed(train.seed)
    parallel = single_process_group(device)
    kiln = kiln_engine(cfg, parallel)
    from pretrain.train.engine import compile_enabled

    compiled = compile_enabled(cfg, device)  # `train.compile`; the plain loop follows it
    plain = PlainLoop(cfg, device, compile=compiled)

    total = args.warmup + args.steps
    batches = make_batches(cfg, total)
    tokens_per_step = train.global_batch_size * train.seq_length
    params = sum(p.numel() for p in plain.model.parameters())
    console.print(
        f"model {cfg.model.arch}, {params / 1e6:.1f}M parameters | {device.type}, "
        f"{torch.get_num_threads()} torch threads | {train.precision}, ZeRO {par.zero_stage}, "
        f"compile {'on' if compiled else 'off'} | "
        f"{train.gradient_accumulation_steps} x {train.micro_batch_size} x {train.seq_length} "
        f"= {tokens_per_step:,} tokens per step | {args.warmup} warm-up + {args.steps} timed "
        f"steps per side"
    )

    times, records = interleave(
        device,
        {"kiln": kiln_side(kiln), "plain": plain.train_step},
        batches,
        lambda step: lr_at(step, cfg.optim, train.steps),
        args.warmup,
    )

    losses = Table(title="per-step loss and gradient norm (warm-up steps included)")
    for column in ("step", "kiln loss", "plain loss", "difference", "kiln norm", "plain norm"):
        losses.add_column(column, justify="right")
    for step in range(min(args.show_losses, total)):
        (k_loss, k_norm), (p_loss, p_norm) = records["kiln"][step], records["plain"][step]
        losses.add_row(
            str(step + 1),
            f"{k_loss:.6f}",
            f"{p_loss:.6f}",
            f"{k_loss - p_loss:+.2e}",
            "-" if k_norm is None else f"{k_norm:.5f}",
            f"{p_norm:.5f}",
        )
    console.print(losses)
    worst = max(abs(k[0] - p[0]) for k, p in zip(records["kiln"], records["plain"], strict=True))
    console.print(f"largest loss difference over all {total} steps: {worst:.2e}")

    medians = {name: statistics.median(values) for name, values in times.items()}
    table = Table(title=f"step time, {args.steps} interleaved steps per side")
    for column in ("side", "median s/step", "min", "max", "tokens/s"):
        table.add_column(column, justify="right")
    for name, values in times.items():
        table.add_row(
            name,
            f"{medians[name]:.3f}",
            f"{min(values):.3f}",
            f"{max(values):.3f}",
            f"{tokens_per_step / medians[name]:,.0f}",
        )
    console.print(table)
    ratio = medians["kiln"] / medians["plain"]
    paired = statistics.median(k / p for k, p in zip(times["kiln"], times["plain"], strict=True))
    print(f"median of per-step ratios: {paired:.3f}")
    print(f"kiln/plain step time: {ratio:.2f} (target <= 1.05)")
    print(
        f"| {time.strftime('%Y-%m-%d')} | {platform.machine()}, {os.cpu_count()} cores, "
        f"{device.type} | {args.config.name} {train.precision} ZeRO {par.zero_stage} "
        f"compile {'on' if compiled else 'off'} | "
        f"{medians['plain']:.3f} s | {medians['kiln']:.3f} s | "
        f"{tokens_per_step / medians['plain']:,.0f} | {tokens_per_step / medians['kiln']:,.0f} | "
        f"{ratio:.2f} |"
    )


if __name__ == "__main__":
    main()
