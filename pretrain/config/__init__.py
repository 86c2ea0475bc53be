"""Typed run configuration: schema, YAML loading with `extends:`, dotted overrides."""

from .errors import ConfigError
from .loader import (
    dump_config,
    load_config,
    resolve_model,
    resolve_run,
    resolve_tokenizer,
    validate_tree,
)
from .schema import (
    KilnConfig,
    ModelConfig,
    ResolvedModel,
    ResolvedT5Model,
    RunConfig,
    T5RunConfig,
    is_encoder_decoder,
)

__all__ = [
    "ConfigError",
    "KilnConfig",
    "ModelConfig",
    "ResolvedModel",
    "ResolvedT5Model",
    "RunConfig",
    "T5RunConfig",
    "dump_config",
    "is_encoder_decoder",
    "load_config",
    "resolve_model",
    "resolve_run",
    "resolve_tokenizer",
    "validate_tree",
]
