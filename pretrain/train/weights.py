"""Layout-independent tensors in a checkpoint: written by every layout, read by any.

Beside DeepSpeed's own files (which only the same layout can load), every checkpoint holds
the model under canonical parameter names, split only as the training layout held it:

    model/layout.json                     the layout that wrote it (TP, PP, DP, ZeRO, precision)
    model/tpXX_ppYY.safetensors           the weights of tensor rank XX on pipeline stage YY
    model/tpXX_ppYY.json                  the dimension each tensor is split along across TP
    optimizer/tpXX_ppYY.KEY.safetensors   Adam's exp_avg and exp_avg_sq (and the fp32 master
                                          weights when training in bf16/fp16), same names
    optimizer/state.json                  Adam's step count and the keys present

Concatenating the TP pieces along their dimension and dropping the vocabulary padding gives
full tensors that do not depend on the layout: what generation, evaluation and export read,
and what a run resumed under another layout slices for its own ranks (`rank_slice`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from data_pipeline import atomic
from pretrain.model.pipeline import canonical_name

from .optimizer_state import MASTER, MOMENTS, OptimizerState, UnsupportedOptimizer, full_shape

VOCAB_PADDED = ("embedding.tokens.weight", "output.projection.weight")
FORMAT = 2


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or of another model."""


def shard_name(tensor_rank: int, stage: int) -> str:
    return f"tp{tensor_rank:02d}_pp{stage:02d}"


# -- writing (every rank of the training layout) ----------------------------------------------
def save_layout_independent(train_engine, checkpoint: Path, with_optimizer: bool) -> None:
    """This (tensor, pipeline) position's weights, and its optimizer state when asked, under
    canonical names, written by its data-parallel rank 0. Collective: ZeRO-3 weights and
    partitioned optimizer states are gathered over the data-parallel group first."""
    import deepspeed

    cfg, parallel = train_engine.cfg, train_engine.parallel
    coords, writer = parallel.coordinates, parallel.coordinates.data == 0
    parameters = canonical_parameters(train_engine.module, cfg.model.num_layers)
    shard = shard_name(coords.tensor, coords.pipe)
    gather = cfg.parallel.zero_stage == 3
    context = (
        deepspeed.zero.GatheredParameters([p for _, p in parameters], modifier_rank=None)
        if gather
        else contextlib.nullcontext()
    )
    with context:
        weights = {name: p.detach().to("cpu").contiguous().clone() for name, p in parameters}
    if writer:
        model_dir = checkpoint / "model"
        model_dir.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(model_dir / f"{shard}.safetensors"))
        dims = {name: partition_dim(p) for name, p in parameters}
        atomic.write_json(model_dir / f"{shard}.json", {"partition_dims": dims})
    if parallel.rank == 0:
        layout = parallel.layout
        atomic.write_json(
            checkpoint / "model" / "layout.json",
            {
                "format": FORMAT,
                "tensor": layout.tensor,
                "pipeline": layout.pipeline,
                "data": layout.data,
                "zero_stage": cfg.parallel.zero_stage,
                "precision": cfg.train.precision,
                "deepspeed": True,
            },
        )
    if with_optimizer:
        save_optimizer_state(train_engine, parameters, checkpoint / "optimizer", shard, writer)


def save_optimizer_state(
    train_engine, parameters: list[tuple[str, nn.Parameter]], directory: Path, shard: str, writer
) -> None:
    try:
        state = OptimizerState(train_engine.engine)
    except UnsupportedOptimizer as error:
        if train_engine.parallel.rank == 0:
            print(f"kiln train: optimizer state not saved for resharding: {error}", flush=True)
        return
    if not state.has_moments():
        return  # no update applied yet: nothing to carry over
    keys = list(MOMENTS)
    if train_engine.cfg.train.precision != "fp32":
        keys.append(MASTER)
    for key in keys:
        values = {}
        for name, parameter in parameters:
            value = state.read(parameter, key)  # collective under ZeRO
            if writer:
                values[name] = value.to("cpu").contiguous().clone()
        if writer:
            directory.mkdir(parents=True, exist_ok=True)
            save_file(values, str(directory / f"{shard}.{key}.safetensors"))
    if train_engine.parallel.rank == 0:
        atomic.write_json(directory / "state.json", {"step": state.step_count(), "keys": keys})


def canonical_parameters(module: nn.Module, num_layers: int) -> list[tuple[str, nn.Parameter]]:
    """(canonical name, parameter) of a Transformer or pipeline stage, each name once."""
    out, seen = [], set()
    for name, parameter in module.named_parameters():
        canonical = canonical_name(name, num_layers)
        if canonical not in seen:
            seen.add(canonical)
            out.append((canonical, parameter))
    return out


def partition_dim(parameter: nn.Parameter) -> int | None:
    """The dimension a parameter is split along across TP ranks; None when replicated."""
    if getattr(parameter, "tensor_model_parallel", False):
        return int(parameter.partition_dim)
    return None


# -- reading (any layout, or none) -------------------------------------------------------------
class LayoutIndependentState:
    """Full tensors of a checkpoint under canonical names, with exactly `vocab_size`
    vocabulary rows. `kind` is "model" (the weights), "exp_avg", "exp_avg_sq" or "master"."""

    def __init__(self, checkpoint: Path, vocab_size: int) -> None:
        self.checkpoint = Path(checkpoint)
        self.vocab_size = vocab_size
        model_dir = self.checkpoint / "model"
        layout_file = model_dir / "layout.json"
        if not layout_file.is_file():
            raise CheckpointError(f"{model_dir}: no layout.json, not a Kiln checkpoint")
        self.layout = json.loads(layout_file.read_text())
        self.sources: dict[str, tuple[int, int | None]] = {}  # name -> (stage, TP dimension)
        for stage in range(self.layout["pipeline"]):
            for tensor_rank in range(self.layout["tensor"]):
                shard = model_dir / shard_name(tensor_rank, stage)
                if not shard.with_suffix(".safetensors").is_file():
                    raise CheckpointError(f"{shard}.safetensors is missing")
            dims = json.loads((model_dir / f"{shard_name(0, stage)}.json").read_text())
            for name, dim in dims["partition_dims"].items():
                self.sources.setdefault(name, (stage, dim))  # a tied embedding: stage 0's
        optimizer_file = self.checkpoint / "optimizer" / "state.json"
        optimizer = json.loads(optimizer_file.read_text()) if optimizer_file.is_file() else {}
        self.optimizer_step: int | None = optimizer.get("step")
        self.optimizer_keys: list[str] = optimizer.get("keys", [])

    def names(self) -> list[str]:
        return list(self.sources)

    def has(self, kind: str) -> bool:
        return kind == "model" or kind in self.optimizer_keys

    def _file(self, kind: str, tensor_rank: int, stage: int) -> Path:
        shard = shard_name(tensor_rank, stage)
        if kind == "model":
            return self.checkpoint / "model" / f"{shard}.safetensors"
        return self.checkpoint / "optimizer" / f"{shard}.{kind}.safetensors"

    def tensor(self, name: str, kind: str = "model") -> torch.Tensor:
        if name not in self.sources:
            raise CheckpointError(f"{self.checkpoint}: no tensor {name}")
        stage, dim = self.sources[name]
        ranks = range(self.layout["tensor"]) if dim is not None else range(1)
        parts = []
        for tensor_rank in ranks:
            path = self._file(kind, tensor_rank, stage)
            if not path.is_file():
                raise CheckpointError(f"{path} is missing")
            with safe_open(str(path), framework="pt") as shard:
                parts.append(shard.get_tensor(name))
        full = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
        if name in VOCAB_PADDED:
            full = full[: self.vocab_size].clone()
        return full

    def weights(self, kind: str = "model") -> dict[str, torch.Tensor]:
        return {name: self.tensor(name, kind) for name in self.names()}


def consolidated_weights(checkpoint: Path, vocab_size: int) -> dict[str, torch.Tensor]:
    """Full weights under canonical names, with exactly `vocab_size` vocabulary rows."""
    return LayoutIndependentState(checkpoint, vocab_size).weights()


def rank_slice(
    full: torch.Tensor, name: str, shape: torch.Size, dim: int | None, rank: int, size: int
) -> torch.Tensor:
    """TP rank `rank` of `size`'s piece of a full tensor, for a parameter of this rank's
    `shape` split along `dim`; vocabulary rows are zero-padded to the layout's padding."""
    if dim is None:
        piece = full
    else:
        width = shape[dim]
        if name in VOCAB_PADDED and full.shape[0] < width * size:
            padding = full.new_zeros((width * size - full.shape[0], *full.shape[1:]))
            full = torch.cat([full, padding])
        piece = full.narrow(dim, rank * width, width) if full.shape[dim] == width * size else None
    if piece is None or piece.shape != shape:
        raise CheckpointError(
            f"{name}: the checkpoint's shape {tuple(full.shape)} does not fit this model "
            f"({tuple(shape)} on each of {size} tensor-parallel ranks)"
        )
    return piece


def load_into_module(
    module: nn.Module,
    state: LayoutIndependentState,
    num_layers: int,
    tensor_rank: int,
    tensor_size: int,
) -> None:
    """Copy a checkpoint's weights (its fp32 master weights where it has them) into this
    rank's module, before DeepSpeed wraps it."""
    kind = MASTER if state.has(MASTER) else "model"
    names = {name for name, _ in canonical_parameters(module, num_layers)}
    missing = sorted(names - set(state.names()))
    if missing:
        raise CheckpointError(f"{state.checkpoint}: the model's {missing[:3]} are not there")
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            canonical = canonical_name(name, num_layers)
            full = state.tensor(canonical, kind)
            piece = rank_slice(
                full, canonical, parameter.shape, partition_dim(parameter), tensor_rank, tensor_size
            )
            parameter.copy_(piece)


def load_optimizer_state(
    train_engine, state: LayoutIndependentState, tensor_rank: int, tensor_size: int
) -> bool:
    """Fill a fresh engine's Adam state from the checkpoint's; False when it has none."""
    if state.optimizer_step is None:
        return False
    optimizer = OptimizerState(train_engine.engine)
    optimizer.create(state.optimizer_step)
    keys = list(MOMENTS)
    if train_engine.cfg.train.precision != "fp32":
        keys.append(MASTER)
    num_layers = train_engine.cfg.model.num_layers
    for name, parameter in train_engine.module.named_parameters():
        canonical = canonical_name(name, num_layers)
        for key in keys:
            source = key if state.has(key) else "model"  # fp32 runs keep no separate master
            piece = rank_slice(
                state.tensor(canonical, source),
                canonical,
                full_shape(parameter),
                partition_dim(parameter),
                tensor_rank,
                tensor_size,
            )
            optimizer.write(parameter, key, piece.float())
    return True


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
