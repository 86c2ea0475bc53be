"""The transformer as a DeepSpeed `PipelineModule`: the layers of `transformer.py` in a list.

    0        embedding            (tied with the last layer when embeddings are tied)
    1..L     blocks
    L+1      final norm
    L+2      output layer         (or the embedding's `logits`, sharing its matrix; an
                                  encoder's masked-LM head is part of the embedding)

Each stage builds only its own layers, each under the same (seed, index) as in the
single-stage `Transformer`, so the full weights do not depend on the layout. Stages are
balanced by parameter count (`parallel.pipeline_partition`). With tied embeddings DeepSpeed
keeps a copy of the embedding on the first and the last stage and sums their gradients.

Canonical parameter names (`embedding.tokens.weight`, `blocks.3.mlp.up.weight`, `norm.weight`,
`output.projection.weight`) are those of `Transformer`; `canonical_name` maps a pipeline
module's names onto them, so checkpoints and exports do not depend on the layout.
"""

from __future__ import annotations

from functools import partial

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from pretrain.config import ResolvedModel

from .transformer import (
    Block,
    Embedding,
    LayerNorm,
    OutputLayer,
    RMSNorm,
    cross_entropy,
    parallel_config,
    seeded,
)

TIED_KEY = "embedding"


class SeededLayerSpec(LayerSpec):
    """A layer built under its own seed, as `Transformer` builds it."""

    def __init__(self, seed: int, index: int, typename, *args, **kwargs) -> None:
        super().__init__(typename, *args, **kwargs)
        self.seed, self.index = seed, index

    def build(self, log: bool = False) -> nn.Module:
        return seeded(self.seed, self.index, lambda: super(SeededLayerSpec, self).build(log))


class SeededTiedLayerSpec(TiedLayerSpec):
    def __init__(self, seed: int, index: int, key: str, typename, *args, **kwargs) -> None:
        super().__init__(key, typename, *args, **kwargs)
        self.seed, self.index = seed, index

    def build(self, log: bool = False) -> nn.Module:
        return seeded(self.seed, self.index, lambda: super(SeededTiedLayerSpec, self).build(log))


def tied_logits(embedding: Embedding, x: torch.Tensor) -> torch.Tensor:
    return embedding.logits(x)


def norm_spec(model: ResolvedModel, seed: int, compile: bool) -> LayerSpec:
    norm = RMSNorm if model.arch == "llama" else LayerNorm
    return SeededLayerSpec(
        seed, model.num_layers + 1, norm, model.hidden_size, model.norm_eps, compile
    )


def layer_specs(
    model: ResolvedModel,
    tensor: int,
    seed: int,
    dtype: torch.dtype,
    initialize: bool = True,
    recompute: str = "none",
    compile: bool = False,
) -> list:
    parallel = parallel_config(tensor, dtype, initialize, recompute, compile)
    layers = model.num_layers
    if model.tie_embeddings:
        first = SeededTiedLayerSpec(seed, 0, TIED_KEY, Embedding, model, parallel)
        last = SeededTiedLayerSpec(
            seed, 0, TIED_KEY, Embedding, model, parallel, forward_fn=tied_logits
        )
        last.tied_weight_attr = ["tokens.weight"]
        first.tied_weight_attr = ["tokens.weight"]
    else:
        first = SeededLayerSpec(seed, 0, Embedding, model, parallel)
        last = SeededLayerSpec(seed, layers + 2, OutputLayer, model, parallel)
    blocks = [SeededLayerSpec(seed, 1 + i, Block, model, parallel) for i in range(layers)]
    return [first, *blocks, norm_spec(model, seed, compile), last]


def vocabulary_loss(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return cross_entropy(logits, targets, vocab_size)


def build_pipeline(
    model: ResolvedModel,
    topology,
    seed: int,
    dtype: torch.dtype,
    partition: str,
    recompute: str = "none",
    loss_fn=None,
    initialize: bool = True,
    compile: bool = False,
) -> PipelineModule:
    """The pipeline model; `loss_fn(logits, targets)` runs on the last stage (default: the
    mean cross entropy over the real vocabulary). `initialize=False`: weights left undrawn,
    for a resume that loads them next."""
    tensor = topology.get_dim("model")
    module = PipelineModule(
        layers=layer_specs(model, tensor, seed, dtype, initialize, recompute, compile),
        topology=topology,
        loss_fn=loss_fn or partial(vocabulary_loss, vocab_size=model.vocab_size),
        partition_method=partition,
        activation_checkpoint_interval=1 if recompute == "full" else 0,
        activation_checkpoint_func=partial(torch.utils.checkpoint.checkpoint, use_reentrant=False),
        checkpointable_layers=["Block"],
    )
    freeze_unused_tied_copies(module)
    return module


def freeze_unused_tied_copies(module: PipelineModule) -> None:
    """A tied embedding is built whole on the first and the last stage, but each uses only
    part of it: the first the positions, the last the masked-LM head (the token matrix both,
    kept equal by DeepSpeed). The unused copies are frozen: no optimizer state, no gradient,
    and no checkpoint piece (the stage that trains them writes them)."""
    if TIED_KEY not in module.tied_modules:
        return
    embedding = module.tied_modules[TIED_KEY]
    first, last = module.stage_id == 0, module.stage_id == module.num_stages - 1
    if embedding.positions is not None and not first:
        embedding.positions.requires_grad_(False)
    if embedding.head is not None and not last:
        embedding.head.requires_grad_(False)
    if embedding.head is not None and last:
        # DeepSpeed marks every parameter of a tied module outside its first stage as a
        # replica, left out of gradient norms; the head is trained here alone, so it counts
        for parameter in embedding.head.parameters():
            parameter.ds_pipe_replicated = False


def canonical_name(name: str, num_layers: int) -> str:
    """`3.mlp.up.weight` -> `blocks.2.mlp.up.weight`; `tied_modules.embedding.tokens.weight`
    -> `embedding.tokens.weight`; names of `Transformer` are returned unchanged."""
    head, _, rest = name.partition(".")
    if head == "tied_modules":
        _key, _, rest = rest.partition(".")
        return f"embedding.{rest}"
    if not head.isdigit():
        return name
    index = int(head)
    if index == 0:
        return f"embedding.{rest}"
    if index <= num_layers:
        return f"blocks.{index - 1}.{rest}"
    if index == num_layers + 1:
        return f"norm.{rest}"
    return f"output.{rest}"
