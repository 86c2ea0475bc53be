"""The masked-LM objective's inputs: BERT's 15% / 80-10-10 recipe, special tokens never
chosen, the same mask for the same (seed, split, sample index)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pretrain.config.schema import MaskingConfig
from pretrain.data.masking import IGNORED, Masker, MaskingError


@pytest.fixture(scope="module")
def masker(bert_data: Path) -> Masker:
    return Masker.for_tokenizer(bert_data / "tokenizer.json", MaskingConfig(), seed=7)


def corpus_tokens(masker: Masker, count: int, seed: int = 0) -> np.ndarray:
    """Token ids with special ones sprinkled in (end-of-text between documents)."""
    generator = np.random.default_rng(seed)
    tokens = generator.choice(masker.replacement_ids, size=count)
    specials = generator.random(count) < 0.05
    tokens[specials] = generator.choice(masker.special_ids, size=int(specials.sum()))
    return tokens.astype(np.int64)


def test_bert_proportions_over_100k_tokens(masker):
    samples = [corpus_tokens(masker, 1000, seed=s) for s in range(100)]
    chosen = masked = randomised = kept = eligible = 0
    for index, tokens in enumerate(samples):
        inputs, targets = masker(tokens, index, "train")
        picked = targets != IGNORED
        assert np.array_equal(targets[picked], tokens[picked])
        eligible += int((~np.isin(tokens, masker.special_ids)).sum())
        chosen += int(picked.sum())
        masked += int((inputs[picked] == masker.mask_id).sum())
        kept += int((inputs[picked] == tokens[picked]).sum())
        changed = picked & (inputs != tokens) & (inputs != masker.mask_id)
        randomised += int(changed.sum())
        assert np.array_equal(inputs[~picked], tokens[~picked])  # only chosen ones change
    assert chosen / eligible == pytest.approx(0.15, abs=0.005)
    assert masked / chosen == pytest.approx(0.80, abs=0.005)
    # a random replacement equal to the original token counts as kept (1 in ~500 here)
    assert randomised / chosen == pytest.approx(0.10, abs=0.005)
    assert kept / chosen == pytest.approx(0.10, abs=0.005)


def test_special_tokens_are_never_chosen_nor_drawn(masker):
    tokens = np.repeat(masker.special_ids, 2000)
    inputs, targets = masker(tokens, 3, "train")
    assert (targets == IGNORED).all() and np.array_equal(inputs, tokens)
    tokens = corpus_tokens(masker, 50_000, seed=5)
    inputs, targets = masker(tokens, 4, "train")
    replaced = (targets != IGNORED) & (inputs != tokens) & (inputs != masker.mask_id)
    assert replaced.any() and not np.isin(inputs[replaced], masker.special_ids).any()


def test_the_same_index_gives_the_same_mask_and_others_differ(masker):
    tokens = corpus_tokens(masker, 2000, seed=9)
    first, again = masker(tokens, 11, "train"), masker(tokens, 11, "train")
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    for other in (masker(tokens, 12, "train"), masker(tokens, 11, "valid")):
        assert not np.array_equal(first[1], other[1])
    reseeded = Masker.for_tokenizer(masker.tokenizer_file, MaskingConfig(), seed=8)
    assert not np.array_equal(first[1], reseeded(tokens, 11, "train")[1])


def test_a_tokenizer_without_the_mask_token_is_refused_in_one_line(data):
    with pytest.raises(MaskingError, match=r"has no <mask> token") as raised:
        Masker.for_tokenizer(data / "tokenizer.json", MaskingConfig(), seed=0)
    assert "\n" not in str(raised.value)
