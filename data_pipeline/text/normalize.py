"""Text normalisation: Unicode NFC and whitespace clean-up, idempotent and fast.

Each step is a C-level string operation (`str.replace`, `bytes.translate`, compiled regexes
with a literal prefix, `str.strip`) and is skipped when a cheap test shows it has nothing to
do, so clean text costs a few scans. `normalize_text(normalize_text(x)) == normalize_text(x)`
for every `x`: the whitespace steps run in an order where no step creates work for an earlier
one, and NFC runs last, because removing a control character can bring a base letter next to
its combining mark (NFC never produces a space, tab, newline or control character).
"""

from __future__ import annotations

import re
import unicodedata
from operator import methodcaller
from typing import Any

import numpy as np

from data_pipeline.config import NormalizeConfig

# Category Cc without "\t" and "\n" ("\r" has become "\n" before), and U+FEFF (byte order
# mark, zero-width no-break space).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]+")
_ASCII_CONTROLS = bytes([*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F])
_BLANK_LINE_RUN = re.compile("\n\n\n+")
_RSTRIP_BLANKS = methodcaller("rstrip", " \t")


def normalize_text(text: str, cfg: NormalizeConfig) -> str:
    """`text` normalised as `cfg` asks: `clean_whitespace` (`whitespace`), then NFC
    (`unicode_nfc`)."""
    if cfg.whitespace:
        text = clean_whitespace(text)
    if cfg.unicode_nfc:
        text = unicodedata.normalize("NFC", text)
    return text


def clean_whitespace(text: str) -> str:
    """Line ends as "\\n"; control characters (category Cc, but "\\t" and "\\n") and U+FEFF
    removed; no spaces or tabs at line ends; at most one blank line in a row; no blank lines
    at the start or the end, and no final newline. The first line keeps its indentation."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if has_control_characters(text):
        text = _CONTROL.sub("", text)
    if " \n" in text or "\t\n" in text or text.endswith((" ", "\t")):
        text = "\n".join(map(_RSTRIP_BLANKS, text.split("\n")))
    if "\n\n\n" in text:
        text = _BLANK_LINE_RUN.sub("\n\n", text)
    if text.startswith("\n") or text.endswith("\n"):
        text = text.strip("\n")
    return text


def has_control_characters(text: str) -> bool:
    """Whether `text` holds a control character (category Cc) other than "\\t" and "\\n", or
    U+FEFF. Tested on the UTF-8 bytes, where an ASCII control byte is always that character
    and a C1 control is 0xC2 followed by 0x80-0x9F."""
    if "\ufeff" in text:
        return True
    data = text.encode("utf-8", "surrogatepass")
    if len(data.translate(None, _ASCII_CONTROLS)) != len(data):
        return True
    if text.isascii() or b"\xc2" not in data:
        return False
    octets = np.frombuffer(data, np.uint8)
    follows_c2 = octets[1:][octets[:-1] == 0xC2]
    return bool((follows_c2 < 0xA0).any())


EMPTY_RULE = "empty_after_normalize"


class Normalize:
    """The normalisation step: counts the documents it changed, and removes (counted under
    `empty_after_normalize`) those left with nothing but whitespace."""

    name = "normalize"

    def __init__(self, cfg: NormalizeConfig) -> None:
        self.cfg = cfg
        self.seen = self.changed = self.emptied = 0

    def apply(self, texts: list[str]) -> list[str | None]:
        """Each text normalised, or None where nothing but whitespace is left."""
        out: list[str | None] = []
        for text in texts:
            normalized = normalize_text(text, self.cfg)
            self.changed += normalized != text
            if normalized.strip():
                out.append(normalized)
            else:
                out.append(None)
                self.emptied += 1
        self.seen += len(texts)
        return out

    def report(self) -> dict[str, Any]:
        removed = {EMPTY_RULE: self.emptied} if self.emptied else {}
        return {"step": self.name, "in": self.seen, "changed": self.changed, "removed": removed}
