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


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """A small prepared data directory (real tokenizer, shards, manifest), made once."""
    from tests.support.training import write_data_dir

    return write_data_dir(tmp_path_factory.mktemp("data") / "prepared")


@pytest.fixture(scope="session")
def bert_data(tmp_path_factory) -> Path:
    """The same corpus with a tokenizer that has the masked-LM objective's <mask> token."""
    from tests.support.training import write_data_dir

    return write_data_dir(tmp_path_factory.mktemp("bert_data") / "prepared", mask_token="<mask>")


@pytest.fixture(scope="session")
def t5_data(tmp_path_factory) -> Path:
    """The same corpus with a tokenizer that has span corruption's sentinels."""
    from pretrain.config.schema import SpanConfig
    from tests.support.training import write_data_dir

    spans = SpanConfig()
    tokens = (spans.start_token, *spans.sentinel_tokens())
    return write_data_dir(tmp_path_factory.mktemp("t5_data") / "prepared", required_tokens=tokens)


@pytest.fixture(scope="session")
def runs(tmp_path_factory, data, bert_data, t5_data):
    """`runs(name)`: the run directory of layout `name` of `training_support.LAYOUTS` after
    its complete 10-step run, trained the first time a test asks for it (an encoder's on
    `bert_data`, an encoder-decoder's on `t5_data`)."""
    from tests.support.training import LAYOUTS, train

    root = tmp_path_factory.mktemp("runs")
    done: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in done:
            nproc, overrides = LAYOUTS[name]
            prepared = {"bert": bert_data, "t5": t5_data}.get(name.split("-")[0], data)
            result = train(prepared, root / name, nproc, *overrides)
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
            (root / name / "stdout.log").write_text(result.stdout)
            done[name] = root / name
        return done[name]

    return run


@pytest.fixture(scope="module")
def one_process():
    """megatron-core's parallel state in a world of one process, for a module's in-process
    models; torn down after the module (other modules set up their own)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain.inference import single_process_group

    started = not dist.is_initialized()
    single_process_group()
    yield
    if started:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
