"""Read, normalise and filter one part; write the kept documents, their exact-dedup entries
(the map side of the exact-dedup shuffle), the quarantine and the counts."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import atomic
from ..config import DataConfig
from ..plan import Part
from ..ray_cluster import current_node
from ..readers import ReadStats, read_records
from ..records import Document, Malformed
from ..selection import hash_pairs
from ..shuffle import write_buckets
from ..steps.dedup import text_hash
from ..steps.normalize import normalize_text
from ..steps.quality import QualityFilter
from . import WorkDir
from .quarantine import quarantine_entry

CLEAN_SCHEMA = pa.schema([("id", pa.int64()), ("text", pa.string()), ("hash", pa.binary(16))])
EXACT_ROW = np.dtype([("h0", "<u8"), ("h1", "<u8"), ("id", "<i8")])
READ_BATCH = 512
EMPTY_RULE = "empty_after_normalize"


def clean_part(part: Part, data: DataConfig, work_root: str, exact_buckets: int) -> dict:
    """Read one part, normalise, filter; write the kept documents, their (hash, id) entries by
    exact-dedup bucket, the quarantine and the counts (returned)."""
    work = WorkDir(work_root)
    done = work.part_file("clean", part, ".json")
    if done.exists():
        return atomic.read_json(done)
    started = time.perf_counter()
    quality = QualityFilter(data.filters)
    counts = {"part": part.index, "in": 0, "malformed": 0, "kept": 0, "kept_bytes": 0}
    filtered: Counter[str] = Counter()
    quarantine: list[str] = []
    spans: list[dict[str, int]] = []
    ids: list[np.ndarray] = []
    hashes: list[bytes] = []
    changed = 0
    out = work.part_file("clean", part, ".parquet")
    tmp = out.with_name(out.name + f".tmp.{os.getpid()}")
    with pq.ParquetWriter(tmp, CLEAN_SCHEMA, compression="none") as writer:  # read once
        batch: list[tuple[int, Document]] = []
        for record_index, (span_index, record) in enumerate(_records(part, data, spans)):
            counts["in"] += 1
            if isinstance(record, Malformed):
                counts["malformed"] += 1
                quarantine.append(quarantine_line(record, span_index))
                continue
            batch.append((part.doc_id(record_index), record))
            if len(batch) == READ_BATCH:
                changed += _clean_batch(batch, data, quality, writer, counts, filtered, ids, hashes)
                batch = []
        if batch:
            changed += _clean_batch(batch, data, quality, writer, counts, filtered, ids, hashes)
    os.replace(tmp, out)
    if data.dedup.exact.enabled:
        _write_exact_entries(work, part, ids, hashes, exact_buckets)
    atomic.write_text(
        work.part_file("clean", part, ".quarantine.jsonl"),
        "".join(line + "\n" for line in quarantine),
    )
    counts["filtered"] = dict(sorted(filtered.items()))
    counts["normalized_changed"] = changed
    counts["spans"] = spans
    counts["seconds"] = round(time.perf_counter() - started, 3)
    counts["node"] = current_node()
    atomic.write_json(done, counts)
    return counts


def _records(
    part: Part, data: DataConfig, spans: list[dict[str, int]]
) -> Iterator[tuple[int, Document | Malformed]]:
    """(span index, record) of every piece of the part in order, at most `part.limit` records;
    appends each piece's line and record counts to `spans` once it is read."""
    spec = data.inputs[part.input_index]
    remaining = part.limit
    for index, piece in enumerate(part.pieces):
        stats = ReadStats()
        for record in read_records(piece.file, spec, piece.as_span(), stats):
            if remaining == 0:
                break
            if remaining is not None:
                remaining -= 1
            yield index, record
        spans.append({"lines": stats.lines, "records": stats.records})
        if remaining == 0:
            return


def _clean_batch(
    batch: list[tuple[int, Document]],
    data: DataConfig,
    quality: QualityFilter,
    writer: pq.ParquetWriter,
    counts: dict,
    filtered: Counter[str],
    kept_ids: list[np.ndarray],
    kept_hashes: list[bytes],
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
    counts["kept_bytes"] += sum(len(t.encode("utf-8", "surrogatepass")) for t in kept_texts)
    if keep:
        hashes = [text_hash(t) for t in kept_texts]
        batch_ids = np.asarray([ids[i] for i in keep], np.int64)
        writer.write_table(
            pa.table(
                {
                    "id": pa.array(batch_ids, pa.int64()),
                    "text": pa.array(kept_texts, pa.string()),
                    "hash": pa.array(hashes, pa.binary(16)),
                },
                schema=CLEAN_SCHEMA,
            )
        )
        kept_ids.append(batch_ids)
        kept_hashes.extend(hashes)
    return changed


def _write_exact_entries(
    work: WorkDir, part: Part, ids: list[np.ndarray], hashes: list[bytes], buckets: int
) -> None:
    pairs = hash_pairs(hashes)
    rows = np.zeros(len(pairs), dtype=EXACT_ROW)
    rows["h0"], rows["h1"] = pairs[:, 0], pairs[:, 1]
    rows["id"] = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    bucket = (rows["h0"] % np.uint64(buckets)).astype(np.int64)
    write_buckets(work.part_file("clean", part, ".exact.npy"), rows, bucket, buckets)


def quarantine_line(record: Malformed, span: int) -> str:
    """A quarantine entry as written per part: `span` names the piece it came from, so that its
    line number can be made file-wide when the parts' quarantines are joined."""
    return json.dumps({"span": span, **quarantine_entry(record)}, ensure_ascii=False)


def read_clean(work: WorkDir, part: Part | int, columns: list[str]) -> pa.Table:
    return pq.read_table(work.part_file("clean", part, ".parquet"), columns=columns)


def clean_parquet(work: WorkDir, part: Part | int) -> Path:
    return work.part_file("clean", part, ".parquet")
