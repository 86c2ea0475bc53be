"""What flows between the data pipeline's steps: documents, and records that could not be read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Document:
    """One document as read. `location` names where it came from inside `source`:
    `line 12` for JSON Lines and per-line text, `row 7` for Parquet, `file` for a whole file."""

    source: str
    location: str
    text: str


@dataclass(frozen=True, slots=True)
class Malformed:
    """A record that is not a usable document. It is counted and quarantined, never dropped."""

    source: str
    location: str
    reason: str
    preview: str = ""  # at most a few hundred characters of the raw record, for a human


Record = Document | Malformed
