"""`kiln data prepare` and `kiln data inspect` as a user runs them: errors before Ray starts,
resume after SIGKILL at several points, and a Ray cluster started with `ray start --head`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from megatron.core.datasets.indexed_dataset import IndexedDataset

from tests.conftest import kiln_executable, run_kiln
from tests.support.corpus import distinct_documents, near_copy, write_jsonl
from tests.support.distributed import free_port

pytestmark = pytest.mark.integration

OUTPUTS = ("tokenizer.json", "tokenizer_config.json", "quarantine.jsonl")


@pytest.fixture(scope="module")
def corpus_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    rng, words, texts = distinct_documents(seed=21, count=400)
    for i in range(8):
        chunk = texts[i * 50 : (i + 1) * 50]
        extra = [texts[i * 3], near_copy(rng, texts[i * 5], words, 0.01)] if i else []
        write_jsonl(root / "corpus" / f"part{i}.jsonl", chunk + extra)
    config = {
        "data": {
            "path": str(root / "default-out"),
            "inputs": [str(root / "corpus")],
            "part_size_mb": 0.05,  # each ~75 kB file its own part, so kills land between parts
            "shards": {"max_tokens": 15_000, "validation_fraction": 0.05},
        },
        "tokenizer": {"vocab_size": 1024, "train_sample_mb": 1},
    }
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def prepare_command(config: Path, output: Path, *extra: str) -> list[str]:
    return [kiln_executable(), "data", "prepare", str(config), "--output", str(output), *extra]


def output_bytes(output: Path) -> dict[str, bytes]:
    """Every file the data is: shards, tokenizer files, quarantine, removed sample."""
    names = sorted(p.name for p in output.iterdir() if p.suffix in (".bin", ".idx"))
    removed = sorted(f"removed/{p.name}" for p in (output / "removed").glob("*.jsonl"))
    return {name: (output / name).read_bytes() for name in [*names, *OUTPUTS, *removed]}


def manifest_without_timings(output: Path) -> dict:
    """The manifest less what may differ between two runs: timings, the Ray it ran on, and the
    output path."""
    manifest = json.loads((output / "manifest.json").read_text())
    manifest.pop("timings_s")
    manifest.pop("execution")
    manifest["config"]["data"].pop("path")
    return manifest


@pytest.fixture(scope="module")
def reference(corpus_config, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("reference") / "out"
    result = subprocess.run(
        prepare_command(corpus_config, output), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def test_prepare_prints_a_summary_and_inspect_shows_it(reference, kiln):
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["counts"]["exact_duplicates"] == 7
    assert manifest["counts"]["near_duplicates"] == 7
    assert (reference / "config.yaml").exists()
    result = kiln("data", "inspect", str(reference), "--samples", "2")
    assert result.returncode == 0, result.stderr
    assert "exact duplicates" in result.stdout and "train_00000" in result.stdout
    assert "train document 1" in result.stdout
    png = reference / "document_lengths.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_shows_the_removed_sample(reference, kiln):
    result = kiln(
        "data", "inspect", str(reference), "--removed", "near_duplicates", "--samples", "1"
    )
    assert result.returncode == 0, result.stderr
    assert "near_duplicates:" in result.stdout and "repeats the kept" in result.stdout
    missing = kiln("data", "inspect", str(reference), "--removed", "no_such_rule")
    assert missing.returncode == 2 and "there are: exact_duplicates" in missing.stderr


def test_config_show_says_what_each_rule_measures(corpus_config, kiln):
    result = kiln("config", "show", str(corpus_config))
    assert result.returncode == 0, result.stderr
    assert "#   min_stop_words: occurrences of the stop words" in result.stdout
    assert "occurring at least twice" in result.stdout


def test_inspect_of_a_directory_without_manifest(kiln, tmp_path):
    result = kiln("data", "inspect", str(tmp_path))
    assert result.returncode == 2
    assert "no manifest.json" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("problem", "args", "message"),
    [
        ("missing input", ["--input", "/nonexistent/corpus.jsonl"], "/nonexistent/corpus.jsonl"),
        ("empty directory", ["--input", "{empty}"], "{empty}"),
        ("bad config", ["data.dedup.near.bands=0"], "data.dedup.near.bands = 0"),
        ("unknown key", ["data.filters.min_word=3"], "did you mean data.filters.min_words"),
        ("no ray there", ["--ray-address", "127.0.0.1:{closed}"], "cannot reach the Ray cluster"),
    ],
)
def test_user_mistakes_are_one_line_before_ray_starts(
    corpus_config, tmp_path, problem, args, message
):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.replace("{empty}", str(empty)).replace("{closed}", str(free_port())) for a in args]
    started = time.monotonic()
    result = run_kiln(*prepare_command(corpus_config, tmp_path / "out", *args)[1:])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message.replace("{empty}", str(empty)) in lines[0], lines
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 15  # no Ray start: these fail in the planning step
    assert not (tmp_path / "out" / ".work" / "clean").exists()  # no stage ran


def kill_when(command: list[str], marker: Path, timeout: float = 300) -> None:
    """Start `command`, SIGKILL its whole process group as soon as `marker` exists."""
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if process.poll() is not None:
                pytest.fail(f"finished before {marker.name} appeared (rc {process.returncode})")
            if time.monotonic() > deadline:
                pytest.fail(f"{marker} did not appear")
            time.sleep(0.005)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# Kill points, one inside every stage: read and clean; near dedup's band, pair,
# connected-components and final tasks (exact dedup runs beside them); the tokenizer's sample,
# the tokenizer; tokenisation; shards; the removed sample's merge.
KILL_POINTS = [
    ".work/clean/part_000002.json",
    ".work/near/band_00002.json",
    ".work/near/pairs_00001.json",
    ".work/near/cc_002_00000.json",
    ".work/near/drop_00003.json",
    ".work/sample/part_000003.json",
    "tokenizer.json",
    ".work/tokens/part_000003.json",
    ".work/shards/train_00001.json",
    ".work/removed/level00_000000.parquet.json",
]


def test_resume_after_sigkill_in_every_stage_gives_identical_bytes(
    corpus_config, reference, tmp_path
):
    assert not (reference / ".work").exists()  # removed after success
    output = tmp_path / "killed"
    command = prepare_command(corpus_config, output, "--no-progress")
    for point in KILL_POINTS:
        kill_when(command, output / point)
        assert not (output / "manifest.json").exists()
    assert (output / ".work" / "exact" / "drop_00001.json").exists()  # ran beside near dedup
    result = subprocess.run([*command, "--keep-work"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert output_bytes(output) == output_bytes(reference)
    assert manifest_without_timings(output) == manifest_without_timings(reference)
    assert not list(output.rglob("*.tmp*"))
    assert (output / ".work" / "near").is_dir()  # kept when asked


def test_against_a_ray_head_started_on_loopback(corpus_config, reference, tmp_path):
    ray = str(Path(sys.executable).parent / "ray")
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = subprocess.run(
        [
            ray,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=1",  # the reference ran on 2 CPUs: the bytes must not change
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert start.returncode == 0, start.stderr
    try:
        output = tmp_path / "cluster"
        address = f"127.0.0.1:{port}"
        result = subprocess.run(
            prepare_command(corpus_config, output, "--ray-address", address),
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert output_bytes(output) == output_bytes(reference)
        manifest = json.loads((output / "manifest.json").read_text())
        assert len(IndexedDataset(str(output / manifest["shards"][0]["name"]))) > 0
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=120)


def test_a_two_node_ray_cluster_writes_what_one_node_writes(corpus_config, reference, tmp_path):
    """A head and a worker node (two raylets, one CPU each) started with Ray's own
    `cluster_utils`; the pipeline runs against the head's address on both nodes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        output = tmp_path / "two-nodes"
        result = subprocess.run(
            prepare_command(corpus_config, output, "--ray-address", cluster.address),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        cluster.shutdown()
    assert output_bytes(output) == output_bytes(reference)
    assert manifest_without_timings(output) == manifest_without_timings(reference)
    execution = json.loads((output / "manifest.json").read_text())["execution"]
    assert execution["ray_nodes"] == 2 and execution["nodes_used"] == 2


@contextlib.contextmanager
def recorded_cluster(address: str):
    """/tmp/ray/ray_current_cluster naming `address`, as a `ray start` long gone leaves it."""
    record = Path("/tmp/ray/ray_current_cluster")
    saved = record.read_bytes() if record.exists() else None
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(address)
    try:
        yield
    finally:
        if saved is None:
            record.unlink(missing_ok=True)
        else:
            record.write_bytes(saved)


def test_a_stale_recorded_cluster_neither_hangs_nor_is_used(tmp_path):
    _, _, texts = distinct_documents(seed=5, count=30)
    write_jsonl(tmp_path / "c.jsonl", texts)
    config = tmp_path / "data.yaml"
    tree = {"data": {"inputs": [str(tmp_path / "c.jsonl")]}, "tokenizer": {"vocab_size": 512}}
    config.write_text(yaml.safe_dump(tree))
    with recorded_cluster(f"127.0.0.1:{free_port()}"):
        local = run_kiln(*prepare_command(config, tmp_path / "out")[1:], timeout=300)
        assert local.returncode == 0, local.stderr[-2000:]  # Kiln started its own Ray
        auto = run_kiln(*prepare_command(config, tmp_path / "auto", "--ray-address", "auto")[1:])
    assert auto.returncode == 2
    lines = auto.stderr.strip().splitlines()
    assert len(lines) == 1 and "ray_current_cluster" in lines[0] and "Traceback" not in lines[0]


def test_a_node_without_kiln_is_named_in_one_line(corpus_config, tmp_path):
    """The worker node's Python finds a `data_pipeline` that cannot be imported (shadowing the
    installed one, as on a node where Kiln is missing): the probe names the node."""
    from ray.cluster_utils import Cluster

    shadow = tmp_path / "shadow" / "data_pipeline"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'data_pipeline'\", name='data_pipeline')\n"
    )
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    try:
        cluster.add_node(num_cpus=1, env_vars={"PYTHONPATH": str(shadow.parent)})
        cluster.wait_for_nodes()
        command = prepare_command(corpus_config, tmp_path / "out", "--ray-address", cluster.address)
        # Not from the repository: a worker's first import path is the driver's directory.
        result = run_kiln(*command[1:], cwd=tmp_path, timeout=300)
    finally:
        cluster.shutdown()
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot import Kiln" in lines[0], lines
    assert not (tmp_path / "out" / ".work" / "clean").exists() or not any(
        (tmp_path / "out" / ".work" / "clean").iterdir()
    )  # named before any work


def t5_config(corpus_config: Path, tmp_path: Path, **tokenizer) -> Path:
    """The corpus configuration with a t5 model: span corruption's tokens are needed."""
    config = yaml.safe_load(corpus_config.read_text())
    config["model"] = {
        "arch": "t5",
        "num_layers": 2,
        "hidden_size": 64,
        "num_heads": 4,
        "vocab_size": 1024,
        "max_seq_length": 128,
    }
    config["tokenizer"].update(tokenizer)
    path = tmp_path / "t5.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_t5_configuration_trains_the_sentinels_into_the_tokenizer(
    corpus_config, reference, tmp_path
):
    from tokenizers import Tokenizer

    output = tmp_path / "out"
    result = run_kiln(*prepare_command(t5_config(corpus_config, tmp_path), output)[1:])
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = Tokenizer.from_file(str(output / "tokenizer.json"))
    special = {
        added.content for added in tokenizer.get_added_tokens_decoder().values() if added.special
    }
    needed = {"<|pad|>", "<|endoftext|>", *(f"<extra_id_{i}>" for i in range(100))}
    assert needed <= special
    # a loaded tokenizer without them (the reference's has <|pad|>, no sentinel) is refused
    plain = reference / "tokenizer.json"
    refused = run_kiln(
        *prepare_command(t5_config(corpus_config, tmp_path, path=str(plain)), tmp_path / "loaded")[
            1:
        ]
    )
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "lacks 100 of the tokens span corruption (model.arch: t5) needs" in refused.stderr
    assert "first <extra_id_0>" in refused.stderr and "Traceback" not in refused.stderr


def test_the_preparation_is_a_run_of_its_own_in_tensorboard(reference):
    """Each stage's seconds as the manifest records them, one stage per step, then its counts
    (the filters' removals per rule)."""
    from tests.support.training import tensorboard_scalars

    manifest = json.loads((reference / "manifest.json").read_text())
    scalars = tensorboard_scalars(reference)
    stages = {name: s for name, s in manifest["timings_s"].items() if name != "ray_start"}
    logged = {name: scalars[f"stage/{name}/seconds"] for name in stages}
    assert {name: list(v.values()) for name, v in logged.items()} == {
        name: [[pytest.approx(seconds, abs=1e-3)]] for name, seconds in stages.items()
    }
    assert sorted(step for v in logged.values() for step in v) == list(range(1, len(stages) + 1))
    counts = manifest["counts"]
    final = len(stages) + 1
    assert scalars["counts/kept"] == {final: [counts["kept"]]}
    for rule, removed in counts["filtered"].items():
        assert scalars[f"counts/filtered/{rule}"] == {final: [removed]}
