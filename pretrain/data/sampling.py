"""Which packed sample each global index reads: epoch shuffles, blends, and rank layouts.

Every mapping here is a pure function of (configuration, seed, global index), so a run resumed at
sample 10^9 reads exactly what an uninterrupted run would have read, and nothing is stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from .documents import DocumentTable, ShuffledDocumentSamples
from .stream import (
    DataDirError,
    PackedSequences,
    TokenStream,
    check_index,
    check_seed,
    load_split,
    load_split_documents,
)


class SampleSource(Protocol):
    """Anything that maps a non-negative global index to seq_length + 1 tokens."""

    seq_length: int

    def sample(self, g: int) -> np.ndarray: ...


class ValidationSamples:
    """Validation in a fixed order, no shuffle: index g reads packed sample g % len(packed)."""

    def __init__(self, packed: PackedSequences) -> None:
        self.packed = packed
        self.seq_length = packed.seq_length

    def __len__(self) -> int:
        return len(self.packed)

    def sample(self, g: int) -> np.ndarray:
        return self.packed.sample(check_index(g) % len(self.packed))


def largest_remainder(weights: Sequence[float], total: int) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `weights` by largest-remainder rounding.

    Ties go to the earlier source; a positive weight gets 0 only if its share is below 1.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not w.size or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {weights}")
    quotas = w / w.sum() * total
    counts = np.floor(quotas).astype(np.int64)
    rest = total - int(counts.sum())
    counts[np.argsort(counts - quotas, kind="stable")[:rest]] += 1
    return counts


class Blend:
    """Mix several sources by weight, statelessly: any global index is computed directly.

    The global sequence is cut into blocks of `block` samples. Every block holds `counts[i]`
    samples of source i (largest-remainder rounding of the normalised weights × block), in an
    order shuffled per block by np.random.default_rng([seed, block_index]). The k-th occurrence
    of source i in block b reads that source's own index b * counts[i] + k, so each source is
    consumed in order, without repeats or gaps. With one source the mapping is the identity.
    """

    def __init__(
        self,
        sources: Sequence[SampleSource],
        weights: Sequence[float],
        seed: int,
        block: int = 4096,
    ) -> None:
        if not sources or len(sources) != len(weights):
            raise ValueError(
                f"a blend needs one weight per source, got {len(sources)} sources "
                f"and {len(weights)} weights"
            )
        if block < 1:
            raise ValueError(f"block must be at least 1, got {block}")
        lengths = {s.seq_length for s in sources}
        if len(lengths) != 1:
            raise ValueError(f"blended sources must share one seq_length, got {sorted(lengths)}")
        self.sources = list(sources)
        self.seq_length = lengths.pop()
        self.seed = check_seed(seed)
        self.block = int(block)
        self.counts = largest_remainder(weights, self.block)
        # Stream position where each source's run starts in an unshuffled block.
        self._starts = np.concatenate(([0], np.cumsum(self.counts)[:-1]))
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def _arrangement(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Block b's source of each position and its occurrence number within the block."""
        if self._cached is None or self._cached[0] != b:
            owner = np.repeat(np.arange(len(self.sources), dtype=np.int32), self.counts)
            np.random.default_rng([self.seed, b]).shuffle(owner)
            order = np.argsort(owner, kind="stable")
            occurrence = np.empty(self.block, dtype=np.int64)
            occurrence[order] = np.arange(self.block) - self._starts[owner[order]]
            self._cached = (b, owner, occurrence)
        return self._cached[1], self._cached[2]

    def locate(self, g: int) -> tuple[int, int]:
        """(source, that source's own index) read by global index g."""
        g = check_index(g)
        if len(self.sources) == 1:
            return 0, g
        b, position = divmod(g, self.block)
        owner, occurrence = self._arrangement(b)
        source = int(owner[position])
        return source, b * int(self.counts[source]) + int(occurrence[position])

    def source_of(self, g: int) -> int:
        return self.locate(g)[0]

    def sample(self, g: int) -> np.ndarray:
        source, local = self.locate(g)
        return self.sources[source].sample(local)


def rank_batch_indices(
    first_sample: int,
    micro: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    grad_accum: int,
) -> range:
    """Global sample indices of micro-batch `micro` on data-parallel rank `dp_rank` of the
    global batch that starts at sample `first_sample` (the samples consumed before it).

    With global batch G = micro_batch_size * grad_accum * dp_size, they are
    first_sample + micro * (micro_batch_size * dp_size) + dp_rank * micro_batch_size
    + [0, micro_batch_size).
    The union over all ranks and micro-batches is exactly [first_sample, first_sample + G),
    disjointly, for every layout with the same G: a step trains on the same samples whatever
    the data-parallel size, which makes losses comparable across layouts and lets a run resume
    under another layout where it stopped.
    """
    sizes = {"micro_batch_size": micro_batch_size, "dp_size": dp_size, "grad_accum": grad_accum}
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if first_sample < 0 or not 0 <= micro < grad_accum or not 0 <= dp_rank < dp_size:
        raise ValueError(
            f"first_sample {first_sample}, micro {micro}, dp_rank {dp_rank} outside "
            f"first_sample >= 0, 0 <= micro < {grad_accum}, 0 <= dp_rank < {dp_size}"
        )
    start = first_sample + micro * micro_batch_size * dp_size + dp_rank * micro_batch_size
    return range(start, start + micro_batch_size)


def micro_batch(samples: SampleSource, indices: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """int64 inputs [B, S] and targets [B, S] (inputs shifted by one) of the given samples."""
    rows = np.stack([samples.sample(int(g)) for g in indices]).astype(np.int64, copy=False)
    return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])


def source_seed(seed: int, source: int) -> int:
    """The shuffle seed of blend source `source`, so equal-sized sources get distinct orders."""
    return int(np.random.SeedSequence([check_seed(seed), source]).generate_state(1)[0])


def _same_tokenizer(streams: Sequence[tuple[Path, TokenStream]]) -> None:
    """Blended data directories must share one tokenizer."""
    first_path, first = streams[0]
    for path, stream in streams[1:]:
        if (stream.vocab_size, stream.eos_id) != (first.vocab_size, first.eos_id):
            raise DataDirError(
                f"{path} has tokenizer vocab_size {stream.vocab_size} and eos_id "
                f"{stream.eos_id} but {first_path} has {first.vocab_size} and {first.eos_id}; "
                "blended data directories must share one tokenizer"
            )


def _open_split(
    paths_and_weights: Sequence[tuple[str | Path, float]], split: str, seq_length: int
) -> list[PackedSequences]:
    """Packed sequences of `split` of every directory, in corpus order."""
    if not paths_and_weights:
        raise ValueError("at least one data directory is needed")
    streams = [(Path(path), load_split(path, split)) for path, _ in paths_and_weights]
    _same_tokenizer(streams)
    return [PackedSequences(stream, seq_length) for _, stream in streams]


def configured_sources(data) -> list[tuple[str, float]]:
    """(directory, weight) of a run's `data` section: `data.blend`, else `data.path`."""
    if data.blend:
        return [(entry.path, entry.weight) for entry in data.blend]
    if data.path:
        return [(data.path, 1.0)]
    raise DataDirError("the configuration names no data: set data.path or data.blend")


def build_train_samples(
    paths_and_weights: Sequence[tuple[str | Path, float]], seq_length: int, seed: int
) -> Blend:
    """Training samples: each directory's train split, documents then sequences shuffled per
    epoch (`ShuffledDocumentSamples`), blended by weight."""
    if not paths_and_weights:
        raise ValueError("at least one data directory is needed")
    loaded = [(Path(path), *load_split_documents(path, "train")) for path, _ in paths_and_weights]
    _same_tokenizer([(path, stream) for path, stream, _, _ in loaded])
    sources = [
        ShuffledDocumentSamples(
            stream, DocumentTable.of(lengths, passes), seq_length, source_seed(seed, index)
        )
        for index, (_, stream, lengths, passes) in enumerate(loaded)
    ]
    return Blend(sources, [w for _, w in paths_and_weights], seed)


def build_validation_samples(
    paths_and_weights: Sequence[tuple[str | Path, float]], seq_length: int, seed: int
) -> Blend:
    """Validation samples: each directory's valid split unshuffled, blended by the same weights."""
    packed = _open_split(paths_and_weights, "valid", seq_length)
    return Blend([ValidationSamples(p) for p in packed], [w for _, w in paths_and_weights], seed)
