"""`kiln submit --scheduler slurm` through a real Slurm on this host (`local_slurm.sh`): the
tiny training job runs to completion, `kiln status` says so, `kiln cancel` stops a running job,
and a requeued job resumes from its checkpoint."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from cluster.slurm.batch import job_state
from tests.conftest import REPO, kiln_executable
from tests.support.slurm_cluster import slurm_cluster  # noqa: F401
from tests.support.training import SMALL, environment, logged_steps, losses

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("slurm_cluster")]


def kiln(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [kiln_executable(), *args],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def submit(data: Path, run_dir: Path, *overrides: str, nodes: int = 1, procs: int = 1) -> str:
    result = kiln(
        "submit", str(REPO / "configs/train/tiny.yaml"), "--scheduler", "slurm",
        "--nodes", str(nodes), "--procs-per-node", str(procs), "--run-dir", str(run_dir),
        f"data.path={data}", *SMALL, *overrides,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "submitted Slurm job" in result.stdout and "wandb" not in result.stderr
    return json.loads((run_dir / "submission.json").read_text())["job_id"]


def wait(condition, timeout: float = 240, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_a_training_job_runs_to_completion(data, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(data, run_dir)
    wait(lambda: job_state(job)[0] in ("completed", "failed", "cancelled"), what="the job")
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert job_state(job)[0] == "completed", log[-3000:]
    assert "kiln train: done, 10 steps" in log
    assert sorted(losses(run_dir)) == list(range(1, 11))
    status = kiln("status", str(run_dir))
    assert status.returncode == 0 and "completed" in status.stdout
    assert "10/10" in status.stdout.replace(" ", "")
    logs = kiln("logs", str(run_dir))
    assert "kiln train: done" in logs.stdout


def test_cancel_stops_a_running_job(data, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(data, run_dir, "train.steps=2000")
    wait(lambda: 2 in logged_steps(run_dir), what="step 2")
    result = kiln("cancel", str(run_dir))
    assert result.returncode == 0, result.stderr
    wait(lambda: job_state(job)[0] == "cancelled", timeout=90, what="cancelled")
    status = kiln("status", str(run_dir)).stdout
    assert any(line.split()[:2] == ["state", "cancelled"] for line in status.splitlines())
    assert (run_dir / "checkpoints/latest").is_file()  # SIGTERM: it saved before stopping


def test_a_requeued_job_resumes_from_its_checkpoint(data, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(data, run_dir, "train.steps=40", "checkpoint.interval=5")
    wait(lambda: 7 in logged_steps(run_dir), what="step 7")
    requeue = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    assert requeue.returncode == 0, requeue.stderr
    wait(lambda: job_state(job)[0] == "completed", timeout=300, what="the requeued job")
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert "(restart 1)" in log and "resumed from" in log, log[-3000:]
    steps = [s for s in sorted(losses(run_dir))]
    assert steps == list(range(1, 41))


def test_a_two_node_job_trains_like_one_node(data, tmp_path):
    """Two slurmd nodes on this host: srun starts one torchrun per node, rendezvous on the
    first node; data parallelism across the nodes gives the one-node losses."""
    two = tmp_path / "two-nodes"
    job = submit(data, two, "parallel.zero_stage=1", nodes=2)
    one = tmp_path / "one-node"
    reference = submit(data, one, "parallel.zero_stage=1", procs=2)
    for j in (job, reference):
        wait(lambda j=j: job_state(j)[0] in ("completed", "failed", "cancelled"), what=j)
    log = (two / f"slurm-{job}.out").read_text()
    assert job_state(job)[0] == "completed", log[-3000:]
    assert "TP 1 x PP 1 x DP 2" in log and "on kiln-node[1-2]" in log
    assert losses(two) == pytest.approx(losses(one), rel=1e-6)
    assert sorted(losses(two)) == list(range(1, 11))


def test_near_the_time_limit_the_job_checkpoints_and_requeues_itself(data, tmp_path):
    """`--time 2`: Slurm sends USR1 60-90 s before the limit (it checks every 30 s); the
    script passes SIGTERM to training, which saves, and requeues the job, which resumes."""
    run_dir = tmp_path / "run"
    result = kiln(
        "submit", str(REPO / "configs/train/tiny.yaml"), "--scheduler", "slurm",
        "--nodes", "1", "--procs-per-node", "1", "--time", "2", "--run-dir", str(run_dir),
        f"data.path={data}", *SMALL, "train.steps=100000", "checkpoint.interval=100000",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    job = json.loads((run_dir / "submission.json").read_text())["job_id"]
    log = run_dir / f"slurm-{job}.out"
    try:
        wait(
            lambda: log.exists() and "resumed from" in log.read_text(),
            timeout=200,
            what="the requeued job to resume",
        )
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    text = log.read_text()
    assert "time limit near: checkpointing" in text
    assert "(restart 1)" in text
    stopped = [line for line in text.splitlines() if "SIGTERM: saved step" in line]
    assert stopped, text[-3000:]
