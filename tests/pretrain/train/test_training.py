"""`kiln train` end to end in real gloo processes: parallel layouts give the numbers of one
process, a killed run resumes bit-identically, failures are skipped or stop the run cleanly."""

from __future__ import annotations

import json
import math
import shutil
import signal
from pathlib import Path

import pytest
import torch

from pretrain.train.checkpoint import latest_checkpoint
from pretrain.train.dcp_io import read_metadata
from pretrain.train.weights import CheckpointTensors, consolidated_weights
from tests.conftest import run_kiln
from tests.support.training import (
    BERT,
    LAYOUTS,
    T5,
    assert_tensorboard_equals_metrics,
    logged_steps,
    losses,
    records,
    tensorboard_scalars,
    train,
    train_until,
)

pytestmark = pytest.mark.integration


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    assert checkpoint is not None and checkpoint.name == "step_00000010"
    return consolidated_weights(checkpoint)


@pytest.mark.parametrize(
    "name,reference",
    [
        ("tp2", "single"),
        ("pp2", "single"),
        ("dp2-zero0", "single"),
        ("dp2-zero1", "single"),
        ("dp2-zero2", "single"),
        ("dp2-zero3", "single"),
        ("tp2-pp2", "single"),
        ("recompute", "single"),
        ("pp2-recompute", "single"),
        ("selective", "single"),
        ("tp2-pp2-selective", "single"),
        ("gpt-tp2-pp2", "gpt-single"),
        ("tp2-compile", "single"),
        ("pp2-compile", "single"),
        ("dp2-zero1-compile", "single"),
        ("bert-tp2", "bert-single"),
        ("bert-dp2", "bert-single"),
        ("bert-pp2", "bert-single"),
        ("bert-tp2-pp2", "bert-single"),
        ("t5-tp2", "t5-single"),
        ("t5-dp2", "t5-single"),
        ("t5-dp2-zero2", "t5-single"),
        ("t5-dp2-zero3", "t5-single"),
    ],
)
def test_parallel_layout_matches_one_process(runs, name, reference):
    expected, got = losses(runs(reference)), losses(runs(name))
    compiled = "block compute compiled" in (runs(name) / "stdout.log").read_text()
    assert compiled == ("compile" in name)
    assert sorted(expected) == list(range(1, 11))
    assert expected[10] < expected[1] - 0.2, "the reference run did not learn"
    assert got.keys() == expected.keys()
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), f"step {step}"
    norms = {r["step"]: r["grad_norm"] for r in records(runs(reference)) if "loss" in r}
    for r in records(runs(name)):
        if "loss" in r:
            assert r["grad_norm"] == pytest.approx(norms[r["step"]], rel=1e-4)
    mine, theirs = final_weights(runs(name)), final_weights(runs(reference))
    assert mine.keys() == theirs.keys()
    # float32 rounding of another reduction order, in units of the tensor's own scale (a t5's
    # embedding is drawn at std 1, the others at 0.02); a t5 also has single elements whose
    # near-zero gradients Adam's normalisation turns into update differences of ~1.5e-5 (losses
    # and grad norms still agree to 1e-7)
    atol = 3e-5 if name.startswith("t5") else 1e-5
    for key in theirs:
        scale = max(1.0, float(theirs[key].abs().max()))
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=atol * scale, msg=key)


@pytest.mark.parametrize("name", ["dp2-zero1", "pp2", "dp2-bf16", "bert-dp2", "t5-dp2"])
def test_sigkill_then_resume_gives_bit_identical_losses(
    runs, data, bert_data, t5_data, tmp_path, name
):
    nproc, overrides = LAYOUTS[name]
    expected = losses(runs(name))
    run_dir = tmp_path / name
    # an encoder's data has <mask>, an encoder-decoder's the sentinels
    data = {"bert": bert_data, "t5": t5_data}.get(name.split("-")[0], data)
    # By step 8 step 3's save is complete; step 6's may still be under way in the background.
    code = train_until(data, run_dir, nproc, 8, signal.SIGKILL, *overrides)
    assert code == -signal.SIGKILL
    killed_at = latest_checkpoint(run_dir / "checkpoints")
    assert killed_at is not None and killed_at.name in ("step_00000003", "step_00000006")
    result = train(data, run_dir, nproc, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {killed_at}" in result.stdout
    assert losses(run_dir) == expected  # exact: bit-identical
    steps = [r["step"] for r in records(run_dir) if "loss" in r]
    assert steps == list(range(1, 11)), "each step logged once"
    # TensorBoard too: the killed session's steps past the checkpoint were purged
    assert_tensorboard_equals_metrics(run_dir)


@pytest.mark.parametrize("name", ["dp2-zero1", "pp2"])
def test_a_kill_during_a_background_save_leaves_the_previous_checkpoint(runs, data, tmp_path, name):
    nproc, overrides = LAYOUTS[name]
    run_dir = tmp_path / "run"
    # Step 6's save is slow, then dies before it is complete; training goes on meanwhile.
    crashed = train(data, run_dir, nproc, *overrides, fault="slow-save@6,kill-during-save@6")
    assert crashed.returncode == 128 + signal.SIGKILL
    assert max(logged_steps(run_dir)) > 6, "training waited for the background save"
    assert (run_dir / "checkpoints/.staging/step_00000006").is_dir()  # the half-written one
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000003"
    resumed = train(data, run_dir, nproc, *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_00000003" in resumed.stdout
    assert losses(run_dir) == losses(runs(name))  # exact: bit-identical
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert kept == ["step_00000009", "step_00000010"]  # checkpoint.keep = 2
    assert not (run_dir / "checkpoints/.staging/step_00000006").exists()


@pytest.mark.parametrize("name", ["dp2-zero1", "tp2-pp2", "dp2-zero0"])
def test_a_checkpoint_holds_the_state_once_written_evenly(runs, name):
    checkpoint = latest_checkpoint(runs(name) / "checkpoints")
    tensors = CheckpointTensors(checkpoint)
    parameters = sum(math.prod(tensors.shapes[f"model/{n}"]) for n in tensors.names())
    unique = parameters * 4 * 3  # fp32 weights, exp_avg, exp_avg_sq
    stored = read_metadata(checkpoint).state_dict_metadata
    chunks = [c for md in stored.values() if hasattr(md, "chunks") for c in md.chunks]
    assert sum(math.prod(c.sizes) for c in chunks) * 4 == unique  # every element once
    files = [f.stat().st_size for f in checkpoint.glob("*.distcp")]
    nproc, _ = LAYOUTS[name]
    assert len(files) == nproc  # every rank wrote its own file
    # torch.save adds about 1 KB of headers per chunk: a lot for this 0.2M-parameter model
    assert sum(files) <= 1.05 * unique + 1500 * len(chunks)
    assert max(files) <= 1.3 * sum(files) / len(files)


def test_a_checkpoint_of_the_old_format_is_refused_in_one_line(runs, data, tmp_path):
    run_dir = tmp_path / "run"
    old = run_dir / "checkpoints" / "step_00000003"
    (old / "model").mkdir(parents=True)
    for name in ("config.yaml", "tokenizer.json"):
        shutil.copyfile(runs("single") / name, run_dir / name)
    (old / "model" / "layout.json").write_text(json.dumps({"format": 2, "tensor": 1}))
    (old / "trainer_state.json").write_text(json.dumps({"step": 3}))
    (run_dir / "checkpoints" / "latest").write_text("step_00000003\n")
    result = train(data, run_dir, 1)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "checkpoint format 2" in result.stderr
    exported = run_kiln("export", str(old), "--to", "hf", str(tmp_path / "hf"))
    assert exported.returncode == 2 and "checkpoint format 2" in exported.stderr
    assert exported.stderr.count("\n") == 1


def test_sigterm_saves_then_a_rerun_continues_the_same_wandb_run(data, tmp_path):
    run_dir = tmp_path / "run"
    wandb = ["logging.wandb.mode=offline"]
    code = train_until(data, run_dir, 1, 3, signal.SIGTERM, *wandb)
    assert code == 0
    stopped = json.loads(
        (latest_checkpoint(run_dir / "checkpoints") / "trainer_state.json").read_text()
    )
    assert 3 <= stopped["step"] < 10
    assert stopped["consumed_samples"] == 8 * stopped["step"]
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    result = train(data, run_dir, 1, *wandb)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    offline_runs = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert len(offline_runs) == 2 and all(
        (d / f"run-{run_id}.wandb").is_file() for d in offline_runs
    )
    logged = records(run_dir)
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 11))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device"} <= logged[
        1
    ].keys()
    assert [r["step"] for r in logged if "val_loss" in r] == [0, 5, 10]


@pytest.mark.parametrize("layout", ["parallel.zero_stage=1", "parallel.pipeline=2"])
def test_nan_steps_are_skipped_and_logged(data, tmp_path, layout):
    run_dir = tmp_path / "run"
    result = train(data, run_dir, 2, layout, fault="nan-loss@3-4")
    assert result.returncode == 0, result.stderr[-3000:]
    by_step = {r["step"]: r for r in records(run_dir) if "loss" in r}
    assert [s for s, r in by_step.items() if r["skipped"]] == [3, 4]
    assert by_step[3]["loss"] is None and by_step[4]["loss"] is None  # NaN is logged as null
    assert all(by_step[s]["loss"] is not None for s in (5, 6, 7, 8, 9, 10))
    assert "update skipped (2 in a row)" in result.stdout
    # flagged for the dashboards too: in metrics.jsonl, TensorBoard and the log
    assert [s for s, r in by_step.items() if r.get("alert_nonfinite")] == [3, 4]
    assert sorted(tensorboard_scalars(run_dir)["alert_nonfinite"]) == [3, 4]
    assert "step 3: alert nonfinite" in result.stdout
    assert "attention: scaled_dot_product_attention runs the flash_attention kernel" in (
        result.stdout
    )  # PyTorch's CPU flash kernel, for fp32 on CPU
    state = json.loads(
        (latest_checkpoint(run_dir / "checkpoints") / "trainer_state.json").read_text()
    )
    assert state["skipped_steps"] == 2


def test_too_many_nan_steps_stop_the_run_with_good_weights_saved(data, tmp_path):
    run_dir = tmp_path / "run"
    result = train(data, run_dir, 1, "train.max_skipped_steps=3", fault="nan-loss@5-")
    assert result.returncode == 3
    assert "3 steps in a row had a NaN or Inf loss or gradient" in result.stdout
    latest = latest_checkpoint(run_dir / "checkpoints")
    assert latest.name == "step_00000006"
    weights = consolidated_weights(latest)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_an_fp16_run_with_early_overflows_completes(data, tmp_path):
    """fp16's dynamic loss scale starts too high (2**23 here, as it may on a GPU for a new
    model): DeepSpeed's scaler skips those steps and halves the scale until the gradients fit.
    They are logged, but do not count toward train.max_skipped_steps; a NaN loss does.
    (`fp16-on-cpu`: PyTorch's CPU kernels stand in for a GPU's, see `allow_fp16_on_cpu`.)"""
    run_dir = tmp_path / "run"
    fp16 = ["parallel.zero_stage=1", "train.precision=fp16", "train.initial_loss_scale_power=23"]
    limits = ["train.max_skipped_steps=2", "train.steps=16"]
    result = train(data, run_dir, 2, *fp16, *limits, fault="fp16-on-cpu@0,nan-loss@8")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    by_step = {r["step"]: r for r in records(run_dir) if "loss" in r}
    assert sorted(by_step) == list(range(1, 17))
    overflows = [s for s, r in by_step.items() if r["overflow"]]
    assert overflows[:3] == [1, 2, 3], overflows  # more than max_skipped_steps in a row
    assert all(by_step[s]["skipped"] and by_step[s]["loss"] is not None for s in overflows)
    assert "not counted toward train.max_skipped_steps" in result.stdout
    scales = [by_step[s]["loss_scale"] for s in sorted(by_step)]
    assert scales[0] == 2**23 and scales == sorted(scales, reverse=True) and scales[-1] < 2**21
    # Step 8's NaN loss is divergence, not an overflow: skipped and counted.
    assert by_step[8]["skipped"] and not by_step[8]["overflow"] and by_step[8]["loss"] is None
    assert "step 8: non-finite loss or gradient (loss nan), update skipped (1 in a row)" in (
        result.stdout
    )
    state = json.loads(
        (latest_checkpoint(run_dir / "checkpoints") / "trainer_state.json").read_text()
    )
    assert state["step"] == 16 and state["skipped_steps"] == 1
    last = [by_step[s]["loss"] for s in (14, 15, 16)]
    assert max(last) < by_step[1]["loss"] - 0.15, "the fp16 run did not learn"
    validation = [r["val_loss"] for r in records(run_dir) if "val_loss" in r]
    assert validation[-1] < validation[0] - 0.15


def test_generate_is_greedy_at_temperature_zero_and_layout_independent(runs):
    def greedy(run_dir: Path) -> str:
        args = ["--prompt", "the", "--max-new-tokens", "12", "--temperature", "0"]
        result = run_kiln("generate", str(run_dir), *args)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout.strip()

    text = greedy(runs("single"))
    assert text.startswith("the") and len(text) > len("the")
    assert greedy(runs("single")) == text
    assert greedy(runs("tp2-pp2")) == text  # the same model, trained split four ways
    sampled = run_kiln(
        "generate", str(runs("single")), "--prompt", "the", "--top-k", "20", "--top-p", "0.9"
    )
    assert sampled.returncode == 0 and sampled.stdout.startswith("the")


def test_generate_rejects_a_directory_without_checkpoints(tmp_path):
    result = run_kiln("generate", str(tmp_path), "--prompt", "x")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no checkpoint" in result.stderr


@pytest.mark.parametrize(
    "override,message",
    [
        ("parallel.tensor=3", "parallel.tensor = 3"),
        ("data.path=/nonexistent/data", "run `kiln data prepare` first"),
        ("train.precision=bf16", "parallel.zero_stage = 0"),
    ],
)
def test_invalid_runs_fail_before_any_process_starts(data, tmp_path, override, message):
    run_dir = tmp_path / "run"
    result = train(data, run_dir, 2, override)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert not run_dir.exists()


def test_every_save_records_how_long_it_took_for_the_schedulers(runs):
    from cluster.grace import k8s_grace_period

    run_dir = runs("single")
    record = json.loads((run_dir / "checkpoints" / "last_save.json").read_text())
    assert record["step"] == 10 and record["save_s"] > 0 and record["step_s"] > 0
    assert 0 < record["stall_s"] <= record["save_s"]
    assert "at step 10 a step took" in k8s_grace_period(run_dir).reason


def test_an_encoder_on_data_without_a_mask_token_is_refused_before_it_starts(data, tmp_path):
    result = train(data, tmp_path / "run", 1, *BERT)
    assert result.returncode == 2
    assert "has no <mask> token" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "logs").exists()  # no rank was started


def test_an_encoder_decoder_on_data_without_sentinels_is_refused_before_it_starts(data, tmp_path):
    result = train(data, tmp_path / "run", 1, *T5)
    assert result.returncode == 2
    assert "lacks 100 of the 102 tokens" in result.stderr and "<extra_id_0>" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "logs").exists()  # no rank was started


def test_tensorboard_and_metrics_jsonl_hold_the_same_numbers(runs):
    run_dir = runs("single")
    assert_tensorboard_equals_metrics(run_dir)
    final = [r for r in records(run_dir) if r["step"] == 10 and "loss" in r][-1]
    for key in ("host_rss_mib", "data_wait_share", "tokens_per_s_per_device"):
        assert final[key] > 0 or key == "data_wait_share", key
    assert 0 <= final["data_wait_share"] < 1
    saves = [r for r in records(run_dir) if "checkpoint_save_s" in r]
    assert [r["step"] for r in saves] == [3, 6, 9]  # checkpoint.interval=3; the end's waits
