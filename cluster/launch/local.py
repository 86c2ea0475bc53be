"""Run one command as `nproc` ranks on this machine (`kiln train --nproc N`).

Like torchrun's standalone mode, with the signal behaviour a pretraining run needs:
- SIGINT/SIGTERM sent to the launcher are forwarded to every rank, which saves a checkpoint and
  exits on its own; the launcher waits without a timeout. A second signal SIGKILLs every rank.
- When a rank fails, the others get SIGTERM, then SIGKILL after a grace period, and the
  launcher returns the first failure's exit code (128 + N for a rank killed by signal N).

Ranks stay in the launcher's process group, so `os.killpg` on it stops the whole run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from types import FrameType

MASTER_ADDR = "127.0.0.1"
POLL_INTERVAL_S = 0.1
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)

SignalHandler = Callable[[int, FrameType | None], object] | int | None


def free_port(host: str = MASTER_ADDR) -> int:
    """A TCP port that was free a moment ago (bind port 0 and ask the kernel which it gave)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def rank_environment(
    rank: int,
    nproc: int,
    master_port: int,
    *,
    base: Mapping[str, str],
    overrides: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of local rank `rank`: `base`, the torch.distributed variables, `overrides`.

    OMP_NUM_THREADS defaults to an equal share of the CPUs unless `base` or `overrides` set it.
    """
    environment = dict(base)
    environment.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR=MASTER_ADDR,
        MASTER_PORT=str(master_port),
    )
    if "OMP_NUM_THREADS" not in environment and "OMP_NUM_THREADS" not in (overrides or {}):
        environment["OMP_NUM_THREADS"] = str(max(1, available_cpus() // nproc))
    environment.update(overrides or {})
    return environment


def exit_code(returncode: int) -> int:
    """A Popen return code as a shell reports it: 128 + N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class _SignalInbox:
    """Records SIGINT/SIGTERM for the supervising loop, which acts on them outside the handler."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, SignalHandler] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)

    def install(self) -> None:
        """Take over the signals; only the main thread may, elsewhere the defaults stay."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in FORWARDED_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(signum, handler)
        self._previous.clear()


class _Ranks:
    """The rank processes and what has been done to them."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []
        self.exit_codes: dict[int, int] = {}

    def alive(self) -> list[subprocess.Popen]:
        return [p for rank, p in enumerate(self.processes) if rank not in self.exit_codes]

    def send(self, signum: int) -> None:
        for process in self.alive():
            process.send_signal(signum)  # a no-op for a process that has just exited

    def reap(self) -> list[tuple[int, int]]:
        """(rank, exit code) of ranks that exited since the last call, in rank order."""
        exited = []
        for rank, process in enumerate(self.processes):
            if rank not in self.exit_codes and process.poll() is not None:
                self.exit_codes[rank] = exit_code(process.returncode)
                exited.append((rank, self.exit_codes[rank]))
        return exited


def launch_local(
    command: list[str],
    nproc: int,
    *,
    env: dict[str, str] | None = None,
    master_port: int | None = None,
    log_dir: Path | None = None,
    grace_period: float = 30.0,
) -> int:
    """Run `command` as `nproc` ranks on this machine; return 0 or the first failure's exit code.

    Every rank inherits the launcher's stdout/stderr, except that with `log_dir` ranks 1.. write
    both to `log_dir/rank_{r}.log`. `env` entries override everything else in the environment.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    port = master_port if master_port is not None else free_port()
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    inbox = _SignalInbox()
    ranks = _Ranks()
    inbox.install()
    try:
        with ExitStack() as logs:
            for rank in range(nproc):
                output = None
                if log_dir is not None and rank > 0:
                    output = logs.enter_context(open(log_dir / f"rank_{rank}.log", "wb"))
                ranks.processes.append(
                    subprocess.Popen(
                        command,
                        env=rank_environment(rank, nproc, port, base=os.environ, overrides=env),
                        stdout=output,
                        stderr=subprocess.STDOUT if output is not None else None,
                    )
                )
            return _supervise(ranks, inbox, grace_period)
    finally:
        ranks.send(signal.SIGKILL)  # only ranks still alive after an unexpected error
        for process in ranks.processes:
            process.wait()
        inbox.restore()


def _supervise(ranks: _Ranks, inbox: _SignalInbox, grace_period: float) -> int:
    """Wait for every rank, acting on signals and failures as they come; return the exit code."""
    handled_signals = 0
    terminated = False  # whether the ranks were already asked to stop
    first_failure: tuple[int, int] | None = None
    kill_at: float | None = None
    while ranks.alive():
        for signum in inbox.received[handled_signals:]:
            handled_signals += 1
            if handled_signals == 1:
                ranks.send(signum)
                terminated = True
            else:
                ranks.send(signal.SIGKILL)
        for rank, code in ranks.reap():
            if code != 0 and first_failure is None:
                first_failure = (rank, code)
                remaining = len(ranks.alive())
                stopping = f"; stopping the other {remaining} rank(s)" if remaining else ""
                print(
                    f"kiln launch: rank {rank} exited with code {code}{stopping}",
                    file=sys.stderr,
                    flush=True,
                )
                if not terminated:
                    ranks.send(signal.SIGTERM)
                    terminated = True
                kill_at = time.monotonic() + grace_period
        if kill_at is not None and time.monotonic() >= kill_at:
            ranks.send(signal.SIGKILL)
            kill_at = None
        if ranks.alive():
            time.sleep(POLL_INTERVAL_S)
    return first_failure[1] if first_failure is not None else 0
