"""Text normalisation: whitespace clean-up, control characters, NFC, idempotence."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest

from data_pipeline.config import NormalizeConfig
from data_pipeline.text.normalize import has_control_characters, normalize_text

BOTH = NormalizeConfig()
WHITESPACE_ONLY = NormalizeConfig(unicode_nfc=False)
NFC_ONLY = NormalizeConfig(whitespace=False)
NEITHER = NormalizeConfig(unicode_nfc=False, whitespace=False)

COMPOSED = "caf\u00e9"  # é as one code point
DECOMPOSED = "cafe\u0301"  # e + combining acute accent


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("a\r\nb\r\nc", "a\nb\nc"),
        ("a\rb\rc", "a\nb\nc"),
        ("a\r\r\nb", "a\n\nb"),
        ("a  \nb\t\nc \t ", "a\nb\nc"),
        ("a b\tc", "a b\tc"),
        ("a\n\n\n\nb", "a\n\nb"),
        ("a\n  \n\t\n\nb", "a\n\nb"),
        ("a\n\nb", "a\n\nb"),
        ("\ufeffhello", "hello"),
        ("zero\ufeffwidth", "zerowidth"),
        ("a\x00b\x07c\x1bd\x7fe\x85f\x9fg", "abcdefg"),
        ("tab\tkept", "tab\tkept"),
        ("\x0cpage\x0b", "page"),
        ("\n\n  \nline\n\n", "line"),
        ("\n\n    def f():\n        return 1\n", "    def f():\n        return 1"),
        ("   \n  indented", "  indented"),
        ("", ""),
        ("  \n\t\n", ""),
        ("\u00a0nbsp\u00a0", "\u00a0nbsp\u00a0"),
        ("line\u2028separator", "line\u2028separator"),
    ],
)
def test_whitespace(raw: str, clean: str) -> None:
    assert normalize_text(raw, WHITESPACE_ONLY) == clean
    assert normalize_text(raw, BOTH) == clean


def test_trailing_blanks_then_no_new_trailing_blank_from_a_control_character() -> None:
    assert normalize_text("a \x01\nb\t\x02", BOTH) == "a\nb"


def test_nfc_composes() -> None:
    assert normalize_text(DECOMPOSED, BOTH) == COMPOSED
    assert normalize_text(COMPOSED, BOTH) == COMPOSED
    assert normalize_text(DECOMPOSED, NFC_ONLY) == COMPOSED
    assert normalize_text(DECOMPOSED, WHITESPACE_ONLY) == DECOMPOSED


def test_nfc_after_removing_a_control_character_between_letter_and_mark() -> None:
    assert normalize_text("e\x00\u0301", BOTH) == "\u00e9"


def test_switched_off() -> None:
    raw = "\ufeff  a  \r\n\n\n\nb\x00" + DECOMPOSED
    assert normalize_text(raw, NEITHER) == raw
    assert normalize_text(raw, NFC_ONLY) == raw[: -len(DECOMPOSED)] + COMPOSED


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain ascii\n\ttab", False),
        ("caf\u00e9 \u00a0 \u00b0 \u00bf", False),  # Latin-1 letters: 0xC2/0xC3 lead bytes
        ("a\x00", True),
        ("a\r", True),
        ("\u0085", True),
        ("\u0080x", True),
        ("\u009f", True),
        ("\u00a0\u0085", True),
        ("bom\ufeff", True),
        ("\ud800 lone surrogate", False),
    ],
)
def test_has_control_characters(text: str, expected: bool) -> None:
    assert has_control_characters(text) is expected


ALPHABET = ["a", "b", " ", "  ", "\t", "\n", "\r", "\r\n", "\x00", "\x1f", "\x85", "\ufeff",
            "e", "\u0301", "\u00e9", "\u00a0", "日", "\u2028", "-", "\x0c"]  # fmt: skip


def test_idempotent_on_random_texts() -> None:
    rng = random.Random(1234)
    for _ in range(500):
        raw = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))
        for cfg in (BOTH, WHITESPACE_ONLY, NFC_ONLY):
            once = normalize_text(raw, cfg)
            assert normalize_text(once, cfg) == once, (raw, cfg)
        clean = normalize_text(raw, BOTH)
        assert "\r" not in clean and "\n\n\n" not in clean
        assert not clean.startswith("\n") and not clean.endswith(("\n", " ", "\t"))
        assert " \n" not in clean and "\t\n" not in clean
        assert not has_control_characters(clean)


def test_idempotent_on_standard_library_sources() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:40]
    assert files
    for path in files:
        once = normalize_text(path.read_text("utf-8", errors="replace"), BOTH)
        assert normalize_text(once, BOTH) == once
        assert once.lstrip("\n") == once
