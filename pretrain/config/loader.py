"""Read a run configuration: YAML files that may extend others, then dotted command-line overrides.

    cfg = load_config("configs/train/tiny.yaml", ["model.num_layers=4", "parallel.tensor=2"])

`extends:` is a list of paths relative to the file (or one path); the files are merged in order,
then the file's own keys on top: later keys win, mappings merge key by key, lists and scalars
are replaced. Each override `a.b.c=value` is typed by the schema: text fields keep the value as
written, every other field reads it as YAML (`4`, `1e-3`, `true`, `null`, `[1, 2]`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from data_pipeline.config import ResolvedTokenizer, TokenizerConfig

from .errors import ConfigError, describe
from .introspect import field_annotation, is_optional, takes_text
from .schema import (
    KilnConfig,
    ModelConfig,
    ResolvedModel,
    ResolvedT5Model,
    RunConfig,
    T5RunConfig,
)

Tree = dict[str, Any]
Section = TypeVar("Section", bound=BaseModel)


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2's floats without a dot (`1e-3`), which YAML 1.1
    reads as text: learning rates are written that way."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


def load_config(
    path: str | Path, overrides: Sequence[str] = (), world_size: int | None = None
) -> KilnConfig:
    """Load, override and validate. Raises ConfigError (one line) on any problem."""
    tree = read_tree(Path(path))
    apply_overrides(tree, overrides)
    return validate_tree(tree, world_size)


def validate_tree(tree: Tree, world_size: int | None = None) -> KilnConfig:
    if world_size is not None and world_size < 1:
        raise ConfigError(f"world size = {world_size}: must be at least 1")
    try:
        return KilnConfig.model_validate(tree, context={"world_size": world_size})
    except ValidationError as error:
        raise ConfigError(describe(error, KilnConfig)) from None


def resolve_run(cfg: KilnConfig) -> RunConfig:
    """A training run's configuration: `cfg`, validated, with its model section and every
    value validation derived typed as resolved (a t5's: a `T5RunConfig`). ConfigError when
    there is no model section."""
    if cfg.model is None:
        raise ConfigError("model = None: a training configuration needs a model section")
    kind = T5RunConfig if cfg.model.encoder_decoder else RunConfig
    # The world size it was validated for: parallel.data is checked against it again.
    return _as_resolved(kind, cfg.model_dump(), {"world_size": cfg.world_size})


def resolve_model(model: ModelConfig) -> ResolvedModel:
    """A validated model section typed as resolved (a t5's: a `ResolvedT5Model`)."""
    kind = ResolvedT5Model if model.encoder_decoder else ResolvedModel
    return _as_resolved(kind, model.model_dump())


def resolve_tokenizer(tokenizer: TokenizerConfig) -> ResolvedTokenizer:
    """The tokenizer section of a validated configuration typed as resolved (its size)."""
    return _as_resolved(ResolvedTokenizer, tokenizer.model_dump())


def _as_resolved(kind: type[Section], tree: Tree, context: dict | None = None) -> Section:
    """Validate `tree`, the dump of a validated section, as its resolved type. Validation
    resolves nothing new there; it checks that every derived value is set."""
    try:
        return kind.model_validate(tree, context=context)
    except ValidationError as error:
        raise ConfigError(describe(error, kind)) from None


def read_tree(path: Path, _seen: tuple[Path, ...] = ()) -> Tree:
    """The merged mapping of `path` and everything it extends."""
    path = path.resolve()
    if path in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path))
        raise ConfigError(f"{path}: extends itself ({chain})")
    if not path.is_file():
        raise ConfigError(f"{path}: configuration file not found")
    try:
        tree = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML{_yaml_where(error)}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read ({error})") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    parents = tree.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"{path}: extends = {parents!r}: must be a path or a list of paths")
    merged: Tree = {}
    for parent in parents:
        merged = merge(merged, read_tree(path.parent / parent, (*_seen, path)))
    return merge(merged, tree)


def merge(base: Tree, top: Tree) -> Tree:
    """Keys of `top` win; mappings present in both are merged recursively."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(tree: Tree, overrides: Iterable[str]) -> None:
    for override in overrides:
        key, sep, raw = override.partition("=")
        keys = tuple(k.strip() for k in key.split("."))
        if not sep or not all(keys):
            raise ConfigError(f"override {override!r}: must look like section.key=value")
        _set(tree, keys, parse_value(keys, raw), override)


def parse_value(keys: tuple[str, ...], raw: str) -> Any:
    """Type an override's text by the schema field it names."""
    annotation = field_annotation(KilnConfig, keys)
    if annotation is not None and takes_text(annotation):
        if raw in ("null", "~") and is_optional(annotation):
            return None
        return raw
    try:
        return parse_yaml(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw  # the schema rejects it with a message naming the key


def _set(tree: Tree, keys: tuple[str, ...], value: Any, override: str) -> None:
    node: Any = tree
    for depth, key in enumerate(keys[:-1]):
        child = _child(node, key)
        if child is None:
            child = {}
            _put(node, key, child, override)
        elif not isinstance(child, dict | list):
            where = ".".join(keys[: depth + 1])
            raise ConfigError(f"override {override!r}: {where} is a value, not a section")
        node = child
    _put(node, keys[-1], value, override)


def _child(node: Tree | list, key: str) -> Any:
    if isinstance(node, list):
        return node[int(key)] if key.isdigit() and int(key) < len(node) else None
    return node.get(key)


def _put(node: Tree | list, key: str, value: Any, override: str) -> None:
    if isinstance(node, list):
        if not key.isdigit() or int(key) >= len(node):
            raise ConfigError(f"override {override!r}: index {key} is outside the list")
        node[int(key)] = value
    else:
        node[key] = value


def _yaml_where(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or ""
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{where}: {problem}" if problem else where


def dump_config(cfg: KilnConfig) -> str:
    """The resolved configuration as YAML, sections in schema order."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False)
