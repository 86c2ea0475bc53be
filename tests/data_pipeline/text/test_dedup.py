"""Deduplication primitives: exact text hashes, MinHash signatures, LSH candidates, clusters."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline.config import NearDedupConfig
from data_pipeline.text.dedup import (
    EMPTY,
    MinHasher,
    candidate_pairs,
    estimated_jaccard,
    near_duplicates,
    text_hash,
)
from tests.conftest import REPO

VOCAB = 32_000
# Looser than the defaults, for edits of 2-5% of tokens: a 3-gram Jaccard of ~0.7 is a
# candidate with probability 1 - (1 - 0.7^4)^32 > 0.9999 and verifies 5 sigma above 0.5.
LOOSE = NearDedupConfig(ngram=3, bands=32, rows=4, threshold=0.5, seed=7)


def random_docs(rng: np.random.Generator, count: int, low: int = 200, high: int = 1500):
    return [rng.integers(0, VOCAB, rng.integers(low, high)) for _ in range(count)]


def edit(rng: np.random.Generator, doc: np.ndarray, rate: float) -> np.ndarray:
    """A copy with round(rate * len) edits at distinct places: substitutions, insertions and
    deletions in equal parts."""
    places = rng.choice(len(doc), size=max(1, round(rate * len(doc))), replace=False)
    kinds = rng.integers(0, 3, places.size)
    out = list(doc)
    for place, kind in sorted(zip(places.tolist(), kinds.tolist(), strict=True), reverse=True):
        if kind == 0:
            out[place] = (out[place] + 1 + rng.integers(VOCAB - 1)) % VOCAB
        elif kind == 1:
            out.insert(place, rng.integers(VOCAB))
        else:
            del out[place]
    return np.array(out, dtype=np.int64)


def shingles(doc: np.ndarray, n: int) -> set[tuple[int, ...]]:
    doc = [int(t) for t in doc]
    if len(doc) < n:
        return {tuple(doc)} if doc else set()
    return {tuple(doc[i : i + n]) for i in range(len(doc) - n + 1)}


def jaccard(a: np.ndarray, b: np.ndarray, n: int) -> float:
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / len(sa | sb)


def dedup(cfg: NearDedupConfig, docs: list[np.ndarray], ids: np.ndarray | None = None):
    """The full chain in one partition: ids to drop, and the verified pairs."""
    hasher = MinHasher(cfg)
    sig = hasher.signatures(docs)
    ids = np.arange(len(docs)) if ids is None else ids
    keys = hasher.band_keys(sig)
    pairs = candidate_pairs(keys.ravel(), np.repeat(ids, cfg.bands))
    row = {int(i): r for r, i in enumerate(ids)}
    left = [row[i] for i in pairs[:, 0].tolist()]
    right = [row[i] for i in pairs[:, 1].tolist()]
    similar = estimated_jaccard(sig[left], sig[right]) >= cfg.threshold
    return near_duplicates(pairs, similar), pairs[similar]


def union_find_reference(pairs: np.ndarray) -> list[int]:
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in pairs.tolist():
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    return sorted(x for x in parent if find(x) != x)


# Exact


def test_text_hash_is_fixed_blake2b_128():
    assert text_hash("").hex() == "cae66941d9efbd404e4d88758ea67670"  # BLAKE2b-128 test vector
    assert text_hash("Kiln deduplicates text.\n").hex() == "9af65947a6982a4eb833f85986fe7223"


def test_text_hash_is_sensitive():
    texts = ["Kiln", "kiln", "Kiln ", "Kiln\n", "Kíln", "Ki\u0301ln", "Kiln\ud800"]
    digests = {text_hash(t) for t in texts}
    assert len(digests) == len(texts)
    assert all(len(d) == 16 for d in digests)


# Signatures


def test_signatures_shape_dtype_and_input_types():
    hasher = MinHasher(NearDedupConfig())
    doc = np.random.default_rng(0).integers(0, VOCAB, 300)
    variants = [doc.astype(np.uint16), doc.astype(np.int32), doc.astype(np.int64), doc.tolist()]
    sig = hasher.signatures(variants)
    assert sig.shape == (4, 112) and sig.dtype == np.uint32
    assert (sig == sig[0]).all()
    assert hasher.signatures([]).shape == (0, 112)


def test_signatures_pinned():
    """Stored signatures and band keys stay valid: the algorithm and its constants are fixed."""
    hasher = MinHasher(NearDedupConfig())
    sig = hasher.signatures([np.arange(100), np.array([3, 1, 4])])
    assert sig[:, :3].tolist() == [
        [139751096, 45536834, 15586763],
        [1712668138, 4103770839, 3069275236],
    ]
    assert hasher.band_keys(sig)[:, 0].tolist() == [8940707164151088690, 12635350894404365839]


def fingerprint() -> list[str]:
    """Digests of seeded signatures, band keys and a text hash (run in subprocesses too)."""
    rng = np.random.default_rng(5)
    docs = [rng.integers(0, VOCAB, rng.integers(0, 900)).astype(np.uint16) for _ in range(200)]
    hasher = MinHasher(NearDedupConfig(seed=3))
    sig = hasher.signatures(docs)
    digest = hashlib.sha256(sig.tobytes() + hasher.band_keys(sig).tobytes()).hexdigest()
    return [digest, text_hash("déjà vu").hex()]


def test_signatures_identical_across_processes():
    script = "from tests.data_pipeline.text.test_dedup import fingerprint; print(*fingerprint())"
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run(
            [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout.split())
    assert outputs[0] == outputs[1] == fingerprint()


def test_signature_is_min_over_its_shingles():
    """A document's signature is the entry-wise minimum of its n-grams' signatures."""
    hasher = MinHasher(NearDedupConfig())
    doc = np.random.default_rng(1).integers(0, 50, 200)  # many repeated n-grams
    grams = [doc[i : i + 5] for i in range(len(doc) - 4)]
    sig = hasher.signatures([doc, *grams])
    assert (sig[0] == sig[1:].min(axis=0)).all()


def test_signatures_ignore_shingle_order_and_repeats():
    hasher = MinHasher(NearDedupConfig())
    cycle = np.random.default_rng(2).integers(0, VOCAB, 40)
    # Rotations and repetitions of a cycle of >= n tokens have the same n-grams.
    docs = [np.tile(cycle, 3), np.tile(np.roll(cycle, 17), 5)[:-13], np.tile(cycle, 2)[7:]]
    other = np.tile(np.roll(cycle[::-1], 3), 3)
    sig = hasher.signatures([*docs, other])
    assert (sig[:3] == sig[0]).all()
    assert (sig[3] != sig[0]).any()
    # Unigrams: any permutation and repetition of the tokens.
    unigram = MinHasher(NearDedupConfig(ngram=1))
    tokens = np.arange(1000, 1300)
    shuffled = np.random.default_rng(3).permutation(np.r_[tokens, tokens[::7]])
    sig = unigram.signatures([tokens, shuffled, tokens[1:]])
    assert (sig[0] == sig[1]).all() and (sig[0] != sig[2]).any()


def test_signatures_do_not_depend_on_batch():
    hasher = MinHasher(NearDedupConfig(), chunk_bytes=4096)  # documents span chunks
    docs = random_docs(np.random.default_rng(4), 30, 0, 3000)
    whole = hasher.signatures(docs)
    alone = np.concatenate([hasher.signatures([d]) for d in docs])
    assert (whole == alone).all()
    assert (whole == MinHasher(NearDedupConfig()).signatures(docs[::-1])[::-1]).all()


def test_seed_changes_signatures():
    doc = [np.arange(500)]
    a = MinHasher(NearDedupConfig(seed=1)).signatures(doc)
    b = MinHasher(NearDedupConfig(seed=2)).signatures(doc)
    assert (a != b).mean() > 0.95


@pytest.mark.parametrize("target", [0.9, 0.5, 0.1])
def test_estimated_jaccard_is_accurate(target):
    """Pairs sharing a prefix with a known true 5-gram Jaccard: each estimate within 5 standard
    errors, their mean within 4 standard errors of the mean."""
    cfg = NearDedupConfig()
    rng = np.random.default_rng(int(target * 10))
    docs, truth = [], []
    for _ in range(60):
        length = 800
        union = round(2 * (length - 4) / (1 + target))  # |A| + |B| - |A & B| shingles
        shared = 2 * (length - 4) - union + 4  # tokens of the common prefix
        a = rng.integers(0, VOCAB, length)
        b = np.r_[a[:shared], rng.integers(0, VOCAB, length - shared)]
        docs += [a, b]
        truth.append(jaccard(a, b, cfg.ngram))
    sig = MinHasher(cfg).signatures(docs)
    estimate = estimated_jaccard(sig[0::2], sig[1::2])
    truth = np.array(truth)
    assert np.abs(truth - target).max() < 0.01
    error = np.sqrt(truth * (1 - truth) / 112)
    assert (np.abs(estimate - truth) <= 5 * error + 1 / 112).all()
    assert abs((estimate - truth).mean()) <= 4 * error.mean() / np.sqrt(len(truth))


def test_empty_and_short_documents():
    cfg = NearDedupConfig()
    hasher = MinHasher(cfg)
    docs = [[], [5], [5], [0, 5], [5, 6], [6, 5], [1, 2, 3, 4], [1, 2, 3, 4, 5], [], [7], [9, 7]]
    docs = [np.array(d, dtype=np.int64) for d in docs]
    sig = hasher.signatures(docs)
    assert (sig[0] == EMPTY).all() and (sig[8] == EMPTY).all()
    assert (sig[[1, 2, 3, 4, 5, 6, 7, 9, 10]] != EMPTY).all()
    assert (sig[1] == sig[2]).all()  # the same one-token document
    assert estimated_jaccard(sig[0], sig[8]) == 0  # empty never matches, itself included
    assert estimated_jaccard(sig[0], sig[1]) == 0
    est = estimated_jaccard(sig[[1, 1, 4, 6, 9]], sig[[3, 9, 5, 7, 10]])
    assert (est < 0.1).all()
    dropped, _ = dedup(cfg, docs)
    assert dropped.tolist() == [2]


# Band keys and candidates


def test_band_keys_mix_in_the_band():
    hasher = MinHasher(NearDedupConfig(bands=4, rows=3))
    sig = np.zeros((2, 12), dtype=np.uint32)
    sig[1, 3:] = 1  # second document agrees with the first on band 0 only
    keys = hasher.band_keys(sig)
    assert keys.shape == (2, 4) and keys.dtype == np.uint64
    assert len(set(keys[0].tolist())) == 4  # equal rows, different bands, different keys
    assert keys[0, 0] == keys[1, 0] and (keys[0, 1:] != keys[1, 1:]).all()
    with pytest.raises(ValueError):
        hasher.band_keys(np.zeros((2, 11), dtype=np.uint32))


def test_candidate_pairs_hand_made():
    keys = np.array([5, 5, 5, 7, 7, 9, 5, 7, 2**64 - 1, 2**64 - 1], dtype=np.uint64)
    ids = np.array([3, 1, 2, 8, 4, 6, 1, 4, -2, 40], dtype=np.int64)
    pairs = candidate_pairs(keys, ids)
    assert pairs.dtype == np.int64
    assert pairs.tolist() == [[-2, 40], [1, 2], [1, 3], [4, 8]]
    # One pair from several groups, given either way round, appears once.
    assert candidate_pairs(np.array([1, 1, 2, 2], np.uint64), [10, 20, 20, 10]).tolist() == [
        [10, 20]
    ]
    # A group of g documents is a star: g - 1 pairs.
    star = candidate_pairs(np.full(6, 3, np.uint64), [9, 4, 7, 5, 6, 8])
    assert star.tolist() == [[4, 5], [4, 6], [4, 7], [4, 8], [4, 9]]
    # Ids spanning 2^32 or more.
    far = [2**62, -(2**62), 2**40, 7, 2**40, 2**63 - 1, -(2**63)]
    assert candidate_pairs(np.array([4, 4, 4, 4, 8, 8, 8], np.uint64), far).tolist() == [
        [-(2**63), 2**40],
        [-(2**63), 2**63 - 1],
        [-(2**62), 7],
        [-(2**62), 2**40],
        [-(2**62), 2**62],
    ]
    assert candidate_pairs(np.array([1, 2, 3], np.uint64), [1, 1, 1]).shape == (0, 2)
    assert candidate_pairs(np.empty(0, np.uint64), np.empty(0, np.int64)).shape == (0, 2)
    with pytest.raises(ValueError):
        candidate_pairs(np.zeros(3, np.uint64), np.zeros(2, np.int64))


def test_near_duplicates_hand_made():
    pairs = np.array([[1, 2], [2, 3], [10, 11], [20, 21], [9, 5], [7, 9], [30, 31]])
    similar = np.array([True, True, True, False, True, True, True])
    assert near_duplicates(pairs, similar).tolist() == [2, 3, 7, 9, 11, 31]
    assert near_duplicates(pairs, np.zeros(7, bool)).dtype == np.int64
    assert near_duplicates(np.empty((0, 2), np.int64), np.empty(0, bool)).size == 0


@pytest.mark.parametrize("shape", ["random", "path_descending", "path_shuffled"])
def test_near_duplicates_matches_union_find(shape):
    rng = np.random.default_rng(8)
    if shape == "random":
        pairs = rng.integers(-(10**12), 10**12, (20_000, 2)) // 10**8  # ~20k ids, components
    else:
        order = np.arange(5000, 0, -1) if shape == "path_descending" else rng.permutation(5000)
        pairs = np.stack([order[:-1], order[1:]], axis=1)
    similar = rng.random(len(pairs)) < 0.7
    assert near_duplicates(pairs, similar).tolist() == union_find_reference(pairs[similar])


# The full chain


def plant(rng: np.random.Generator, docs: list[np.ndarray], clusters: list[tuple[int, float]]):
    """Appends, for each (copies, rate), edited copies of a different one of the distinct
    documents; returns each cluster's positions, the original first."""
    originals = rng.choice(len(docs), size=len(clusters), replace=False)
    positions = []
    for original, (count, rate) in zip(originals.tolist(), clusters, strict=True):
        positions.append([original] + [len(docs) + j for j in range(count)])
        docs += [edit(rng, docs[original], rate) for _ in range(count)]
    return positions


def shuffle(rng: np.random.Generator, docs: list[np.ndarray], clusters: list[list[int]]):
    """Documents in a random order (so a copy may come before its original), and the ids to
    drop: each cluster's positions but the smallest."""
    order = rng.permutation(len(docs))
    position = np.argsort(order)
    drop = sorted(i for c in clusters for i in sorted(position[c].tolist())[1:])
    return [docs[i] for i in order], drop


def test_planted_near_duplicates_default_config():
    """Copies with 0.5% of tokens edited (5-gram Jaccard ~0.95) among 305 distinct documents:
    every copy but each cluster's earliest is dropped, and nothing else."""
    cfg = NearDedupConfig()
    rng = np.random.default_rng(10)
    docs = random_docs(rng, 300, 400, 1500)
    docs += [np.tile(rng.integers(0, 40, 25), 30) for _ in range(5)]  # repetitive, distinct
    clusters = plant(rng, docs, [(1, 0.005)] * 12 + [(2, 0.005)] * 4 + [(4, 0.005)] * 2)
    for c in clusters:
        assert all(jaccard(docs[c[0]], docs[i], cfg.ngram) > 0.88 for i in c[1:])
    docs, drop = shuffle(rng, docs, clusters)
    dropped, _ = dedup(cfg, docs)
    assert dropped.tolist() == drop


def heavier_edits() -> tuple[list[np.ndarray], list[int]]:
    """300 distinct documents; 20 pairs with 2-5% of tokens edited; 9 clusters of 3-5 with 2%."""
    rng = np.random.default_rng(11)
    docs = random_docs(rng, 300)
    pairs = [(1, float(rate)) for rate in np.linspace(0.02, 0.05, 20)]
    clusters = plant(rng, docs, pairs + [(2, 0.02)] * 4 + [(3, 0.02)] * 3 + [(4, 0.02)] * 2)
    for c in clusters:
        assert min(jaccard(docs[c[0]], docs[i], LOOSE.ngram) for i in c[1:]) > 0.65
    return shuffle(rng, docs, clusters)


def test_planted_near_duplicates_heavier_edits():
    """With ids that are not 0..n-1."""
    docs, drop = heavier_edits()
    ids = np.arange(len(docs)) * 1000 + 10**10
    dropped, _ = dedup(LOOSE, docs, ids)
    assert dropped.tolist() == ids[drop].tolist()


@pytest.mark.parametrize("partitions", [2, 3, 16])
def test_partitions_give_the_same_result(partitions):
    docs, drop = heavier_edits()
    hasher = MinHasher(LOOSE)
    sig = hasher.signatures(docs)
    keys = hasher.band_keys(sig).ravel()
    ids = np.repeat(np.arange(len(docs)), LOOSE.bands)
    whole = candidate_pairs(keys, ids)
    part = keys % np.uint64(partitions)
    split = np.concatenate(
        [candidate_pairs(keys[part == p], ids[part == p]) for p in range(partitions)]
    )
    assert np.unique(split, axis=0).tolist() == whole.tolist()
    for pairs in (whole, split):
        similar = estimated_jaccard(sig[pairs[:, 0]], sig[pairs[:, 1]]) >= LOOSE.threshold
        assert near_duplicates(pairs, similar).tolist() == drop


def test_chains_merge():
    """A ~ B and B ~ C but not A ~ C (shifted windows of one text): B and C are dropped."""
    cfg = NearDedupConfig(ngram=3, bands=128, rows=2, threshold=0.35, seed=3)
    text = np.random.default_rng(12).integers(0, VOCAB, 1000)
    docs = [text[0:600], text[200:800], text[400:1000], text[100:700][::-1]]
    assert jaccard(docs[0], docs[1], 3) == pytest.approx(0.5, abs=0.01)
    assert jaccard(docs[0], docs[2], 3) == pytest.approx(0.2, abs=0.01)
    dropped, verified = dedup(cfg, docs)
    assert dropped.tolist() == [1, 2]
    assert [0, 2] not in verified.tolist()
