"""Run directories read back: metrics, summaries, find_runs, reports and CLI rendering."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from cluster.runs import eval_records, find_runs, read_metrics, summarize, train_records
from cluster.runs.render import format_duration, runs_table, status_text
from cluster.runs.report import plot_metrics, write_report
from pretrain.config import dump_config, load_config
from tests.conftest import CONFIGS, REPO

STEPS = 40
SKIPPED = 17
STEP_TIME = 0.5
FIRST_STEP_TIME = 3.5  # the first step is slow (warm-up), which the medians must ignore
TOKENS_PER_STEP = 16 * 256
HOUR_AGO = time.time() - 3600


def loss_at(step: int) -> float:
    return 10.0 - 0.1 * step


def val_loss_at(step: int) -> float:
    return 9.5 - 0.1 * step


@pytest.fixture(scope="module")
def config_yaml() -> str:
    overrides = [f"train.steps={STEPS}", "optim.warmup_steps=2", "eval.interval=10"]
    return dump_config(load_config(CONFIGS / "train" / "tiny.yaml", overrides))


def metrics_text(last_step: int, torn: bool) -> str:
    """Step 0's evaluation, training steps 1..last_step (one skipped), evaluation every 10."""
    lines = [{"step": 0, "val_loss": val_loss_at(0), "val_ppl": math.exp(val_loss_at(0))}]
    for step in range(1, last_step + 1):
        skipped = step == SKIPPED
        step_time = FIRST_STEP_TIME if step == 1 else STEP_TIME
        record = {
            "step": step,
            "loss": None if skipped else loss_at(step),
            "lr": 1e-3 * min(step / 2, 1.0),
            "grad_norm": None if skipped else 1.0 + 1.0 / step,
            "tokens_per_s": TOKENS_PER_STEP / step_time,
            "tflops_per_device": 0.1,
            "mfu": None,
            "step_time_s": step_time,
            "memory_mib": 950.0,
            "skipped": skipped,
        }
        if step % 10 == 0:
            record.update(val_loss=val_loss_at(step), val_ppl=math.exp(val_loss_at(step)))
        lines.append(record)
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if torn:
        text += f'{{"step": {last_step + 1}, "loss": 5.9, "lr": 0.000'
    return text


def make_run(
    root: Path,
    config_yaml: str,
    name: str = "tiny",
    logged: int | None = STEPS,
    checkpoint: int | None = STEPS,
    torn: bool = True,
    modified: float = HOUR_AGO,
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(config_yaml)
    if logged is not None:
        metrics = run / "metrics.jsonl"
        metrics.write_text(metrics_text(logged, torn))
        os.utime(metrics, (modified, modified))
    if checkpoint is not None:
        tag = f"step_{checkpoint:08d}"
        (run / "checkpoints" / tag).mkdir(parents=True)
        state = {"step": checkpoint, "consumed_samples": 16 * checkpoint, "skipped_steps": 1}
        (run / "checkpoints" / tag / "trainer_state.json").write_text(json.dumps(state))
        (run / "checkpoints" / "latest").write_text(tag)
    return run


def test_read_metrics_ignores_a_torn_last_line(tmp_path, config_yaml):
    run = make_run(tmp_path, config_yaml)
    records = read_metrics(run)
    assert [record["step"] for record in records] == list(range(STEPS + 1))
    train = train_records(records)
    assert [record["step"] for record in train] == list(range(1, STEPS + 1))
    assert train[SKIPPED - 1]["loss"] is None
    assert [record["step"] for record in eval_records(records)] == [0, 10, 20, 30, 40]
    assert read_metrics(tmp_path / "missing") == []


def test_summary_of_a_completed_run(tmp_path, config_yaml):
    summary = summarize(make_run(tmp_path, config_yaml))
    assert summary.name == "tiny"
    assert summary.state == "completed"
    assert (summary.step, summary.total_steps) == (STEPS, STEPS)
    assert summary.loss == pytest.approx(sum(loss_at(s) for s in range(31, 41)) / 10)
    assert summary.val_loss == pytest.approx(val_loss_at(40))
    assert summary.val_ppl == pytest.approx(math.exp(val_loss_at(40)))
    assert summary.tokens_per_s == pytest.approx(TOKENS_PER_STEP / STEP_TIME)
    assert summary.eta_s == 0.0
    assert summary.last_checkpoint == "step_00000040"
    assert summary.updated_at is not None
    assert summary.updated_at.timestamp() == pytest.approx(HOUR_AGO, abs=1)


def test_summary_infers_stopped_and_running_and_eta(tmp_path, config_yaml):
    stopped = summarize(make_run(tmp_path, config_yaml, "killed", logged=30, checkpoint=30))
    assert stopped.state == "stopped"
    assert stopped.step == 30
    assert stopped.eta_s == pytest.approx((STEPS - 30) * STEP_TIME)

    run = make_run(tmp_path, config_yaml, "live", logged=25, checkpoint=20, modified=time.time())
    running = summarize(run)
    assert running.state == "running"
    assert running.step == 25
    assert running.last_checkpoint == "step_00000020"
    assert running.eta_s == pytest.approx((STEPS - 25) * STEP_TIME)
    assert summarize(run, state="failed").state == "failed"


def test_summary_of_a_run_not_started(tmp_path, config_yaml):
    run = make_run(tmp_path, config_yaml, logged=None, checkpoint=None)
    (run / "submission.json").write_text('{"scheduler": "slurm", "job_id": "17"}')
    summary = summarize(run)
    assert (summary.state, summary.step, summary.total_steps) == ("new", 0, STEPS)
    assert summary.loss is summary.eta_s is summary.updated_at is None
    assert summarize(run, state="pending").state == "pending"


def test_find_runs(tmp_path, config_yaml):
    root = tmp_path / "runs"
    expected = [
        make_run(root, config_yaml, "a"),
        make_run(root / "sweep", config_yaml, "b", logged=None),  # checkpoints only
        make_run(root / "sweep" / "lr", config_yaml, "c", checkpoint=None),  # depth 3
    ]
    submitted = make_run(root, config_yaml, "d", logged=None, checkpoint=None)
    (submitted / "submission.json").write_text("{}")
    expected.append(submitted)
    make_run(root / "one" / "two" / "three", config_yaml, "too-deep")
    make_run(root, config_yaml, "data", logged=None, checkpoint=None)  # a config alone
    (root / ".hidden").mkdir()
    assert find_runs(root) == sorted(expected)
    assert find_runs(root / "a") == [root / "a"]
    assert find_runs(tmp_path / "missing") == []


def test_write_report(tmp_path, config_yaml):
    run = make_run(tmp_path, config_yaml)
    path = write_report(run)
    assert path == run / "report" / "report.md"
    for name in ("loss", "lr", "tokens_per_s", "grad_norm"):
        assert (run / "report" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = path.read_text()
    assert dict(_plot_sections(text)) == {
        "loss": (0, 40),  # train loss 1..40 and validation loss from step 0
        "lr": (1, 40),
        "tokens_per_s": (1, 40),
        "grad_norm": (1, 40),
    }
    assert "llama, 4 layers, hidden size 256, 8 heads (4 KV heads)" in text
    assert "Steps: 40 / 40 (100.0%)" in text
    assert f"first {loss_at(1):.4f} (step 1), last {loss_at(40):.4f} (step 40)" in text
    best = f"{val_loss_at(40):.4f} (ppl {math.exp(val_loss_at(40)):.2f}, step 40)"
    assert f"Validation loss: best {best}, last {best}" in text
    assert "Median tokens/s: 8,192" in text
    assert "Mean MFU: not measured" in text
    assert f"Skipped steps: 1 (step {SKIPPED})" in text
    assert "Wall time: 23s" in text  # 3.5 + 39 x 0.5
    assert "Last checkpoint: step_00000040" in text
    assert not list((run / "report").glob(".*.tmp"))


def _plot_sections(text: str) -> list[tuple[str, tuple[int, int]]]:
    """(png stem, step range) for each plot section of report.md."""
    sections = re.findall(r"### .+ \(steps (\d+)–(\d+)\)\n\n!\[.+\]\((\w+)\.png\)", text)
    return [(stem, (int(first), int(last))) for first, last, stem in sections]


def test_plot_ranges_leave_out_skipped_steps(tmp_path, config_yaml):
    run = make_run(tmp_path, config_yaml, logged=SKIPPED, torn=False)  # the last step skipped
    ranges = plot_metrics(read_metrics(run), tmp_path / "out")
    assert ranges["loss"] == (0, SKIPPED - 1)  # validation from step 0, no loss at SKIPPED
    assert ranges["grad_norm"] == (1, SKIPPED - 1)
    assert ranges["lr"] == (1, SKIPPED)
    empty = plot_metrics([], tmp_path / "empty")
    assert set(empty.values()) == {None}
    assert (tmp_path / "empty" / "loss.png").is_file()


def test_render_table_and_status(tmp_path, config_yaml):
    done = summarize(make_run(tmp_path, config_yaml, "done"))
    killed = summarize(make_run(tmp_path, config_yaml, "killed", logged=30, checkpoint=30))
    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(runs_table([done, killed], now=HOUR_AGO + 90))
    table = console.file.getvalue()
    for header in ("run", "state", "step/total", "loss", "val loss", "tok/s", "ETA", "updated"):
        assert header in table
    done_row = next(line for line in table.splitlines() if line.startswith("│ done "))
    for cell in ("completed", "40/40", f"{done.loss:.4f}", "5.5000", "8.19k", "1m 30s ago"):
        assert cell in done_row
    killed_row = next(line for line in table.splitlines() if line.startswith("│ killed "))
    for cell in ("stopped", "30/40", "6.5000", "5s"):
        assert cell in killed_row

    text = status_text(killed, now=HOUR_AGO + 90)
    assert "stopped" in text
    assert "30 / 40 (75.0%)" in text
    assert f"{val_loss_at(30):.4f} (ppl {math.exp(val_loss_at(30)):.2f})" in text
    assert "8,192" in text
    assert "remaining   5s" in text
    assert "step_00000030" in text


def test_format_duration():
    assert format_duration(750) == "12m 30s"
    assert format_duration(45.2) == "45s"
    assert format_duration(3 * 3600 + 5 * 60 + 9) == "3h 05m"
    assert format_duration(2 * 86400 + 4 * 3600) == "2d 04h"


def test_run_reading_does_not_load_torch():
    code = (
        "import sys, cluster.runs.report, cluster.runs.render; "
        "assert not {'torch', 'pretrain.model', 'pretrain.train'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
