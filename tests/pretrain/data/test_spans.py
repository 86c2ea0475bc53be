"""T5's span corruption: 15% noise in spans of 3 on average, the encoder's and decoder's
sequences rebuild the sample, the same corruption for the same (seed, split, sample index)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from pretrain.config.schema import KilnConfig, SpanConfig, span_count
from pretrain.data.spans import SpanCorruptionError, SpanCorruptor, noise_mask, span_micro_batch

EOS = "<|endoftext|>"
WORDS = 1000  # ordinary tokens, ids 0..999; the special ones follow


def t5_config(seq_length: int) -> KilnConfig:
    model = dict(
        arch="t5", num_layers=2, hidden_size=64, num_heads=4, vocab_size=8192, max_seq_length=512
    )
    return KilnConfig.model_validate({"model": model, "train": {"seq_length": seq_length}})


def write_tokenizer(path: Path, specials: list[str]) -> Path:
    vocab = {f"w{i}": i for i in range(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.add_special_tokens(specials)
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def t5_tokenizer(tmp_path_factory) -> Path:
    specials = [EOS, "<|pad|>", *SpanConfig().sentinel_tokens()]
    return write_tokenizer(tmp_path_factory.mktemp("t5") / "tokenizer.json", specials)


@pytest.fixture(scope="module")
def configs() -> dict[int, KilnConfig]:
    return {length: t5_config(length) for length in (128, 512)}


def corruptor(tokenizer: Path, config: KilnConfig, seed: int = 7) -> SpanCorruptor:
    return SpanCorruptor.for_tokenizer(tokenizer, config.spans, EOS, seed=seed)


def sample(length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, WORDS, length, dtype=np.int64)


def runs(mask: np.ndarray) -> np.ndarray:
    """Lengths of the maximal runs of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


def test_noise_density_and_mean_span_length_over_100k_tokens(t5_tokenizer, configs):
    spans = corruptor(t5_tokenizer, configs[512])
    masks = [spans.mask(spans.sample_tokens, index, "train") for index in range(200)]
    noise = sum(int(m.sum()) for m in masks)
    lengths = np.concatenate([runs(m) for m in masks])
    tokens = sum(m.shape[0] for m in masks)
    assert tokens >= 100_000
    assert noise / tokens == pytest.approx(0.15, abs=0.01)
    assert lengths.mean() == pytest.approx(3.0, abs=0.2)
    assert len({tuple(runs(m)) for m in masks}) > 190  # the span lengths vary between samples


@pytest.mark.parametrize("length", [20, 141, 568, 1000, 4097])
def test_noise_mask_follows_t5s_random_spans_noise_mask(length):
    generator = np.random.default_rng(length)
    for _ in range(20):
        mask = noise_mask(length, 0.15, 3.0, generator)
        assert mask.dtype == bool and mask.shape == (length,)
        assert not mask[0]  # a kept span first
        assert mask[-1]  # ... and a noise span last: kept and noise spans alternate, as many
        assert int(mask.sum()) == round(length * 0.15)
        assert runs(mask).shape[0] == span_count(length, 0.15, 3.0)
        assert runs(~mask).shape[0] == span_count(length, 0.15, 3.0)


def reference_noise_mask(length, noise_density, mean_span_length, generator):
    """Hugging Face's run_t5_mlm_flax.py `random_spans_noise_mask` (T5's span count), with
    `generator.shuffle` for `np.random.shuffle`."""
    num_noise_tokens = int(np.round(length * noise_density))
    num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
    num_noise_spans = max(int(np.round(num_noise_tokens / mean_span_length)), 1)
    num_nonnoise_tokens = length - num_noise_tokens

    def _random_segmentation(num_items, num_segments):
        mask_indices = np.arange(num_items - 1) < (num_segments - 1)
        generator.shuffle(mask_indices)
        first_in_segment = np.pad(mask_indices, [[1, 0]])
        segment_id = np.cumsum(first_in_segment)
        _, segment_length = np.unique(segment_id, return_counts=True)
        return segment_length

    noise_span_lengths = _random_segmentation(num_noise_tokens, num_noise_spans)
    nonnoise_span_lengths = _random_segmentation(num_nonnoise_tokens, num_noise_spans)
    interleaved_span_lengths = np.reshape(
        np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1), [num_noise_spans * 2]
    )
    span_starts = np.cumsum(interleaved_span_lengths)[:-1]
    span_start_indicator = np.zeros((length,), dtype=np.int8)
    span_start_indicator[span_starts] = True
    span_num = np.cumsum(span_start_indicator)
    is_noise = np.equal(span_num % 2, 1)
    return is_noise[:length]


@pytest.mark.parametrize("length", [2, 20, 141, 568, 4097])
@pytest.mark.parametrize(("density", "mean"), [(0.15, 3.0), (0.3, 8.0), (0.05, 1.0)])
def test_noise_mask_draws_exactly_the_reference_mask(length, density, mean):
    ours, theirs = np.random.default_rng(1), np.random.default_rng(1)
    for _ in range(10):
        expected = reference_noise_mask(length, density, mean, theirs)
        assert np.array_equal(noise_mask(length, density, mean, ours), expected)


def test_the_same_index_gives_the_same_corruption_and_others_differ(t5_tokenizer, configs):
    spans = corruptor(t5_tokenizer, configs[512])
    tokens = sample(spans.sample_tokens, seed=3)
    first, again = spans(tokens, 11, "train"), spans(tokens, 11, "train")
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    mask = spans.mask(spans.sample_tokens, 11, "train")
    reseeded = corruptor(t5_tokenizer, configs[512], seed=8)
    others = (
        spans.mask(spans.sample_tokens, 12, "train"),
        spans.mask(spans.sample_tokens, 11, "valid"),
        reseeded.mask(spans.sample_tokens, 11, "train"),
    )
    assert all(not np.array_equal(mask, other) for other in others)
    assert not np.array_equal(first[0], spans(tokens, 12, "train")[0])


@pytest.mark.parametrize("seq_length", [128, 512])
def test_encoder_and_targets_rebuild_the_sample_at_the_configured_lengths(
    t5_tokenizer, configs, seq_length
):
    config = configs[seq_length]
    spans = corruptor(t5_tokenizer, config)
    assert spans.sample_tokens == config.spans.sample_tokens
    assert (spans.encoder_length, spans.decoder_length) == (
        seq_length,
        config.spans.decoder_length,
    )
    sentinel_of = {int(s): k for k, s in enumerate(spans.sentinel_ids)}
    for index in range(200):
        tokens = sample(spans.sample_tokens, seed=index)
        encoder, decoder, targets = spans(tokens, index, "train")
        assert encoder.dtype == decoder.dtype == targets.dtype == np.int64
        assert encoder.shape == (seq_length,) and targets.shape == (config.spans.decoder_length,)
        assert encoder[-1] == spans.eos_id and targets[-1] == spans.eos_id
        assert decoder[0] == spans.start_id and np.array_equal(decoder[1:], targets[:-1])
        in_encoder = [sentinel_of[t] for t in encoder.tolist() if t in sentinel_of]
        in_targets = [sentinel_of[t] for t in targets.tolist() if t in sentinel_of]
        assert in_encoder == in_targets == list(range(len(in_encoder)))
        assert targets[0] == spans.sentinel_ids[0]
        # each sentinel of the encoder stands for the target's span after that sentinel
        pieces = np.split(targets[:-1], np.flatnonzero(np.isin(targets[:-1], spans.sentinel_ids)))
        span_of = {sentinel_of[int(p[0])]: p[1:].tolist() for p in pieces if p.size}
        rebuilt = []
        for token in encoder[:-1].tolist():
            rebuilt.extend(span_of[sentinel_of[token]] if token in sentinel_of else [token])
        assert rebuilt == tokens.tolist()


def test_a_micro_batch_stacks_whole_samples_corrupted_for_their_index(t5_tokenizer, configs):
    spans = corruptor(t5_tokenizer, configs[128])

    class Samples:  # sequences of sample_tokens: a sample holds one more token, left out
        def sample(self, index: int) -> np.ndarray:
            tokens = sample(spans.sample_tokens, seed=index)
            return np.append(tokens, 7).astype(np.uint16)

    encoder, decoder, targets = span_micro_batch(Samples(), [5, 9, 2], spans, "valid")
    assert encoder.shape == (3, 128) and decoder.shape == targets.shape == (3, 29)
    alone = spans(sample(spans.sample_tokens, seed=9), 9, "valid")
    assert all(
        np.array_equal(batch[1], one)
        for batch, one in zip((encoder, decoder, targets), alone, strict=True)
    )


def test_a_tokenizer_without_sentinels_is_refused_in_one_line(tmp_path, configs):
    plain = write_tokenizer(tmp_path / "tokenizer.json", [EOS, "<|pad|>"])
    with pytest.raises(
        SpanCorruptionError, match=r"lacks 100 of the 102 .* the first <extra_id_0>"
    ) as raised:
        corruptor(plain, configs[128])
    message = str(raised.value)
    assert "\n" not in message and str(plain) in message and "t5 configuration" in message


def test_more_spans_than_sentinels_are_refused(t5_tokenizer, configs):
    few = configs[512].spans.model_copy(update={"sentinels": 10})
    with pytest.raises(SpanCorruptionError, match=r"more than spans.sentinels \(10\)"):
        SpanCorruptor.for_tokenizer(t5_tokenizer, few, EOS, seed=0)


@pytest.mark.parametrize(
    ("density", "mean", "sample_tokens", "decoder_length"), [(0.15, 5.0, 10, 3), (0.5, 3.0, 14, 11)]
)
def test_lengths_the_mask_cannot_produce_are_refused(
    t5_tokenizer, density, mean, sample_tokens, decoder_length
):
    # what span_lengths derives where round(noise / mean) is 0 (the mask draws 1 span) and at
    # T5's noise_density 0.5 adjustment: neither corrupts to the decoder length it claims
    spans = SpanConfig(
        noise_density=density,
        mean_span_length=mean,
        sample_tokens=sample_tokens,
        decoder_length=decoder_length,
    )
    with pytest.raises(SpanCorruptionError, match=rf"decoder_length {decoder_length} does not"):
        SpanCorruptor.for_tokenizer(t5_tokenizer, spans, EOS, seed=0)
