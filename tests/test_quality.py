"""Quality filters: each rule on its own, their order, switches, hand-computed n-gram
fractions, agreement with a slow pure-Python reference, and determinism across processes."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline.config import FilterConfig
from data_pipeline.steps.quality import (
    BULLETS,
    RULE_ORDER,
    NgramIndex,
    QualityFilter,
    duplicate_ngram_char_fraction,
    top_ngram_char_fraction,
)

REPO = Path(__file__).resolve().parent.parent
RULES = [name for name in FilterConfig.model_fields if name != "enabled"]
NGRAM_RULES = ("max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction")

PROSE = (
    "The committee met on a grey Tuesday morning to weigh the proposal for a new library. "
    "Several members worried about the cost of heating such a large building through winter, "
    "while others argued that the town had waited far too long for a place where children "
    "could read after school. After two hours of careful debate, the chair asked for a vote, "
    "and the motion passed by a narrow margin. Construction is expected to begin next spring, "
    "once the architects have revised their drawings and the budget has been approved."
)


def config_with(**rules: object) -> FilterConfig:
    """A configuration with just the given rules on."""
    return FilterConfig(**({name: None for name in RULES} | rules))


def only(**rules: object) -> QualityFilter:
    """A filter with just the given rules on."""
    return QualityFilter(config_with(**rules))


def test_rule_order_is_the_documented_one_and_covers_every_rule() -> None:
    assert RULE_ORDER == (
        "min_chars",
        "max_chars",
        "min_words",
        "max_words",
        "min_mean_word_length",
        "max_mean_word_length",
        "max_symbol_word_ratio",
        "min_alpha_words_ratio",
        "max_bullet_lines_ratio",
        "max_ellipsis_lines_ratio",
        "max_duplicate_line_fraction",
        "max_duplicate_line_char_fraction",
        "max_duplicate_paragraph_fraction",
        "max_duplicate_paragraph_char_fraction",
        "max_top_ngram_char_fraction",
        "max_duplicate_ngram_char_fraction",
    )
    assert sorted(RULE_ORDER) == sorted(RULES)


DUPLICATE_NGRAMS = "max_duplicate_ngram_char_fraction"

# (rule, threshold, a document failing it, a near miss passing it)
CASES = [
    ("min_chars", 10, "abcdefghi", "abcdefghij"),
    ("max_chars", 10, "abcdefghijk", "abcdefghij"),
    ("min_words", 3, "one  two\n", "one\u3000two\u00a0three"),
    ("max_words", 3, "a b c d", " a\tb\nc "),
    # punctuation does not count: "abc," is 3 long; a lone "--" is left out of the mean
    ("min_mean_word_length", 3, "abc, de.", "abc -- def"),
    ("max_mean_word_length", 10, "abcdefghijk", "abcdefghij!!! ab..cdefghij"),
    ("max_symbol_word_ratio", 0.1, "# a b c d e f g h wait...", "# a b c d e f g h i"),
    ("max_symbol_word_ratio", 0.1, "\u2026 a b c d e f g h #", "\u2026 a b c d e f g h i"),
    ("min_alpha_words_ratio", 0.8, "a b c d e f g 1 2 3", "a b c d e f g \u65e5\u672c 2 x3"),
    # blank lines are not lines; leading whitespace before a bullet is allowed
    ("max_bullet_lines_ratio", 0.5, "- a\n  \u2022 b\nc", "- a\n\n  \n* b\nc\nd"),
    ("max_ellipsis_lines_ratio", 0.3, "wait...\nthen\u2026  \nyes\nno\nhm", "a...\nb... c\nd\ne"),
    # 4 of 10 lines repeat an earlier one, then 3 of 10
    ("max_duplicate_line_fraction", 0.3, "\n".join("abcdefaaaa"), "\n".join("abcdefgaaa")),
    ("max_duplicate_line_fraction", 0.3, "x\nx\ny", "x\n  x\ny"),
    ("max_duplicate_line_char_fraction", 0.2, "ab\ncde\nab", "ab\ncdef\nab"),
    ("max_duplicate_paragraph_fraction", 0.3, "p1\n\np2\n\np1", "p1\n\np2\n\np3\n\np1"),
    ("max_duplicate_paragraph_fraction", 0.3, "p1\n \t\np1 x\n\np1 x", "p1\np1 x\np1 x"),
    ("max_duplicate_paragraph_char_fraction", 0.2, "ab\n\nc\n\nab", "ab\n\ncd\n\nab"),
    # 2-gram "ab cd" twice: 8 characters of 14, then of 16
    ("max_top_ngram_char_fraction", {2: 0.5}, "ab cd ab cd ef gh ij", "ab cd ab cd ef gh ij kl"),
    ("max_top_ngram_char_fraction", {1: 0.9, 3: 0.5}, "a b c a b c", "a b c a b c d e f g h i"),
    # 3-gram "a b c" twice: 6 characters of 10, then of 12
    (DUPLICATE_NGRAMS, {3: 0.5}, " ".join("abcxabcyzw"), " ".join("abcxabcyzwqs")),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "threshold", "failing", "passing"), CASES)
def test_each_rule_alone(rule: str, threshold: object, failing: str, passing: str) -> None:
    quality = only(**{rule: threshold})
    assert quality.first_failure(failing) == rule
    assert quality.first_failure(passing) is None
    assert quality.check_batch([passing, failing, passing]) == [None, rule, None]
    assert only().first_failure(failing) is None


def test_prose_passes_the_defaults_and_its_repetition_does_not() -> None:
    quality = QualityFilter(FilterConfig())
    assert quality.first_failure(PROSE) is None
    assert quality.first_failure("\n".join([PROSE] * 3)) == "max_duplicate_line_fraction"
    assert quality.first_failure(PROSE[:200]) == "min_words"
    assert quality.first_failure(PROSE.replace(" ", " # ")) == "max_symbol_word_ratio"
    words = PROSE.split()
    repeated = " ".join(words[:20] * 5)  # one line: caught by the n-gram rules
    assert quality.first_failure(repeated) == "max_top_ngram_char_fraction"
    assert QualityFilter(FilterConfig(max_top_ngram_char_fraction=None)).first_failure(
        repeated
    ) == ("max_duplicate_ngram_char_fraction")


def test_first_failing_rule_in_order_is_reported() -> None:
    text = "# #"  # too few words, all symbols, no letters
    assert only(min_words=3, max_symbol_word_ratio=0.1).first_failure(text) == "min_words"
    assert only(max_symbol_word_ratio=0.1, min_alpha_words_ratio=0.5).first_failure(text) == (
        "max_symbol_word_ratio"
    )
    assert only(min_alpha_words_ratio=0.5, max_top_ngram_char_fraction={1: 0.1}).first_failure(
        text
    ) == ("min_alpha_words_ratio")
    assert only(max_top_ngram_char_fraction={1: 0.1}).first_failure(text) == (
        "max_top_ngram_char_fraction"
    )


def test_none_switches_a_rule_off_and_enabled_false_all() -> None:
    short = "too short"
    assert QualityFilter(FilterConfig()).first_failure(short) == "min_words"
    assert QualityFilter(FilterConfig(min_words=None)).first_failure(short) != "min_words"
    off = QualityFilter(FilterConfig(enabled=False, min_chars=10**6, max_chars=1))
    texts = ["", short, "# # #", "\n".join([PROSE] * 5), "x" * 1000]
    assert off.check_batch(texts) == [None] * len(texts)
    assert only().check_batch(texts) == [None] * len(texts)


def test_documents_without_words() -> None:
    for empty in ("", " \n\t "):
        assert QualityFilter(FilterConfig()).first_failure(empty) == "min_words"
        assert only(min_chars=1).first_failure("") == "min_chars"
        assert only(min_mean_word_length=3).first_failure(empty) == "min_mean_word_length"
        assert only(min_alpha_words_ratio=0.5).first_failure(empty) == "min_alpha_words_ratio"
        assert only(min_alpha_words_ratio=0.0).first_failure(empty) is None
        max_rules = {name: FilterConfig.model_fields[name].default for name in RULES}
        max_rules = {k: v for k, v in max_rules.items() if k.startswith("max_")}
        assert only(**max_rules).first_failure(empty) is None


@pytest.mark.parametrize(
    ("words", "n", "top", "duplicate"),
    [
        ("the cat the cat sat", 2, 12 / 15, 12 / 15),
        ("the cat the cat sat", 3, 9 / 15, 0.0),
        ("the cat the cat sat", 1, 6 / 15, 12 / 15),
        # equally frequent 2-grams "a bb" (3 chars) and "ccc d" (4): the longer one counts
        ("a bb a bb ccc d ccc d", 2, 8 / 14, 1.0),
        # overlapping occurrences: "a a" three times covers 6 > 4 characters
        ("a a a a", 2, 6 / 4, 1.0),
        ("a b a b a", 3, 6 / 5, 1.0),
        ("a b c a b d", 2, 4 / 6, 4 / 6),
        # nothing repeats: the longest single 2-gram ("c def")
        ("ab c def", 2, 4 / 6, 0.0),
        ("ab c", 3, 0.0, 0.0),
        ("", 2, 0.0, 0.0),
        ("caf\u00e9 \u65e5\u672c caf\u00e9 \u65e5\u672c x", 2, 12 / 13, 12 / 13),
    ],
)
def test_ngram_fractions_by_hand(words: str, n: int, top: float, duplicate: float) -> None:
    assert top_ngram_char_fraction(words.split(), n) == pytest.approx(top)
    assert duplicate_ngram_char_fraction(words.split(), n) == pytest.approx(duplicate)


def reference_top(words: list[str], n: int) -> float:
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(map(len, words))
    if not grams or not total:
        return 0.0
    most = max(grams.values())
    return most * max(len("".join(g)) for g, c in grams.items() if c == most) / total


def reference_duplicate(words: list[str], n: int) -> float:
    starts = range(len(words) - n + 1)
    grams = Counter(tuple(words[i : i + n]) for i in starts)
    covered = set()
    for i in starts:
        if grams[tuple(words[i : i + n])] > 1:
            covered.update(range(i, i + n))
    total = sum(map(len, words))
    return sum(len(words[i]) for i in covered) / total if total else 0.0


def random_words(rng: random.Random) -> list[str]:
    vocabulary = ["a", "bb", "ccc", "\u00e9", "\u65e5\u672c", "d", "ee", "a" * rng.randint(1, 4)]
    vocabulary = vocabulary[: rng.randint(1, len(vocabulary))]
    return [rng.choice(vocabulary) for _ in range(rng.randint(0, 30))]


def test_ngram_fractions_agree_with_the_reference() -> None:
    rng = random.Random(7)
    for _ in range(300):
        words = random_words(rng)
        index = NgramIndex.of_words(words)  # sizes one after another: built from the last
        for n in range(1, 8):
            top, duplicate = reference_top(words, n), reference_duplicate(words, n)
            assert top_ngram_char_fraction(words, n) == pytest.approx(top), (words, n)
            assert duplicate_ngram_char_fraction(words, n) == pytest.approx(duplicate)
            assert index.top_fractions(n)[0] == pytest.approx(top), (words, n)
            assert index.duplicate_fractions(n)[0] == pytest.approx(duplicate), (words, n)


def reference_measures(text: str) -> dict[str, float]:
    """Every scalar measure, the slow and obvious way."""

    def ratio(part: float, whole: float) -> float:
        return part / whole if whole else 0.0

    def repeats(items: list[str]) -> tuple[int, int]:
        seen: set[str] = set()
        count = chars = 0
        for item in items:
            if item in seen:
                count, chars = count + 1, chars + len(item)
            seen.add(item)
        return count, chars

    def word_chars(word: str) -> int:
        return sum(unicodedata.category(c)[0] not in "PS" for c in word)

    words = text.split()
    content = [word_chars(w) for w in words if word_chars(w)]
    lines = [line for line in text.split("\n") if line.strip()]
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    line_repeats, paragraph_repeats = repeats(lines), repeats(paragraphs)
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    return {
        "chars": len(text),
        "words": len(words),
        "mean_word_length": ratio(sum(content), len(content)),
        "symbol_word_ratio": ratio(symbols, len(words)),
        "alpha_words_ratio": ratio(sum(any(c.isalpha() for c in w) for w in words), len(words)),
        "bullet_lines_ratio": ratio(sum(line.lstrip()[0] in BULLETS for line in lines), len(lines)),
        "ellipsis_lines_ratio": ratio(
            sum(line.rstrip().endswith(("...", "\u2026")) for line in lines), len(lines)
        ),
        "duplicate_line_fraction": ratio(line_repeats[0], len(lines)),
        "duplicate_line_char_fraction": ratio(line_repeats[1], len(text)),
        "duplicate_paragraph_fraction": ratio(paragraph_repeats[0], len(paragraphs)),
        "duplicate_paragraph_char_fraction": ratio(paragraph_repeats[1], len(text)),
    }


def reference_first_failure(text: str, cfg: FilterConfig) -> str | None:
    measures = reference_measures(text)
    words = text.split()
    assert set(cfg.active_rules()) <= set(RULE_ORDER)
    for name in RULE_ORDER:
        threshold = cfg.active_rules().get(name)
        if threshold is None:
            continue
        if name in NGRAM_RULES:
            measure = reference_top if name == NGRAM_RULES[0] else reference_duplicate
            if any(measure(words, n) > threshold[n] for n in sorted(threshold)):
                return name
            continue
        value = measures[name[4:]]
        if (value < threshold) if name.startswith("min_") else (value > threshold):
            return name
    return None


TOKENS = ["a", "bb", "ccc", "the", "cat", "Hello,", "x1", "12", "\u00e9t\u00e9", "\u65e5\u672c",
          "#", "...", "\u2026", "wait...", "-", "*", "\u2022", "--", "ab.cd", "\u00b7", "(",
          ")"]  # fmt: skip
SEPARATORS = [" "] * 8 + ["\n"] * 3 + ["\n\n", "  \n", "\t", "\u00a0", "\n \n", "\u3000"]


def random_document(rng: random.Random, max_tokens: int = 40) -> str:
    if rng.random() < 0.3:  # paragraphs drawn from a few, so that some repeat
        pool = [random_document(rng, 8) for _ in range(rng.randint(1, 4))]
        return "\n\n".join(rng.choice(pool) for _ in range(rng.randint(1, 6)))
    tokens = TOKENS[: rng.randint(2, len(TOKENS))]
    parts = []
    for _ in range(rng.randint(0, max_tokens)):
        parts += [rng.choice(tokens), rng.choice(SEPARATORS)]
    return "".join(parts[: rng.randint(0, len(parts))])


def random_config(rng: random.Random) -> FilterConfig:
    def maybe(value: object) -> object:
        return value if rng.random() < 0.35 else None

    def sizes() -> dict[int, float]:
        return {n: rng.uniform(0.1, 1.0) for n in rng.sample(range(1, 6), rng.randint(1, 3))}

    return FilterConfig(
        min_chars=maybe(rng.randint(0, 20)),
        max_chars=maybe(rng.randint(50, 200)),
        min_words=maybe(rng.randint(0, 8)),
        max_words=maybe(rng.randint(10, 40)),
        min_mean_word_length=maybe(rng.uniform(0, 3)),
        max_mean_word_length=maybe(rng.uniform(1.5, 5)),
        max_symbol_word_ratio=maybe(rng.uniform(0, 0.5)),
        min_alpha_words_ratio=maybe(rng.uniform(0, 1)),
        max_bullet_lines_ratio=maybe(rng.uniform(0, 1)),
        max_ellipsis_lines_ratio=maybe(rng.uniform(0, 1)),
        max_duplicate_line_fraction=maybe(rng.uniform(0, 1)),
        max_duplicate_paragraph_fraction=maybe(rng.uniform(0, 1)),
        max_duplicate_line_char_fraction=maybe(rng.uniform(0, 1)),
        max_duplicate_paragraph_char_fraction=maybe(rng.uniform(0, 1)),
        max_top_ngram_char_fraction=maybe(sizes()),
        max_duplicate_ngram_char_fraction=maybe(sizes()),
    )


def test_filter_agrees_with_the_reference() -> None:
    rng = random.Random(11)
    documents = [random_document(rng) for _ in range(300)]
    rejected: Counter[str | None] = Counter()
    for _ in range(40):
        cfg = random_config(rng)
        expected = [reference_first_failure(text, cfg) for text in documents]
        assert QualityFilter(cfg).check_batch(documents) == expected
        rejected.update(expected)
    assert set(rejected) == {*RULE_ORDER, None}  # every rule got exercised


def test_batch_equals_one_by_one_across_chunks() -> None:
    rng = random.Random(3)
    words = PROSE.split()
    texts = []
    for _ in range(120):  # about 600 KB: several chunks
        count = rng.randint(20, 1200)
        texts.append(
            " ".join(rng.choice(words[: rng.randint(5, len(words))]) for _ in range(count))
        )
    texts += ["", "\n".join([PROSE] * 2), PROSE, "\u65e5\u672c " * 60]
    rng.shuffle(texts)
    cfg = FilterConfig(max_top_ngram_char_fraction={2: 0.2, 3: 0.3}, max_words=2000)
    quality = QualityFilter(cfg)
    batch = quality.check_batch(texts)
    assert batch == [quality.first_failure(text) for text in texts]
    assert len(set(batch)) > 3


DETERMINISM_SCRIPT = """
import json, random
from data_pipeline.config import FilterConfig
from data_pipeline.steps.quality import QualityFilter, top_ngram_char_fraction
from data_pipeline.steps.quality import duplicate_ngram_char_fraction
rng = random.Random(5)
vocab = ["alpha", "beta", "gamma", "delta", "#", "x", "yy"]
texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 200))) for _ in range(200)]
cfg = FilterConfig(min_words=10, min_alpha_words_ratio=None, max_symbol_word_ratio=None,
                   max_top_ngram_char_fraction={2: 0.3}, max_duplicate_ngram_char_fraction={3: 0.9})
fractions = [[top_ngram_char_fraction(t.split(), n), duplicate_ngram_char_fraction(t.split(), n)]
             for t in texts for n in (1, 2, 5)]
print(json.dumps([QualityFilter(cfg).check_batch(texts), fractions]))
"""


def test_deterministic_across_hash_seeds() -> None:
    outputs = []
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", DETERMINISM_SCRIPT],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        outputs.append(json.loads(done.stdout))
    assert outputs[0] == outputs[1]
    assert len(set(outputs[0][0])) > 1


def test_unusual_characters() -> None:
    texts = [
        "lone \ud800 surrogate",
        "nul\x00 byte",
        "emoji \U0001f600 \U0001f600",
        "e\u0301t\u00e9",
    ]
    cfg = config_with(min_alpha_words_ratio=0.9, max_top_ngram_char_fraction={1: 0.99})
    assert QualityFilter(cfg).check_batch(texts) == [reference_first_failure(t, cfg) for t in texts]
    # an emoji is a symbol: no letter, left out of the mean word length
    assert only(min_alpha_words_ratio=0.6).first_failure("emoji \U0001f600 \U0001f600") == (
        "min_alpha_words_ratio"
    )
    assert only(min_mean_word_length=5).first_failure("emoji \U0001f600") is None
