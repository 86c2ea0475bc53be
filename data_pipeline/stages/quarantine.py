"""Join the parts' quarantines into OUTPUT/quarantine.jsonl, streamed (one part in memory at a
time), with file-wide line numbers for records of a file read in spans, and an "empty file"
record for a file read in spans of which none held a record (as reading it whole reports)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..records import Malformed
from . import WorkDir

SpanKey = tuple[int, int]  # (part index, span index)


def write_quarantine(
    work_root: str,
    output: str,
    spans: list[tuple[int, int]],
    line_offsets: dict[SpanKey, int],
    empty_files: dict[SpanKey, str],
) -> int:
    """`spans`: (part index, number of spans) in corpus order. Returns the records written."""
    work = WorkDir(work_root)
    target = Path(output) / "quarantine.jsonl"
    tmp = target.with_name(f"{target.name}.tmp.{os.getpid()}")
    written = 0
    with open(tmp, "w", encoding="utf-8") as out:
        for part, count in spans:
            entries: list[list[dict]] = [[] for _ in range(count)]
            with open(work.part_file("clean", part, ".quarantine.jsonl"), encoding="utf-8") as f:
                for line in f:
                    entry = json.loads(line)
                    entries[entry.pop("span")].append(entry)
            for span, found in enumerate(entries):
                offset = line_offsets.get((part, span), 0)
                for entry in found:
                    location = entry["location"]
                    if offset and location.startswith("line "):
                        entry["location"] = f"line {int(location[5:]) + offset}"
                    out.write(json.dumps(entry, ensure_ascii=False) + "\n")
                    written += 1
                if (part, span) in empty_files:
                    empty = Malformed(empty_files[(part, span)], "file", "empty file")
                    out.write(json.dumps(quarantine_entry(empty), ensure_ascii=False) + "\n")
                    written += 1
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, target)
    return written


def quarantine_entry(record: Malformed) -> dict:
    """A quarantine record: where it was, why it is unusable, and the start of it."""
    return {
        "source": record.source,
        "location": record.location,
        "reason": record.reason,
        "preview": record.preview,
    }
