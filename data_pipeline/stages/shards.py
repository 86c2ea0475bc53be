"""Write one shard: the documents of one split whose first token falls in a fixed range of that
split's token stream.

A split's stream is pass 0 (every kept document of the split, in corpus order), then pass 1
(the documents an input weight copies a second time, in corpus order), and so on; shard k of a
split holds the documents starting in tokens [k * max_tokens, (k + 1) * max_tokens) of it. So
a shard's bytes follow from the input and the configuration alone, whatever the parts, tasks or
machines, shards are written in parallel, and a weighted copy lies a whole pass away from its
original. A range in which no document starts (possible only after a document longer than
`max_tokens`) gives no shard; names keep their range number.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import atomic
from ..format import ShardWriter
from . import WorkDir
from .tokenize import load_tokens


@dataclass(frozen=True)
class Segment:
    """Pass `pass_index` of part `part` within a split's stream, starting at token `start`."""

    part: int
    pass_index: int
    start: int


@dataclass
class ShardInfo:
    name: str
    split: str
    documents: int
    tokens: int
    bin_sha256: str
    idx_sha256: str


def write_shard(
    work_root: str,
    output: str,
    name: str,
    split: str,
    dtype_name: str,
    token_range: tuple[int, int],
    segments: list[Segment],
) -> dict:
    """Write shard `name` of `split`: the documents of `segments` that start in `token_range`;
    return its ShardInfo as a dict (documents 0 and no files when none does)."""
    work = WorkDir(work_root)
    marker = work.file("shards", f"{name}.json")
    if marker.exists():
        return atomic.read_json(marker)
    dtype = np.dtype(dtype_name)
    writer: ShardWriter | None = None
    documents = tokens_written = 0
    first, stop = token_range
    try:
        for segment in segments:
            meta, tokens = load_tokens(work, segment.part, dtype)
            lengths, copies, valid = meta["lengths"], meta["copies"], meta["valid"]
            file_ends = np.cumsum(lengths)
            in_stream = np.flatnonzero(
                (valid == (split == "valid")) & (copies > segment.pass_index)
            )
            stream_ends = segment.start + np.cumsum(lengths[in_stream])
            starts = stream_ends - lengths[in_stream]
            chosen = in_stream[(starts >= first) & (starts < stop)]
            if not len(chosen):
                continue
            if writer is None:
                writer = ShardWriter(Path(output) / name, dtype.type)
            for run in np.split(chosen, np.flatnonzero(np.diff(chosen) != 1) + 1):
                low = int(file_ends[run[0]] - lengths[run[0]])
                writer.add_documents(tokens[low : int(file_ends[run[-1]])], lengths[run])
            documents += len(chosen)
            tokens_written += int(lengths[chosen].sum())
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    info = ShardInfo(
        name=name,
        split=split,
        documents=documents,
        tokens=tokens_written,
        bin_sha256=writer.bin_sha256 if writer else "",
        idx_sha256=writer.idx_sha256 if writer else "",
    )
    atomic.write_json(marker, asdict(info))
    return asdict(info)
