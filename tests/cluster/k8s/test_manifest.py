"""Kubeflow PyTorchJob manifests, their YAML file, and the kubectl wrappers without a cluster."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml

from cluster.k8s.manifest import (
    JOB_NAME_MAX,
    MASTER_PORT,
    job_name,
    k8s_name,
    kubectl_apply,
    kubectl_delete,
    kubectl_logs,
    kubectl_status,
    pytorchjob_manifest,
    write_manifest,
)

ARGS = ["--shutdown-timeout=300", "-m", "pretrain.train.main", "--run-dir", "/runs/tiny-run"]
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def manifest(**changes: object) -> dict:
    options: dict = {
        "name": "tiny-run",
        "image": "registry.example/kiln:1",
        "nodes": 4,
        "gpus_per_node": 8,
        "procs_per_node": 8,
        "run_dir": "/runs/tiny-run",
        "command_args": ARGS,
        "env": {"WANDB_MODE": "offline", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"},
        "cpu": "32",
        "memory": "256Gi",
        "volume_claim": "kiln-runs",
        "namespace": "training",
    }
    options.update(changes)
    return pytorchjob_manifest(**options)


def containers(job: dict) -> list[dict]:
    specs = job["spec"]["pytorchReplicaSpecs"].values()
    return [c for spec in specs for c in spec["template"]["spec"]["containers"]]


def test_four_node_gpu_job():
    job = manifest()
    assert job["apiVersion"] == "kubeflow.org/v1"
    assert job["kind"] == "PyTorchJob"
    assert job["metadata"]["name"] == "tiny-run"
    assert job["metadata"]["namespace"] == "training"
    spec = job["spec"]
    assert spec["nprocPerNode"] == "8"
    assert spec["runPolicy"]["cleanPodPolicy"] == "None"
    replicas = spec["pytorchReplicaSpecs"]
    assert list(replicas) == ["Master", "Worker"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas["Worker"]["replicas"] == 3
    for replica in replicas.values():
        assert replica["restartPolicy"] == "OnFailure"
        pod = replica["template"]
        assert pod["metadata"]["labels"] == {
            "app.kubernetes.io/name": "kiln",
            "kiln/run": "tiny-run",
        }
        (container,) = pod["spec"]["containers"]
        assert container["name"] == "pytorch"
        assert container["image"] == "registry.example/kiln:1"
        assert container["command"] == ["torchrun"]
        assert container["args"] == ARGS
        assert container["env"] == [
            {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
            {"name": "WANDB_MODE", "value": "offline"},
        ]
        assert container["ports"] == [
            {"name": "pytorchjob-port", "containerPort": MASTER_PORT, "protocol": "TCP"}
        ]
        resources = container["resources"]
        assert resources["limits"] == {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": 8}
        assert resources["requests"] == {"cpu": "32", "memory": "256Gi"}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["dshm"] == {"name": "dshm", "emptyDir": {"medium": "Memory"}}
        assert volumes["runs"]["persistentVolumeClaim"] == {"claimName": "kiln-runs"}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts == {"/dev/shm": "dshm", "/runs": "runs"}
    assert job["metadata"]["labels"]["kiln/run"] == "tiny-run"
    assert replicas["Master"]["template"] is not replicas["Worker"]["template"]


def test_single_node_job_has_no_workers_and_no_claim():
    job = manifest(nodes=1, gpus_per_node=2, volume_claim=None, cpu=None, memory=None)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert list(replicas) == ["Master"]
    assert replicas["Master"]["replicas"] == 1
    assert job["spec"]["nprocPerNode"] == "2"
    pod = replicas["Master"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["dshm"]
    (container,) = pod["containers"]
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/dev/shm"]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 2}}


def test_cpu_only_job_asks_for_no_gpus():
    job = manifest(gpus_per_node=0, procs_per_node=4, cpu="8", memory="16Gi")
    assert job["spec"]["nprocPerNode"] == "4"
    for container in containers(job):
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        assert container["resources"]["limits"] == {"cpu": "8", "memory": "16Gi"}
    assert "nvidia.com/gpu" not in yaml.safe_dump(job)


def test_yaml_file_round_trips(tmp_path: Path):
    job = manifest()
    path = write_manifest(job, tmp_path / "k8s" / "pytorchjob.yaml")
    text = path.read_text()
    assert yaml.safe_load(text) == job
    assert "&id" not in text and "*id" not in text  # no YAML aliases between replicas
    assert text.startswith("apiVersion: kubeflow.org/v1\nkind: PyTorchJob\n")
    assert [p.name for p in path.parent.iterdir()] == ["pytorchjob.yaml"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tiny-run", "tiny-run"),
        ("Tiny_Run.2025/05", "tiny-run-2025-05"),
        ("--Mixed  CASE__", "mixed-case"),
        ("20250501-run", "kiln-20250501-run"),
        ("***", "kiln"),
    ],
)
def test_k8s_name_sanitises(text: str, expected: str):
    assert k8s_name(text) == expected
    assert k8s_name(expected) == expected


def test_long_names_are_shortened_distinctly():
    first, second = "a" * 80 + "-one", "a" * 80 + "-two"
    assert len(k8s_name(first)) == 63
    assert k8s_name(first) != k8s_name(second)
    assert DNS_LABEL.match(k8s_name(first))
    name = job_name(first)
    assert len(name) == JOB_NAME_MAX and DNS_LABEL.match(name)
    assert len(f"{name}-worker-9999") <= 63
    assert manifest(name=first)["metadata"]["name"] == name


def test_launcher_flags_the_operator_sets_are_refused():
    with pytest.raises(ValueError, match="--node-rank=0"):
        manifest(command_args=["--node-rank=0", "-m", "pretrain.train.main"])
    with pytest.raises(ValueError, match="run_dir = /tmp/run"):
        manifest(run_dir="/tmp/run")
    with pytest.raises(ValueError, match="nodes = 0"):
        manifest(nodes=0)


@pytest.fixture
def unreachable_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kubeconfig whose API server refuses connections (nothing listens on port 1)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "none", "user": {"token": "none"}}],
        "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
        "current-context": "none",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(path))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.usefixtures("unreachable_cluster")
def test_kubectl_without_a_cluster_reports_why(tmp_path: Path):
    start = time.monotonic()
    state, detail = kubectl_status("tiny-run", "training", request_timeout="5s")
    assert state == "unknown"
    assert "127.0.0.1:1" in detail and "refused" in detail
    assert "\n" not in detail
    path = write_manifest(manifest(), tmp_path / "job.yaml")
    for result in (
        kubectl_apply(path, request_timeout="5s"),
        kubectl_logs("tiny-run", "training", request_timeout="5s"),
        kubectl_delete("tiny-run", "training", request_timeout="5s"),
    ):
        assert result.returncode != 0
        assert "127.0.0.1:1" in result.stderr
    assert time.monotonic() - start < 10


def test_missing_kubectl_is_an_answer_not_an_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert kubectl_status("tiny-run") == (
        "unknown",
        "kubectl not found on PATH: install kubectl and point it at the cluster "
        "(KUBECONFIG or ~/.kube/config)",
    )
    for result in (
        kubectl_apply(tmp_path / "job.yaml"),
        kubectl_logs("tiny-run", follow=True),
        kubectl_delete("tiny-run"),
    ):
        assert result.returncode == 127
        assert "kubectl not found" in result.stderr


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ([], ("pending", "no conditions yet")),
        ([{"type": "Created", "status": "True"}], ("pending", "Created")),
        (
            [{"type": "Created", "status": "True"}, {"type": "Running", "status": "True"}],
            ("running", "Running"),
        ),
        (
            [
                {"type": "Created", "status": "True"},
                {"type": "Running", "status": "False"},
                {"type": "Succeeded", "status": "True"},
            ],
            ("completed", "Succeeded"),
        ),
        (
            [{"type": "Running", "status": "False"}, {"type": "Failed", "status": "True"}],
            ("failed", "Failed"),
        ),
        ([{"type": "Restarting", "status": "True"}], ("pending", "Restarting")),
    ],
)
def test_status_reads_the_last_true_condition(
    conditions: list[dict], expected: tuple[str, str], tmp_path: Path, monkeypatch
):
    reply = tmp_path / "reply.json"
    reply.write_text(json.dumps({"kind": "PyTorchJob", "status": {"conditions": conditions}}))
    fake = tmp_path / "kubectl"
    fake.write_text(f"#!/bin/sh\ncat {reply}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert kubectl_status("tiny-run") == expected
