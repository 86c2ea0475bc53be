"""Training and validation samples over MMIDIDX shards: packing, document and epoch shuffles,
blends."""

from .documents import DocumentTable, ShuffledDocumentSamples
from .sampling import (
    Blend,
    SampleSource,
    ValidationSamples,
    build_train_samples,
    build_validation_samples,
    configured_sources,
    largest_remainder,
    micro_batch,
    rank_batch_indices,
    source_seed,
)
from .stream import (
    DataDirError,
    PackedSequences,
    TokenStream,
    load_split,
    load_split_documents,
    read_manifest,
)

__all__ = [
    "Blend",
    "DataDirError",
    "PackedSequences",
    "SampleSource",
    "DocumentTable",
    "ShuffledDocumentSamples",
    "TokenStream",
    "ValidationSamples",
    "build_train_samples",
    "build_validation_samples",
    "configured_sources",
    "largest_remainder",
    "load_split",
    "load_split_documents",
    "micro_batch",
    "rank_batch_indices",
    "read_manifest",
    "source_seed",
]
