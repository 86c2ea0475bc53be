"""T5's span-corruption inputs from packed samples, drawn per (seed, split, sample index).

Of a sample's tokens `noise_density` are corrupted, in spans of `mean_span_length` on
average (T5's `random_spans_noise_mask`: the sample alternates kept and noise spans, starting
with a kept one). The encoder reads the kept tokens with each noise span replaced by one
sentinel (the k-th span by the k-th sentinel) and EOS at the end; the targets are each span
after its sentinel, then EOS; the decoder reads the targets shifted right behind the start
token (T5's `_shift_right`). A sample of `spans.sample_tokens` tokens always corrupts to the
same encoder and decoder lengths, those a validated t5 configuration derives. As with BERT's
masks, every draw comes from a generator seeded by (seed, split, sample index): the same sample
is corrupted the same way on any rank, in any layout, after a resume.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from data_pipeline.errors import KilnError
from pretrain.config.schema import RunConfig, SpanConfig, T5RunConfig, span_count
from pretrain.data.masking import SPLITS


class SpanCorruptionError(KilnError):
    """A tokenizer (or span configuration) the span-corruption objective cannot use."""


def noise_tokens(length: int, noise_density: float) -> int:
    """Noise tokens in a sample of `length` (T5's: at least one, and one token kept)."""
    return min(max(round(length * noise_density), 1), length - 1)


def noise_mask(
    length: int, noise_density: float, mean_span_length: float, generator: np.random.Generator
) -> np.ndarray:
    """T5's `random_spans_noise_mask` [length] (bool): `noise_tokens` noise tokens in
    `span_count` spans, interleaved with as many kept spans (each span at least one token,
    lengths a random segmentation), the first span kept; drawn from `generator`."""
    noise = noise_tokens(length, noise_density)
    spans = span_count(length, noise_density, mean_span_length)
    if length - noise < spans:
        raise ValueError(
            f"{spans} noise spans need as many kept tokens, a sample of {length} keeps "
            f"{length - noise} (noise_density {noise_density}, mean_span_length "
            f"{mean_span_length})"
        )

    def segmentation(items: int) -> np.ndarray:
        """Lengths of a random split of `items` into `spans` non-empty segments."""
        first_in_segment = generator.permutation(np.arange(items - 1) < spans - 1)
        segment_id = np.cumsum(np.concatenate([[False], first_in_segment]))
        return np.bincount(segment_id, minlength=spans)

    noise_lengths = segmentation(noise)  # drawn first, as T5 does
    interleaved = np.stack([segmentation(length - noise), noise_lengths], axis=1).ravel()
    span_start = np.zeros(length, dtype=np.int64)
    span_start[np.cumsum(interleaved)[:-1]] = 1
    return np.cumsum(span_start) % 2 == 1


@dataclass(frozen=True)
class SpanCorruptor:
    tokenizer_file: Path
    sentinel_ids: np.ndarray  # int64, in order: the k-th noise span's sentinel is the k-th
    eos_id: int
    start_id: int  # the decoder's first input
    noise_density: float
    mean_span_length: float
    sample_tokens: int  # a sample's tokens before corruption
    encoder_length: int  # = train.seq_length of a validated configuration
    decoder_length: int  # = spans.decoder_length of a validated configuration
    seed: int

    @classmethod
    def for_tokenizer(
        cls, tokenizer_file: Path, spans: SpanConfig, eos_token: str, seed: int
    ) -> SpanCorruptor:
        """The corruptor of a data directory's tokenizer.json, for a validated t5
        configuration's `spans` (sample_tokens set): one clear line if the tokenizer lacks the
        start token, EOS or a sentinel. The encoder and decoder lengths follow from
        `spans.sample_tokens` as the mask draws them."""
        if spans.sample_tokens is None:
            raise SpanCorruptionError(
                "spans.sample_tokens is unset: pass the spans of a validated t5 configuration"
            )
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        needed = [spans.start_token, eos_token, *spans.sentinel_tokens()]
        ids = [tokenizer.token_to_id(token) for token in needed]
        missing = [token for token, token_id in zip(needed, ids, strict=True) if token_id is None]
        if missing:
            raise SpanCorruptionError(
                f"{tokenizer_file}: the tokenizer lacks {len(missing)} of the {len(needed)} "
                f"tokens span corruption (model.arch: t5) needs, the first {missing[0]}: "
                "prepare the data with a t5 configuration (kiln data prepare adds them)"
            )
        tokens, density, mean = spans.sample_tokens, spans.noise_density, spans.mean_span_length
        noise, count = noise_tokens(tokens, density), span_count(tokens, density, mean)
        if count > spans.sentinels:
            raise SpanCorruptionError(
                f"a sample of {tokens} tokens has {count} noise spans, more than "
                f"spans.sentinels ({spans.sentinels})"
            )
        decoder = noise + count + 1
        if spans.decoder_length is not None and spans.decoder_length != decoder:
            raise SpanCorruptionError(
                f"spans.decoder_length {spans.decoder_length} does not fit a sample of {tokens} "
                f"tokens, which corrupts to a decoder of {decoder}"
            )
        return cls(
            tokenizer_file=Path(tokenizer_file),
            sentinel_ids=np.array(ids[2:], dtype=np.int64),
            eos_id=ids[1],
            start_id=ids[0],
            noise_density=density,
            mean_span_length=mean,
            sample_tokens=tokens,
            encoder_length=tokens - noise + count + 1,
            decoder_length=decoder,
            seed=seed,
        )

    def mask(self, length: int, index: int, split: str) -> np.ndarray:
        """The noise mask [length] of this (seed, split, sample index)."""
        generator = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([self.seed, SPLITS[split], int(index)]))
        )
        return noise_mask(length, self.noise_density, self.mean_span_length, generator)

    def __call__(
        self, tokens: np.ndarray, index: int, split: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(encoder_inputs [E], decoder_inputs [D], targets [D]), int64, of one sample's tokens
        [sample_tokens] (int64), corrupted for this index."""
        mask = self.mask(tokens.shape[0], index, split)
        starts = mask & ~np.concatenate([[False], mask[:-1]])
        count = int(starts.sum())
        if count > self.sentinel_ids.shape[0]:
            raise SpanCorruptionError(
                f"a sample of {tokens.shape[0]} tokens has {count} noise spans, more than the "
                f"{self.sentinel_ids.shape[0]} sentinels"
            )
        sentinels = self.sentinel_ids[:count]
        encoder = tokens.astype(np.int64, copy=True)
        encoder[starts] = sentinels
        encoder = np.append(encoder[~mask | starts], self.eos_id)
        # a noise token's place in the targets: noise tokens before it, plus a sentinel per span
        places = (np.cumsum(mask) - 1 + np.cumsum(starts))[mask]
        targets = np.empty(places.shape[0] + count + 1, dtype=np.int64)
        targets[places] = tokens[mask]
        targets[places[starts[mask]] - 1] = sentinels
        targets[-1] = self.eos_id
        decoder = np.concatenate([[self.start_id], targets[:-1]]).astype(np.int64)
        assert (
            encoder.shape[0] == self.encoder_length and targets.shape[0] == self.decoder_length
        ), (
            f"a sample of {tokens.shape[0]} tokens corrupted to {encoder.shape[0]} encoder and "
            f"{targets.shape[0]} decoder tokens, not {self.encoder_length} and "
            f"{self.decoder_length} (samples of {self.sample_tokens} tokens do)"
        )
        return encoder, decoder, targets


def span_micro_batch(
    samples, indices: Iterable[int], corruptor: SpanCorruptor, split: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An encoder-decoder's micro-batch (encoder_inputs [B, E], decoder_inputs [B, D],
    targets [B, D]): each sample's first sample_tokens tokens, corrupted for its index. The
    data's sequences are sample_tokens long; a sample holds one more token, the next one's
    first, which is left out, so that no token is read twice."""
    triples = [
        corruptor(samples.sample(int(g))[:-1].astype(np.int64, copy=False), int(g), split)
        for g in indices
    ]
    encoder, decoder, targets = (np.stack(part) for part in zip(*triples, strict=True))
    return encoder, decoder, targets


def sample_length(cfg: RunConfig) -> int:
    """The sequence length to build a run's samples with: train.seq_length, or for t5 the
    tokens that span corruption turns into the encoder's train.seq_length
    (`spans.sample_tokens`)."""
    if isinstance(cfg, T5RunConfig):
        return cfg.spans.sample_tokens
    return cfg.train.seq_length
