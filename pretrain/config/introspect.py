"""Walk the schema by key path: which section model, and which field type, a dotted key names."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel


def _without_none(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _step(annotation: Any, key: str | int) -> tuple[Any, bool]:
    """The annotation one key below `annotation`, and whether the key exists there."""
    for option in _without_none(annotation):
        if isinstance(option, type) and issubclass(option, BaseModel):
            field = option.model_fields.get(str(key))
            if field is not None:
                return field.annotation, True
        elif typing.get_origin(option) is list and (isinstance(key, int) or str(key).isdigit()):
            return typing.get_args(option)[0], True
    return None, False


def field_annotation(root: type[BaseModel], keys: tuple[str | int, ...]) -> Any | None:
    """The type annotation of the field at `keys`, or None when no such field exists."""
    annotation: Any = root
    for key in keys:
        annotation, found = _step(annotation, key)
        if not found:
            return None
    return annotation


def section_at(root: type[BaseModel], keys: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The section model found at `keys` (the root for an empty path)."""
    annotation = field_annotation(root, keys) if keys else root
    for option in _without_none(annotation):
        if isinstance(option, type) and issubclass(option, BaseModel):
            return option
    return None


def takes_text(annotation: Any) -> bool:
    """True when the field holds text, so an override's value is kept as written."""
    options = _without_none(annotation)
    if not options:
        return False
    for option in options:
        if option is str:
            continue
        if typing.get_origin(option) is Literal and all(
            isinstance(v, str) for v in typing.get_args(option)
        ):
            continue
        return False
    return True


def is_optional(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(
        None
    ) in typing.get_args(annotation)
