"""Training datasets over shards: token streams, packing, epoch shuffles, blends, rank layouts."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.format import ShardFormatError, ShardReader, ShardWriter, idx_path
from pretrain.data import (
    Blend,
    DataDirError,
    DocumentTable,
    PackedSequences,
    ShuffledDocumentSamples,
    ValidationSamples,
    build_train_samples,
    build_validation_samples,
    largest_remainder,
    load_split,
    load_split_documents,
    micro_batch,
    rank_batch_indices,
)

EOS = 0


def documents(seed: int, count: int, low: int = 1, high: int = 1000) -> list[np.ndarray]:
    """Random documents of ids in [low, high), each ending with EOS."""
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(low, high, size=rng.integers(0, 40)), EOS) for _ in range(count)]


def write_dir(
    root: Path, shards: list[tuple[str, str, list[np.ndarray]]], vocab: int = 1000, eos: int = EOS
) -> Path:
    """A data directory as `kiln data prepare` writes it: shards plus a hand-written manifest."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, split, docs in shards:
        with ShardWriter(root / name, np.uint16) as shard:
            for doc in docs:
                shard.add_document(doc)
        tokens = int(sum(len(d) for d in docs))
        entries.append({"name": name, "split": split, "documents": len(docs), "tokens": tokens})
    manifest = {
        "shards": entries,
        "tokenizer": {"file": "tokenizer.json", "vocab_size": vocab, "eos_id": eos},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def concat(docs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)


# --- token streams -----------------------------------------------------------------------


def test_token_stream_is_the_documents_back_to_back(tmp_path):
    docs = documents(0, 20)
    with ShardWriter(tmp_path / "s", np.uint16) as shard:
        for doc in docs:
            shard.add_document(doc)
    stream = ShardReader(tmp_path / "s").token_stream()
    assert stream.dtype == np.uint16
    np.testing.assert_array_equal(stream, concat(docs))


def test_token_stream_rejects_non_contiguous_pointers(tmp_path):
    with ShardWriter(tmp_path / "s", np.uint16) as shard:
        shard.add_document([1, 2, 3])
        shard.add_document([4, 5, 6])
    # Swap the two byte pointers: a valid shard, but not stored back to back in index order.
    path = idx_path(tmp_path / "s")
    raw = bytearray(path.read_bytes())
    pointers_at = 9 + 8 + 1 + 8 + 8 + 4 * 2
    raw[pointers_at : pointers_at + 16] = np.array([6, 0], dtype=np.int64).tobytes()
    path.write_bytes(bytes(raw))
    reader = ShardReader(tmp_path / "s")
    np.testing.assert_array_equal(reader[0], [4, 5, 6])
    with pytest.raises(ShardFormatError, match="sequence 0 starts at byte 6, not 0"):
        reader.token_stream()


def test_read_across_shard_boundaries_equals_concatenation(tmp_path):
    parts = [documents(1, 3), [], documents(2, 1), documents(3, 4)]
    data = write_dir(
        tmp_path,
        # Manifest order, not name order, decides the stream order.
        [
            ("train_00002", "train", parts[0]),
            ("train_00000", "train", parts[1]),
            ("valid_00000", "valid", documents(9, 2)),
            ("train_00001", "train", parts[2]),
            ("train_00003", "train", parts[3]),
        ],
        vocab=1000,
        eos=EOS,
    )
    stream = load_split(data, "train")
    expected = concat([concat(p) for p in parts if p])
    assert len(stream) == len(expected)
    assert (stream.vocab_size, stream.eos_id) == (1000, EOS)
    for start in range(len(expected) + 1):
        for length in (0, 1, 7, 40, len(expected) - start):
            if start + length <= len(expected):
                got = stream.read(start, length)
                assert got.dtype == np.int64
                np.testing.assert_array_equal(got, expected[start : start + length])
    with pytest.raises(IndexError):
        stream.read(len(expected) - 2, 3)


# --- packing -----------------------------------------------------------------------------


@pytest.mark.parametrize("seq_length", [1, 5, 16])
def test_packing_overlaps_by_one_and_covers_every_token_once(tmp_path, seq_length):
    data = write_dir(tmp_path, [("train_00000", "train", documents(4, 12))])
    stream = load_split(data, "train")
    packed = PackedSequences(stream, seq_length)
    assert len(packed) == (len(stream) - 1) // seq_length
    everything = stream.read(0, len(stream))
    samples = [packed.sample(i) for i in range(len(packed))]
    for a, b in zip(samples, samples[1:], strict=False):
        assert len(a) == seq_length + 1
        assert a[-1] == b[0]
    inputs = np.concatenate([s[:-1] for s in samples])
    np.testing.assert_array_equal(inputs, everything[: len(packed) * seq_length])
    assert len(everything) - len(inputs) <= seq_length  # only the tail is left out
    with pytest.raises(IndexError):
        packed.sample(len(packed))


def test_packing_needs_seq_length_plus_one_tokens(tmp_path):
    data = write_dir(tmp_path, [("train_00000", "train", [np.array([5, 6, 7, EOS])])])
    stream = load_split(data, "train")
    assert len(PackedSequences(stream, 3)) == 1
    with pytest.raises(DataDirError, match="needs at least seq_length\\+1 = 5 tokens"):
        PackedSequences(stream, 4)


# --- epoch shuffles ----------------------------------------------------------------------


def packed_of(tmp_path: Path, seq_length: int = 4, seed: int = 5) -> PackedSequences:
    data = write_dir(tmp_path, [("train_00000", "train", documents(seed, 30))])
    return PackedSequences(load_split(data, "train"), seq_length)


def shuffled_of(
    tmp_path: Path, docs: list[np.ndarray], seq_length: int, seed: int, passes=None
) -> ShuffledDocumentSamples:
    data = write_dir(tmp_path, [("train_00000", "train", docs)])
    stream, lengths, _ = load_split_documents(data, "train")
    return ShuffledDocumentSamples(stream, DocumentTable.of(lengths, passes), seq_length, seed)


def expected_epoch(docs: list[np.ndarray], seq_length: int, seed: int, epoch: int) -> list:
    """The epoch's samples the slow way: documents permuted, packed, windows permuted."""
    order = np.random.default_rng([seed, epoch, 0]).permutation(len(docs))
    stream = concat([docs[i] for i in order])
    windows = [
        stream[i * seq_length : i * seq_length + seq_length + 1]
        for i in range((len(stream) - 1) // seq_length)
    ]
    perm = np.random.default_rng([seed, epoch]).permutation(len(windows))
    return [windows[i] for i in perm]


def test_documents_then_sequences_are_shuffled_per_epoch(tmp_path):
    docs = documents(5, 60)
    samples = shuffled_of(tmp_path, docs, seq_length=4, seed=7)
    n = samples.epoch_size
    assert n > 40
    for epoch in range(3):
        expected = expected_epoch(docs, 4, 7, epoch)
        got = [samples.sample(g) for g in range(epoch * n, (epoch + 1) * n)]
        assert len(expected) == n
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)
    far = 10**9
    np.testing.assert_array_equal(
        samples.sample(far), expected_epoch(docs, 4, 7, far // n)[far % n]
    )
    other = shuffled_of(tmp_path / "other", docs, seq_length=4, seed=8)
    assert not all(np.array_equal(other.sample(g), samples.sample(g)) for g in range(10))


def test_neighbours_in_a_sequence_are_random_documents(tmp_path):
    """Document d holds only the token d + 1: a sequence shows which documents met. Corpus
    neighbours meet in a shuffled epoch about as often as chance has it, not always."""
    count, seq_length = 400, 16
    rng = np.random.default_rng(3)
    docs = [np.append(np.full(int(rng.integers(2, 6)), d + 1), EOS) for d in range(count)]
    samples = shuffled_of(tmp_path, docs, seq_length, seed=11)
    met = neighbours = 0
    for g in range(samples.epoch_size):
        ids = [int(t) - 1 for t in samples.sample(g) if t != EOS]
        order = list(dict.fromkeys(ids))  # the documents, in the order the sequence holds them
        for a, b in zip(order, order[1:], strict=False):
            met += 1
            neighbours += abs(a - b) == 1
    assert met > 300
    # By chance a pair of documents are corpus neighbours with probability 2 / count.
    assert neighbours / met < 5 * 2 / count


def test_a_pass_is_shuffled_apart_and_copies_never_share_a_sequence(tmp_path):
    """Documents written twice by an input weight, the copies a pass later (as `kiln data
    prepare` writes them): a window never crosses passes, so no sequence holds both copies."""
    count, seq_length = 120, 8
    rng = np.random.default_rng(4)
    first = [np.append(np.full(int(rng.integers(2, 9)), d + 1), EOS) for d in range(count)]
    doubled = [doc for doc in first if int(doc[0]) % 3 == 0]
    samples = shuffled_of(
        tmp_path, first + doubled, seq_length, seed=2, passes=[count, len(doubled)]
    )
    for g in range(3 * samples.epoch_size):
        ids = [int(t) for t in samples.sample(g) if t != EOS]
        runs = [ids[0]] + [b for a, b in zip(ids, ids[1:], strict=False) if b != a]
        assert len(runs) == len(set(runs)), runs  # no document twice in one sequence
    with pytest.raises(DataDirError, match="passes hold"):
        DocumentTable.of(np.ones(5, np.int64), [3, 3])


def test_validation_samples_are_fixed_and_wrap(tmp_path):
    packed = packed_of(tmp_path)
    validation = ValidationSamples(packed)
    for g in (0, 3, len(packed), 2 * len(packed) + 1):
        np.testing.assert_array_equal(validation.sample(g), packed.sample(g % len(packed)))


# --- blends ------------------------------------------------------------------------------


class Counting:
    """A fake source whose sample g is g repeated, so a blend's reads can be checked."""

    seq_length = 2

    def sample(self, g: int) -> np.ndarray:
        return np.full(3, g, dtype=np.int64)


@pytest.mark.parametrize(
    ("weights", "block"),
    [([0.5, 0.3, 0.2], 100), ([1, 1, 1], 100), ([3.7, 0.01, 1.2, 5], 4096), ([2, 0, 1], 7)],
)
def test_blend_block_counts_follow_weights(weights, block):
    blend = Blend([Counting() for _ in weights], weights, seed=3, block=block)
    shares = np.asarray(weights) / sum(weights) * block
    assert blend.counts.sum() == block
    assert np.all(np.abs(blend.counts - shares) < 1)
    for b in range(3):
        owners = [blend.source_of(g) for g in range(b * block, (b + 1) * block)]
        np.testing.assert_array_equal(np.bincount(owners, minlength=len(weights)), blend.counts)


def test_largest_remainder_ties_and_errors():
    np.testing.assert_array_equal(largest_remainder([1, 1, 1], 100), [34, 33, 33])
    np.testing.assert_array_equal(largest_remainder([1, 1000], 10), [0, 10])
    for bad in ([], [0, 0], [1, -1], [float("nan")]):
        with pytest.raises(ValueError, match="weights must be"):
            largest_remainder(bad, 10)


def test_blend_is_deterministic_and_seeded():
    def arrangement(seed: int) -> list[int]:
        blend = Blend([Counting(), Counting()], [0.6, 0.4], seed=seed, block=50)
        return [blend.source_of(g) for g in range(200)]

    assert arrangement(1) == arrangement(1)
    assert arrangement(1) != arrangement(2)
    blend = Blend([Counting(), Counting()], [0.6, 0.4], seed=1, block=50)
    assert arrangement(1)[:50] != arrangement(1)[50:100]  # each block shuffled on its own
    assert blend.sample(123)[0] == blend.locate(123)[1]


def test_blend_consumes_each_source_in_order_without_gaps():
    blend = Blend([Counting() for _ in range(3)], [0.5, 0.25, 0.25], seed=0, block=64)
    reads: list[list[int]] = [[], [], []]
    for g in range(10 * 64):
        source, local = blend.locate(g)
        reads[source].append(local)
    for source, locals_ in enumerate(reads):
        assert locals_ == list(range(10 * int(blend.counts[source])))


def test_blend_at_a_huge_index_is_fast_and_matches_sequential():
    blend = Blend([Counting() for _ in range(3)], [0.7, 0.2, 0.1], seed=11)
    g = 10**9
    blend.locate(5)  # a cached earlier block must not matter
    begin = time.perf_counter()
    source, local = blend.locate(g)
    assert time.perf_counter() - begin < 0.5
    # Sequentially, block by block: the occurrences of each source before g in g's block.
    b, position = divmod(g, blend.block)
    owner = np.repeat(np.arange(3), blend.counts)
    np.random.default_rng([11, b]).shuffle(owner)
    assert source == owner[position]
    earlier = int(np.sum(owner[:position] == source))
    assert local == b * int(blend.counts[source]) + earlier
    assert Blend([Counting() for _ in range(3)], [0.7, 0.2, 0.1], seed=11).locate(g) == (
        source,
        local,
    )


def test_blend_of_one_source_is_the_identity(tmp_path):
    blend = Blend([Counting()], [1.0], seed=4, block=8)
    assert [blend.locate(g) for g in (0, 7, 8, 10**9)] == [(0, 0), (0, 7), (0, 8), (0, 10**9)]


# --- rank layouts and micro-batches ------------------------------------------------------


@pytest.mark.parametrize("dp_size", [1, 2, 4])
@pytest.mark.parametrize("grad_accum", [1, 2, 4])
@pytest.mark.parametrize("micro_batch_size", [1, 3])
def test_rank_batches_cover_the_global_batch_exactly(dp_size, grad_accum, micro_batch_size):
    global_batch = micro_batch_size * grad_accum * dp_size
    for step in (0, 1, 17):
        seen = [
            g
            for micro in range(grad_accum)
            for rank in range(dp_size)
            for g in rank_batch_indices(
                step * global_batch, micro, micro_batch_size, rank, dp_size, grad_accum
            )
        ]
        assert len(seen) == len(set(seen)) == global_batch
        assert sorted(seen) == list(range(step * global_batch, (step + 1) * global_batch))


def test_rank_batch_indices_rejects_bad_layouts():
    with pytest.raises(ValueError, match="dp_rank 2"):
        rank_batch_indices(0, 0, 1, 2, 2, 1)
    with pytest.raises(ValueError, match="grad_accum must be at least 1"):
        rank_batch_indices(0, 0, 1, 0, 1, 0)


def test_micro_batch_shifts_targets_by_one(tmp_path):
    samples = shuffled_of(tmp_path, documents(5, 30), seq_length=6, seed=0)
    inputs, targets = micro_batch(samples, rank_batch_indices(2 * 12, 1, 3, 1, 2, 2))
    assert inputs.shape == targets.shape == (3, 6)
    assert inputs.dtype == targets.dtype == np.int64
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    np.testing.assert_array_equal(np.c_[inputs, targets[:, -1:]][0], samples.sample(2 * 12 + 9))


# --- factories and errors ----------------------------------------------------------------


def two_dirs(tmp_path: Path, vocab_b: int = 1000) -> tuple[Path, Path]:
    a = write_dir(
        tmp_path / "a",
        [
            ("train_00000", "train", documents(1, 40, 1, 500)),
            ("valid_00000", "valid", documents(2, 10, 1, 500)),
        ],
    )
    b = write_dir(
        tmp_path / "b",
        [
            ("train_00000", "train", documents(3, 40, 500, 1000)),
            ("valid_00000", "valid", documents(4, 10, 500, 1000)),
        ],
        vocab=vocab_b,
    )
    return a, b


def test_build_train_and_validation_samples(tmp_path):
    a, b = two_dirs(tmp_path)
    train = build_train_samples([(str(a), 3.0), (str(b), 1.0)], seq_length=8, seed=9)
    np.testing.assert_array_equal(train.counts, [3072, 1024])
    for g in range(0, 300, 7):
        tokens = train.sample(g)
        real = tokens[tokens != EOS]
        assert len(tokens) == 9
        assert np.all(real < 500) if train.source_of(g) == 0 else np.all(real >= 500)
    # Each source's first epoch reads every one of its windows exactly once.
    first_epoch: list[list[tuple]] = [[], []]
    for g in range(4 * train.sources[1].epoch_size):
        source, local = train.locate(g)
        if local < train.sources[source].epoch_size:
            first_epoch[source].append(train.sources[source].locate(local))
    for source, reads in zip(train.sources, first_epoch, strict=True):
        assert sorted(reads) == [(0, 0, w) for w in range(source.epoch_size)]
    again = build_train_samples([(str(a), 3.0), (str(b), 1.0)], seq_length=8, seed=9)
    np.testing.assert_array_equal(again.sample(10**9), train.sample(10**9))

    validation = build_validation_samples([(a, 1.0)], seq_length=8, seed=9)
    packed = PackedSequences(load_split(a, "valid"), 8)
    for g in range(2 * len(packed)):
        np.testing.assert_array_equal(validation.sample(g), packed.sample(g % len(packed)))
    blended = build_validation_samples([(a, 1.0), (b, 1.0)], seq_length=8, seed=9)
    assert [blended.locate(g) for g in range(50)] == [
        build_validation_samples([(a, 1.0), (b, 1.0)], 8, 9).locate(g) for g in range(50)
    ]


def test_mismatched_tokenizers_are_refused(tmp_path):
    a, b = two_dirs(tmp_path, vocab_b=2000)
    with pytest.raises(DataDirError, match="vocab_size 2000 .* must share one tokenizer"):
        build_train_samples([(a, 1.0), (b, 1.0)], seq_length=8, seed=0)


def test_data_dir_errors_name_the_path(tmp_path):
    with pytest.raises(DataDirError, match=re.escape(f"{tmp_path / 'nope'} does not exist")):
        load_split(tmp_path / "nope", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataDirError, match="manifest.json not found"):
        load_split(tmp_path / "empty", "train")
    data = write_dir(tmp_path / "d", [("train_00000", "train", documents(0, 3))])
    with pytest.raises(DataDirError, match="lists no shards of split 'valid'"):
        load_split(data, "valid")
    (data / "train_00000.idx").unlink()
    with pytest.raises(DataDirError, match="lists shard train_00000 but .* missing"):
        load_split(data, "train")
    (data / "manifest.json").write_text("{not json")
    with pytest.raises(DataDirError, match="not valid JSON"):
        load_split(data, "train")
