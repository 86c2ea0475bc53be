"""Work done inside spawned ranks by the model tests (importable, so spawn can pickle it)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pretrain.config import ModelConfig
from pretrain.model.transformer import Transformer, cross_entropy, gather_logits

# (parameter name, dimension split across TP ranks, or None when replicated)
PARTITIONED = {
    "embedding.tokens.weight": 0,
    "blocks.0.attention.q.weight": 0,
    "blocks.0.attention.k.weight": 0,
    "blocks.0.attention.out.weight": 1,
    "blocks.0.mlp.down.weight": 1,
    "blocks.1.attention_norm.weight": None,
}


def _gather(tensor: torch.Tensor, dim: int | None, world: int) -> torch.Tensor:
    if dim is None or world == 1:
        return tensor.detach().clone()
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts, dim)


def tensor_parallel_step(
    rank: int, world: int, model: dict, seed: int, ids: torch.Tensor, targets: torch.Tensor
) -> dict:
    """Build the model with TP = world, one forward and backward; gathered results."""
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        net = Transformer(ModelConfig(**model), tensor=world, seed=seed)
        logits = net(ids)
        loss = cross_entropy(logits, targets)
        loss.backward()
        parameters = dict(net.named_parameters())
        return {
            "loss": loss.item(),
            "logits": gather_logits(logits).detach().clone(),
            "weights": {n: _gather(parameters[n], d, world) for n, d in PARTITIONED.items()},
            "grads": {n: _gather(parameters[n].grad, d, world) for n, d in PARTITIONED.items()},
        }
    finally:
        parallel_state.destroy_model_parallel()
