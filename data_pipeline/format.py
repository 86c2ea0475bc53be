"""Megatron's `MMIDIDX` shard format: a `.bin` of concatenated token ids and an `.idx` index.

The `.idx` layout (little-endian), as megatron-core's `IndexedDatasetBuilder` writes it:

    b"MMIDIDX\\x00\\x00"   9-byte magic
    <Q  version = 1
    <B  dtype code         (uint8 1, int8 2, int16 3, int32 4, int64 5, float64 6, float32 7,
                            uint16 8)
    <Q  sequence count S
    <Q  document-index count D + 1
    int32[S]   sequence lengths in tokens
    int64[S]   byte offset of each sequence in the .bin
    int64[D+1] document indices: document d is sequences [idx[d], idx[d+1])

Kiln writes one sequence per document (as Megatron's `preprocess_data.py` does without
sentence splitting), so its shards hold D sequences and the indices 0..D. The reader accepts
any valid shard, including Megatron's sentence-split ones.

Both files are written under temporary names and renamed into place, `.bin` first: a shard
whose `.idx` exists is complete.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from .errors import KilnError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES: dict[type[np.number], int] = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class ShardFormatError(KilnError):
    """A file that is not a readable MMIDIDX shard."""


def token_dtype(vocab_size: int) -> type[np.number]:
    """uint16 when every token id fits (fewer than 65,536 entries), else int32."""
    return np.uint16 if vocab_size < 65536 else np.int32


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def shard_exists(prefix: str | Path) -> bool:
    """A complete shard: its index is renamed into place only after its data."""
    return idx_path(prefix).exists() and bin_path(prefix).exists()


class ShardWriter:
    """Write documents of token ids into one shard; `close()` makes it visible atomically and
    leaves the sha256 of both files in `bin_sha256` / `idx_sha256` (computed while writing).

    with ShardWriter("out/train_00000", np.uint16) as shard:
        shard.add_document(ids)
    """

    def __init__(self, prefix: str | Path, dtype: type[np.number]) -> None:
        if dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {dtype}")
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self._tmp_bin = self.prefix.with_name(self.prefix.name + ".bin.tmp")
        self._data = open(self._tmp_bin, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._bin_hash = hashlib.sha256()
        self._lengths: list[np.ndarray] = []
        self._closed = False
        self.bin_sha256 = self.idx_sha256 = ""

    @property
    def num_documents(self) -> int:
        return sum(len(lengths) for lengths in self._lengths)

    @property
    def num_tokens(self) -> int:
        return int(sum(int(lengths.sum()) for lengths in self._lengths))

    def add_document(self, token_ids: np.ndarray | list[int]) -> None:
        array = np.asarray(token_ids)
        self.add_documents(array, np.asarray([array.size], dtype=np.int64))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents given as their tokens back to back and each one's length."""
        array = np.asarray(tokens)
        converted = array.dtype != self.dtype and array.size
        if converted and (array.min() < 0 or array.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids out of range for {self.dtype}")
        data = array.astype(self.dtype, copy=False).tobytes(order="C")
        self._data.write(data)
        self._bin_hash.update(data)
        self._lengths.append(np.asarray(lengths, dtype=np.int64))

    def close(self) -> None:
        """Flush the data, write the index, and rename both into place."""
        if self._closed:
            return
        self._closed = True
        self._data.flush()
        os.fsync(self._data.fileno())
        self._data.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        index_bytes = encode_index(lengths, self.dtype.type)
        tmp_idx = self.prefix.with_name(self.prefix.name + ".idx.tmp")
        with open(tmp_idx, "wb") as index:
            index.write(index_bytes)
            index.flush()
            os.fsync(index.fileno())
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(tmp_idx, idx_path(self.prefix))
        self.bin_sha256 = self._bin_hash.hexdigest()
        self.idx_sha256 = hashlib.sha256(index_bytes).hexdigest()

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self._data.close()
            self._tmp_bin.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def encode_index(
    lengths: list[int] | np.ndarray,
    dtype: type[np.number],
    document_indices: list[int] | None = None,
) -> bytes:
    """The `.idx` bytes for sequences of `lengths` (one document each unless indices given)."""
    lengths_array = np.asarray(lengths, dtype=np.int64)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(lengths_array), dtype=np.int64)
    if len(lengths_array) > 1:
        np.cumsum(lengths_array[:-1] * itemsize, out=pointers[1:])
    if document_indices is None:
        document_indices = np.arange(len(lengths_array) + 1, dtype=np.int64)
    return b"".join(
        (
            MAGIC,
            struct.pack("<Q", VERSION),
            struct.pack("<B", DTYPE_CODES[dtype]),
            struct.pack("<Q", len(lengths_array)),
            struct.pack("<Q", len(document_indices)),
            lengths_array.astype(np.int32).tobytes(order="C"),
            pointers.tobytes(order="C"),
            np.asarray(document_indices, dtype=np.int64).tobytes(order="C"),
        )
    )


class ShardReader:
    """Memory-mapped reader of an MMIDIDX shard: `reader[i]` is sequence i's token ids."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        index_file, data_file = idx_path(prefix), bin_path(prefix)
        for path in (index_file, data_file):
            if not path.is_file():
                raise ShardFormatError(f"{path}: no such shard file")
        raw = index_file.read_bytes()
        header_size = len(MAGIC) + 8 + 1 + 8 + 8
        if len(raw) < header_size or raw[: len(MAGIC)] != MAGIC:
            raise ShardFormatError(f"{index_file}: not an MMIDIDX index")
        offset = len(MAGIC)
        (version,) = struct.unpack_from("<Q", raw, offset)
        (code,) = struct.unpack_from("<B", raw, offset + 8)
        (sequence_count,) = struct.unpack_from("<Q", raw, offset + 9)
        (document_count,) = struct.unpack_from("<Q", raw, offset + 17)
        if version != VERSION or code not in CODE_DTYPES:
            raise ShardFormatError(f"{index_file}: version {version}, dtype code {code}")
        self.dtype = np.dtype(CODE_DTYPES[code])
        expected = header_size + sequence_count * (4 + 8) + document_count * 8
        if len(raw) < expected:
            raise ShardFormatError(f"{index_file}: truncated ({len(raw)} < {expected} bytes)")
        self.sequence_lengths = np.frombuffer(raw, np.int32, sequence_count, header_size)
        self.sequence_pointers = np.frombuffer(
            raw, np.int64, sequence_count, header_size + 4 * sequence_count
        )
        self.document_indices = np.frombuffer(
            raw, np.int64, document_count, header_size + 12 * sequence_count
        )
        size = data_file.stat().st_size
        needed = int(self.sequence_lengths.sum(dtype=np.int64)) * self.dtype.itemsize
        if size < needed:
            raise ShardFormatError(f"{data_file}: truncated ({size} < {needed} bytes)")
        self._data = (
            np.memmap(data_file, dtype=self.dtype, mode="r")
            if size
            else np.zeros(0, dtype=self.dtype)
        )

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return np.asarray(self._data[start : start + int(self.sequence_lengths[i])])

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def document(self, d: int) -> np.ndarray:
        """All sequences of document d, concatenated."""
        first, last = int(self.document_indices[d]), int(self.document_indices[d + 1])
        parts = [self[i] for i in range(first, last)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def token_stream(self) -> np.ndarray:
        """The whole `.bin` as one array: every sequence's tokens back to back, in index order.

        This is what packing across document boundaries reads, so the sequences must be stored
        contiguously (pointer i = bytes of sequences 0..i-1), as every Megatron builder writes
        them; otherwise raises `ShardFormatError`.
        """
        lengths = self.sequence_lengths.astype(np.int64)
        expected = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1] * self.dtype.itemsize, out=expected[1:])
        wrong = np.flatnonzero(self.sequence_pointers != expected)
        if wrong.size:
            i = int(wrong[0])
            raise ShardFormatError(
                f"{idx_path(self.prefix)}: sequence {i} starts at byte "
                f"{int(self.sequence_pointers[i])}, not {int(expected[i])}, so the sequences are "
                "not stored back to back and cannot be read as one token stream"
            )
        return np.asarray(self._data[: self.num_tokens])
