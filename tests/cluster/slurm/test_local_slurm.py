"""The local Slurm cluster (cluster/slurm/local_slurm.sh) runs, cancels and requeues batch jobs."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.slurm_cluster import (
    in_queue,
    sbatch,
    scancel,
    slurm_cluster,  # noqa: F401  (the fixture, used below)
    wait_for_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("slurm_cluster")]


def test_wrapped_job_completes_and_writes_its_output(tmp_path: Path):
    job = sbatch(f"--output={tmp_path}/%j.out", "--wrap", "hostname; sleep 1")
    try:
        info = wait_for_job(job, "COMPLETED", timeout=15)
    finally:
        scancel(job)
    assert info["ExitCode"] == "0:0"
    assert (tmp_path / f"{job}.out").read_text().strip() == socket.gethostname().split(".")[0]


def test_scancel_stops_a_running_job(tmp_path: Path):
    job = sbatch(f"--output={tmp_path}/%j.out", "--wrap", "sleep 60")
    try:
        wait_for_job(job, "RUNNING", timeout=10)
        assert in_queue(job)
        scancel(job)
        wait_for_job(job, "CANCELLED", timeout=10)
    finally:
        scancel(job)
    assert not in_queue(job)


def test_requeue_runs_the_job_again_with_restart_count_1(tmp_path: Path):
    out = tmp_path / "requeue.out"
    script = tmp_path / "requeue.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --requeue\n"
        f"#SBATCH --output={out}\n"
        "#SBATCH --open-mode=append\n"
        'echo "restart=${SLURM_RESTART_COUNT:-0}"\n'
        "sleep 60\n"
    )
    job = sbatch(str(script))
    try:
        wait_for_job(job, "RUNNING", timeout=10)
        _wait_for_line(out, "restart=0", timeout=5)
        _run_ok("scontrol", "requeue", job)
        # The requeued job may start again after AuthInfo=cred_expire (5 s on this cluster).
        _wait_for_line(out, "restart=1", timeout=15)
        info = wait_for_job(job, "RUNNING", timeout=5)
        assert info["Restarts"] == "1"
    finally:
        scancel(job)


def _wait_for_line(path: Path, line: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and line in path.read_text().splitlines():
            return
        time.sleep(0.2)
    text = path.read_text() if path.exists() else "(no file)"
    raise AssertionError(f"{line!r} not in {path} after {timeout} s:\n{text}")


def _run_ok(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed: {proc.stderr.strip()}"
