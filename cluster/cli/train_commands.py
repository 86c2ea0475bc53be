"""`kiln train CONFIG [key=value ...] [--nproc N] [--run-dir DIR] [--no-resume]` and
`kiln generate RUN_DIR_OR_CHECKPOINT --prompt TEXT ...` (an encoder: fill its `<mask>` tokens).

`kiln train` validates the whole configuration and the data before any process starts, writes
the resolved configuration into the run directory, and starts N local ranks of
`pretrain.train.main` (the cluster launchers start the same module on many nodes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cluster.launch.plan import RANK_MODULE
from cluster.rundir import check_trainable, prepare_run_dir
from pretrain.config import load_config, resolve_run
from pretrain.config.errors import ConfigError

from .config_commands import add_config_arguments


def add_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="Train a model on prepared shards.")
    add_config_arguments(train, world_size=False)
    train.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="Local processes; default tensor x pipeline x (parallel.data or 1).",
    )
    train.add_argument(
        "--run-dir", type=Path, default=None, metavar="DIR", help="Default runs/<config name>."
    )
    train.add_argument(
        "--no-resume",
        action="store_true",
        help="Refuse to start when the run directory already holds a checkpoint.",
    )
    train.set_defaults(handler=_train)

    generate = commands.add_parser(
        "generate",
        help="Sample text from a trained checkpoint; an encoder fills the prompt's <mask> tokens.",
    )
    generate.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT")
    generate.add_argument("--prompt", required=True, metavar="TEXT")
    generate.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    generate.add_argument("--temperature", type=float, default=0.8, metavar="T")
    generate.add_argument(
        "--top-k",
        type=int,
        default=None,
        metavar="K",
        help="Sample from the K most likely tokens; an encoder: candidates shown per mask (5).",
    )
    generate.add_argument("--top-p", type=float, default=None, metavar="P")
    generate.add_argument("--seed", type=int, default=0, metavar="S")
    generate.set_defaults(handler=_generate)


def _train(args: argparse.Namespace) -> int:
    from cluster.launch.local import launch_local

    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc = {args.nproc}: must be at least 1")
    cfg = resolve_run(load_config(args.config, args.overrides, world_size=args.nproc))
    check_trainable(cfg)
    run_dir = args.run_dir or Path("runs") / Path(args.config).stem
    prepare_run_dir(cfg, run_dir, resume=not args.no_resume)
    refuse_unreadable_checkpoint(run_dir)
    command = [sys.executable, "-m", RANK_MODULE, "--run-dir", str(run_dir)]
    return launch_local(command, cfg.world_size, log_dir=run_dir / "logs")


def refuse_unreadable_checkpoint(run_dir: Path) -> None:
    """A checkpoint this Kiln cannot resume (an older format) is refused before any rank
    starts, in one line."""
    from pretrain.startup import quiet_imports

    quiet_imports()
    from pretrain.train.checkpoint import latest_checkpoint
    from pretrain.train.weights import read_description

    latest = latest_checkpoint(run_dir / "checkpoints")
    if latest is not None:
        read_description(latest)  # CheckpointError (one line) for one Kiln cannot read


def _generate(args: argparse.Namespace) -> int:
    from pretrain.startup import quiet_imports

    quiet_imports()
    from pretrain.generate import generate_text

    text = generate_text(
        Path(args.checkpoint),
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    print(text)
    return 0
