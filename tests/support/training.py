"""Shared by the training tests: a small prepared data directory, `kiln train` runs, metrics."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np

from data_pipeline.config import TokenizerConfig
from data_pipeline.format import ShardWriter
from data_pipeline.tokenizer import DocumentEncoder, save_tokenizer, train_tokenizer
from tests.conftest import REPO, kiln_executable
from tests.support.corpus import distinct_documents

VOCAB = 512
# A small llama (GQA, untied) that every layout can split: 4 layers for 2 stages, 4 heads and
# 2 KV heads for 2 TP ranks. 10 steps of 8 sequences of 64 tokens.
SMALL = [
    "model.num_layers=4",
    "model.hidden_size=64",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.ffn_hidden_size=128",
    "model.max_seq_length=64",
    f"model.vocab_size={VOCAB}",
    "train.seq_length=64",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.steps=10",
    "optim.warmup_steps=2",
    "eval.interval=5",
    "eval.batches=2",
    "checkpoint.interval=3",
    "checkpoint.keep=2",
    "logging.interval=5",
    "logging.wandb.mode=disabled",
]


# A small BERT-style encoder (learned positions, tied masked-LM head) for the encoder tests.
BERT = [
    "model.arch=bert",
    "model.num_kv_heads=4",
    "model.ffn_hidden_size=256",
    "masking.probability=0.15",
]

# A small T5-style encoder-decoder (span corruption; 64 encoder tokens from 70-token samples,
# 14 decoder tokens), a decoder shallower than its encoder, and few position buckets so that
# 64 tokens reach the logarithmic ones. Its data needs the sentinels (`t5_data`).
T5 = [
    "model.arch=t5",
    "model.num_kv_heads=4",
    "model.decoder_layers=2",
    "model.relative_buckets=8",
    "model.relative_max_distance=20",
]

# The runs the training tests compare, each trained once per test session (`runs` fixture):
# name -> (processes, overrides on top of SMALL).
LAYOUTS: dict[str, tuple[int, list[str]]] = {
    "single": (1, []),
    "tp2": (2, ["parallel.tensor=2"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "dp2-zero0": (2, ["parallel.zero_stage=0"]),
    "dp2-zero1": (2, ["parallel.zero_stage=1"]),
    "dp2-zero2": (2, ["parallel.zero_stage=2"]),
    "dp2-zero3": (2, ["parallel.zero_stage=3"]),
    # bf16: DeepSpeed's bf16 optimizer keeps the fp32 master weights a resume must restore.
    "dp2-bf16": (2, ["parallel.zero_stage=1", "train.precision=bf16"]),
    "tp2-pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
    # Activation checkpointing: recomputed blocks give the same numbers.
    "recompute": (1, ["train.activation_checkpointing=true"]),
    "pp2-recompute": (2, ["parallel.pipeline=2", "train.activation_checkpointing=true"]),
    # Selective: only the attention core and the MLP activation are recomputed.
    "selective": (1, ["train.activation_checkpointing=selective"]),
    "tp2-pp2-selective": (
        4,
        ["parallel.tensor=2", "parallel.pipeline=2", "train.activation_checkpointing=selective"],
    ),
    # torch.compile (inductor on CPU) of each block's compute: the eager numbers, also with
    # tensor-parallel collectives, pipeline stages and either kind of recomputation.
    "tp2-compile": (
        2,
        ["parallel.tensor=2", "train.compile=true", "train.activation_checkpointing=selective"],
    ),
    "pp2-compile": (
        2,
        ["parallel.pipeline=2", "train.compile=true", "train.activation_checkpointing=full"],
    ),
    "dp2-zero1-compile": (2, ["parallel.zero_stage=1", "train.compile=true"]),
    # A BERT-style encoder (masked LM) on data whose tokenizer has <mask>.
    "bert-single": (1, BERT),
    "bert-tp2": (2, [*BERT, "parallel.tensor=2"]),
    "bert-dp2": (2, [*BERT, "parallel.zero_stage=1"]),
    "bert-pp2": (2, [*BERT, "parallel.pipeline=2"]),
    "bert-tp2-pp2": (4, [*BERT, "parallel.tensor=2", "parallel.pipeline=2"]),
    # A T5-style encoder-decoder: tensor parallelism (bias table split by head) and ZeRO.
    "t5-single": (1, T5),
    "t5-tp2": (2, [*T5, "parallel.tensor=2"]),
    "t5-dp2": (2, [*T5, "parallel.zero_stage=1"]),
    "t5-dp2-zero2": (2, [*T5, "parallel.zero_stage=2"]),
    "t5-dp2-zero3": (2, [*T5, "parallel.zero_stage=3"]),
    # GPT (GPT-2's shape: every head its own K and V): tied embeddings, kept on the first and
    # the last stage; learned positions; biases.
    "gpt-single": (1, ["model.arch=gpt", "model.num_kv_heads=4"]),
    "gpt-tp2-pp2": (
        4,
        ["model.arch=gpt", "model.num_kv_heads=4", "parallel.tensor=2", "parallel.pipeline=2"],
    ),
}


def write_data_dir(
    root: Path,
    documents: int = 400,
    mask_token: str | None = None,
    required_tokens: tuple[str, ...] = (),
) -> Path:
    """Real text through a real tokenizer into shards and a manifest, without Ray;
    `mask_token` trains it in (an encoder's data), and `required_tokens` (a t5's sentinels)."""
    _, _, texts = distinct_documents(seed=11, count=documents, min_words=40, max_words=200)
    settings = TokenizerConfig(
        vocab_size=VOCAB, mask_token=mask_token, required_tokens=list(required_tokens)
    )
    tokenizer = train_tokenizer(texts, settings)
    root.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, root / "tokenizer.json")
    encoder = DocumentEncoder(tokenizer, "<|endoftext|>", max_piece_chars=100_000)
    encoded = encoder.encode(texts)
    shards = []
    for name, docs in (("train_00000", encoded[:-20]), ("valid_00000", encoded[-20:])):
        with ShardWriter(root / name, encoder.dtype) as writer:
            for ids in docs:
                writer.add_document(ids)
        split = name.split("_")[0]
        tokens = int(sum(len(d) for d in docs))
        shards.append({"name": name, "split": split, "documents": len(docs), "tokens": tokens})
    manifest = {
        "tokenizer": {
            "file": "tokenizer.json",
            "vocab_size": tokenizer.get_vocab_size(),
            "eos_token": "<|endoftext|>",
            "eos_id": encoder.eos_id,
            "dtype": np.dtype(encoder.dtype).name,
        },
        "shards": shards,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def train_command(data: Path, run_dir: Path, nproc: int, *overrides: str) -> list[str]:
    return [
        kiln_executable(),
        "train",
        str(REPO / "configs/train/tiny.yaml"),
        "--nproc",
        str(nproc),
        "--run-dir",
        str(run_dir),
        f"data.path={data}",
        *SMALL,
        *overrides,
    ]


def environment(fault: str | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("KILN_TEST_FAULT", None)
    if fault:
        env["KILN_TEST_FAULT"] = fault
    return env


def train(
    data: Path, run_dir: Path, nproc: int, *overrides: str, fault: str | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_command(data, run_dir, nproc, *overrides),
        cwd=REPO,
        env=environment(fault),
        capture_output=True,
        text=True,
        timeout=300,
    )


def train_until(data: Path, run_dir: Path, nproc: int, step: int, sig: int, *overrides: str) -> int:
    """Start a run; once `step` is in metrics.jsonl send `sig` (SIGKILL: to the whole process
    group, as a node failure; otherwise to the launcher only, as Slurm would). Exit code."""
    process = subprocess.Popen(
        train_command(data, run_dir, nproc, *overrides),
        cwd=REPO,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    try:
        while step not in logged_steps(run_dir):
            if process.poll() is not None:
                raise AssertionError(f"the run ended before step {step}: {process.stderr.read()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"step {step} never logged")
            time.sleep(0.02)
        if sig == signal.SIGKILL:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.send_signal(sig)
        process.wait(timeout=120)
        return process.returncode
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill
            out.append(json.loads(line))
    return out


def logged_steps(run_dir: Path) -> set[int]:
    return {r["step"] for r in records(run_dir) if "loss" in r}


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, list[float]]]:
    """Every scalar of the run's TensorBoard event files as TensorBoard itself reads them
    (its EventAccumulator, which drops the steps a resumed session purged): tag -> step ->
    the values logged at that step."""
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={SCALARS: 0})
    accumulator.Reload()
    out: dict[str, dict[int, list[float]]] = {}
    for tag in accumulator.Tags()["scalars"]:
        for event in accumulator.Scalars(tag):
            out.setdefault(tag, {}).setdefault(event.step, []).append(event.value)
    return out


def assert_tensorboard_equals_metrics(run_dir: Path) -> None:
    """TensorBoard holds each step's numbers of metrics.jsonl once, with the same values."""
    scalars = tensorboard_scalars(run_dir)
    expected: dict[str, dict[int, float]] = {}
    for record in records(run_dir):
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and value is not None:
                expected.setdefault(key, {})[record["step"]] = float(value)
    assert set(expected) <= set(scalars), set(expected) - set(scalars)
    for tag, steps in expected.items():
        logged = scalars[tag]
        assert sorted(logged) == sorted(steps), f"{tag}: steps {sorted(logged)}"
        for step, value in steps.items():
            assert len(logged[step]) == 1, f"{tag} at step {step} logged {len(logged[step])}x"
            assert logged[step][0] == np.float32(value), f"{tag} at step {step}"
