"""Which documents go where, decided from each document's 16-byte text hash alone: the
validation split, the copies an input weight asks for, the tokenizer's training sample, and the
shuffle bucket of an id. Nothing here depends on other documents, so every part decides for its
own documents and the answer never changes with how the corpus was cut into parts.

Each choice reads its own bits of the hash, so the choices are independent: the validation
split the top 32 bits of the first 8 bytes, the input weight's extra copy their low 32 bits,
the tokenizer's training sample the second 8 bytes. The removed-document sample ranks documents
by a mix of the second 8 bytes (it only ever ranks documents the tokenizer's sample leaves out).
"""

from __future__ import annotations

import math

import numpy as np

from .config import DataConfig

SPLITS = ("train", "valid")
_MIX1 = np.uint64(0xBF58_476D_1CE4_E5B9)  # splitmix64 finalizer constants
_MIX2 = np.uint64(0x94D0_49BB_1331_11EB)


def hash_pairs(hashes: list[bytes]) -> np.ndarray:
    """16-byte hashes as (n, 2) uint64."""
    if not hashes:
        return np.zeros((0, 2), dtype=np.uint64)
    return np.frombuffer(b"".join(hashes), dtype="<u8").reshape(-1, 2).copy()


def hash64(hashes: list[bytes]) -> np.ndarray:
    """The first 8 bytes of each 16-byte text hash as uint64 (uniform; used to split and sample)."""
    return hash_pairs(hashes)[:, 0].copy()


def in_tokenizer_sample(hashes: np.ndarray, share: float) -> np.ndarray:
    """True for documents in the tokenizer's training sample; `hashes` as (n, 2) uint64."""
    return hashes[:, 1].astype(np.float64) / 2.0**64 < share


def split_of(hash64: np.ndarray, validation_fraction: float) -> np.ndarray:
    """True for validation documents: the top 32 bits of the text hash, as a fraction."""
    top = (hash64 >> np.uint64(32)).astype(np.float64) / 2.0**32
    return top < validation_fraction


def copies_of(hash64: np.ndarray, weight: float) -> np.ndarray:
    """Copies of each document for an input of `weight`: floor(w), plus one more for a
    deterministic share (w - floor(w)) of documents, chosen by the low 32 bits of the hash."""
    whole = int(np.floor(weight))
    low = (hash64 & np.uint64(0xFFFFFFFF)).astype(np.float64) / 2.0**32
    return whole + (low < weight - whole).astype(np.int64)


def passes(data: DataConfig) -> int:
    """Passes over the corpus order that the shards hold: copy k of a document is written in
    pass k, so the copies of a weighted input lie a whole pass apart, never side by side."""
    return max(1, max((math.ceil(spec.weight) for spec in data.inputs), default=1))


def mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer of uint64 (or int64) values: a bijection with full avalanche."""
    x = np.asarray(values).astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= _MIX1
    x ^= x >> np.uint64(27)
    x *= _MIX2
    x ^= x >> np.uint64(31)
    return x


def sample_key(hashes: np.ndarray) -> np.ndarray:
    """The removed-document sample's rank of each document (smallest first); `hashes` (n, 2)."""
    return mix64(hashes[:, 1] ^ np.uint64(0x5BD1_E995_D6E8_FEB8))


def id_buckets(ids: np.ndarray, buckets: int) -> np.ndarray:
    """The shuffle bucket of each document id: uniform whatever the ids' pattern."""
    return (mix64(ids) % np.uint64(buckets)).astype(np.int64)
