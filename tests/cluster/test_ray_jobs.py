"""`kiln submit --scheduler ray` against a real Ray head (with its dashboard) on loopback:
the data pipeline runs as a Ray job; `kiln status` and `kiln logs` read it through Ray's Job
Submission API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, kiln_executable
from tests.support.corpus import distinct_documents, write_jsonl
from tests.support.distributed import free_port

pytestmark = pytest.mark.integration


def kiln(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [kiln_executable(), *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=120
    )


def test_data_preparation_runs_as_a_ray_job(tmp_path):
    _, _, texts = distinct_documents(seed=5, count=120)
    write_jsonl(tmp_path / "corpus" / "part0.jsonl", texts)
    config = tmp_path / "data.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(tmp_path / "shards"), "inputs": [str(tmp_path / "corpus")]},
                "tokenizer": {"vocab_size": 512, "train_sample_mb": 1},
            }
        )
    )
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{venv_bin}:{os.environ['PATH']}",  # the Ray job's `kiln` is this one
    }
    port, dashboard = free_port(), free_port()
    start = subprocess.run(
        [
            f"{venv_bin}/ray",
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--disable-usage-stats",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert start.returncode == 0, start.stderr
    try:
        run_dir = tmp_path / "run"
        address = f"http://127.0.0.1:{dashboard}"
        submitted = kiln(
            "submit", str(config), "--scheduler", "ray", "--address", address,
            "--run-dir", str(run_dir), env=env,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        record = json.loads((run_dir / "submission.json").read_text())
        assert record["scheduler"] == "ray" and record["address"] == address
        deadline = time.monotonic() + 300
        state = ""
        while time.monotonic() < deadline:
            status = kiln("status", str(run_dir), env=env)
            state = status.stdout + status.stderr
            if status.returncode or "completed" in state or "failed" in state:
                break
            time.sleep(2)
        logs = kiln("logs", str(run_dir), env=env)
        assert "completed" in state, state + logs.stdout[-3000:]
        assert "shards, tokenizer.json and manifest.json are in" in logs.stdout
        manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
        assert manifest["counts"]["kept"] > 0 and manifest["shards"]
    finally:
        subprocess.run([f"{venv_bin}/ray", "stop", "--force"], capture_output=True, env=env)
