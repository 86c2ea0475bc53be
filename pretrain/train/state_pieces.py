"""What one rank owns of the training state, as boxes of layout-independent tensors.

Every checkpointed tensor has a canonical, layout-independent key and global shape:

    model/<name>                  the fp32 weights (the master weights when training in bf16/fp16)
    optimizer/exp_avg/<name>      Adam's first moment
    optimizer/exp_avg_sq/<name>   Adam's second moment

where `<name>` is the parameter's canonical name (`embedding.tokens.weight`, `blocks.0...`) and
the global shape is the one-rank model's (exactly `vocab_size` vocabulary rows). A rank holds a
*piece* of each: its tensor-parallel slice, and of that, when ZeRO or DeepSpeed's bf16
optimizer partitions the fp32 state, a contiguous range of the flattened slice. A flat range
is a union of at most a few rectangles (`flat_range_boxes`); those rectangles, shifted to the
rank's tensor-parallel offset and cut at the real vocabulary, are the chunks a checkpoint
stores and the regions a resume reads (`Piece.boxes`).

Where nothing partitions the state (ZeRO 0 in fp32) every data-parallel replica holds it all:
each parameter's pieces are then written by one replica, chosen to balance bytes
(`balanced_owners`). Pieces replicated across tensor-parallel ranks (norms) are offered by
every such rank and DCP's planner keeps one copy. A tied embedding, held by the first and the
last pipeline stage alike, is written half by each (`tied_rows`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pretrain.model.pipeline import canonical_name
from pretrain.model.transformer import projection_parts

from .dcp_io import Region
from .optimizer_state import MOMENTS, OptimizerState

VOCAB_PADDED = ("embedding.tokens.weight", "output.projection.weight", "embedding.head.bias")
MODEL = "model"
TIED = "embedding.tokens.weight"  # kept on the first and the last stage when tied


@dataclass(frozen=True)
class StateLayout:
    """The frozen facts checkpoint code needs about a rank's place in a run, built once."""

    tensor: int
    pipeline: int
    data: int
    zero_stage: int
    precision: str
    num_layers: int
    vocab_size: int
    tensor_rank: int
    stage: int
    data_rank: int

    def describe(self) -> dict:
        """What `checkpoint.json` records of the layout that wrote a checkpoint."""
        return {
            "tensor": self.tensor,
            "pipeline": self.pipeline,
            "data": self.data,
            "zero_stage": self.zero_stage,
            "precision": self.precision,
        }


@dataclass(frozen=True)
class Box:
    """A rectangle of a global tensor (`offsets`, `sizes`) and the rank's tensor holding it."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    tensor: torch.Tensor


@dataclass
class Piece:
    """This rank's part of one checkpointed tensor: the flat range [start, start + numel) of
    its tensor-parallel slice (shape `local_shape`, split along `tp_dim` at `tp_rank`)."""

    key: str
    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    tp_dim: int | None
    tp_rank: int
    start: int
    flat: torch.Tensor  # 1-D, numel elements; a view of the live state
    rows: tuple[int, int] | None = None  # only these global rows (dim 0), when set

    def boxes(self) -> list[Box]:
        out = []
        for offsets, sizes, first in flat_range_boxes(
            self.local_shape, self.start, self.start + self.flat.numel()
        ):
            offsets = list(offsets)
            if self.tp_dim is not None:
                offsets[self.tp_dim] += self.tp_rank * self.local_shape[self.tp_dim]
            sizes = list(sizes)
            if sizes:  # vocabulary padding rows (ids >= vocab_size) are not part of the state
                rows = self.global_shape[0] - offsets[0]
                if rows <= 0:
                    continue
                sizes[0] = min(sizes[0], rows)
            numel = math.prod(sizes)
            view = self.flat.narrow(0, first - self.start, numel).view(sizes)
            if self.rows is not None:  # rows [low, high) only: a narrower block of rows
                low = max(self.rows[0], offsets[0])
                high = min(self.rows[1], offsets[0] + sizes[0])
                if high <= low:
                    continue
                view = view.narrow(0, low - offsets[0], high - low)
                offsets[0], sizes[0] = low, high - low
            out.append(Box(tuple(offsets), tuple(sizes), view))
        return out

    def regions(self) -> list[Region]:
        """`boxes` as regions of this piece's global tensor, for DCP."""
        return [Region(self.key, self.global_shape, b.offsets, b.tensor) for b in self.boxes()]


def flat_range_boxes(
    shape: tuple[int, ...], start: int, stop: int
) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """The flat range [start, stop) of a row-major tensor of `shape` as rectangles
    (offsets, sizes, flat index of their first element), in order; each is contiguous."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,) if shape else (), (stop - start,) if shape else (), start)]
    inner = math.prod(shape[1:])
    first_row, last_row = start // inner, (stop - 1) // inner
    if first_row == last_row:  # within one leading index: a box of the inner dimensions
        base = first_row * inner
        return [
            ((first_row, *offsets), (1, *sizes), base + first)
            for offsets, sizes, first in flat_range_boxes(shape[1:], start - base, stop - base)
        ]
    out = []
    full_from = -(-start // inner)  # the first whole row
    full_to = stop // inner  # one past the last whole row
    if start % inner:
        out += flat_range_boxes(shape, start, full_from * inner)
    if full_to > full_from:
        zeros = (0,) * (len(shape) - 1)
        out.append(((full_from, *zeros), (full_to - full_from, *shape[1:]), full_from * inner))
    if stop % inner:
        out += flat_range_boxes(shape, full_to * inner, stop)
    return out


def partition_dim(parameter: nn.Parameter) -> int | None:
    """The dimension a parameter is split along across TP ranks; None when replicated."""
    if getattr(parameter, "tensor_model_parallel", False):
        return int(parameter.partition_dim)
    return None


def canonical_parameters(module: nn.Module, num_layers: int) -> list[tuple[str, nn.Parameter]]:
    """(canonical name, parameter) of a Transformer or pipeline stage, each name once. A
    frozen parameter is a pipeline stage's unused copy of another stage's (`build_pipeline`):
    not state."""
    out, seen = [], set()
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        canonical = canonical_name(name, num_layers)
        if canonical not in seen:
            seen.add(canonical)
            out.append((canonical, parameter))
    return out


@dataclass(frozen=True)
class Part:
    """A canonical tensor's local rows in a parameter: the whole parameter, or one projection
    of a fused layer (`first_row`, `rows` of the parameter's rows on this TP rank)."""

    name: str
    parameter: nn.Parameter
    first_row: int
    rows: int

    @property
    def local_shape(self) -> tuple[int, ...]:
        return (self.rows, *local_shape(self.parameter)[1:])

    def global_shape(self, layout: StateLayout) -> tuple[int, ...]:
        shape = list(self.local_shape)
        dim = partition_dim(self.parameter)
        if dim is not None:
            shape[dim] *= layout.tensor
        if self.name in VOCAB_PADDED:
            shape[0] = layout.vocab_size
        return tuple(shape)

    def fragment(self, start: int, flat: torch.Tensor) -> tuple[int, torch.Tensor] | None:
        """The part of a parameter's flat range [start, start + len(flat)) that falls in these
        rows, as (start within the part, view); None when none does."""
        inner = math.prod(self.local_shape[1:])
        low, high = self.first_row * inner, (self.first_row + self.rows) * inner
        begin, end = max(start, low), min(start + flat.numel(), high)
        if begin >= end:
            return None
        return begin - low, flat.narrow(0, begin - start, end - begin)

    def piece(
        self, key: str, layout: StateLayout, start: int, flat: torch.Tensor, rows=None
    ) -> Piece | None:
        """This part's piece of a parameter's fragment (start, flat), under `key`."""
        fragment = self.fragment(start, flat)
        if fragment is None:
            return None
        return Piece(
            key=key,
            global_shape=self.global_shape(layout),
            local_shape=self.local_shape,
            tp_dim=partition_dim(self.parameter),
            tp_rank=layout.tensor_rank,
            start=fragment[0],
            flat=fragment[1],
            rows=rows,
        )


def canonical_parts(module: nn.Module, num_layers: int) -> list[Part]:
    """Every canonical tensor of a Transformer or pipeline stage, each once, as rows of the
    parameter holding it (the projections of a fused layer apart)."""
    return [
        Part(canonical, parameter, first, rows)
        for name, parameter in canonical_parameters(module, num_layers)
        for canonical, first, rows in projection_parts(name, parameter)
    ]


def local_shape(parameter: nn.Parameter) -> tuple[int, ...]:
    """This TP rank's shape of a parameter, also when ZeRO 3 has partitioned it away."""
    return tuple(getattr(parameter, "ds_shape", parameter.shape))


def state_key(kind: str, name: str) -> str:
    return f"{MODEL}/{name}" if kind == MODEL else f"optimizer/{kind}/{name}"


def balanced_owners(sizes: list[int], owners: int) -> list[int]:
    """For replicated tensors of these sizes, the replica that writes each: largest first,
    each to the least-loaded replica (the same answer on every replica)."""
    load = [0] * owners
    owner = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        best = min(range(owners), key=lambda r: (load[r], r))
        owner[index] = best
        load[best] += sizes[index]
    return owner


def rank_pieces(
    module: nn.Module,
    engine,
    layout: StateLayout,
    kinds: tuple[str, ...],
    for_writing: bool,
) -> list[Piece]:
    """This rank's pieces of the weights and optimizer state `kinds` ("model", "exp_avg",
    "exp_avg_sq"). `for_writing` leaves out what another rank writes: the other stage's half
    of a tied embedding, and replicas of unpartitioned state on other data ranks."""
    optimizer = OptimizerState(engine)
    parameters = canonical_parameters(module, layout.num_layers)
    tied = bool(getattr(module, "tied_modules", None))  # DeepSpeed's PipelineModule
    owners = None
    if not optimizer.partitioned:
        owners = balanced_owners([p.numel() for _, p in parameters], layout.data)
    pieces = []
    for index, (name, parameter) in enumerate(parameters):
        if for_writing and owners is not None and owners[index] != layout.data_rank:
            continue
        for kind in kinds:
            fragment = optimizer.fragment(parameter, None if kind == MODEL else kind)
            if fragment is None:
                continue
            for canonical, first, count in projection_parts(name, parameter):
                part = Part(canonical, parameter, first, count)
                rows = tied_rows(layout) if for_writing and tied and canonical == TIED else None
                piece = part.piece(state_key(kind, canonical), layout, *fragment, rows=rows)
                if piece is not None:
                    pieces.append(piece)
    return pieces


def tied_rows(layout: StateLayout) -> tuple[int, int]:
    """The vocabulary rows of a tied embedding a stage writes: the first and the last stage
    hold the same weights and Adam state, so each writes half of the rows."""
    half = layout.vocab_size // 2
    return (0, half) if layout.stage == 0 else (half, layout.vocab_size)


def optimizer_kinds(engine) -> tuple[str, ...]:
    """The optimizer state to checkpoint: Adam's moments once it has taken a step."""
    return MOMENTS if OptimizerState(engine).has_moments() else ()
