"""Write the final shards: documents in corpus order, split into train and validation by a hash
of their text, each shard closed once it holds `max_tokens` tokens.

Names are deterministic (`train_00000`, `valid_00000`, ...), and so are the boundaries (they
follow from the token counts alone), so a resumed run skips the shards already finished and
writes the rest byte for byte as an uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import atomic
from .format import ShardWriter, bin_path, idx_path, shard_exists
from .tokenizer import file_sha256

SPLITS = ("train", "valid")


@dataclass
class ShardInfo:
    name: str
    split: str
    documents: int
    tokens: int
    bin_sha256: str
    idx_sha256: str


# Each choice made from a document's 16-byte text hash reads its own bits, so the choices are
# independent: the validation split the top 32 bits of the first 8 bytes, the input weight's
# extra copy their low 32 bits, the tokenizer's training sample the second 8 bytes.


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


class SplitWriter:
    """The shards of one split, opened and closed as tokens accumulate."""

    def __init__(self, out: Path, markers: Path, split: str, dtype: type, max_tokens: int):
        self.out, self.markers, self.split = out, markers, split
        self.dtype, self.max_tokens = dtype, max_tokens
        self.shards: list[ShardInfo] = []
        self._writer: ShardWriter | None = None
        self._skipping = False
        self._documents = 0
        self._tokens = 0

    @property
    def _name(self) -> str:
        return f"{self.split}_{len(self.shards):05d}"

    def add(self, tokens: np.ndarray) -> None:
        if self._writer is None and not self._skipping:
            self._open()
        if self._writer is not None:
            self._writer.add_document(tokens)
        self._documents += 1
        self._tokens += len(tokens)
        if self._tokens >= self.max_tokens:
            self.close()

    def _open(self) -> None:
        marker = self.markers / f"{self._name}.json"
        if marker.exists() and shard_exists(self.out / self._name):
            self._skipping = True  # finished by an earlier, interrupted run
        else:
            self._writer = ShardWriter(self.out / self._name, self.dtype)

    def close(self) -> None:
        """Close the shard being filled, if it holds anything."""
        if self._documents == 0:
            return
        marker = self.markers / f"{self._name}.json"
        if self._skipping:
            info = ShardInfo(**atomic.read_json(marker))
            assert (info.documents, info.tokens) == (self._documents, self._tokens), info
        else:
            assert self._writer is not None
            self._writer.close()
            prefix = self.out / self._name
            info = ShardInfo(
                name=self._name,
                split=self.split,
                documents=self._documents,
                tokens=self._tokens,
                bin_sha256=file_sha256(bin_path(prefix)),
                idx_sha256=file_sha256(idx_path(prefix)),
            )
            atomic.write_json(marker, asdict(info))
        self.shards.append(info)
        self._writer, self._skipping = None, False
        self._documents = self._tokens = 0
