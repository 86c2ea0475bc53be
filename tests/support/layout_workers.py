"""Work done inside spawned ranks by the layout tests (importable, so spawn can pickle it)."""

from __future__ import annotations

import torch

from pretrain.parallel.layout import Layout, LayoutMismatch, check_agreement


def agreement(rank: int, world: int, tensor: int, claimed: tuple[int, int, int]) -> str:
    """Build megatron-core's groups with TP=`tensor`, then check them against a DeepSpeed
    topology for the `claimed` (tensor, pipeline, data) layout."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor)
    layout = Layout(*claimed)
    topology = PipeModelDataParallelTopology(
        num_pp=layout.pipeline, num_mp=layout.tensor, num_dp=layout.data
    )
    try:
        check_agreement(layout, topology, torch.device("cpu"))
        return "agree"
    except LayoutMismatch as error:
        return str(error)
    finally:
        parallel_state.destroy_model_parallel()
