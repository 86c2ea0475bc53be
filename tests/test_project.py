"""Project hygiene that CI must enforce: lint, and a setup that is a no-op when up to date."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_ruff_is_clean():
    ruff = Path(sys.executable).parent / "ruff"
    result = subprocess.run([ruff, "check", "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_make_setup_has_nothing_to_do_once_installed():
    # `make -q` exits 0 only when the target is up to date: nothing would be reinstalled.
    result = subprocess.run(["make", "-q", "setup"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, "make setup would reinstall although nothing changed"
