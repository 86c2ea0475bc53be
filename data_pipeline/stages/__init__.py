"""The work of each pipeline stage on one part or one bucket; `data_pipeline.runner` runs these
as Ray tasks, which read and write files and apply the in-memory text operations of
`data_pipeline.text` to the documents. Every task writes its results under the work directory
with atomic renames and a small JSON of counts last, so a task whose JSON exists is complete
and is not redone on resume. Tasks get what they work on (a part, a bucket number,
configuration sections) as arguments and read only their own inputs: no task loads the plan or
a list covering the whole corpus.

    clean/part_N.parquet            id, text, hash, source, location, span of the kept documents
    clean/part_N.exact.npy          (hash, id) of those documents, by exact-dedup bucket
    clean/part_N.ids.npy            their ids, and part_N.sigs.npy their MinHash signatures
    clean/part_N.bands.npy          (band key, id, text hash) LSH entries, by near-dedup bucket
    clean/part_N.removed.parquet    the part's candidates for the removed sample of each rule
    clean/part_N.quarantine.jsonl   malformed records (line numbers relative to their span)
    clean/part_N.json               counts: every step's, the spans read, kept documents
    exact/drop_B.npy                sorted ids of the exact duplicates whose hash is in bucket B
                                    (drop_B.kept.npy: the id each repeats)
    near/band_B.npy                 candidate pairs of band bucket B, verified, by pair bucket
    near/cc_RRR_B.npy               edges of connected-components round R, by node bucket
    near/drop_B.npy                 sorted ids of the near duplicates found in bucket B
                                    (drop_B.kept.npy: the id each repeats)
    sample/part_N.parquet           the part's share of the tokenizer's training sample
    tokens/part_N.tokens            token ids of the documents written (EOS after each), raw
    tokens/part_N.npz               lengths, copies and split of those documents
    tokens/part_N.removed.parquet   the part's candidates for the duplicates' removed sample
    shards/NAME.json                a finished shard's counts and checksums
    removed/levelLL_I.parquet       the removed sample's merge tree
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..plan import Part
from ..shuffle import sorted_union_rows


class WorkDir:
    """Paths inside OUTPUT/.work."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def part_file(self, stage: str, part: Part | int, suffix: str) -> Path:
        index = part if isinstance(part, int) else part.index
        return self.root / stage / f"part_{index:06d}{suffix}"

    def bucket_file(self, stage: str, name: str, bucket: int, suffix: str = ".npy") -> Path:
        return self.root / stage / f"{name}_{bucket:05d}{suffix}"

    def file(self, stage: str, name: str) -> Path:
        return self.root / stage / name


STAGE_DIRS = ("clean", "exact", "sample", "tokens", "near", "shards", "removed")


def drops_of(work: WorkDir, kind: str, part: Part, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """The part's duplicates of `kind` ("exact" or "near": sorted ids) and the ids they
    repeat, sliced from every bucket's sorted drop list."""
    if not buckets:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    low, high = part.id_range
    files = [
        (work.bucket_file(kind, "drop", b), work.bucket_file(kind, "drop", b, ".kept.npy"))
        for b in range(buckets)
    ]
    ids, kept = sorted_union_rows(files, low, high)
    return ids, kept
