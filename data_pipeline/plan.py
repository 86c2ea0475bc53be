"""Turn the configured inputs into parts (units of parallel work), and fingerprint the job.

A part is a run of consecutive pieces of one input totalling about `data.part_size_mb`. A piece
is a whole file, or a span of a file larger than a part: an uncompressed JSON Lines or per-line
text file is cut into byte ranges of the part size, a Parquet file into runs of row groups of
about the part size; compressed files and whole-file text documents stay whole. An input with a
document `limit` is one part holding all its files, read in order until the limit.

Part `i`'s documents get the ids `i * 2**32 + record index`, so sorting by id is corpus order, on
every machine and in every run; what the pipeline writes does not depend on where the part
boundaries fall (the line numbers of a span are made file-wide again when the quarantine is
written, from the line counts its part reports).

The plan also fixes the shuffle's bucket counts from the input size alone: the exact and near
dedup stages exchange their per-part results through that many buckets, and a resumed run
finds the map outputs it left because the counts depend on nothing that changes between runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import fsspec

from . import atomic
from .config import DataConfig, TokenizerConfig
from .readers import InputError, Span, expand_input, infer_format, parquet_row_group_sizes
from .readers import splittable as splitting_of

PART_SHIFT = 32
# Input bytes per shuffle bucket. Exact dedup moves ~24 bytes per document (hash + id), near
# dedup ~16 bytes per band per document; at ~4 kB per document these give reducers of ~25 MB
# (exact) and ~220 MB (near) at any corpus size: 250 buckets each for 1 TB.
EXACT_BYTES_PER_BUCKET = 4 << 30
NEAR_BYTES_PER_BUCKET = 4 << 30
MIN_BUCKETS = 4


@dataclass(frozen=True)
class Piece:
    """A whole file (`span` None) or a span of one; `size` is the file's size in bytes (None
    when unknown), which the fingerprint follows."""

    file: str
    size: int | None
    span: tuple[int, int | None] | None = None

    def as_span(self) -> Span:
        return Span(*self.span) if self.span else Span()


@dataclass(frozen=True)
class Part:
    index: int
    input_index: int
    pieces: tuple[Piece, ...]
    limit: int | None = None

    @property
    def name(self) -> str:
        return f"part_{self.index:06d}"

    @property
    def files(self) -> tuple[str, ...]:
        """The distinct files the part reads, in order."""
        return tuple(dict.fromkeys(piece.file for piece in self.pieces))

    def doc_id(self, record: int) -> int:
        return (self.index << PART_SHIFT) | record

    @property
    def id_range(self) -> tuple[int, int]:
        """[first, last + 1) of the ids this part's documents may have."""
        return self.index << PART_SHIFT, (self.index + 1) << PART_SHIFT


@dataclass(frozen=True)
class Plan:
    parts: list[Part]
    exact_buckets: int
    near_buckets: int
    input_bytes: int = 0


def part_of(doc_id: int) -> int:
    return doc_id >> PART_SHIFT


def plan_parts(data: DataConfig) -> Plan:
    """Expand every input into files and pieces (raising InputError, one line, for a bad path)."""
    if not data.inputs:
        raise InputError("data.inputs: no input given (set data.inputs or pass --input PATH)")
    target = max(1, int(data.part_size_mb * 1e6))
    parts: list[Part] = []
    total = 0
    for input_index, spec in enumerate(data.inputs):
        files = [_absolute(f) for f in expand_input(spec.path)]
        if spec.format == "auto":
            for file in files:
                infer_format(file)
        sizes = [_size(f) for f in files]
        total += sum(s or 0 for s in sizes)
        if spec.limit is not None:
            pieces = tuple(Piece(f, s) for f, s in zip(files, sizes, strict=True))
            parts.append(Part(len(parts), input_index, pieces, spec.limit))
            continue
        pieces = [
            piece
            for file, size in zip(files, sizes, strict=True)
            for piece in split_file(file, size, splitting_of(file, spec), target)
        ]
        for group in group_pieces(pieces, target):
            parts.append(Part(len(parts), input_index, group))
    return Plan(
        parts=parts,
        exact_buckets=buckets_for(total, EXACT_BYTES_PER_BUCKET),
        near_buckets=buckets_for(total, NEAR_BYTES_PER_BUCKET),
        input_bytes=total,
    )


def buckets_for(input_bytes: int, bytes_per_bucket: int) -> int:
    return max(MIN_BUCKETS, math.ceil(input_bytes / bytes_per_bucket))


def split_file(file: str, size: int | None, splitting: str | None, target: int) -> list[Piece]:
    """The pieces of one file: itself, or spans of about `target` bytes."""
    if size is None or size <= target or splitting is None:
        return [Piece(file, size)]
    if splitting == "bytes":
        cuts = list(range(0, size, target))
        stops: list[int | None] = [*cuts[1:], None]
        return [Piece(file, size, (start, stop)) for start, stop in zip(cuts, stops, strict=True)]
    groups = parquet_row_group_sizes(file)
    if len(groups) < 2:
        return [Piece(file, size)]
    pieces, start, run = [], 0, 0
    for index, group_bytes in enumerate(groups):
        if index > start and run + group_bytes > target:
            pieces.append(Piece(file, size, (start, index)))
            start, run = index, 0
        run += group_bytes
    pieces.append(Piece(file, size, (start, None)))
    return pieces


def group_pieces(pieces: list[Piece], target_bytes: int) -> list[tuple[Piece, ...]]:
    """Consecutive pieces in groups of about `target_bytes` (unknown sizes count as large, a
    span as one part's worth)."""
    groups: list[tuple[Piece, ...]] = []
    current: list[Piece] = []
    size = 0
    for piece in pieces:
        piece_size = target_bytes if piece.size is None or piece.span else piece.size
        if current and size + piece_size > target_bytes:
            groups.append(tuple(current))
            current, size = [], 0
        current.append(piece)
        size += piece_size
    if current:
        groups.append(tuple(current))
    return groups


def fingerprint(data: DataConfig, tokenizer: TokenizerConfig, plan: Plan) -> str:
    """Changes whenever the configuration, the files or their sizes change."""
    payload = {
        "data": data.model_dump(mode="json", exclude={"path", "blend"}),
        "tokenizer": tokenizer.model_dump(mode="json"),
        "parts": [asdict(p) for p in plan.parts],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _absolute(file: str) -> str:
    """Local paths made absolute: workers on other nodes do not share the driver's directory."""
    return file if "://" in file else os.path.abspath(file)


def _size(file: str) -> int | None:
    try:
        if "://" not in file:
            return os.path.getsize(file)
        fs, path = fsspec.core.url_to_fs(file)
        return int(fs.size(path))
    except (OSError, ValueError):
        return None


PLAN_FILE = "plan.json"


def save_plan(work: Path, data: DataConfig, tokenizer: TokenizerConfig, plan: Plan) -> None:
    """The job as planned, for people reading the work directory (workers get their part)."""
    atomic.write_json(
        work / PLAN_FILE,
        {
            "data": data.model_dump(mode="json"),
            "tokenizer": tokenizer.model_dump(mode="json"),
            "exact_buckets": plan.exact_buckets,
            "near_buckets": plan.near_buckets,
            "input_bytes": plan.input_bytes,
            "parts": [asdict(p) for p in plan.parts],
        },
    )
