"""The W&B API key reaches the ranks without being written down: `kiln submit` with a planted
WANDB_API_KEY leaves it in no file (run directory, job directory, home), passes it to Slurm by
`sbatch --export=ALL` and to Kubernetes by a Secret reference, and refuses an online run that
would start without one. Fake `sbatch` and `kubectl` record how they were called."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.launch.plan import wandb_key_source
from tests.conftest import REPO, kiln_executable
from tests.support.training import SMALL

pytestmark = pytest.mark.integration

KEY = f"plantedkey{secrets.token_hex(15)}"  # 40 characters, as a W&B key
ONLINE = "logging.wandb.mode=online"
JOB_ID = "4242"


def fake_tools(root: Path) -> Path:
    """`sbatch` and `kubectl` that write their arguments (and sbatch the SHA-256 of the
    WANDB_API_KEY it was given, never the key) under `root/calls`; the directory to put first
    on PATH."""
    bin_dir, calls = root / "bin", root / "calls"
    bin_dir.mkdir(parents=True)
    calls.mkdir()
    (bin_dir / "sbatch").write_text(
        f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {calls}/sbatch.args\n"
        f'printf %s "$WANDB_API_KEY" | sha256sum | cut -d" " -f1 > {calls}/sbatch.key\n'
        f"echo {JOB_ID}\n"
    )
    (bin_dir / "kubectl").write_text(
        f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {calls}/kubectl.args\necho applied\n"
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def environment(root: Path, key: str | None = KEY) -> dict[str, str]:
    """This environment with `key` as WANDB_API_KEY (or none), an empty home (no ~/.netrc)
    and the fake tools first on PATH."""
    home = root / "home"
    home.mkdir(exist_ok=True)
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_BASE_URL")
    }
    bin_dir = root / "bin" if (root / "bin").is_dir() else fake_tools(root)
    env.update(HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if key is not None:
        env["WANDB_API_KEY"] = key
    return env


def kiln(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [kiln_executable(), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def submit(env: dict[str, str], run_dir: Path, data: Path, *args: str):
    return kiln(
        env, "submit", str(REPO / "configs/train/tiny.yaml"), "--run-dir", str(run_dir),
        f"data.path={data}", *SMALL, *args,
    )  # fmt: skip


def holding_the_key(root: Path) -> list[Path]:
    """Every file under `root` (recursively) whose bytes contain the planted key."""
    return [p for p in root.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]


def assert_nowhere(root: Path, result: subprocess.CompletedProcess, expected: list[Path]) -> None:
    written = {p for p in root.rglob("*") if p.is_file()}
    assert set(expected) <= written, sorted(written)  # the search saw what was written
    assert holding_the_key(root) == []
    assert KEY not in result.stdout + result.stderr


def test_slurm_submission_passes_the_key_by_sbatchs_environment_only(data, tmp_path):
    env = environment(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    result = submit(env, run_dir, data, "--scheduler", "slurm", "--procs-per-node", "1", ONLINE)
    assert result.returncode == 0, result.stderr
    assert f"submitted Slurm job {JOB_ID}" in result.stdout
    assert "W&B API key: from WANDB_API_KEY" in result.stdout
    script = run_dir / "slurm.sbatch"
    calls = tmp_path / "calls"
    # On sbatch's command line, not in the script; the key came in sbatch's environment.
    args = (calls / "sbatch.args").read_text().split()
    assert args == ["--parsable", "--export=ALL", str(script)]
    assert (calls / "sbatch.key").read_text().strip() == hashlib.sha256(KEY.encode()).hexdigest()
    text = script.read_text()
    assert "export WANDB_MODE=online" in text and "WANDB_API_KEY=" not in text
    assert "--export" not in "".join(line for line in text.splitlines() if "#SBATCH" in line)
    assert json.loads((run_dir / "submission.json").read_text())["job_id"] == JOB_ID
    expected = [script, run_dir / "config.yaml", run_dir / "submission.json"]
    assert_nowhere(tmp_path, result, [*expected, run_dir / "wandb_run_id"])


def test_slurm_dry_run_prints_the_sbatch_line_and_writes_no_key(data, tmp_path):
    env = environment(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    result = submit(
        env, run_dir, data, "--scheduler", "slurm", "--procs-per-node", "1", ONLINE, "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    script = run_dir / "slurm.sbatch"
    assert f"submit with: sbatch --parsable --export=ALL {script}" in result.stdout
    assert f"sbatch --export=ALL {script}" in script.read_text()  # the resubmission hint
    assert not (tmp_path / "calls" / "sbatch.args").exists()
    assert_nowhere(tmp_path, result, [script, run_dir / "config.yaml"])


def test_slurm_online_without_a_key_is_one_line_and_nothing_is_written(data, tmp_path):
    env = environment(tmp_path, key=None)
    run_dir = tmp_path / "runs" / "tiny"
    result = submit(env, run_dir, data, "--scheduler", "slurm", "--procs-per-node", "1", ONLINE)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "logging.wandb.mode = online" in result.stderr
    assert "export WANDB_API_KEY" in result.stderr and "wandb login" in result.stderr
    assert not run_dir.exists() and not (tmp_path / "calls" / "sbatch.args").exists()
    # A dry run submits nothing, so it needs no key; it says so.
    dry = submit(
        env, run_dir, data, "--scheduler", "slurm", "--procs-per-node", "1", ONLINE, "--dry-run"
    )
    assert dry.returncode == 0, dry.stderr
    assert "W&B API key: none here" in dry.stdout
    # `wandb login`'s ~/.netrc entry is a key too: the nodes read it from the shared home.
    netrc = Path(env["HOME"]) / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password netrc-key\n")
    netrc.chmod(0o600)
    result = submit(env, run_dir, data, "--scheduler", "slurm", "--procs-per-node", "1", ONLINE)
    assert result.returncode == 0, result.stderr
    assert f"W&B API key: from {netrc}" in result.stdout


def test_k8s_pods_read_the_key_from_a_secret(data, tmp_path):
    env = environment(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    result = submit(
        env, run_dir, data, "--scheduler", "k8s", "--nodes", "2", "--gpus-per-node", "1",
        "--image", "example/kiln:1", "--wandb-secret", "wandb-creds", "--wandb-secret-key",
        "token", ONLINE,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "W&B API key: from Secret wandb-creds, key token" in result.stdout
    manifest = run_dir / "pytorchjob.yaml"
    assert (tmp_path / "calls" / "kubectl.args").read_text().split()[:3] == [
        "apply",
        "-f",
        str(manifest),
    ]
    job = yaml.safe_load(manifest.read_text())
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    reference = {"secretKeyRef": {"name": "wandb-creds", "key": "token"}}
    for replica in replicas.values():
        (container,) = replica["template"]["spec"]["containers"]
        env_vars = {e["name"]: e for e in container["env"]}
        assert env_vars["WANDB_API_KEY"] == {"name": "WANDB_API_KEY", "valueFrom": reference}
        assert env_vars["WANDB_MODE"]["value"] == "online"
    expected = [manifest, run_dir / "config.yaml", run_dir / "submission.json"]
    assert_nowhere(tmp_path, result, expected)
    # The Secret's key defaults to api-key.
    dry = submit(
        env, run_dir, data, "--scheduler", "k8s", "--gpus-per-node", "1", "--image",
        "example/kiln:1", "--wandb-secret", "wandb-creds", ONLINE, "--dry-run",
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    (container,) = yaml.safe_load(manifest.read_text())["spec"]["pytorchReplicaSpecs"]["Master"][
        "template"
    ]["spec"]["containers"]
    (entry,) = [e for e in container["env"] if e["name"] == "WANDB_API_KEY"]
    assert entry["valueFrom"]["secretKeyRef"] == {"name": "wandb-creds", "key": "api-key"}
    assert_nowhere(tmp_path, dry, [manifest])


def test_k8s_online_without_a_secret_is_one_line_even_with_the_key_here(data, tmp_path):
    env = environment(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    for extra in ([], ["--dry-run"]):
        result = submit(
            env, run_dir, data, "--scheduler", "k8s", "--gpus-per-node", "1", "--image",
            "example/kiln:1", ONLINE, *extra,
        )  # fmt: skip
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1
        assert "logging.wandb.mode = online" in result.stderr and "--wandb-secret" in result.stderr
        assert not run_dir.exists() and not (tmp_path / "calls" / "kubectl.args").exists()
    assert holding_the_key(tmp_path) == []


def test_ray_job_directory_holds_no_key(tmp_path):
    config = tmp_path / "data.yaml"
    config.write_text(
        yaml.safe_dump(
            {"data": {"path": str(tmp_path / "shards"), "inputs": [str(tmp_path / "corpus")]}}
        )
    )
    env = environment(tmp_path)
    run_dir = tmp_path / "runs" / "prepare"
    result = kiln(
        env, "submit", str(config), "--scheduler", "ray", "--address", "http://127.0.0.1:1",
        "--run-dir", str(run_dir), ONLINE,
    )  # fmt: skip
    assert result.returncode == 2 and "cannot reach the Ray dashboard" in result.stderr
    assert_nowhere(tmp_path, result, [run_dir / "config.yaml", run_dir / "ray-job/config.yaml"])


def test_offline_wandb_files_hold_no_key(tmp_path):
    """What the ranks' tracker writes (run_dir/wandb, wandb's logs under the home) with the
    key in their environment."""
    run_dir = tmp_path / "run"
    code = (
        "import sys; from pathlib import Path; from pretrain.config.schema import WandbConfig; "
        "from pretrain.train.tracking import WandbTracker; "
        "t = WandbTracker.start(Path(sys.argv[1]), WandbConfig(mode='offline'), {'a': 1}); "
        "t.log({'loss': 1.0}, 1); t.finish()"
    )
    env = environment(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", code, str(run_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert_nowhere(tmp_path, result, [run_dir / "wandb_run_id"])


def test_the_key_source_follows_wandb(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    assert wandb_key_source({"HOME": str(home)}) is None
    assert wandb_key_source({"HOME": str(home), "WANDB_API_KEY": KEY}) == "WANDB_API_KEY"
    netrc = home / ".netrc"
    netrc.write_text("machine wandb.example.com login user password other\n")
    assert wandb_key_source({"HOME": str(home)}) is None  # not the W&B host
    server = {"HOME": str(home), "WANDB_BASE_URL": "https://wandb.example.com"}
    assert wandb_key_source(server) == str(netrc)
    elsewhere = tmp_path / "netrc"
    elsewhere.write_text("machine api.wandb.ai login user password key\n")
    assert wandb_key_source({"HOME": str(home), "NETRC": str(elsewhere)}) == str(elsewhere)
    netrc.write_text("machine api.wandb.ai login user\n")  # an entry without a key
    assert wandb_key_source({"HOME": str(home)}) is None


def test_a_manifest_refuses_a_value_for_a_variable_from_a_secret():
    from cluster.k8s.manifest import pytorchjob_manifest

    with pytest.raises(ValueError, match="env has WANDB_API_KEY") as error:
        pytorchjob_manifest(
            name="run", image="kiln:1", nodes=1, gpus_per_node=1, procs_per_node=1,
            run_dir="/runs/run", command_args=["-m", "pretrain.train.main"],
            env={"WANDB_API_KEY": KEY}, cpu=None, memory=None, volume_claim=None,
            secret_env={"WANDB_API_KEY": ("wandb", "api-key")},
        )  # fmt: skip
    assert KEY not in str(error.value)
