"""Decide, for each tokenised document of one part, how many copies the shards hold (0 for a
near duplicate or one its input's weight leaves out) and its split; count the tokens each split
and pass receives from the part, which is all the shard stage needs to place the part."""

from __future__ import annotations

import numpy as np

from .. import atomic
from ..plan import Part
from ..selection import SPLITS, copies_of, split_of
from ..shuffle import contains
from . import WorkDir
from .near import near_drops_of


def assign_part(
    part: Part,
    weight: float,
    validation_fraction: float,
    passes: int,
    work_root: str,
    near_buckets: int,
) -> dict:
    """Write assign/part_N.npz (copies, valid) and return the part's counts: kept documents,
    near duplicates, documents the weight left out, extra copies, and per split and pass the
    documents and tokens it streams."""
    work = WorkDir(work_root)
    done = work.part_file("assign", part, ".json")
    if done.exists():
        return atomic.read_json(done)
    with np.load(work.part_file("tokens", part, ".npz")) as arrays:
        ids, lengths, hashes = arrays["ids"], arrays["lengths"], arrays["hash64"]
    near = contains(near_drops_of(work, part, near_buckets), ids)
    copies = copies_of(hashes, weight)
    copies[near] = 0
    valid = split_of(hashes, validation_fraction)
    atomic.write_arrays(work.part_file("assign", part, ".npz"), copies=copies, valid=valid)
    streams = {}
    for split in SPLITS:
        in_split = valid if split == "valid" else ~valid
        streams[split] = [
            [int(chosen.sum()), int(lengths[chosen].sum())]
            for chosen in (in_split & (copies > p) for p in range(passes))
        ]
    result = {
        "part": part.index,
        "near_removed": int(near.sum()),
        "kept": int((copies > 0).sum()),
        "weight_filtered": int((~near & (copies == 0)).sum()),
        "extra_copies": int((copies[copies > 0] - 1).sum()),
        "streams": streams,
    }
    atomic.write_json(done, result)
    return result


def load_assignment(work: WorkDir, part: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(work.part_file("assign", part, ".npz")) as arrays:
        return arrays["copies"], arrays["valid"]
