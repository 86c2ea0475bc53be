"""How long before it is killed a training job must be told to stop, so that it can save.

A stop request (SIGTERM) is noticed at the end of the step under way, then the checkpoint is
written: the job needs about a step plus a save. Training records both after every save in
`DIR/checkpoints/last_save.json` (`{"step": N, "save_s": S, "step_s": T}`, written by rank 0
of `pretrain.train.checkpoint`); a submission sizes Slurm's `--signal` lead time and the
Kubernetes grace period from it: twice the step plus the save, plus a margin, never under the
floor. A run that has not saved yet gets the floor.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

SAVE_RECORD = Path("checkpoints") / "last_save.json"
FLOOR_S = 90
MARGIN_S = 30
SAFETY = 2.0  # saves grow with storage load; a SIGKILLed save costs the work since the last one
SLURM_SIGNAL_MAX_S = 65535  # sbatch --signal=...@N takes at most 16 bits
SLURM_POLL_S = 30  # slurmctld looks at time limits and signals this often


@dataclass(frozen=True)
class StopLead:
    """Seconds between the stop signal and the kill, and why."""

    seconds: int
    reason: str


def stop_lead(run_dir: Path, late_s: int = 0) -> StopLead:
    """The lead time a job of `run_dir` needs, from its last recorded save; `late_s`: how
    late the scheduler may deliver the signal (added to what the job needs)."""
    record = Path(run_dir) / SAVE_RECORD
    try:
        last = json.loads(record.read_text())
        step_s, save_s = float(last["step_s"]), float(last["save_s"])
    except FileNotFoundError:
        return StopLead(FLOOR_S, f"no save recorded yet: the floor, {FLOOR_S} s")
    except (OSError, ValueError, KeyError, TypeError):
        return StopLead(FLOOR_S, f"{record} is unreadable: the floor, {FLOOR_S} s")
    need = math.ceil(SAFETY * (step_s + save_s)) + MARGIN_S + late_s
    seconds = min(max(FLOOR_S, need), SLURM_SIGNAL_MAX_S)
    late = f" + {late_s} s signal delay" if late_s else ""
    return StopLead(
        seconds,
        f"at step {last.get('step')} a step took {step_s:.1f} s and a save {save_s:.1f} s: "
        f"{SAFETY:g} x their sum + {MARGIN_S} s{late} = {need} s (floor {FLOOR_S} s)",
    )


def slurm_signal_lead(run_dir: Path) -> StopLead:
    """`--signal=B:USR1@N`: slurmctld checks signals every 30 s, so one may come 30 s late."""
    return stop_lead(run_dir, late_s=SLURM_POLL_S)


def k8s_grace_period(run_dir: Path) -> StopLead:
    """`terminationGracePeriodSeconds`: the kubelet sends SIGTERM, then SIGKILL this late."""
    return stop_lead(run_dir)
