"""Learning rate per optimizer step: linear warmup, then cosine, linear or constant.

Step s (0-based) of W warmup steps gets lr * (s + 1) / W, so the last warmup step reaches
the peak. After warmup the rate decays from lr to min_lr over the remaining steps, reaching
min_lr at `total_steps` (the last step run, total_steps - 1, is just above it); `constant`
stays at lr.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pretrain.config.schema import OptimConfig


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """The learning rate of optimizer step `step` in a run of `total_steps` steps."""
    if step < 0:
        raise ValueError(f"step = {step}: must be at least 0")
    if total_steps < 1:
        raise ValueError(f"total_steps = {total_steps}: must be at least 1")
    warmup = optim.warmup_steps
    if step < warmup:
        return optim.lr * (step + 1) / warmup
    if optim.schedule == "constant":
        return optim.lr
    progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
    if optim.schedule == "cosine":
        fraction = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        fraction = 1.0 - progress
    return optim.min_lr + (optim.lr - optim.min_lr) * fraction


def lr_lambda(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of optim.lr for `torch.optim.lr_scheduler.LambdaLR`.

    Build the optimizer with lr=optim.lr and call `scheduler.step()` after each optimizer
    step: LambdaLR applies multiplier(0) at construction, multiplier(k) before step k.
    """

    def multiplier(step: int) -> float:
        return lr_at(step, optim, total_steps) / optim.lr

    return multiplier
