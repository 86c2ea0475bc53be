"""MLflow beside metrics.jsonl: `kiln train` against a real `mlflow server` (SQLite store,
proxied artifacts), read back with MlflowClient, also across a session without MLflow, a
SIGKILL and resumes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pretrain.config.schema import MlflowConfig
from pretrain.train.tracking import MetricsLog, MlflowSink, flatten_params
from tests.conftest import CONFIGS, run_kiln
from tests.support.distributed import free_port
from tests.support.training import records, train, train_until

pytestmark = pytest.mark.integration

# Metrics whose values a resumed session computes again bit for bit (the others are timings).
EXACT = ("loss", "lr", "grad_norm", "val_loss")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """A tracking server on a free local port for this module: its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (root / "server.log").open("w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        # without the job runners (seven huey processes) that tracking does not use
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # its store is thrown away with tmp_path
        server.wait()
        log.close()


def history(client, run_id: str, key: str) -> dict[int, list[float]]:
    """step -> the values MLflow holds for `key` at that step."""
    out: dict[int, list[float]] = {}
    for metric in client.get_metric_history(run_id, key):
        out.setdefault(metric.step, []).append(metric.value)
    return out


def expected_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """key -> step -> value of every number in metrics.jsonl (booleans as 0/1)."""
    out: dict[str, dict[int, float]] = {}
    for record in records(run_dir):
        for key, value in record.items():
            if key != "step" and isinstance(value, bool | int | float):
                out.setdefault(key, {})[record["step"]] = float(value)
    return out


def assert_mlflow_matches(client, run_id: str, run_dir: Path, exact: tuple[str, ...]) -> None:
    """Every metric of metrics.jsonl is in the run at the same steps, each once; the values
    of `exact` are equal."""
    for key, steps in expected_metrics(run_dir).items():
        logged = history(client, run_id, key)
        assert sorted(logged) == sorted(steps), f"{key}: steps {sorted(logged)}"
        for step, values in logged.items():
            assert len(values) == 1, f"{key} at step {step} logged {len(values)}x"
            if key in exact:
                assert values[0] == steps[step], f"{key} at step {step}"


def test_a_run_logs_params_every_step_and_its_artifacts(data, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    result = train(data, run_dir, 1, f"logging.mlflow.tracking_uri={mlflow_server}")
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert f"mlflow: started run {run_id}: {mlflow_server}/#/experiments/" in result.stdout
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "kiln"
    assert run.data.params["model.num_layers"] == "4"
    assert run.data.params["train.steps"] == "10"
    assert run.data.params["logging.mlflow.tracking_uri"] == mlflow_server
    # every number of every step, the timings too: one session logged both
    assert_mlflow_matches(client, run_id, run_dir, tuple(expected_metrics(run_dir)))
    assert sorted(history(client, run_id, "loss")) == list(range(1, 11))
    assert sorted(history(client, run_id, "val_loss")) == [0, 5, 10]
    artifacts = {entry.path for entry in client.list_artifacts(run_id)}
    assert artifacts == {"config.yaml", "metrics.jsonl"}
    logged = Path(client.download_artifacts(run_id, "metrics.jsonl", str(tmp_path)))
    assert logged.read_text() == (run_dir / "metrics.jsonl").read_text()
    # the report: `kiln report` draws it and sends it to the run's MLflow run
    reported = run_kiln("report", str(run_dir))
    assert reported.returncode == 0, reported.stderr[-3000:]
    assert f"report: also in MLflow run {run_id}" in reported.stdout
    drawn = {f"report/{p.name}" for p in (run_dir / "report").iterdir()}
    assert "report/report.md" in drawn and "report/loss.png" in drawn
    assert {entry.path for entry in client.list_artifacts(run_id, "report")} == drawn


def test_resumes_continue_the_run_with_each_step_once(data, mlflow_server, tmp_path):
    """A session without MLflow, stopped by SIGTERM near step 3 (the next one sends its steps
    from metrics.jsonl); a session killed at step 8 that sent every step (the resume re-runs
    steps past its checkpoint that MLflow has); the last one buffers (5 s between uploads)."""
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    assert train_until(data, run_dir, 1, 3, signal.SIGTERM) == 0
    assert not (run_dir / "mlflow_run_id").exists()
    on = [f"logging.mlflow.tracking_uri={mlflow_server}", "logging.mlflow.run_name=resumed"]
    every_step = "logging.mlflow.flush_interval_s=0"
    assert train_until(data, run_dir, 1, 8, signal.SIGKILL, *on, every_step) == -signal.SIGKILL
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    client = MlflowClient(mlflow_server)
    sent = history(client, run_id, "loss")
    assert min(sent) == 1 and max(sent) >= 7  # the first session's steps too
    result = train(data, run_dir, 1, *on)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"mlflow: resumed run {run_id}" in result.stdout
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", result.stdout).group(1))
    assert resumed_at < max(sent), "the resume re-ran steps the MLflow run had"
    assert (run_dir / "mlflow_run_id").read_text().strip() == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "resumed"
    loss = history(client, run_id, "loss")
    assert sorted(loss) == list(range(1, 11)) and all(len(v) == 1 for v in loss.values())
    assert_mlflow_matches(client, run_id, run_dir, EXACT)
    experiment = [run.info.experiment_id]
    assert len(client.search_runs(experiment, "attributes.run_name = 'resumed'")) == 1


def test_an_unreachable_server_is_refused_in_one_line(data, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    result = train(data, tmp_path / "run", 1, f"logging.mlflow.tracking_uri={uri}")
    assert result.returncode == 2
    assert (
        f"kiln train: logging.mlflow.tracking_uri = {uri}: no server answers there "
        "(Connection refused)" in result.stderr
    ), result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_a_file_store_is_refused_before_the_ranks_start(tmp_path):
    result = run_kiln(
        "train",
        str(CONFIGS / "train/tiny.yaml"),
        "--run-dir",
        str(tmp_path / "run"),
        f"logging.mlflow.tracking_uri=file:{tmp_path / 'mlruns'}",
    )
    assert result.returncode == 2
    assert "logging.mlflow.tracking_uri" in result.stderr
    assert "must start with one of http://, https://, sqlite:///" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "run").exists()


def test_a_sqlite_store_skips_steps_it_has_and_marks_an_early_stop_killed(tmp_path):
    """The sink alone on a local store: a second session with another configuration adds
    the new params, skips the steps the run has, sends the rest."""
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("train: {steps: 4}\n")
    cfg = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", flush_interval_s=0)
    # an existing experiment; a new one's artifacts would go to ./mlruns (MLflow's default)
    MlflowClient(cfg.tracking_uri).create_experiment("kiln", str(tmp_path / "artifacts"))
    first = MlflowSink.start(run_dir, cfg, {"train": {"steps": 4}})
    assert first is not None and not first.resumed
    for step in (1, 2, 3):
        first.log({"loss": 1.0 / step, "skipped": step == 2, "mfu": None, "note": "x"}, step)
    first.close(run_dir, finished=False)
    run = first.client.get_run(first.run_id)
    assert run.info.status == "KILLED" and sorted(run.data.metrics) == ["loss", "skipped"]
    MetricsLog(run_dir / "metrics.jsonl").log({"loss": 0.5, "skipped": True}, 2)
    second = MlflowSink.start(run_dir, cfg, {"train": {"steps": 8}, "seed": 1})
    assert second is not None and second.resumed and second.run_id == first.run_id
    second.log({"loss": 9.0}, 3)  # a re-run step the run has: skipped
    second.log({"loss": 0.25}, 4)
    second.close(run_dir, finished=True)
    run = second.client.get_run(second.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.steps": "4", "seed": "1"}  # a param cannot change
    assert history(second.client, second.run_id, "loss") == {
        1: [1.0],
        2: [0.5],
        3: [1.0 / 3],
        4: [0.25],
    }
    assert history(second.client, second.run_id, "skipped") == {1: [0.0], 2: [1.0], 3: [0.0]}
    assert {entry.path for entry in second.client.list_artifacts(second.run_id)} == {
        "config.yaml",
        "metrics.jsonl",
    }


def test_params_are_flat_text_within_mlflow_limits():
    params = flatten_params(
        {"model": {"num_layers": 4, "tie": True}, "data": {"path": None, "blend": [{"w": 1}]}}
        | {"long": "x" * 7000, "empty": {}}
    )
    assert params == {
        "model.num_layers": "4",
        "model.tie": "true",
        "data.path": "null",
        "data.blend": '[{"w": 1}]',
        "long": "x" * 6000,
        "empty": "{}",
    }


def test_a_data_preparation_is_a_run_of_its_own(mlflow_server, tmp_path):
    """`kiln data prepare` with MLflow on: a run named data-prepare with each stage's seconds
    and the manifest's counts, FINISHED."""
    import json

    from mlflow.tracking import MlflowClient

    from tests.support.corpus import distinct_documents, write_jsonl

    _, _, texts = distinct_documents(seed=5, count=60)
    write_jsonl(tmp_path / "corpus" / "part.jsonl", texts)
    output = tmp_path / "out"
    result = run_kiln(
        "data",
        "prepare",
        str(CONFIGS / "data" / "demo.yaml"),
        "--input",
        str(tmp_path / "corpus"),
        "--output",
        str(output),
        "tokenizer.vocab_size=512",
        f"logging.mlflow.tracking_uri={mlflow_server}",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((output / "manifest.json").read_text())
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run((output / "mlflow_run_id").read_text().strip())
    assert run.info.run_name == "data-prepare" and run.info.status == "FINISHED"
    metrics = run.data.metrics
    stages = [name for name in manifest["timings_s"] if name != "ray_start"]
    for name in stages:
        assert metrics[f"stage/{name}/seconds"] == pytest.approx(manifest["timings_s"][name])
    assert metrics["counts/kept"] == manifest["counts"]["kept"]
    assert run.data.params["data.shards.max_tokens"] == "5000000"
