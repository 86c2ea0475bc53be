"""`kiln submit --dry-run` writes what the schedulers would run; bad layouts stop before that;
`kiln runs`, `status` and `report` read a run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_kiln
from tests.support.training import SMALL, train

pytestmark = pytest.mark.integration


def submit(run_dir: Path, data: Path, *args: str):
    return run_kiln(
        "submit", str(REPO / "configs/train/tiny.yaml"), "--run-dir", str(run_dir),
        f"data.path={data}", *SMALL, "--dry-run", *args,
    )  # fmt: skip


def test_slurm_dry_run_writes_the_batch_script(data, tmp_path):
    run_dir = tmp_path / "tiny"
    result = submit(
        run_dir, data, "--scheduler", "slurm", "--nodes", "2", "--procs-per-node", "2",
        "--partition", "cpu", "--time", "01:00:00", "parallel.zero_stage=1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    script = (run_dir / "slurm.sbatch").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --partition=cpu", "#SBATCH --time=01:00:00",
                 "#SBATCH --requeue", "#SBATCH --signal=B:USR1@90", "--nnodes=2",
                 "--nproc-per-node=2", "--node-rank=$SLURM_NODEID"):  # fmt: skip
        assert line in script
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["parallel"]["data"] == 4
    assert not (run_dir / "submission.json").exists()  # nothing was submitted
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in script  # CPUs, no tensor parallelism


def test_k8s_dry_run_writes_a_pytorchjob(data, tmp_path):
    run_dir = tmp_path / "tiny"
    result = submit(run_dir, data, "--scheduler", "k8s", "--nodes", "3", "--gpus-per-node",
                    "2", "--image", "example/kiln:1", "--volume-claim", "shared",
                    "parallel.zero_stage=1", "parallel.tensor=2",
                    "train.global_batch_size=12")  # fmt: skip
    assert result.returncode == 0, result.stderr
    job = yaml.safe_load((run_dir / "pytorchjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 2)
    assert job["spec"]["nprocPerNode"] == "2"
    container = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert container["args"][-2:] == ["--run-dir", str(run_dir.resolve())]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"  # tensor parallelism on GPUs


@pytest.mark.parametrize(
    "args,message",
    [
        (["--nodes", "2", "--procs-per-node", "2", "parallel.tensor=4"], "parallel.tensor = 4"),
        (["--nodes", "2", "--gpus-per-node", "2", "train.global_batch_size=6"], "global_batch"),
        (["--nodes", "2"], "give --gpus-per-node G, or --procs-per-node P"),
    ],
)
def test_a_layout_that_does_not_fit_is_one_line_and_nothing_is_written(
    data, tmp_path, args, message
):
    run_dir = tmp_path / "tiny"
    result = submit(run_dir, data, "--scheduler", "slurm", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert not run_dir.exists()


def test_runs_status_and_report_of_a_finished_run(data, tmp_path):
    run_dir = tmp_path / "runs" / "small"
    assert train(data, run_dir, 1).returncode == 0
    listed = run_kiln("runs", str(tmp_path / "runs"))
    assert listed.returncode == 0 and "small" in listed.stdout and "completed" in listed.stdout
    status = run_kiln("status", str(run_dir))
    assert "10 / 10" in status.stdout and "val loss" in status.stdout
    report = run_kiln("report", str(run_dir))
    assert report.returncode == 0, report.stderr
    for name in ("loss.png", "lr.png", "tokens_per_s.png", "grad_norm.png"):
        assert (run_dir / "report" / name).read_bytes()[:4] == b"\x89PNG"
    assert "Steps: 10 / 10" in (run_dir / "report" / "report.md").read_text()


def test_the_stop_lead_time_is_sized_to_the_last_save(tmp_path):
    from cluster.grace import FLOOR_S, k8s_grace_period, slurm_signal_lead

    assert slurm_signal_lead(tmp_path).seconds == k8s_grace_period(tmp_path).seconds == FLOOR_S
    record = tmp_path / "checkpoints" / "last_save.json"
    record.parent.mkdir()
    record.write_text(json.dumps({"step": 300, "save_s": 140.2, "step_s": 9.5}))
    # 2 x (140.2 + 9.5) rounded up, + 30 s margin; Slurm's signal may come 30 s late.
    assert k8s_grace_period(tmp_path).seconds == 300 + 30
    assert slurm_signal_lead(tmp_path).seconds == 300 + 30 + 30
    assert "a save 140.2 s" in k8s_grace_period(tmp_path).reason
    record.write_text(json.dumps({"step": 5, "save_s": 1.0, "step_s": 0.5}))
    assert k8s_grace_period(tmp_path).seconds == FLOOR_S  # a quick save gets the floor
    record.write_text("{not json")
    lead = k8s_grace_period(tmp_path)
    assert lead.seconds == FLOOR_S and "unreadable" in lead.reason


def test_a_resubmitted_run_gets_a_lead_time_for_its_saves(data, tmp_path):
    run_dir = tmp_path / "tiny"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last_save.json").write_text(
        json.dumps({"step": 300, "save_s": 400.0, "step_s": 20.0})
    )
    result = submit(run_dir, data, "--scheduler", "slurm", "--procs-per-node", "2",
                    "--time", "04:00:00")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --signal=B:USR1@900" in (run_dir / "slurm.sbatch").read_text()
    assert "stop signal 900 s before the time limit" in result.stdout
    result = submit(run_dir, data, "--scheduler", "k8s", "--nodes", "2", "--gpus-per-node",
                    "2", "--image", "example/kiln:1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    job = yaml.safe_load((run_dir / "pytorchjob.yaml").read_text())
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 870
    assert "--shutdown-timeout=870" in pod["containers"][0]["args"]
    assert "grace period 870 s" in result.stdout
