"""Typed run configuration: schema, YAML loading with `extends:`, dotted overrides."""

from .errors import ConfigError
from .loader import dump_config, load_config, validate_tree
from .schema import KilnConfig, ModelConfig

__all__ = [
    "ConfigError",
    "KilnConfig",
    "ModelConfig",
    "dump_config",
    "load_config",
    "validate_tree",
]
