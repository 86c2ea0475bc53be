"""`kiln data prepare CONFIG ...` and `kiln data inspect DIR`."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from pretrain.config import dump_config, load_config, resolve_tokenizer
from pretrain.config.errors import ConfigError

from .config_commands import add_config_arguments


def add_parser(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="Prepare corpora into training shards; inspect them.")
    actions = data.add_subparsers(dest="action", metavar="ACTION", required=True)

    prepare = actions.add_parser(
        "prepare",
        help="Read, clean, deduplicate and tokenise corpora into Megatron shards (on Ray).",
    )
    add_config_arguments(prepare, world_size=False)
    prepare.add_argument(
        "--input",
        action="append",
        metavar="PATH",
        help="A corpus (file, directory, glob, URL or stdlib://); repeatable; replaces "
        "data.inputs.",
    )
    prepare.add_argument("--output", metavar="DIR", help="Output directory; default data.path.")
    prepare.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="An existing Ray cluster (e.g. 127.0.0.1:6379); default: start Ray on this machine.",
    )
    prepare.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace data prepared earlier in DIR with another configuration.",
    )
    prepare.add_argument(
        "--keep-work",
        action="store_true",
        help="Keep DIR/.work (the stages' intermediate files) after a successful run.",
    )
    prepare.add_argument("--no-progress", action="store_true", help="No live progress display.")
    prepare.set_defaults(handler=_prepare)

    inspect = actions.add_parser("inspect", help="Show a prepared directory's manifest.")
    inspect.add_argument("directory", metavar="DIR")
    inspect.add_argument("--samples", type=int, default=3, metavar="N", help="Documents to show.")
    inspect.add_argument(
        "--plot", metavar="PNG", help="Histogram path; default DIR/document_lengths.png."
    )
    inspect.add_argument(
        "--removed",
        metavar="KIND",
        help="Show removed documents of one rule (e.g. min_words) or dedup kind "
        "(exact_duplicates, near_duplicates) instead, --samples of them.",
    )
    inspect.set_defaults(handler=_inspect)


def _prepare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from data_pipeline.atomic import write_text
    from data_pipeline.inspect import summary_tables
    from data_pipeline.runner import prepare

    overrides = list(args.overrides)
    if args.input:
        overrides.append("data.inputs=" + _yaml_list(args.input))
    if args.output:
        overrides.append(f"data.path={args.output}")
    cfg = load_config(args.config, overrides)
    if cfg.data.path is None:
        raise ConfigError("data.path = None: set data.path or pass --output DIR")
    output = Path(cfg.data.path)
    dashboard = None
    if cfg.logging.tensorboard or cfg.logging.mlflow.tracking_uri:
        from pretrain.train.tracking import check_reachable

        check_reachable(cfg.logging.mlflow.tracking_uri or "")  # TrackingError: one line
        dashboard = StageDashboard(output, cfg)
    try:
        manifest = prepare(
            cfg.data,
            resolve_tokenizer(cfg.tokenizer),
            output,
            resolved_config=cfg.model_dump(mode="json"),
            ray_address=args.ray_address,
            overwrite=args.overwrite,
            show_progress=not args.no_progress and sys.stderr.isatty(),
            keep_work=args.keep_work,
            on_stage=None if dashboard is None else dashboard.stage,
        )
        if dashboard is not None:
            dashboard.counts(manifest)
    finally:
        if dashboard is not None:
            dashboard.close()
    write_text(output / "config.yaml", dump_config(cfg))
    console = Console()
    for table in summary_tables(manifest):
        console.print(table)
    console.print(f"shards, tokenizer.json and manifest.json are in {output}")
    return 0


def _yaml_list(paths: list[str]) -> str:
    import json

    return json.dumps([{"path": p} for p in paths])


def _inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.panel import Panel

    from data_pipeline.inspect import (
        document_lengths,
        plot_length_histogram,
        read_manifest,
        sample_documents,
        summary_tables,
    )

    directory = Path(args.directory)
    manifest = read_manifest(directory)  # NotPreparedError: one line
    if args.removed:
        return _show_removed(directory, args.removed, args.samples)
    console = Console()
    for table in summary_tables(manifest):
        console.print(table)
    for index, text in enumerate(sample_documents(directory, manifest, args.samples)):
        console.print(
            Panel(_shorten(text), title=f"train document {index}", expand=False), markup=False
        )
    plot = Path(args.plot) if args.plot else directory / "document_lengths.png"
    plot_length_histogram(document_lengths(directory, manifest), plot)
    console.print(f"document length histogram: {plot}")
    return 0


def _show_removed(directory: Path, kind: str, count: int) -> int:
    from rich.console import Console
    from rich.panel import Panel

    from data_pipeline.inspect import removed_documents

    console = Console()
    for row in removed_documents(directory, kind, count):
        title = f"{kind}: {row['source']} {row['location']}"
        console.print(Panel(_shorten(row["text"]), title=title, expand=False), markup=False)
        if "repeats" in row:
            kept = row["repeats"]
            title = f"repeats the kept {kept['source']} {kept['location']}"
            console.print(Panel(_shorten(kept["text"]), title=title, expand=False), markup=False)
    return 0


def _shorten(text: str, limit: int = 800) -> str:
    return text if len(text) <= limit else text[:limit] + " [...]"


class StageDashboard:
    """A data preparation as a run of its own in the dashboards: TensorBoard (the output
    directory's tensorboard/, which `kiln dashboard` shows) and MLflow when configured. Each
    stage's seconds, amount and rate as it ends (step = the order the stages ended in), then
    the manifest's counts. A rerun (a resume after a kill) starts the TensorBoard record
    afresh (its first stage purges the earlier one's) and continues the same MLflow run. The
    sinks start at the first stage: before it the output directory is not yet claimed."""

    def __init__(self, output: Path, cfg) -> None:
        self.output, self.cfg, self.step = output, cfg, 0
        self.sinks: list = []
        self.mlflow = None
        self.finished = False  # the manifest was written: the MLflow run is FINISHED
        self.lock = threading.Lock()  # exact dedup ends on a thread of its own

    def stage(self, name: str, seconds: float, amount: int, unit: str) -> None:
        values = {f"stage/{name}/seconds": seconds}
        if amount:
            values[f"stage/{name}/{unit}"] = amount
            values[f"stage/{name}/{unit}_per_s"] = amount / max(seconds, 1e-9)
        self._log(values)

    def counts(self, manifest: dict) -> None:
        if self.step == 0:  # the job was already complete: the record of the run that did it
            return
        values = {}
        for key, value in manifest.get("counts", {}).items():
            inner = value if isinstance(value, dict) else {"": value}  # per-rule removals
            for rule, count in inner.items():
                if isinstance(count, int | float):
                    values["/".join(filter(None, ("counts", key, rule)))] = count
        self._log(values)
        self.finished = True

    def _log(self, values: dict) -> None:
        from pretrain.train.tracking import TrackingError

        with self.lock:
            if self.step == 0:
                self._start()
            self.step += 1
            for sink in list(self.sinks):
                try:
                    sink.log(values, self.step)
                except TrackingError as error:  # a dashboard outage never stops the job
                    print(f"kiln: {error}; no more MLflow logging", file=sys.stderr)
                    self.sinks.remove(sink)
                    self.mlflow = None

    def _start(self) -> None:
        from pretrain.train.tracking import MlflowSink, TensorBoardSink, TrackingError

        if self.cfg.logging.tensorboard:
            self.sinks.append(TensorBoardSink(self.output / "tensorboard", start_step=0))
        if self.cfg.logging.mlflow.tracking_uri:
            mlflow = self.cfg.logging.mlflow.model_copy(
                update={"run_name": self.cfg.logging.mlflow.run_name or "data-prepare"}
            )
            try:
                self.mlflow = MlflowSink.start(
                    self.output, mlflow, {"data": self.cfg.data.model_dump(mode="json")}
                )
            except TrackingError as error:
                print(f"kiln: {error}; no MLflow logging", file=sys.stderr)
            else:
                self.sinks.append(self.mlflow)

    def close(self) -> None:
        from pretrain.train.tracking import TrackingError

        for sink in self.sinks:
            try:
                if sink is self.mlflow:
                    sink.close(self.output, self.finished)
                else:
                    sink.close()
            except TrackingError as error:
                print(f"kiln: {error}", file=sys.stderr)
