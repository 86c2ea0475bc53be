"""A T5-style encoder-decoder on the same megatron-core tensor-parallel layers as the decoders.

Read top to bottom: the relative position bias, cross-attention, the decoder block, the two
stacks, the model. The encoder reads the corrupted sample [B, E] with bidirectional
self-attention; the decoder reads its inputs [B, D] with causal self-attention, then attends
to the encoder's output (cross-attention); both add T5's relative position bias to the
unscaled attention scores, one table per stack, shared by all its layers (T5 keeps the table
in its first layer). Norms are RMSNorm without bias, applied before each sublayer (T5's
"layer_norm") and after each stack ("final_layer_norm"); no linear layer has a bias.

    t5 v1.1 (feed_forward gated-gelu, untied head): logits = head(decoder output)
    t5 v1.0 (feed_forward relu, tie_embeddings): logits = embedding^T (decoder output / sqrt(h))

Tensor parallelism splits heads and MLP features as in the decoders (fused qkv and gate_up,
column-parallel in, row-parallel out) and the bias table by head: each rank keeps the columns
of its own heads. Weights are drawn whole under per-layer seeds, as in `transformer.py`:
embedding 0, encoder blocks 1..L, the encoder's bias table and norm L+1, decoder blocks
L+2..L+1+Ld, the decoder's table and norm L+2+Ld, the head L+3+Ld.
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state, tensor_parallel
from torch import nn

from pretrain.config import ResolvedModel, ResolvedT5Model

from .transformer import (
    Block,
    Embedding,
    LayerConfig,
    OutputLayer,
    attention_core,
    cross_entropy,
    fused_column,
    init_stds,
    initializer,
    kernel,
    make_norm,
    maybe_recomputed,
    parallel_config,
    residual_projection,
    seeded,
    tp_group,
)


def relative_position_buckets(
    query_length: int,
    key_length: int,
    bidirectional: bool,
    buckets: int,
    max_distance: int,
    device: torch.device,
) -> torch.Tensor:
    """T5's bucket of each (query, key) pair [Sq, Sk]: exact for small distances, then
    logarithmic up to `max_distance`, beyond which all share the last bucket. Bidirectional
    (encoder): half the buckets for keys after the query; unidirectional (decoder): keys
    after the query share bucket 0 (the causal mask hides them anyway)."""
    query = torch.arange(query_length, dtype=torch.long, device=device)[:, None]
    key = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
    relative = key - query
    bucket = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        bucket += (relative > 0).long() * buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = buckets // 2
    # log of a distance of at least 1: the exact branch takes the smaller ones
    logarithmic = (
        exact
        + (
            torch.log(distance.clamp(min=1).float() / exact)
            / math.log(max_distance / exact)
            * (buckets - exact)
        ).long()
    )
    logarithmic = logarithmic.clamp(max=buckets - 1)
    return bucket + torch.where(distance < exact, distance, logarithmic)


class RelativePositionBias(nn.Module):
    """One learned scalar per (bucket, head), added to the attention scores: [buckets, heads/T]
    on each TP rank (its heads' columns of the whole table)."""

    def __init__(self, model: ResolvedModel, parallel: LayerConfig, bidirectional: bool) -> None:
        super().__init__()
        tensor = parallel.tensor_model_parallel_size
        heads = model.num_heads // tensor
        full = torch.empty(model.relative_buckets, model.num_heads, dtype=torch.float32)
        initializer(parallel, init_stds(model).position_bias)(full)
        rank = parallel_state.get_tensor_model_parallel_rank()
        local = full[:, rank * heads : (rank + 1) * heads].to(parallel.params_dtype)
        self.weight = nn.Parameter(local.contiguous())
        tensor_parallel.set_tensor_model_parallel_attributes(self.weight, True, 1, 1)
        self.bidirectional = bidirectional
        self.buckets, self.max_distance = model.relative_buckets, model.relative_max_distance

    def forward(self, query_length: int, key_length: int, dtype: torch.dtype) -> torch.Tensor:
        """The bias [1, heads/T, Sq, Sk]; a decoder's with its causal mask added."""
        buckets = relative_position_buckets(
            query_length,
            key_length,
            self.bidirectional,
            self.buckets,
            self.max_distance,
            self.weight.device,
        )
        bias = self.weight[buckets].permute(2, 0, 1).unsqueeze(0).to(dtype)
        if not self.bidirectional:
            future = torch.ones(
                query_length, key_length, dtype=torch.bool, device=bias.device
            ).triu(1)
            bias = bias.masked_fill(future, float("-inf"))
        return bias


class CrossAttention(nn.Module):
    """The decoder's attention to the encoder's output: queries from the decoder, keys and
    values (one fused column-parallel layer) from the encoder; no position bias, no scaling."""

    def __init__(self, model: ResolvedModel, parallel: LayerConfig) -> None:
        super().__init__()
        tensor = parallel.tensor_model_parallel_size
        self.head_dim = model.head_dim
        self.heads = model.num_heads // tensor
        inner = model.num_heads * model.head_dim
        stds = init_stds(model)
        self.q = tensor_parallel.ColumnParallelLinear(
            model.hidden_size,
            inner,
            config=parallel,
            tp_group=tp_group(),
            init_method=initializer(parallel, stds.q),
            bias=False,
            gather_output=False,
        )
        self.kv = fused_column(
            {"k": (inner, stds.kv), "v": (inner, stds.kv)}, model.hidden_size, parallel, False
        )
        self.out = residual_projection(inner, model, parallel, stds.attention_out)
        self.recompute_core = parallel.recompute_core
        self.core = kernel(attention_core, parallel.compile_kernels)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x [B, D, h] (normed decoder stream), memory [B, E, h] (the encoder's output)."""
        batch, length, _ = x.shape
        q = self.q(x)[0].view(batch, length, -1, self.head_dim).transpose(1, 2)
        k, v = (
            part.view(batch, memory.shape[1], -1, self.head_dim).transpose(1, 2)
            for part in self.kv(memory)[0].chunk(2, dim=-1)
        )
        recompute = self.recompute_core and self.training
        y = maybe_recomputed(recompute, self.core, q, k, v, None, None, False, None, 1.0)
        out, _ = self.out(y.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))
        return out


class DecoderBlock(Block):
    """Self-attention (causal, with the bias), cross-attention to the encoder, then the MLP;
    each pre-normed and added to the residual stream."""

    def __init__(self, model: ResolvedModel, parallel: LayerConfig) -> None:
        super().__init__(model, parallel)
        self.cross_norm = make_norm(model, parallel.compile_kernels)
        self.cross_attention = CrossAttention(model, parallel)

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, memory: torch.Tensor | None = None
    ) -> torch.Tensor:
        assert memory is not None, "a decoder block attends to the encoder's output"
        x = x + self.attention(self.attention_norm(x), bias)
        x = x + self.cross_attention(self.cross_norm(x), memory)
        return x + self.mlp(self.mlp_norm(x))


class Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, attending to `memory`): its blocks,
    one position bias table for all of them, and the final norm."""

    def __init__(
        self,
        model: ResolvedModel,
        parallel: LayerConfig,
        layers: int,
        seed: int,
        first_index: int,
        decoder: bool,
        checkpoint_blocks: bool,
    ) -> None:
        super().__init__()
        block = DecoderBlock if decoder else Block
        self.blocks = nn.ModuleList(
            seeded(seed, first_index + i, lambda: block(model, parallel)) for i in range(layers)
        )
        self.position_bias, self.norm = seeded(
            seed,
            first_index + layers,
            lambda: (
                RelativePositionBias(model, parallel, bidirectional=not decoder),
                make_norm(model, parallel.compile_kernels),
            ),
        )
        self.decoder, self.checkpoint_blocks = decoder, checkpoint_blocks

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        length = x.shape[1]
        bias = self.position_bias(length, length, x.dtype)
        extra = (memory,) if self.decoder else ()
        for block in self.blocks:
            if self.checkpoint_blocks and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, bias, *extra, use_reentrant=False)
            else:
                x = block(x, bias, *extra)
        return self.norm(x)


class EncoderDecoder(nn.Module):
    """The whole T5-style model on one process group. `forward(encoder_ids, decoder_ids)`
    gives the decoder's vocabulary-parallel logits [B, D, V/T]; with `targets` the mean loss
    over every decoder position. The token embedding is shared by encoder and decoder."""

    def __init__(
        self,
        model: ResolvedT5Model,
        tensor: int = 1,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        recompute: str = "none",
        initialize: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        parallel = parallel_config(tensor, dtype, initialize, recompute, compile)
        encoder_layers, decoder_layers = model.num_layers, model.decoder_layers
        full = recompute == "full"
        self.config = model
        self.embedding = seeded(seed, 0, lambda: Embedding(model, parallel))
        self.encoder = Stack(model, parallel, encoder_layers, seed, 1, False, full)
        self.decoder = Stack(model, parallel, decoder_layers, seed, encoder_layers + 2, True, full)
        self.output = (
            None
            if model.tie_embeddings
            else seeded(
                seed, encoder_layers + decoder_layers + 3, lambda: OutputLayer(model, parallel)
            )
        )

    def encode(self, encoder_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embedding(encoder_ids))

    def decode(self, decoder_ids: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Vocabulary-parallel logits of the decoder inputs given the encoder's output."""
        x = self.decoder(self.embedding(decoder_ids), memory)
        if self.output is not None:
            return self.output(x)
        # T5 v1.0 rescales before its tied output layer (the embedding is not scaled on input)
        return self.embedding.logits(x * self.config.hidden_size**-0.5)

    def forward(
        self,
        encoder_ids: torch.Tensor,
        decoder_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logits = self.decode(decoder_ids, self.encode(encoder_ids))
        return logits if targets is None else cross_entropy(logits, targets, self.config.vocab_size)
