"""Slurm: the batch script of a training run, and sbatch/squeue/scontrol/sacct/scancel.

The script asks for N nodes with one task each, finds the head node in Slurm's node list, and
`srun` starts one torchrun per node (the launch plan's per-node command). Before the time limit
(`cluster.grace`: 90 s for a new run, more when its last save took long) Slurm sends USR1 to
the batch shell (`--signal=B:USR1@N`; it checks every 30 s, so the signal comes up to 30 s
late); the script sends SIGTERM to the job
step's processes (`scancel --signal=TERM`), training saves a checkpoint and exits, and the
script requeues the job, which resumes from that checkpoint when it starts again. A preempted job
(PreemptMode=REQUEUE) gets SIGTERM from Slurm directly, checkpoints the same way, and is
requeued by Slurm; `--requeue` allows both.

The job's environment is the submitting shell's: `sbatch --export=ALL` on the command line
(not in the script, and over a site's `SBATCH_EXPORT`) hands it to slurmctld, which gives it to
the batch shell and srun to the ranks. That is how WANDB_API_KEY reaches them; the script only
exports the launch plan's variables and never holds the key.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cluster.launch.plan import LaunchPlan
from data_pipeline.errors import KilnError

SCRIPT_NAME = "slurm.sbatch"
SIGNAL_BEFORE_LIMIT_S = 90
EXPORT = "--export=ALL"  # the submitting shell's environment, WANDB_API_KEY included


class SlurmError(KilnError):
    """sbatch/squeue/scancel is missing or refused the request."""


@dataclass(frozen=True)
class SlurmOptions:
    job_name: str
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    python: str = "python"
    signal_before_limit_s: int = SIGNAL_BEFORE_LIMIT_S


def render_script(plan: LaunchPlan, options: SlurmOptions) -> str:
    run_dir = plan.run_dir
    directives = [
        f"--job-name={options.job_name}",
        f"--nodes={plan.nodes}",
        "--ntasks-per-node=1",
        f"--output={run_dir}/slurm-%j.out",
        "--open-mode=append",
        "--requeue",
        f"--signal=B:USR1@{options.signal_before_limit_s}",
    ]
    if plan.gpus_per_node:
        directives.append(f"--gpus-per-node={plan.gpus_per_node}")
    else:
        directives.append(f"--cpus-per-task={plan.procs_per_node}")
    for flag, value in (
        ("partition", options.partition),
        ("time", options.time),
        ("account", options.account),
    ):
        if value:
            directives.append(f"--{flag}={value}")
    exports = "\n".join(f"export {k}={v}" for k, v in sorted(plan.env.items()))
    threads = (
        ""
        if plan.gpus_per_node
        else f"threads=$(( $(nproc) / {plan.procs_per_node} )); [ $threads -ge 1 ] || threads=1\n"
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}"
    )
    node_line = plan.node_command_line("$SLURM_NODEID", "$MASTER_ADDR", options.python)
    return f"""#!/bin/bash
# Kiln training run {run_dir.name}: written by `kiln submit --scheduler slurm`.
# Resubmit with `sbatch {EXPORT} {run_dir}/{SCRIPT_NAME}` (from a shell with
# WANDB_API_KEY when W&B is online: the job gets the submitting shell's environment); a
# requeued or resubmitted job resumes from the latest checkpoint in {run_dir}/checkpoints.
{chr(10).join(f"#SBATCH {d}" for d in directives)}
set -uo pipefail
cd {run_dir}
export PYTHONUNBUFFERED=1
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
{exports}
{threads}
echo "kiln: job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}})" \\
  "on $SLURM_JOB_NODELIST, head $MASTER_ADDR"

requeue=0
on_time_limit() {{
  echo "kiln: time limit near: checkpointing, then requeueing job $SLURM_JOB_ID"
  requeue=1
  # SIGTERM to the step's processes only (srun itself would end the step on a signal)
  scancel --signal=TERM "$SLURM_JOB_ID"
}}
trap on_time_limit USR1
# Cancel and preemption signal the step's processes themselves; the shell waits for them.
trap 'echo "kiln: SIGTERM: the job is stopping"' TERM

# srun runs the quoted command once per node; each node's rank comes from SLURM_NODEID.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c {shlex.quote(node_line)} &
step=$!
status=0
while true; do
  wait "$step"; status=$?
  kill -0 "$step" 2>/dev/null || break   # wait returned because of a trapped signal
done
if [ "$requeue" = 1 ]; then
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
"""


def write_script(plan: LaunchPlan, options: SlurmOptions) -> Path:
    path = plan.run_dir / SCRIPT_NAME
    tmp = path.with_name(f".{SCRIPT_NAME}.tmp")
    tmp.write_text(render_script(plan, options))
    tmp.chmod(0o755)
    os.replace(tmp, path)
    return path


def _run(*command: str) -> subprocess.CompletedProcess:
    if shutil.which(command[0]) is None:
        raise SlurmError(f"{command[0]} not found: is Slurm installed on this machine?")
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{command[0]} got no answer from Slurm within 60 s") from None


def sbatch_command(script: Path) -> list[str]:
    """The command that submits `script` with this environment (see EXPORT)."""
    return ["sbatch", "--parsable", EXPORT, str(script)]


def submit(script: Path) -> str:
    result = _run(*sbatch_command(script))
    if result.returncode:
        raise SlurmError(f"sbatch refused the job: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


STATE_NAMES = {
    "PENDING": "pending",
    "CONFIGURING": "pending",
    "REQUEUED": "pending",
    "REQUEUE_HOLD": "pending",
    "REQUEUE_FED": "pending",
    "RUNNING": "running",
    "COMPLETING": "running",
    "SUSPENDED": "suspended",
    "STOPPED": "suspended",
    "COMPLETED": "completed",
    "CANCELLED": "cancelled",
    "FAILED": "failed",
    "NODE_FAIL": "failed",
    "OUT_OF_MEMORY": "failed",
    "BOOT_FAIL": "failed",
    "DEADLINE": "failed",
    "TIMEOUT": "timeout",
    "PREEMPTED": "preempted",
}


def job_state(job_id: str) -> tuple[str, str]:
    """(Kiln's state name, Slurm's state): from squeue while the job is known to slurmctld
    (`scontrol show job`, which keeps finished jobs for MinJobAge), else from sacct."""
    result = _run("scontrol", "show", "job", "--oneliner", job_id)
    found = re.search(r"\bJobState=(\S+)", result.stdout) if result.returncode == 0 else None
    if found is None:
        result = _run("sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id)
        lines = result.stdout.split() if result.returncode == 0 else []
        if not lines:
            return "unknown", "unknown"
        raw = lines[-1].split()[0]
    else:
        raw = found.group(1)
    raw = raw.split()[0].rstrip("+")
    return STATE_NAMES.get(raw, raw.lower()), raw


def cancel(job_id: str) -> None:
    result = _run("scancel", job_id)
    if result.returncode:
        raise SlurmError(f"scancel {job_id}: {result.stderr.strip()}")


def log_files(run_dir: Path, job_id: str) -> list[Path]:
    return [p for p in [Path(run_dir) / f"slurm-{job_id}.out"] if p.exists()]
