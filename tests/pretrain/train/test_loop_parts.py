"""The training loop's parts: the divergence watch, the validator, the test faults' syntax."""

from __future__ import annotations

import math

from pretrain.config.schema import EvalConfig
from pretrain.train.checkpoint import TrainerState
from pretrain.train.divergence import DivergenceWatch
from pretrain.train.engine import StepResult
from pretrain.train.fault_injection import parse
from pretrain.train.validation import Validator

FINE = StepResult(loss=2.0, grad_norm=1.0, skipped=False)
NAN = StepResult(loss=math.nan, grad_norm=None, skipped=True)
OVERFLOW = StepResult(loss=2.0, grad_norm=None, skipped=True, overflow=True, loss_scale=1024.0)
AT_MIN = StepResult(
    loss=2.0, grad_norm=None, skipped=True, overflow=True, loss_scale=1.0, at_min_scale=True
)


def judge(watch: DivergenceWatch, state: TrainerState, results: list[StepResult]) -> list:
    lines = []
    for result in results:
        state.step += 1
        lines.append(watch.update(state, result))
    return lines


def test_divergence_counts_nan_steps_in_a_row_and_a_good_step_resets_the_streak():
    watch, state = DivergenceWatch(max_skipped_steps=2), TrainerState()
    lines = judge(watch, state, [NAN, FINE, NAN])
    assert lines[0] == "step 1: non-finite loss or gradient (loss nan), update skipped (1 in a row)"
    assert lines[1] is None and lines[2].endswith("(1 in a row)")
    assert state.skipped_steps == 2 and not watch.must_stop
    judge(watch, state, [NAN])
    assert watch.must_stop and state.skipped_steps == 3


def test_an_fp16_overflow_neither_counts_nor_breaks_the_streak_unless_at_the_minimum_scale():
    watch, state = DivergenceWatch(max_skipped_steps=3), TrainerState()
    lines = judge(watch, state, [NAN, OVERFLOW, AT_MIN])
    assert "overflowed at loss scale 1024; the loss scaler skipped the update" in lines[1]
    assert "not counted toward train.max_skipped_steps" in lines[1]
    assert "at the minimum loss scale (1): the run is diverging" in lines[2]
    assert lines[2].endswith("(2 in a row)") and state.skipped_steps == 2
    judge(watch, state, [NAN])
    assert watch.must_stop
    message = watch.stop_message(None)
    assert message.startswith("kiln train: stopping: 3 steps in a row had a NaN or Inf loss")
    assert "or fp16 gradients overflowing at the minimum loss scale" in message
    assert "(train.max_skipped_steps = 3)" in message and "none (no checkpoint yet)" in message


class Report:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []
        self.said: list[str] = []

    def log(self, step: int, values: dict) -> None:
        self.logged.append((step, values))

    def say(self, text: str) -> None:
        self.said.append(text)


def validator(interval: int, losses: list[float]) -> Validator:
    batches = iter(losses)
    return Validator(
        EvalConfig(interval=interval, batches=2),
        global_batch_size=8,
        batches=lambda first, split: [first],  # the "batch" is its first sample
        evaluate=lambda micro_batches: next(batches),
    )


def test_a_new_run_is_validated_before_training_at_the_interval_and_at_an_odd_end():
    check, report = validator(4, [3.0, 3.5, 2.0, 2.0, 1.0, 1.5]), Report()
    check.before_training(0, report)
    assert [s for s in range(1, 11) if check.due(s)] == [4, 8]
    assert check.validate() == 2.0
    check.after_training(10, report)
    assert [(step, values["val_loss"]) for step, values in report.logged] == [(0, 3.25), (10, 1.25)]
    assert report.logged[0][1]["val_ppl"] == math.exp(3.25)
    assert report.said == [
        "step 0: validation loss 3.2500 (before training)",
        "step 10: validation loss 1.2500",
        "validation loss 3.2500 -> 1.2500 over 10 steps",
    ]


def test_a_resumed_run_has_no_first_validation_and_an_interval_of_zero_none_at_all():
    resumed, report = validator(5, [2.0, 2.0]), Report()
    resumed.before_training(5, report)
    resumed.after_training(10, report)  # a multiple of the interval: validated in the loop
    assert report.logged == [] and report.said == []
    off, report = validator(0, []), Report()
    off.before_training(0, report)
    off.after_training(7, report)
    assert not any(off.due(s) for s in range(1, 10)) and report.said == []


def test_a_fault_is_named_for_one_step_a_range_or_every_step_from_one_on():
    assert parse("nan-loss@3-4, slow-save@6,fp16-on-cpu@0,nan-loss@9-") == {
        "nan-loss": [(3, 4), (9, None)],
        "slow-save": [(6, 6)],
        "fp16-on-cpu": [(0, 0)],
    }
    assert parse("") == {} and parse("no-step") == {}
