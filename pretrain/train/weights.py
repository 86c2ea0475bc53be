"""Full weights from a checkpoint's per-layout model shards, without DeepSpeed.

Each (tensor, pipeline) position of the training layout saved its weights under canonical
names (`model/tpXX_ppYY.safetensors`) and, beside them, the dimension along which each tensor
is split across tensor-parallel ranks. Concatenating along that dimension and dropping the
vocabulary padding gives weights that do not depend on the layout: what generation, export
and resharding start from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

VOCAB_PADDED = ("embedding.tokens.weight", "output.projection.weight")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or of another model."""


def consolidated_weights(checkpoint: Path, vocab_size: int) -> dict[str, torch.Tensor]:
    """Full tensors under canonical names, with exactly `vocab_size` vocabulary rows."""
    directory = Path(checkpoint) / "model"
    layout_file = directory / "layout.json"
    if not layout_file.is_file():
        raise CheckpointError(f"{directory}: no layout.json, not a Kiln checkpoint")
    layout = json.loads(layout_file.read_text())
    pieces: dict[str, list[torch.Tensor]] = {}
    dims: dict[str, int | None] = {}
    for stage in range(layout["pipeline"]):
        seen_here: set[str] = set()
        for tensor_rank in range(layout["tensor"]):
            shard = directory / f"tp{tensor_rank:02d}_pp{stage:02d}"
            if not shard.with_suffix(".safetensors").is_file():
                raise CheckpointError(f"{shard}.safetensors is missing")
            tensors = load_file(str(shard.with_suffix(".safetensors")))
            partition = json.loads(shard.with_suffix(".json").read_text())["partition_dims"]
            for name, tensor in tensors.items():
                if name in pieces and name not in seen_here:
                    continue  # the last stage's copy of a tied embedding
                seen_here.add(name)
                pieces.setdefault(name, []).append(tensor)
                dims[name] = partition[name]
    full = {
        name: parts[0] if dims[name] is None else torch.cat(parts, dim=dims[name])
        for name, parts in pieces.items()
    }
    for name in VOCAB_PADDED:
        if name in full:
            full[name] = full[name][:vocab_size].clone()
    return full


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy full weights into a one-rank `Transformer`, zero-filling its vocabulary padding."""
    own = dict(model.named_parameters())
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for name, parameter in own.items():
            source = weights[name].to(parameter.dtype)
            if name in VOCAB_PADDED and source.shape[0] < parameter.shape[0]:
                parameter.zero_()
                parameter[: source.shape[0]].copy_(source)
            elif source.shape != parameter.shape:
                raise CheckpointError(
                    f"{name}: checkpoint shape {tuple(source.shape)}, "
                    f"model shape {tuple(parameter.shape)}"
                )
            else:
                parameter.copy_(source)
