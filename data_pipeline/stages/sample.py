"""The tokenizer's training sample, chosen by each part for its own documents: the kept
documents that are neither exact nor near duplicates and whose hash falls in the first `share`
of the hash space, long ones cut into the same bounded pieces the encoder uses (the trainer's
memory grows with the longest sequence it is given)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import atomic
from ..plan import Part
from ..selection import hash_pairs, in_tokenizer_sample
from ..shuffle import contains
from ..tokenizer import split_pieces
from . import WorkDir, drops_of
from .clean import read_clean

SAMPLE_SCHEMA = pa.schema([("text", pa.string())])


def sample_part(
    part: Part,
    work_root: str,
    exact_buckets: int,
    near_buckets: int,
    share: float,
    max_piece_chars: int,
) -> dict:
    work = WorkDir(work_root)
    done = work.part_file("sample", part, ".json")
    if done.exists():
        return atomic.read_json(done)
    table = read_clean(work, part, ["id", "text", "hash"])
    chosen = in_tokenizer_sample(hash_pairs(table.column("hash").to_pylist()), share)
    ids = table.column("id").to_numpy()
    chosen &= ~contains(drops_of(work, "exact", part, exact_buckets)[0], ids)
    chosen &= ~contains(drops_of(work, "near", part, near_buckets)[0], ids)
    texts = table.column("text").take(pa.array(np.flatnonzero(chosen))).to_pylist()
    pieces = [piece for text in texts for piece in split_pieces(text, max_piece_chars)]
    atomic.write_parquet(
        work.part_file("sample", part, ".parquet"),
        pa.table({"text": pa.array(pieces, pa.string())}, schema=SAMPLE_SCHEMA),
    )
    result = {"part": part.index, "documents": len(texts), "pieces": len(pieces)}
    atomic.write_json(done, result)
    return result


def sample_texts(work: WorkDir, parts: list[Part]) -> Iterator[str]:
    """The sample in corpus order, streamed: one part's pieces in memory at a time."""
    for part in parts:
        source = pq.ParquetFile(work.part_file("sample", part, ".parquet"))
        for batch in source.iter_batches(batch_size=1024):
            yield from batch.column(0).to_pylist()
