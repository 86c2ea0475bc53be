"""Tokenise one part: the documents that survived both dedup kinds and that their input's weight
keeps, EOS after each; decide each one's copies and split; count the tokens each split and pass
receives from the part (all the shard stage needs to place it); and pick the part's share of the
removed-document sample among its duplicates."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import atomic
from ..config import DataConfig, TokenizerConfig
from ..plan import Part
from ..ray_cluster import current_node
from ..selection import SPLITS, copies_of, hash_pairs, sample_key, split_of
from ..shuffle import contains
from ..tokenizer import DocumentEncoder, load_tokenizer
from . import WorkDir, drops_of
from .clean import READ_BATCH, REMOVED_SCHEMA, clean_parquet

EXACT_KIND, NEAR_KIND = "exact_duplicates", "near_duplicates"


def tokenize_part(
    part: Part,
    data: DataConfig,
    tokenizer: TokenizerConfig,
    work_root: str,
    exact_buckets: int,
    near_buckets: int,
    passes: int,
    threads: int = 1,
) -> dict:
    """Write the part's token ids and, per written document, its length, copies and split;
    return the counts, with the documents and tokens of each split and pass."""
    work = WorkDir(work_root)
    done = work.part_file("tokens", part, ".json")
    if done.exists():
        return atomic.read_json(done)
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when the Rust pool is first used
    started = time.perf_counter()
    encoder = _encoder(
        work.root.parent / "tokenizer.json", tokenizer.eos_token, data.tokenize.max_piece_chars
    )
    forced_before = encoder.forced_cuts  # the encoder is shared by the tasks of a process
    exact, exact_kept = drops_of(work, "exact", part, exact_buckets)
    near, near_kept = drops_of(work, "near", part, near_buckets)
    chooser = DuplicateSample(data.removed_sample)
    lengths, copies, valid, weight_filtered = _write_tokens(
        work, part, data, encoder, chooser, (exact, exact_kept), (near, near_kept)
    )
    atomic.write_arrays(
        work.part_file("tokens", part, ".npz"),
        lengths=lengths,
        copies=copies,
        valid=valid,
    )
    chooser.write(work.part_file("tokens", part, ".removed.parquet"))
    stats = {
        "part": part.index,
        "documents": int(len(lengths)),
        "tokens": int(lengths.sum()),
        "exact_removed": int(len(exact)),
        "near_removed": int(len(near)),
        "weight_filtered": weight_filtered,
        "extra_copies": int((copies - 1).sum()),
        "forced_cuts": encoder.forced_cuts - forced_before,
        "streams": _streams(lengths, copies, valid, passes),
        "seconds": round(time.perf_counter() - started, 3),
        "node": current_node(),
    }
    atomic.write_json(done, stats)
    return stats


def _write_tokens(
    work: WorkDir,
    part: Part,
    data: DataConfig,
    encoder: DocumentEncoder,
    chooser: DuplicateSample,
    exact_drops: tuple[np.ndarray, np.ndarray],
    near_drops: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Encode the part's documents that survive both dedup kinds and their input's weight into
    its .tokens file (EOS after each), offering the dropped ones to `chooser`; return each
    written document's length, copies and split (valid: True), and the documents the weight
    left out."""
    (exact, exact_kept), (near, near_kept) = exact_drops, near_drops
    weight = data.inputs[part.input_index].weight
    token_file = work.part_file("tokens", part, ".tokens")
    tmp = token_file.with_name(token_file.name + f".tmp.{os.getpid()}")
    lengths, copies, valid = [], [], []
    weight_filtered = 0
    with open(tmp, "wb") as out:
        for batch in _batches(work, part, data):
            ids, hashes = batch["id"], batch["hashes"]
            is_exact, is_near = contains(exact, ids), contains(near, ids)
            chooser.add(EXACT_KIND, batch, is_exact, exact, exact_kept)
            chooser.add(NEAR_KIND, batch, is_near, near, near_kept)
            count = copies_of(hashes[:, 0], weight)
            survivor = ~(is_exact | is_near)
            weight_filtered += int((survivor & (count == 0)).sum())
            written = np.flatnonzero(survivor & (count > 0))
            encoded = encoder.encode([batch["text"][i] for i in written.tolist()])
            out.write(b"".join(array.tobytes() for array in encoded))
            lengths.append(np.fromiter(map(len, encoded), np.int64, len(encoded)))
            copies.append(count[written])
            valid.append(split_of(hashes[written, 0], data.shards.validation_fraction))
    os.replace(tmp, token_file)
    return _cat(lengths, np.int64), _cat(copies, np.int64), _cat(valid, bool), weight_filtered


def _streams(
    lengths: np.ndarray, copies: np.ndarray, valid: np.ndarray, passes: int
) -> dict[str, list[list[int]]]:
    """[documents, tokens] that each split receives from the part in each pass (a document
    with n copies is in the first n passes)."""
    return {
        split: [
            [int(chosen.sum()), int(lengths[chosen].sum())]
            for chosen in (
                (valid if split == "valid" else ~valid) & (copies > p) for p in range(passes)
            )
        ]
        for split in SPLITS
    }


def _encoder(path: Path, eos_token: str, max_piece_chars: int) -> DocumentEncoder:
    """The document encoder of `path`, loaded once per worker process: a Ray worker runs many
    tasks, and loading a large vocabulary costs a tenth of a second or more each time. The file's
    size and modification time are part of the key, so a rewritten tokenizer is loaded anew."""
    stat = path.stat()
    return _cached_encoder(str(path), stat.st_size, stat.st_mtime_ns, eos_token, max_piece_chars)


@functools.lru_cache(maxsize=2)
def _cached_encoder(
    path: str, size: int, mtime_ns: int, eos_token: str, max_piece_chars: int
) -> DocumentEncoder:
    return DocumentEncoder(load_tokenizer(path, eos_token), eos_token, max_piece_chars)


def _batches(work: WorkDir, part: Part, data: DataConfig) -> Iterator[dict]:
    """The part's kept documents in bounded batches (documents and characters): id, text,
    hashes (n, 2), source, location, span."""
    source = pq.ParquetFile(clean_parquet(work, part))
    limit_docs = data.tokenize.batch_documents
    limit_chars = 64 * data.tokenize.max_piece_chars
    pending: list[dict] = []
    chars = 0
    for record_batch in source.iter_batches(batch_size=READ_BATCH):
        columns = record_batch.to_pydict()
        for index, text in enumerate(columns["text"]):
            pending.append({key: values[index] for key, values in columns.items()})
            chars += len(text)
            if len(pending) >= limit_docs or chars >= limit_chars:
                yield _columns(pending)
                pending, chars = [], 0
    if pending:
        yield _columns(pending)


def _columns(rows: list[dict]) -> dict:
    return {
        "id": np.fromiter((r["id"] for r in rows), np.int64, len(rows)),
        "text": [r["text"] for r in rows],
        "hashes": hash_pairs([r["hash"] for r in rows]),
        "source": [r["source"] for r in rows],
        "location": [r["location"] for r in rows],
        "span": [r["span"] for r in rows],
    }


class DuplicateSample:
    """The part's candidates for the removed-document sample of each dedup kind: its
    `limit` duplicates of smallest sample key (ties: corpus order), with the id each repeats."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.rows: dict[str, list[dict]] = {EXACT_KIND: [], NEAR_KIND: []}

    def add(
        self, kind: str, batch: dict, chosen: np.ndarray, drops: np.ndarray, kept: np.ndarray
    ) -> None:
        if not self.limit or not chosen.any():
            return
        keys = sample_key(batch["hashes"])
        rows = self.rows[kind]
        for i in np.flatnonzero(chosen).tolist():
            doc_id = int(batch["id"][i])
            repeats = int(kept[np.searchsorted(drops, doc_id)])
            rows.append(
                {
                    "kind": kind,
                    "key": int(keys[i]),
                    "id": doc_id,
                    "kept_id": repeats,
                    "text": batch["text"][i],
                    "source": batch["source"][i],
                    "location": batch["location"][i],
                    "span": batch["span"][i],
                }
            )
        rows.sort(key=lambda row: (row["key"], row["id"]))
        del rows[self.limit :]

    def write(self, path: Path) -> None:
        rows = [row for kind in (EXACT_KIND, NEAR_KIND) for row in self.rows[kind]]
        schema = REMOVED_SCHEMA.append(pa.field("kept_id", pa.int64()))
        atomic.write_parquet(path, pa.Table.from_pylist(rows, schema=schema))


def _cat(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


def load_tokens(
    work: WorkDir, part: Part | int, dtype: np.dtype
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A tokenised part: its arrays (lengths, copies, valid) and its token ids (memory-mapped)."""
    with np.load(work.part_file("tokens", part, ".npz")) as arrays:
        meta = {key: arrays[key] for key in arrays.files}
    token_file = work.part_file("tokens", part, ".tokens")
    tokens = (
        np.memmap(token_file, dtype=dtype, mode="r")
        if token_file.stat().st_size
        else np.zeros(0, dtype=dtype)
    )
    return meta, tokens
