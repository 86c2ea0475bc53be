"""Training and validation samples over MMIDIDX shards: packing, epoch shuffles, blends."""

from .sampling import (
    Blend,
    SampleSource,
    ShuffledSamples,
    ValidationSamples,
    build_train_samples,
    build_validation_samples,
    configured_sources,
    largest_remainder,
    micro_batch,
    rank_batch_indices,
    source_seed,
)
from .stream import DataDirError, PackedSequences, TokenStream, load_split, read_manifest

__all__ = [
    "Blend",
    "DataDirError",
    "PackedSequences",
    "SampleSource",
    "ShuffledSamples",
    "TokenStream",
    "ValidationSamples",
    "build_train_samples",
    "build_validation_samples",
    "configured_sources",
    "largest_remainder",
    "load_split",
    "micro_batch",
    "rank_batch_indices",
    "read_manifest",
    "source_seed",
]
