"""The work of each pipeline stage on one part or one partition; the runner runs these in Ray.

Every function writes its results under the work directory with atomic renames and a small
JSON of counts last, so a stage whose JSON exists is complete and is not redone on resume.

    clean/part_N.parquet    id, text, hash of the documents kept after normalise + filters
    clean/part_N.json       counts: in, malformed, filtered by rule, kept
    clean/part_N.quarantine.jsonl
    exact/drop_P.npy        ids of exact duplicates found in hash partition P
    tokens/part_N.tokens    the token ids (EOS after each document), shard dtype, raw
    tokens/part_N.npz       ids, lengths, hash64 of the tokenised documents
    tokens/part_N.bands.npy LSH band keys (near dedup), one row per document
    tokens/part_N.sigs.npy  MinHash signatures, one row per document
    tokens/part_N.json      counts
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import atomic
from .config import DataConfig
from .plan import PART_SHIFT, Part, load_plan
from .readers import read_records
from .records import Document, Malformed, Record
from .steps.dedup import MinHasher, candidate_pairs, text_hash
from .steps.normalize import normalize_text
from .steps.quality import QualityFilter
from .tokenizer import DocumentEncoder, load_tokenizer

CLEAN_SCHEMA = pa.schema([("id", pa.int64()), ("text", pa.string()), ("hash", pa.binary(16))])
READ_BATCH = 512
EMPTY_RULE = "empty_after_normalize"


def clean_path(work: Path, part: Part, suffix: str) -> Path:
    return work / "clean" / f"{part.name}{suffix}"


def tokens_path(work: Path, part: Part, suffix: str) -> Path:
    return work / "tokens" / f"{part.name}{suffix}"


def hash64(hashes: list[bytes]) -> np.ndarray:
    """The first 8 bytes of each 16-byte text hash as uint64 (uniform; used to split and sample)."""
    return hash_pairs(hashes)[:, 0].copy()


# ---------------------------------------------------------------- read, normalise, filter


def part_records(part: Part, data: DataConfig) -> Iterator[Record]:
    spec = data.inputs[part.input_index]
    records = (record for file in part.files for record in read_records(file, spec))
    return islice(records, part.limit) if part.limit is not None else records


def clean_part(part: Part, data: DataConfig, work: Path) -> dict:
    """Read one part, normalise, filter; write the kept documents, quarantine and counts."""
    done = clean_path(work, part, ".json")
    if done.exists():
        return atomic.read_json(done)
    started = time.perf_counter()
    quality = QualityFilter(data.filters)
    counts = {"part": part.index, "in": 0, "malformed": 0, "kept": 0, "kept_bytes": 0}
    filtered: Counter[str] = Counter()
    changed = 0
    quarantine: list[str] = []
    out = clean_path(work, part, ".parquet")
    tmp = out.with_name(out.name + f".tmp.{os.getpid()}")
    with pq.ParquetWriter(tmp, CLEAN_SCHEMA, compression="none") as writer:  # read once
        batch: list[tuple[int, Document]] = []
        for record_index, record in enumerate(part_records(part, data)):
            counts["in"] += 1
            if isinstance(record, Malformed):
                counts["malformed"] += 1
                quarantine.append(quarantine_line(record))
                continue
            batch.append((part.doc_id(record_index), record))
            if len(batch) == READ_BATCH:
                changed += _clean_batch(batch, data, quality, writer, counts, filtered)
                batch = []
        if batch:
            changed += _clean_batch(batch, data, quality, writer, counts, filtered)
    os.replace(tmp, out)
    atomic.write_text(
        clean_path(work, part, ".quarantine.jsonl"), "".join(line + "\n" for line in quarantine)
    )
    counts["filtered"] = dict(sorted(filtered.items()))
    counts["normalized_changed"] = changed
    counts["seconds"] = round(time.perf_counter() - started, 3)
    atomic.write_json(done, counts)
    return counts


def _clean_batch(
    batch: list[tuple[int, Document]],
    data: DataConfig,
    quality: QualityFilter,
    writer: pq.ParquetWriter,
    counts: dict,
    filtered: Counter[str],
) -> int:
    ids, texts, changed = [], [], 0
    for doc_id, document in batch:
        text = normalize_text(document.text, data.normalize)
        changed += text != document.text
        if not text.strip():
            filtered[EMPTY_RULE] += 1
            continue
        ids.append(doc_id)
        texts.append(text)
    failures = quality.check_batch(texts)
    keep = [i for i, failure in enumerate(failures) if failure is None]
    for failure in failures:
        if failure is not None:
            filtered[failure] += 1
    kept_texts = [texts[i] for i in keep]
    counts["kept"] += len(keep)
    counts["kept_bytes"] += sum(len(t.encode("utf-8")) for t in kept_texts)
    if keep:
        table = pa.table(
            {
                "id": pa.array([ids[i] for i in keep], pa.int64()),
                "text": pa.array(kept_texts, pa.string()),
                "hash": pa.array([text_hash(t) for t in kept_texts], pa.binary(16)),
            },
            schema=CLEAN_SCHEMA,
        )
        writer.write_table(table)
    return changed


def quarantine_line(record: Malformed) -> str:
    return json.dumps(
        {
            "source": record.source,
            "location": record.location,
            "reason": record.reason,
            "preview": record.preview,
        },
        ensure_ascii=False,
    )


def read_clean(work: Path, part: Part, columns: list[str]) -> pa.Table:
    return pq.read_table(clean_path(work, part, ".parquet"), columns=columns)


# ---------------------------------------------------------------- exact deduplication


def exact_duplicates(parts: list[Part], work: Path, partition: int, partitions: int) -> np.ndarray:
    """Ids of the documents whose text hash an earlier document (smaller id) has, among the
    hashes that fall in `partition` of `partitions` (by the hash's first 8 bytes)."""
    out = work / "exact" / f"drop_{partition:04d}.npy"
    if out.exists():
        return np.load(out)
    ids_parts, hashes_parts = [], []
    for part in parts:
        table = read_clean(work, part, ["id", "hash"])
        hashes = hash_pairs(table.column("hash").to_pylist())
        mask = hashes[:, 0] % np.uint64(partitions) == np.uint64(partition)
        ids_parts.append(table.column("id").to_numpy()[mask])
        hashes_parts.append(hashes[mask])
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
    hashes = np.concatenate(hashes_parts) if hashes_parts else np.zeros((0, 2), np.uint64)
    order = np.lexsort((ids, hashes[:, 1], hashes[:, 0]))
    hashes, ids = hashes[order], ids[order]
    repeat = np.zeros(len(ids), dtype=bool)
    if len(ids) > 1:
        repeat[1:] = np.all(hashes[1:] == hashes[:-1], axis=1)
    drop = np.sort(ids[repeat])
    atomic.write_npy(out, drop)
    return drop


def hash_pairs(hashes: list[bytes]) -> np.ndarray:
    """16-byte hashes as (n, 2) uint64."""
    if not hashes:
        return np.zeros((0, 2), dtype=np.uint64)
    return np.frombuffer(b"".join(hashes), dtype="<u8").reshape(-1, 2).copy()


# ---------------------------------------------------------------- tokenisation (+ MinHash)


class PartTokenizer:
    """Tokenise parts: a Ray Data actor, so the tokenizer is loaded once per worker."""

    def __init__(self, work: str, threads: int | None = None) -> None:
        if threads is not None:  # the Rust thread pool reads it when first used
            os.environ["RAYON_NUM_THREADS"] = str(threads)
        self.work = Path(work)
        self.data, tokenizer, self.parts = load_plan(self.work)
        self.encoder = DocumentEncoder(
            load_tokenizer(self.work.parent / "tokenizer.json", tokenizer.eos_token),
            tokenizer.eos_token,
            self.data.tokenize.max_piece_chars,
        )
        near = self.data.dedup.near
        self.minhasher = MinHasher(near) if near.enabled else None
        exact_drop_file = self.work / "exact" / "drop.npy"
        self.exact_drop = (
            np.load(exact_drop_file) if exact_drop_file.exists() else np.zeros(0, np.int64)
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        results = [self.tokenize(self.parts[int(i)]) for i in batch["part"]]
        return {key: [r[key] for r in results] for key in ("part", "documents", "tokens")}

    def tokenize(self, part: Part) -> dict:
        done = tokens_path(self.work, part, ".json")
        if done.exists():
            return atomic.read_json(done)
        started = time.perf_counter()
        token_file = tokens_path(self.work, part, ".tokens")
        tmp = token_file.with_name(token_file.name + f".tmp.{os.getpid()}")
        ids, lengths, hashes, bands, signatures = [], [], [], [], []
        with open(tmp, "wb") as out:
            for batch_ids, texts, batch_hashes in self._batches(part):
                encoded = self.encoder.encode(texts)
                for array in encoded:
                    out.write(array.tobytes())
                ids.append(batch_ids)
                lengths.append(np.fromiter((len(a) for a in encoded), np.int64, len(encoded)))
                hashes.append(batch_hashes)
                if self.minhasher is not None:
                    sig = self.minhasher.signatures([a[:-1] for a in encoded])  # without EOS
                    signatures.append(sig)
                    bands.append(self.minhasher.band_keys(sig))
        os.replace(tmp, token_file)
        if self.minhasher is not None:
            atomic.write_npy(tokens_path(self.work, part, ".sigs.npy"), _stack(signatures))
            atomic.write_npy(tokens_path(self.work, part, ".bands.npy"), _stack(bands))
        all_lengths = _cat(lengths, np.int64)
        atomic.write_arrays(
            tokens_path(self.work, part, ".npz"),
            ids=_cat(ids, np.int64),
            lengths=all_lengths,
            hash64=_cat(hashes, np.uint64),
        )
        stats = {
            "part": part.index,
            "documents": int(len(all_lengths)),
            "tokens": int(all_lengths.sum()),
            "seconds": round(time.perf_counter() - started, 3),
        }
        atomic.write_json(done, stats)
        return stats

    def _batches(self, part: Part) -> Iterator[tuple[np.ndarray, list[str], np.ndarray]]:
        """Kept, not exactly duplicated documents in bounded batches (documents and chars)."""
        source = pq.ParquetFile(clean_path(self.work, part, ".parquet"))
        limit_docs = self.data.tokenize.batch_documents
        limit_chars = 64 * self.data.tokenize.max_piece_chars
        ids: list[int] = []
        texts: list[str] = []
        hashes: list[bytes] = []
        chars = 0
        for record_batch in source.iter_batches(batch_size=READ_BATCH):
            batch_ids = record_batch.column(0).to_numpy()
            keep = ~np.isin(batch_ids, self.exact_drop)
            batch_texts = record_batch.column(1).to_pylist()
            batch_hashes = record_batch.column(2).to_pylist()
            for index in np.flatnonzero(keep):
                ids.append(int(batch_ids[index]))
                texts.append(batch_texts[index])
                hashes.append(batch_hashes[index])
                chars += len(batch_texts[index])
                if len(texts) >= limit_docs or chars >= limit_chars:
                    yield np.asarray(ids, np.int64), texts, hash64(hashes)
                    ids, texts, hashes, chars = [], [], [], 0
        if texts:
            yield np.asarray(ids, np.int64), texts, hash64(hashes)


def _cat(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays, axis=0) if arrays else np.zeros((0, 0), dtype=np.uint64)


def load_tokens(
    work: Path, part: Part, dtype: np.dtype
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A tokenised part: its arrays (ids, lengths, hash64) and its token ids (memory-mapped)."""
    with np.load(tokens_path(work, part, ".npz")) as arrays:
        meta = {key: arrays[key] for key in arrays.files}
    token_file = tokens_path(work, part, ".tokens")
    tokens = (
        np.memmap(token_file, dtype=dtype, mode="r")
        if token_file.stat().st_size
        else np.zeros(0, dtype=dtype)
    )
    return meta, tokens


# ---------------------------------------------------------------- near deduplication


def near_candidates(parts: list[Part], work: Path, partition: int, partitions: int) -> np.ndarray:
    """Candidate pairs among the band keys that fall in `partition` (key % partitions)."""
    keys_parts, ids_parts = [], []
    for part in parts:
        bands_file = tokens_path(work, part, ".bands.npy")
        bands = np.load(bands_file, mmap_mode="r")
        if bands.size == 0:
            continue
        with np.load(tokens_path(work, part, ".npz")) as arrays:
            ids = arrays["ids"]
        keys = np.asarray(bands).reshape(-1)
        owners = np.repeat(ids, bands.shape[1])
        mask = keys % np.uint64(partitions) == np.uint64(partition)
        keys_parts.append(keys[mask])
        ids_parts.append(owners[mask])
    if not keys_parts:
        return np.zeros((0, 2), dtype=np.int64)
    return candidate_pairs(np.concatenate(keys_parts), np.concatenate(ids_parts))


def signatures_of(parts: list[Part], work: Path, doc_ids: np.ndarray) -> np.ndarray:
    """MinHash signatures of `doc_ids` (sorted, unique), gathered from their parts."""
    rows = []
    by_part = {p.index: p for p in parts}
    owners = doc_ids >> PART_SHIFT
    for part_index in np.unique(owners):
        part = by_part[int(part_index)]
        wanted = doc_ids[owners == part_index]
        with np.load(tokens_path(work, part, ".npz")) as arrays:
            ids = arrays["ids"]
        sigs = np.load(tokens_path(work, part, ".sigs.npy"), mmap_mode="r")
        rows.append(np.asarray(sigs[np.searchsorted(ids, wanted)]))
    return np.concatenate(rows, axis=0) if rows else np.zeros((0, 0), dtype=np.uint64)
