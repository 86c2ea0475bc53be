"""The local launcher with real rank processes: environment, exit codes, signals, logs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cluster.launch.local import available_cpus, launch_local
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def rank_command(script: str, directory: Path) -> list[str]:
    """A rank running `script` with the test's directory as sys.argv[1]."""
    return [sys.executable, "-c", textwrap.dedent(script), str(directory)]


def wait_for(paths: list[Path], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in paths):
        missing = [str(path) for path in paths if not path.exists()]
        assert time.monotonic() < deadline, f"never appeared: {missing}"
        time.sleep(0.02)


def start_launcher(command: list[str], nproc: int, **options: object) -> subprocess.Popen:
    """The launcher in its own session, so the test can signal it and kill its process group."""
    code = (
        "import json, sys; from cluster.launch.local import launch_local; "
        "options = json.loads(sys.argv[3]); "
        "sys.exit(launch_local(json.loads(sys.argv[1]), int(sys.argv[2]), **options))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(command), str(nproc), json.dumps(options)],
        cwd=REPO,
        start_new_session=True,
    )


def stop_group(launcher: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()


WRITE_ENV = """
    import json, os, pathlib, sys
    names = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "OMP_NUM_THREADS", "KILN_EXTRA"]
    env = {name: os.environ.get(name) for name in names}
    pathlib.Path(sys.argv[1], f"env_{os.environ['RANK']}.json").write_text(json.dumps(env))
"""


def test_each_rank_gets_its_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    code = launch_local(
        rank_command(WRITE_ENV, tmp_path), 3, env={"KILN_EXTRA": "yes"}, master_port=29123
    )
    assert code == 0
    for rank in range(3):
        env = json.loads((tmp_path / f"env_{rank}.json").read_text())
        assert env == {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "3",
            "LOCAL_WORLD_SIZE": "3",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29123",
            "OMP_NUM_THREADS": str(max(1, available_cpus() // 3)),
            "KILN_EXTRA": "yes",
        }


def test_free_port_is_shared_and_omp_threads_already_set_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert launch_local(rank_command(WRITE_ENV, tmp_path), 2) == 0
    envs = [json.loads((tmp_path / f"env_{rank}.json").read_text()) for rank in range(2)]
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]
    assert 0 < int(envs[0]["MASTER_PORT"]) < 65536
    assert envs[0]["OMP_NUM_THREADS"] == envs[1]["OMP_NUM_THREADS"] == "7"


def test_all_ranks_succeeding_returns_zero_and_restores_signal_handlers():
    def previous(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, previous)
    try:
        assert launch_local([sys.executable, "-c", "pass"], 2) == 0
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_failing_rank_stops_the_others_and_its_code_is_returned(tmp_path, capfd):
    script = """
        import os, sys, time
        if os.environ["RANK"] == "1":
            sys.exit(3)
        time.sleep(60)
    """
    started = time.monotonic()
    assert launch_local(rank_command(script, tmp_path), 3) == 3
    assert time.monotonic() - started < 3
    assert "rank 1 exited with code 3" in capfd.readouterr().err


def test_a_rank_killed_by_a_signal_reports_128_plus_the_signal(tmp_path):
    script = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert launch_local([sys.executable, "-c", script], 1) == 128 + signal.SIGKILL


def test_a_rank_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path, capfd):
    script = """
        import os, pathlib, signal, sys, time
        directory = pathlib.Path(sys.argv[1])
        if os.environ["RANK"] == "1":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            (directory / "ignoring").touch()
            time.sleep(60)
        while not (directory / "ignoring").exists():
            time.sleep(0.01)
        sys.exit(1)
    """
    started = time.monotonic()
    code = launch_local(rank_command(script, tmp_path), 2, grace_period=0.5)
    elapsed = time.monotonic() - started
    assert code == 1
    assert 0.5 <= elapsed < 3
    assert "rank 0 exited with code 1" in capfd.readouterr().err


STOP_ON_SIGTERM = """
    import os, pathlib, signal, sys, time
    directory = pathlib.Path(sys.argv[1])
    rank = os.environ["RANK"]
    def stop(signum, frame):
        (directory / f"stopped_{rank}").write_text(str(signum))
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    (directory / f"group_{rank}").write_text(str(os.getpgrp()))
    (directory / f"ready_{rank}").touch()
    time.sleep(60)
"""


def test_sigterm_to_the_launcher_reaches_every_rank(tmp_path):
    launcher = start_launcher(rank_command(STOP_ON_SIGTERM, tmp_path), 2)
    try:
        wait_for([tmp_path / "ready_0", tmp_path / "ready_1"])
        for rank in range(2):  # one process group: os.killpg on it stops the whole run
            assert (tmp_path / f"group_{rank}").read_text() == str(launcher.pid)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=3) == 0
        for rank in range(2):
            assert (tmp_path / f"stopped_{rank}").read_text() == str(int(signal.SIGTERM))
    finally:
        stop_group(launcher)


def test_a_second_signal_kills_every_rank(tmp_path):
    script = """
        import os, pathlib, signal, sys, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        pathlib.Path(sys.argv[1], f"ready_{os.environ['RANK']}").touch()
        time.sleep(60)
    """
    launcher = start_launcher(rank_command(script, tmp_path), 2)
    try:
        wait_for([tmp_path / "ready_0", tmp_path / "ready_1"])
        launcher.send_signal(signal.SIGINT)
        time.sleep(0.3)
        assert launcher.poll() is None, "ranks that ignore the first signal keep running"
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=3) == 128 + signal.SIGKILL
    finally:
        stop_group(launcher)


def test_log_dir_takes_the_output_of_ranks_after_the_first(tmp_path, capfd):
    script = "import os; print('hello from rank', os.environ['RANK'], flush=True)"
    assert launch_local([sys.executable, "-c", script], 3, log_dir=tmp_path / "logs") == 0
    out = capfd.readouterr().out
    assert "hello from rank 0" in out and "hello from rank 1" not in out
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["rank_1.log", "rank_2.log"]
    assert (tmp_path / "logs" / "rank_2.log").read_text() == "hello from rank 2\n"


def test_nproc_must_be_positive():
    with pytest.raises(ValueError, match="nproc"):
        launch_local([sys.executable, "-c", "pass"], 0)
