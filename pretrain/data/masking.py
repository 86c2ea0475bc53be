"""BERT's masked-LM inputs from packed samples, drawn per (seed, split, sample index).

Of a sample's tokens, `probability` are chosen (never a special token); of the chosen,
`mask_fraction` are replaced by the mask token, `random_fraction` by a random non-special
token, the rest left as they are; the targets are the chosen tokens' ids and IGNORED
elsewhere, so that the loss is over the chosen positions only (BERT, RoBERTa). Samples are
packed documents with the end-of-text token between them (RoBERTa's full-sentence packing,
no next-sentence prediction). Every draw comes from a generator seeded by (seed, split,
sample index): the same sample is masked the same way on any rank, in any layout, after a
resume; the next epoch's copy of a document gets another mask, as its sample index differs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from data_pipeline.errors import KilnError
from pretrain.config.schema import MaskingConfig

SPLITS = {"train": 0, "valid": 1}
IGNORED = -1  # a target that takes no part in the loss: a position not chosen


class MaskingError(KilnError):
    """A tokenizer the masked-LM objective cannot use."""


@dataclass(frozen=True)
class Masker:
    tokenizer_file: Path
    mask_id: int
    special_ids: np.ndarray  # sorted: never chosen, never drawn as a random replacement
    replacement_ids: np.ndarray  # every other id of the tokenizer
    probability: float
    mask_fraction: float
    random_fraction: float
    seed: int

    @classmethod
    def for_tokenizer(cls, tokenizer_file: Path, masking: MaskingConfig, seed: int) -> Masker:
        """The masker of a data directory's tokenizer.json; one clear line if it has no mask
        token."""
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        mask_id = tokenizer.token_to_id(masking.token)
        if mask_id is None:
            raise MaskingError(
                f"{tokenizer_file}: the tokenizer has no {masking.token} token, which the "
                "masked-LM objective (model.arch: bert) needs: prepare the data with a bert "
                "configuration (kiln data prepare adds it), or give masking.token one it has"
            )
        special = sorted(
            token_id
            for token_id, added in tokenizer.get_added_tokens_decoder().items()
            if added.special
        )
        special_ids = np.array(sorted({*special, mask_id}), dtype=np.int64)
        everything = np.arange(tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int64)
        return cls(
            tokenizer_file=Path(tokenizer_file),
            mask_id=mask_id,
            special_ids=special_ids,
            replacement_ids=np.setdiff1d(everything, special_ids),
            probability=masking.probability,
            mask_fraction=masking.mask_fraction,
            random_fraction=masking.random_fraction,
            seed=seed,
        )

    def __call__(self, tokens: np.ndarray, index: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of one sample's tokens [S] (int64): its mask for this index."""
        generator = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([self.seed, SPLITS[split], int(index)]))
        )
        size = tokens.shape[0]
        chosen_draw, action = generator.random(size), generator.random(size)
        replacements = self.replacement_ids[
            generator.integers(0, self.replacement_ids.shape[0], size)
        ]
        eligible = ~np.isin(tokens, self.special_ids)
        chosen = eligible & (chosen_draw < self.probability)
        masked = chosen & (action < self.mask_fraction)
        randomised = chosen & ~masked & (action < self.mask_fraction + self.random_fraction)
        inputs = tokens.copy()
        inputs[masked] = self.mask_id
        inputs[randomised] = replacements[randomised]
        targets = np.where(chosen, tokens, IGNORED)
        return inputs, targets


def masked_micro_batch(
    samples, indices: Iterable[int], masker: Masker, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """An encoder's micro-batch: each sample's first S tokens, masked for its index."""
    pairs = [
        masker(samples.sample(int(g))[:-1].astype(np.int64, copy=False), int(g), split)
        for g in indices
    ]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
