"""Training FLOPs per token and model FLOPs utilisation (MFU).

Per token, forward plus backward (PaLM, Chowdhery et al. 2022, appendix B):

    6 * N_matmul + 12 * L * h * S

6 * N_matmul: each weight that takes part in a matrix multiply costs 2 FLOPs per token in
the forward pass and 4 in the backward pass (gradients of activations and of weights).
N_matmul is every parameter (`count_parameters`, with the padded vocabulary the model
really computes) minus the input lookup tables, which are gathered, not multiplied: the
token embedding when it is untied, and gpt's learned positions. With tied embeddings the
shared matrix is counted once, as the output projection, so tying changes the parameter
count but not the FLOPs. Norm weights and biases are counted in (under 0.2 % of N_matmul
for the preset sizes).

12 * L * h * S: the attention scores Q K^T and their product with V, 2 * 2 * h * S FLOPs
per token and layer forward, three times that with backward, over the full S x S score
matrix (as PaLM and Megatron count it; a causal kernel skips about half of it).

An encoder-decoder (t5) counts per encoder token, as its throughput does: a sample of E
encoder and D decoder tokens costs 6 x (encoder weights x E + decoder weights x D + the
cross-attention's key/value weights x E, as they read the encoder's output, + the output
layer x D) plus the scores, 12 * h * (L * E^2 + L_dec * (D^2 + D * E)), all divided by E.

MFU = achieved model FLOP/s / (peak FLOP/s per device * devices). Recomputation
(activation checkpointing) is not counted: MFU measures useful work only.
"""

from __future__ import annotations

import re

from pretrain.config.schema import ResolvedModel, ResolvedT5Model, is_encoder_decoder
from pretrain.model.sizing import count_parameters, padded_vocab_size

# Dense (non-sparse) tensor-core peak FLOP/s per GPU: (name, 16-bit, fp32 via TF32).
# The first entry whose name occurs in the device name as whole words wins, so a more
# specific name comes before a shorter one ("H100 PCIe" before "H100"). V100 has neither
# bf16 nor TF32: its fp16 figure stands for bf16, its CUDA-core FP32 figure for fp32.
PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494.5e12),  # "NVIDIA H100 80GB HBM3": the SXM part
    ("H200", 989e12, 494.5e12),
    ("A100", 312e12, 156e12),
    ("A10G", 125e12, 62.5e12),
    ("L40S", 362e12, 183e12),
    ("L4", 121e12, 60e12),
    ("V100", 125e12, 15.7e12),
    ("RTX 4090", 165e12, 82.6e12),
)

HALF_PRECISIONS = ("bf16", "fp16")
FULL_PRECISIONS = ("fp32", "tf32")


def matmul_parameters(model: ResolvedModel, tensor: int = 1) -> int:
    """Parameters that take part in matrix multiplies (see the module docstring)."""
    vocab = padded_vocab_size(model.vocab_size, tensor)
    lookups = 0 if model.tie_embeddings else vocab * model.hidden_size
    if model.positions == "learned":
        lookups += model.max_seq_length * model.hidden_size
    return count_parameters(model, vocab) - lookups


def flops_per_token(
    model: ResolvedModel, seq_length: int, tensor: int = 1, decoder_length: int | None = None
) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_length`; a t5's
    per encoder token, with `decoder_length` decoder tokens per sample (required)."""
    if is_encoder_decoder(model):
        if decoder_length is None:
            raise ValueError("a t5's FLOPs need the decoder's length (spans.decoder_length)")
        return encoder_decoder_flops(model, seq_length, decoder_length, tensor) / seq_length
    attention = 12 * model.num_layers * model.hidden_size * seq_length
    return float(6 * matmul_parameters(model, tensor) + attention)


def encoder_decoder_flops(
    model: ResolvedT5Model, encoder_length: int, decoder_length: int, tensor: int = 1
) -> float:
    """Training FLOPs of one t5 sample (see the module docstring)."""
    h, f = model.hidden_size, model.ffn_hidden_size
    E, D = encoder_length, decoder_length  # noqa: N806 (the docstring's names)
    mlp = (3 if model.feed_forward == "gated-gelu" else 2) * h * f
    layer = 4 * h * h + mlp
    cross_kv, cross_rest = 2 * h * h, 2 * h * h
    output = padded_vocab_size(model.vocab_size, tensor) * h
    weights = (
        model.num_layers * layer * E
        + model.decoder_layers * ((layer + cross_rest) * D + cross_kv * E)
        + output * D
    )
    scores = 12 * h * (model.num_layers * E * E + model.decoder_layers * (D * D + D * E))
    return float(6 * weights + scores)


def peak_flops(device_name: str | None, precision: str) -> float | None:
    """Dense peak FLOP/s of one device as `torch.cuda.get_device_name` names it, at
    `precision` (bf16, fp16, fp32/tf32); None for a CPU or an unknown device."""
    if precision not in HALF_PRECISIONS + FULL_PRECISIONS:
        raise ValueError(f"precision = {precision!r}: must be one of bf16, fp16, fp32, tf32")
    if not device_name:
        return None
    for name, half, full in PEAK_FLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", device_name, re.I):
            return half if precision in HALF_PRECISIONS else full
    return None


def mfu(
    tokens_per_s: float, flops_per_token: float, peak: float | None, devices: int
) -> float | None:
    """Model FLOPs utilisation of `devices` devices processing `tokens_per_s` tokens per
    second in all; None when the peak is unknown."""
    if devices < 1:
        raise ValueError(f"devices = {devices}: must be at least 1")
    if peak is None:
        return None
    return tokens_per_s * flops_per_token / (peak * devices)
