"""Text from a trained checkpoint, on one process: `kiln generate RUN_DIR_OR_CHECKPOINT`.

The checkpoint's layout-independent weights are loaded into a one-rank `Transformer`; each
new token is drawn from the last position's logits over the real vocabulary (the padding rows
never win), and generation stops at the tokenizer's end-of-text token.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tokenizers import Tokenizer

from pretrain.config import load_config
from pretrain.model.transformer import Transformer
from pretrain.sampling import check_sampling_args, sample_next
from pretrain.train.checkpoint import latest_checkpoint
from pretrain.train.weights import CheckpointError, consolidated_weights, load_weights


class GenerationError(ValueError):
    """The path holds no usable checkpoint, or the arguments are out of range."""


def resolve_checkpoint(path: Path) -> Path:
    """A run directory means its latest checkpoint; a checkpoint directory means itself."""
    if (path / "trainer_state.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise GenerationError(f"{path}: no checkpoint there (expected a run directory or step_*)")


def single_process_group() -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)


def load_model(checkpoint: Path) -> tuple[Transformer, Tokenizer, int]:
    cfg = load_config(checkpoint / "config.yaml")
    assert cfg.model is not None
    tokenizer_file = checkpoint / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise GenerationError(f"{checkpoint}: no tokenizer.json beside the weights")
    single_process_group()
    model = Transformer(cfg.model, tensor=1, seed=cfg.train.seed)
    try:
        load_weights(model, consolidated_weights(checkpoint, cfg.model.vocab_size))
    except CheckpointError as error:
        raise GenerationError(str(error)) from error
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    eos = tokenizer.token_to_id(cfg.tokenizer.eos_token)
    return model.eval(), tokenizer, eos


@torch.no_grad()
def generate_ids(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    eos_id: int | None,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int,
) -> list[int]:
    vocab, window = model.config.vocab_size, model.config.max_seq_length
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt], dtype=torch.long)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids[:, -window:])[:, -1, :vocab].float()
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None and int(token) == eos_id:
            break
        new.append(int(token))
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return new


def generate_text(
    path: Path,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> str:
    """The prompt followed by up to `max_new_tokens` generated tokens, decoded."""
    if max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens = {max_new_tokens}: must be at least 1")
    check_sampling_args(temperature, top_k, top_p)
    model, tokenizer, eos = load_model(resolve_checkpoint(path))
    prompt_ids = tokenizer.encode(prompt).ids
    if not prompt_ids:
        raise GenerationError("--prompt is empty after tokenisation")
    new = generate_ids(model, prompt_ids, max_new_tokens, eos, temperature, top_k, top_p, seed)
    return prompt + tokenizer.decode(new, skip_special_tokens=False)
