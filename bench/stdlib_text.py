"""What the data benchmarks build their corpora from: paragraphs of this Python's standard
library (the embedded corpus: docstrings and comments give real English, code the rest), and
filter thresholds that keep its code and prose with every rule on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_pipeline.readers import stdlib_corpus_files

# Every rule on, at thresholds that keep source code and prose.
EVERY_RULE = {
    "min_words": 20,
    "max_words": 1_000_000,
    "min_mean_word_length": 1.0,
    "max_mean_word_length": 30.0,
    "max_symbol_word_ratio": 1.0,
    "max_bullet_lines_ratio": 0.95,
    "max_ellipsis_lines_ratio": 0.5,
    "min_alpha_words_ratio": 0.3,
    "max_duplicate_line_fraction": 0.6,
    "max_duplicate_paragraph_fraction": 0.6,
    "max_duplicate_line_char_fraction": 0.6,
    "max_duplicate_paragraph_char_fraction": 0.6,
    "max_top_ngram_char_fraction": {2: 0.5, 3: 0.5, 4: 0.5},
    "max_duplicate_ngram_char_fraction": {n: 0.8 for n in range(5, 11)},
}


def stdlib_paragraphs() -> Iterator[str]:
    """Every blank-line-separated paragraph of every readable stdlib source, in file order."""
    for path in stdlib_corpus_files():
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield from text.split("\n\n")


def paragraphs(min_chars: int = 40) -> list[str]:
    return [p for p in stdlib_paragraphs() if len(p) > min_chars]
