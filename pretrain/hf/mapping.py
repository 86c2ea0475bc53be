"""Kiln's weights and model settings <-> Hugging Face's `LlamaForCausalLM`, `GPT2LMHeadModel`,
`MegatronBertForMaskedLM` and `T5ForConditionalGeneration`.

Kiln keeps every projection separate (q, k, v; gate, up) and stores linear weights as
[out, in], as `torch.nn.Linear` does, under the canonical names of `pretrain.model.transformer`.

    llama -> LlamaForCausalLM: a one-to-one renaming. Kiln's rotary embedding already uses
             Hugging Face's rotate-half convention, so no q/k permutation is needed.
    gpt   -> GPT2LMHeadModel:  q, k and v concatenated into `c_attn`, and every linear weight
             transposed, because GPT-2's `Conv1D` stores [in, out].
    bert  -> MegatronBertForMaskedLM: a one-to-one renaming. Kiln's bert is a pre-LayerNorm
             encoder, which is Megatron-LM's BERT and so Hugging Face's MegatronBert (not
             `BertForMaskedLM`, whose LayerNorms come after each residual sum). Kiln has no
             token types: the export carries one all-zero token-type row (what Hugging Face adds
             for token_type_ids = 0), and an import takes only an all-zero table.
    t5    -> T5ForConditionalGeneration: a one-to-one renaming (gate, up = `wi_0`, `wi_1`;
             ReLU's fc = `wi`; each stack's bias table in its first layer, as T5 keeps it).
             v1.1 (gated-GELU, untied head) and v1.0 (ReLU, tied head scaled by
             hidden_size**-0.5) map both ways; `transformers` tells them apart by
             `scale_decoder_outputs` (older releases by `tie_word_embeddings`).

Conversions in both directions only rename, concatenate, split and transpose: a model taken
from Hugging Face and written back gives identical tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from data_pipeline.errors import KilnError
from pretrain.config import ResolvedModel, ResolvedT5Model, is_encoder_decoder


class ConversionError(KilnError):
    """A model that has no faithful counterpart on the other side."""


# -- weights ---------------------------------------------------------------------------------
def llama_names(model: ResolvedModel) -> dict[str, str]:
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


# Kiln name (in a block) -> MegatronBert name (in `bert.encoder.layer.{i}.`); both [out, in].
BERT_LAYER = {
    "attention_norm.weight": "attention.ln.weight",
    "attention_norm.bias": "attention.ln.bias",
    "attention.q.weight": "attention.self.query.weight",
    "attention.q.bias": "attention.self.query.bias",
    "attention.k.weight": "attention.self.key.weight",
    "attention.k.bias": "attention.self.key.bias",
    "attention.v.weight": "attention.self.value.weight",
    "attention.v.bias": "attention.self.value.bias",
    "attention.out.weight": "attention.output.dense.weight",
    "attention.out.bias": "attention.output.dense.bias",
    "mlp_norm.weight": "ln.weight",
    "mlp_norm.bias": "ln.bias",
    "mlp.fc.weight": "intermediate.dense.weight",
    "mlp.fc.bias": "intermediate.dense.bias",
    "mlp.down.weight": "output.dense.weight",
    "mlp.down.bias": "output.dense.bias",
}
# Kiln's masked-LM head sits in the embedding module (`Embedding.head`); its decoder is the
# word embedding (tied), so it has no name of its own on either side.
BERT_HEAD = "embedding.head."
BERT_GLOBAL = {
    "embedding.tokens.weight": "bert.embeddings.word_embeddings.weight",
    "embedding.positions.weight": "bert.embeddings.position_embeddings.weight",
    "norm.weight": "bert.encoder.ln.weight",
    "norm.bias": "bert.encoder.ln.bias",
    BERT_HEAD + "dense.weight": "cls.predictions.transform.dense.weight",
    BERT_HEAD + "dense.bias": "cls.predictions.transform.dense.bias",
    BERT_HEAD + "norm.weight": "cls.predictions.transform.LayerNorm.weight",
    BERT_HEAD + "norm.bias": "cls.predictions.transform.LayerNorm.bias",
    BERT_HEAD + "bias": "cls.predictions.bias",  # one per vocabulary row, after the decoder
}
BERT_TOKEN_TYPES = "bert.embeddings.token_type_embeddings.weight"


def bert_names(model: ResolvedModel) -> dict[str, str]:
    """Kiln canonical name -> Hugging Face MegatronBert name."""
    names = dict(BERT_GLOBAL)
    for layer in range(model.num_layers):
        for ours, theirs in BERT_LAYER.items():
            names[f"blocks.{layer}.{ours}"] = f"bert.encoder.layer.{layer}.{theirs}"
    return names


# Kiln name (in a block) -> T5 name (in `{stack}.block.{i}.layer.`). The encoder's layers are
# self-attention (0) and MLP (1), the decoder's self-attention (0), cross-attention (1) and
# MLP (2): the MLP's names are completed by `t5_names`.
T5_SELF_ATTENTION = {
    "attention_norm.weight": "0.layer_norm.weight",
    "attention.q.weight": "0.SelfAttention.q.weight",
    "attention.k.weight": "0.SelfAttention.k.weight",
    "attention.v.weight": "0.SelfAttention.v.weight",
    "attention.out.weight": "0.SelfAttention.o.weight",
}
T5_CROSS_ATTENTION = {
    "cross_norm.weight": "1.layer_norm.weight",
    "cross_attention.q.weight": "1.EncDecAttention.q.weight",
    "cross_attention.k.weight": "1.EncDecAttention.k.weight",
    "cross_attention.v.weight": "1.EncDecAttention.v.weight",
    "cross_attention.out.weight": "1.EncDecAttention.o.weight",
}
T5_MLP = {
    "gated-gelu": {"mlp.gate.weight": "wi_0.weight", "mlp.up.weight": "wi_1.weight"},
    "relu": {"mlp.fc.weight": "wi.weight"},
}
T5_EMBEDDING = "shared.weight"
T5_HEAD = "lm_head.weight"
# Copies of `shared.weight` that `transformers` ties to it (older releases saved them), and
# the cross-attention bias table old checkpoints carry and T5 never uses.
T5_EMBEDDING_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
T5_UNUSED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
# An imported t5's max_seq_length unless the import's overrides set it: T5's relative
# positions have no limit; this is the T5 paper's input length.
T5_MAX_SEQ_LENGTH = 512


def t5_names(model: ResolvedT5Model) -> dict[str, str]:
    """Kiln canonical name -> Hugging Face T5 name."""
    names = {"embedding.tokens.weight": T5_EMBEDDING}
    if not model.tie_embeddings:
        names["output.projection.weight"] = T5_HEAD
    for stack, layers in (("encoder", model.num_layers), ("decoder", model.decoder_layers)):
        decoder = stack == "decoder"
        mlp = f"{2 if decoder else 1}."
        per_layer = {
            **T5_SELF_ATTENTION,
            **(T5_CROSS_ATTENTION if decoder else {}),
            "mlp_norm.weight": mlp + "layer_norm.weight",
            **{
                ours: f"{mlp}DenseReluDense.{theirs}"
                for ours, theirs in T5_MLP[model.feed_forward].items()
            },
            "mlp.down.weight": mlp + "DenseReluDense.wo.weight",
        }
        for layer in range(layers):
            for ours, theirs in per_layer.items():
                names[f"{stack}.blocks.{layer}.{ours}"] = f"{stack}.block.{layer}.layer.{theirs}"
        names[f"{stack}.position_bias.weight"] = (
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        )
        names[f"{stack}.norm.weight"] = f"{stack}.final_layer_norm.weight"
    return names


# What each architecture is on the Hugging Face side: its name there and its positions.
HF_FORMS = {
    "llama": ("Llama", "rotary"),
    "gpt": ("GPT-2", "learned"),
    "bert": ("MegatronBert", "learned"),
    "t5": ("T5", "relative"),
}
POSITION_KINDS = {"rotary": "rotary", "learned": "learned absolute", "relative": "relative"}


def check_exportable(model: ResolvedModel) -> None:
    name, positions = HF_FORMS[model.arch]
    if model.positions != positions:
        kind = POSITION_KINDS[positions]
        raise ConversionError(
            f"model.positions = {model.positions}: Hugging Face's {name} has {kind} position "
            f"embeddings only, so this {model.arch} model has no Hugging Face form"
        )
    if model.arch != "llama" and model.num_kv_heads != model.num_heads:
        raise ConversionError(
            f"model.num_kv_heads = {model.num_kv_heads}: {name} has no grouped-query attention "
            f"(num_heads = {model.num_heads}), so this model has no Hugging Face {name} form"
        )


def to_hf(model: ResolvedModel, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Kiln canonical weights -> the state dict of the Hugging Face model."""
    check_exportable(model)
    if model.arch == "llama":
        return {theirs: weights[ours] for ours, theirs in llama_names(model).items()}
    if model.arch == "bert":
        out = {theirs: weights[ours] for ours, theirs in bert_names(model).items()}
        tokens = weights["embedding.tokens.weight"]
        out[BERT_TOKEN_TYPES] = tokens.new_zeros(1, tokens.shape[1])  # type 0 adds nothing
        return out
    if is_encoder_decoder(model):
        return {theirs: weights[ours] for ours, theirs in t5_names(model).items()}
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


def from_hf(model: ResolvedModel, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of a Hugging Face model -> Kiln canonical weights."""

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ConversionError(f"the Hugging Face checkpoint has no tensor {name}")
        return tensors[name]

    if model.arch == "llama":
        return {ours: take(theirs) for ours, theirs in llama_names(model).items()}
    if model.arch == "bert":
        if torch.count_nonzero(take(BERT_TOKEN_TYPES)):
            raise ConversionError(
                f"{BERT_TOKEN_TYPES} is not all zeros: Kiln's bert has no token types, so "
                "this model's outputs cannot be kept"
            )
        return {ours: take(theirs) for ours, theirs in bert_names(model).items()}
    if is_encoder_decoder(model):
        names = t5_names(model)
        check_t5_tensors(model, tensors, set(names.values()))
        return {ours: take(theirs) for ours, theirs in names.items()}
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


def check_t5_tensors(
    model: ResolvedModel, tensors: dict[str, torch.Tensor], used: set[str]
) -> None:
    """A T5 checkpoint Kiln's t5 holds whole: one embedding (its copies equal to it), a head
    tied and scaled (v1.0) or its own (v1.1), and nothing else."""
    shared = tensors.get(T5_EMBEDDING)
    if shared is None:
        raise ConversionError(f"the Hugging Face checkpoint has no tensor {T5_EMBEDDING}")
    for copy in T5_EMBEDDING_COPIES:
        if copy in tensors and not torch.equal(tensors[copy], shared):
            raise ConversionError(
                f"{copy} differs from {T5_EMBEDDING}: Kiln's t5 embeds the encoder's and the "
                "decoder's tokens with one matrix"
            )
    head = tensors.get(T5_HEAD)
    if model.tie_embeddings and head is not None and not torch.equal(head, shared):
        raise ConversionError(
            f"{T5_HEAD} differs from {T5_EMBEDDING} while scale_decoder_outputs is true: Kiln's "
            "t5 scales the decoder's output only before a head tied to the embedding (T5 v1.0)"
        )
    if not model.tie_embeddings and head is None:
        raise ConversionError(
            f"the checkpoint has no {T5_HEAD} while scale_decoder_outputs is false: T5 v1.1 "
            "has a head of its own, and Kiln takes no untied head it is not given"
        )
    known = used | {T5_HEAD, *T5_EMBEDDING_COPIES, *T5_UNUSED}
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise ConversionError(
            f"the checkpoint has tensors Kiln's t5 has no place for: {unknown[:3]} "
            f"({len(unknown)} in all)"
        )


# -- settings --------------------------------------------------------------------------------
def hf_config(
    model: ResolvedModel, eos_id: int | None, dtype: torch.dtype, pad_id: int | None = None
):
    """The `transformers` configuration of the exported model (`pad_id`: bert's padding; t5's
    padding and decoder start). A t5's in memory: `transformers` 5 always ties T5's head to
    its embedding in memory and reads v1.1 from `scale_decoder_outputs` = False;
    `pretrain.hf.export.write_config` writes `tie_word_embeddings: false` for it as well."""
    check_exportable(model)
    dtype_name = str(dtype).removeprefix("torch.")
    if is_encoder_decoder(model):
        return _t5_config(model, eos_id, pad_id, dtype_name)
    common = dict(
        vocab_size=model.vocab_size,
        tie_word_embeddings=bool(model.tie_embeddings),
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        initializer_range=model.init_std,
        dtype=dtype_name,
    )
    if model.arch == "bert":
        return _bert_config(model, pad_id, common)
    if model.arch == "llama":
        return _llama_config(model, common)
    return _gpt2_config(model, common)


def _t5_config(model: ResolvedT5Model, eos_id: int | None, pad_id: int | None, dtype: str):
    from transformers import T5Config

    config = T5Config(
        vocab_size=model.vocab_size,
        d_model=model.hidden_size,
        d_kv=model.head_dim,
        d_ff=model.ffn_hidden_size,
        num_layers=model.num_layers,
        num_decoder_layers=model.decoder_layers,
        num_heads=model.num_heads,
        relative_attention_num_buckets=model.relative_buckets,
        relative_attention_max_distance=model.relative_max_distance,
        dropout_rate=0.0,
        layer_norm_epsilon=model.norm_eps,
        initializer_factor=1.0,
        feed_forward_proj=model.feed_forward,
        is_encoder_decoder=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        decoder_start_token_id=pad_id,
        tie_word_embeddings=bool(model.tie_embeddings),  # -> scale_decoder_outputs
        dtype=dtype,
    )
    config.architectures = ["T5ForConditionalGeneration"]
    return config


def _bert_config(model: ResolvedModel, pad_id: int | None, common: dict):
    from transformers import MegatronBertConfig

    config = MegatronBertConfig(
        hidden_size=model.hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        intermediate_size=model.ffn_hidden_size,
        hidden_act="gelu",  # exact (erf) GELU, as Kiln's bert
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=model.max_seq_length,
        type_vocab_size=1,
        layer_norm_eps=model.norm_eps,
        pad_token_id=pad_id,
        is_decoder=False,
        **{**common, "bos_token_id": None},
    )
    config.architectures = ["MegatronBertForMaskedLM"]
    return config


def _llama_config(model: ResolvedModel, common: dict):
    from transformers import LlamaConfig

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
    return config


def _gpt2_config(model: ResolvedModel, common: dict):
    from transformers import GPT2Config

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

    readers = {
        "llama": _llama_settings,
        "gpt2": _gpt2_settings,
        "megatron-bert": _bert_settings,
        "t5": t5_settings,
    }
    if config.model_type not in readers:
        raise ConversionError(
            f"model_type = {config.model_type}: Kiln imports Llama (llama), GPT-2 (gpt2), "
            "MegatronBert (megatron-bert) and T5 (t5) models"
        )
    return readers[config.model_type](config, refuse)


def _llama_settings(config, refuse: Callable[[str, object, str], ConversionError]) -> dict:
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
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
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


def _gpt2_settings(config, refuse: Callable[[str, object, str], ConversionError]) -> dict:
    if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise refuse("activation_function", config.activation_function, "Kiln's GPT uses tanh GELU")
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


def _bert_settings(config, refuse: Callable[[str, object, str], ConversionError]) -> dict:
    position = getattr(config, "position_embedding_type", None) or "absolute"
    if position != "absolute":
        raise refuse(
            "position_embedding_type", position, "Kiln's bert has learned absolute positions"
        )
    if config.hidden_act != "gelu":
        raise refuse("hidden_act", config.hidden_act, "Kiln's bert uses exact GELU (gelu)")
    if not getattr(config, "tie_word_embeddings", True):
        raise refuse("tie_word_embeddings", False, "Kiln's bert decodes with its embedding matrix")
    if config.is_decoder:
        raise refuse("is_decoder", True, "Kiln's bert is an encoder (bidirectional attention)")
    return {
        "arch": "bert",
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_attention_heads,
        "ffn_hidden_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "max_seq_length": config.max_position_embeddings,
        "positions": "learned",
        "tie_embeddings": True,
        "norm_eps": float(config.layer_norm_eps),
        "init_std": float(config.initializer_range),
    }


# T5's (is_gated_act, dense_act_fn), derived from feed_forward_proj -> Kiln's feed_forward
T5_FEED_FORWARD = {
    (True, "gelu_new"): "gated-gelu",
    (True, "gelu_pytorch_tanh"): "gated-gelu",
    (False, "relu"): "relu",
}


def t5_settings(config, refuse: Callable[[str, object, str], ConversionError]) -> dict:
    """Kiln's t5 of a `T5Config`: v1.1 (gated-GELU; `scale_decoder_outputs` false: an untied
    head) or v1.0 (ReLU; true: the tied, scaled head). T5 has no position limit, so
    max_seq_length is `T5_MAX_SEQ_LENGTH` unless the import's overrides set it."""
    feed_forward = T5_FEED_FORWARD.get((config.is_gated_act, config.dense_act_fn))
    if feed_forward is None:  # what T5's MLP runs: the activation derived or as saved
        raise refuse(
            "feed_forward_proj",
            f"{config.feed_forward_proj} (dense_act_fn {config.dense_act_fn})",
            "Kiln's t5 has gated-gelu (T5 v1.1) or relu (T5 v1.0)",
        )
    if config.d_kv * config.num_heads != config.d_model:
        raise refuse(
            "d_kv",
            config.d_kv,
            f"Kiln's head size is d_model / num_heads ({config.d_model} / {config.num_heads})",
        )
    scaled = getattr(config, "scale_decoder_outputs", config.tie_word_embeddings)
    return {
        "arch": "t5",
        "num_layers": config.num_layers,
        "decoder_layers": config.num_decoder_layers,
        "hidden_size": config.d_model,
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_heads,
        "ffn_hidden_size": config.d_ff,
        "vocab_size": config.vocab_size,
        "max_seq_length": T5_MAX_SEQ_LENGTH,
        "positions": "relative",
        "relative_buckets": config.relative_attention_num_buckets,
        "relative_max_distance": config.relative_attention_max_distance,
        "feed_forward": feed_forward,
        "tie_embeddings": bool(scaled),
        "norm_eps": float(config.layer_norm_epsilon),
    }
