"""The DeepSpeed engine around the model: one `train_step` and one `evaluate` for every layout.

With one pipeline stage the model is `Transformer` under a plain DeepSpeed engine (ZeRO 0-3);
with several it is a `PipelineModule` under DeepSpeed's pipeline engine (ZeRO 0-1). Both take
a step's micro-batches (this data-parallel rank's share of the global batch) and return the
loss averaged over the whole global batch, the gradient norm, and whether the update was
skipped. The learning rate is set by the caller for every step, so it is a function of the
step alone and needs no scheduler state in checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pretrain.config import KilnConfig
from pretrain.model.pipeline import build_pipeline
from pretrain.model.transformer import Transformer, cross_entropy
from pretrain.parallel.layout import Parallel

from .optimizer import (
    NonFiniteGuard,
    global_grad_norm,
    make_optimizer,
    mark_replicated_parameters,
    parameter_groups,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    skipped: bool


def deepspeed_config(cfg: KilnConfig, clip_in_deepspeed: bool) -> dict:
    train, parallel = cfg.train, cfg.parallel
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "gradient_clipping": cfg.optim.grad_clip if clip_in_deepspeed else 0.0,
        "zero_optimization": {"stage": parallel.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0},
        "data_types": {"grad_accum_dtype": "fp32"} if train.precision != "fp32" else {},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


class PipelineLoss:
    """The loss on the last pipeline stage; tells the guard when it is not finite."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.guard: NonFiniteGuard | None = None
        self.poison = False

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = cross_entropy(logits, targets, self.vocab_size)
        if self.poison:
            loss = loss * float("nan")
        if self.guard is not None:
            self.guard.note_loss(loss)
        return loss


class TrainEngine:
    """DeepSpeed's engine, the guarded optimizer and the parallel layout, behind two calls.
    `initialize=False` skips drawing the random initial weights; `prepare_module` is called
    with the module before DeepSpeed wraps it (a resume loads the weights there)."""

    def __init__(
        self,
        cfg: KilnConfig,
        parallel: Parallel,
        initialize: bool = True,
        prepare_module: Callable[[nn.Module], None] | None = None,
    ) -> None:
        import deepspeed

        assert cfg.model is not None
        self.cfg, self.parallel = cfg, parallel
        self.pipelined = parallel.layout.pipeline > 1
        dtype = DTYPES[cfg.train.precision]
        self.loss_fn = PipelineLoss(cfg.model.vocab_size)
        module: nn.Module
        # On a GPU the weights are drawn there: megatron-core's CPU-style initialisation draws
        # each full weight on the default device and keeps this rank's slice, so every layout
        # still gets the same full weights (for a given device type), without minutes of CPU.
        on_device = torch.device(parallel.device) if parallel.device.type == "cuda" else None
        with on_device or contextlib.nullcontext():
            module = self._build_module(cfg, parallel, dtype, initialize)
        if prepare_module is not None:
            prepare_module(module)
        mark_replicated_parameters(module, parallel.coordinates.tensor)
        optimizer = make_optimizer(parameter_groups(module, cfg.optim), cfg.optim, parallel.device)
        self.guard: NonFiniteGuard = optimizer  # type: ignore[assignment]
        self.loss_fn.guard = self.guard
        # Kiln clips where the optimizer sees the real parameters (ZeRO 0 in fp32), so that
        # the norm counts every parameter once; elsewhere DeepSpeed's ZeRO/bf16 code clips.
        kiln_clips = cfg.parallel.zero_stage == 0 and cfg.train.precision == "fp32"
        if kiln_clips:
            grid = parallel.grid
            self.guard.clip_with = lambda: global_grad_norm(
                module.parameters(),
                grid.get_model_parallel_rank(),
                grid.get_model_parallel_group(),
            )
            self.guard.max_norm = cfg.optim.grad_clip
        self.engine, *_ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            config=deepspeed_config(cfg, clip_in_deepspeed=not kiln_clips),
            mpu=None if self.pipelined else parallel.grid,
        )
        self.module = module

    def _build_module(self, cfg: KilnConfig, parallel: Parallel, dtype, initialize: bool):
        assert cfg.model is not None
        if self.pipelined:
            return build_pipeline(
                cfg.model,
                parallel.topology,
                seed=cfg.train.seed,
                dtype=dtype,
                partition=cfg.parallel.pipeline_partition,
                recompute=cfg.train.activation_checkpointing,
                loss_fn=self.loss_fn,
                initialize=initialize,
            )
        return Transformer(
            cfg.model,
            tensor=parallel.layout.tensor,
            seed=cfg.train.seed,
            dtype=dtype,
            recompute=cfg.train.activation_checkpointing,
            initialize=initialize,
        )

    @property
    def data_parallel_group(self):
        return self.parallel.grid.get_data_parallel_group()

    def set_lr(self, lr: float) -> None:
        for group in self.guard.param_groups:
            group["lr"] = lr

    def train_step(self, micro_batches: list[Batch], lr: float, poison: bool = False) -> StepResult:
        """One optimizer step; `poison` makes the loss NaN (the failure tests' fault)."""
        self.set_lr(lr)
        self.loss_fn.poison = poison
        self.guard.begin_step()
        micro_batches = [self._to_device(b) for b in micro_batches]
        if self.pipelined:
            loss = self.engine.train_batch(iter(micro_batches)).item()
        else:
            losses = []
            for inputs, targets in micro_batches:
                micro_loss = self.engine(inputs, targets)
                if poison:
                    micro_loss = micro_loss * float("nan")
                self.guard.note_loss(micro_loss)  # no host sync: read once, at the step
                self.engine.backward(micro_loss)
                self.engine.step()
                losses.append(micro_loss.detach().float())
            loss = self._data_parallel_mean(torch.stack(losses).mean())
        skipped = bool(self.guard.overflow or getattr(self.engine.optimizer, "overflow", False))
        return StepResult(loss=loss, grad_norm=self._grad_norm(), skipped=skipped)

    @torch.no_grad()
    def evaluate(self, micro_batches: list[Batch]) -> float:
        """Mean loss over these micro-batches on every data-parallel rank."""
        micro_batches = [self._to_device(b) for b in micro_batches]
        if self.pipelined:
            loss = self.engine.eval_batch(iter(micro_batches), num_micro_batches=len(micro_batches))
            self.engine.module.train()
            return float(loss)
        self.engine.eval()
        try:
            losses = [self.engine(inputs, targets).float() for inputs, targets in micro_batches]
        finally:
            self.engine.train()
        return self._data_parallel_mean(torch.stack(losses).mean())

    def _grad_norm(self) -> float | None:
        if self.guard.last_grad_norm is not None:
            return self.guard.last_grad_norm
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def _data_parallel_mean(self, value: torch.Tensor) -> float:
        value = value.clone()
        dist.all_reduce(value, group=self.data_parallel_group)
        return value.item() / self.parallel.layout.data

    def _to_device(self, batch: Batch) -> Batch:
        device = self.parallel.device
        return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
