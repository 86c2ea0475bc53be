"""Write files under a temporary name and rename them into place: a crash never leaves a
half-written file behind a name that says it is complete."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _tmp(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp.{os.getpid()}")


def write_bytes(path: Path, data: bytes) -> None:
    tmp = _tmp(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_bytes(path, buffer.getvalue())


def write_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Several numpy arrays in one uncompressed .npz."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def write_parquet(path: Path, table: pa.Table) -> None:
    tmp = _tmp(path)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def remove_temporaries(directory: Path) -> int:
    """Delete leftovers of writes that a crash interrupted; return how many."""
    removed = 0
    for leftover in directory.rglob("*.tmp*"):
        if leftover.is_file():
            leftover.unlink()
            removed += 1
    return removed
