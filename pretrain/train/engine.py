"""The DeepSpeed engine around the model: one `train_step` and one `evaluate` for every layout.

With one pipeline stage the model is `Transformer` under a plain DeepSpeed engine (ZeRO 0-3);
with several it is a `PipelineModule` under DeepSpeed's pipeline engine (ZeRO 0-1). Both take
a step's micro-batches (this data-parallel rank's share of the global batch) and return the
loss averaged over the whole global batch, the gradient norm, and whether the update was
skipped, and why: a NaN or Inf loss or gradient (divergence), or, in fp16, an overflow of the
dynamically scaled gradients (DeepSpeed's loss scaler skips the step and lowers the scale;
normal while the scale settles, divergence only at the minimum scale). The learning rate is
set by the caller for every step, so it is a function of the step alone and needs no
scheduler state in checkpoints.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pretrain.config import KilnConfig, RunConfig
from pretrain.model.build import build_model
from pretrain.model.pipeline import build_pipeline
from pretrain.model.transformer import cross_entropy
from pretrain.parallel.layout import Parallel

from .optimizer import (
    GlobalNormClipper,
    NonFiniteGuard,
    make_optimizer,
    mark_replicated_parameters,
    parameter_groups,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# A micro-batch: the model's inputs, then the targets. A decoder or encoder reads (ids,
# targets); an encoder-decoder (encoder ids, decoder ids, targets).
Batch = tuple[torch.Tensor, ...]


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    skipped: bool  # no update this step, for whichever reason
    # fp16: DeepSpeed's loss scaler skipped the step because the scaled gradients overflowed
    # while the loss was finite: normal while the scale settles.
    overflow: bool = False
    loss_scale: float | None = None  # fp16: the scale this step's backward pass used
    at_min_scale: bool = False  # fp16: that scale was already DeepSpeed's minimum

    @property
    def diverged(self) -> bool:
        """A skip that counts toward `train.max_skipped_steps`: a NaN or Inf loss or
        gradient, or an fp16 overflow at the minimum loss scale."""
        return self.skipped and not (self.overflow and not self.at_min_scale)


def zero_optimization(stage: int) -> dict:
    """ZeRO settings; stage 2 reduce-scatters gradient buckets while backward runs, into one
    contiguous buffer (`zero_stage_reason` says why it is bf16's default)."""
    if stage == 2:
        return {"stage": 2, "overlap_comm": True, "contiguous_gradients": True}
    return {"stage": stage}


def deepspeed_config(cfg: RunConfig, clip_in_deepspeed: bool) -> dict:
    train, parallel = cfg.train, cfg.parallel
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "gradient_clipping": cfg.optim.grad_clip if clip_in_deepspeed else 0.0,
        "zero_optimization": zero_optimization(parallel.zero_stage),
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {
            "enabled": train.precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": train.initial_loss_scale_power,
        },
        "data_types": {"grad_accum_dtype": "fp32"} if train.precision != "fp32" else {},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def compile_enabled(cfg: KilnConfig, device: torch.device) -> bool:
    """`train.compile`, or where unset: on for GPUs, off on CPU (where compiling the small
    kernels of a CPU run costs more start-up than it saves)."""
    return cfg.train.compile if cfg.train.compile is not None else device.type == "cuda"


class PipelineLoss:
    """The loss on the last pipeline stage, passed through `checked` (`TrainEngine.checked`)."""

    def __init__(self, vocab_size: int, checked: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.vocab_size, self.checked = vocab_size, checked

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.checked(cross_entropy(logits, targets, self.vocab_size))


class TrainEngine:
    """DeepSpeed's engine, the guarded optimizer and the parallel layout, behind two calls.
    `initialize=False` skips drawing the random initial weights; `prepare_module` is called
    with the module before DeepSpeed wraps it (a resume loads the weights there)."""

    def __init__(
        self,
        cfg: RunConfig,
        parallel: Parallel,
        initialize: bool = True,
        prepare_module: Callable[[nn.Module], None] | None = None,
    ) -> None:
        import deepspeed

        self.cfg, self.parallel = cfg, parallel
        self.pipelined = parallel.layout.pipeline > 1
        dtype = DTYPES[cfg.train.precision]
        # One guard for the step's non-finite decision, shared by the loss and the optimizer.
        self.guard = NonFiniteGuard()
        self.test_nan_loss = False  # test hook: the failure tests' `nan-loss` fault, see checked
        self.loss_fn = PipelineLoss(cfg.model.vocab_size, self.checked)
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
        # Kiln clips where the optimizer sees the real parameters (ZeRO 0 in fp32), so that
        # the norm counts every parameter once; elsewhere DeepSpeed's ZeRO/bf16 code clips.
        kiln_clips = cfg.parallel.zero_stage == 0 and cfg.train.precision == "fp32"
        clipper = None
        if kiln_clips:
            grid = parallel.grid
            clipper = GlobalNormClipper(
                module,
                cfg.optim.grad_clip,
                grid.get_model_parallel_rank(),
                grid.get_model_parallel_group(),
            )
        groups = parameter_groups(module, cfg.optim)
        self.optimizer = make_optimizer(groups, cfg.optim, parallel.device, self.guard, clipper)
        self.engine, *_ = deepspeed.initialize(
            model=module,
            optimizer=self.optimizer,
            config=deepspeed_config(cfg, clip_in_deepspeed=not kiln_clips),
            mpu=None if self.pipelined else parallel.grid,
        )
        self.module = module
        scaler = self._loss_scaler()
        if scaler is not None:
            # At the minimum scale DeepSpeed would raise; the trainer counts such overflows
            # as divergence instead and stops after train.max_skipped_steps of them.
            scaler.raise_error_at_min_scale = False

    def _build_module(self, cfg: RunConfig, parallel: Parallel, dtype, initialize: bool):
        compile = compile_enabled(cfg, parallel.device)
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
                compile=compile,
            )
        return build_model(
            cfg.model,
            tensor=parallel.layout.tensor,
            seed=cfg.train.seed,
            dtype=dtype,
            recompute=cfg.train.activation_checkpointing,
            initialize=initialize,
            compile=compile,
        )

    @property
    def data_parallel_group(self):
        return self.parallel.grid.get_data_parallel_group()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def checked(self, loss: torch.Tensor) -> torch.Tensor:
        """A micro-batch's training loss, noted by the guard (NaN while `test_nan_loss`)."""
        if self.test_nan_loss:
            loss = loss * float("nan")
        self.guard.note_loss(loss)  # no host sync: read once, at the step
        return loss

    def train_step(self, micro_batches: list[Batch], lr: float) -> StepResult:
        """One optimizer step."""
        self.set_lr(lr)
        self.guard.begin_step()
        scale = self.loss_scale()
        micro_batches = [self._to_device(b) for b in micro_batches]
        if self.pipelined:
            loss = self.engine.train_batch(iter(micro_batches)).item()
        else:
            losses = []
            for batch in micro_batches:
                micro_loss = self.checked(self.engine(*batch))
                self.engine.backward(micro_loss)
                # DeepSpeed's engine.step() steps the optimizer only at the gradient
                # accumulation boundary (after the last micro-batch); every other call just
                # counts the micro-step.
                self.engine.step()
                losses.append(micro_loss.detach().float())
            loss = self._data_parallel_mean(torch.stack(losses).mean())
        # DeepSpeed's wrappers (ZeRO, fp16) set `overflow` when they skipped the step
        # themselves, before Kiln's optimizer was called; without a wrapper it is the guard's.
        skipped = self.guard.skip or bool(getattr(self.engine.optimizer, "overflow", False))
        # The loss is the mean over the whole global batch, the same on every rank: a finite
        # one means every micro-batch's loss was finite, so an fp16 skip was the scaler's.
        overflow = skipped and scale is not None and math.isfinite(loss) and not self.guard.skip
        return StepResult(
            loss=loss,
            grad_norm=self._grad_norm(),
            skipped=skipped,
            overflow=overflow,
            loss_scale=scale,
            at_min_scale=scale is not None and scale <= self._min_loss_scale(),
        )

    def loss_scale(self) -> float | None:
        """fp16's current dynamic loss scale (a host value: no sync); None otherwise."""
        scaler = self._loss_scaler()
        return None if scaler is None else float(scaler.cur_scale)

    def _loss_scaler(self):
        if self.cfg.train.precision != "fp16":
            return None
        return getattr(self.engine.optimizer, "loss_scaler", None)

    def _min_loss_scale(self) -> float:
        return float(getattr(self._loss_scaler(), "min_scale", 1.0))

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
            losses = [self.engine(*batch).float() for batch in micro_batches]
        finally:
            self.engine.train()
        return self._data_parallel_mean(torch.stack(losses).mean())

    def _grad_norm(self) -> float | None:
        if self.guard.grad_norm is not None:
            return self.guard.grad_norm
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def _data_parallel_mean(self, value: torch.Tensor) -> float:
        value = value.clone()
        dist.all_reduce(value, group=self.data_parallel_group)
        return value.item() / self.parallel.layout.data

    def _to_device(self, batch: Batch) -> Batch:
        device = self.parallel.device
        return tuple(tensor.to(device, non_blocking=True) for tensor in batch)
