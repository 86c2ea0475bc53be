"""The base of every Kiln configuration section (data, tokenizer, model, training, cluster ...)
and the error a cross-field rule raises.

It sits in the bottom layer so that `data_pipeline.config` (the `data` and `tokenizer`
sections) and `pretrain.config` (the rest, and the whole run's configuration) share it, and
`pretrain.config.errors` turns a `RULE_ERROR` into one line naming the key, value and rule.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError

RULE_ERROR = "kiln_rule"


def rule_violation(key: str, value: Any, rule: str) -> PydanticCustomError:
    """An error for a cross-field rule: `key` is relative to the section that raises it."""
    return PydanticCustomError(
        RULE_ERROR, "{key} = {value}: {rule}", {"key": key, "value": value, "rule": rule}
    )


class ConfigSection(BaseModel):
    """Base of every configuration section: unknown keys and wrong types are errors
    (strict: `true` is not an integer and `"4"` is not a number), never ignored or coerced."""

    model_config = ConfigDict(extra="forbid", strict=True)
