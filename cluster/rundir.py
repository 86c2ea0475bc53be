"""A run directory as `kiln train` and `kiln submit` prepare it, before any process starts.

DIR/config.yaml       the resolved configuration every rank reads
DIR/tokenizer.json    the data's tokenizer (generation and export need it)
DIR/submission.json   where the run was submitted: scheduler, job id, time, script
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pretrain.config import KilnConfig, RunConfig, dump_config
from pretrain.config.errors import ConfigError

SUBMISSION = "submission.json"
Config = TypeVar("Config", bound=KilnConfig)


def check_trainable(cfg: RunConfig) -> None:
    """What must hold before processes start (besides a model, which `resolve_run` made
    sure of): prepared data where the configuration says, with the tokens the model's
    objective needs."""
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
        if cfg.model.arch == "bert":  # the masked-LM objective needs the mask token
            from pretrain.data.masking import Masker, MaskingError

            try:
                Masker.for_tokenizer(Path(path) / "tokenizer.json", cfg.masking, cfg.train.seed)
            except MaskingError as error:
                raise ConfigError(str(error)) from None
        if cfg.model.encoder_decoder:  # span corruption needs the start token and sentinels
            from pretrain.data.spans import SpanCorruptionError, SpanCorruptor

            try:
                SpanCorruptor.for_tokenizer(
                    Path(path) / "tokenizer.json", cfg.spans, cfg.tokenizer.eos_token, 0
                )
            except SpanCorruptionError as error:
                raise ConfigError(str(error)) from None


def with_absolute_data_paths(cfg: Config) -> Config:
    """`cfg` with data.path and the data.blend paths made absolute (a copy; `cfg` is left as
    it is). The ranks read the run directory's config.yaml from wherever their launcher
    starts them (another working directory, another node), so a path relative to this
    process's working directory would name other data there, or none."""
    data = cfg.data
    absolute = data.model_copy(
        update={
            "path": str(Path(data.path).resolve()) if data.path else None,
            "blend": None
            if data.blend is None
            else [
                entry.model_copy(update={"path": str(Path(entry.path).resolve())})
                for entry in data.blend
            ],
        }
    )
    return cfg.model_copy(update={"data": absolute})


def prepare_run_dir(cfg: RunConfig, run_dir: Path, resume: bool) -> RunConfig:
    """Write the resolved configuration, its data paths made absolute
    (`with_absolute_data_paths`), and the tokenizer; check a resumed run's shape. Returns
    the configuration as written, the one every rank reads."""
    from data_pipeline.atomic import write_text

    checkpoint_pointer = run_dir / "checkpoints" / "latest"
    if checkpoint_pointer.is_file():
        if not resume:
            raise ConfigError(
                f"--run-dir = {run_dir}: holds a checkpoint and --no-resume was given; "
                "choose another run directory or remove it"
            )
        # The layout may change (the checkpoint reshards); the model may not.
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(
                f"--run-dir = {run_dir}: holds checkpoints but no config.yaml; it was not "
                "written by `kiln train`"
            )
        previous = yaml.safe_load((run_dir / "config.yaml").read_text())
        before, after = previous["model"], cfg.model_dump(mode="json")["model"]
        for field in sorted(set(before) | set(after)):
            if before.get(field) != after.get(field):
                raise ConfigError(
                    f"model.{field} = {after.get(field)}: the checkpoint in {run_dir} was "
                    f"trained with {before.get(field)}; resume with the same model or use "
                    "another --run-dir"
                )
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = with_absolute_data_paths(cfg)
    write_text(run_dir / "config.yaml", dump_config(cfg))
    data_dir = Path(cfg.data.path or cfg.data.blend[0].path)
    manifest = yaml.safe_load((data_dir / "manifest.json").read_text())
    shutil.copyfile(data_dir / manifest["tokenizer"]["file"], run_dir / ".tokenizer.json.tmp")
    (run_dir / ".tokenizer.json.tmp").replace(run_dir / "tokenizer.json")
    return cfg


def write_submission(run_dir: Path, **fields: Any) -> dict:
    record = {"submitted_at": datetime.now(UTC).isoformat(timespec="seconds"), **fields}
    tmp = run_dir / f".{SUBMISSION}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(run_dir / SUBMISSION)
    return record


def read_submission(run_dir: Path) -> dict | None:
    path = Path(run_dir) / SUBMISSION
    return json.loads(path.read_text()) if path.is_file() else None
