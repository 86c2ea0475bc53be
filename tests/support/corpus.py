"""Deterministic synthetic corpora for pipeline tests: prose-like documents that pass Gopher's
default filters, with exact and near duplicates planted where the test says."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

# English function words first, so that the Zipf weights make them the most frequent, as in
# prose (Gopher's stop-word rule wants at least two of them).
FUNCTION_WORDS = ["the", "of", "and", "to", "in", "that", "with", "be", "have", "for"]


def vocabulary(rng: np.random.Generator, size: int = 4000) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = set()
    while len(words) < size - len(FUNCTION_WORDS):
        words.add("".join(rng.choice(letters, size=int(rng.integers(2, 10)))))
    return FUNCTION_WORDS + sorted(words - set(FUNCTION_WORDS))


def document(rng: np.random.Generator, words: list[str], n_words: int) -> str:
    """Sentences of Zipf-weighted words, grouped into paragraphs."""
    ranks = np.arange(1, len(words) + 1)
    weights = 1.0 / ranks**0.8
    picks = rng.choice(len(words), size=n_words, p=weights / weights.sum())
    paragraphs, sentence, sentences = [], [], []
    for i, pick in enumerate(picks):
        sentence.append(words[pick])
        if len(sentence) >= rng.integers(6, 16) or i == n_words - 1:
            sentences.append(" ".join(sentence).capitalize() + ".")
            sentence = []
            if len(sentences) >= rng.integers(3, 7):
                paragraphs.append(" ".join(sentences))
                sentences = []
    if sentences:
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


def near_copy(rng: np.random.Generator, text: str, words: list[str], share: float) -> str:
    """`text` with about `share` of its words replaced by other words."""
    tokens = text.split(" ")
    for i in rng.choice(len(tokens), size=max(1, int(share * len(tokens))), replace=False):
        tokens[i] = words[int(rng.integers(len(words)))]
    return " ".join(tokens)


def distinct_documents(seed: int, count: int, min_words: int = 80, max_words: int = 400):
    rng = np.random.default_rng(seed)
    words = vocabulary(rng)
    texts = [document(rng, words, int(rng.integers(min_words, max_words))) for _ in range(count)]
    return rng, words, texts


def write_jsonl(path: Path, texts: list[str], compress: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts))
    if compress:
        path.write_bytes(gzip.compress(lines.encode(), mtime=0))
    else:
        path.write_text(lines)
    return path
