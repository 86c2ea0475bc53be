"""Text from a trained checkpoint, on one process: `kiln generate RUN_DIR_OR_CHECKPOINT`.

The checkpoint's layout-independent weights are loaded into a one-rank `Transformer`. A
decoder's new tokens are drawn one by one from the last position's logits over the real
vocabulary (the padding rows never win), and generation stops at the tokenizer's end-of-text
token. An encoder (`model.arch: bert`) fills the prompt's mask tokens instead (`masking.token`,
`<mask>`): one forward pass over the whole prompt gives each mask its most likely tokens of the
real vocabulary, with their probabilities, and the prompt is shown with each mask replaced by
its best candidate (each mask predicted on its own, the others masked, as in BERT).
An encoder-decoder (`model.arch: t5`) fills the prompt's sentinels (`<extra_id_0>`, ...): the
encoder reads the prompt and an EOS, as in training; the decoder writes from its start token,
each sentinel followed by the text it stands for, until EOS (`--temperature 0`: greedy).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from data_pipeline.errors import KilnError
from pretrain.inference import LoadedModel, load_model
from pretrain.model.transformer import Transformer
from pretrain.token_sampling import check_sampling_args, sample_next

MASK_CANDIDATES = 5  # an encoder's candidates per mask, unless --top-k says otherwise


class GenerationError(KilnError):
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
    """The prompt followed by up to `max_new_tokens` generated tokens, decoded. An encoder's
    answer instead: the `top_k` (default 5) candidates of each mask and the filled prompt
    (`MaskFilling.render`); the sampling arguments are a decoder's."""
    if max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens = {max_new_tokens}: must be at least 1")
    try:
        check_sampling_args(temperature, top_k, top_p)
    except ValueError as error:  # a sampling option out of range, e.g. top_k = 0
        raise GenerationError(str(error)) from None
    loaded = load_model(path)
    if loaded.cfg.model.encoder_decoder:
        filling = fill_sentinels(loaded, prompt, max_new_tokens, temperature, top_k, top_p, seed)
        return filling.render()
    if not loaded.cfg.model.causal:
        return fill_masks(loaded, prompt, top_k or MASK_CANDIDATES).render()
    model, tokenizer, eos = loaded.model, loaded.tokenizer, loaded.eos_id
    prompt_ids = tokenizer.encode(prompt).ids
    if not prompt_ids:
        raise GenerationError("--prompt is empty after tokenisation")
    new = generate_ids(model, prompt_ids, max_new_tokens, eos, temperature, top_k, top_p, seed)
    return prompt + tokenizer.decode(new, skip_special_tokens=False)


@dataclass
class MaskFilling:
    """An encoder's answer to a prompt with mask tokens: per mask, its most likely tokens
    (decoded text, probability), best first, and the prompt's text around the masks."""

    mask_token: str
    texts: list[str]  # one more than there are masks: the text before, between and after
    candidates: list[list[tuple[str, float]]]

    @property
    def filled(self) -> str:
        """The prompt with each mask replaced by its most likely token."""
        parts = [self.texts[0]]
        for options, text in zip(self.candidates, self.texts[1:], strict=True):
            parts += [options[0][0], text]
        return "".join(parts)

    def render(self) -> str:
        """One line per mask (`<mask> 1: ' name' 0.412 | ...`), then the filled prompt."""
        lines = [
            f"{self.mask_token} {number}: "
            + " | ".join(f"{text!r} {probability:.3f}" for text, probability in options)
            for number, options in enumerate(self.candidates, 1)
        ]
        return "\n".join([*lines, self.filled])


def masked_prompt(
    tokenizer: Tokenizer, prompt: str, mask_token: str
) -> tuple[list[int], list[str]]:
    """The prompt's ids, each literal `mask_token` as the mask id whatever the tokenizer's
    `encode_special_tokens` (the data pipeline sets it for documents, where the text "<mask>"
    is text), and its text around the masks. The one space before a mask is the masked
    token's (as RoBERTa's mask strips it): a byte-level BPE writes a word after a space as one
    token with the space, which is what the mask stands for."""
    mask_id = tokenizer.token_to_id(mask_token)
    if mask_id is None:
        raise GenerationError(f"the run's tokenizer has no {mask_token} token (masking.token)")
    pieces = prompt.split(mask_token)
    if len(pieces) == 1:
        raise GenerationError(
            f"the prompt has no {mask_token}: an encoder (model.arch: bert) fills {mask_token} "
            f'tokens rather than continuing text, e.g. --prompt "def {mask_token}(self):"'
        )
    tokenizer.encode_special_tokens = False  # other special tokens in the prompt: their ids
    texts = [p[:-1] if p.endswith(" ") else p for p in pieces[:-1]] + [pieces[-1]]
    ids: list[int] = []
    for number, text in enumerate(texts):
        if number:
            ids.append(mask_id)
        if text:
            ids += tokenizer.encode(text, add_special_tokens=False).ids
    return ids, texts


@torch.no_grad()
def fill_masks(loaded: LoadedModel, prompt: str, candidates: int = MASK_CANDIDATES) -> MaskFilling:
    """The `candidates` most likely tokens of the real vocabulary at each mask of the prompt."""
    model, tokenizer, mask_token = loaded.model, loaded.tokenizer, loaded.cfg.masking.token
    ids, texts = masked_prompt(tokenizer, prompt, mask_token)
    window = model.config.max_seq_length
    if len(ids) > window:
        raise GenerationError(
            f"the prompt is {len(ids)} tokens; the model reads at most {window} "
            "(model.max_seq_length)"
        )
    vocab = model.config.vocab_size
    tokens = torch.tensor([ids], dtype=torch.long)
    positions = (tokens[0] == tokenizer.token_to_id(mask_token)).nonzero()[:, 0]
    probabilities = model(tokens)[0, positions, :vocab].float().softmax(dim=-1)
    best = probabilities.topk(min(candidates, vocab), dim=-1)
    options = [
        [
            (tokenizer.decode([int(token)], skip_special_tokens=False), float(probability))
            for probability, token in zip(values, indices, strict=True)
        ]
        for values, indices in zip(best.values, best.indices, strict=True)
    ]
    return MaskFilling(mask_token, texts, options)


@dataclass
class SentinelFilling:
    """An encoder-decoder's answer to a prompt with sentinels: the prompt's pieces around
    them, the sentinels in the prompt, and the text the decoder wrote after each sentinel
    (None for a sentinel it did not write)."""

    texts: list[str]  # one more than there are sentinels
    sentinels: list[str]
    spans: list[str | None]
    tokens: list[int]  # what the decoder wrote after its start token, EOS left out

    @property
    def filled(self) -> str:
        parts = [self.texts[0]]
        for sentinel, span, text in zip(self.sentinels, self.spans, self.texts[1:], strict=True):
            parts += [sentinel if span is None else span, text]
        return "".join(parts)

    def render(self) -> str:
        """One line per sentinel (`<extra_id_0>: ' cat'`), then the filled prompt."""
        lines = [
            f"{sentinel}: {'(not written)' if span is None else repr(span)}"
            for sentinel, span in zip(self.sentinels, self.spans, strict=True)
        ]
        return "\n".join([*lines, self.filled])


def sentinel_prompt(
    tokenizer: Tokenizer, prompt: str, sentinels: list[str]
) -> tuple[list[int], list[str], list[str]]:
    """The prompt's ids with each literal sentinel as its id, its text around the sentinels,
    and the sentinels in order. The one space before a sentinel is the span's (a byte-level
    BPE writes a word after a space as one token with the space, which the sentinel replaced
    in training)."""
    known = set(sentinels)
    pattern = "(" + "|".join(re.escape(s) for s in sorted(known, key=len, reverse=True)) + ")"
    pieces = re.split(pattern, prompt)
    texts, found = pieces[0::2], pieces[1::2]
    if not found:
        raise GenerationError(
            f"the prompt has no sentinel: an encoder-decoder (model.arch: t5) fills sentinels "
            f'such as {sentinels[0]}, e.g. --prompt "The {sentinels[0]} sat on the mat"'
        )
    texts = [t[:-1] if t.endswith(" ") else t for t in texts[:-1]] + [texts[-1]]
    tokenizer.encode_special_tokens = False  # the sentinels in the prompt: their ids
    ids: list[int] = []
    for number, text in enumerate(texts):
        if number:
            ids.append(tokenizer.token_to_id(found[number - 1]))
        if text:
            ids += tokenizer.encode(text, add_special_tokens=False).ids
    return ids, texts, found


@torch.no_grad()
def fill_sentinels(
    loaded: LoadedModel,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int,
) -> SentinelFilling:
    """The decoder's text for each sentinel of the prompt (encoder input: prompt + EOS)."""
    model, tokenizer, cfg = loaded.model, loaded.tokenizer, loaded.cfg
    sentinels = cfg.spans.sentinel_tokens()
    ids, texts, found = sentinel_prompt(tokenizer, prompt, sentinels)
    eos, start = loaded.eos_id, tokenizer.token_to_id(cfg.spans.start_token)
    if eos is None or start is None:
        raise GenerationError("the run's tokenizer lacks its EOS or the decoder's start token")
    memory = model.encode(torch.tensor([[*ids, eos]], dtype=torch.long))
    generator = torch.Generator().manual_seed(seed)
    written = [start]
    vocab = model.config.vocab_size
    for _ in range(max_new_tokens):
        decoder_ids = torch.tensor([written], dtype=torch.long)
        logits = model.decode(decoder_ids, memory)[:, -1, :vocab].float()
        token = int(sample_next(logits, temperature, top_k, top_p, generator))
        if token == eos:
            break
        written.append(token)
    spans: dict[int, list[int]] = {}
    current = None
    sentinel_ids = {tokenizer.token_to_id(s): s for s in sentinels}
    for token in written[1:]:
        if token in sentinel_ids:
            current = spans.setdefault(token, [])
        elif current is not None:
            current.append(token)
    texts_of = {
        sentinel_ids[token]: tokenizer.decode(tokens, skip_special_tokens=False)
        for token, tokens in spans.items()
    }
    return SentinelFilling(texts, found, [texts_of.get(s) for s in found], written[1:])
