"""Test hooks: the faults the failure tests inject into a training run. Nothing else sets them.

`KILN_TEST_FAULT` holds comma-separated `name@STEP`, `name@FIRST-LAST` or `name@FIRST-`
items (a fault without a step is written `name@0`). The training code asks only the named
predicates below, each False when the variable is unset.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "KILN_TEST_FAULT"


def parse(text: str) -> dict[str, list[tuple[int, int | None]]]:
    """Fault name -> its step ranges (inclusive; None: no upper end)."""
    faults: dict[str, list[tuple[int, int | None]]] = {}
    for item in text.split(","):
        name, _, steps = item.strip().partition("@")
        if not steps:
            continue
        first, dash, last = steps.partition("-")
        high = (int(last) if last else None) if dash else int(first)
        faults.setdefault(name, []).append((int(first), high))
    return faults


def active(name: str, step: int = 0) -> bool:
    ranges = parse(os.environ.get(FAULT_ENV, "")).get(name, ())
    return any(low <= step and (high is None or step <= high) for low, high in ranges)


def nan_loss(step: int) -> bool:
    """`nan-loss`: the loss of `step` is NaN (divergence)."""
    return active("nan-loss", step)


def slow_save(step: int) -> bool:
    """`slow-save`: the background write of step `step`'s checkpoint starts late."""
    return active("slow-save", step)


def kill_during_save(step: int) -> None:
    """`kill-during-save`: rank 0 dies, as a power cut would, before step `step`'s checkpoint
    is complete."""
    if active("kill-during-save", step):
        os.kill(os.getpid(), signal.SIGKILL)


def fp16_on_cpu() -> bool:
    """`fp16-on-cpu`: allow fp16 on CPU (see `allow_fp16_on_cpu`)."""
    return active("fp16-on-cpu")


def allow_fp16_on_cpu() -> None:
    """DeepSpeed's CPU accelerator offers fp16 only where oneDNN has fp16 kernels; PyTorch's
    own CPU kernels compute it anywhere, slowly, which is enough for the tests of fp16's loss
    scaling on a machine without a GPU."""
    from deepspeed.accelerator import get_accelerator

    type(get_accelerator()).is_fp16_supported = lambda self: True
