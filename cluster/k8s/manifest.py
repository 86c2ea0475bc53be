"""Kubernetes: a training run as a Kubeflow `PyTorchJob` (kubeflow.org/v1), and kubectl.

One pod per node: a `Master` replica and `nodes - 1` `Worker` replicas, each running
`torchrun <command_args>`. torchrun takes every flag's default from `PET_<FLAG>` in the
environment (torch/distributed/argparse_util.py `env`; run.py uses it for `--nnodes`,
`--nproc-per-node`, `--node-rank`, `--master-addr`, `--master-port`, and `--rdzv-backend`
defaults to `static`), and the operator sets exactly those variables, so the pod's command names
no rank or address; `command_args` must not repeat those flags, a flag would override them.

What the training operator does (kubeflow/training-operator, now kubeflow/trainer, v1.7 or later;
`spec.nprocPerNode` and the PET_* variables without `elasticPolicy` came with kubeflow/trainer
PR #1840):
- pkg/apis/kubeflow.org/v1/pytorch_types.go: `spec.pytorchReplicaSpecs` maps `Master`/`Worker`
  to {replicas, restartPolicy, template}; `spec.nprocPerNode` is a string (int, auto, cpu, gpu;
  defaults to "auto"); the container must be named `pytorch` and its port named
  `pytorchjob-port` (default 23456, added by the defaulter when missing) is the master port.
- common_types.go: `runPolicy` {cleanPodPolicy (default None), backoffLimit,
  ttlSecondsAfterFinished, activeDeadlineSeconds, schedulingPolicy}; `status.conditions[].type`
  is Created, Running, Restarting, Succeeded, Failed (and Suspended in later releases);
  `kubectl get pytorchjob` shows the last condition's type.
- pkg/controller.v1/pytorch/envvar.go `setPodEnv` and master.go, when a Master replica exists,
  in every container: MASTER_ADDR = PET_MASTER_ADDR = `<job>-master-0` (that pod's Service),
  MASTER_PORT = PET_MASTER_PORT = the `pytorchjob-port`, RANK = PET_NODE_RANK = the pod's index
  (Master 0, Worker i -> i + 1), PET_NPROC_PER_NODE = spec.nprocPerNode, PET_NNODES = number of
  pods (without elasticPolicy), WORLD_SIZE = pods x nprocPerNode (pods alone before v1.7;
  torchrun sets its workers' own RANK and WORLD_SIZE either way), PYTHONUNBUFFERED = 0.
- initcontainer.go: Worker pods get an init container that waits until `<job>-master-0`
  resolves, so workers do not race the master's Service.

Secrets (the W&B API key) reach the container as `valueFrom: {secretKeyRef: {name, key}}`
entries of its env (`secret_env`): the kubelet reads the Secret when it starts the pod, and the
manifest names the Secret, never its value.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from cluster.grace import FLOOR_S

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
CONTAINER_NAME = "pytorch"  # the operator finds the training container by this name
PORT_NAME = "pytorchjob-port"  # ... and the master port by this name
MASTER_PORT = 23456  # the operator's default
BACKOFF_LIMIT = 3  # restarts of the job before the operator marks it Failed
DNS_LABEL_MAX = 63
# Pods and their Services are named `<job>-worker-<index>`, which must stay a DNS label too.
JOB_NAME_MAX = DNS_LABEL_MAX - len("-worker-9999")
TORCHRUN_FLAGS_FROM_OPERATOR = (
    "--nnodes",
    "--nproc-per-node",
    "--nproc_per_node",
    "--node-rank",
    "--node_rank",
    "--master-addr",
    "--master_addr",
    "--master-port",
    "--master_port",
)
CONDITION_STATES = {
    "Created": "pending",
    "Restarting": "pending",
    "Suspended": "suspended",
    "Running": "running",
    "Succeeded": "completed",
    "Failed": "failed",
}
KUBECTL_TIMEOUT_S = 120


def k8s_name(text: str, max_length: int = DNS_LABEL_MAX) -> str:
    """`text` as a DNS label: lowercase [a-z0-9-], starting with a letter (Services need one),
    at most `max_length` long; a shortened name ends in a hash of `text` to stay distinct."""
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "kiln"
    if not name[0].isalpha():
        name = f"kiln-{name}"
    if len(name) > max_length:
        digest = hashlib.sha1(text.encode()).hexdigest()[:6]
        name = f"{name[: max_length - 7].rstrip('-')}-{digest}"
    return name


def job_name(run_name: str) -> str:
    """The PyTorchJob name of a run, short enough for its pods' names."""
    return k8s_name(run_name, JOB_NAME_MAX)


def _check_arguments(
    nodes: int, gpus_per_node: int, procs_per_node: int, command_args: list[str]
) -> None:
    if nodes < 1:
        raise ValueError(f"nodes = {nodes}: a PyTorchJob needs at least one node")
    if gpus_per_node < 0:
        raise ValueError(f"gpus_per_node = {gpus_per_node}: must be 0 or more")
    if not gpus_per_node and procs_per_node < 1:
        raise ValueError(f"procs_per_node = {procs_per_node}: CPU nodes need at least one process")
    launcher_args = command_args[: command_args.index("-m")] if "-m" in command_args else []
    for arg in launcher_args:
        if arg.split("=")[0] in TORCHRUN_FLAGS_FROM_OPERATOR:
            raise ValueError(
                f"command_args has {arg}: the operator sets it per pod through PET_* variables"
            )


def _resources(gpus_per_node: int, cpu: str | None, memory: str | None) -> dict[str, Any]:
    amounts: dict[str, Any] = {}
    if cpu:
        amounts["cpu"] = cpu
    if memory:
        amounts["memory"] = memory
    limits: dict[str, Any] = dict(amounts)
    if gpus_per_node > 0:
        limits["nvidia.com/gpu"] = gpus_per_node
    resources: dict[str, Any] = {}
    if amounts:
        resources["requests"] = amounts
    if limits:
        resources["limits"] = limits
    return resources


def _pod_template(
    labels: dict[str, str],
    image: str,
    command_args: list[str],
    env: dict[str, str],
    secret_env: dict[str, tuple[str, str]],
    resources: dict[str, Any],
    volume_claim: str | None,
    mount_path: str,
    grace_period_s: int,
) -> dict[str, Any]:
    """The pod template of every replica."""
    variables = [{"name": k, "value": str(v)} for k, v in sorted(env.items())]
    variables += [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
        for k, (secret, key) in sorted(secret_env.items())
    ]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if volume_claim:
        mounts.append({"name": "runs", "mountPath": mount_path})
        volumes.append({"name": "runs", "persistentVolumeClaim": {"claimName": volume_claim}})
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["torchrun"],
        "args": list(command_args),
        "env": variables,
        "ports": [{"name": PORT_NAME, "containerPort": MASTER_PORT, "protocol": "TCP"}],
    }
    if resources:
        container["resources"] = resources
    container["volumeMounts"] = mounts
    return {
        # Istio sidecars (injected in many Kubeflow namespaces) break pod-to-pod NCCL/gloo.
        "metadata": {"labels": dict(labels), "annotations": {"sidecar.istio.io/inject": "false"}},
        "spec": {
            "containers": [container],
            "volumes": volumes,
            # Time between SIGTERM and SIGKILL: enough to finish the step and save.
            "terminationGracePeriodSeconds": grace_period_s,
        },
    }


def pytorchjob_manifest(
    name: str,
    image: str,
    nodes: int,
    gpus_per_node: int,
    procs_per_node: int,
    run_dir: str,
    command_args: list[str],
    env: dict[str, str],
    cpu: str | None,
    memory: str | None,
    volume_claim: str | None,
    namespace: str = "default",
    mount_path: str = "/runs",
    grace_period_s: int = FLOOR_S,
    secret_env: dict[str, tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """The PyTorchJob of a run: one pod per node, `gpus_per_node or procs_per_node` ranks each,
    the run directory on the claim `volume_claim` mounted at `mount_path` on every pod;
    `secret_env` maps a variable to the (Secret, key) the kubelet fills it from."""
    _check_arguments(nodes, gpus_per_node, procs_per_node, command_args)
    secret_env = dict(secret_env or {})
    both = sorted(set(env) & set(secret_env))
    if both:
        raise ValueError(f"env has {both[0]}: it comes from a Secret, its value stays out")
    if volume_claim and not PurePosixPath(run_dir).is_relative_to(mount_path):
        raise ValueError(
            f"run_dir = {run_dir}: must lie under mount_path {mount_path}, where the claim "
            f"{volume_claim} is mounted, or the run's files stay inside one pod"
        )
    job = job_name(name)
    labels = {"app.kubernetes.io/name": "kiln", "kiln/run": job}
    resources = _resources(gpus_per_node, cpu, memory)
    template = _pod_template(
        labels,
        image,
        command_args,
        env,
        secret_env,
        resources,
        volume_claim,
        mount_path,
        grace_period_s,
    )
    replica_counts = {"Master": 1, "Worker": nodes - 1}
    replicas = {
        # A copy each: objects shared between replicas would become YAML anchors and aliases.
        kind: {"replicas": count, "restartPolicy": "OnFailure", "template": copy.deepcopy(template)}
        for kind, count in replica_counts.items()
        if count > 0
    }
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": job,
            "namespace": namespace,
            "labels": dict(labels),
            "annotations": {"kiln/run-dir": str(run_dir)},
        },
        "spec": {
            "nprocPerNode": str(gpus_per_node or procs_per_node),
            # Keep finished pods so their logs stay readable; `kubectl_delete` removes them.
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": BACKOFF_LIMIT},
            "pytorchReplicaSpecs": replicas,
        },
    }


def write_manifest(manifest: dict[str, Any], path: Path) -> Path:
    """Write `manifest` as YAML to `path` through a temporary name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(manifest, sort_keys=False))
    os.replace(tmp, path)
    return path


def _kubectl(*args: str, timeout: float | None = KUBECTL_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run kubectl, capturing its output; a missing binary (127) or no answer within `timeout`
    (124) comes back as a result with an explanation in stderr, never as an exception."""
    command = ["kubectl", *args]
    executable = shutil.which("kubectl")
    if executable is None:
        return subprocess.CompletedProcess(
            command,
            127,
            "",
            "kubectl not found on PATH: install kubectl and point it at the "
            "cluster (KUBECONFIG or ~/.kube/config)",
        )
    try:
        return subprocess.run([executable, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(
            command, 124, "", f"kubectl {args[0]} got no answer within {timeout:.0f} s"
        )


def kubectl_error(result: subprocess.CompletedProcess) -> str:
    """The one line that says why kubectl failed (its last line of stderr)."""
    lines = [line.strip() for line in (result.stderr or "").splitlines() if line.strip()]
    return lines[-1] if lines else f"kubectl exited with status {result.returncode}"


def kubectl_apply(path: Path, request_timeout: str = "30s") -> subprocess.CompletedProcess:
    """`kubectl apply -f PATH` (the namespace is in the manifest)."""
    return _kubectl("apply", "-f", str(path), f"--request-timeout={request_timeout}")


def kubectl_status(
    name: str, namespace: str = "default", request_timeout: str = "30s"
) -> tuple[str, str]:
    """(Kiln's state, detail): pending, running, completed, failed, suspended from the job's
    last true condition (detail: its type), or ("unknown", kubectl's error)."""
    result = _kubectl(
        "get",
        "pytorchjob",
        job_name(name),
        "-n",
        namespace,
        "-o",
        "json",
        f"--request-timeout={request_timeout}",
    )
    if result.returncode:
        return "unknown", kubectl_error(result)
    try:
        conditions = json.loads(result.stdout).get("status", {}).get("conditions") or []
    except (json.JSONDecodeError, AttributeError):
        return "unknown", "kubectl get pytorchjob did not return a JSON object"
    current = [c for c in conditions if c.get("status") == "True"] or conditions
    if not current:
        return "pending", "no conditions yet"
    kind = str(current[-1].get("type", ""))
    return CONDITION_STATES.get(kind, "unknown"), kind


def kubectl_logs(
    name: str, namespace: str = "default", follow: bool = False, request_timeout: str = "30s"
) -> subprocess.CompletedProcess:
    """The master pod's (rank 0's) log. Captured, or streamed to this terminal when `follow`
    (then stdout/stderr are None; Ctrl-C ends it with status 130)."""
    pod = f"pod/{job_name(name)}-master-0"
    args = ["logs", pod, "-c", CONTAINER_NAME, "-n", namespace]
    if not follow:
        return _kubectl(*args, f"--request-timeout={request_timeout}")
    executable = shutil.which("kubectl")
    if executable is None:
        return _kubectl(*args)  # the explanation of a missing binary
    try:
        return subprocess.run([executable, *args, "--follow"])
    except KeyboardInterrupt:
        return subprocess.CompletedProcess(["kubectl", *args, "--follow"], 130)


def kubectl_delete(
    name: str, namespace: str = "default", request_timeout: str = "30s"
) -> subprocess.CompletedProcess:
    """`kubectl delete pytorchjob NAME`; the operator removes its pods and services."""
    return _kubectl(
        "delete",
        "pytorchjob",
        job_name(name),
        "-n",
        namespace,
        f"--request-timeout={request_timeout}",
    )
