"""Tokenise one part: the kept documents that are not exact duplicates, EOS after each; their
MinHash signatures and LSH band keys, the band keys written by near-dedup bucket (the map side
of the near-dedup shuffle)."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .. import atomic
from ..config import DataConfig, TokenizerConfig
from ..plan import Part
from ..ray_cluster import current_node
from ..selection import hash64
from ..shuffle import contains, write_buckets
from ..steps.dedup import MinHasher
from ..tokenizer import DocumentEncoder, load_tokenizer
from . import WorkDir
from .clean import READ_BATCH, clean_parquet
from .exact import exact_drops_of

BAND_ROW = np.dtype([("key", "<u8"), ("id", "<i8")])


def tokenize_part(
    part: Part,
    data: DataConfig,
    tokenizer: TokenizerConfig,
    work_root: str,
    exact_buckets: int,
    near_buckets: int,
    threads: int = 1,
) -> dict:
    """Write the part's token ids, (ids, lengths, hash64), and for near dedup its signatures and
    band entries; return the counts."""
    work = WorkDir(work_root)
    done = work.part_file("tokens", part, ".json")
    if done.exists():
        return atomic.read_json(done)
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when the Rust pool is first used
    started = time.perf_counter()
    encoder = _encoder(
        work.root.parent / "tokenizer.json", tokenizer.eos_token, data.tokenize.max_piece_chars
    )
    near = data.dedup.near
    minhasher = MinHasher(near) if near.enabled else None
    drops = exact_drops_of(work, part, exact_buckets)
    token_file = work.part_file("tokens", part, ".tokens")
    tmp = token_file.with_name(token_file.name + f".tmp.{os.getpid()}")
    ids, lengths, hashes, signatures = [], [], [], []
    with open(tmp, "wb") as out:
        for batch_ids, texts, batch_hashes in _batches(work, part, data, drops):
            encoded = encoder.encode(texts)
            out.write(b"".join(array.tobytes() for array in encoded))
            ids.append(batch_ids)
            lengths.append(np.fromiter((len(a) for a in encoded), np.int64, len(encoded)))
            hashes.append(batch_hashes)
            if minhasher is not None:
                signatures.append(minhasher.signatures([a[:-1] for a in encoded]))  # no EOS
    os.replace(tmp, token_file)
    all_ids = _cat(ids, np.int64)
    all_lengths = _cat(lengths, np.int64)
    if minhasher is not None:
        sigs = np.concatenate(signatures) if signatures else np.zeros((0, minhasher.num_perm))
        atomic.write_npy(work.part_file("tokens", part, ".sigs.npy"), sigs.astype(np.uint32))
        _write_band_entries(work, part, minhasher, sigs, all_ids, near_buckets)
    atomic.write_arrays(
        work.part_file("tokens", part, ".npz"),
        ids=all_ids,
        lengths=all_lengths,
        hash64=_cat(hashes, np.uint64),
    )
    stats = {
        "part": part.index,
        "documents": int(len(all_lengths)),
        "tokens": int(all_lengths.sum()),
        "exact_removed": int(len(drops)),
        "seconds": round(time.perf_counter() - started, 3),
        "node": current_node(),
    }
    atomic.write_json(done, stats)
    return stats


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


def _batches(
    work: WorkDir, part: Part, data: DataConfig, drops: np.ndarray
) -> Iterator[tuple[np.ndarray, list[str], np.ndarray]]:
    """Kept, not exactly duplicated documents in bounded batches (documents and chars)."""
    source = pq.ParquetFile(clean_parquet(work, part))
    limit_docs = data.tokenize.batch_documents
    limit_chars = 64 * data.tokenize.max_piece_chars
    ids: list[int] = []
    texts: list[str] = []
    hashes: list[bytes] = []
    chars = 0
    for record_batch in source.iter_batches(batch_size=READ_BATCH):
        batch_ids = record_batch.column(0).to_numpy()
        batch_texts = record_batch.column(1).to_pylist()
        batch_hashes = record_batch.column(2).to_pylist()
        for index in np.flatnonzero(~contains(drops, batch_ids)):
            ids.append(int(batch_ids[index]))
            texts.append(batch_texts[index])
            hashes.append(batch_hashes[index])
            chars += len(batch_texts[index])
            if len(texts) >= limit_docs or chars >= limit_chars:
                yield np.asarray(ids, np.int64), texts, hash64(hashes)
                ids, texts, hashes, chars = [], [], [], 0
    if texts:
        yield np.asarray(ids, np.int64), texts, hash64(hashes)


def _write_band_entries(
    work: WorkDir,
    part: Part,
    minhasher: MinHasher,
    signatures: np.ndarray,
    ids: np.ndarray,
    buckets: int,
) -> None:
    keys = minhasher.band_keys(signatures) if len(signatures) else np.zeros((0, minhasher.bands))
    rows = np.zeros(keys.size, dtype=BAND_ROW)
    rows["key"] = keys.reshape(-1)
    rows["id"] = np.repeat(ids, minhasher.bands)
    bucket = (rows["key"] % np.uint64(buckets)).astype(np.int64)
    write_buckets(work.part_file("tokens", part, ".bands.npy"), rows, bucket, buckets)


def _cat(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


def load_tokens(
    work: WorkDir, part: Part | int, dtype: np.dtype
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A tokenised part: its arrays (ids, lengths, hash64) and its token ids (memory-mapped)."""
    with np.load(work.part_file("tokens", part, ".npz")) as arrays:
        meta = {key: arrays[key] for key in arrays.files}
    token_file = work.part_file("tokens", part, ".tokens")
    tokens = (
        np.memmap(token_file, dtype=dtype, mode="r")
        if token_file.stat().st_size
        else np.zeros(0, dtype=dtype)
    )
    return meta, tokens
