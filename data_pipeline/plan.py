"""Turn the configured inputs into parts (units of work), and fingerprint the whole job.

A part is a run of consecutive files of one input totalling about `data.part_size_mb` (a larger
file is a part alone), or, for an input with a document `limit`, all of that input's files read
in order until the limit. Part `i`'s documents get the ids `i * 2**32 + record index`, so sorting
by id is corpus order, on every machine and in every run; what the pipeline writes does not
depend on where the part boundaries fall.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import fsspec

from . import atomic
from .config import DataConfig, TokenizerConfig
from .readers import InputError, expand_input, infer_format

PART_SHIFT = 32


@dataclass(frozen=True)
class Part:
    index: int
    input_index: int
    files: tuple[str, ...]
    limit: int | None = None

    @property
    def name(self) -> str:
        return f"part_{self.index:06d}"

    def doc_id(self, record: int) -> int:
        return (self.index << PART_SHIFT) | record


def part_of(doc_id: int) -> int:
    return doc_id >> PART_SHIFT


def plan_parts(data: DataConfig) -> list[Part]:
    """Expand every input into files (raising InputError, one line, for a bad path)."""
    if not data.inputs:
        raise InputError("data.inputs: no input given (set data.inputs or pass --input PATH)")
    parts: list[Part] = []
    for input_index, spec in enumerate(data.inputs):
        files = expand_input(spec.path)
        if spec.format == "auto":
            for file in files:
                infer_format(file)
        if spec.limit is not None:
            parts.append(Part(len(parts), input_index, tuple(files), spec.limit))
            continue
        for group in group_files(files, int(data.part_size_mb * 1e6)):
            parts.append(Part(len(parts), input_index, group))
    return parts


def group_files(files: list[str], target_bytes: int) -> list[tuple[str, ...]]:
    """Consecutive files in groups of about `target_bytes` (unknown sizes count as large)."""
    groups: list[tuple[str, ...]] = []
    current: list[str] = []
    size = 0
    for file in files:
        file_size = _size(file)
        file_size = target_bytes if file_size is None else file_size
        if current and size + file_size > target_bytes:
            groups.append(tuple(current))
            current, size = [], 0
        current.append(file)
        size += file_size
    if current:
        groups.append(tuple(current))
    return groups


def fingerprint(data: DataConfig, tokenizer: TokenizerConfig, parts: list[Part]) -> str:
    """Changes whenever the configuration, the files or their sizes change."""
    sizes = [[_size(f) for f in part.files] for part in parts]
    payload = {
        "data": data.model_dump(mode="json", exclude={"path", "blend"}),
        "tokenizer": tokenizer.model_dump(mode="json"),
        "parts": [asdict(p) for p in parts],
        "sizes": sizes,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _size(file: str) -> int | None:
    try:
        fs, path = fsspec.core.url_to_fs(file)
        return int(fs.size(path))
    except (OSError, ValueError):
        return None


PLAN_FILE = "plan.json"


def save_plan(work: Path, data: DataConfig, tokenizer: TokenizerConfig, parts: list[Part]) -> None:
    """The job as workers read it: small task arguments, one file on the shared disk."""
    atomic.write_json(
        work / PLAN_FILE,
        {
            "data": data.model_dump(mode="json"),
            "tokenizer": tokenizer.model_dump(mode="json"),
            "parts": [asdict(p) for p in parts],
        },
    )


def load_plan(work: Path) -> tuple[DataConfig, TokenizerConfig, list[Part]]:
    plan = atomic.read_json(work / PLAN_FILE)
    parts = [
        Part(p["index"], p["input_index"], tuple(p["files"]), p["limit"]) for p in plan["parts"]
    ]
    return (
        DataConfig.model_validate(plan["data"], strict=False),
        TokenizerConfig.model_validate(plan["tokenizer"], strict=False),
        parts,
    )
