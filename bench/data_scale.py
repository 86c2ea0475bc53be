"""How each stage of `kiln data prepare` grows with the corpus: seconds per MB and the driver's
peak memory at several sizes, measured in one run, and each stage extrapolated to 1 TB.

    .venv/bin/python bench/data_scale.py [--sizes 40 160 640] [--workdir /tmp/kiln-scale]

The corpus: distinct documents composed of paragraphs of this Python's standard library (the
embedded corpus), 10% exact and 5% near duplicates (1-2% of words replaced) planted, as JSON
Lines files of 10 MB, so that files are split into spans as well as grouped into parts. Every
size runs with `data.part_size_mb=1` (costs that grow with parts x corpus show early), exact
and near dedup on, a tokenizer trained on a 2 MB sample (8k entries), in a fresh process that
starts its own Ray.

Printed per stage and size: seconds per MB, and its growth from the smallest to the largest size
(target <= 1.15); the driver's peak RSS (target: grows <= 1.5x). A shared 2-core VM drifts by
20-30% in speed over the minutes the largest size takes, so the sizes run in rounds (smallest to
largest, `--rounds` times) and each stage's time at a size is its best over the rounds.

Then a fit of each stage's seconds to a + b * MB, and the hours for 1 TB on 32 nodes x 64 CPUs:
a + b * 1e6 MB * (CPUs here / 2048 CPUs), which assumes the stage spreads over the cluster as it
does over the CPUs here (every stage is tasks over parts or buckets) and ignores what this
machine cannot show (network, shared-storage latency, stragglers).
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

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stdlib_text import EVERY_RULE, paragraphs  # noqa: E402  (bench/, beside this script)

FILE_MB = 10
CLUSTER_CPUS = 32 * 64
TERABYTE_MB = 1e6


def generate(directory: Path, megabytes: int, pool: list[str], seed: int = 0) -> int:
    """Write the corpus as JSON Lines files of FILE_MB; return the number of documents."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    texts: list[str] = []
    size = written = files = 0
    out = None
    while size < megabytes * 1e6:
        roll = rng.random()
        if texts and roll < 0.10:
            text = texts[rng.randrange(len(texts))]  # exact duplicate
        elif texts and roll < 0.15:
            words = texts[rng.randrange(len(texts))].split(" ")
            for _ in range(max(1, len(words) // rng.choice((50, 100)))):
                words[rng.randrange(len(words))] = "tweaked"
            text = " ".join(words)  # near duplicate
        else:
            text = "\n\n".join(rng.choice(pool) for _ in range(rng.randint(8, 40)))
        if len(texts) < 200_000:  # originals to copy from: bounded, spread over the corpus
            texts.append(text)
        elif rng.random() < 0.05:
            texts[rng.randrange(len(texts))] = text
        line = json.dumps({"text": text}) + "\n"
        if out is None or written >= FILE_MB * 1e6:
            if out is not None:
                out.close()
            out = open(directory / f"corpus_{files:04d}.jsonl", "w", encoding="utf-8")  # noqa: SIM115
            files, written = files + 1, 0
        out.write(line)
        written += len(line)
        size += len(text.encode("utf-8"))
    if out is not None:
        out.close()
    return len(texts)


def config(corpus: Path, output: Path) -> dict:
    return {
        "data": {
            "path": str(output),
            "inputs": [str(corpus)],
            "part_size_mb": 1,
            "filters": EVERY_RULE,
            "shards": {"max_tokens": 50_000_000, "validation_fraction": 0.01},
        },
        "tokenizer": {"vocab_size": 8192, "train_sample_mb": 2},
    }


def run(corpus: Path, work: Path) -> tuple[dict, float]:
    output = work / "out"
    shutil.rmtree(output, ignore_errors=True)
    path = work / "scale.yaml"
    path.write_text(yaml.safe_dump(config(corpus, output)))
    kiln = [str(Path(sys.executable).parent / "kiln"), "data", "prepare", str(path)]
    started = time.perf_counter()
    result = subprocess.run([*kiln, "--no-progress"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"kiln data prepare failed:\n{result.stderr[-4000:]}")
    return json.loads((output / "manifest.json").read_text()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[40, 160, 640], help="MB")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every size, interleaved")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kiln-scale"))
    args = parser.parse_args()
    pool = paragraphs()
    sizes = sorted(args.sizes)
    for megabytes in sizes:
        corpus = args.workdir / f"corpus_{megabytes}"
        if not corpus.exists():
            generate(corpus, megabytes, pool, seed=megabytes)
    rows: dict[int, dict] = {}
    for round_index in range(args.rounds):
        for megabytes in sizes:
            corpus = args.workdir / f"corpus_{megabytes}"
            input_mb = sum(f.stat().st_size for f in corpus.iterdir()) / 1e6
            manifest, wall = run(corpus, args.workdir)
            execution = manifest["execution"]
            best = rows.setdefault(megabytes, {"input_mb": input_mb, "wall": wall, "rss": 0.0})
            best["wall"] = min(best["wall"], wall)
            best["rss"] = max(best["rss"], execution["driver_peak_rss_mb"])
            best["stages"] = {
                stage: min(seconds, best.get("stages", {}).get(stage, seconds))
                for stage, seconds in manifest["timings_s"].items()
            }
            print(
                f"round {round_index + 1}, {megabytes} MB: {input_mb:.0f} MB of JSON Lines, "
                f"{wall:.1f} s wall, driver peak RSS {execution['driver_peak_rss_mb']:.0f} MB, "
                f"stages {json.dumps(manifest['timings_s'])}, "
                f"counts {json.dumps(manifest['counts'])}",
                flush=True,
            )
    report(rows, sizes)


def report(rows: dict[int, dict], sizes: list[int]) -> None:
    stages = list(rows[sizes[0]]["stages"])
    small, large = sizes[0], sizes[-1]
    print(f"\nseconds per MB of input ({platform.machine()}, {os.cpu_count()} CPUs)")
    header = " | ".join(f"{s} MB" for s in sizes)
    print(f"| stage | {header} | growth {small}->{large} |")
    print("|" + " --- |" * (len(sizes) + 2))
    fits = {}
    for stage in [*stages, "whole command"]:
        seconds = np.array(
            [
                rows[s]["wall"] if stage == "whole command" else rows[s]["stages"][stage]
                for s in sizes
            ]
        )
        mb = np.array([rows[s]["input_mb"] for s in sizes])
        per_mb = seconds / mb
        growth = per_mb[-1] / per_mb[0] if per_mb[0] > 0 else float("nan")
        fixed, marginal = np.polyfit(mb, seconds, 1)[::-1]
        fits[stage] = (max(fixed, 0.0), max(marginal, 0.0))
        cells = " | ".join(f"{v * 1000:.1f} ms" for v in per_mb)
        verdict = "ok" if growth <= 1.15 else "OVER 1.15"
        print(f"| {stage} | {cells} | {growth:.2f} ({verdict}) |")
    rss = [rows[s]["rss"] for s in sizes]
    cells = " | ".join(f"{r:.0f} MB" for r in rss)
    verdict = "ok" if rss[-1] / rss[0] <= 1.5 else "OVER 1.5"
    print(f"| driver peak RSS | {cells} | {rss[-1] / rss[0]:.2f} ({verdict}) |")
    cpus = os.cpu_count() or 1
    print(f"\n1 TB on 32 nodes x 64 CPUs (fit seconds = a + b * MB here, on {cpus} CPUs)")
    print("| stage | a (s) | b (ms/MB) | hours for 1 TB |")
    print("| --- | --- | --- | --- |")
    total = 0.0
    for stage, (fixed, marginal) in fits.items():
        hours = (fixed + marginal * TERABYTE_MB * cpus / CLUSTER_CPUS) / 3600
        if stage != "whole command":
            total += hours
        print(f"| {stage} | {fixed:.1f} | {marginal * 1000:.2f} | {hours:.2f} |")
    print(f"| sum of stages | | | {total:.2f} |")


if __name__ == "__main__":
    main()
