"""A trained model in one process, from any checkpoint of any layout: what generation,
evaluation and export start from.

The checkpoint's fp32 weights (the master weights when it trained in bf16/fp16) are loaded
into a one-rank model (`Transformer`, or `EncoderDecoder` for t5) in fp32, beside the run's
configuration and tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tokenizers import Tokenizer
from torch import nn

from pretrain.config import RunConfig, load_config, resolve_run
from pretrain.model.build import build_model
from pretrain.train.checkpoint import resolve_checkpoint
from pretrain.train.weights import CheckpointError, consolidated_weights, load_weights


@dataclass
class LoadedModel:
    model: nn.Module
    cfg: RunConfig
    checkpoint: Path
    tokenizer: Tokenizer
    eos_id: int | None


def single_process_group() -> None:
    """megatron-core's layers need a process group and its parallel state, even alone."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights under canonical names (a bf16/fp16 run's master weights); only
    these are read, not the optimizer state beside them."""
    return consolidated_weights(checkpoint)


def checkpoint_config(checkpoint: Path) -> RunConfig:
    """The run configuration saved beside a checkpoint's weights."""
    cfg = load_config(checkpoint / "config.yaml")
    if cfg.model is None:
        raise CheckpointError(f"{checkpoint}/config.yaml has no model section")
    return resolve_run(cfg)


def load_model(path: Path) -> LoadedModel:
    """The model of a run directory's latest checkpoint (or of a checkpoint directory)."""
    checkpoint = resolve_checkpoint(Path(path))
    cfg = checkpoint_config(checkpoint)
    tokenizer_file = checkpoint / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{checkpoint}: no tokenizer.json beside the weights")
    single_process_group()
    model = build_model(cfg.model, tensor=1, seed=cfg.train.seed, initialize=False)
    load_weights(model, checkpoint_weights(checkpoint))
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    eos = tokenizer.token_to_id(cfg.tokenizer.eos_token)
    return LoadedModel(model.eval(), cfg, checkpoint, tokenizer, eos)
