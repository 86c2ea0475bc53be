"""Near dedup's distributed steps (pair buckets, large-star/small-star rounds, finalize), run
in process over real work files: the same drops as the one-process union-find, for any number
of buckets, and exact counts of distinct pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_pipeline.selection import id_buckets
from data_pipeline.shuffle import write_buckets
from data_pipeline.stages import WorkDir
from data_pipeline.stages.near import (
    PAIR_ROW,
    connected_components,
    near_finalize,
    near_pair_task,
)
from data_pipeline.text.dedup import near_duplicates


def distributed(root: Path, pairs: np.ndarray, similar: np.ndarray, buckets: int):
    """The drops, rounds and pair counts of the distributed steps; the pairs are spread, with
    repeats, over three band-bucket outputs (a pair found in several bands)."""
    (root / "near").mkdir(parents=True)
    work = WorkDir(root)
    rows = np.zeros(len(pairs), PAIR_ROW)
    rows["a"], rows["b"], rows["similar"] = pairs.min(1), pairs.max(1), similar
    rng = np.random.default_rng(0)
    for band in range(3):
        chosen = rows if band == 0 else rows[rng.random(len(rows)) < 0.6]
        path = work.bucket_file("near", "band", band)
        write_buckets(path, chosen, id_buckets(chosen["a"], buckets), buckets)
    counts = [near_pair_task(3, str(root), b, buckets) for b in range(buckets)]
    rounds = connected_components(
        str(root), buckets, lambda step, calls, done: [step(*call) for call in calls]
    )
    for b in range(buckets):
        near_finalize(str(root), rounds, b, buckets)
    drops = [np.load(work.bucket_file("near", "drop", b)) for b in range(buckets)]
    return np.sort(np.concatenate(drops)), rounds, counts


def graph(shape: str) -> np.ndarray:
    rng = np.random.default_rng(8)
    if shape == "random":  # ~20k ids, components of every size
        pairs = rng.integers(-(10**12), 10**12, (20_000, 2)) // 10**8
        return pairs[pairs[:, 0] != pairs[:, 1]]
    if shape == "star":
        return np.stack([np.full(1000, 7), np.arange(100, 1100)], axis=1)
    if shape == "none":
        return np.zeros((0, 2), dtype=np.int64)
    order = np.arange(5000, 0, -1) if shape == "path_descending" else rng.permutation(5000)
    return np.stack([order[:-1], order[1:]], axis=1)  # long paths: the slowest to converge


@pytest.mark.parametrize("shape", ["random", "path_descending", "path_shuffled", "star", "none"])
@pytest.mark.parametrize("buckets", [1, 4, 7])
def test_connected_components_equal_union_find(tmp_path, shape, buckets):
    pairs = graph(shape)
    low, high = pairs.min(1), pairs.max(1)
    similar = (low * 7919 + high * 104729) % 10 < 7  # the same for every copy of a pair
    drops, rounds, counts = distributed(tmp_path, pairs, similar, buckets)
    assert drops.tolist() == near_duplicates(pairs, similar).tolist()
    distinct = np.unique(np.stack([low, high], axis=1), axis=0)
    assert sum(c["candidate_pairs"] for c in counts) == len(distinct)
    assert sum(c["similar_pairs"] for c in counts) == int(
        ((distinct[:, 0] * 7919 + distinct[:, 1] * 104729) % 10 < 7).sum()
    )
    assert rounds <= 2 * 12  # O(log^2 n) pairs of rounds; a 5000-node path takes a few
