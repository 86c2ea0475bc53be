"""`kiln train CONFIG [key=value ...] [--nproc N] [--run-dir DIR] [--no-resume]` and
`kiln generate RUN_DIR_OR_CHECKPOINT --prompt TEXT ...`.

`kiln train` validates the whole configuration and the data before any process starts, writes
the resolved configuration into the run directory, and starts N local ranks of
`pretrain.train.main` (the cluster launchers start the same module on many nodes).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

from pretrain.config import KilnConfig, dump_config, load_config
from pretrain.config.errors import ConfigError

from .config_commands import add_config_arguments

RANK_MODULE = "pretrain.train.main"


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

    generate = commands.add_parser("generate", help="Sample text from a trained checkpoint.")
    generate.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT")
    generate.add_argument("--prompt", required=True, metavar="TEXT")
    generate.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    generate.add_argument("--temperature", type=float, default=0.8, metavar="T")
    generate.add_argument("--top-k", type=int, default=None, metavar="K")
    generate.add_argument("--top-p", type=float, default=None, metavar="P")
    generate.add_argument("--seed", type=int, default=0, metavar="S")
    generate.set_defaults(handler=_generate)


def _train(args: argparse.Namespace) -> int:
    from cluster.launch.local import launch_local

    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc = {args.nproc}: must be at least 1")
    cfg = load_config(args.config, args.overrides, world_size=args.nproc)
    check_trainable(cfg)
    run_dir = args.run_dir or Path("runs") / Path(args.config).stem
    prepare_run_dir(cfg, run_dir, resume=not args.no_resume)
    command = [sys.executable, "-m", RANK_MODULE, "--run-dir", str(run_dir)]
    return launch_local(command, cfg.world_size, log_dir=run_dir / "logs")


def check_trainable(cfg: KilnConfig) -> None:
    """What must hold before processes start: a model, and prepared data where it says."""
    if cfg.model is None:
        raise ConfigError("model = None: a training configuration needs a model section")
    if cfg.data.blend:
        paths = [entry.path for entry in cfg.data.blend]
        key = "data.blend"
    elif cfg.data.path:
        paths, key = [cfg.data.path], "data.path"
    else:
        raise ConfigError("data.path = None: set data.path (or data.blend) to prepared shards")
    for path in paths:
        if not (Path(path) / "manifest.json").is_file():
            raise ConfigError(
                f"{key} = {path}: no manifest.json there; run `kiln data prepare` first"
            )
    cfg.data.path = str(Path(cfg.data.path).resolve()) if cfg.data.path else None
    for entry in cfg.data.blend or []:
        entry.path = str(Path(entry.path).resolve())


def prepare_run_dir(cfg: KilnConfig, run_dir: Path, resume: bool) -> None:
    """Write the resolved configuration and the tokenizer; check a resumed run's shape."""
    from data_pipeline.atomic import write_text

    checkpoint_pointer = run_dir / "checkpoints" / "latest"
    if checkpoint_pointer.is_file():
        if not resume:
            raise ConfigError(
                f"--run-dir = {run_dir}: holds a checkpoint and --no-resume was given; "
                "choose another run directory or remove it"
            )
        previous = yaml.safe_load((run_dir / "config.yaml").read_text())
        now = cfg.model_dump(mode="json")
        for key in ("model", "parallel.tensor", "parallel.pipeline"):
            section, _, field = key.partition(".")
            before = previous[section][field] if field else previous[section]
            after = now[section][field] if field else now[section]
            if before != after:
                raise ConfigError(
                    f"{key} = {after}: the checkpoint in {run_dir} was trained with "
                    f"{before}; resume with the same value or use another --run-dir"
                )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", dump_config(cfg))
    data_dir = Path(cfg.data.path or cfg.data.blend[0].path)
    manifest = yaml.safe_load((data_dir / "manifest.json").read_text())
    shutil.copyfile(data_dir / manifest["tokenizer"]["file"], run_dir / ".tokenizer.json.tmp")
    (run_dir / ".tokenizer.json.tmp").replace(run_dir / "tokenizer.json")


def _generate(args: argparse.Namespace) -> int:
    from pretrain.train.main import quiet_imports

    quiet_imports()
    from pretrain.generate import GenerationError, generate_text

    try:
        text = generate_text(
            Path(args.checkpoint),
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
    except (GenerationError, ValueError) as error:
        print(f"kiln generate: {error}", file=sys.stderr)
        return 2
    print(text)
    return 0
