"""Text from a trained checkpoint, on one process: `kiln generate RUN_DIR_OR_CHECKPOINT`.

The checkpoint's layout-independent weights are loaded into a one-rank `Transformer`; each
new token is drawn from the last position's logits over the real vocabulary (the padding rows
never win), and generation stops at the tokenizer's end-of-text token.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain.inference import load_model
from pretrain.model.transformer import Transformer
from pretrain.sampling import check_sampling_args, sample_next


class GenerationError(ValueError):
    """The arguments are out of range."""


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
    loaded = load_model(path)
    model, tokenizer, eos = loaded.model, loaded.tokenizer, loaded.eos_id
    prompt_ids = tokenizer.encode(prompt).ids
    if not prompt_ids:
        raise GenerationError("--prompt is empty after tokenisation")
    new = generate_ids(model, prompt_ids, max_new_tokens, eos, temperature, top_k, top_p, seed)
    return prompt + tokenizer.decode(new, skip_special_tokens=False)
