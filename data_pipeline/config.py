"""Configuration sections owned by the data pipeline: `data` and `tokenizer`.

`pretrain.config` composes these into the full run configuration; the data pipeline never
imports `pretrain`, so the shared base class and the rule-violation helper live here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator
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


class BlendEntry(ConfigSection):
    """One shard set in a weighted blend."""

    path: str
    weight: PositiveFloat = 1.0


class DataConfig(ConfigSection):
    """Where the training shards are: one prepared directory, or a weighted blend of several."""

    path: str | None = Field(
        default=None, description="Directory written by `kiln data prepare` (shards + manifest)."
    )
    blend: list[BlendEntry] | None = Field(
        default=None, description="Several prepared directories mixed by weight."
    )

    @model_validator(mode="after")
    def _path_or_blend(self) -> DataConfig:
        if self.path is not None and self.blend is not None:
            raise rule_violation("blend", self.blend, "give data.path or data.blend, not both")
        if self.blend is not None and not self.blend:
            raise rule_violation("blend", self.blend, "a blend needs at least one entry")
        return self


class TokenizerConfig(ConfigSection):
    """The tokenizer: trained by the data pipeline, or loaded from an existing tokenizer.json."""

    vocab_size: int | None = Field(
        default=None,
        ge=256,
        description="Vocabulary size to train; defaults to model.vocab_size (32000 without one).",
    )
    path: str | None = Field(
        default=None, description="An existing tokenizer.json to load instead of training one."
    )
