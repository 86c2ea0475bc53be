"""manifest.json: what `kiln data prepare` made, from what, and how every document was counted.

`timings_s` and `execution` (Ray nodes and CPUs, each stage's throughput) describe the run, not
the data: they are the only parts that differ between two runs of the same job.

`counts` reconciles exactly: in = kept + sum(filtered) + exact_duplicates + near_duplicates +
malformed, in documents (a malformed record counts as one document read).
"""

from __future__ import annotations

from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .plan import Part, Plan

MANIFEST = "manifest.json"
WEIGHT_RULE = "input_weight"  # documents an input weight below 1 left out
FORMAT_VERSION = 1


class CountMismatch(AssertionError):
    """The counts do not add up: a bug, never a user error."""


def build_manifest(
    *,
    config: dict[str, Any],
    fingerprint: str,
    plan: Plan,
    clean: list[dict],
    exact_removed: int,
    tokenized: list[dict],
    near: dict[str, int],
    shards: list[dict],
    removed: dict[str, int],
    tokenizer: dict[str, Any],
    timings: dict[str, float],
    throughput: dict[str, dict[str, Any]],
    execution: dict[str, Any],
) -> dict[str, Any]:
    """The manifest from every stage's per-part (or per-bucket) counts."""
    read = sum(c["in"] for c in clean)
    malformed = sum(c["malformed"] for c in clean)
    after_filters = sum(c["kept"] for c in clean)
    near_removed = sum(t["near_removed"] for t in tokenized)
    weight_filtered = sum(t["weight_filtered"] for t in tokenized)
    if exact_removed != sum(t["exact_removed"] for t in tokenized):
        raise CountMismatch("the exact-dedup buckets and the parts disagree on what was dropped")
    cleaning = _cleaning_steps(clean)
    filtered: Counter[str] = Counter()
    for step in cleaning:
        filtered.update(step["removed"])
    if weight_filtered:
        filtered[WEIGHT_RULE] += weight_filtered
    counts = {
        "in": read,
        "kept": sum(t["documents"] for t in tokenized),
        "filtered": dict(sorted(filtered.items())),
        "exact_duplicates": exact_removed,
        "near_duplicates": near_removed,
        "malformed": malformed,
    }
    return {
        "format_version": FORMAT_VERSION,
        "kiln_version": _kiln_version(),
        "fingerprint": fingerprint,
        "counts": counts,
        "tokenizer": tokenizer,
        "shards": shards,
        "passes": _passes(tokenized),
        "steps": _step_records(counts, cleaning, after_filters, near, tokenized, shards),
        "removed_sample": {f"removed/{kind}.jsonl": count for kind, count in removed.items()},
        "inputs": _inputs(config, plan.parts, clean),
        "timings_s": timings,
        "execution": {**execution, "throughput": throughput},
        "config": config,
    }


def _step_records(
    counts: dict[str, Any],
    cleaning: list[dict[str, Any]],
    after_filters: int,
    near: dict[str, int],
    tokenized: list[dict],
    shards: list[dict],
) -> list[dict[str, Any]]:
    """What each step saw and did, in the pipeline's order."""
    read, malformed = counts["in"], counts["malformed"]
    exact_removed, near_removed = counts["exact_duplicates"], counts["near_duplicates"]
    weight_filtered = sum(t["weight_filtered"] for t in tokenized)
    return [
        {"step": "read", "documents": read, "malformed": malformed},
        *cleaning,
        {"step": "exact_dedup", "in": after_filters, "removed": exact_removed},
        {
            "step": "near_dedup",
            "in": after_filters - exact_removed,
            "candidate_pairs": near["candidate_pairs"],
            "similar_pairs": near["similar_pairs"],
            "components_rounds": near["rounds"],
            "removed": near_removed,
        },
        {
            "step": "weights",
            "removed": weight_filtered,
            "extra_copies": sum(t["extra_copies"] for t in tokenized),
        },
        {
            "step": "tokenize",
            "documents": counts["kept"],
            "tokens": sum(t["tokens"] for t in tokenized),
            # pieces cut where no token-neutral place was found within the stretch
            "forced_cuts": sum(t.get("forced_cuts", 0) for t in tokenized),
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


def _passes(tokenized: list[dict]) -> dict[str, list[int]]:
    """Documents of each pass over the corpus order, per split: the training sampler shuffles
    documents within a pass, so that copies a pass apart never meet."""
    return {
        split: [
            sum(t["streams"][split][index][0] for t in tokenized)
            for index in range(len(tokenized[0]["streams"][split]) if tokenized else 0)
        ]
        for split in ("train", "valid")
    }


def _cleaning_steps(clean: list[dict]) -> list[dict[str, Any]]:
    """Every cleaning step's counts, summed over the parts, in the steps' order."""
    totals: dict[str, dict[str, Any]] = {}
    for part in clean:
        for step in part["steps"]:
            total = totals.setdefault(step["step"], {"step": step["step"], "removed": Counter()})
            for key, value in step.items():
                if key == "removed":
                    total["removed"].update(value)
                elif key != "step":
                    total[key] = total.get(key, 0) + value
    return [
        {**total, "removed": dict(sorted(total["removed"].items()))} for total in totals.values()
    ]


def _inputs(config: dict[str, Any], parts: list[Part], clean: list[dict]) -> list[dict]:
    specs = config.get("data", {}).get("inputs", [])
    rows = []
    for index, spec in enumerate(specs):
        mine = [p for p in parts if p.input_index == index]
        counts = [clean[p.index] for p in mine]
        rows.append(
            {
                "path": spec["path"],
                "files": len({file for p in mine for file in p.files}),
                "documents": sum(c["in"] for c in counts),
                "kept_after_filters": sum(c["kept"] for c in counts),
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
