"""The rank layout of a run: one description, built twice (megatron-core and DeepSpeed), checked.

Ranks are laid out with the tensor-parallel rank varying fastest, then the data-parallel rank,
then the pipeline stage: with TP=2, DP=2, PP=2 rank 5 is stage 1, data replica 0, TP rank 1.
megatron-core's `parallel_state` (which the TP layers use) and DeepSpeed's
`PipeModelDataParallelTopology` (which the pipeline and ZeRO use) each build their own groups
from this layout; `check_agreement` compares every rank's coordinates in both before training.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


class LayoutMismatch(RuntimeError):
    """megatron-core and DeepSpeed disagree about which rank holds what."""


@dataclass(frozen=True)
class Coordinates:
    pipe: int
    data: int
    tensor: int


@dataclass(frozen=True)
class Layout:
    tensor: int
    pipeline: int
    data: int

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data

    def coordinates(self, rank: int) -> Coordinates:
        return Coordinates(
            pipe=rank // (self.tensor * self.data),
            data=(rank // self.tensor) % self.data,
            tensor=rank % self.tensor,
        )


@dataclass
class Parallel:
    """This process's place in the layout, and the DeepSpeed grid that goes with it."""

    layout: Layout
    rank: int
    coordinates: Coordinates
    topology: object  # deepspeed PipeModelDataParallelTopology
    grid: object  # deepspeed PipelineParallelGrid: the `mpu` DeepSpeed reads groups from
    device: torch.device

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device, timeout_minutes: int = 30) -> None:
    """Join the process group described by the launcher's RANK/WORLD_SIZE/MASTER_* variables:
    NCCL on GPUs, gloo on CPUs."""
    import deepspeed

    # DeepSpeed compiles a shared-memory all-reduce op on first use (about 30 s on CPU);
    # Kiln never uses it, and builds no DeepSpeed ops at run time.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    backend = "nccl" if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(
        dist_backend=backend, timeout=timedelta(minutes=timeout_minutes), verbose=False
    )


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup_parallel(layout: Layout, device: torch.device) -> Parallel:
    """Build megatron-core's and DeepSpeed's process groups for `layout` and check that they
    agree. The process group must already be initialised with `layout.world_size` ranks."""
    from deepspeed.runtime.pipe.topology import (
        PipelineParallelGrid,
        PipeModelDataParallelTopology,
    )
    from megatron.core import parallel_state

    world = dist.get_world_size()
    if world != layout.world_size:
        raise LayoutMismatch(
            f"{world} processes started, but parallel.tensor x parallel.pipeline x "
            f"parallel.data = {layout.tensor} x {layout.pipeline} x {layout.data} = "
            f"{layout.world_size}"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor,
            pipeline_model_parallel_size=layout.pipeline,
        )
    topology = PipeModelDataParallelTopology(
        num_pp=layout.pipeline, num_mp=layout.tensor, num_dp=layout.data
    )
    grid = PipelineParallelGrid(topology=topology)
    rank = dist.get_rank()
    check_agreement(layout, topology, device)
    return Parallel(layout, rank, layout.coordinates(rank), topology, grid, device)


def megatron_coordinates() -> Coordinates:
    from megatron.core import parallel_state

    return Coordinates(
        pipe=parallel_state.get_pipeline_model_parallel_rank(),
        data=parallel_state.get_data_parallel_rank(),
        tensor=parallel_state.get_tensor_model_parallel_rank(),
    )


def check_agreement(layout: Layout, topology, device: torch.device) -> None:
    """Every rank's (stage, data, tensor) coordinates as megatron-core sees them must equal
    DeepSpeed's topology and Kiln's layout, for all ranks, not just this one."""
    mine = megatron_coordinates()
    local = torch.tensor([mine.pipe, mine.data, mine.tensor], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    for rank, row in enumerate(t.tolist() for t in gathered):
        megatron = Coordinates(*row)
        deepspeed_coord = topology.get_coord(rank)
        deepspeed = Coordinates(deepspeed_coord.pipe, deepspeed_coord.data, deepspeed_coord.model)
        expected = layout.coordinates(rank)
        if not megatron == deepspeed == expected:
            raise LayoutMismatch(
                f"rank {rank}: Kiln's layout says {expected}, megatron-core {megatron}, "
                f"DeepSpeed {deepspeed}"
            )
