"""Work done inside spawned ranks by the model tests (importable, so spawn can pickle it)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pretrain.config import ModelConfig
from pretrain.model.transformer import (
    Transformer,
    cross_entropy,
    gather_logits,
    projection_parts,
)


def _gather(tensor: torch.Tensor, parameter: torch.nn.Parameter, world: int) -> torch.Tensor:
    """The full tensor of a parameter (or of its gradient) from every TP rank's slice."""
    dim = parameter.partition_dim if getattr(parameter, "tensor_model_parallel", False) else None
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
        config = ModelConfig(**model)
        net = Transformer(config, tensor=world, seed=seed)
        logits = net(ids)
        gathered = gather_logits(logits).detach().clone()  # before the loss overwrites them
        loss = cross_entropy(logits, targets, config.vocab_size)
        loss.backward()
        parts = [
            (canonical, parameter, first, rows)
            for name, parameter in net.named_parameters()
            for canonical, first, rows in projection_parts(name, parameter)
        ]  # canonical tensors: each projection of a fused layer gathered on its own
        return {
            "loss": loss.item(),
            "logits": gathered,
            "weights": {n: _gather(p.narrow(0, i, r), p, world) for n, p, i, r in parts},
            "grads": {n: _gather(p.grad.narrow(0, i, r), p, world) for n, p, i, r in parts},
        }
    finally:
        parallel_state.destroy_model_parallel()


def checkpoint_logits(rank: int, world: int, run_dir: str, ids: torch.Tensor) -> torch.Tensor:
    """Kiln's own logits over the real vocabulary for a checkpoint, in one process."""
    from pretrain.inference import load_model

    try:
        loaded = load_model(run_dir)
        with torch.no_grad():
            return loaded.model(ids)[..., : loaded.cfg.model.vocab_size].clone()
    finally:
        parallel_state.destroy_model_parallel()


def collectives_per_step(rank: int, world: int, model: dict, layers: int) -> dict[str, int]:
    """Tensor-parallel collectives in one forward and backward of a `layers`-layer model,
    as PyTorch's profiler records them (by name)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        config = ModelConfig(**{**model, "num_layers": layers})
        net = Transformer(config, tensor=world, seed=0)
        ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator())
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            net(ids, ids).backward()
        names = Counter(event.name for event in prof.events())
        return {name: count for name, count in names.items() if "gloo:" in name}
    finally:
        parallel_state.destroy_model_parallel()
