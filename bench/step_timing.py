"""What the training-step benchmarks share (`train_overhead.py`, `gpu_throughput.py`): the device
and the one-process group Kiln's engine runs in, the random-token batches both sides see, the
plain PyTorch loop Kiln is measured against, and the interleaved timing of the two.

The plain loop is the textbook one: the same `Transformer` class, built under the same seed
(on a GPU drawn on the device, as Kiln's engine draws it, so the same initial weights there
too), `torch.optim.AdamW` with Kiln's hyper-parameters and parameter groups (no decay on norm
weights and biases; torch's fused kernel on a GPU), gradient accumulation (each loss divided by
the number of micro-batches), `clip_grad_norm_` with `optim.grad_clip`, `step`, `zero_grad`.
No DeepSpeed. Its weights stay fp32 in every precision: bf16 and fp16 run the forward under
`torch.autocast` (fp16 adds a `GradScaler`). `compile=True` puts every transformer block under
`torch.compile` (PyTorch's regional compilation: one compiled block serves all of them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence

import torch

Batch = tuple[torch.Tensor, torch.Tensor]
Side = Callable[[list[Batch], float], tuple[float, float | None]]
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def choose_device(name: str) -> torch.device:
    from pretrain.parallel.layout import pick_device

    if name == "auto":
        return pick_device()
    if name == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device here")
        return pick_device()
    os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed is first imported
    return torch.device("cpu")


def single_process_group(device: torch.device):
    """Join a process group of one (gloo on CPU, NCCL on a GPU) and lay it out TP 1 x PP 1 x
    DP 1; the `Parallel` every `TrainEngine` of this process is built on."""
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
    )  # fmt: skip
    from pretrain.parallel.layout import Layout, init_distributed, setup_parallel

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    init_distributed(device)
    return setup_parallel(Layout(1, 1, 1), device)


def kiln_engine(cfg, parallel):
    """Kiln's `TrainEngine`, DeepSpeed's start-up chatter kept out of the output."""
    from pretrain.train.engine import TrainEngine

    engine = TrainEngine(cfg, parallel)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return engine


def kiln_side(engine) -> Side:
    """`engine.train_step` as a side of `interleave`: (loss, gradient norm)."""

    def step(micro: list[Batch], lr: float) -> tuple[float, float | None]:
        result = engine.train_step(micro, lr)
        return result.loss, result.grad_norm

    return step


def make_batches(cfg, count: int) -> list[list[Batch]]:
    """`count` steps of random token ids, each a list of (inputs, targets) micro-batches."""
    train = cfg.train
    generator = torch.Generator().manual_seed(train.seed)
    steps = []
    for _ in range(count):
        micro = []
        for _ in range(train.gradient_accumulation_steps):
            tokens = torch.randint(
                0,
                cfg.model.vocab_size,
                (train.micro_batch_size, train.seq_length + 1),
                generator=generator,
            )
            micro.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
        steps.append(micro)
    return steps


class PlainLoop:
    """The textbook loop: accumulate, clip, step, zero_grad."""

    def __init__(self, cfg, device: torch.device, compile: bool = False) -> None:
        from pretrain.model.transformer import Transformer
        from pretrain.train.optimizer import parameter_groups

        optim = cfg.optim
        self.cfg, self.device = cfg, device
        # Drawn where Kiln's engine draws its weights (the device on a GPU, else the CPU), so
        # that the same seed gives both sides the same initial weights.
        with torch.device(device) if device.type == "cuda" else contextlib.nullcontext():
            self.model = Transformer(
                cfg.model,
                tensor=1,
                seed=cfg.train.seed,
                recompute=cfg.train.activation_checkpointing,
            ).to(device)  # fp32 weights in every precision; autocast does the rest
        self.model.train()
        if compile:
            for block in self.model.blocks:
                block.compile()
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, optim),
            lr=optim.lr,
            betas=(optim.beta1, optim.beta2),
            eps=optim.eps,
            fused=device.type == "cuda" or None,
        )
        self.autocast = AUTOCAST[cfg.train.precision]
        self.scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None
        self.max_norm = optim.grad_clip if optim.grad_clip > 0 else float("inf")

    def train_step(self, micro_batches: list[Batch], lr: float) -> tuple[float, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses = []
        for inputs, targets in micro_batches:
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            with torch.autocast(
                self.device.type, dtype=self.autocast, enabled=self.autocast is not None
            ):
                loss = self.model(inputs, targets)
            scaled = loss / len(micro_batches)
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            losses.append(loss.detach().float())
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).mean().item(), norm.item()

    def state_bytes(self) -> int:
        """Bytes of the weights and the optimizer's state (what stays between steps)."""
        tensors = list(self.model.parameters())
        for state in self.optimizer.state.values():
            tensors += [value for value in state.values() if isinstance(value, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


def timed(device: torch.device, fn, *args):
    """(seconds, result) of one call, the device drained at both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, result


def interleave(
    device: torch.device,
    sides: dict[str, Side],
    batches: Sequence[list[Batch]],
    lr_of_step: Callable[[int], float],
    warmup: int,
    deadline: float | None = None,
) -> tuple[dict[str, list[float]], dict[str, list]]:
    """Every side trains on `batches[step]` at `lr_of_step(step)`, step by step, one side after
    the other, the side that goes first alternating every step, so that noise from other work
    on the machine hits them alike. Returns each side's step times after `warmup` steps and its
    results of every step. Past `deadline` (a `time.perf_counter()` value) it stops after the
    first timed step."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    records: dict[str, list] = {name: [] for name in sides}
    names = list(sides)
    for step, micro in enumerate(batches):
        lr = lr_of_step(step)
        for name in names if step % 2 == 0 else reversed(names):
            seconds, record = timed(device, sides[name], micro, lr)
            records[name].append(record)
            if step >= warmup:
                times[name].append(seconds)
        if deadline is not None and step >= warmup and time.perf_counter() > deadline:
            break
    return times, records
