"""`kiln dashboard`: TensorBoard over a runs directory, live, on loopback; its scalars are a
run's metrics.jsonl, and a real headless Chromium renders its page."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, kiln_executable
from tests.support.training import records

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def dashboard(runs, tmp_path_factory):
    """`kiln dashboard` over a runs directory holding a finished 10-step run: (URL, run dir)."""
    root = tmp_path_factory.mktemp("dashboard") / "runs"
    root.mkdir()
    run_dir = root / "demo"
    shutil.copytree(runs("single"), run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    process = subprocess.Popen(
        [kiln_executable(), "dashboard", str(root), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = process.stdout.readline()
        match = re.match(r"TensorBoard: (http://\S+/) \(1 run", line)
        assert match, line
        url = match.group(1)
        deadline = time.monotonic() + 60
        while "demo/tensorboard" not in get_json(url + "data/runs"):  # its first load
            assert time.monotonic() < deadline, "TensorBoard never listed the run"
            time.sleep(0.5)
        yield url, run_dir
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_dashboard_serves_the_runs_metrics_on_loopback(dashboard):
    url, run_dir = dashboard
    assert urllib.parse.urlparse(url).hostname == "127.0.0.1"
    query = urllib.parse.urlencode({"run": "demo/tensorboard", "tag": "loss"})
    points = get_json(f"{url}data/plugin/scalars/scalars?{query}")  # [wall time, step, value]
    expected = {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}
    assert {step: value for _, step, value in points} == pytest.approx(expected, rel=1e-6)
    tags = get_json(f"{url}data/plugin/scalars/tags")["demo/tensorboard"]
    assert {"loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "host_rss_mib"} <= set(tags)


def test_headless_chromium_renders_the_dashboard(dashboard, tmp_path):
    assert CHROMIUM, "no chromium: .ci/run installs it (apt-get install chromium)"
    url, _ = dashboard
    shot = Path(tmp_path) / "dashboard.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1400,1000",
            "--virtual-time-budget=15000",  # lets the page fetch and draw its charts
            f"--screenshot={shot}",
            # the scalars dashboard (SVG charts) filtered to the losses, unsmoothed
            f"{url}#scalars&tagFilter=loss&_smoothingWeight=0",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    keep = REPO / "runs" / "screenshots"
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, keep / "dashboard.png")  # for the README and the closing note
