"""bench/gpu_throughput.py: its CPU smoke run end to end (every row, the micro-batch search
stopped by its cap, tokens/s, MFU from the formula, the same first-step loss on both sides),
and what only a GPU exercises for real (out-of-memory errors in the search, the layer fit),
with fake out-of-memory errors and an H200's memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from bench.gpu_throughput import is_oom, largest_fitting, layers_that_fit
from pretrain.config import load_config
from pretrain.model.sizing import count_parameters, padded_vocab_size
from pretrain.train.flops import peak_flops
from tests.conftest import REPO

H200_FREE = 139 * 2**30


@pytest.mark.integration
def test_cpu_smoke_run(tmp_path):
    out = tmp_path / "rows.json"
    result = subprocess.run(
        [sys.executable, "bench/gpu_throughput.py", "--device", "cpu", "--steps", "2",
         "--warmup", "1", "--peak-tflops", "1", "--json", str(out),
         "--micro-batch", "0", "--max-micro-batch", "2"],  # the GPU's search, capped
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["compile"], r["recompute"]) for r in rows] == [
        (False, "none"),
        (True, "none"),
        (False, "selective"),
        (True, "selective"),
    ]
    model = load_config(REPO / "configs/model/tiny.yaml").model
    for row in rows:
        assert row["status"] == "ok", row
        assert (row["shape"], row["precision"], row["layers"]) == ("tiny", "fp32", 4)
        assert (row["micro_batch"], row["seq_length"], row["steps_timed"]) == (2, 256, 2)
        assert row["tokens_per_step"] == 2 * 256
        # FLOPs per token = 6 N + 12 L h S, N counted on the model that ran (all parameters but
        # the input embedding), which is the model the closed-form size describes.
        assert row["parameters"] == count_parameters(model, padded_vocab_size(model.vocab_size))
        matmul = row["parameters"] - row["lookup_parameters"]
        assert row["lookup_parameters"] == padded_vocab_size(model.vocab_size) * 256
        assert row["flops_per_token"] == 6 * matmul + 12 * 4 * 256 * 256
        assert row["peak_flops"] == 1e12
        for side in ("kiln", "plain"):
            figures = row[side]
            assert figures["tokens_per_s"] > 0
            assert figures["tokens_per_s"] == pytest.approx(512 / figures["median_s"])
            assert figures["mfu"] == pytest.approx(
                figures["tokens_per_s"] * row["flops_per_token"] / 1e12
            )
            assert figures["peak_bytes"] is None  # no allocator figures on CPU
            assert len(figures["losses"]) == 3
        assert row["ratio"] == pytest.approx(row["kiln"]["median_s"] / row["plain"]["median_s"])
        # Same weights, same batch, fp32: the same loss before any update, about ln(vocab).
        kiln_loss, plain_loss = row["kiln"]["losses"][0], row["plain"]["losses"][0]
        assert abs(kiln_loss - plain_loss) <= 1e-5 * kiln_loss
        assert abs(kiln_loss - math.log(model.vocab_size)) < 0.5
        assert row["mfu_goal"] is None
    # train.compile reaches both sides: Kiln's engine and the plain loop compile graphs in the
    # compile-on rows (each row starts from a reset dynamo), and none in the others.
    for row in rows:
        for side in ("kiln", "plain"):
            assert (row[side]["compiled_graphs"] > 0) == row["compile"], (side, row)
    text = result.stdout
    # One search per recompute mode (compile off); the compile-on rows reuse its size.
    assert text.count("micro-batch search: 1 ok, 2 ok -> 2") == 2
    assert "a smoke run of the code path only" in text
    assert "goal: kiln/plain step time <= 1.03" in text
    assert (
        sum(
            line.startswith("| ") and "| tiny fp32 L=4 S=256 |" in line
            for line in text.splitlines()
        )
        == 4
    )


def test_micro_batch_search_keeps_the_last_size_that_ran():
    tried = []

    def trial(size: int) -> None:
        tried.append(size)
        if size > 12:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert largest_fitting(trial, cap=64) == 8
    assert tried == [1, 2, 4, 8, 16]
    assert largest_fitting(lambda size: None, cap=6) == 4  # the cap ends the doubling
    assert largest_fitting(trial, cap=64, start=16) is None


def test_micro_batch_search_passes_other_errors_on():
    def trial(size: int) -> None:
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError):
        largest_fitting(trial, cap=8)
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("shape mismatch"))


def test_layer_fit_for_the_7b_shape():
    model = load_config(REPO / "configs/model/llama-7b.yaml").model
    fit = layers_that_fit(model, 2048, 16384, H200_FREE, "bf16")
    # Both sides' state (38 bytes per parameter) and 16k tokens of activations in 90% of an
    # H200: a few of the 32 layers, and the state of one more would not fit.
    assert 4 <= fit["layers"] < model.num_layers
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert fit["parameters_per_layer"] == per_layer

    def needs(layers: int) -> float:
        parameters = layers * per_layer + fit["parameters_outside_layers"]
        activations = layers * fit["activation_bytes_per_token_layer"]
        logits = 12 * padded_vocab_size(model.vocab_size)
        return fit["state_bytes_per_parameter"] * parameters + 16384 * (activations + logits)

    assert needs(fit["layers"]) <= 0.9 * H200_FREE < needs(fit["layers"] + 1)
    assert layers_that_fit(model, 2048, 16384, 2**50, "bf16")["layers"] == model.num_layers
    assert layers_that_fit(model, 2048, 16384, 2**30, "bf16")["layers"] == 0
    assert (
        peak_flops("NVIDIA H200", "bf16") == peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    )
