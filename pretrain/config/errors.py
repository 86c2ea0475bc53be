"""Turn configuration problems into one sentence naming the key, the value and the rule."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from data_pipeline.config_base import RULE_ERROR
from data_pipeline.errors import KilnError

from .introspect import section_at


class ConfigError(KilnError):
    """An invalid configuration. `str(error)` is one line fit for a user's terminal."""

    heading = "invalid configuration"


def dotted(loc: tuple[str | int, ...]) -> str:
    """('data', 'blend', 0, 'weight') -> 'data.blend[0].weight'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def show_value(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "{...}"
    if isinstance(value, list):
        return "[...]" if value else "[]"
    return str(value)


def describe(error: ValidationError, root: type[BaseModel]) -> str:
    """The first problem of a pydantic ValidationError as one line; later ones are counted."""
    problems = error.errors()
    first = problems[0]
    loc = tuple(p for p in first["loc"] if not _is_union_tag(p))
    if first["type"] == RULE_ERROR:
        ctx = first["ctx"]
        key = ".".join(filter(None, (dotted(loc), ctx["key"])))
        line = f"{key} = {show_value(ctx['value'])}: {ctx['rule']}"
    elif first["type"] == "extra_forbidden":
        line = f"{dotted(loc)} = {show_value(first['input'])}: unknown key"
        suggestion = _did_you_mean(root, loc)
        if suggestion:
            line += f"; did you mean {suggestion}?"
    elif first["type"] == "missing":
        line = f"{dotted(loc)}: required key is missing"
    else:
        message = first["msg"][0].lower() + first["msg"][1:]
        line = f"{dotted(loc)} = {show_value(first['input'])}: {message}"
    if len(problems) > 1:
        line += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return line


def _is_union_tag(part: str | int) -> bool:
    # pydantic names the branch of `X | None` it tried in the location, e.g. 'ModelConfig'.
    return isinstance(part, str) and part[:1].isupper()


def _did_you_mean(root: type[BaseModel], loc: tuple[str | int, ...]) -> str | None:
    section = section_at(root, loc[:-1])
    if section is None or not isinstance(loc[-1], str):
        return None
    close = difflib.get_close_matches(loc[-1], list(section.model_fields), n=1, cutoff=0.6)
    return dotted((*loc[:-1], close[0])) if close else None
