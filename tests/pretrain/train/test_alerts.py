"""Run alerts: loss spikes and throughput drops against running medians, skipped steps."""

from __future__ import annotations

from pretrain.config.schema import AlertConfig
from pretrain.train.alerts import RunWatch


def feed(watch: RunWatch, steps: list[tuple[float, float, bool]]) -> list[dict[str, str]]:
    return [watch.update(loss, speed, skipped) for loss, speed, skipped in steps]


def test_a_loss_spike_is_flagged_against_the_running_median_and_kept_out_of_it():
    watch = RunWatch(AlertConfig(loss_spike=2.0, window=5, min_history=3))
    raised = feed(watch, [(4.0, 100, False)] * 3 + [(8.5, 100, False), (8.5, 100, False)])
    assert [sorted(a) for a in raised] == [[], [], [], ["loss_spike"], ["loss_spike"]]
    assert "2.1x the median of the last 3 steps (4.0000)" in raised[3]["loss_spike"]
    assert watch.update(7.9, 100, False) == {}  # under 2 x 4.0


def test_no_rule_judges_before_its_history_and_zero_switches_it_off():
    early = RunWatch(AlertConfig(loss_spike=2.0, window=50, min_history=10))
    assert feed(early, [(1.0, 100, False)] * 5 + [(100.0, 1, False)]) == [{}] * 6
    off = RunWatch(AlertConfig(loss_spike=0, throughput_drop=0, window=5, min_history=1))
    assert feed(off, [(1.0, 100, False), (100.0, 1, False)]) == [{}, {}]


def test_a_throughput_drop_and_a_skipped_step_are_flagged():
    watch = RunWatch(AlertConfig(throughput_drop=0.5, window=10, min_history=4))
    feed(watch, [(3.0, 1000, False)] * 4)
    raised = watch.update(3.0, 400, False)
    assert list(raised) == ["throughput_drop"] and "40% of the median" in raised["throughput_drop"]
    skipped = watch.update(float("nan"), 1000, True)
    assert list(skipped) == ["nonfinite"]
    # the NaN loss and the flagged 400 tok/s stay out of their medians
    assert list(watch.losses) == [3.0] * 5 and list(watch.throughputs) == [1000] * 5
