"""`kiln config show|validate CONFIG [key=value ...] [--world-size N]`."""

from __future__ import annotations

import argparse

from pretrain.config import KilnConfig, dump_config, load_config, resolve_model
from pretrain.config.schema import recommended_zero_stage, zero_stage_reason
from pretrain.model.sizing import count_parameters, human_count, padded_vocab_size


def add_parser(commands: argparse._SubParsersAction) -> None:
    config = commands.add_parser("config", help="Show or validate a run configuration.")
    actions = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser(
        "show", help="Print the resolved configuration and the model's parameter count."
    )
    validate = actions.add_parser(
        "validate", help="Check every rule; exit 0 when the configuration is valid, 2 if not."
    )
    for sub, handler in ((show, _show), (validate, _validate)):
        add_config_arguments(sub)
        sub.set_defaults(handler=handler)


def add_config_arguments(parser: argparse.ArgumentParser, world_size: bool = True) -> None:
    """CONFIG, key=value overrides (and --world-size): shared by every command taking a config."""
    parser.add_argument("config", metavar="CONFIG", help="YAML file, e.g. configs/train/tiny.yaml")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="Dotted overrides typed by the schema, e.g. model.num_layers=4 parallel.tensor=2",
    )
    if not world_size:
        return
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        metavar="N",
        help="Total processes; default: cluster.nodes x processes per node, "
        "else tensor x pipeline x (parallel.data or 1).",
    )


def _load(args: argparse.Namespace) -> KilnConfig:
    return load_config(args.config, args.overrides, world_size=args.world_size)


def describe_parallel_config(cfg: KilnConfig) -> str:
    """The configuration's world size and how `parallel` splits it, for `kiln config`."""
    par = cfg.parallel
    return (
        f"world size {cfg.world_size} = tensor {par.tensor} x pipeline {par.pipeline} "
        f"x data {par.data}; ZeRO stage {par.zero_stage}"
    )


def describe_zero_stage(cfg: KilnConfig) -> str:
    """The recommended ZeRO stage for this precision and pipeline, and why."""
    reason = zero_stage_reason(cfg.train.precision, cfg.parallel.pipeline)
    chosen = cfg.parallel.zero_stage
    recommended = recommended_zero_stage(cfg.train.precision, cfg.parallel.pipeline)
    setting = cfg.train.precision + (
        " with pipeline parallelism" if cfg.parallel.pipeline > 1 else ""
    )
    verdict = "" if chosen == recommended else f"; this configuration sets {chosen}"
    return f"ZeRO stage {recommended} is recommended for {setting}{verdict}: {reason}"


def describe_parameters(cfg: KilnConfig) -> str | None:
    if cfg.model is None:
        return None
    model = resolve_model(cfg.model)
    n = count_parameters(model)
    text = f"{human_count(n)} ({n:,})"
    padded = padded_vocab_size(model.vocab_size, cfg.parallel.tensor)
    if padded != model.vocab_size:
        n_padded = count_parameters(model, vocab_size=padded)
        text += f"; {n_padded:,} with the vocabulary padded to {padded:,} rows"
    return text


def _show(args: argparse.Namespace) -> int:
    cfg = _load(args)
    print(dump_config(cfg), end="")
    print(f"# {describe_parallel_config(cfg)}")
    print(f"# {describe_zero_stage(cfg)}")
    parameters = describe_parameters(cfg)
    if parameters:
        print(f"# parameters: {parameters}")
    print(describe_filters(), end="")
    return 0


def describe_filters() -> str:
    """What each `data.filters` rule measures, as YAML comments."""
    from data_pipeline.config import FilterConfig

    lines = ["# data.filters: what each rule measures (null switches it off)"]
    for name, field in FilterConfig.model_fields.items():
        if field.description:
            lines.append(f"#   {name}: {field.description}")
    return "\n".join(lines) + "\n"


def _validate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    parameters = describe_parameters(cfg)
    suffix = f"; {parameters} parameters" if parameters else ""
    print(f"{args.config}: valid ({describe_parallel_config(cfg)}{suffix})")
    return 0
