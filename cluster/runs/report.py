"""A run's report: one PNG per metric and a short `report.md` that links them.

`write_report(run_dir)` writes `run_dir/report/{loss,lr,tokens_per_s,grad_norm}.png` and
`report.md`. Plots are drawn with matplotlib's Agg canvas (no display, no pyplot state); each
file is written to a temporary name and renamed into place. Skipped steps (null loss) are
left out of the loss curve, marked on it, and counted in the text.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pretrain.config import ConfigError, load_config, resolve_run

from .metrics import (
    Record,
    eval_records,
    is_finite,
    is_skipped,
    read_metrics,
    series,
    train_records,
)
from .render import format_duration
from .summary import RunSummary, summarize

REPORT_DIR = "report"
REPORT_FILE = "report.md"
SKIPPED_LISTED = 10  # skipped steps named in report.md; more are only counted


@dataclass(frozen=True)
class Panel:
    """One plot: a training metric against step, optionally with evaluation points."""

    name: str  # file stem
    title: str
    key: str
    ylabel: str
    overlay: str | None = None  # evaluation metric drawn as markers on the same axes
    mark_skipped: bool = False  # dotted lines at skipped steps (not part of the plotted range)


PANELS = (
    Panel("loss", "Loss", "loss", "loss", overlay="val_loss", mark_skipped=True),
    Panel("lr", "Learning rate", "lr", "learning rate"),
    Panel("tokens_per_s", "Throughput", "tokens_per_s", "tokens/s"),
    Panel("grad_norm", "Gradient norm", "grad_norm", "global gradient norm"),
)

StepRange = tuple[int, int] | None


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the plots and report.md into `out_dir` (default `run_dir/report`); return the
    path of report.md."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / REPORT_DIR
    records = read_metrics(run_dir)
    ranges = plot_metrics(records, out_dir)
    text = report_markdown(run_dir, summarize(run_dir), records, ranges)
    path = out_dir / REPORT_FILE
    _write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def plot_metrics(records: Sequence[Record], out_dir: Path) -> dict[str, StepRange]:
    """Draw every panel to `out_dir/<name>.png`; return each panel's plotted step range
    (first and last step of the data drawn), None for a panel with no data."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train, evals = train_records(records), eval_records(records)
    return {panel.name: _draw(panel, train, evals, out_dir) for panel in PANELS}


def _draw(panel: Panel, train: list[Record], evals: list[Record], out_dir: Path) -> StepRange:
    figure = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    steps, values = series(train, panel.key)
    if steps:
        axes.plot(steps, values, linewidth=1.2, label=f"train {panel.ylabel}")
    logged = [record["step"] for record in train]
    if panel.overlay:
        eval_steps, eval_values = series(evals, panel.overlay)
        if eval_steps:
            axes.plot(eval_steps, eval_values, "o", markersize=5, label="validation loss")
        logged += [record["step"] for record in evals]
    drawn = [x for line in axes.get_lines() for x in line.get_xdata()]
    if panel.mark_skipped:
        skipped = [record["step"] for record in train if is_skipped(record)]
        for index, step in enumerate(skipped):
            label = "skipped step" if index == 0 else None
            axes.axvline(step, color="tab:red", linestyle=":", linewidth=1, label=label)
    if logged and min(logged) < max(logged):  # the whole run, a skipped last step included
        pad = 0.01 * (max(logged) - min(logged))
        axes.set_xlim(min(logged) - pad, max(logged) + pad)
    if not drawn:
        axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes)
    elif panel.overlay:
        axes.legend()
    axes.set_title(panel.title)
    axes.set_xlabel("step")
    axes.set_ylabel(panel.ylabel)
    axes.grid(alpha=0.3)
    _write_atomically(out_dir / f"{panel.name}.png", lambda tmp: figure.savefig(tmp, format="png"))
    return (int(min(drawn)), int(max(drawn))) if drawn else None


def report_markdown(
    run_dir: Path, summary: RunSummary, records: Sequence[Record], ranges: dict[str, StepRange]
) -> str:
    """The text of report.md: model, progress, losses, speed, and links to the plots."""
    train, evals = train_records(records), eval_records(records)
    written = datetime.now(UTC).isoformat(timespec="seconds")
    lines = [
        f"# Run report: {summary.name}",
        "",
        f"Run directory `{run_dir}`, state {summary.state}, written {written}.",
        "",
        "## Model and batch",
        "",
        *_config_lines(run_dir),
        "",
        "## Progress",
        "",
        f"- Steps: {_progress(summary)}",
        f"- Train loss: {_train_loss_text(train)}",
        f"- Validation loss: {_validation_text(evals)}",
        f"- Median tokens/s: {_median_text(train, 'tokens_per_s')}",
        f"- Mean MFU: {_mfu_text(train)}",
        f"- Skipped steps: {_skipped_text(train)}",
        f"- Wall time: {_wall_time_text(train)}",
        f"- Last checkpoint: {summary.last_checkpoint or 'none'}",
        "",
        "## Plots",
    ]
    for panel in PANELS:
        span = ranges.get(panel.name)
        where = f"steps {span[0]}–{span[1]}" if span else "no data"
        lines += ["", f"### {panel.title} ({where})", "", f"![{panel.title}]({panel.name}.png)"]
    return "\n".join(lines) + "\n"


def _config_lines(run_dir: Path) -> list[str]:
    try:
        cfg = resolve_run(load_config(run_dir / "config.yaml"))
    except (ConfigError, OSError) as error:
        return [f"- Configuration: not readable ({error})"]
    train, m = cfg.train, cfg.model
    tokens = train.global_batch_size * train.seq_length
    return [
        f"- Model: {m.arch}, {m.num_layers} layers, hidden size {m.hidden_size}, "
        f"{m.num_heads} heads ({m.num_kv_heads} KV heads), FFN {m.ffn_hidden_size}, "
        f"vocabulary {m.vocab_size}",
        f"- Batch: {train.global_batch_size} sequences x {train.seq_length} tokens = "
        f"{tokens:,} tokens per step, {train.steps} steps",
    ]


def _progress(summary: RunSummary) -> str:
    if summary.total_steps is None:
        return f"{summary.step} / ?"
    return f"{summary.step} / {summary.total_steps} ({100 * (summary.fraction_done or 0):.1f}%)"


def _train_loss_text(train: list[Record]) -> str:
    steps, losses = series(train, "loss")
    if not steps:
        return "none logged"
    return f"first {losses[0]:.4f} (step {steps[0]}), last {losses[-1]:.4f} (step {steps[-1]})"


def _validation_text(evals: list[Record]) -> str:
    scored = [record for record in evals if is_finite(record.get("val_loss"))]
    if not scored:
        return "none logged"
    best = min(scored, key=lambda record: record["val_loss"])
    return f"best {_eval_text(best)}, last {_eval_text(scored[-1])}"


def _eval_text(record: Record) -> str:
    ppl = record.get("val_ppl")
    if ppl is None:
        ppl = math.exp(min(record["val_loss"], 50.0))
    return f"{record['val_loss']:.4f} (ppl {ppl:.2f}, step {record['step']})"


def _median_text(train: list[Record], key: str) -> str:
    _, values = series(train, key)
    return f"{statistics.median(values):,.0f}" if values else "none logged"


def _mfu_text(train: list[Record]) -> str:
    _, values = series(train, "mfu")
    if not values:
        return "not measured (CPU or unknown GPU peak)"
    return f"{100 * statistics.fmean(values):.1f}% over {len(values)} steps"


def _skipped_text(train: list[Record]) -> str:
    skipped = [record["step"] for record in train if is_skipped(record)]
    if not skipped:
        return "0"
    listed = ", ".join(str(step) for step in skipped[:SKIPPED_LISTED])
    more = ", ..." if len(skipped) > SKIPPED_LISTED else ""
    return f"{len(skipped)} (step {listed}{more})"


def _wall_time_text(train: list[Record]) -> str:
    _, times = series(train, "step_time_s")
    if not times:
        return "unknown"
    return f"{format_duration(sum(times))} (sum of step_time_s over {len(times)} steps)"


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)
