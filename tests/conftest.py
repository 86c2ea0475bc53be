"""Shared test helpers: run the installed `kiln` command as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def kiln_executable() -> str:
    script = Path(sys.executable).parent / "kiln"
    assert script.exists(), f"the kiln console script is not installed next to {sys.executable}"
    return str(script)


def run_kiln(*args: str, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [kiln_executable(), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def kiln():
    return run_kiln
