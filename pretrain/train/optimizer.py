"""AdamW that skips its update when the step's non-finite guard says so; the guard itself;
clipping by the global norm; the parameter groups.

DeepSpeed wraps the optimizer it is given (ZeRO partitions its parameters, the bf16 and fp16
wrappers keep fp32 master copies) and calls its `step()` with finished gradients. One
`NonFiniteGuard` per engine is handed to the loss (which notes, on the device, whether each
micro-batch's loss was finite) and to `GuardedAdamW` when both are built; at the optimizer's
first `step()` of a step the guard decides, once for every rank, whether any loss or gradient
was NaN or Inf (the step's one host sync), and every rank skips the update together.
DeepSpeed reads the optimizer's `overflow` to count a skipped step where it does not wrap it.
With fp16, DeepSpeed's loss scaler decides first: an overflow there skips the step before
Kiln's optimizer is called (the engine tells a loss-scale overflow from a non-finite loss).

Gradient norms must count each parameter once although TP ranks hold copies of the
replicated ones (norm weights, row-parallel biases) and the last pipeline stage a copy of a
tied embedding. `mark_replicated_parameters` tags the copies that count, which DeepSpeed's
ZeRO and bf16 norm code honours; `GlobalNormClipper` applies the same rule where Kiln clips.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from pretrain.config.schema import OptimConfig


def parameter_groups(module: nn.Module, optim: OptimConfig) -> list[dict]:
    """Weight decay for matrices; none for norm weights and biases (GPT-NeoX, Megatron)."""
    decay, no_decay = [], []
    for parameter in module.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def counts_in_norm(parameter: torch.Tensor, model_parallel_rank: int) -> bool:
    """DeepSpeed's rule: a TP-sharded parameter counts on every rank, a replicated one on
    model-parallel rank 0 (or where it is tagged), a pipeline copy of a tied one nowhere."""
    if getattr(parameter, "ds_pipe_replicated", False):
        return False
    sharded = getattr(parameter, "tensor_model_parallel", False)
    return sharded or getattr(parameter, "model_parallel", False) or model_parallel_rank == 0


def mark_replicated_parameters(module: nn.Module, tensor_rank: int) -> None:
    """Tag TP-replicated parameters to count in norms on TP rank 0 of every pipeline stage
    (DeepSpeed would count them only on stage 0's TP rank 0, the grid's model rank 0)."""
    for parameter in module.parameters():
        if not getattr(parameter, "tensor_model_parallel", False):
            parameter.model_parallel = tensor_rank == 0


def global_grad_norm(
    parameters: Iterable[torch.Tensor], model_parallel_rank: int, model_parallel_group
) -> torch.Tensor:
    """L2 norm of all gradients of the model (data-parallel replicas hold the same ones)."""
    grads = [
        p.grad.detach()
        for p in parameters
        if p.grad is not None and counts_in_norm(p, model_parallel_rank)
    ]
    device = grads[0].device if grads else torch.device("cpu")
    squares = (
        torch.stack([g.float().pow(2).sum() for g in grads]).sum()
        if grads
        else torch.zeros((), device=device)
    )
    dist.all_reduce(squares, group=model_parallel_group)
    return squares.sqrt()


class GlobalNormClipper:
    """Clipping by the global L2 norm of the model's gradients, each parameter counted once,
    where Kiln clips: ZeRO 0 in fp32, where the optimizer holds the model's own parameters
    (elsewhere DeepSpeed's ZeRO and bf16 code clips by the same rule)."""

    def __init__(
        self, module: nn.Module, max_norm: float, model_parallel_rank: int, model_parallel_group
    ) -> None:
        self.module, self.max_norm = module, max_norm
        self.rank, self.group = model_parallel_rank, model_parallel_group

    def norm(self) -> torch.Tensor:
        """The global norm, on the device (reduced over the model-parallel group)."""
        return global_grad_norm(self.module.parameters(), self.rank, self.group)

    def clip(self, grads: list[torch.Tensor], norm: float) -> None:
        """Scale `grads` down to `max_norm` when `norm` (a finite global norm) is above it."""
        if grads and self.max_norm > 0 and norm > self.max_norm:
            torch._foreach_mul_(grads, self.max_norm / (norm + 1e-6))


class NonFiniteGuard:
    """Whether anything in this step was NaN or Inf, decided once for every rank.

    `begin_step` opens a step; the loss calls `note_loss` for each micro-batch (the flag stays
    on the device); the optimizer calls `decide` at its first `step()` of the step, with its
    gradients and, where Kiln clips, the global norm. `skip` and `grad_norm` hold the result.
    """

    def __init__(self) -> None:
        self.begin_step()

    def begin_step(self) -> None:
        self.loss_nonfinite: torch.Tensor | None = None
        self.decided = False
        self.skip = False
        self.grad_norm: float | None = None

    def note_loss(self, loss: torch.Tensor) -> None:
        """Remember whether a micro-batch's loss was finite, on the device: no host sync."""
        bad = ~torch.isfinite(loss.detach())
        self.loss_nonfinite = bad if self.loss_nonfinite is None else self.loss_nonfinite | bad

    def decide(self, grads: list[torch.Tensor], norm: torch.Tensor | None = None) -> bool:
        """Skip the update? True on every rank when a noted loss, `norm` (the global gradient
        norm, when given) or else any of `grads` was not finite on any rank. One all-reduce
        and one host sync for the step, however many times the optimizer steps."""
        if self.decided:
            return self.skip
        if norm is not None:
            device = norm.device
        else:
            device = grads[0].device if grads else torch.device("cpu")
        flag = torch.zeros((), device=device)
        if self.loss_nonfinite is not None:
            flag = flag + self.loss_nonfinite.to(device).float().reshape(())
        if norm is not None:
            flag = flag + (~torch.isfinite(norm)).float()
        elif grads:
            flag = flag + (~torch.isfinite(torch.stack(torch._foreach_norm(grads)))).any().float()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if norm is None:
            self.skip = bool(flag.item() > 0)
        else:  # the norm is the same on every rank: read it with the flag, in one copy
            bad, self.grad_norm = torch.stack([flag, norm.float().reshape(())]).tolist()
            self.skip = bad > 0
        self.decided = True
        return self.skip


class GuardedAdamW(torch.optim.AdamW):
    """torch's AdamW that consults `guard` before each update and clips with `clipper`
    (when given) once the guard has found the step finite."""

    def __init__(
        self,
        params,
        guard: NonFiniteGuard,
        clipper: GlobalNormClipper | None = None,
        **options,
    ) -> None:
        super().__init__(params, **options)
        self.guard, self.clipper = guard, clipper

    @property
    def overflow(self) -> bool:
        """Read by DeepSpeed (where it does not wrap this optimizer) to count a skipped step."""
        return self.guard.skip

    @torch.no_grad()
    def step(self, closure=None):
        # ZeRO steps each parameter group separately: the first call decides for the step.
        if not self.guard.decided:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            norm = self.clipper.norm() if self.clipper is not None else None
            if not self.guard.decide(grads, norm) and self.clipper is not None:
                assert self.guard.grad_norm is not None
                self.clipper.clip(grads, self.guard.grad_norm)
        if self.guard.skip:
            return None
        return super().step(closure)


def make_optimizer(
    groups: list[dict],
    optim: OptimConfig,
    device: torch.device,
    guard: NonFiniteGuard,
    clipper: GlobalNormClipper | None = None,
) -> GuardedAdamW:
    """torch's AdamW: fused on GPUs (one kernel for all parameters, compiled with torch, so no
    rank JIT-builds DeepSpeed's FusedAdam at start-up and no stale build lock can hang a job)."""
    common = dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    fused = device.type == "cuda" or None
    return GuardedAdamW(groups, guard, clipper, fused=fused, **common)
