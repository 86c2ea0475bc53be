"""Read one part and run the cleaning steps over it; write the kept documents and the map side
of both dedup shuffles: (hash, id) by exact-dedup bucket, and the MinHash signatures and LSH
band entries (key, id, text hash) by near-dedup bucket, from the documents' normalised words."""

from __future__ import annotations

import heapq
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import atomic
from ..config import DataConfig
from ..plan import Part
from ..ray_cluster import current_node
from ..readers import ReadStats, read_records
from ..records import Document, Malformed
from ..selection import hash_pairs, sample_key
from ..shuffle import write_buckets
from ..text.dedup import MinHasher, text_hash
from ..text.normalize import EMPTY_RULE, Normalize
from ..text.quality import QualityFilter
from . import WorkDir
from .quarantine import quarantine_entry

CLEAN_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("text", pa.string()),
        ("hash", pa.binary(16)),
        ("source", pa.dictionary(pa.int32(), pa.string())),
        ("location", pa.string()),
        ("span", pa.int32()),
    ]
)
EXACT_ROW = np.dtype([("h0", "<u8"), ("h1", "<u8"), ("id", "<i8")])
BAND_ROW = np.dtype([("key", "<u8"), ("id", "<i8"), ("text", "<u8")])
REMOVED_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("key", pa.uint64()),
        ("id", pa.int64()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("location", pa.string()),
        ("span", pa.int32()),
    ]
)
READ_BATCH = 512


def clean_part(
    part: Part, data: DataConfig, work_root: str, exact_buckets: int, near_buckets: int
) -> dict:
    """Read one part, run the cleaning steps, write what the later stages read; return the
    counts (every step's own, the spans read, the kept documents and bytes)."""
    work = WorkDir(work_root)
    done = work.part_file("clean", part, ".json")
    if done.exists():
        return atomic.read_json(done)
    started = time.perf_counter()
    cleaner = PartCleaner(part, data)
    out = work.part_file("clean", part, ".parquet")
    tmp = out.with_name(out.name + f".tmp.{os.getpid()}")
    with pq.ParquetWriter(tmp, CLEAN_SCHEMA, compression="none") as writer:  # read once
        for table in cleaner.kept_tables():
            writer.write_table(table)
    os.replace(tmp, out)
    if data.dedup.exact.enabled:
        cleaner.write_exact_entries(work, exact_buckets)
    if cleaner.minhasher is not None:
        cleaner.write_near_entries(work, near_buckets)
    cleaner.write_removed_sample(work)
    atomic.write_text(
        work.part_file("clean", part, ".quarantine.jsonl"),
        "".join(line + "\n" for line in cleaner.quarantine),
    )
    counts = cleaner.counts() | {
        "seconds": round(time.perf_counter() - started, 3),
        "node": current_node(),
    }
    atomic.write_json(done, counts)
    return counts


class PartCleaner:
    """The cleaning of one part: records read in batches through normalisation and the filter
    steps; what is kept, and what the dedup stages and the removed sample need of it."""

    def __init__(self, part: Part, data: DataConfig) -> None:
        self.part, self.data = part, data
        self.normalize = Normalize(data.normalize)
        self.quality = QualityFilter(data.filters)
        near = data.dedup.near
        self.minhasher = MinHasher(near) if near.enabled else None
        self.read = self.malformed = self.kept = self.kept_bytes = 0
        self.spans: list[dict[str, int]] = []
        self.quarantine: list[str] = []
        self.ids: list[np.ndarray] = []
        self.hashes: list[bytes] = []
        self.signatures: list[np.ndarray] = []
        # The removed sample: per rule, the `removed_sample` smallest sample keys (a heap of
        # negated keys, so the largest kept is on top).
        self.removed: dict[str, list[tuple[int, int, int, dict[str, Any]]]] = {}

    def kept_tables(self) -> Iterator[pa.Table]:
        batch: list[tuple[int, int, Document]] = []
        for record_index, (span, record) in enumerate(self._records()):
            self.read += 1
            if isinstance(record, Malformed):
                self.malformed += 1
                self.quarantine.append(_quarantine_line(record, span))
                continue
            batch.append((self.part.doc_id(record_index), span, record))
            if len(batch) == READ_BATCH:
                yield from self._clean(batch)
                batch = []
        if batch:
            yield from self._clean(batch)

    def _records(self) -> Iterator[tuple[int, Document | Malformed]]:
        """(span index, record) of every piece of the part in order, at most `part.limit`
        records; appends each piece's line and record counts to `spans` once it is read."""
        spec = self.data.inputs[self.part.input_index]
        remaining = self.part.limit
        for index, piece in enumerate(self.part.pieces):
            stats = ReadStats()
            for record in read_records(piece.file, spec, piece.as_span(), stats):
                if remaining == 0:
                    break
                if remaining is not None:
                    remaining -= 1
                yield index, record
            self.spans.append({"lines": stats.lines, "records": stats.records})
            if remaining == 0:
                return

    def _clean(self, batch: list[tuple[int, int, Document]]) -> Iterator[pa.Table]:
        normalized = self.normalize.apply([document.text for _, _, document in batch])
        entries = []
        for (doc_id, span, document), text in zip(batch, normalized, strict=True):
            if text is None:
                self._sample_removed(EMPTY_RULE, document.text, doc_id, document, span)
            else:
                entries.append((doc_id, span, document, text))
        texts = [text for *_, text in entries]
        offset = 0
        for chunk in self.quality.filtered(texts):
            for index, rule in enumerate(chunk.removed_by):
                if rule is not None:
                    doc_id, span, document, text = entries[offset + index]
                    self._sample_removed(rule, text, doc_id, document, span)
            kept = [entries[offset + i] for i in chunk.alive.tolist()]
            if kept and self.minhasher is not None:
                words = chunk.measures.dedup_words(chunk.alive)
                self.signatures.append(self.minhasher.signatures(words))
            offset += len(chunk.texts)
            if kept:
                yield self._table(kept)

    def _table(self, kept: list[tuple[int, int, Document, str]]) -> pa.Table:
        texts = [text for *_, text in kept]
        hashes = [text_hash(text) for text in texts]
        ids = np.fromiter((doc_id for doc_id, *_ in kept), np.int64, len(kept))
        self.ids.append(ids)
        self.hashes.extend(hashes)
        self.kept += len(kept)
        self.kept_bytes += sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        return pa.table(
            {
                "id": pa.array(ids, pa.int64()),
                "text": pa.array(texts, pa.string()),
                "hash": pa.array(hashes, pa.binary(16)),
                "source": _dictionary([d.source for _, _, d, _ in kept]),
                "location": pa.array([d.location for _, _, d, _ in kept], pa.string()),
                "span": pa.array([span for _, span, _, _ in kept], pa.int32()),
            },
            schema=CLEAN_SCHEMA,
        )

    def _sample_removed(
        self, rule: str, text: str, doc_id: int, document: Document, span: int
    ) -> None:
        """Keep the document if its key is among the rule's `removed_sample` smallest."""
        limit = self.data.removed_sample
        if not limit:
            return
        key = int(sample_key(hash_pairs([text_hash(text)]))[0])
        heap = self.removed.setdefault(rule, [])
        row = {"text": text, "source": document.source, "location": document.location}
        # Negated, so the heap's top is the worst kept: the largest key, then the latest id
        # (ids follow corpus order whatever the parts, so ties are broken the same way).
        item = (-key, -doc_id, span, row)
        if len(heap) < limit:
            heapq.heappush(heap, item)
        elif (key, doc_id) < (-heap[0][0], -heap[0][1]):
            heapq.heapreplace(heap, item)

    def _all_ids(self) -> np.ndarray:
        return np.concatenate(self.ids) if self.ids else np.zeros(0, np.int64)

    def write_exact_entries(self, work: WorkDir, buckets: int) -> None:
        pairs = hash_pairs(self.hashes)
        rows = np.zeros(len(pairs), dtype=EXACT_ROW)
        rows["h0"], rows["h1"] = pairs[:, 0], pairs[:, 1]
        rows["id"] = self._all_ids()
        bucket = (rows["h0"] % np.uint64(buckets)).astype(np.int64)
        write_buckets(work.part_file("clean", self.part, ".exact.npy"), rows, bucket, buckets)

    def write_near_entries(self, work: WorkDir, buckets: int) -> None:
        """Signatures (a row per kept document) and the band entries, each carrying the text
        hash so that the band tasks set exact copies aside as exact dedup does."""
        assert self.minhasher is not None
        width = self.minhasher.num_perm
        sigs = np.concatenate(self.signatures) if self.signatures else np.zeros((0, width))
        sigs = sigs.astype(np.uint32)
        atomic.write_npy(work.part_file("clean", self.part, ".sigs.npy"), sigs)
        atomic.write_npy(work.part_file("clean", self.part, ".ids.npy"), self._all_ids())
        keys = self.minhasher.band_keys(sigs) if len(sigs) else np.zeros((0, self.minhasher.bands))
        bands = self.minhasher.bands
        rows = np.zeros(keys.size, dtype=BAND_ROW)
        rows["key"] = keys.reshape(-1)
        rows["id"] = np.repeat(self._all_ids(), bands)
        rows["text"] = np.repeat(hash_pairs(self.hashes)[:, 0], bands)
        bucket = (rows["key"] % np.uint64(buckets)).astype(np.int64)
        write_buckets(work.part_file("clean", self.part, ".bands.npy"), rows, bucket, buckets)

    def write_removed_sample(self, work: WorkDir) -> None:
        rows = [
            {"kind": rule, "key": -key, "id": -doc_id, "span": span, **row}
            for rule, heap in sorted(self.removed.items())
            for key, doc_id, span, row in sorted(heap, key=lambda item: (-item[0], -item[1]))
        ]
        table = pa.Table.from_pylist(rows, schema=REMOVED_SCHEMA)
        atomic.write_parquet(work.part_file("clean", self.part, ".removed.parquet"), table)

    def counts(self) -> dict[str, Any]:
        filtered: dict[str, int] = {}
        steps = [self.normalize.report(), *self.quality.reports()]
        for step in steps:
            for rule, count in step["removed"].items():
                filtered[rule] = filtered.get(rule, 0) + count
        return {
            "part": self.part.index,
            "in": self.read,
            "malformed": self.malformed,
            "kept": self.kept,
            "kept_bytes": self.kept_bytes,
            "filtered": dict(sorted(filtered.items())),
            "steps": steps,
            "spans": self.spans,
        }


def _dictionary(values: list[str]) -> pa.DictionaryArray:
    """A dictionary-encoded string column (a part's documents come from a few files)."""
    codes: dict[str, int] = {}
    indices = [codes.setdefault(value, len(codes)) for value in values]
    return pa.DictionaryArray.from_arrays(
        pa.array(indices, pa.int32()), pa.array(list(codes), pa.string())
    )


def _quarantine_line(record: Malformed, span: int) -> str:
    """A quarantine entry as written per part: `span` names the piece it came from, so that its
    line number can be made file-wide when the parts' quarantines are joined."""
    return json.dumps({"span": span, **quarantine_entry(record)}, ensure_ascii=False)


def read_clean(work: WorkDir, part: Part | int, columns: list[str]) -> pa.Table:
    return pq.read_table(work.part_file("clean", part, ".parquet"), columns=columns)


def clean_parquet(work: WorkDir, part: Part | int):
    return work.part_file("clean", part, ".parquet")
