"""Training components: LR schedule, FLOPs/MFU, metrics.jsonl, W&B tracking, sampling."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from pretrain.config import ModelConfig, load_config
from pretrain.config.schema import OptimConfig, WandbConfig
from pretrain.model.sizing import count_parameters, padded_vocab_size
from pretrain.token_sampling import sample_next
from pretrain.train.checkpoint import CheckpointManager, tag_of
from pretrain.train.flops import flops_per_token, matmul_parameters, mfu, peak_flops
from pretrain.train.schedule import lr_at, lr_lambda
from pretrain.train.tracking import MetricsLog, WandbTracker
from tests.conftest import CONFIGS
from tests.support.distributed import run_ranks

# ---------------------------------------------------------------- schedule


def optim(schedule: str = "cosine", warmup: int = 10) -> OptimConfig:
    return OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=warmup, schedule=schedule)


def test_warmup_ramps_linearly_to_the_peak():
    cfg = optim()
    ramp = [lr_at(step, cfg, 100) for step in range(10)]
    assert ramp == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert ramp[-1] == pytest.approx(cfg.lr)
    assert lr_at(10, cfg, 100) == pytest.approx(cfg.lr)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_is_monotone_and_ends_at_min_lr(schedule):
    cfg = optim(schedule)
    decay = [lr_at(step, cfg, 100) for step in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert decay[-1] == pytest.approx(cfg.min_lr)
    assert lr_at(500, cfg, 100) == pytest.approx(cfg.min_lr)


def test_cosine_midpoint_and_linear_midpoint():
    assert lr_at(55, optim("cosine"), 100) == pytest.approx((1e-3 + 1e-4) / 2)
    assert lr_at(55, optim("linear"), 100) == pytest.approx((1e-3 + 1e-4) / 2)
    assert lr_at(30, optim("linear"), 100) == pytest.approx(1e-3 - 0.9e-3 * 20 / 90)


def test_constant_schedule_and_no_warmup():
    assert {lr_at(s, optim("constant"), 100) for s in range(10, 100)} == {1e-3}
    assert lr_at(0, optim("cosine", warmup=0), 100) == pytest.approx(1e-3)


def test_lambda_lr_follows_lr_at():
    cfg = optim()
    parameter = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([parameter], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, 40))
    seen = []
    for _ in range(40):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert seen == pytest.approx([lr_at(s, cfg, 40) for s in range(40)])


# ---------------------------------------------------------------- flops


def small(arch: str, tie: bool | None = None) -> ModelConfig:
    return ModelConfig(
        arch=arch,
        num_layers=2,
        hidden_size=64,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=128 if arch == "llama" else 256,
        vocab_size=200,  # padded to 256
        max_seq_length=32,
        tie_embeddings=tie,
    )


def test_flops_hand_computed_llama():
    h, k, f, vocab, layers, seq = 64, 32, 128, 256, 2, 32
    per_layer = h * (h + 2 * k) + h * h + 3 * h * f + 2 * h
    n_matmul = layers * per_layer + h + vocab * h  # final norm + output layer, no lookup table
    assert n_matmul == 90432
    expected = 6 * n_matmul + 12 * layers * h * seq
    assert flops_per_token(small("llama"), seq) == expected == 591744


def test_flops_hand_computed_gpt():
    h, k, f, vocab, layers, seq = 64, 32, 256, 256, 2, 16
    attention = h * (h + 2 * k) + (h + 2 * k) + h * h + h
    per_layer = attention + 2 * h * f + f + h + 4 * h
    n_matmul = layers * per_layer + 2 * h + vocab * h  # tied; learned positions excluded
    assert n_matmul == 108160
    assert flops_per_token(small("gpt"), seq) == 6 * n_matmul + 12 * layers * h * seq


@pytest.mark.parametrize("arch", ["llama", "gpt"])
def test_tying_removes_the_lookup_table_but_no_flops(arch):
    tied, untied = small(arch, tie=True), small(arch, tie=False)
    table = padded_vocab_size(200) * 64
    assert count_parameters(untied, 256) - count_parameters(tied, 256) == table
    assert matmul_parameters(untied) == matmul_parameters(tied)
    assert flops_per_token(untied, 32) == flops_per_token(tied, 32)


def test_flops_use_the_padded_vocabulary():
    model = small("llama")
    assert matmul_parameters(model, tensor=4) - matmul_parameters(model) == (512 - 256) * 64


def hf_model(model: ModelConfig, vocab: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if model.arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=model.hidden_size,
            intermediate_size=model.ffn_hidden_size,
            num_hidden_layers=model.num_layers,
            num_attention_heads=model.num_heads,
            num_key_value_heads=model.num_kv_heads,
            max_position_embeddings=model.max_seq_length,
            tie_word_embeddings=model.tie_embeddings,
            attn_implementation="eager",
        )
        return LlamaForCausalLM(config)
    config = GPT2Config(
        vocab_size=vocab,
        n_embd=model.hidden_size,
        n_inner=model.ffn_hidden_size,
        n_layer=model.num_layers,
        n_head=model.num_heads,
        n_positions=model.max_seq_length,
        tie_word_embeddings=model.tie_embeddings,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize("arch", ["llama", "gpt"])
def test_formula_matches_torch_flop_counter(arch):
    """The matmul FLOPs torch counts in a real forward + backward are the formula's, less
    6 x the norm weights and biases (1-D parameters), which the formula counts in."""
    from torch.utils.flop_counter import FlopCounterMode

    model = small(arch).model_copy(update={"num_kv_heads": 4})  # GPT-2 has no GQA
    batch, seq = 2, 32
    net = hf_model(model, padded_vocab_size(model.vocab_size))
    ids = torch.randint(0, model.vocab_size, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        net(ids, labels=ids).loss.backward()
    measured = counter.get_total_flops() / (batch * seq)
    elementwise = sum(p.numel() for p in net.parameters() if p.dim() == 1)
    assert measured + 6 * elementwise == flops_per_token(model, seq)


def preset(name: str) -> ModelConfig:
    model = load_config(CONFIGS / "model" / f"{name}.yaml").model
    assert model is not None
    return model


def test_presets():
    llama = preset("llama-7b")
    attention = 12 * 32 * 4096 * 2048
    assert flops_per_token(llama, 2048) - attention == pytest.approx(6 * 6.74e9, rel=0.03)
    assert flops_per_token(llama, 4096) - flops_per_token(llama, 2048) == attention
    gpt = preset("125m")
    n_matmul = count_parameters(gpt, padded_vocab_size(50257)) - 2048 * 768
    assert flops_per_token(gpt, 2048) == 6 * n_matmul + 12 * 12 * 768 * 2048
    assert 0.9e9 < flops_per_token(gpt, 2048) < 1.0e9


def test_peak_flops_lookup():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp32") == 494.5e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA H200", "fp16") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops("NVIDIA L4", "bf16") == 121e12
    assert peak_flops("NVIDIA L40S", "bf16") == 362e12
    assert peak_flops("NVIDIA A10G", "tf32") == 62.5e12
    assert peak_flops("Tesla V100-SXM2-16GB", "bf16") == 125e12
    assert peak_flops("NVIDIA GeForce RTX 4090", "bf16") == 165e12
    assert peak_flops("cpu", "fp32") is None
    assert peak_flops(None, "bf16") is None
    assert peak_flops("NVIDIA L40", "bf16") is None  # not mistaken for an L4
    with pytest.raises(ValueError, match="precision"):
        peak_flops("NVIDIA H200", "int8")


def test_mfu():
    assert mfu(1000.0, 1e12, 1e15, 2) == pytest.approx(0.5)
    assert mfu(1000.0, 1e12, None, 2) is None


# ---------------------------------------------------------------- metrics.jsonl


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_log_lines_and_non_finite(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.log({"loss": 2.5, "grad_norm": math.nan, "lr": torch.tensor(1e-3)}, step=1)
        log.log({"loss": math.inf, "tokens": 10}, step=2)
        assert len(path.read_text().splitlines()) == 2  # flushed while open
    assert read_lines(path) == [
        {"step": 1, "loss": 2.5, "grad_norm": None, "lr": pytest.approx(1e-3)},
        {"step": 2, "loss": None, "tokens": 10},
    ]


def test_metrics_log_truncate_after_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(1, 6):
        log.log({"loss": float(step)}, step=step)
    log.close()
    with path.open("a") as f:
        f.write('{"step": 6, "lo')  # torn by a crash
    resumed = MetricsLog(path)
    resumed.truncate_after(3)
    for step in range(4, 6):
        resumed.log({"loss": float(step)}, step=step)
    resumed.close()
    assert [r["step"] for r in read_lines(path)] == [1, 2, 3, 4, 5]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


# ---------------------------------------------------------------- W&B


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home" / var.lower()))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    return tmp_path


def test_wandb_offline_run_resumes_with_the_same_id(wandb_home):
    run_dir = wandb_home / "run"
    cfg = WandbConfig(mode="offline", project="kiln-test")
    tracker = WandbTracker.start(run_dir, cfg, {"model": {"num_layers": 2}})
    run_id = tracker.run_id
    assert run_id and (run_dir / "wandb_run_id").read_text().strip() == run_id
    for step in range(1, 4):
        tracker.log({"loss": 1.0 / step, "mfu": None}, step=step)
    tracker.finish()

    again = WandbTracker.start(run_dir, cfg, {"model": {"num_layers": 2}})
    assert again.run_id == run_id
    again.log({"loss": 0.1}, step=4)
    again.finish()
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    # wandb names the second directory `...-{id}-1` when both start within the same second
    assert len(runs) == 2 and all(f"-{run_id}" in name for name in runs)
    assert all(list((run_dir / "wandb" / name).glob("*.wandb")) for name in runs)


def test_wandb_disabled_creates_nothing(wandb_home):
    run_dir = wandb_home / "run"
    tracker = WandbTracker.start(run_dir, WandbConfig(mode="disabled"), {})
    tracker.log({"loss": 1.0}, step=1)
    tracker.finish()
    assert tracker.run_id is None and not run_dir.exists()


# ---------------------------------------------------------------- sampling


def logits(batch: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    x = logits()
    assert torch.equal(sample_next(x, temperature=0.0), x.argmax(-1))


@pytest.mark.parametrize("temperature", [0.1, 1.0, 10.0])
def test_top_k_one_is_greedy(temperature):
    x = logits()
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(sample_next(x, temperature, top_k=1, generator=gen), x.argmax(-1))


def test_tiny_top_p_keeps_only_the_most_likely_token():
    x = logits()
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        assert torch.equal(sample_next(x, 5.0, top_p=1e-6, generator=gen), x.argmax(-1))


def test_top_k_and_top_p_restrict_the_support():
    x = logits(batch=1, vocab=20)
    allowed = set(x[0].topk(3).indices.tolist())
    gen = torch.Generator().manual_seed(3)
    drawn = {int(sample_next(x, 10.0, top_k=3, generator=gen)) for _ in range(200)}
    assert drawn == allowed
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    drawn = {int(sample_next(probs, 1.0, top_p=0.75, generator=gen)) for _ in range(200)}
    assert drawn == {0, 1}  # 0.5 + 0.3 is the smallest set reaching 0.75


def test_sampling_is_deterministic_with_a_seeded_generator():
    x = logits(batch=8)

    def draw(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.stack([sample_next(x, 1.0, 10, 0.9, gen) for _ in range(5)])

    assert torch.equal(draw(7), draw(7))
    assert draw(7).shape == (5, 8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_invalid_sampling_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_next(logits(), **{"temperature": 1.0, **kwargs})


# ---------------------------------------------------------------- checkpoint manager


def test_a_save_is_due_every_interval_and_on_stopping_but_never_twice():
    manager = CheckpointManager(Path("/nonexistent"), keep=2, interval=3)
    assert [s for s in range(1, 10) if manager.due(s)] == [3, 6, 9]
    manager.saved_step = 3  # saved, or resumed from, step 3
    assert manager.due(4, stopping=True)
    manager.saved_step = 6
    assert not manager.due(6, stopping=True)  # already saved at this step
    at_end = CheckpointManager(Path("/nonexistent"), keep=2, interval=0)
    assert not any(at_end.due(s) for s in range(1, 10))
    assert at_end.due(9, stopping=True)


def fake_checkpoint(run_dir: Path, step: int) -> None:
    path = run_dir / "checkpoints" / tag_of(step)
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    (run_dir / "checkpoints" / "latest").write_text(tag_of(step) + "\n")


def agreed_tags(rank: int, world: int, views: list[str]) -> list[str | None]:
    """Each rank's run directory is its own view of shared storage; all must agree."""
    import torch.distributed as dist

    found = CheckpointManager(Path(views[rank]), keep=2).agreed_latest()
    tags: list[str | None] = [None] * world
    dist.all_gather_object(tags, found.name if found else None)
    return tags


@pytest.mark.integration
def test_every_rank_resumes_from_the_checkpoint_rank_0_sees(tmp_path):
    # Rank 1's node has not seen the newest `latest` yet (a lagging view of shared storage):
    # both checkpoints exist there, but its pointer still names the older one.
    views = [tmp_path / "rank0", tmp_path / "rank1"]
    fake_checkpoint(views[0], 3)
    fake_checkpoint(views[0], 6)
    fake_checkpoint(views[1], 6)
    fake_checkpoint(views[1], 3)
    assert CheckpointManager(views[1], keep=2).latest().name == tag_of(3)
    tags = run_ranks(agreed_tags, 2, tmp_path, [str(v) for v in views])
    assert tags == [tag_of(6), tag_of(6)]


def agreed_tag_or_error(rank: int, world: int, views: list[str], out: str) -> None:
    """Each rank writes what it resumes from, or its error (no collective after the broadcast,
    so a failing rank cannot break a healthy one's call first)."""
    from pretrain.train.weights import CheckpointError

    try:
        found = CheckpointManager(Path(views[rank]), keep=2).agreed_latest()
        said = found.name if found else "none"
    except CheckpointError as error:
        said = str(error)
    (Path(out) / f"rank{rank}.txt").write_text(said)


@pytest.mark.integration
def test_a_rank_that_cannot_see_rank_0s_checkpoint_says_so(tmp_path):
    views = [tmp_path / "rank0", tmp_path / "rank1"]
    fake_checkpoint(views[0], 6)
    run_ranks(agreed_tag_or_error, 2, tmp_path, [str(v) for v in views], str(tmp_path))
    assert (tmp_path / "rank0.txt").read_text() == tag_of(6)
    assert "rank 1 does not see checkpoint" in (tmp_path / "rank1.txt").read_text()


def test_old_checkpoints_leave_their_names_at_once_and_are_deleted_in_the_background(
    tmp_path, monkeypatch
):
    import threading

    from pretrain.train import checkpoint

    for step in range(1, 6):
        fake_checkpoint(tmp_path, step)
    release, real_empty = threading.Event(), checkpoint._empty

    def slow_empty(directory: Path) -> None:  # a deletion of terabytes
        assert release.wait(timeout=60)
        real_empty(directory)

    monkeypatch.setattr(checkpoint, "_empty", slow_empty)
    manager = CheckpointManager(tmp_path, keep=2)
    manager.prune()  # returns while the deletion waits
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == [tag_of(4), tag_of(5)]
    assert len(list((root / ".trash").iterdir())) == 3
    assert manager.latest().name == tag_of(5)
    release.set()
    manager.close()
    assert list((root / ".trash").iterdir()) == []
    assert sorted(p.name for p in root.glob("step_*")) == [tag_of(4), tag_of(5)]


# -- what each rank owns of the state ----------------------------------------------------------
@pytest.mark.parametrize("shape", [(7,), (5, 6), (3, 4, 5)])
def test_a_flat_range_is_covered_exactly_by_contiguous_boxes(shape):
    from pretrain.train.state_pieces import flat_range_boxes

    numel = math.prod(shape)
    full = torch.arange(numel).view(shape)
    for start in range(numel):
        for stop in range(start + 1, numel + 1):
            covered = []
            for offsets, sizes, first in flat_range_boxes(shape, start, stop):
                box = full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))]
                values = box.flatten().tolist()
                assert values == list(range(first, first + len(values)))  # contiguous
                covered += values
            assert covered == list(range(start, stop))


def test_pieces_of_a_vocabulary_split_map_to_global_rows_without_padding():
    from pretrain.train.state_pieces import Piece

    vocab, width, ranks, data = 10, 3, 2, 3  # 12 padded rows: 6 per TP rank
    full = torch.arange(vocab * width, dtype=torch.float32).view(vocab, width)
    rebuilt = torch.full_like(full, -1.0)
    for tp in range(ranks):
        local = torch.zeros(6, width)
        rows = full[tp * 6 : tp * 6 + 6]
        local[: len(rows)] = rows
        flat = local.view(-1)
        bounds = [round(i * flat.numel() / data) for i in range(data + 1)]
        for start, stop in zip(bounds, bounds[1:], strict=False):  # ZeRO partitions
            piece = Piece("model/x", (vocab, width), (6, width), 0, tp, start, flat[start:stop])
            for box in piece.boxes():
                region = tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes, strict=True))
                assert (rebuilt[region] == -1).all(), "written twice"
                rebuilt[region] = box.tensor
    assert torch.equal(rebuilt, full)


def test_replicated_tensors_are_spread_over_the_replicas_by_bytes():
    from pretrain.train.state_pieces import balanced_owners

    sizes = [100, 90, 60, 50]
    owners = balanced_owners(sizes, 2)
    load = [sum(s for s, o in zip(sizes, owners, strict=True) if o == r) for r in range(2)]
    assert sorted(load) == [150, 150]
    assert balanced_owners(sizes, 2) == owners  # every replica computes the same answer


def test_the_next_steps_batches_are_built_ahead_and_equal_a_build_on_the_spot():
    import threading

    from pretrain.data.prefetch import BatchPrefetcher

    built: list[tuple[int, str]] = []
    release = threading.Event()

    def build(position: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        built.append((position, threading.current_thread().name))
        if position == 16:
            release.wait(timeout=10)
        ids = torch.arange(position, position + 8).view(2, 4)
        return [(ids, ids + 1)]

    prefetch = BatchPrefetcher(build, pin=False)
    try:
        first = prefetch.get(0, 8)  # nothing prepared: built here, then 8 is started
        assert torch.equal(first[0][0], build(0)[0][0])
        second = prefetch.get(8, 16)  # prepared by the worker while "step 0" ran
        assert torch.equal(second[0][1], build(8)[0][1])
        deadline = time.monotonic() + 10
        while len(built) < 5 and time.monotonic() < deadline:  # the worker picks 16 up
            time.sleep(0.01)
        assert [p for p, thread in built if thread.startswith("kiln-batches")] == [8, 16]
        release.set()
        jumped = prefetch.get(40, None)  # a resume elsewhere: 16's batches are not used
        assert torch.equal(jumped[0][0], build(40)[0][0])
        assert prefetch.pending is None
    finally:
        release.set()
        prefetch.close()


@pytest.mark.parametrize("feed_forward", ["gated-gelu", "relu"])
def test_encoder_decoder_formula_matches_torch_flop_counter(feed_forward, one_process):
    """A t5's FLOPs per encoder token, as torch counts them in Kiln's model's forward and
    backward (encoder and decoder of different lengths and depths), are the formula's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain.model.encoder_decoder import EncoderDecoder

    model = ModelConfig(
        arch="t5",
        num_layers=2,
        decoder_layers=3,
        hidden_size=64,
        num_heads=4,
        ffn_hidden_size=96,
        vocab_size=300,
        max_seq_length=64,
        feed_forward=feed_forward,
    )
    batch, encoder, decoder = 2, 40, 11
    net = EncoderDecoder(model, seed=0)
    inputs = torch.randint(0, 300, (batch, encoder))
    outputs, targets = torch.randint(0, 300, (2, batch, decoder))
    # the math kernel, whose matrix products torch counts (CPU flash attention is not counted)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(inputs, outputs, targets).backward()
    measured = counter.get_total_flops() / (batch * encoder)
    assert measured == pytest.approx(flops_per_token(model, encoder, 1, decoder), rel=1e-9)


# ---------------------------------------------------------------- training data


def test_data_without_a_validation_split_trains_only_with_validation_off(data, tmp_path):
    """A data directory prepared with validation_fraction 0 has no 'valid' shards: a run with
    eval.interval 0 reads it; one that validates is refused in one line."""
    import shutil

    from data_pipeline.errors import KilnError
    from pretrain.config import resolve_run
    from pretrain.train.trainer import TrainingData

    train_only = tmp_path / "train_only"
    shutil.copytree(data, train_only)
    manifest = json.loads((train_only / "manifest.json").read_text())
    manifest["shards"] = [s for s in manifest["shards"] if s["split"] == "train"]
    (train_only / "manifest.json").write_text(json.dumps(manifest))

    def config(interval: int):
        overrides = [f"data.path={train_only}", f"eval.interval={interval}"]
        return resolve_run(load_config(CONFIGS / "train" / "tiny.yaml", overrides))

    batches = TrainingData(config(0), data_rank=0).batches(0)
    assert len(batches) >= 1 and batches[0][0].numel() > 0
    with pytest.raises(KilnError, match="lists no shards of split 'valid'"):
        TrainingData(config(5), data_rank=0)
