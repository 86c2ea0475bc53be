"""Two "nodes" on loopback: two per-node launchers (the launch plan's torchrun command, as
`srun` or a Kubernetes pod starts it) with a static rendezvous on 127.0.0.1, training with
data parallelism across them; the losses equal the single-node run's."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cluster.launch.local import free_port
from cluster.launch.plan import build_plan
from cluster.rundir import check_trainable, prepare_run_dir
from tests.conftest import REPO
from tests.support.training import SMALL, environment, losses

pytestmark = pytest.mark.integration


def test_two_nodes_train_like_one(data, runs, tmp_path):
    overrides = [f"data.path={data}", *SMALL, "parallel.zero_stage=1"]
    run_dir = tmp_path / "two-nodes"
    cfg, plan = build_plan(
        REPO / "configs/train/tiny.yaml", overrides, "local", run_dir, nodes=2, procs_per_node=1
    )
    assert (plan.world_size, cfg.parallel.data) == (2, 2)
    check_trainable(cfg)
    prepare_run_dir(cfg, run_dir, resume=True)
    plan = plan.__class__(**{**plan.__dict__, "master_port": free_port()})
    nodes = [
        subprocess.Popen(
            plan.node_command(rank, "127.0.0.1", python=sys.executable),
            cwd=REPO,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "TP 1 x PP 1 x DP 2" in outputs[0]

    one_node = runs("dp2-zero1")  # the same layout on one node
    assert losses(run_dir) == pytest.approx(losses(one_node), rel=1e-6)
    assert sorted(losses(run_dir)) == list(range(1, 11))


def test_a_layout_that_does_not_fit_the_nodes_is_one_line(tmp_path):
    from pretrain.config.errors import ConfigError

    with pytest.raises(ConfigError, match=r"parallel.tensor = 4: must divide the processes"):
        build_plan(
            REPO / "configs/train/tiny.yaml",
            ["parallel.tensor=4"],
            "slurm",
            tmp_path,
            nodes=2,
            gpus_per_node=2,
        )
