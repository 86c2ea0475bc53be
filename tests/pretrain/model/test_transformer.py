"""The decoder model: sizes equal the closed-form count, causality, seeding, and tensor
parallelism (real gloo processes) equal to a single process."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pretrain.config import ModelConfig
from pretrain.model.sizing import count_parameters, padded_vocab_size
from pretrain.model.transformer import Transformer
from tests.support.distributed import free_port, run_ranks
from tests.support.model_workers import collectives_per_step, tensor_parallel_step

# Not a multiple of 128: padded to 1152 rows on one rank and to 1280 on two.
VOCAB = 1100
PADDED = ("embedding.tokens.weight", "output.projection.weight", "embedding.head.bias")
BASE = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_heads": 4,
    "vocab_size": VOCAB,
    "max_seq_length": 32,
}
VARIANTS = {
    "llama-gqa-untied": {**BASE, "arch": "llama", "num_kv_heads": 2},
    "llama-tied": {**BASE, "arch": "llama", "tie_embeddings": True},
    "gpt-tied": {**BASE, "arch": "gpt"},
    "gpt-gqa-untied": {**BASE, "arch": "gpt", "num_kv_heads": 2, "tie_embeddings": False},
    "bert": {**BASE, "arch": "bert"},
    "bert-rotary": {**BASE, "arch": "bert", "positions": "rotary"},
}
DECODERS = sorted(name for name in VARIANTS if not name.startswith("bert"))


@pytest.fixture(scope="module")
def single_rank():
    """A world of one process: megatron-core's layers need its parallel state."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def build(name: str, seed: int = 0) -> Transformer:
    return Transformer(ModelConfig(**VARIANTS[name]), tensor=1, seed=seed)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_parameters_equal_the_closed_form_count(single_rank, name):
    model = build(name)
    config = model.config
    held = sum(p.numel() for p in model.parameters())
    assert held == count_parameters(config, vocab_size=padded_vocab_size(config.vocab_size, 1))


def test_the_tiny_preset_holds_what_kiln_config_show_prints(single_rank):
    from pretrain.config import load_config
    from tests.conftest import CONFIGS

    config = load_config(CONFIGS / "model/tiny.yaml").model
    held = sum(p.numel() for p in Transformer(config).parameters())
    assert held == count_parameters(config) == 7_096_576  # 8192 is already a multiple of 128


@pytest.mark.parametrize("name", DECODERS)
def test_initial_loss_is_near_uniform(single_rank, name):
    model = build(name)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(ids[:, :-1], ids[:, 1:])
    assert abs(loss.item() - math.log(VOCAB)) < 0.05  # the padding rows take no probability


def test_the_loss_covers_the_real_vocabulary_only(single_rank):
    model = build("llama-gqa-untied", seed=4)
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(2))
    logits = model(ids[:, :-1])
    assert logits.shape[-1] == padded_vocab_size(VOCAB, 1) > VOCAB
    loss = model(ids[:, :-1], ids[:, 1:])
    expected = torch.nn.functional.cross_entropy(
        logits[..., :VOCAB].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    padding = model.output.projection.weight.grad[VOCAB:]
    assert torch.count_nonzero(padding) == 0 and torch.count_nonzero(
        model.output.projection.weight.grad[:VOCAB]
    )


@pytest.mark.parametrize("name", ["bert", "bert-rotary"])
def test_every_encoder_position_sees_every_token(single_rank, name):
    """Bidirectional attention: changing token j changes the logits at every i, also i < j."""
    model = build(name)
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, 12] = (changed[0, 12] + 1) % VOCAB
    before, after = model(ids), model(changed)
    for position in range(20):
        assert not torch.equal(before[0, position], after[0, position]), position


def test_the_masked_lm_loss_counts_the_chosen_positions_only(single_rank):
    from pretrain.data.masking import IGNORED

    model = build("bert", seed=2)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    targets = torch.full_like(ids, IGNORED)
    chosen = torch.zeros_like(ids, dtype=torch.bool)
    chosen[0, 3], chosen[1, 7], chosen[1, 9] = True, True, True
    targets[chosen] = ids[chosen]
    logits = model(ids)[..., :VOCAB]
    expected = torch.nn.functional.cross_entropy(logits[chosen], ids[chosen])
    assert model(ids, targets).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("name", DECODERS)
def test_no_position_sees_the_future(single_rank, name):
    model = build(name)
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % VOCAB
    before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :12], after[:, :12], rtol=0, atol=0)
    assert not torch.equal(before[:, 12:], after[:, 12:])


def test_same_seed_same_weights_and_the_global_random_state_is_left_alone(single_rank):
    state = torch.random.get_rng_state()
    a, b, c = (
        build("llama-gqa-untied", 7),
        build("llama-gqa-untied", 7),
        build("llama-gqa-untied", 8),
    )
    assert torch.equal(state, torch.random.get_rng_state())
    for (name, x), y, z in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(x, y), name
        if "norm" not in name and "bias" not in name:
            assert not torch.equal(x, z), name


def test_residual_projections_use_the_scaled_init(single_rank):
    model = Transformer(ModelConfig(**{**VARIANTS["llama-tied"], "num_layers": 8}), seed=3)
    block = model.blocks[0]
    scaled = 0.02 / math.sqrt(2 * 8)
    assert block.attention.out.weight.std().item() == pytest.approx(scaled, rel=0.1)
    assert block.mlp.down.weight.std().item() == pytest.approx(scaled, rel=0.1)
    assert block.attention.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert block.mlp.gate_up.weight.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt-tied", "bert"])
def test_tensor_parallel_equals_one_process(tmp_path, name):
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, 24), generator=generator)
    targets = torch.randint(0, VOCAB, (2, 24), generator=generator)
    config = VARIANTS[name]
    one = run_ranks(tensor_parallel_step, 1, tmp_path, config, 11, ids, targets)
    two = run_ranks(tensor_parallel_step, 2, tmp_path, config, 11, ids, targets)
    # the vocabulary is padded to 128 x TP rows (1152 on one rank, 1280 on two): compare the
    # real vocabulary; the loss ignores the padding, so it agrees although the padding differs
    for parameter, weight in one["weights"].items():
        rows = slice(0, VOCAB) if parameter in PADDED else slice(None)
        assert torch.equal(weight[rows], two["weights"][parameter][rows]), parameter
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    torch.testing.assert_close(
        two["logits"][..., :VOCAB], one["logits"][..., :VOCAB], rtol=1e-5, atol=1e-5
    )
    for parameter, grad in one["grads"].items():
        rows = slice(0, VOCAB) if parameter in PADDED else slice(None)
        torch.testing.assert_close(
            two["grads"][parameter][rows], grad[rows], rtol=1e-5, atol=1e-6, msg=parameter
        )


@pytest.mark.parametrize("name", ["llama-tied", "gpt-gqa-untied"])
def test_a_model_built_to_be_loaded_draws_no_random_weights(single_rank, name, monkeypatch):
    """A resume (and eval, generate, export) loads every weight next: drawing the random
    initialisation first would cost minutes at 7B. Same shapes, no draws."""
    draws = []
    real = torch.nn.init.normal_

    def counting(tensor, *args, **kwargs):
        draws.append(tuple(tensor.shape))
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", counting)
    model = Transformer(ModelConfig(**VARIANTS[name]), tensor=1, seed=0, initialize=False)
    # Only torch's own nn.Embedding draws in its constructor (GPT's small position table).
    positions = (BASE["max_seq_length"], BASE["hidden_size"])
    assert draws == ([] if name.startswith("llama") else [positions])
    drawn = build(name)
    assert len(draws) > 3  # the default path draws every weight, through the same function

    def layout(module: torch.nn.Module) -> dict:
        """Shape and tensor-parallel marks (what resharding and the grad norm rely on)."""
        marks = ("tensor_model_parallel", "partition_dim", "partition_stride")
        return {
            n: (p.shape, *(getattr(p, mark, None) for mark in marks))
            for n, p in module.named_parameters()
        }

    assert layout(model) == layout(drawn)
    assert any(marks[1] for marks in layout(model).values())  # some weights are split


@pytest.mark.integration
def test_a_tensor_parallel_layer_costs_two_all_reduces_each_way(tmp_path):
    """Fused q/k/v and gate/up: per layer one all-reduce after each row-parallel projection in
    forward (attention out, MLP down) and one of the input gradient of each column-parallel
    layer in backward (qkv, gate_up); five in backward were separate q, k, v, gate, up."""
    config = VARIANTS["llama-gqa-untied"]
    one = run_ranks(collectives_per_step, 2, tmp_path, config, 1)
    three = run_ranks(collectives_per_step, 2, tmp_path, config, 3)
    per_layer = {name: (three.get(name, 0) - one.get(name, 0)) / 2 for name in three}
    assert per_layer == {"gloo:all_reduce": 4}, (one, three)


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt-tied"])
@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_compiled_block_compute_gives_the_eager_numbers(single_rank, name, recompute):
    """`train.compile`: inductor's kernels for the norms, rotary attention and MLP
    activation give the eager loss and gradients (fp32, CPU) and really are compiled."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 32), generator=generator)
    targets = torch.randint(0, VOCAB, (2, 32), generator=generator)
    results = []
    for compile in (False, True):
        model = Transformer(
            ModelConfig(**VARIANTS[name]), seed=4, recompute=recompute, compile=compile
        )
        model.train()
        loss = model(ids, targets)
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)
    for parameter, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[parameter], grad, rtol=1e-5, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 3  # norm, attention, MLP


def test_the_bf16_loss_keeps_no_fp32_copy_of_the_logits_and_equals_the_whole_loss(single_rank):
    from pretrain.model.transformer import cross_entropy

    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 16, 1152, generator=generator).to(torch.bfloat16)
    targets = torch.randint(0, VOCAB, (2, 16), generator=generator)
    outcomes = {}
    for name, chunk in (("whole", None), ("chunked", 5 * 1152)):  # 7 chunks, the last short
        leaf = logits.clone().requires_grad_()
        saved: list[torch.Tensor] = []

        def keep(tensor: torch.Tensor, saved=saved) -> torch.Tensor:
            saved.append(tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            loss = cross_entropy(leaf, targets, VOCAB, chunk_elements=chunk)
        fp32_saved = max((t.numel() for t in saved if t.dtype == torch.float32), default=0)
        loss.backward()
        outcomes[name] = (loss.item(), leaf.grad, fp32_saved)
    whole, chunked = outcomes["whole"], outcomes["chunked"]
    assert whole[2] == logits.numel()  # the whole loss keeps the fp32 softmax of every logit
    assert chunked[2] == 0
    assert chunked[0] == pytest.approx(whole[0], rel=1e-6)
    torch.testing.assert_close(chunked[1], whole[1], rtol=0, atol=0)
