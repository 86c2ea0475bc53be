"""Where metrics go: `metrics.jsonl` in the run directory, TensorBoard, Weights & Biases, MLflow.

`MetricsLog` appends one JSON object per line and flushes it, so a crash loses no line it
wrote; on resume, `truncate_after(step)` drops the lines past the checkpoint so each step is
logged once. `TensorBoardSink` writes event files under `run_dir/tensorboard`; a resumed run
first marks the steps past its checkpoint as purged (`SummaryWriter`'s purge_step), so
TensorBoard shows each step once. `WandbTracker` wraps `wandb` (imported only when W&B is on);
its run id lives in `run_dir/wandb_run_id`, so a resumed run continues the same W&B run.
`MlflowSink` talks to an MLflow tracking server or store through `MlflowClient` (imported only
when MLflow is on); its run id lives in `run_dir/mlflow_run_id`. Call them on one rank.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import string
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from data_pipeline.errors import KilnError
from pretrain.config.schema import MlflowConfig, WandbConfig

RUN_ID_FILE = "wandb_run_id"
RUN_ID_ALPHABET = string.ascii_lowercase + string.digits
MLFLOW_RUN_ID_FILE = "mlflow_run_id"
# What a run's MLflow artifacts are, logged at every session's end when present.
MLFLOW_ARTIFACTS = ("config.yaml", "metrics.jsonl")
MLFLOW_KEY_LIMIT, MLFLOW_VALUE_LIMIT = 250, 6000  # MLflow's longest param key and value
MLFLOW_BATCH = 1000  # metric points a log_batch request carries at most
REACH_TIMEOUT_S = 10.0


class TrackingError(KilnError):
    """A tracking server that cannot be reached or that refuses the run; one line."""


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats as None and tensor or numpy scalars as numbers."""
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Append-only JSON lines, one object per logged step."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Append {"step": step, **metrics} as one line and flush it."""
        line = json.dumps(json_safe({"step": step, **metrics}), allow_nan=False)
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(line + "\n")
        self._file.flush()

    def truncate_after(self, step: int) -> None:
        """Drop the lines whose step is past `step` (and a torn last line), atomically."""
        self.close()
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or record.get("step", step) <= step:
                kept.append(line + "\n")
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as out:
            out.writelines(kept)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class TensorBoardSink:
    """Scalars in TensorBoard event files, flushed at every step so that a dashboard shows
    them live. `start_step`: the checkpoint a run resumed from (0: a fresh start); events of
    later steps that an earlier session wrote are purged, as they are about to be rewritten."""

    def __init__(self, log_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Each finite number (booleans as 0/1) as a scalar of its own name."""
        for key, value in json_safe(metrics).items():
            if isinstance(value, bool | int | float) and value is not None:
                self.writer.add_scalar(key, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run, or nothing when `logging.wandb.mode` is `disabled`."""

    def __init__(self, run: Any = None) -> None:
        self.run = run

    @classmethod
    def start(
        cls,
        run_dir: Path,
        cfg: WandbConfig,
        config_dict: dict[str, Any],
        run_id: str | None = None,
    ) -> WandbTracker:
        """Start or resume the run whose id is `run_id`, else the one in
        `run_dir/wandb_run_id`, else a new one. Files go under `run_dir/wandb`."""
        if cfg.mode == "disabled":
            return cls()
        import wandb

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        run_id = run_id or read_run_id(run_dir) or new_run_id()
        write_run_id(run_dir, run_id)
        run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name,
            mode=cfg.mode,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            config=config_dict,
            settings=wandb.Settings(silent=True),
        )
        return cls(run)

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log the metrics that have a value (None means not measured this step)."""
        if self.run is None:
            return
        values = {key: value for key, value in metrics.items() if value is not None}
        self.run.log(values, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MlflowSink:
    """An MLflow run: the configuration as params, each logged number as a metric point of the
    step metrics.jsonl gives it (booleans as 0/1; None and text skipped), `metrics.jsonl` and
    `config.yaml` as artifacts at the end of every session.

    Resumes: MLflow cannot delete metric points, so the sink starts from the last step each
    metric already has in the run and skips points at or below it; a resumed session re-runs
    the steps past its checkpoint, which the killed session may have sent (exact resume: the
    same values). Steps metrics.jsonl holds up to the checkpoint that the run lacks (a kill
    before an upload, MLflow switched on mid-run, a server outage) are sent at the start. The
    params are those of the session that created the run (MLflow cannot change a param);
    the latest configuration is the `config.yaml` artifact. Points are buffered and sent as
    one batch every `flush_interval_s` seconds and at the end. The report of `kiln report`
    (`run_dir/report/`) is not logged: MLflow plots the same metrics itself, and a report on
    disk at a session's end is one drawn earlier."""

    def __init__(
        self,
        client: Any,
        run_id: str,
        cfg: MlflowConfig,
        last_steps: dict[str, int],
        url: str,
        resumed: bool,
    ) -> None:
        self.client, self.run_id, self.cfg, self.url = client, run_id, cfg, url
        self.last_steps = last_steps  # metric -> the last step the run has (or has pending)
        self.resumed = resumed
        self.pending: list[Any] = []
        self.flushed_at = time.monotonic()

    @classmethod
    def start(
        cls, run_dir: Path, cfg: MlflowConfig, config_dict: dict[str, Any]
    ) -> MlflowSink | None:
        """Resume the run whose id is in `run_dir/mlflow_run_id`, else start one in
        `cfg.experiment`; send the params it lacks and the steps of `run_dir/metrics.jsonl`
        it lacks. None when `cfg.tracking_uri` is None. Raises TrackingError."""
        uri = cfg.tracking_uri
        if uri is None:
            return None
        check_reachable(uri)
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError as error:
            raise TrackingError(
                f"logging.mlflow.tracking_uri = {uri}: {error}; pip install mlflow-skinny"
            ) from None
        run_dir = Path(run_dir)
        try:
            client = MlflowClient(tracking_uri=uri)
            run = _stored_run(client, read_run_id(run_dir, MLFLOW_RUN_ID_FILE))
            resumed = run is not None
            if run is None:
                run = client.create_run(
                    _experiment_id(client, cfg.experiment),
                    run_name=cfg.run_name,
                    tags={"kiln.run_dir": str(run_dir.resolve())},
                )
                write_run_id(run_dir, run.info.run_id, MLFLOW_RUN_ID_FILE)
            elif run.info.status != "RUNNING":
                client.update_run(run.info.run_id, status="RUNNING")
        except (MlflowException, ImportError, OSError) as error:
            raise TrackingError(f"logging.mlflow.tracking_uri = {uri}: {one_line(error)}") from None
        info = run.info
        url = uri
        if uri.startswith(("http://", "https://")):
            url = f"{uri.rstrip('/')}/#/experiments/{info.experiment_id}/runs/{info.run_id}"
        last_steps = {metric.key: metric.step for metric in run.data.to_proto().metrics}
        sink = cls(client, info.run_id, cfg, last_steps, url, resumed)
        sink.log_params(config_dict, set(run.data.params))
        for record in read_records(run_dir / "metrics.jsonl"):
            step = record.pop("step", None)
            if isinstance(step, int):
                sink.log(record, step, flush=False)
        sink.flush()
        return sink

    def log_params(self, config_dict: Mapping[str, Any], logged: set[str]) -> None:
        """The flattened configuration's keys that the run does not have yet."""
        from mlflow.entities import Param

        params = [
            Param(key, value)
            for key, value in flatten_params(config_dict).items()
            if key not in logged
        ]
        if params:
            self._call(self.client.log_batch, self.run_id, params=params)

    def log(self, metrics: Mapping[str, Any], step: int, flush: bool = True) -> None:
        """Buffer the numbers of a step the run does not have yet; send the buffer when
        `flush_interval_s` has passed since the last upload."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in json_safe(metrics).items():
            if not isinstance(value, bool | int | float) or step <= self.last_steps.get(key, -1):
                continue
            self.pending.append(Metric(key, float(value), now, step))
            self.last_steps[key] = step
        due = flush and time.monotonic() - self.flushed_at >= self.cfg.flush_interval_s
        if due or len(self.pending) >= MLFLOW_BATCH:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self._call(self.client.log_batch, self.run_id, metrics=self.pending)
            self.pending = []
        self.flushed_at = time.monotonic()

    def close(self, run_dir: Path, finished: bool) -> None:
        """Send what is buffered and the artifacts; mark the run FINISHED (`finished`: the
        run reached train.steps) or KILLED (stopped early, to be resumed)."""
        self.flush()
        for name in MLFLOW_ARTIFACTS:
            if (Path(run_dir) / name).is_file():
                self._call(self.client.log_artifact, self.run_id, str(Path(run_dir) / name))
        status = "FINISHED" if finished else "KILLED"
        self._call(self.client.set_terminated, self.run_id, status)

    def _call(self, method: Any, *args: Any, **kwargs: Any) -> None:
        import requests
        from mlflow.exceptions import MlflowException

        try:
            method(*args, **kwargs)
        except (MlflowException, requests.RequestException, OSError) as error:
            uri = self.cfg.tracking_uri
            raise TrackingError(f"logging.mlflow.tracking_uri = {uri}: {one_line(error)}") from None


def upload_report(run_dir: Path, cfg: MlflowConfig, report_dir: Path) -> str | None:
    """Log `report_dir` (what `kiln report` drew) as the run's MLflow artifacts under report/;
    the MLflow run id, or None when the run does not log to MLflow. Raises TrackingError."""
    run_id = read_run_id(Path(run_dir), MLFLOW_RUN_ID_FILE)
    if cfg.tracking_uri is None or run_id is None:
        return None
    check_reachable(cfg.tracking_uri)
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=cfg.tracking_uri)
        client.log_artifacts(run_id, str(report_dir), artifact_path="report")
    except (MlflowException, requests.RequestException, OSError) as error:
        raise TrackingError(
            f"logging.mlflow.tracking_uri = {cfg.tracking_uri}: {one_line(error)}"
        ) from None
    return run_id


def _stored_run(client: Any, run_id: str | None) -> Any:
    """The run `run_id` names, or None when there is none (no id, or a store without it)."""
    from mlflow.exceptions import MlflowException

    if run_id is None:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _experiment_id(client: Any, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name)
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"logging.mlflow.experiment = {name}: the experiment is deleted; restore it or "
            "choose another name"
        )
    return experiment.experiment_id


def check_reachable(uri: str) -> None:
    """Raise TrackingError when nothing answers HTTP at an http(s) `uri` (one try, unlike
    MLflow's client, which retries for minutes); any HTTP answer passes."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri, timeout=REACH_TIMEOUT_S)
    except requests.RequestException as error:
        match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(error))
        reason = match.group(1) if match else type(error).__name__
        raise TrackingError(
            f"logging.mlflow.tracking_uri = {uri}: no server answers there ({reason}); start "
            "`mlflow server` there or set logging.mlflow.tracking_uri=null"
        ) from None


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys to values as text (JSON but for strings), cut to MLflow's limits."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[name[:MLFLOW_KEY_LIMIT]] = text[:MLFLOW_VALUE_LIMIT]
    return out


def read_records(path: Path) -> list[dict[str, Any]]:
    """The objects of a metrics log, skipping a torn line; [] when there is none."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:300]


def new_run_id(length: int = 8) -> str:
    """A random W&B run id (wandb's own `generate_id` is not public API in wandb 0.31)."""
    return "".join(secrets.choice(RUN_ID_ALPHABET) for _ in range(length))


def read_run_id(run_dir: Path, name: str = RUN_ID_FILE) -> str | None:
    path = run_dir / name
    if not path.exists():
        return None
    return path.read_text(encoding="utf-8").strip() or None


def write_run_id(run_dir: Path, run_id: str, name: str = RUN_ID_FILE) -> None:
    """Persist `run_id` in `run_dir/name` atomically (temporary name, then rename), unless
    already there."""
    if read_run_id(run_dir, name) == run_id:
        return
    tmp = run_dir / f".{name}.tmp"
    tmp.write_text(run_id + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / name)
