"""Closed-form sizes of a Kiln model: parameter count and padded vocabulary.

With h = hidden size, L = layers, V = vocabulary rows, f = FFN hidden size,
k = num_kv_heads x head size (the width of K and of V), S = max sequence length:

    llama, per layer:  attention  h(h + 2k) + h*h          (Q, K, V, output; no biases)
                       SwiGLU MLP 3*h*f                     (gate, up, down)
                       2 RMSNorm  2h
           whole model: L * per-layer + V*h (embedding) + h (final norm) + V*h if untied

    gpt, per layer:    attention  h(h + 2k) + (h + 2k) + h*h + h    (weights and biases)
                       GELU MLP   2*h*f + f + h
                       2 LayerNorm 4h                       (weight and bias each)
           whole model: L * per-layer + V*h + S*h (learned positions) + 2h (final norm)
                        + V*h if untied

    bert: as gpt (its embedding always tied), plus the masked-LM head: a dense layer
          h*h + h, a LayerNorm 2h and a bias per vocabulary row V.

    t5 (encoder-decoder, no biases, RMSNorm weights only; with a = num_heads x head size = h):
          encoder layer: attention 4*h*a, MLP 3*h*f (gated-gelu) or 2*h*f (relu), 2 norms 2h
          decoder layer: as the encoder's, plus cross-attention 4*h*a and its norm h
          whole model: L * encoder layer + L_dec * decoder layer + 2 * buckets * heads
                       (a bias table per stack) + 2h (final norms) + V*h + V*h if untied

`model.positions` may swap the default positions: learned ones add S*h, rotary ones nothing.

This matches the published sizes: GPT-3 125M/350M/1.3B with V = 50257 and Llama-2 7B/13B
(6.74 B, 13.0 B) with V = 32000. The model pads V up to a multiple of 128 x tensor-parallel
size (`padded_vocab_size`); pass the padded size to count the tensors the model really holds.
"""

from __future__ import annotations

from pretrain.config.schema import ResolvedModel, ResolvedT5Model, is_encoder_decoder

VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tensor_parallel: int = 1) -> int:
    """Vocabulary rows after Megatron's padding to a multiple of 128 x TP."""
    multiple = VOCAB_PAD_MULTIPLE * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def count_parameters(model: ResolvedModel, vocab_size: int | None = None) -> int:
    """Parameters of `model` with `vocab_size` rows (default: its own)."""
    h, n_layers = model.hidden_size, model.num_layers
    vocab = model.vocab_size if vocab_size is None else vocab_size
    f = model.ffn_hidden_size
    k = model.num_kv_heads * (h // model.num_heads)

    if is_encoder_decoder(model):
        return encoder_decoder_parameters(model, vocab)
    if model.arch == "llama":
        attention = h * (h + 2 * k) + h * h
        mlp = 3 * h * f
        norms = 2 * h
        rest = vocab * h + h
    else:
        attention = h * (h + 2 * k) + (h + 2 * k) + h * h + h
        mlp = 2 * h * f + f + h
        norms = 4 * h
        rest = vocab * h + 2 * h
    if model.positions == "learned":
        rest += model.max_seq_length * h
    output_layer = 0 if model.tie_embeddings else vocab * h
    if model.arch == "bert":
        output_layer = h * h + h + 2 * h + vocab
    return n_layers * (attention + mlp + norms) + rest + output_layer


def encoder_decoder_parameters(model: ResolvedT5Model, vocab: int) -> int:
    """A t5's parameters (see the module docstring)."""
    h, f = model.hidden_size, model.ffn_hidden_size
    attention = 4 * h * h
    mlp = (3 if model.feed_forward == "gated-gelu" else 2) * h * f
    encoder_layer = attention + mlp + 2 * h
    decoder_layer = encoder_layer + attention + h
    tables = 2 * model.relative_buckets * model.num_heads
    head = 0 if model.tie_embeddings else vocab * h
    return (
        model.num_layers * encoder_layer
        + model.decoder_layers * decoder_layer
        + tables
        + 2 * h
        + vocab * h
        + head
    )


def human_count(n: int) -> str:
    """6738415616 -> '6.74B'; 7096576 -> '7.10M'."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)
