"""Validation during training: every `eval.interval` steps (0: never), before a new run's
first step, and after the last step when that is not a multiple of the interval. The loss is
the mean over `eval.batches` global batches of the validation split."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from pretrain.config.schema import EvalConfig

from .engine import Batch

if TYPE_CHECKING:
    from .trainer import Reporter


class Validator:
    """When validation is due, and the run's validation loss before training and lately."""

    def __init__(
        self,
        cfg: EvalConfig,
        global_batch_size: int,
        batches: Callable[[int, str], list[Batch]],
        evaluate: Callable[[list[Batch]], float],
    ) -> None:
        self.interval, self.count = cfg.interval, cfg.batches
        self.global_batch_size = global_batch_size
        self.batches, self.evaluate = batches, evaluate
        self.first: float | None = None  # before training (a new run only)
        self.last: float | None = None

    def due(self, step: int) -> bool:
        return bool(self.interval) and step % self.interval == 0

    def validate(self) -> float:
        """The validation loss of the model now (collective: every rank calls it)."""
        size = self.global_batch_size
        losses = [self.evaluate(self.batches(b * size, "valid")) for b in range(self.count)]
        self.last = float(np.mean(losses))
        return self.last

    def before_training(self, step: int, report: Reporter) -> None:
        """A new run (at step 0) is validated before its first step."""
        if step == 0 and self.interval:
            self.first = self.validate()
            report.log(step, val_metrics(self.first))
            report.say(f"step {step}: validation loss {self.first:.4f} (before training)")

    def after_training(self, step: int, report: Reporter) -> None:
        """Validate the last step unless that was due anyway; then the run's summary line."""
        if self.interval and step % self.interval:
            loss = self.validate()
            report.log(step, val_metrics(loss))
            report.say(f"step {step}: validation loss {loss:.4f}")
        if self.first is not None:
            report.say(f"validation loss {self.first:.4f} -> {self.last:.4f} over {step} steps")


def val_metrics(loss: float) -> dict[str, float]:
    """A validation loss's metrics."""
    return {"val_loss": loss, "val_ppl": perplexity(loss)}


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
