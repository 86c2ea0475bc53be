"""Kiln's weights and model settings <-> Hugging Face's `LlamaForCausalLM` and `GPT2LMHeadModel`.

Kiln keeps every projection separate (q, k, v; gate, up) and stores linear weights as
[out, in], as `torch.nn.Linear` does, under the canonical names of `pretrain.model.transformer`.

    llama -> LlamaForCausalLM: a one-to-one renaming. Kiln's rotary embedding already uses
             Hugging Face's rotate-half convention, so no q/k permutation is needed.
    gpt   -> GPT2LMHeadModel:  q, k and v concatenated into `c_attn`, and every linear weight
             transposed, because GPT-2's `Conv1D` stores [in, out].

Conversions in both directions only rename, concatenate, split and transpose: a model taken
from Hugging Face and written back gives identical tensors.
"""

from __future__ import annotations

import torch

from pretrain.config import ModelConfig


class ConversionError(ValueError):
    """A model that has no faithful counterpart on the other side."""


# -- weights ---------------------------------------------------------------------------------
def llama_names(model: ModelConfig) -> dict[str, str]:
    """Kiln canonical name -> Hugging Face Llama name."""
    names = {
        "embedding.tokens.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
    }
    if not model.tie_embeddings:
        names["output.projection.weight"] = "lm_head.weight"
    per_layer = {
        "attention_norm.weight": "input_layernorm.weight",
        "attention.q.weight": "self_attn.q_proj.weight",
        "attention.k.weight": "self_attn.k_proj.weight",
        "attention.v.weight": "self_attn.v_proj.weight",
        "attention.out.weight": "self_attn.o_proj.weight",
        "mlp_norm.weight": "post_attention_layernorm.weight",
        "mlp.gate.weight": "mlp.gate_proj.weight",
        "mlp.up.weight": "mlp.up_proj.weight",
        "mlp.down.weight": "mlp.down_proj.weight",
    }
    for layer in range(model.num_layers):
        for ours, theirs in per_layer.items():
            names[f"blocks.{layer}.{ours}"] = f"model.layers.{layer}.{theirs}"
    return names


# Kiln name (in a block) -> (GPT-2 name, transposed); q/k/v are handled apart (c_attn).
GPT2_LAYER = {
    "attention_norm.weight": ("ln_1.weight", False),
    "attention_norm.bias": ("ln_1.bias", False),
    "attention.out.weight": ("attn.c_proj.weight", True),
    "attention.out.bias": ("attn.c_proj.bias", False),
    "mlp_norm.weight": ("ln_2.weight", False),
    "mlp_norm.bias": ("ln_2.bias", False),
    "mlp.fc.weight": ("mlp.c_fc.weight", True),
    "mlp.fc.bias": ("mlp.c_fc.bias", False),
    "mlp.down.weight": ("mlp.c_proj.weight", True),
    "mlp.down.bias": ("mlp.c_proj.bias", False),
}
GPT2_GLOBAL = {
    "embedding.tokens.weight": "transformer.wte.weight",
    "embedding.positions.weight": "transformer.wpe.weight",
    "norm.weight": "transformer.ln_f.weight",
    "norm.bias": "transformer.ln_f.bias",
}


def check_exportable(model: ModelConfig) -> None:
    if model.arch == "gpt" and model.num_kv_heads != model.num_heads:
        raise ConversionError(
            f"model.num_kv_heads = {model.num_kv_heads}: GPT-2 has no grouped-query attention "
            f"(num_heads = {model.num_heads}), so this model has no Hugging Face GPT-2 form"
        )


def to_hf(model: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Kiln canonical weights -> the state dict of the Hugging Face model."""
    check_exportable(model)
    if model.arch == "llama":
        return {theirs: weights[ours] for ours, theirs in llama_names(model).items()}
    out = {theirs: weights[ours] for ours, theirs in GPT2_GLOBAL.items()}
    if not model.tie_embeddings:
        out["lm_head.weight"] = weights["output.projection.weight"]
    for layer in range(model.num_layers):
        ours, theirs = f"blocks.{layer}.", f"transformer.h.{layer}."
        for name, (hf_name, transposed) in GPT2_LAYER.items():
            tensor = weights[ours + name]
            out[theirs + hf_name] = tensor.t().contiguous() if transposed else tensor
        q, k, v = (weights[f"{ours}attention.{p}.weight"] for p in "qkv")
        out[theirs + "attn.c_attn.weight"] = torch.cat([q, k, v]).t().contiguous()
        out[theirs + "attn.c_attn.bias"] = torch.cat(
            [weights[f"{ours}attention.{p}.bias"] for p in "qkv"]
        )
    return out


def from_hf(model: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of a Hugging Face model -> Kiln canonical weights."""

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ConversionError(f"the Hugging Face checkpoint has no tensor {name}")
        return tensors[name]

    if model.arch == "llama":
        return {ours: take(theirs) for ours, theirs in llama_names(model).items()}
    out = {ours: take(theirs) for ours, theirs in GPT2_GLOBAL.items()}
    if not model.tie_embeddings:
        out["output.projection.weight"] = take("lm_head.weight")
    for layer in range(model.num_layers):
        ours, theirs = f"blocks.{layer}.", f"transformer.h.{layer}."
        for name, (hf_name, transposed) in GPT2_LAYER.items():
            tensor = take(theirs + hf_name)
            out[ours + name] = tensor.t().contiguous() if transposed else tensor
        qkv = take(theirs + "attn.c_attn.weight").t()
        bias = take(theirs + "attn.c_attn.bias")
        for part, rows, b in zip("qkv", qkv.chunk(3), bias.chunk(3), strict=True):
            out[f"{ours}attention.{part}.weight"] = rows.contiguous()
            out[f"{ours}attention.{part}.bias"] = b.contiguous()
    return out


# -- settings --------------------------------------------------------------------------------
def hf_config(model: ModelConfig, eos_id: int | None, dtype: torch.dtype):
    """The `transformers` configuration of the exported model."""
    from transformers import GPT2Config, LlamaConfig

    check_exportable(model)
    dtype_name = str(dtype).removeprefix("torch.")
    common = dict(
        vocab_size=model.vocab_size,
        tie_word_embeddings=bool(model.tie_embeddings),
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        initializer_range=model.init_std,
        dtype=dtype_name,
    )
    if model.arch == "llama":
        config = LlamaConfig(
            hidden_size=model.hidden_size,
            intermediate_size=model.ffn_hidden_size,
            num_hidden_layers=model.num_layers,
            num_attention_heads=model.num_heads,
            num_key_value_heads=model.num_kv_heads,
            head_dim=model.head_dim,
            hidden_act="silu",
            max_position_embeddings=model.max_seq_length,
            rms_norm_eps=model.norm_eps,
            rope_theta=model.rope_base,
            attention_bias=False,
            mlp_bias=False,
            **common,
        )
        config.architectures = ["LlamaForCausalLM"]
    else:
        config = GPT2Config(
            n_embd=model.hidden_size,
            n_layer=model.num_layers,
            n_head=model.num_heads,
            n_inner=model.ffn_hidden_size,
            n_positions=model.max_seq_length,
            activation_function="gelu_new",
            layer_norm_epsilon=model.norm_eps,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False,
            **common,
        )
        config.architectures = ["GPT2LMHeadModel"]
    return config


def model_settings(config) -> dict:
    """Kiln's `model` section for a Hugging Face configuration, or a clear refusal."""

    def refuse(key: str, value, rule: str) -> ConversionError:
        return ConversionError(f"{config.model_type} config {key} = {value}: {rule}")

    if config.model_type == "llama":
        rope = getattr(config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise refuse("rope_parameters.rope_type", rope_type, "Kiln has plain RoPE only")
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        if config.hidden_act != "silu":
            raise refuse("hidden_act", config.hidden_act, "Kiln's Llama MLP is SwiGLU (silu)")
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(config, flag, False):
                raise refuse(flag, True, "Kiln's Llama has no biases")
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        if head_dim * config.num_attention_heads != config.hidden_size:
            raise refuse("head_dim", head_dim, "Kiln needs head_dim x num_heads = hidden_size")
        return {
            "arch": "llama",
            "num_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "num_heads": config.num_attention_heads,
            "num_kv_heads": config.num_key_value_heads or config.num_attention_heads,
            "ffn_hidden_size": config.intermediate_size,
            "vocab_size": config.vocab_size,
            "max_seq_length": config.max_position_embeddings,
            "rope_base": float(theta),
            "tie_embeddings": bool(config.tie_word_embeddings),
            "norm_eps": float(config.rms_norm_eps),
            "init_std": float(config.initializer_range),
        }
    if config.model_type == "gpt2":
        if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise refuse(
                "activation_function", config.activation_function, "Kiln's GPT uses tanh GELU"
            )
        if config.scale_attn_by_inverse_layer_idx or not config.scale_attn_weights:
            raise refuse("scale_attn_*", True, "Kiln scales attention by 1/sqrt(head size) only")
        return {
            "arch": "gpt",
            "num_layers": config.n_layer,
            "hidden_size": config.n_embd,
            "num_heads": config.n_head,
            "num_kv_heads": config.n_head,
            "ffn_hidden_size": config.n_inner or 4 * config.n_embd,
            "vocab_size": config.vocab_size,
            "max_seq_length": config.n_positions,
            "tie_embeddings": bool(config.tie_word_embeddings),
            "norm_eps": float(config.layer_norm_epsilon),
            "init_std": float(config.initializer_range),
        }
    raise ConversionError(
        f"model_type = {config.model_type}: Kiln imports Llama (llama) and GPT-2 (gpt2) models"
    )
