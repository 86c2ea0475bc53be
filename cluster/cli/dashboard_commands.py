"""`kiln dashboard [RUNS_DIR] [--port P] [--host H]`: TensorBoard over every run, live.

Every training run writes TensorBoard event files into its directory (`tensorboard/`), and a
data preparation into its output directory, so one TensorBoard over the runs directory shows
them all, each under its own path, updating as they log. It serves on loopback unless `--host`
says otherwise (TensorBoard has no authentication). Runs that also log to MLflow are named with
the command that shows them.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

from data_pipeline.errors import KilnError
from pretrain.config import ConfigError

LOOPBACK = "127.0.0.1"


def add_parser(commands: argparse._SubParsersAction) -> None:
    dashboard = commands.add_parser(
        "dashboard", help="Serve TensorBoard over every run's metrics, live."
    )
    dashboard.add_argument(
        "runs_dir", nargs="?", default="runs", metavar="RUNS_DIR", help="Default runs/."
    )
    dashboard.add_argument("--port", type=int, default=6006, help="Default 6006; 0 picks one.")
    dashboard.add_argument(
        "--host", default=LOOPBACK, help=f"Address to bind; default {LOOPBACK} (loopback only)."
    )
    dashboard.set_defaults(handler=_dashboard)


def event_directories(root: Path) -> list[Path]:
    """The directories under `root` holding TensorBoard event files."""
    return sorted({path.parent for path in root.rglob("events.out.tfevents.*")})


def mlflow_commands(root: Path) -> list[str]:
    """How to see the runs under `root` that log to MLflow: a server's address, or the
    `mlflow ui` command for a local store."""
    import yaml

    seen: dict[str, str] = {}
    for config in sorted(root.glob("*/config.yaml")):
        try:
            tree = yaml.safe_load(config.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        uri = ((tree.get("logging") or {}).get("mlflow") or {}).get("tracking_uri")
        if uri and uri not in seen:
            local = not uri.startswith(("http://", "https://", "databricks"))
            seen[uri] = f"mlflow ui --backend-store-uri {uri}" if local else f"open {uri}"
    return list(seen.values())


def _dashboard(args: argparse.Namespace) -> int:
    root = Path(args.runs_dir)
    if not root.is_dir():
        raise ConfigError(f"RUNS_DIR = {root}: no such directory")
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port = {args.port}: must be between 0 and 65535")
    from tensorboard import program

    board = program.TensorBoard()
    board.configure(logdir=str(root.resolve()), port=args.port, host=args.host, reload_interval=5.0)
    try:
        url = board.launch()
    except program.TensorBoardServerException as error:  # e.g. the port is taken
        raise KilnError(error.msg) from None
    runs = event_directories(root)
    print(f"TensorBoard: {url} ({len(runs)} run(s) under {root} so far; new ones appear live)")
    if args.host != LOOPBACK:
        print(f"kiln dashboard: serving on {args.host}: anyone who reaches it sees the runs")
    for command in mlflow_commands(root):
        print(f"MLflow: {command}")
    print("Ctrl-C stops it.", flush=True)
    threading.Event().wait()  # TensorBoard serves from its own threads
    return 0
