"""How runs look in the terminal: the `kiln runs` table and the `kiln status` text."""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime
from types import MappingProxyType

from rich.table import Table
from rich.text import Text

from .summary import LOSS_WINDOW, RunSummary

STATE_STYLES = MappingProxyType(
    {
        "running": "green",
        "completed": "blue",
        "stopped": "yellow",
        "failed": "red",
        "cancelled": "red",
        "pending": "cyan",
        "new": "dim",
    }
)


def runs_table(summaries: Iterable[RunSummary], now: float | None = None) -> Table:
    """One row per run: run, state, step/total, loss, val loss, tok/s, ETA, updated."""
    now = time.time() if now is None else now
    table = Table(title="Kiln runs")
    table.add_column("run", no_wrap=True)
    table.add_column("state")
    for header in ("step/total", "loss", "val loss", "tok/s", "ETA", "updated"):
        table.add_column(header, justify="right")
    for summary in summaries:
        table.add_row(
            Text(summary.name),
            Text(summary.state, style=STATE_STYLES.get(summary.state, "")),
            f"{summary.step}/{summary.total_steps if summary.total_steps is not None else '?'}",
            _number(summary.loss, "{:.4f}"),
            _number(summary.val_loss, "{:.4f}"),
            format_count(summary.tokens_per_s) if summary.tokens_per_s is not None else "-",
            _eta(summary),
            _age(summary.updated_at, now),
        )
    return table


def status_text(summary: RunSummary, now: float | None = None) -> str:
    """Several `label  value` lines about one run, for `kiln status`."""
    now = time.time() if now is None else now
    done = summary.fraction_done
    progress = f"{summary.step} / {summary.total_steps or '?'}"
    if done is not None:
        progress += f" ({100 * done:.1f}%)"
    val = "-"
    if summary.val_loss is not None:
        ppl = f" (ppl {summary.val_ppl:.2f})" if summary.val_ppl is not None else ""
        val = f"{summary.val_loss:.4f}{ppl}"
    loss = "-"
    if summary.loss is not None:
        loss = f"{summary.loss:.4f} (mean of the last {LOSS_WINDOW} logged losses)"
    rate = f"{summary.tokens_per_s:,.0f}" if summary.tokens_per_s is not None else "-"
    rows = [
        ("run", f"{summary.name} ({summary.path})"),
        ("state", summary.state),
        ("step", progress),
        ("train loss", loss),
        ("val loss", val),
        ("tokens/s", rate),
        ("remaining", _eta(summary)),
        ("checkpoint", summary.last_checkpoint or "none"),
        ("updated", _age(summary.updated_at, now)),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def format_duration(seconds: float) -> str:
    """'45s', '12m 30s', '3h 05m', '2d 04h'."""
    total = max(int(round(seconds)), 0)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def format_count(value: float) -> str:
    """'950', '3.81k', '1.25M', '2.00G'."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:.0f}"


def _eta(summary: RunSummary) -> str:
    if summary.state == "completed":
        return "done"
    return format_duration(summary.eta_s) if summary.eta_s is not None else "-"


def _age(updated_at: datetime | None, now: float) -> str:
    if updated_at is None:
        return "-"
    return f"{format_duration(now - updated_at.timestamp())} ago"


def _number(value: float | None, pattern: str) -> str:
    return pattern.format(value) if value is not None else "-"
