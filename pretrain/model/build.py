"""The model of a configuration on one pipeline stage: a decoder or encoder (`Transformer`) or an
encoder-decoder (`EncoderDecoder`), with the same constructor arguments."""

from __future__ import annotations

from torch import nn

from pretrain.config import ResolvedModel, is_encoder_decoder

from .encoder_decoder import EncoderDecoder
from .transformer import Transformer


def build_model(model: ResolvedModel, **settings) -> nn.Module:
    """`Transformer(model, **settings)`, or `EncoderDecoder` for t5 (tensor, seed, dtype,
    recompute, initialize, compile)."""
    if is_encoder_decoder(model):
        return EncoderDecoder(model, **settings)
    return Transformer(model, **settings)
