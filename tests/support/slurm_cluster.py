"""A real one-host Slurm cluster for integration tests (no tests in this module).

`slurm_cluster` (session-scoped) runs `cluster/slurm/local_slurm.sh start`, which is idempotent,
and leaves the cluster RUNNING after the session: starting it is the slow part, a later session
reuses it, and CI machines are thrown away. `cluster/slurm/local_slurm.sh stop` stops it.
Missing Slurm/munge binaries FAIL the test (never skip): `.ci/run` installs them.

Use it from a test module with
`from tests.support.slurm_cluster import slurm_cluster  # noqa: F401` and
`pytestmark = pytest.mark.usefixtures("slurm_cluster")` (or a `slurm_cluster` argument).

A finished job is read with `scontrol show job -o` (the cluster keeps it for MinJobAge=600 s);
plain `sacct` does not work without slurmdbd (`sacct -c` reads the job completion log instead).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

LOCAL_SLURM = REPO / "cluster" / "slurm" / "local_slurm.sh"
NEEDED = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "slurmctld", "slurmd", "munged")
# Where a job's state is final: it will not run again by itself.
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
    }
)


@dataclass(frozen=True)
class SlurmCluster:
    root: Path  # state, spool and logs (KILN_SLURM_ROOT)
    nodes: tuple[str, ...]


def _path_with_sbin() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    missing = [tool for tool in NEEDED if shutil.which(tool, path=_path_with_sbin()) is None]
    if missing:
        pytest.fail(
            f"Slurm is not installed (missing {', '.join(missing)}). `.ci/run` installs it: "
            "DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge",
            pytrace=False,
        )
    # Two slurmd "nodes" on this host, so that multi-node jobs run for real.
    env = {**os.environ, "KILN_SLURM_NODES": "2"}
    start = [str(LOCAL_SLURM), "start"]
    proc = subprocess.run(start, capture_output=True, text=True, timeout=180, env=env)
    if proc.returncode and "stop it first" in proc.stderr:  # a one-node cluster from earlier
        subprocess.run([str(LOCAL_SLURM), "stop"], capture_output=True, timeout=180)
        proc = subprocess.run(start, capture_output=True, text=True, timeout=180, env=env)
    if proc.returncode != 0:
        pytest.fail(
            f"{LOCAL_SLURM} start failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}",
            pytrace=False,
        )
    nodes = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, check=True
    ).stdout.split()
    # No teardown: the cluster stays up (see the module docstring).
    root = Path(os.environ.get("KILN_SLURM_ROOT", "/tmp/kiln-slurm"))
    return SlurmCluster(root=root, nodes=tuple(nodes))


def sbatch(*args: str, cwd: Path | None = None) -> str:
    """Submit with `sbatch --parsable ARGS`; the job id."""
    proc = subprocess.run(
        ["sbatch", "--parsable", *args], capture_output=True, text=True, cwd=cwd, timeout=30
    )
    assert proc.returncode == 0, f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}"
    return proc.stdout.strip().split(";")[0]


_FIELD = re.compile(r"(?:^|\s)([A-Za-z][\w:/]*)=")


def job_info(job_id: str) -> dict[str, str] | None:
    """`scontrol show job -o JOBID` as a dict (JobState, ExitCode, Restarts, StdOut, ...);
    None once Slurm no longer knows the job (MinJobAge after it ended)."""
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30
    )
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return None
        raise AssertionError(f"scontrol show job {job_id} failed: {proc.stderr.strip()}")
    line = proc.stdout.strip().splitlines()[0]
    matches = list(_FIELD.finditer(line))
    return {
        m.group(1): line[m.end() : matches[i + 1].start() if i + 1 < len(matches) else len(line)]
        for i, m in enumerate(matches)
    }


def job_state(job_id: str) -> str | None:
    """RUNNING, PENDING, COMPLETED, ...; None if Slurm no longer knows the job."""
    info = job_info(job_id)
    return None if info is None else info["JobState"]


def wait_for_job(
    job_id: str, states: Iterable[str] | str, timeout: float = 30.0, poll: float = 0.25
) -> dict[str, str]:
    """Poll until the job's state is one of `states`; its `scontrol show job` fields.

    Fails early when the job reaches a final state that is not wanted (e.g. FAILED while
    waiting for COMPLETED), and on timeout, naming the last state seen.
    """
    wanted = {states} if isinstance(states, str) else set(states)
    deadline = time.monotonic() + timeout
    last = None
    while True:
        info = job_info(job_id)
        last = None if info is None else info["JobState"]
        if last in wanted:
            return info
        if last is None:
            raise AssertionError(f"job {job_id} is unknown to Slurm (wanted {sorted(wanted)})")
        if last in FINAL_STATES:
            raise AssertionError(
                f"job {job_id} ended {last} (ExitCode={info.get('ExitCode')}, "
                f"Reason={info.get('Reason')}), wanted {sorted(wanted)}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(
                f"job {job_id} still {last} (Reason={info.get('Reason')}) after {timeout} s, "
                f"wanted {sorted(wanted)}"
            )
        time.sleep(poll)


def scancel(*job_ids: str) -> None:
    """Cancel jobs, ignoring ones that already ended."""
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=30)


def in_queue(job_id: str) -> bool:
    """Whether squeue (pending, running, completing jobs) lists the job."""
    out = subprocess.run(
        ["squeue", "-h", "-j", str(job_id), "-o", "%i"], capture_output=True, text=True
    ).stdout
    return str(job_id) in out.split()
