"""Alerts a person watching a run wants flagged: loss spikes, throughput drops, skipped steps.

`RunWatch.update` is called once per step with what the step measured and returns the alerts
it raised: `loss_spike` when the loss exceeds `loss_spike` x the median of the last `window`
finite losses, `throughput_drop` when tokens/s fall below `throughput_drop` x their median,
`nonfinite` when the step was skipped for a NaN or Inf. Rules judge only after `min_history`
steps, and a flagged value does not enter its median (a spike would raise the bar for the next).
"""

from __future__ import annotations

import math
from collections import deque
from statistics import median

from pretrain.config.schema import AlertConfig


class RunWatch:
    """Running medians of the loss and the throughput, and the rules over them."""

    def __init__(self, cfg: AlertConfig) -> None:
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.throughputs: deque[float] = deque(maxlen=cfg.window)

    def update(self, loss: float, tokens_per_s: float, skipped: bool) -> dict[str, str]:
        """Alert name -> why, for this step's measurements."""
        alerts: dict[str, str] = {}
        if skipped:
            alerts["nonfinite"] = f"step skipped for a non-finite loss or gradient (loss {loss})"
        if math.isfinite(loss):
            spike = self._judge(self.losses, loss, self.cfg.loss_spike, above=True)
            if spike is not None:
                alerts["loss_spike"] = (
                    f"loss {loss:.4f} is {loss / spike:.1f}x the median of the last "
                    f"{len(self.losses)} steps ({spike:.4f})"
                )
            else:
                self.losses.append(loss)
        drop = self._judge(self.throughputs, tokens_per_s, self.cfg.throughput_drop, above=False)
        if drop is not None:
            alerts["throughput_drop"] = (
                f"{tokens_per_s:,.0f} tok/s is {tokens_per_s / drop:.0%} of the median of the "
                f"last {len(self.throughputs)} steps ({drop:,.0f})"
            )
        else:
            self.throughputs.append(tokens_per_s)
        return alerts

    def _judge(self, history: deque[float], value: float, factor: float, above: bool):
        """The median the value broke the rule against, or None (no rule, too little history,
        or within bounds)."""
        if not factor or len(history) < self.cfg.min_history:
            return None
        middle = median(history)
        broken = value > factor * middle if above else value < factor * middle
        return middle if broken else None
