"""Near deduplication on Ray tasks, every task bounded by its bucket:

1. `near_band_task` (one per band bucket): reads its (band key, id, text hash) entries from
   every part; in each group of documents sharing a key it sets aside the exact copies of an
   earlier member (an exact copy shares every band key with its original, so this removes
   exactly what exact dedup removes, and near dedup runs beside it rather than after it); turns
   the rest into star pairs (smallest id, other id), and verifies each pair by the estimated
   Jaccard similarity of the two MinHash signatures, read from their parts. Pairs go out by
   pair bucket (of the smaller id), so that every copy of a pair found in several bands meets
   its twins in one task.
2. `near_pair_task` (one per pair bucket): counts the distinct candidate and similar pairs and
   writes the similar ones as the graph's edges, each under both of its nodes.
3. Connected components by alternating `large_star` and `small_star` rounds (Kiveris, Lattanzi,
   Mirrokni, Rastogi & Vassilvitskii, "Connected Components in MapReduce and Beyond", SoCC
   2014): each round groups edges by node, one task per node bucket, and rewrites them so that
   every node moves towards the smallest label of its component; O(log^2 n) rounds. Labels are
   splitmix64 hashes of the ids (pseudo-random, as the bound needs). The driver only sums the
   rounds' change counts and stops once a large-star and the small-star after it change nothing:
   then every component is a star around its smallest label.
4. `near_finalize` (one per node bucket): for each star, keeps the smallest id (the earliest
   document in corpus order) and writes the others, sorted, as that bucket's drop list, with
   the kept id each one repeats.

The result equals `text.dedup.near_duplicates` over the same candidate pairs, computed in one
process; no task reads more than its bucket, and no process holds the corpus's pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import atomic
from ..config import NearDedupConfig
from ..plan import PART_SHIFT
from ..selection import id_buckets, mix64
from ..shuffle import read_bucket, write_buckets
from ..text.dedup import candidate_pairs, estimated_jaccard
from . import WorkDir
from .clean import BAND_ROW

PAIR_ROW = np.dtype([("a", "<i8"), ("b", "<i8"), ("similar", "?")])
EDGE_ROW = np.dtype([("node", "<i8"), ("other", "<i8")])


def near_band_task(
    parts: int, work_root: str, bucket: int, near: NearDedupConfig, buckets: int
) -> dict:
    """Candidate pairs of one band bucket, verified, written by pair bucket."""
    work = WorkDir(work_root)
    done = work.bucket_file("near", "band", bucket, ".json")
    if done.exists():
        return atomic.read_json(done)
    entries = read_bucket(
        (work.part_file("clean", p, ".bands.npy") for p in range(parts)), bucket, BAND_ROW
    )
    entries = entries[np.lexsort((entries["id"], entries["text"], entries["key"]))]
    copy = np.zeros(len(entries), dtype=bool)  # the same text as an earlier member of its group
    copy[1:] = (entries["key"][1:] == entries["key"][:-1]) & (
        entries["text"][1:] == entries["text"][:-1]
    )
    entries = entries[~copy]
    pairs = candidate_pairs(entries["key"], entries["id"])
    rows = np.zeros(len(pairs), dtype=PAIR_ROW)
    rows["a"], rows["b"] = pairs[:, 0], pairs[:, 1]
    if len(pairs):
        members = np.unique(pairs)
        signatures = _signatures(work, members)
        index = np.searchsorted(members, pairs)
        similarity = estimated_jaccard(signatures[index[:, 0]], signatures[index[:, 1]])
        rows["similar"] = similarity >= near.threshold
    write_buckets(
        work.bucket_file("near", "band", bucket), rows, id_buckets(rows["a"], buckets), buckets
    )
    result = {"bucket": bucket, "entries": int(len(entries)), "pairs": int(len(pairs))}
    atomic.write_json(done, result)
    return result


def _signatures(work: WorkDir, doc_ids: np.ndarray) -> np.ndarray:
    """MinHash signatures of `doc_ids` (sorted, unique), read from their parts' files."""
    owners = doc_ids >> PART_SHIFT
    rows = []
    for part in np.unique(owners).tolist():
        wanted = doc_ids[owners == part]
        ids = np.load(work.part_file("clean", part, ".ids.npy"), mmap_mode="r")
        signatures = np.load(work.part_file("clean", part, ".sigs.npy"), mmap_mode="r")
        rows.append(np.asarray(signatures[np.searchsorted(ids, wanted)]))
    return np.concatenate(rows, axis=0)


def near_pair_task(band_buckets: int, work_root: str, bucket: int, buckets: int) -> dict:
    """The distinct pairs of one pair bucket: counted, and the similar ones written as edges
    (each under both nodes) for the first connected-components round."""
    work = WorkDir(work_root)
    done = work.bucket_file("near", "pairs", bucket, ".json")
    if done.exists():
        return atomic.read_json(done)
    rows = read_bucket(
        (work.bucket_file("near", "band", b) for b in range(band_buckets)), bucket, PAIR_ROW
    )
    rows = np.unique(rows)  # copies of a pair agree on `similar`, so this keeps one of each
    similar = rows[rows["similar"]]
    _write_edges(work, 0, bucket, similar["a"], similar["b"], buckets, both_ways=True)
    result = {"bucket": bucket, "candidate_pairs": int(len(rows)), "similar_pairs": len(similar)}
    atomic.write_json(done, result)
    return result


RunTasks = Callable[[Callable[..., dict], list[tuple], list[Path]], list[dict]]


def connected_components(work_root: str, buckets: int, run: RunTasks) -> int:
    """Alternate large-star and small-star rounds (each a task per bucket, run by `run(function,
    calls, done_files)`) until a large-star and the small-star after it change nothing; return
    the round whose edges are the final stars, for `near_finalize`."""
    work = WorkDir(work_root)
    round_index = 0
    while True:
        changed = 0
        for step in (large_star, small_star):
            calls = [(work_root, round_index, b, buckets) for b in range(buckets)]
            done = [_round_done(work, round_index + 1, b) for b in range(buckets)]
            changed += sum(result["changed"] for result in run(step, calls, done))
            round_index += 1
        if changed == 0:
            return round_index


def large_star(work_root: str, round_index: int, bucket: int, buckets: int) -> dict:
    """For each node u: m = the smallest label among u and its neighbours; every edge (u, v)
    with v above u becomes (v, m). Edges come listed under both nodes; the new ones go out
    listed under their larger node, as `small_star` reads them."""
    work = WorkDir(work_root)
    done = _round_done(work, round_index + 1, bucket)
    if done.exists():
        return atomic.read_json(done)
    node, other = _read_edges(work, round_index, bucket, buckets)
    node_label, other_label = mix64(node), mix64(other)
    starts = _group_starts(node)
    # Rows are sorted by node, then by the other node's label: a group's first row holds the
    # node's smallest-label neighbour.
    best = other[starts]
    center = np.where(other_label[starts] < node_label[starts], best, node[starts])
    size = np.diff(np.r_[starts, len(node)])
    row_center = np.repeat(center, size)
    above = other_label > node_label
    changed = int((above & (row_center != node)).sum())
    _write_edges(work, round_index + 1, bucket, other[above], row_center[above], buckets)
    result = {"bucket": bucket, "edges": int(len(node)), "changed": changed}
    atomic.write_json(done, result)
    return result


def small_star(work_root: str, round_index: int, bucket: int, buckets: int) -> dict:
    """For each node u with its neighbours N below it: m = the smallest label in N (and u);
    every x in N + {u} other than m gets the edge (x, m). Edges come listed under their larger
    node; the new ones go out listed under both nodes, for `large_star` or `near_finalize`."""
    work = WorkDir(work_root)
    done = _round_done(work, round_index + 1, bucket)
    if done.exists():
        return atomic.read_json(done)
    node, other = _read_edges(work, round_index, bucket, buckets)
    starts = _group_starts(node)
    size = np.diff(np.r_[starts, len(node)])
    center = np.repeat(other[starts], size)  # neighbours sorted by label: the first is smallest
    move = other != center
    low = np.concatenate([other[move], node[starts]])
    high = np.concatenate([center[move], other[starts]])
    _write_edges(work, round_index + 1, bucket, low, high, buckets, both_ways=True)
    result = {"bucket": bucket, "edges": int(len(node)), "changed": int(len(node) - len(starts))}
    atomic.write_json(done, result)
    return result


def near_finalize(work_root: str, round_index: int, bucket: int, buckets: int) -> dict:
    """Once every component is a star: of each star centred in this bucket, every member but
    the smallest id is a near duplicate; write them sorted to near/drop_B.npy, and the id each
    one repeats (the star's smallest) to near/drop_B.kept.npy."""
    work = WorkDir(work_root)
    done = work.bucket_file("near", "drop", bucket, ".json")
    if done.exists():
        return atomic.read_json(done)
    node, other = _read_edges(work, round_index, bucket, buckets)
    centered = mix64(node) < mix64(other)  # rows listed under the star's centre
    node, other = node[centered], other[centered]
    drop = kept = np.zeros(0, dtype=np.int64)
    if len(node):
        starts = _group_starts(node)
        smallest = np.minimum(node[starts], np.minimum.reduceat(other, starts))
        members = np.concatenate([other, node[starts]])
        keep = np.concatenate([np.repeat(smallest, np.diff(np.r_[starts, len(node)])), smallest])
        removed = members != keep
        drop, kept = members[removed], keep[removed]
        order = np.argsort(drop)
        drop, kept = drop[order], kept[order]
    atomic.write_npy(work.bucket_file("near", "drop", bucket, ".kept.npy"), kept)
    atomic.write_npy(work.bucket_file("near", "drop", bucket), drop)
    result = {"bucket": bucket, "removed": int(len(drop))}
    atomic.write_json(done, result)
    return result


def _round_done(work: WorkDir, round_index: int, bucket: int) -> Path:
    return work.bucket_file("near", f"cc_{round_index:03d}", bucket, ".json")


def _write_edges(
    work: WorkDir,
    round_index: int,
    bucket: int,
    node: np.ndarray,
    other: np.ndarray,
    buckets: int,
    both_ways: bool = False,
) -> None:
    """Edges (node, other) for round `round_index`, by the bucket of `node`; with `both_ways`
    each edge is also listed under `other`."""
    if both_ways:
        node, other = np.concatenate([node, other]), np.concatenate([other, node])
    rows = np.zeros(len(node), dtype=EDGE_ROW)
    rows["node"], rows["other"] = node, other
    path = work.bucket_file("near", f"cc_{round_index:03d}", bucket)
    write_buckets(path, rows, id_buckets(rows["node"], buckets), buckets)


def _read_edges(
    work: WorkDir, round_index: int, bucket: int, buckets: int
) -> tuple[np.ndarray, np.ndarray]:
    """The distinct edges of `bucket` in round `round_index`, sorted by node, then by the
    other node's label."""
    paths = (work.bucket_file("near", f"cc_{round_index:03d}", b) for b in range(buckets))
    rows = np.unique(read_bucket(paths, bucket, EDGE_ROW))
    node, other = rows["node"], rows["other"]
    order = np.lexsort((mix64(other), node))
    return node[order], other[order]


def _group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    if not len(sorted_keys):
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
