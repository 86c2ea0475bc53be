"""The closed-form parameter count against published sizes and against real models.

The real models are Hugging Face's own implementations, built on the meta device (no memory,
no download): an independent count of every tensor for each preset's shape.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from pretrain.config import ModelConfig, load_config
from pretrain.model.sizing import count_parameters, human_count, padded_vocab_size
from tests.conftest import CONFIGS

PRESETS = ["tiny", "125m", "350m", "1.3b", "llama-1b", "llama-7b", "llama-13b"]

# Published totals. Llama: the released checkpoints' tensor counts. GPT-3: the paper's
# rounded sizes (its 125M/350M/1.3B); ours use a 2048-position table and V = 50257.
PUBLISHED = {
    "llama-7b": 6_738_415_616,
    "llama-13b": 13_015_864_320,
    "llama-1b": 1_100_048_384,  # TinyLlama-1.1B
}
ROUNDED = {"125m": 125e6, "350m": 350e6, "1.3b": 1.3e9}


def preset(name: str) -> ModelConfig:
    return load_config(CONFIGS / "model" / f"{name}.yaml").model


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_llama_presets_match_released_checkpoints(name):
    assert count_parameters(preset(name)) == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(ROUNDED))
def test_gpt_presets_match_the_gpt3_paper(name):
    assert count_parameters(preset(name)) == pytest.approx(ROUNDED[name], rel=0.02)


def test_tiny_has_a_few_million_parameters():
    assert 1e6 < count_parameters(preset("tiny")) < 20e6


def hf_model(model: ModelConfig, vocab: int) -> torch.nn.Module:
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
        )
        cls = LlamaForCausalLM
    else:
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=model.hidden_size,
            n_inner=model.ffn_hidden_size,
            n_layer=model.num_layers,
            n_head=model.num_heads,
            n_positions=model.max_seq_length,
            tie_word_embeddings=model.tie_embeddings,
        )
        cls = GPT2LMHeadModel
    with torch.device("meta"):
        return cls(config)


@pytest.mark.parametrize("name", PRESETS)
def test_formula_counts_what_a_real_model_holds(name):
    model = preset(name)
    vocab = padded_vocab_size(model.vocab_size, 2)
    real = sum(p.numel() for p in hf_model(model, vocab).parameters())
    assert count_parameters(model, vocab_size=vocab) == real


# GPT-2 has no grouped-query attention, so GQA is checked on the Llama side here; Kiln's own
# model checks the gpt formula with GQA once it exists.
@pytest.mark.parametrize(("arch", "kv_heads"), [("llama", 2), ("llama", 6), ("gpt", 6)])
@pytest.mark.parametrize("tie", [True, False])
def test_formula_with_grouped_query_attention_and_tying(arch, kv_heads, tie):
    model = ModelConfig(
        arch=arch,
        num_layers=3,
        hidden_size=96,
        num_heads=6,
        num_kv_heads=kv_heads,
        vocab_size=1000,
        max_seq_length=64,
        tie_embeddings=tie,
    )
    real = sum(p.numel() for p in hf_model(model, 1000).parameters())
    assert count_parameters(model) == real


def test_vocabulary_padding():
    assert padded_vocab_size(50257, 1) == 50304
    assert padded_vocab_size(50257, 8) == 51200
    assert padded_vocab_size(32000, 1) == 32000
    assert padded_vocab_size(32000, 4) == 32256


def test_human_count():
    assert human_count(6_738_415_616) == "6.74B"
    assert human_count(7_096_576) == "7.10M"
    assert human_count(999) == "999"


def test_t5_base_preset_matches_the_released_t5_v1_1_base(one_process):
    """google/t5-v1_1-base holds 247,577,856 parameters: Hugging Face's T5 of the preset's
    shape (its lm_head untied, as v1.1's checkpoint is) counts the same, as does the formula,
    and Kiln's own model holds that many with the vocabulary padded."""
    from transformers import T5Config, T5ForConditionalGeneration

    from pretrain.model.encoder_decoder import EncoderDecoder

    model = preset("t5-base")
    config = T5Config(
        vocab_size=model.vocab_size,
        d_model=model.hidden_size,
        d_kv=model.head_dim,
        d_ff=model.ffn_hidden_size,
        num_layers=model.num_layers,
        num_decoder_layers=model.decoder_layers,
        num_heads=model.num_heads,
        feed_forward_proj=model.feed_forward,
    )
    with torch.device("meta"):
        real = T5ForConditionalGeneration(config)
    # the pinned transformers always ties lm_head in memory; v1.1's checkpoint has its own
    untied_head = model.vocab_size * model.hidden_size
    assert sum(p.numel() for p in real.parameters()) + untied_head == 247_577_856
    assert count_parameters(model) == 247_577_856
    with torch.device("meta"):
        kiln = EncoderDecoder(model, initialize=False)
    padded = padded_vocab_size(model.vocab_size)
    assert sum(p.numel() for p in kiln.parameters()) == count_parameters(model, padded)
