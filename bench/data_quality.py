"""Near-duplicate recall of Kiln's MinHash dedup, per kind of change, against LSH's theory.

    .venv/bin/python bench/data_quality.py [--bases 300] [--seed 0]

Documents: `--bases` base documents of 200-5000 words, each a run of paragraphs of this
Python's standard library (docstrings and comments give real English), and for each base one
variant of every kind: 1, 3, 5 and 10% of its words replaced by other words of the corpus,
re-wrapped at another width, re-indented (tabs and spaces before every line); plus as many
unrelated negatives. The documents go through Kiln's own near-dedup steps, in corpus order
(bases first): normalised words (`TextMeasures.dedup_words`), MinHash signatures and LSH bands
(`MinHasher`, the configuration's defaults: word 5-grams, 14 bands x 8 rows), star pairs per
band key, verification by estimated Jaccard, clusters; the earliest of a cluster is kept.

Printed per kind: the true word 5-gram Jaccard (mean), recall with verification at the default
threshold (0.5), at 0.8 and without verification (every LSH candidate, as datatrove), and the
recall LSH's S-curve 1 - (1 - J^8)^14 predicts for the true Jaccard of each variant. False
positives: bases or negatives removed. Negatives share no paragraph with any other document.
"""

from __future__ import annotations

import argparse
import random
import sys
import textwrap
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stdlib_text import stdlib_paragraphs  # noqa: E402  (bench/, beside this script)

from data_pipeline.config import NearDedupConfig  # noqa: E402
from data_pipeline.text.dedup import (  # noqa: E402
    MinHasher,
    candidate_pairs,
    estimated_jaccard,
    near_duplicates,
)
from data_pipeline.text.measures import TextMeasures  # noqa: E402

KINDS = ("edit 1%", "edit 3%", "edit 5%", "edit 10%", "re-wrapped", "re-indented")


def paragraphs(rng: random.Random) -> list[str]:
    """Distinct paragraphs of up to 400 words, shuffled: each is used by one document only, so
    that bases and negatives are unrelated except where the benchmark makes a variant."""
    pool = dict.fromkeys(p for p in stdlib_paragraphs() if 8 < len(p.split()) <= 400)
    shuffled = list(pool)
    rng.shuffle(shuffled)
    return shuffled


def compose(rng: random.Random, pool: list[str]) -> str:
    """A document of 200-5000 words from paragraphs taken off the end of `pool`."""
    target = rng.randint(200, 5000)
    chosen, words = [], 0
    while words < target:
        if not pool:
            raise SystemExit("not enough distinct paragraphs for --bases; ask for fewer")
        paragraph = pool.pop()
        chosen.append(paragraph)
        words += len(paragraph.split())
    return "\n\n".join(chosen)


def edited(rng: random.Random, text: str, share: float, vocabulary: list[str]) -> str:
    """`share` of the words replaced by other words, whitespace kept as it was."""
    pieces = text.split(" ")
    words = [i for i, piece in enumerate(pieces) if piece.strip()]
    for index in rng.sample(words, max(1, round(share * len(words)))):
        pieces[index] = rng.choice(vocabulary)
    return " ".join(pieces)


def rewrapped(text: str, width: int) -> str:
    """The same words at another line width: only whitespace changes (no breaks at hyphens)."""
    return "\n".join(textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False))


def reindented(text: str) -> str:
    return "\n".join(("\t" if i % 2 else "    ") + line for i, line in enumerate(text.split("\n")))


def true_jaccard(a: np.ndarray, b: np.ndarray, n: int) -> float:
    def shingles(words: np.ndarray) -> set:
        if len(words) < n:
            return {tuple(words.tolist())}
        return {tuple(words[i : i + n].tolist()) for i in range(len(words) - n + 1)}

    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y) if x | y else 0.0


def removed(cfg: NearDedupConfig, words: list[np.ndarray], threshold: float) -> set[int]:
    """Ids (positions) Kiln's near dedup removes, the earliest of each cluster kept."""
    minhasher = MinHasher(cfg)
    signatures = minhasher.signatures(words)
    keys = minhasher.band_keys(signatures)
    ids = np.repeat(np.arange(len(words)), cfg.bands)
    pairs = candidate_pairs(keys.ravel(), ids)
    similar = estimated_jaccard(signatures[pairs[:, 0]], signatures[pairs[:, 1]]) >= threshold
    return set(near_duplicates(pairs, similar).tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    pool = paragraphs(rng)
    vocabulary = sorted({w for p in pool[:2000] for w in p.split() if w.isalpha()})
    bases = [compose(rng, pool) for _ in range(args.bases)]
    negatives = [compose(rng, pool) for _ in range(args.bases)]
    variants: dict[str, list[str]] = {
        "edit 1%": [edited(rng, b, 0.01, vocabulary) for b in bases],
        "edit 3%": [edited(rng, b, 0.03, vocabulary) for b in bases],
        "edit 5%": [edited(rng, b, 0.05, vocabulary) for b in bases],
        "edit 10%": [edited(rng, b, 0.10, vocabulary) for b in bases],
        "re-wrapped": [rewrapped(b, rng.choice((40, 60, 100))) for b in bases],
        "re-indented": [reindented(b) for b in bases],
    }
    corpus = bases + negatives + [v for kind in KINDS for v in variants[kind]]
    measures = TextMeasures(corpus)
    words = measures.dedup_words(np.arange(len(corpus)))
    cfg = NearDedupConfig()
    thresholds = (cfg.threshold, 0.8, 0.0)  # the default, near-identical only, every candidate
    found = {t: removed(cfg, words, t) for t in thresholds}
    n = len(bases)
    print(
        f"{n} bases of 200-5000 words, {n} negatives, {len(KINDS)} variants of each base; "
        f"word {cfg.ngram}-grams, {cfg.bands} bands x {cfg.rows} rows, threshold {cfg.threshold}"
    )
    print(
        f"| kind | true Jaccard (mean) | recall, verified >= {cfg.threshold} (default) | "
        f"recall, verified >= 0.8 | recall, every candidate | "
        f"S-curve 1-(1-J^{cfg.rows})^{cfg.bands} |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for k, kind in enumerate(KINDS):
        first = 2 * n + k * n
        jaccards = np.array([true_jaccard(words[i], words[first + i], cfg.ngram) for i in range(n)])
        curve = 1 - (1 - jaccards**cfg.rows) ** cfg.bands
        recalls = " | ".join(
            f"{np.mean([first + i in found[t] for i in range(n)]):.3f}" for t in thresholds
        )
        print(f"| {kind} | {jaccards.mean():.3f} | {recalls} | {curve.mean():.3f} |")
    false = ", ".join(
        f"{sum(i in found[t] for i in range(2 * n))} at threshold {t}" for t in thresholds
    )
    print(f"false positives (bases or negatives removed, of {2 * n}): {false}")
    half = (1 / cfg.bands) ** (1 / cfg.rows)
    needed = (1 - (1 - 0.9) ** (1 / cfg.bands)) ** (1 / cfg.rows)
    print(
        f"LSH with {cfg.bands} x {cfg.rows}: recall 0.5 at J = {half:.2f}; recall 0.9 needs "
        f"J >= {needed:.2f}"
    )


if __name__ == "__main__":
    main()
