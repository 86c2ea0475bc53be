"""AdamW that refuses non-finite updates, and the parameter groups it trains.

DeepSpeed wraps the optimizer it is given (ZeRO partitions its parameters, the bf16 and fp16
wrappers keep fp32 master copies) and calls its `step()` with finished gradients. The guard
sits inside that call: when any rank saw a NaN or Inf loss or gradient in this step, every
rank skips the update together, and DeepSpeed reads `overflow` to count a skipped step.

Gradient norms must count each parameter once although TP ranks hold copies of the
replicated ones (norm weights, row-parallel biases) and the last pipeline stage a copy of a
tied embedding. `mark_replicated_parameters` tags the copies that count, which DeepSpeed's
ZeRO and bf16 norm code honours; `global_grad_norm` applies the same rule where Kiln clips.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

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


class NonFiniteGuard:
    """Mixin for a torch optimizer: `step()` skips the update on every rank when a loss or
    gradient anywhere was NaN or Inf, and, given `clip`, clips by the global norm first."""

    overflow: bool = False
    loss_nonfinite: torch.Tensor | None = None  # on the device: no host sync per micro-batch
    last_grad_norm: float | None = None
    clip_with: Callable[[], torch.Tensor] | None = None
    max_norm: float = 0.0

    def begin_step(self) -> None:
        self.overflow = False
        self.loss_nonfinite = None
        self.last_grad_norm = None
        self._decided = False

    def note_loss(self, loss: torch.Tensor) -> None:
        """Remember whether a micro-batch's loss was finite, on the device (read at `step`)."""
        bad = ~torch.isfinite(loss.detach())
        self.loss_nonfinite = bad if self.loss_nonfinite is None else self.loss_nonfinite | bad

    @torch.no_grad()
    def step(self, closure=None):
        if not getattr(self, "_decided", False):
            self._decided = True
            self.overflow = self._anything_nonfinite()
        if self.overflow:
            return None
        return super().step(closure)

    def _anything_nonfinite(self) -> bool:
        """One flag for the step, reduced over every rank: the step's single host sync."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        flag = torch.zeros(1, device=device)
        if self.loss_nonfinite is not None:
            flag = flag + self.loss_nonfinite.to(device).float()
        if self.clip_with is not None:
            norm = self.clip_with()
            self.last_grad_norm = float(norm)
            loss_bad = bool(flag.item())
            bad = loss_bad or not math.isfinite(self.last_grad_norm)
            if not bad and self.max_norm > 0 and self.last_grad_norm > self.max_norm:
                torch._foreach_mul_(grads, self.max_norm / (self.last_grad_norm + 1e-6))
            flag = torch.tensor([1.0 if bad else 0.0], device=device)
        elif grads:
            norms = torch.stack(torch._foreach_norm(grads))
            flag = flag + (~torch.isfinite(norms)).any().float()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def guarded(optimizer_class: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    return type(f"Guarded{optimizer_class.__name__}", (NonFiniteGuard, optimizer_class), {})


def make_optimizer(
    groups: list[dict], optim: OptimConfig, device: torch.device
) -> torch.optim.Optimizer:
    """torch's AdamW: fused on GPUs (one kernel for all parameters, compiled with torch, so no
    rank JIT-builds DeepSpeed's FusedAdam at start-up and no stale build lock can hang a job)."""
    common = dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    return guarded(torch.optim.AdamW)(groups, fused=device.type == "cuda" or None, **common)
