"""The removed-document sample: for each filter rule and each dedup kind, the `removed_sample`
removed documents of smallest sample key (a hash of the text; ties in corpus order), written to
OUTPUT/removed/KIND.jsonl, a duplicate with the document it repeats.

Each part proposes its own best candidates (at most `removed_sample` per kind, from the clean and
tokenise stages); `merge_candidates` tasks keep the best of groups of candidate files, level by
level (a tree, so that no task reads more than `FAN_IN` files); `write_removed` writes the last
level's winners, fetching the text each duplicate repeats from the part that kept it.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import atomic
from ..plan import PART_SHIFT
from . import WorkDir
from .clean import REMOVED_SCHEMA, read_clean

FAN_IN = 64
CANDIDATE_SCHEMA = REMOVED_SCHEMA.append(pa.field("kept_id", pa.int64()))
REMOVED_DIR = "removed"


def part_candidates(work: WorkDir, part: int) -> list[Path]:
    return [
        work.part_file("clean", part, ".removed.parquet"),
        work.part_file("tokens", part, ".removed.parquet"),
    ]


def merge_candidates(inputs: list[str], output: str, limit: int) -> dict:
    """The best `limit` rows of each kind among the candidate files `inputs`."""
    done = Path(output + ".json")
    if done.exists():
        return atomic.read_json(done)
    tables = [_read(Path(path)) for path in inputs]
    best = _best(pa.concat_tables(tables) if tables else CANDIDATE_SCHEMA.empty_table(), limit)
    atomic.write_parquet(Path(output), best)
    result = {"rows": best.num_rows}
    atomic.write_json(done, result)
    return result


def _read(path: Path) -> pa.Table:
    table = pq.read_table(path)
    if "kept_id" not in table.column_names:
        table = table.append_column("kept_id", pa.nulls(table.num_rows, pa.int64()))
    return table.select(CANDIDATE_SCHEMA.names).cast(CANDIDATE_SCHEMA)


def _best(table: pa.Table, limit: int) -> pa.Table:
    ordered = table.sort_by([("kind", "ascending"), ("key", "ascending"), ("id", "ascending")])
    kinds = ordered.column("kind").to_pylist()
    keep, seen = [], defaultdict(int)
    for index, kind in enumerate(kinds):
        if seen[kind] < limit:
            keep.append(index)
            seen[kind] += 1
    return ordered.take(pa.array(keep, pa.int64()))


def write_removed(
    work_root: str,
    output: str,
    winners: str,
    line_offsets: dict[tuple[int, int], int],
) -> dict:
    """OUTPUT/removed/KIND.jsonl from the final winners, locations made file-wide, each
    duplicate with the document it repeats; returns the rows written per kind."""
    work = WorkDir(work_root)
    table = pq.read_table(winners)
    folder = Path(output) / REMOVED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    kept_texts = _kept_documents(work, table, line_offsets)
    written: dict[str, int] = {}
    rows_by_kind: dict[str, list[dict]] = defaultdict(list)
    for row in table.to_pylist():
        entry = {
            "source": row["source"],
            "location": _file_wide(row, line_offsets),
            "text": row["text"],
        }
        if row["kept_id"] is not None:
            entry["repeats"] = kept_texts[row["kept_id"]]
        rows_by_kind[row["kind"]].append(entry)
    for kind, rows in sorted(rows_by_kind.items()):
        atomic.write_text(
            folder / f"{kind}.jsonl",
            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
        )
        written[kind] = len(rows)
    for stale in folder.glob("*.jsonl"):  # from an earlier, interrupted run of this job
        if stale.stem not in written:
            os.remove(stale)
    return written


def _kept_documents(
    work: WorkDir, table: pa.Table, line_offsets: dict[tuple[int, int], int]
) -> dict[int, dict]:
    """Source, location and text of each document a duplicate of the sample repeats."""
    wanted = sorted({k for k in table.column("kept_id").to_pylist() if k is not None})
    found: dict[int, dict] = {}
    by_part: dict[int, list[int]] = defaultdict(list)
    for doc_id in wanted:
        by_part[doc_id >> PART_SHIFT].append(doc_id)
    for part, ids in by_part.items():
        clean = read_clean(work, part, ["id", "text", "source", "location", "span"])
        rows = clean.filter(pc.is_in(clean.column("id"), pa.array(ids, pa.int64())))
        for row in rows.to_pylist():
            found[row["id"]] = {
                "source": row["source"],
                "location": _file_wide(row, line_offsets),
                "text": row["text"],
            }
    return found


def _file_wide(row: dict, line_offsets: dict[tuple[int, int], int]) -> str:
    """The row's location with its span's line offset added (spans of split files)."""
    location = row["location"]
    offset = line_offsets.get((row["id"] >> PART_SHIFT, row["span"]), 0)
    if offset and location.startswith("line "):
        return f"line {int(location[5:]) + offset}"
    return location
