"""Training throughput and MFU of Kiln on one GPU against a plain PyTorch loop on the same model,
measured side by side in one process: `llama-1b` and the `llama-7b` shape, `train.compile`
off/on, `train.activation_checkpointing` none/selective.

    .venv/bin/python bench/gpu_throughput.py [--device auto|cpu|cuda] [--shapes A,B]
        [--compile off,on] [--recompute none,selective] [--steps N] [--warmup N]
        [--micro-batch N] [--layers N] [--peak-tflops X] [--time-budget S] [--json PATH]

On a GPU machine it is one prepared run of about 8 minutes at most on an H200: no row starts
after `--time-budget` seconds of measuring (330 by default; each shape gets its share in turn,
and what one leaves over goes to the next), timed steps stop at it, the micro-batch search
tries at most 7 sizes; only a row already begun (its search, its compilation, one timed step)
and the start-up (imports, NCCL) come on top. The JSON file is rewritten after every row, so
a run cut short still leaves the rows it measured:

    python bench/gpu_throughput.py --device cuda --json bench/gpu_throughput.json

Shapes (`--shapes`; default `llama-1b,llama-7b-shape` on a GPU, `tiny` on CPU):
- `llama-1b`: configs/model/llama-1b.yaml (1.1B parameters, 22 layers) at sequence length 2048.
- `llama-7b-shape`: configs/model/llama-7b.yaml's matrices (hidden 4096, FFN 11008, 32 heads,
  vocabulary 32000) at sequence length 2048 with `model.num_layers` cut to the most layers whose
  training state and activations fit in the GPU's free memory (`--layers` sets it): resident
  bytes per parameter, Kiln's 20 (bf16 weights 2 and gradients 2, DeepSpeed's fp32 gradient
  accumulation 4, fp32 master weights 4, Adam's two fp32 moments 8) plus the plain loop's 18
  (fp32 weights 4 and gradients 4, Adam 8, autocast's bf16 copies of the weights 2), since both
  sides stay resident; activations of `--fit-tokens` tokens (default 16,384) at
  (36 h + 12 f) bytes per token and layer plus 12 bytes per token and vocabulary entry for the
  logits and the loss; 90% of the free memory. When even a micro-batch of one sequence runs out
  of memory, the layer count is cut by an eighth and the search starts again.
- `tiny`: configs/model/tiny.yaml at its own sequence length (256), fp32: the CPU smoke run.

Each shape runs four rows, compile off/on x recompute none/selective, in the order off/none,
on/none, off/selective, on/selective. A row's configuration is the shape's model file with
`train.compile`, `train.activation_checkpointing`, `train.precision` (bf16 on a GPU, fp32 on CPU),
`parallel.zero_stage` (`--zero-stage`, 1), TP 1 x PP 1 x DP 1 and one micro-batch per step
(global batch = micro-batch, no gradient accumulation).

Micro-batch: on a GPU the compile-off row of each recompute mode doubles it from 1 (one step
of each side at each size, both resident) until CUDA runs out of memory or `--max-micro-batch`
(64) is reached, keeps the last size that ran, and frees memory between tries (gc, then
`torch.cuda.empty_cache()`); the compile-on row reuses that size (halved on an out-of-memory
error). `--micro-batch` fixes it (CPU default 2: a CPU has no such error, so a search there,
`--micro-batch 0`, only checks the code path, stopping at `--max-micro-batch`).

The two sides (`bench/step_timing.py`, shared with `bench/train_overhead.py`):
- Kiln: `TrainEngine.train_step`, the real engine: DeepSpeed ZeRO (one rank) in bf16 (DeepSpeed's
  bf16 optimizer: bf16 weights, fp32 master weights and gradient accumulation), Kiln's non-finite
  guard, gradient clipping; compilation as the engine does it for `train.compile` (each block's
  norms, rotary attention and MLP activation; megatron-core's layers outside).
- Plain: the same `Transformer` class under the same seed (the same initial weights), no
  DeepSpeed, torch's fused AdamW on a GPU, `clip_grad_norm_`, `step`, `zero_grad`. bf16 through
  `torch.autocast` over fp32 weights, the textbook mixed-precision loop: the optimizer updates
  fp32 weights as Kiln's fp32 master weights are updated (plain bf16 weights under AdamW would
  lose small updates to rounding: another training recipe, not the same one done faster).
  Compile on: every transformer block under `torch.compile` (regional compilation, one compiled
  block for all; the embedding, final norm and loss stay eager). Compiling the whole model
  gains nothing: megatron-core's linear layers break the graph (a deprecation warning their
  `linear_with_grad_accumulation_and_async_allreduce` issues), and a graph break inside the
  loop over the blocks makes dynamo run `Transformer.forward` itself eagerly anyway.

Timing: the same random-token batches on both sides, generated before timing; `--warmup` steps
(compilation happens there), then `--steps` steps timed, interleaved one for one with the side
that goes first alternating every step (`step_timing.interleave`). Reported per side: median
step time, tokens/s = micro-batch x sequence length / median, MFU, and the ratio Kiln step time
/ plain step time (both medians, and the median of per-step ratios).

MFU (`pretrain/train/flops.py`): tokens/s x FLOPs per token / peak FLOP/s, FLOPs per token =
6 N + 12 L h S (N: the parameters in matrix multiplies, every parameter but the input embedding
table, with the padded vocabulary; L layers, h hidden size, S sequence length; recomputation
not counted), the peak the dense bf16 tensor-core figure of the device (989 TFLOP/s for H100 SXM
and H200). `--peak-tflops` gives it for a device the table lacks (and lets a CPU run exercise
the formula). Goals: MFU >= 50% for llama-1b, >= 55% for the 7B shape; kiln/plain <= 1.03.

Memory: `torch.cuda.max_memory_allocated`, reset before every step. Both sides are resident all
along, so a side's own peak is the highest peak during its timed steps less the other side's
resident state (its weights and optimizer state between steps); the row's peak is both together.
On CPU: n/a (`bench/recompute.py` measures activation memory on CPU).

Losses: the first step's loss of both sides (same weights, same batch, before any update) is
printed: identical in fp32 on CPU; in bf16 expect agreement to about 1e-2 (Kiln's residual stream
is bf16, autocast's fp32). A Kiln row with compile on in which dynamo compiled no graph during
Kiln's steps is flagged: the engine did not compile (or every graph came from an earlier row).

On CPU every figure is a smoke run of the code path only (tiny model, fp32, two cores shared
with other work): it says nothing about GPU throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import step_timing  # noqa: E402
from pretrain.startup import quiet_imports  # noqa: E402

GIB = 2**30
RATIO_GOAL = 1.03
# Resident bytes per parameter between steps (and, for the plain loop, autocast's bf16 copies
# of the weights during a step): (Kiln's DeepSpeed ZeRO side, the plain loop).
STATE_BYTES = {"bf16": (20, 18), "fp32": (24, 16)}
ELEMENT_BYTES = {"bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class Shape:
    name: str
    config: str  # the model file, relative to the repository
    seq_length: int | None  # None: the model's max_seq_length
    fit_layers: bool  # cut model.num_layers to what fits in memory
    mfu_goal: float | None


SHAPES = {
    shape.name: shape
    for shape in (
        Shape("llama-1b", "configs/model/llama-1b.yaml", 2048, False, 0.50),
        Shape("llama-7b-shape", "configs/model/llama-7b.yaml", 2048, True, 0.55),
        Shape("tiny", "configs/model/tiny.yaml", None, False, None),
    )
}


def is_oom(error: BaseException) -> bool:
    """CUDA's out-of-memory error, also where a library re-raises it as a RuntimeError."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def largest_fitting(trial: Callable[[int], None], cap: int, start: int = 1) -> int | None:
    """Run `trial(size)` for size = start, 2 start, 4 start, ... up to `cap` until it runs out
    of memory; the last size that ran, or None when `start` did not."""
    fit, size = None, start
    while size <= cap:
        try:
            trial(size)
        except Exception as error:  # noqa: BLE001 - only out-of-memory errors are kept
            if not is_oom(error):
                raise
            break
        fit, size = size, size * 2
    return fit


def layers_that_fit(
    model, seq_length: int, tokens: int, free_bytes: int, precision: str, fraction: float = 0.9
) -> dict:
    """The most layers of `model`'s shape whose training state (both sides resident) and the
    activations of a micro-batch of `tokens` tokens fit in `fraction` of `free_bytes`, and the
    figures behind the estimate (see the module docstring)."""
    from pretrain.model.sizing import count_parameters, padded_vocab_size

    vocab = padded_vocab_size(model.vocab_size)
    one, two = (count_parameters(model.model_copy(update={"num_layers": n}), vocab) for n in (1, 2))
    per_layer, fixed = two - one, 2 * one - two
    state = sum(STATE_BYTES[precision])
    activations = ELEMENT_BYTES[precision] * (18 * model.hidden_size + 6 * model.ffn_hidden_size)
    budget = fraction * free_bytes - fixed * state - tokens * 12 * vocab
    layers = math.floor(budget / (per_layer * state + tokens * activations))
    return {
        "layers": max(0, min(layers, model.num_layers)),
        "free_bytes": free_bytes,
        "state_bytes_per_parameter": state,
        "parameters_per_layer": per_layer,
        "parameters_outside_layers": fixed,
        "activation_bytes_per_token_layer": activations,
        "fit_tokens": tokens,
    }


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """Every parameter of the built model, and those of its input lookup tables (the
    embedding's, unless tied: then its matrix is the output layer too)."""
    total = sum(p.numel() for p in model.parameters())
    lookups = sum(
        p.numel()
        for name, p in model.named_parameters()
        if name.startswith("embedding.") and not model.config.tie_embeddings
    )
    return total, lookups


def side_figures(times: list[float], tokens: int, flops: float, peak: float | None) -> dict:
    from pretrain.train.flops import mfu

    median = statistics.median(times)
    tokens_per_s = tokens / median
    return {
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(tokens_per_s, flops, peak, devices=1),
    }


class Bench:
    """One process's run: the device, the process group, the arguments, the rows so far."""

    def __init__(self, args: argparse.Namespace, device: torch.device, console: Console) -> None:
        from pretrain.train.flops import peak_flops

        self.args, self.device, self.console = args, device, console
        self.cuda = device.type == "cuda"
        self.precision = "bf16" if self.cuda else "fp32"
        self.device_name = (
            torch.cuda.get_device_name(device) if self.cuda else platform.processor() or "cpu"
        )
        self.peak = (
            args.peak_tflops * 1e12
            if args.peak_tflops
            else peak_flops(torch.cuda.get_device_name(device) if self.cuda else None, "bf16")
        )
        torch.manual_seed(0)
        self.parallel = step_timing.single_process_group(device)
        self.rows: list[dict] = []

    def config(self, shape: Shape, layers: int | None, micro: int, compile: bool, recompute: str):
        from pretrain.config import load_config, resolve_run

        overrides = [
            f"train.precision={self.precision}",
            f"parallel.zero_stage={self.args.zero_stage}",
            "parallel.tensor=1",
            "parallel.pipeline=1",
            f"train.micro_batch_size={micro}",
            f"train.global_batch_size={micro}",
            f"train.compile={'true' if compile else 'false'}",
            f"train.activation_checkpointing={recompute}",
        ]
        seq_length = self.args.seq_length or shape.seq_length
        if seq_length:
            overrides.append(f"train.seq_length={seq_length}")
        if layers:
            overrides.append(f"model.num_layers={layers}")
        return resolve_run(load_config(REPO / shape.config, overrides, world_size=1))

    @contextlib.contextmanager
    def resident(self, cfg):
        """Kiln's engine and the plain loop on `cfg`, both in memory; freed on the way out."""
        kiln = plain = None
        try:
            kiln = step_timing.kiln_engine(cfg, self.parallel)
            plain = step_timing.PlainLoop(cfg, self.device, compile=cfg.train.compile)
            yield kiln, plain
        finally:
            if kiln is not None:
                try:  # hooks and flat buffers; after an out-of-memory error too
                    kiln.engine.destroy()
                except Exception as error:  # noqa: BLE001 - cleaning up: say so, go on
                    self.console.print(f"  DeepSpeed engine.destroy failed: {error!r}")
            del kiln, plain
            if cfg.train.compile:
                torch._dynamo.reset()  # compiled code of this row's modules, and their guards
            release(self.device)

    # -- the micro-batch and the layer count ---------------------------------------------------

    def fitted_layers(self, shape: Shape) -> tuple[int | None, dict | None]:
        if not shape.fit_layers:
            return None, None
        if self.args.layers:
            return self.args.layers, None
        release(self.device)
        cfg = self.config(shape, None, 1, False, "none")
        estimate = layers_that_fit(
            cfg.model,
            cfg.train.seq_length,
            self.args.fit_tokens,
            free_memory(self.device),
            self.precision,
        )
        self.console.print(
            f"{shape.name}: {estimate['free_bytes'] / GIB:.1f} GiB free; "
            f"{estimate['state_bytes_per_parameter']} bytes of state per parameter (both sides), "
            f"{estimate['parameters_per_layer'] / 1e6:.1f}M parameters and "
            f"{estimate['activation_bytes_per_token_layer'] / 1e3:.0f} kB of activations per "
            f"token per layer, {estimate['fit_tokens']:,} tokens: {estimate['layers']} layers"
        )
        if estimate["layers"] < 1:
            raise MemoryError(f"{shape.name}: not even one layer fits ({estimate})")
        return estimate["layers"], estimate

    def search_micro_batch(self, shape: Shape, layers, compile: bool, recompute: str) -> int | None:
        """The largest micro-batch (doubling from 1) at which a step of each side runs."""
        cfg = self.config(shape, layers, 1, compile, recompute)
        tries: list[str] = []

        def trial(size: int) -> None:
            batch = step_timing.make_batches(
                self.config(shape, layers, size, compile, recompute), 1
            )[0]
            try:
                kiln.train_step(batch, cfg.optim.lr)
                plain.train_step(batch, cfg.optim.lr)
                tries.append(f"{size} ok")
            except Exception as error:
                tries.append(f"{size} {'out of memory' if is_oom(error) else 'error'}")
                raise
            finally:
                del batch
                release(self.device)

        fit = None
        try:
            with self.resident(cfg) as (kiln, plain):
                fit = largest_fitting(trial, self.args.max_micro_batch)
        except Exception as error:  # noqa: BLE001 - only out-of-memory errors are kept
            if not is_oom(error):
                raise
            tries.append("building both sides: out of memory")
        release(self.device)
        self.console.print(f"  micro-batch search: {', '.join(tries)} -> {fit}")
        return fit

    # -- one row ---------------------------------------------------------------------------------

    def row(self, shape: Shape, state: dict, compile: bool, recompute: str, deadline) -> dict:
        """Measure one configuration, finding its micro-batch (and, for a fitted shape, cutting
        its layers) on the way; `state` carries the layer count and the micro-batches found
        between the rows of a shape."""
        micro = self.args.micro_batch or state["micro"].get(recompute)
        while True:
            if micro is None:
                micro = self.search_micro_batch(shape, state["layers"], compile, recompute)
                if micro is None:
                    self.cut_layers(shape, state)
                    continue
                state["micro"][recompute] = micro
            cfg = self.config(shape, state["layers"], micro, compile, recompute)
            try:
                row = self.measure(shape, cfg, deadline)
            except Exception as error:  # noqa: BLE001 - only out-of-memory errors are kept
                if not is_oom(error):
                    raise
            else:  # a size halved here is the one to start from in the next row
                state["micro"][recompute] = min(micro, state["micro"].get(recompute, micro))
                return row
            release(self.device)  # the error, and the frames it held, are gone now
            self.console.print(f"  out of memory at micro-batch {micro}")
            if micro > 1:
                micro //= 2
            else:
                self.cut_layers(shape, state)
                micro = None

    def cut_layers(self, shape: Shape, state: dict) -> None:
        """One sequence per micro-batch ran out of memory: an eighth fewer layers, if the shape
        may have fewer."""
        layers = state["layers"]
        if not shape.fit_layers or not layers or layers <= 1:
            raise MemoryError(f"{shape.name}: a micro-batch of one sequence does not fit")
        state["layers"] = layers - max(1, layers // 8)
        state["micro"].clear()
        self.console.print(f"  cutting {shape.name} to {state['layers']} layers")

    def measure(self, shape: Shape, cfg, deadline: float) -> dict:
        from torch._dynamo.utils import counters

        from pretrain.train.flops import flops_per_token
        from pretrain.train.schedule import lr_at

        args, device, train, model = self.args, self.device, cfg.train, cfg.model
        batches = step_timing.make_batches(cfg, args.warmup + args.steps)
        tokens = train.micro_batch_size * train.seq_length
        flops = flops_per_token(model, train.seq_length)
        release(device)
        base = torch.cuda.memory_allocated(device) if self.cuda else 0
        if base > GIB:
            self.console.print(f"  {base / GIB:.1f} GiB still allocated from earlier rows")
        peaks: dict[str, list[int]] = {"kiln": [], "plain": []}
        graphs = {"kiln": 0, "plain": 0}

        def tracked(name: str, step):
            def run(micro, lr):
                if self.cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                before = counters["stats"]["unique_graphs"]
                result = step(micro, lr)
                graphs[name] += counters["stats"]["unique_graphs"] - before
                if self.cuda:
                    peaks[name].append(torch.cuda.max_memory_allocated(device))
                return result

            return run

        with self.resident(cfg) as (kiln, plain):
            times, records = step_timing.interleave(
                device,
                {
                    "kiln": tracked("kiln", step_timing.kiln_side(kiln)),
                    "plain": tracked("plain", plain.train_step),
                },
                batches,
                lambda step: lr_at(step, cfg.optim, train.steps),
                args.warmup,
                deadline,
            )
            total, lookups = parameter_counts(plain.model)
            plain_state = plain.state_bytes()
            kiln_state = (
                (torch.cuda.memory_allocated(device) - base - plain_state) if self.cuda else 0
            )
        sides = {name: side_figures(times[name], tokens, flops, self.peak) for name in times}
        others = {"kiln": plain_state, "plain": kiln_state}
        for name, figures in sides.items():
            timed_peaks = peaks[name][args.warmup :] or peaks[name]
            own = max(timed_peaks) - others[name] if timed_peaks else None
            figures.update(
                peak_bytes=own,
                state_bytes={"kiln": kiln_state, "plain": plain_state}[name] if self.cuda else None,
                losses=[record[0] for record in records[name]],
                grad_norms=[record[1] for record in records[name]],
                compiled_graphs=graphs[name],
            )
        kiln_side_, plain_side = sides["kiln"], sides["plain"]
        ratio = kiln_side_["median_s"] / plain_side["median_s"]
        paired = statistics.median(
            k / p for k, p in zip(times["kiln"], times["plain"], strict=True)
        )
        all_peaks = peaks["kiln"] + peaks["plain"]
        return {
            "shape": shape.name,
            "status": "ok",
            "compile": train.compile,
            "recompute": train.activation_checkpointing,
            "precision": train.precision,
            "zero_stage": cfg.parallel.zero_stage,
            "layers": model.num_layers,
            "hidden_size": model.hidden_size,
            "ffn_hidden_size": model.ffn_hidden_size,
            "vocab_size": model.vocab_size,
            "seq_length": train.seq_length,
            "micro_batch": train.micro_batch_size,
            "tokens_per_step": tokens,
            "parameters": total,
            "lookup_parameters": lookups,
            "flops_per_token": flops,
            "peak_flops": self.peak,
            "steps_timed": len(times["kiln"]),
            "warmup": args.warmup,
            "kiln": kiln_side_,
            "plain": plain_side,
            "ratio": ratio,
            "paired_ratio": paired,
            "ratio_goal": RATIO_GOAL,
            "ratio_goal_met": ratio <= RATIO_GOAL,
            "mfu_goal": shape.mfu_goal,
            "mfu_goal_met": None
            if shape.mfu_goal is None or kiln_side_["mfu"] is None
            else kiln_side_["mfu"] >= shape.mfu_goal,
            "first_loss_difference": kiln_side_["losses"][0] - plain_side["losses"][0],
            "peak_bytes": max(all_peaks) if all_peaks else None,
            "allocated_before_bytes": base if self.cuda else None,
        }

    # -- the whole run ---------------------------------------------------------------------------

    def run(self, shapes: list[Shape], compiles: list[bool], recomputes: list[str]) -> int:
        self.compiles, self.recomputes = compiles, recomputes
        started = time.perf_counter()
        budget = self.args.time_budget
        failed = 0
        for index, shape in enumerate(shapes):
            deadline = started + budget * (index + 1) / len(shapes) if budget else float("inf")
            state: dict = {"layers": None, "micro": {}, "estimate": None}
            try:
                state["layers"], state["estimate"] = self.fitted_layers(shape)
            except Exception as error:  # noqa: BLE001 - reported, and the next shape runs
                failed += 1
                self.fail(shape, None, None, error)
                continue
            for recompute in recomputes:
                for compile in compiles:
                    label = f"{shape.name}, compile {'on' if compile else 'off'}, {recompute}"
                    if time.perf_counter() > deadline:
                        self.console.print(f"{label}: skipped (time budget)")
                        self.add(self.base_row(shape, compile, recompute, "skipped: time budget"))
                        continue
                    self.console.print(f"{label} ...")
                    try:
                        row = self.row(shape, state, compile, recompute, deadline)
                    except Exception as error:  # noqa: BLE001 - reported, the next row runs
                        failed += 1
                        self.fail(shape, compile, recompute, error)
                        continue
                    row["layer_estimate"] = state["estimate"]
                    self.add(row)
                    self.console.print(f"  {summary(row)}")
        return failed

    def base_row(self, shape: Shape, compile, recompute, status: str) -> dict:
        return {"shape": shape.name, "compile": compile, "recompute": recompute, "status": status}

    def fail(self, shape: Shape, compile, recompute, error: BaseException) -> None:
        traceback.print_exception(error, file=sys.stderr)
        reason = (
            f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        )
        self.console.print(f"{shape.name}: {reason}")
        release(self.device)
        for mode in [recompute] if recompute is not None else self.recomputes:
            for flag in [compile] if compile is not None else self.compiles:
                self.add(self.base_row(shape, flag, mode, reason))

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.args.json:  # after every row, so that a run cut short still leaves its rows
            self.args.json.write_text(json.dumps(self.report(), indent=1) + "\n")

    def report(self) -> dict:
        import deepspeed

        return {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "device": self.device.type,
            "device_name": self.device_name,
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "precision": self.precision,
            "peak_flops": self.peak,
            "argv": sys.argv[1:],
            "rows": self.rows,
        }


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f}"


def summary(row: dict) -> str:
    kiln, plain = row["kiln"], row["plain"]
    return (
        f"{row['layers']} layers, micro-batch {row['micro_batch']}: Kiln "
        f"{kiln['tokens_per_s']:,.0f} tok/s (MFU {percent(kiln['mfu'])}), plain "
        f"{plain['tokens_per_s']:,.0f} tok/s (MFU {percent(plain['mfu'])}), kiln/plain "
        f"{row['ratio']:.3f}, step-1 losses {kiln['losses'][0]:.6f} / {plain['losses'][0]:.6f}"
    )


def results_table(rows: list[dict], cpu: bool) -> Table:
    title = "training throughput, Kiln against a plain PyTorch loop"
    if cpu:
        title += " (CPU: a smoke run of the code path, not a throughput figure)"
    table = Table(title=title)
    columns = (
        "shape", "compile", "recompute", "layers", "micro", "Kiln tok/s", "plain tok/s",
        "kiln/plain (<= 1.03)", "Kiln MFU", "plain MFU", "MFU goal", "Kiln peak GiB",
        "plain peak GiB", "step-1 loss diff",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        flags = [row["shape"], "on" if row["compile"] else "off", row["recompute"]]
        if row["status"] != "ok":
            table.add_row(*flags, row["status"], *[""] * (len(columns) - 4))
            continue
        kiln, plain = row["kiln"], row["plain"]
        goal = row["mfu_goal"]
        met = "" if row["mfu_goal_met"] is None else (" met" if row["mfu_goal_met"] else " not met")
        table.add_row(
            *flags,
            str(row["layers"]),
            str(row["micro_batch"]),
            f"{kiln['tokens_per_s']:,.0f}",
            f"{plain['tokens_per_s']:,.0f}",
            f"{row['ratio']:.3f}",
            percent(kiln["mfu"]),
            percent(plain["mfu"]),
            "-" if goal is None else f">= {percent(goal)}{met}",
            gib(kiln["peak_bytes"]),
            gib(plain["peak_bytes"]),
            f"{row['first_loss_difference']:+.2e}",
        )
    return table


def markdown_rows(rows: list[dict], machine: str) -> list[str]:
    """One RESULTS.md line per measured row."""
    lines = []
    for row in rows:
        if row["status"] != "ok":
            continue
        kiln, plain = row["kiln"], row["plain"]
        lines.append(
            f"| {time.strftime('%Y-%m-%d')} | {machine} | {row['shape']} {row['precision']} "
            f"L={row['layers']} S={row['seq_length']} | {'on' if row['compile'] else 'off'} | "
            f"{row['recompute']} | {row['micro_batch']} | {plain['tokens_per_s']:,.0f} | "
            f"{kiln['tokens_per_s']:,.0f} | {percent(kiln['mfu'])} | {percent(plain['mfu'])} | "
            f"{gib(kiln['peak_bytes'])} | {gib(plain['peak_bytes'])} | {row['ratio']:.3f} |"
        )
    return lines


def comma_list(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        for item in items:
            if item not in choices:
                raise argparse.ArgumentTypeError(f"{item!r}: choose from {', '.join(choices)}")
        return items

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--shapes",
        type=comma_list(tuple(SHAPES)),
        help="default: llama-1b,llama-7b-shape on a GPU, tiny on CPU",
    )
    parser.add_argument(
        "--compile", type=comma_list(("off", "on")), default=["off", "on"], help="off,on"
    )
    parser.add_argument(
        "--recompute",
        type=comma_list(("none", "selective")),
        default=["none", "selective"],
        help="none,selective",
    )
    parser.add_argument("--steps", type=int, help="timed steps per side (GPU 8, CPU 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps per side first (GPU 2, CPU 1)")
    parser.add_argument("--micro-batch", type=int, help="0: search (GPU default); CPU 2")
    parser.add_argument("--max-micro-batch", type=int, default=64, help="the search's cap")
    parser.add_argument(
        "--layers", type=int, help="layers of the 7B shape (default: as many as fit)"
    )
    parser.add_argument(
        "--fit-tokens", type=int, default=16384, help="tokens per micro-batch the layer fit allows"
    )
    parser.add_argument("--seq-length", type=int, help="default: 2048 (tiny: 256)")
    parser.add_argument("--zero-stage", type=int, choices=[1, 2], default=1)
    parser.add_argument("--peak-tflops", type=float, help="peak of the device (default: table)")
    parser.add_argument(
        "--time-budget", type=float, help="seconds of measurement, 0 = none (GPU 330, CPU 0)"
    )
    parser.add_argument("--json", type=Path, help="write the rows here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=200)
    quiet_imports()
    device = step_timing.choose_device(args.device)
    cuda = device.type == "cuda"
    defaults = {"steps": 8, "warmup": 2, "time_budget": 330, "micro_batch": 0} if cuda else {
        "steps": 3, "warmup": 1, "time_budget": 0, "micro_batch": 2,
    }  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.warmup < 0:
        sys.exit("--steps must be at least 1 and --warmup at least 0")
    shapes = [
        SHAPES[name]
        for name in args.shapes or (["llama-1b", "llama-7b-shape"] if cuda else ["tiny"])
    ]
    compiles = [flag == "on" for flag in args.compile]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)

    bench = Bench(args, device, console)
    console.print(
        f"{device.type} ({bench.device_name}), {torch.get_num_threads()} torch threads | "
        f"torch {torch.__version__} | {bench.precision} | peak "
        f"{'n/a' if bench.peak is None else f'{bench.peak / 1e12:.0f} TFLOP/s'} | "
        f"{args.warmup} warm-up + {args.steps} timed steps per side"
    )
    if not cuda:
        console.print(
            "CPU: a smoke run of the code path only (tiny model, fp32); its figures say nothing "
            "about GPU throughput"
        )
    if cuda and bench.peak is None:
        console.print(f"no peak FLOP/s known for {bench.device_name}: pass --peak-tflops for MFU")
    failed = bench.run(shapes, compiles, args.recompute)

    console.print(results_table(bench.rows, cpu=not cuda))
    measured = [row for row in bench.rows if row["status"] == "ok"]
    for row in measured:
        if row["compile"] and row["kiln"]["compiled_graphs"] == 0:
            console.print(
                f"note: {row['shape']} compile on, {row['recompute']}: dynamo compiled no graph "
                "during Kiln's steps (the engine did not compile, or reused earlier graphs)"
            )
    for shape in shapes:
        if shape.mfu_goal is not None:
            best = [
                r["kiln"]["mfu"] for r in measured if r["shape"] == shape.name and r["kiln"]["mfu"]
            ]
            console.print(
                f"goal {shape.name}: Kiln MFU >= {percent(shape.mfu_goal)}; best measured "
                f"{percent(max(best)) if best else 'n/a'}"
            )
    console.print(f"goal: kiln/plain step time <= {RATIO_GOAL}")
    for line in markdown_rows(bench.rows, f"{platform.machine()}, {bench.device_name}"):
        print(line)
    if args.json:
        console.print(f"rows written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
