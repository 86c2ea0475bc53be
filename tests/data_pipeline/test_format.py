"""Kiln's shards against megatron-core's own: identical bytes, and each reads the other's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from data_pipeline.format import (
    ShardFormatError,
    ShardReader,
    ShardWriter,
    bin_path,
    idx_path,
    shard_exists,
    token_dtype,
)


def documents(seed: int, count: int, vocab: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=rng.integers(0, 300)) for _ in range(count)]


@pytest.mark.parametrize("vocab", [8192, 65535, 65536, 200_000])
def test_bytes_equal_megatron_builder(tmp_path, vocab):
    docs = documents(0, 57, vocab)
    dtype = token_dtype(vocab)
    assert dtype == (np.uint16 if vocab < 65536 else np.int32)

    with ShardWriter(tmp_path / "kiln", dtype) as shard:
        for doc in docs:
            shard.add_document(doc)

    builder = IndexedDatasetBuilder(str(bin_path(tmp_path / "megatron")), dtype=dtype)
    for doc in docs:
        builder.add_document(doc, [len(doc)])
    builder.finalize(str(idx_path(tmp_path / "megatron")))

    for path in (bin_path, idx_path):
        assert path(tmp_path / "kiln").read_bytes() == path(tmp_path / "megatron").read_bytes()


def test_megatron_reads_kiln_shards(tmp_path):
    docs = documents(1, 40, 8192)
    with ShardWriter(tmp_path / "s", np.uint16) as shard:
        for doc in docs:
            shard.add_document(doc)
    dataset = IndexedDataset(str(tmp_path / "s"))
    assert len(dataset) == len(docs)
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(dataset[i], doc)
    np.testing.assert_array_equal(dataset.document_indices, np.arange(len(docs) + 1))


def test_kiln_reads_megatron_sentence_split_shards(tmp_path):
    # Megatron's preprocess_data.py with --split-sentences: several sequences per document.
    rng = np.random.default_rng(2)
    builder = IndexedDatasetBuilder(str(bin_path(tmp_path / "m")), dtype=np.int32)
    expected_docs = []
    for _ in range(12):
        sentences = [rng.integers(0, 100_000, size=rng.integers(1, 30)) for _ in range(3)]
        for sentence in sentences:
            builder.add_item(torch.tensor(sentence))
        builder.end_document()
        expected_docs.append(np.concatenate(sentences))
    builder.finalize(str(idx_path(tmp_path / "m")))

    reader = ShardReader(tmp_path / "m")
    assert (len(reader), reader.num_documents) == (36, 12)
    for d, doc in enumerate(expected_docs):
        np.testing.assert_array_equal(reader.document(d), doc)
    assert reader.num_tokens == sum(len(d) for d in expected_docs)


def test_shard_is_invisible_until_closed(tmp_path):
    writer = ShardWriter(tmp_path / "s", np.uint16)
    writer.add_document([1, 2, 3])
    assert not shard_exists(tmp_path / "s")
    writer.close()
    assert shard_exists(tmp_path / "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.idx"]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "s", np.uint16) as writer:
        writer.add_document([1, 2])
        raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []


def test_out_of_range_ids_are_refused(tmp_path):
    with ShardWriter(tmp_path / "s", np.uint16) as writer, pytest.raises(ValueError):
        writer.add_document([70_000])


def test_empty_shard_round_trips(tmp_path):
    # Kiln reads an empty shard; Megatron cannot mmap an empty .bin, so the pipeline never
    # writes one.
    ShardWriter(tmp_path / "e", np.uint16).close()
    reader = ShardReader(tmp_path / "e")
    assert (len(reader), reader.num_tokens) == (0, 0)


@pytest.mark.parametrize("damage", ["magic", "truncated_index", "truncated_data", "missing"])
def test_damaged_shards_are_a_clear_error(tmp_path, damage):
    with ShardWriter(tmp_path / "s", np.uint16) as writer:
        writer.add_document(list(range(100)))
    if damage == "magic":
        idx_path(tmp_path / "s").write_bytes(b"NOTMMIDX" + idx_path(tmp_path / "s").read_bytes())
    elif damage == "truncated_index":
        idx_path(tmp_path / "s").write_bytes(idx_path(tmp_path / "s").read_bytes()[:-5])
    elif damage == "truncated_data":
        bin_path(tmp_path / "s").write_bytes(bin_path(tmp_path / "s").read_bytes()[:10])
    else:
        bin_path(tmp_path / "s").unlink()
    with pytest.raises(ShardFormatError):
        ShardReader(tmp_path / "s")
