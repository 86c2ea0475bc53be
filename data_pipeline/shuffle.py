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
    return sorted_rows(path, low, high)[0]


def sorted_rows(path: Path, low: int, high: int, *aligned: Path) -> list[np.ndarray]:
    """The values in [low, high) of a sorted 1-D `.npy`, and the same rows of the `.npy` files
    `aligned` with it (one value per row of `path`)."""
    values = _mapped(path)
    start, stop = np.searchsorted(values, [low, high]) if values.size else (0, 0)
    return [np.array(values[start:stop]), *(np.array(_mapped(a)[start:stop]) for a in aligned)]


def sorted_union(paths: Iterable[Path], low: int, high: int) -> np.ndarray:
    """The sorted union of the values in [low, high) of several sorted id files."""
    return sorted_union_rows([(path,) for path in paths], low, high)[0]


def sorted_union_rows(files: Iterable[tuple[Path, ...]], low: int, high: int) -> list[np.ndarray]:
    """`sorted_rows` of several (sorted file, aligned files...) groups, merged in order."""
    files = list(files)
    found = [sorted_rows(path, low, high, *aligned) for path, *aligned in files]
    found = [rows for rows in found if rows[0].size]
    if not found:
        return [np.zeros(0, dtype=np.int64) for _ in range(1 + _width(files))]
    merged = [np.concatenate(column) for column in zip(*found, strict=True)]
    order = np.argsort(merged[0], kind="stable")
    return [column[order] for column in merged]


def _width(files: list[tuple[Path, ...]]) -> int:
    return len(files[0]) - 1 if files else 0


def _mapped(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # an empty array cannot be memory-mapped
        return np.load(path)


def contains(sorted_values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Membership of each query in a sorted array, by binary search (no hash table)."""
    if sorted_values.size == 0:
        return np.zeros(len(queries), dtype=bool)
    position = np.searchsorted(sorted_values, queries)
    position[position == len(sorted_values)] = 0
    return sorted_values[position] == queries


def _offsets_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".npy") + OFFSETS)
