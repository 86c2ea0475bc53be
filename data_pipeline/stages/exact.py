"""Exact deduplication, the reduce side: one task per hash bucket reads that bucket's
(hash, id) entries from every part and drops every document whose text an earlier one has."""

from __future__ import annotations

import numpy as np

from .. import atomic
from ..shuffle import read_bucket
from . import WorkDir
from .clean import EXACT_ROW


def exact_duplicates(parts: int, work_root: str, bucket: int) -> dict:
    """Ids of the documents whose text hash an earlier document (smaller id) has, among the
    hashes of `bucket`, written sorted to exact/drop_B.npy with the id of the document each
    repeats (the first with its text) in exact/drop_B.kept.npy. `parts`: the number of parts."""
    work = WorkDir(work_root)
    done = work.bucket_file("exact", "drop", bucket, ".json")
    if done.exists():
        return atomic.read_json(done)
    rows = read_bucket(
        (work.part_file("clean", p, ".exact.npy") for p in range(parts)), bucket, EXACT_ROW
    )
    rows = rows[np.lexsort((rows["id"], rows["h1"], rows["h0"]))]
    repeat = np.zeros(len(rows), dtype=bool)
    repeat[1:] = (rows["h0"][1:] == rows["h0"][:-1]) & (rows["h1"][1:] == rows["h1"][:-1])
    first = np.flatnonzero(~repeat)  # each text's first document
    kept = rows["id"][first][np.cumsum(~repeat) - 1]
    order = np.argsort(rows["id"][repeat])
    atomic.write_npy(work.bucket_file("exact", "drop", bucket, ".kept.npy"), kept[repeat][order])
    atomic.write_npy(work.bucket_file("exact", "drop", bucket), rows["id"][repeat][order])
    result = {"bucket": bucket, "documents": int(len(rows)), "removed": int(repeat.sum())}
    atomic.write_json(done, result)
    return result
