"""A split of a prepared data directory as one token stream, and fixed-length packing over it.

Documents already end with the EOS token, so packing simply cuts the concatenated stream of all
shards of a split (in manifest order) into windows of `seq_length + 1` tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_pipeline.errors import KilnError
from data_pipeline.format import ShardReader, shard_exists

MANIFEST = "manifest.json"


class DataDirError(KilnError):
    """A data directory that cannot be trained on: a user mistake, told in one sentence."""


class TokenStream:
    """Several shards' token streams back to back; `read` crosses shard boundaries."""

    def __init__(self, parts: Sequence[np.ndarray], *, eos_id: int, vocab_size: int) -> None:
        self._parts = list(parts)
        self.eos_id = int(eos_id)
        self.vocab_size = int(vocab_size)
        # _offsets[j] is the stream position of part j's first token; the last is the total.
        self._offsets = np.zeros(len(self._parts) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in self._parts], out=self._offsets[1:])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"read({start}, {length}) outside a stream of {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        # side="right" skips empty parts: the part holding `start` is the last one starting <= it.
        part = int(np.searchsorted(self._offsets, start, side="right")) - 1
        done = 0
        while done < length:
            local = start + done - int(self._offsets[part])
            take = min(length - done, len(self._parts[part]) - local)
            out[done : done + take] = self._parts[part][local : local + take]
            done += take
            part += 1
        return out


def read_manifest(data_dir: str | Path) -> dict:
    """The parsed manifest.json of a directory written by `kiln data prepare`."""
    directory = Path(data_dir)
    if not directory.is_dir():
        raise DataDirError(f"data directory {directory} does not exist")
    path = directory / MANIFEST
    if not path.is_file():
        raise DataDirError(f"{path} not found: run `kiln data prepare` to make this directory")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:
        raise DataDirError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict):
        manifest = {}
    tokenizer = manifest.get("tokenizer")
    if (
        not isinstance(manifest.get("shards"), list)
        or not isinstance(tokenizer, dict)
        or not {"vocab_size", "eos_id"} <= tokenizer.keys()
    ):
        raise DataDirError(f"{path} lacks a shards list or the tokenizer's vocab_size and eos_id")
    return manifest


def load_split(data_dir: str | Path, split: str) -> TokenStream:
    """All shards of `split` ("train" or "valid") of a data directory, in manifest order."""
    return load_split_documents(data_dir, split)[0]


def load_split_documents(data_dir: str | Path, split: str) -> tuple[TokenStream, np.ndarray, list]:
    """The split's token stream, the length of each of its documents (a Megatron document may
    span several sequences), and the documents of each pass over the corpus order that the
    manifest records (`passes`; None for data prepared without weights' passes)."""
    directory = Path(data_dir)
    manifest = read_manifest(directory)
    names = [s["name"] for s in manifest["shards"] if s.get("split") == split]
    if not names:
        raise DataDirError(f"{directory / MANIFEST} lists no shards of split {split!r}")
    parts, lengths = [], []
    for name in names:
        prefix = directory / name
        if not shard_exists(prefix):
            raise DataDirError(
                f"{directory / MANIFEST} lists shard {name} but {prefix}.bin/.idx are missing"
            )
        reader = ShardReader(prefix)
        parts.append(reader.token_stream())
        sequences = np.concatenate(([0], np.cumsum(reader.sequence_lengths, dtype=np.int64)))
        lengths.append(np.diff(sequences[reader.document_indices]))
    tokenizer = manifest["tokenizer"]
    stream = TokenStream(parts, eos_id=tokenizer["eos_id"], vocab_size=tokenizer["vocab_size"])
    passes = (manifest.get("passes") or {}).get(split)
    return stream, np.concatenate(lengths), passes


def check_seed(seed: int) -> int:
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return int(seed)


def check_index(g: int) -> int:
    if g < 0:
        raise IndexError(f"sample index must be non-negative, got {g}")
    return int(g)


class PackedSequences:
    """Sample i is stream tokens [i*S, i*S + S + 1): inputs the first S, targets the last S.

    Consecutive samples overlap by one token (as in Megatron's GPT dataset), so every token but
    the tail appears in exactly one sample's inputs.
    """

    def __init__(self, stream: TokenStream, seq_length: int) -> None:
        if seq_length < 1:
            raise ValueError(f"seq_length must be at least 1, got {seq_length}")
        self.stream = stream
        self.seq_length = int(seq_length)
        self._len = (len(stream) - 1) // self.seq_length
        if self._len <= 0:
            raise DataDirError(
                f"packing into sequences of {seq_length} needs at least seq_length+1 = "
                f"{seq_length + 1} tokens, but the split holds {len(stream)}"
            )

    def __len__(self) -> int:
        return self._len

    def sample(self, i: int) -> np.ndarray:
        """seq_length + 1 int64 tokens of sample i."""
        if not 0 <= i < self._len:
            raise IndexError(f"sample {i} outside 0..{self._len - 1}")
        return self.stream.read(i * self.seq_length, self.seq_length + 1)

    __getitem__ = sample
