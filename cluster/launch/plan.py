"""The launch plan of a training run on N nodes: who runs what, where, with which environment.

Every scheduler starts the same thing: one launcher per node, `torchrun` with a static
rendezvous on the first node (`--node-rank`, `--master-addr`, `--master-port`), which starts
the node's ranks of `python -m pretrain.train.main --run-dir DIR`. torchrun rather than the
DeepSpeed launcher: the DeepSpeed launcher reaches the other nodes over ssh (or needs its own
MPI/Slurm integration), while a per-node torchrun is what `srun`, a Kubernetes pod and a
terminal can all start; static ranks (node_rank x procs_per_node + local_rank) keep the tensor
parallel groups inside a node. `--shutdown-timeout` gives ranks that received SIGTERM time to
finish their checkpoint before torchrun kills them.

The W&B API key is never part of the plan's environment: Slurm passes it from the submitting
shell (`sbatch --export=ALL`), Kubernetes from a Secret (`secretKeyRef`), so it is written into
no script, manifest or run directory. `check_wandb_key` refuses an online run that would start
without one.
"""

from __future__ import annotations

import netrc
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from pretrain.config import KilnConfig, load_config
from pretrain.config.errors import ConfigError

RANK_MODULE = "pretrain.train.main"
MASTER_PORT = 29500
SHUTDOWN_TIMEOUT_S = 300
WANDB_KEY = "WANDB_API_KEY"
WANDB_HOST = "https://api.wandb.ai"


@dataclass(frozen=True)
class LaunchPlan:
    scheduler: str
    nodes: int
    procs_per_node: int
    gpus_per_node: int
    run_dir: Path
    master_port: int = MASTER_PORT
    env: dict[str, str] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def node_command(
        self, node_rank: int | str, master_addr: str, python: str = "python"
    ) -> list[str]:
        """The command one node runs; node_rank and master_addr may be shell variables."""
        return [
            python,
            "-m",
            "torch.distributed.run",
            f"--nnodes={self.nodes}",
            f"--nproc-per-node={self.procs_per_node}",
            f"--node-rank={node_rank}",
            f"--master-addr={master_addr}",
            f"--master-port={self.master_port}",
            f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}",
            "--max-restarts=0",
            "-m",
            RANK_MODULE,
            "--run-dir",
            str(self.run_dir),
        ]

    def node_command_line(self, node_rank: str, master_addr: str, python: str = "python") -> str:
        """`node_command` as one shell line, leaving `$VARIABLES` for the shell to expand."""
        parts = self.node_command(node_rank, master_addr, python)
        return " ".join(p if "$" in p else shlex.quote(p) for p in parts)


def resolve_nodes(
    cfg: KilnConfig, nodes: int | None, gpus_per_node: int | None, procs_per_node: int | None
) -> tuple[int, int, int]:
    """(nodes, processes per node, GPUs per node) from the flags, else from `cluster`."""
    nodes = nodes or cfg.cluster.nodes
    gpus = cfg.cluster.gpus_per_node if gpus_per_node is None else gpus_per_node
    if gpus and procs_per_node and procs_per_node != gpus:
        raise ConfigError(
            f"--procs-per-node = {procs_per_node}: GPU nodes run one process per GPU "
            f"(--gpus-per-node = {gpus}); give one of the two"
        )
    procs = gpus or procs_per_node or cfg.cluster.procs_per_node
    if not procs:
        raise ConfigError(
            "cluster.gpus_per_node = 0: give --gpus-per-node G, or --procs-per-node P for "
            "CPU-only nodes"
        )
    return nodes, procs, gpus


def build_plan(
    config_path: str | Path,
    overrides: list[str],
    scheduler: str,
    run_dir: Path,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    procs_per_node: int | None = None,
) -> tuple[KilnConfig, LaunchPlan]:
    """Validate the configuration for N x G processes and plan the launch; ConfigError (one
    line) when the layout does not fit."""
    first = load_config(config_path, overrides)
    nodes, procs, gpus = resolve_nodes(first, nodes, gpus_per_node, procs_per_node)
    placement = [
        f"cluster.scheduler={scheduler}",
        f"cluster.nodes={nodes}",
        f"cluster.gpus_per_node={gpus}",
    ]
    if not gpus:
        placement.append(f"cluster.procs_per_node={procs}")
    cfg = load_config(config_path, [*overrides, *placement], world_size=nodes * procs)
    if cfg.parallel.tensor > 1 and procs % cfg.parallel.tensor:
        raise ConfigError(
            f"parallel.tensor = {cfg.parallel.tensor}: must divide the processes per node "
            f"({procs}); tensor parallelism stays inside a node"
        )
    env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"} if gpus else {}
    if gpus and cfg.parallel.tensor > 1:
        # One hardware queue keeps each tensor-parallel all-reduce ordered behind the kernel
        # that feeds it (Megatron's requirement for overlapping TP communication).
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    if cfg.logging.wandb.mode != "disabled":
        env["WANDB_MODE"] = cfg.logging.wandb.mode
    return cfg, LaunchPlan(scheduler, nodes, procs, gpus, Path(run_dir).resolve(), env=env)


def wandb_key_source(environ: Mapping[str, str] | None = None) -> str | None:
    """Where wandb would find its API key in `environ` (default: this process's environment):
    WANDB_API_KEY or WANDB_IDENTITY_TOKEN_FILE, else the netrc entry of the W&B host (the
    NETRC file, ~/.netrc or ~/_netrc, as wandb reads them); None when nowhere. Never the key."""
    environ = os.environ if environ is None else environ
    for name in (WANDB_KEY, "WANDB_IDENTITY_TOKEN_FILE"):
        if environ.get(name):
            return name
    home = Path(environ.get("HOME") or Path.home())
    candidates = [Path(environ["NETRC"]).expanduser()] if environ.get("NETRC") else []
    candidates += [home / ".netrc", home / "_netrc"]
    path = next((c for c in candidates if c.is_file()), None)
    host = urlsplit(environ.get("WANDB_BASE_URL") or WANDB_HOST).netloc
    try:
        entry = netrc.netrc(path).authenticators(host) if path and host else None
    except (netrc.NetrcParseError, OSError):
        return None
    return str(path) if entry and entry[2] else None


def check_wandb_key(
    cfg: KilnConfig, scheduler: str, wandb_secret: str | None = None, submitting: bool = True
) -> None:
    """ConfigError (one line) when `logging.wandb.mode` is online and the ranks would get no
    API key: on Kubernetes without a Secret (`--wandb-secret`), on Slurm when submitting from
    an environment without one (the job's environment is the submitting shell's)."""
    if cfg.logging.wandb.mode != "online":
        return
    if scheduler == "k8s" and not wandb_secret:
        raise ConfigError(
            "logging.wandb.mode = online: the pods need the W&B API key from a Kubernetes "
            "Secret; create one (kubectl create secret generic wandb "
            '--from-literal=api-key="$WANDB_API_KEY") and pass --wandb-secret wandb, or set '
            "logging.wandb.mode=offline"
        )
    if scheduler == "slurm" and submitting and wandb_key_source() is None:
        raise ConfigError(
            f"logging.wandb.mode = online: no W&B API key here; export {WANDB_KEY} (sbatch "
            "--export=ALL passes it to the job, nothing writes it to disk) or run `wandb login`, "
            "or set logging.wandb.mode=offline"
        )
