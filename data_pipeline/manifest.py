"""manifest.json: what `kiln data prepare` made, from what, and how every document was counted.

`counts` reconciles exactly: in = kept + sum(filtered) + exact_duplicates + near_duplicates +
malformed, in documents (a malformed record counts as one document read).
"""

from __future__ import annotations

from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .plan import Part

MANIFEST = "manifest.json"
WEIGHT_RULE = "input_weight"  # documents an input weight below 1 left out
FORMAT_VERSION = 1


class CountMismatch(AssertionError):
    """The counts do not add up: a bug, never a user error."""


def build_manifest(
    *,
    config: dict[str, Any],
    fingerprint: str,
    parts: list[Part],
    clean: list[dict],
    exact_removed: int,
    tokenized: list[dict],
    near: dict[str, Any],
    weights: dict[str, int],
    shards: list[dict],
    tokenizer: dict[str, Any],
    timings: dict[str, float],
) -> dict[str, Any]:
    filtered: Counter[str] = Counter()
    for part in clean:
        filtered.update(part["filtered"])
    if weights.get("filtered"):
        filtered[WEIGHT_RULE] += weights["filtered"]
    read = sum(c["in"] for c in clean)
    malformed = sum(c["malformed"] for c in clean)
    after_filters = sum(c["kept"] for c in clean)
    tokenized_documents = sum(t["documents"] for t in tokenized)
    near_removed = len(near["drop"])
    counts = {
        "in": read,
        "kept": weights.get("kept", 0),
        "filtered": dict(sorted(filtered.items())),
        "exact_duplicates": exact_removed,
        "near_duplicates": near_removed,
        "malformed": malformed,
    }
    steps = [
        {"step": "read", "documents": read, "malformed": malformed},
        {"step": "normalize", "changed": sum(c["normalized_changed"] for c in clean)},
        {
            "step": "filter",
            "in": read - malformed,
            "kept": after_filters,
            "filtered": counts["filtered"],
        },
        {"step": "exact_dedup", "in": after_filters, "removed": exact_removed},
        {
            "step": "tokenize",
            "documents": tokenized_documents,
            "tokens": sum(t["tokens"] for t in tokenized),
        },
        {
            "step": "near_dedup",
            "in": tokenized_documents,
            "candidate_pairs": near["candidate_pairs"],
            "similar_pairs": near["similar_pairs"],
            "removed": near_removed,
        },
        {
            "step": "weights",
            "removed": weights.get("filtered", 0),
            "extra_copies": weights.get("extra_copies", 0),
        },
        {
            "step": "shards",
            **{
                split: {
                    "shards": sum(1 for s in shards if s["split"] == split),
                    "documents": sum(s["documents"] for s in shards if s["split"] == split),
                    "tokens": sum(s["tokens"] for s in shards if s["split"] == split),
                }
                for split in ("train", "valid")
            },
        },
    ]
    return {
        "format_version": FORMAT_VERSION,
        "kiln_version": _kiln_version(),
        "fingerprint": fingerprint,
        "counts": counts,
        "tokenizer": tokenizer,
        "shards": shards,
        "steps": steps,
        "inputs": _inputs(config, parts, clean),
        "timings_s": timings,
        "config": config,
    }


def _inputs(config: dict[str, Any], parts: list[Part], clean: list[dict]) -> list[dict]:
    specs = config.get("data", {}).get("inputs", [])
    rows = []
    for index, spec in enumerate(specs):
        mine = [c for p, c in zip(parts, clean, strict=True) if p.input_index == index]
        rows.append(
            {
                "path": spec["path"],
                "files": sum(len(p.files) for p in parts if p.input_index == index),
                "documents": sum(c["in"] for c in mine),
                "kept_after_filters": sum(c["kept"] for c in mine),
            }
        )
    return rows


def reconcile(counts: dict[str, Any]) -> None:
    accounted = (
        counts["kept"]
        + sum(counts["filtered"].values())
        + counts["exact_duplicates"]
        + counts["near_duplicates"]
        + counts["malformed"]
    )
    if accounted != counts["in"]:
        raise CountMismatch(f"documents in {counts['in']} != accounted {accounted}: {counts}")


def _kiln_version() -> str:
    try:
        return version("kiln")
    except PackageNotFoundError:
        return "unknown"
