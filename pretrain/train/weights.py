"""Reading a checkpoint's tensors: whole, for one process (generation, evaluation, export), or
the regions one rank of any layout needs to resume.

A checkpoint's tensors are one DCP directory of layout-independent keys (`state_pieces`):
`model/<name>` (fp32 weights: the master weights of a bf16/fp16 run), and Adam's
`optimizer/exp_avg/<name>` and `optimizer/exp_avg_sq/<name>`, with exactly the model's
vocabulary rows. `checkpoint.json` beside them says the format, the layout that wrote it and
Adam's step count.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from data_pipeline.errors import KilnError
from pretrain.model.transformer import projection_parts

from .dcp_io import CheckpointShapeError, Region, load_regions, read_metadata
from .optimizer_state import MOMENTS, OptimizerState
from .state_pieces import (
    MODEL,
    VOCAB_PADDED,
    Part,
    StateLayout,
    canonical_parameters,
    rank_pieces,
    state_key,
)

FORMAT = 3
DESCRIPTION = "checkpoint.json"


class CheckpointError(KilnError):
    """A checkpoint that is missing, incomplete, of another model or of another format."""


def read_description(checkpoint: Path) -> dict:
    """`checkpoint.json`: format, the layout that wrote it, Adam's step; one clear line for
    anything else (an older Kiln's checkpoint, or no checkpoint)."""
    checkpoint = Path(checkpoint)
    described = checkpoint / DESCRIPTION
    if not described.is_file():
        old = checkpoint / "model" / "layout.json"
        if old.is_file():
            version = json.loads(old.read_text()).get("format", 1)
            raise CheckpointError(
                f"{checkpoint}: Kiln checkpoint format {version} (DeepSpeed's files beside "
                f"safetensors copies); this Kiln reads format {FORMAT} only: export or resume it "
                "with the Kiln release that wrote it"
            )
        raise CheckpointError(f"{checkpoint}: no {DESCRIPTION}, not a Kiln checkpoint")
    description = json.loads(described.read_text())
    if description.get("format") != FORMAT:
        raise CheckpointError(
            f"{checkpoint}: Kiln checkpoint format {description.get('format')}; this Kiln "
            f"reads format {FORMAT}"
        )
    return description


class CheckpointTensors:
    """Whole tensors of a checkpoint under canonical names, read in one process.
    `kind` is "model" (the fp32 weights), "exp_avg" or "exp_avg_sq"."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = Path(checkpoint)
        self.description = read_description(self.checkpoint)
        self.layout: dict = self.description["layout"]
        self.optimizer_step: int | None = self.description.get("optimizer_step")
        self.shapes = {
            key: tuple(md.size)
            for key, md in read_metadata(self.checkpoint).state_dict_metadata.items()
            if hasattr(md, "size")
        }

    def names(self) -> list[str]:
        prefix = MODEL + "/"
        return [key[len(prefix) :] for key in self.shapes if key.startswith(prefix)]

    def has(self, kind: str) -> bool:
        return any(key.startswith(state_key(kind, "")) for key in self.shapes)

    def tensor(self, name: str, kind: str = MODEL) -> torch.Tensor:
        return self.weights(kind, [name])[name]

    def weights(self, kind: str = MODEL, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The full fp32 tensors of `kind` (all of them, or `names`): one read."""
        out, targets = {}, []
        for name in names if names is not None else self.names():
            key = state_key(kind, name)
            if key not in self.shapes:
                raise CheckpointError(f"{self.checkpoint}: no tensor {key}")
            out[name] = torch.empty(self.shapes[key], dtype=torch.float32)
            targets.append(Region(key, self.shapes[key], (0,) * len(self.shapes[key]), out[name]))
        load_regions(self.checkpoint, targets)
        return out


def consolidated_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights under canonical names, with exactly the model's vocabulary rows."""
    return CheckpointTensors(checkpoint).weights()


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy full weights (canonical names) into a one-rank `Transformer`, zero-filling its
    vocabulary padding; a fused layer gets its projections concatenated."""
    own = {
        canonical: (parameter, first, rows)
        for name, parameter in model.named_parameters()
        for canonical, first, rows in projection_parts(name, parameter)
    }
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for name, (parameter, first, rows) in own.items():
            target = parameter.narrow(0, first, rows)
            source = weights[name].to(parameter.dtype)
            if name in VOCAB_PADDED and source.shape[0] < target.shape[0]:
                target.zero_()
                target[: source.shape[0]].copy_(source)
            elif source.shape != target.shape:
                raise CheckpointError(
                    f"{name}: checkpoint shape {tuple(source.shape)}, "
                    f"model shape {tuple(target.shape)}"
                )
            else:
                target.copy_(source)


# -- a resume: each rank reads the regions it holds ------------------------------------------
def _load(checkpoint: Path, targets: list[Region], objects: list[str], group) -> dict:
    try:
        return load_regions(checkpoint, targets, objects, group)
    except CheckpointShapeError as error:
        raise CheckpointError(f"{checkpoint}: {error}") from None
    except Exception as error:  # DCP wraps each rank's failure; the cause names the key
        cause = getattr(error, "failures", None)
        raise CheckpointError(
            f"{checkpoint}: cannot be read by this model: {cause or error}"
        ) from None


def load_module_weights(
    module: nn.Module, checkpoint: Path, layout: StateLayout, group=None
) -> None:
    """Collective: fill this rank's module (before DeepSpeed wraps it) with its
    tensor-parallel slice of every weight, from the fp32 weights; padding rows are zero.
    Under ZeRO 0-2 every data-parallel rank holds these whole slices; ZeRO 3 reads only its
    partitions once DeepSpeed has made them (`load_engine_state`)."""
    targets, copies = [], []
    with torch.no_grad():
        for name, parameter in canonical_parameters(module, layout.num_layers):
            fp32 = parameter.data.dtype == torch.float32 and parameter.data.is_contiguous()
            holder = parameter.data if fp32 else torch.empty_like(parameter, dtype=torch.float32)
            holder.zero_()
            for canonical, first, rows in projection_parts(name, parameter):
                part = Part(canonical, parameter, first, rows)
                piece = part.piece(state_key(MODEL, canonical), layout, 0, holder.view(-1))
                assert piece is not None
                targets += piece.regions()
            if not fp32:
                copies.append((parameter, holder))
        _load(checkpoint, targets, [], group)
        for parameter, holder in copies:
            parameter.data.copy_(holder)


def load_engine_state(
    module: nn.Module, engine, checkpoint: Path, layout: StateLayout, step: int | None, group=None
) -> None:
    """Collective: give a fresh engine Adam's state at `step` (None: the checkpoint has none),
    and the fp32 master weights where they are kept apart from the module's (bf16/fp16, and
    ZeRO 3, whose module weights are read here too), each rank reading only its partition."""
    kinds: tuple[str, ...] = ()
    if step is not None:
        OptimizerState(engine).create(step)
        kinds = MOMENTS
    if layout.precision != "fp32" or layout.zero_stage == 3:
        kinds = (MODEL, *kinds)
    if not kinds:
        return
    pieces = rank_pieces(module, engine, layout, kinds, for_writing=False)
    targets = [region for piece in pieces for region in piece.regions()]
    _load(checkpoint, targets, [], group)
    if layout.zero_stage == 3:
        copy_master_into_partitions(module, engine)


def copy_master_into_partitions(module: nn.Module, engine) -> None:
    """ZeRO 3: each rank's partition of the module's weights from its fp32 master partition,
    as DeepSpeed does after an optimizer step."""
    optimizer = OptimizerState(engine)
    with torch.no_grad():
        for parameter in module.parameters():
            fragment = optimizer.fragment(parameter, None)
            if fragment is not None:
                _, master = fragment
                parameter.ds_tensor.data.view(-1)[: master.numel()].copy_(master)
