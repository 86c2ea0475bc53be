"""Exact deduplication, the reduce side: one task per hash bucket reads that bucket's
(hash, id) entries from every part and drops every document whose text an earlier one has."""

from __future__ import annotations

import numpy as np

from .. import atomic
from ..plan import Part
from ..shuffle import read_bucket, sorted_union
from . import WorkDir
from .clean import EXACT_ROW


def exact_duplicates(parts: int, work_root: str, bucket: int) -> dict:
    """Ids of the documents whose text hash an earlier document (smaller id) has, among the
    hashes of `bucket`; written sorted to exact/drop_B.npy. `parts` is the number of parts."""
    work = WorkDir(work_root)
    done = work.bucket_file("exact", "drop", bucket, ".json")
    if done.exists():
        return atomic.read_json(done)
    rows = read_bucket(
        (work.part_file("clean", p, ".exact.npy") for p in range(parts)), bucket, EXACT_ROW
    )
    order = np.lexsort((rows["id"], rows["h1"], rows["h0"]))
    rows = rows[order]
    repeat = np.zeros(len(rows), dtype=bool)
    if len(rows) > 1:
        repeat[1:] = (rows["h0"][1:] == rows["h0"][:-1]) & (rows["h1"][1:] == rows["h1"][:-1])
    drop = np.sort(rows["id"][repeat])
    atomic.write_npy(work.bucket_file("exact", "drop", bucket), drop)
    result = {"bucket": bucket, "documents": int(len(rows)), "removed": int(len(drop))}
    atomic.write_json(done, result)
    return result


def exact_drops_of(work: WorkDir, part: Part, buckets: int) -> np.ndarray:
    """The part's exact duplicates (sorted ids), sliced from every bucket's sorted drop list."""
    low, high = part.id_range
    return sorted_union((work.bucket_file("exact", "drop", b) for b in range(buckets)), low, high)
