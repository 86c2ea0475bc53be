"""Turn the configured inputs into parts (units of work), and fingerprint the whole job.

A part is one input file, or, for an input with a document `limit`, all of that input's files
read in order until the limit. Part `i`'s documents get the ids `i * 2**32 + record index`, so
sorting by id is corpus order, on every machine and in every run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import fsspec

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
        else:
            first = len(parts)
            parts.extend(Part(first + i, input_index, (f,)) for i, f in enumerate(files))
    return parts


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
