"""Exchanging rows between stages through files, without any process seeing them all.

A map task writes its rows once, sorted by bucket, as one `.npy` of a structured dtype beside
the offsets of each bucket (`write_buckets`). A reduce task reads its bucket's rows from every
map file and nothing else (`read_bucket`): the slices are memory-mapped, so the bytes read are
the bucket's own. Sorted id lists (the documents a reducer decided to drop) are read per part
the same way, by binary search (`sorted_slice`): a part never scans a corpus-wide list.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from . import atomic

OFFSETS = ".offsets.npy"


def write_buckets(path: Path, rows: np.ndarray, buckets: np.ndarray, count: int) -> None:
    """Write `rows` grouped by `buckets` (int, in [0, count)) and the offset of each group;
    rows keep their order within a bucket. The offsets file is written last."""
    order = np.argsort(buckets, kind="stable")
    offsets = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(np.bincount(buckets, minlength=count), out=offsets[1:])
    atomic.write_npy(path, rows[order])
    atomic.write_npy(_offsets_path(path), offsets)


def read_bucket(paths: Iterable[Path], bucket: int, dtype: np.dtype) -> np.ndarray:
    """The rows of `bucket` from every map file of `paths`, in the order of `paths`."""
    slices = []
    for path in paths:
        offsets = np.load(_offsets_path(path))
        start, stop = int(offsets[bucket]), int(offsets[bucket + 1])
        if stop > start:
            rows = np.load(path, mmap_mode="r")
            slices.append(np.array(rows[start:stop]))
    return np.concatenate(slices) if slices else np.zeros(0, dtype=dtype)


def sorted_slice(path: Path, low: int, high: int) -> np.ndarray:
    """The values v with low <= v < high of a sorted 1-D `.npy`, found by binary search."""
    try:
        values = np.load(path, mmap_mode="r")
    except ValueError:  # an empty array cannot be memory-mapped
        values = np.load(path)
    if values.size == 0:
        return np.zeros(0, dtype=values.dtype)
    start, stop = np.searchsorted(values, [low, high])
    return np.array(values[start:stop])


def sorted_union(paths: Iterable[Path], low: int, high: int) -> np.ndarray:
    """The sorted union of the values in [low, high) of several sorted id files."""
    found = [sorted_slice(path, low, high) for path in paths]
    found = [values for values in found if values.size]
    return np.sort(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)


def contains(sorted_values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Membership of each query in a sorted array, by binary search (no hash table)."""
    if sorted_values.size == 0:
        return np.zeros(len(queries), dtype=bool)
    position = np.searchsorted(sorted_values, queries)
    position[position == len(sorted_values)] = 0
    return sorted_values[position] == queries


def _offsets_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".npy") + OFFSETS)
