"""A submitted run's job, whatever ran it: its state, its logs, cancelling it.

`submission.json` in the run directory says which scheduler has the job and under which id;
each function here asks that scheduler through its own interface (Slurm's commands, kubectl,
Ray's Job Submission API, or the local launcher's process id).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from cluster.rundir import read_submission
from data_pipeline.errors import KilnError


class JobError(KilnError):
    """The scheduler could not answer, or the run was never submitted."""


def state_of(run_dir: Path) -> tuple[str, str] | None:
    """(Kiln state, the scheduler's own word), or None for a run with no submission record."""
    submission = read_submission(run_dir)
    if submission is None:
        return None
    scheduler, job_id = submission["scheduler"], submission.get("job_id")
    if scheduler == "slurm":
        from cluster.slurm.batch import job_state

        return job_state(job_id)
    if scheduler == "ray":
        from cluster.ray_jobs import job_state

        return job_state(submission["address"], job_id)
    if scheduler == "k8s":
        from cluster.k8s.manifest import kubectl_status

        return kubectl_status(job_id, submission.get("namespace", "default"))
    pid = submission.get("pid")
    if pid and _alive(pid):
        return "running", f"pid {pid}"
    return None  # finished locally: the run directory tells the rest


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cancel(run_dir: Path) -> str:
    submission = read_submission(run_dir)
    if submission is None:
        raise JobError(f"{run_dir}: no submission.json; nothing to cancel")
    scheduler, job_id = submission["scheduler"], submission.get("job_id")
    if scheduler == "slurm":
        from cluster.slurm.batch import cancel as scancel

        scancel(job_id)
        return f"scancel {job_id}: the job stops (ranks get SIGTERM, then SIGKILL)"
    if scheduler == "ray":
        from cluster.ray_jobs import cancel as stop

        stop(submission["address"], job_id)
        return f"stopped Ray job {job_id}"
    if scheduler == "k8s":
        from cluster.k8s.manifest import kubectl_delete

        result = kubectl_delete(job_id, submission.get("namespace", "default"))
        if result.returncode:
            raise JobError(f"kubectl delete pytorchjob {job_id}: {result.stderr.strip()}")
        return f"deleted PyTorchJob {job_id}"
    pid = submission.get("pid")
    if not pid or not _alive(pid):
        raise JobError(f"{run_dir}: the local run is not running")
    os.kill(pid, signal.SIGTERM)
    return f"sent SIGTERM to the launcher (pid {pid}): the run saves a checkpoint and stops"


def show_logs(run_dir: Path, follow: bool) -> None:
    submission = read_submission(run_dir) or {"scheduler": "local"}
    scheduler, job_id = submission["scheduler"], submission.get("job_id")
    if scheduler == "ray":
        from cluster.ray_jobs import logs

        logs(submission["address"], job_id, follow)
        return
    if scheduler == "k8s":
        from cluster.k8s.manifest import kubectl_logs

        result = kubectl_logs(job_id, submission.get("namespace", "default"), follow)
        sys.stdout.write(result.stdout or result.stderr)
        return
    if scheduler == "slurm":
        files = sorted(Path(run_dir).glob(f"slurm-{job_id}.out"))
    else:  # a local run: rank 0 printed to its terminal, the other ranks to logs/
        files = sorted((Path(run_dir) / "logs").glob("*.log"))
    _print_files(run_dir, files, follow)


def _print_files(run_dir: Path, files: list[Path], follow: bool) -> None:
    positions: dict[Path, int] = {}
    while True:
        for path in files:
            if not path.exists():
                continue
            with path.open("rb") as handle:
                handle.seek(positions.get(path, 0))
                chunk = handle.read()
                positions[path] = handle.tell()
            sys.stdout.write(chunk.decode("utf-8", errors="replace"))
            sys.stdout.flush()
        if not follow:
            return
        state = state_of(run_dir)
        if state is None or state[0] not in ("pending", "running"):
            follow = False  # one last read after the job ended
        time.sleep(1.0)
