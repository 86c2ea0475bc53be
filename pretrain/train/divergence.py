"""Divergence: steps skipped for a NaN or Inf loss or gradient, or for an fp16 overflow at the
minimum loss scale, counted in a row; `train.max_skipped_steps` of them stop the run. An fp16
overflow above the minimum scale is the loss scaler settling: logged, but it neither counts
nor breaks the streak."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import TrainerState
from .engine import StepResult


class DivergenceWatch:
    """The streak of diverged steps, and the lines a person reads about them."""

    def __init__(self, max_skipped_steps: int) -> None:
        self.max_skipped_steps = max_skipped_steps
        self.streak = 0
        self.at_min_scale = False  # an fp16 overflow at the minimum loss scale is in the streak

    def update(self, state: TrainerState, result: StepResult) -> str | None:
        """Judge the step `state` has just taken, counting it in `state.skipped_steps` if it
        diverged; the line to print about its skipped update, if any."""
        if result.diverged:
            state.skipped_steps += 1
            self.streak += 1
            self.at_min_scale = self.at_min_scale or result.overflow
            return (
                f"step {state.step}: {skip_reason(result)}, update skipped ({self.streak} in a row)"
            )
        if result.overflow:
            return (
                f"step {state.step}: fp16 gradients overflowed at loss scale "
                f"{result.loss_scale:g}; the loss scaler skipped the update (normal while "
                "the scale settles; not counted toward train.max_skipped_steps)"
            )
        self.streak, self.at_min_scale = 0, False
        return None

    @property
    def must_stop(self) -> bool:
        return self.streak >= self.max_skipped_steps

    def stop_message(self, last_good: Path | None) -> str:
        """Why the run stops, and where to resume from."""
        scale = " or fp16 gradients overflowing at the minimum loss scale"
        return (
            f"kiln train: stopping: {self.streak} steps in a row had a NaN or Inf loss or "
            f"gradient{scale if self.at_min_scale else ''} "
            f"(train.max_skipped_steps = {self.max_skipped_steps}). "
            f"The last good checkpoint is {last_good or 'none (no checkpoint yet)'}; "
            "lower optim.lr or check the data before resuming."
        )


def skip_reason(result: StepResult) -> str:
    if result.overflow:  # and, as it counts, at the minimum scale
        return (
            f"fp16 gradients overflowed at the minimum loss scale ({result.loss_scale:g}): "
            "the run is diverging"
        )
    return f"non-finite loss or gradient (loss {result.loss})"
