"""`kiln data inspect DIR`: the manifest as tables, a few decoded documents, and a histogram
of document lengths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from . import atomic
from .errors import KilnError
from .format import ShardReader
from .manifest import MANIFEST
from .tokenizer import load_tokenizer


class NotPreparedError(KilnError):
    """DIR holds no finished `kiln data prepare` output."""


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise NotPreparedError(
            f"{directory}: no {MANIFEST} (not written by a finished `kiln data prepare`)"
        )
    return atomic.read_json(path)


def summary_tables(manifest: dict[str, Any]) -> list[Table]:
    counts = manifest["counts"]
    documents = Table(title="Documents", show_header=True)
    documents.add_column("outcome")
    documents.add_column("documents", justify="right")
    documents.add_column("share", justify="right")
    total = max(counts["in"], 1)

    def row(name: str, value: int) -> None:
        documents.add_row(name, f"{value:,}", f"{100 * value / total:.1f}%")

    row("in", counts["in"])
    row("kept", counts["kept"])
    for rule, value in counts["filtered"].items():
        row(f"filtered: {rule}", value)
    row("exact duplicates", counts["exact_duplicates"])
    row("near duplicates", counts["near_duplicates"])
    row("malformed (quarantined)", counts["malformed"])

    shards = Table(title="Shards", show_header=True)
    for column in ("shard", "documents", "tokens", "sha256 (.bin)"):
        shards.add_column(column, justify="left" if column == "shard" else "right")
    for shard in manifest["shards"]:
        shards.add_row(
            shard["name"],
            f"{shard['documents']:,}",
            f"{shard['tokens']:,}",
            shard["bin_sha256"][:12],
        )

    timings = Table(title="Timings", show_header=True)
    timings.add_column("stage")
    timings.add_column("seconds", justify="right")
    timings.add_column("rate", justify="right")
    throughput = manifest.get("execution", {}).get("throughput", {})
    for stage, seconds in manifest["timings_s"].items():
        done = throughput.get(stage)
        rate = f"{done['amount'] / seconds:,.0f} {done['unit']}/s" if done and seconds else ""
        timings.add_row(stage, f"{seconds:.1f}", rate)
    execution = manifest.get("execution", {})
    if execution.get("ray_nodes"):
        timings.title = (
            f"Timings (Ray: {execution['ray_nodes']} node(s), {execution['ray_cpus']} CPUs)"
        )
    tokenizer = manifest["tokenizer"]
    timings.caption = (
        f"tokenizer: {tokenizer['source']}, {tokenizer['vocab_size']:,} entries, "
        f"sha256 {tokenizer['sha256'][:12]}"
    )
    removed = removed_table(manifest)
    return [documents, shards, timings, *([removed] if removed else [])]


def removed_table(manifest: dict[str, Any]) -> Table | None:
    """The removed-document sample: for each rule or dedup kind, its file and how many."""
    sample = manifest.get("removed_sample") or {}
    if not sample:
        return None
    table = Table(title="Removed documents, sampled (kiln data inspect DIR --removed KIND)")
    table.add_column("kind")
    table.add_column("file")
    table.add_column("documents", justify="right")
    for file, count in sample.items():
        table.add_row(Path(file).stem, file, f"{count:,}")
    return table


def removed_documents(directory: Path, kind: str, count: int) -> list[dict[str, Any]]:
    """The first `count` documents of the removed sample of `kind` (a rule name,
    `exact_duplicates` or `near_duplicates`)."""
    path = Path(directory) / "removed" / f"{kind}.jsonl"
    if not path.is_file():
        known = sorted(p.stem for p in (Path(directory) / "removed").glob("*.jsonl"))
        raise NotPreparedError(
            f"{path}: no removed sample of {kind!r} (there are: {', '.join(known) or 'none'})"
        )
    rows = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            rows.append(json.loads(line))
            if len(rows) == count:
                break
    return rows


def sample_documents(directory: Path, manifest: dict[str, Any], count: int) -> list[str]:
    """The first `count` documents of the first train shard, decoded (EOS removed)."""
    tokenizer = load_tokenizer(
        Path(directory) / "tokenizer.json", manifest["tokenizer"]["eos_token"]
    )
    eos = manifest["tokenizer"]["eos_id"]
    train = [s for s in manifest["shards"] if s["split"] == "train"]
    if not train:
        return []
    reader = ShardReader(Path(directory) / train[0]["name"])
    texts = []
    for index in range(min(count, len(reader))):
        ids = reader[index]
        ids = ids[:-1] if len(ids) and ids[-1] == eos else ids
        texts.append(tokenizer.decode(ids.tolist(), skip_special_tokens=False))
    return texts


def document_lengths(directory: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    lengths: dict[str, list[np.ndarray]] = {}
    for shard in manifest["shards"]:
        reader = ShardReader(Path(directory) / shard["name"])
        lengths.setdefault(shard["split"], []).append(np.asarray(reader.sequence_lengths))
    return {split: np.concatenate(parts) for split, parts in lengths.items()}


def plot_length_histogram(lengths: dict[str, np.ndarray], path: Path) -> None:
    """A PNG histogram of document lengths in tokens, log-spaced bins, one series per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=110)
    largest = max((int(v.max()) for v in lengths.values() if len(v)), default=1)
    bins = np.unique(np.geomspace(1, max(largest, 2), 60).astype(int))
    for split, values in lengths.items():
        axis.hist(values, bins=bins, alpha=0.7, label=f"{split} ({len(values):,} documents)")
    axis.set_xscale("log")
    axis.set_xlabel("document length (tokens, EOS included)")
    axis.set_ylabel("documents")
    axis.set_title("Document lengths")
    axis.legend()
    figure.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(path)
