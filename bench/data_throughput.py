"""End-to-end tokens/s of `kiln data prepare` against raw `Tokenizer.encode_batch`, same texts,
same cores, measured in the same run.

    .venv/bin/python bench/data_throughput.py [--mb 120] [--workdir /tmp/kiln-bench]

The corpus is generated from real text (paragraphs of this Python's standard library, shuffled
into documents) with 5% exact and 5% near duplicates planted, written as JSON Lines. Both sides
use the same byte-level BPE (32k entries, trained once before timing). Raw: the texts already in
memory, `encode_batch` over batches of 1,000 documents, all cores (the Rust thread pool). Kiln:
the whole command in a fresh process — Ray start, reading, normalisation, every filter rule,
exact and near dedup, tokenisation, shards, manifest — with the same tokenizer loaded.

Two ratios are printed: tokens written per second (Kiln's output tokens over its wall time,
against raw), and corpus tokens per second (the raw token count of all input texts over Kiln's
wall time, against raw: how fast Kiln gets through a corpus).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stdlib_text import EVERY_RULE, paragraphs  # noqa: E402  (bench/, beside this script)

from data_pipeline.config import TokenizerConfig  # noqa: E402
from data_pipeline.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402


def generate(directory: Path, megabytes: int, seed: int = 0) -> list[str]:
    """Write the corpus as 16 JSON Lines files; return every document's text in order."""
    rng = random.Random(seed)
    pool = paragraphs()
    texts: list[str] = []
    size = 0
    while size < megabytes * 1e6:
        roll = rng.random()
        if texts and roll < 0.05:
            text = texts[rng.randrange(len(texts))]  # exact duplicate
        elif texts and roll < 0.10:
            words = texts[rng.randrange(len(texts))].split(" ")
            for _ in range(max(1, len(words) // 200)):
                words[rng.randrange(len(words))] = "tweaked"
            text = " ".join(words)  # near duplicate
        else:
            text = "\n\n".join(rng.choice(pool) for _ in range(rng.randint(8, 40)))
        texts.append(text)
        size += len(text.encode("utf-8"))
    directory.mkdir(parents=True, exist_ok=True)
    per_file = -(-len(texts) // 16)
    for index in range(16):
        chunk = texts[index * per_file : (index + 1) * per_file]
        with open(directory / f"corpus_{index:02d}.jsonl", "w", encoding="utf-8") as out:
            out.writelines(json.dumps({"text": t}) + "\n" for t in chunk)
    return texts


def raw_encode(tokenizer: Tokenizer, texts: list[str], batch: int = 1000) -> tuple[int, float]:
    started = time.perf_counter()
    tokens = 0
    for start in range(0, len(texts), batch):
        tokens += sum(len(e.ids) for e in tokenizer.encode_batch(texts[start : start + batch]))
    return tokens, time.perf_counter() - started


def kiln_config(corpus: Path, tokenizer: Path, output: Path) -> dict:
    return {
        "data": {
            "path": str(output),
            "inputs": [str(corpus)],
            "filters": EVERY_RULE,
            "dedup": {"exact": {"enabled": True}, "near": {"enabled": True}},
            "shards": {"max_tokens": 50_000_000, "validation_fraction": 0.01},
        },
        "tokenizer": {"path": str(tokenizer)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=120, help="corpus size in MB (>= 100)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kiln-bench"))
    args = parser.parse_args()
    work = args.workdir
    corpus = work / "corpus"
    texts = generate(corpus, args.mb)
    corpus_mb = sum(f.stat().st_size for f in corpus.iterdir()) / 1e6
    print(f"corpus: {len(texts):,} documents, {corpus_mb:.1f} MB of JSON Lines in {corpus}")

    tokenizer_file = work / "tokenizer.json"
    if not tokenizer_file.exists():
        sample = texts[: max(1, len(texts) // 8)]
        save_tokenizer(train_tokenizer(sample, TokenizerConfig(vocab_size=32000)), tokenizer_file)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))

    raw_tokens, raw_seconds = min(
        (raw_encode(tokenizer, texts) for _ in range(2)), key=lambda r: r[1]
    )
    raw_rate = raw_tokens / raw_seconds
    print(f"raw encode_batch: {raw_tokens:,} tokens in {raw_seconds:.1f} s = {raw_rate:,.0f} tok/s")

    output = work / "out"
    config = work / "bench.yaml"
    config.write_text(yaml.safe_dump(kiln_config(corpus, tokenizer_file, output)))
    kiln = [str(Path(sys.executable).parent / "kiln"), "data", "prepare", str(config)]
    shutil.rmtree(output, ignore_errors=True)
    started = time.perf_counter()
    result = subprocess.run([*kiln, "--no-progress"], capture_output=True, text=True)
    kiln_seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"kiln data prepare failed:\n{result.stderr[-4000:]}")
    manifest = json.loads((output / "manifest.json").read_text())
    written = sum(s["tokens"] for s in manifest["shards"])
    written_rate = written / kiln_seconds
    corpus_rate = raw_tokens / kiln_seconds
    print(f"kiln data prepare: {kiln_seconds:.1f} s wall, {written:,} tokens written")
    print(f"  counts: {json.dumps(manifest['counts'])}")
    print(f"  stages (s): {json.dumps(manifest['timings_s'])}")
    print(f"ratio, tokens written per second: {written_rate / raw_rate:.2f}")
    print(f"ratio, corpus tokens per second:  {corpus_rate / raw_rate:.2f}")
    explain(manifest, kiln_seconds, raw_rate)
    print(
        f"| {time.strftime('%Y-%m-%d')} | {platform.machine()}, {os.cpu_count()} cores | "
        f"{corpus_mb:.0f} MB | {raw_rate:,.0f} | {kiln_seconds:.1f} s | {written_rate:,.0f} | "
        f"{written_rate / raw_rate:.2f} | {corpus_rate / raw_rate:.2f} |"
    )


def explain(manifest: dict, kiln_seconds: float, raw_rate: float) -> None:
    """Where Kiln's wall time goes, against what raw encoding of the written tokens would take."""
    stages = manifest["timings_s"]
    written = sum(s["tokens"] for s in manifest["shards"])
    outside = kiln_seconds - sum(stages.values())
    print("where the time goes (s):")
    print(f"  raw encode of the tokens Kiln writes would take {written / raw_rate:.1f}")
    print(
        f"  Ray start {stages.get('ray_start', 0):.1f}; process start, imports, Ray shutdown "
        f"{outside:.1f}"
    )
    print(f"  read + normalise + filter + MinHash {stages['read_clean_filter']:.1f}")
    print(
        f"  tokenise (survivors of dedup only) {stages['tokenize']:.1f} for {written:,} tokens "
        f"({written / stages['tokenize'] / raw_rate:.2f} of raw's tokens/s)"
    )
    rest = sum(
        v for k, v in stages.items() if k not in ("ray_start", "read_clean_filter", "tokenize")
    )
    print(f"  every other stage {rest:.1f}")


if __name__ == "__main__":
    main()
