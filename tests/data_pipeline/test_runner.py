"""The data pipeline end to end on a real local Ray: what comes out of `prepare` is exactly the
kept documents, in Megatron's format, deterministic, with counts that reconcile."""

from __future__ import annotations

import gzip
import json
import logging
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_pipeline.config import STOP_WORDS
from data_pipeline.format import ShardReader
from data_pipeline.runner import PrepareError, prepare
from data_pipeline.text.quality import QualityFilter
from data_pipeline.tokenizer import file_sha256, load_tokenizer
from pretrain.config import validate_tree
from tests.support.corpus import distinct_documents, near_copy, write_jsonl

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


def config(inputs, **data):
    tree = {
        "data": {
            "inputs": inputs,
            "part_size_mb": 0.01,  # one part per file: duplicates are found across parts
            "shards": {"max_tokens": 20_000, "validation_fraction": 0.1},
            **data,
        },
        "tokenizer": {"vocab_size": 1024, "train_sample_mb": 1},
    }
    return validate_tree(tree)


def run(cfg, output: Path, **kwargs) -> dict:
    return prepare(
        cfg.data, cfg.tokenizer, output, cfg.model_dump(mode="json"), show_progress=False, **kwargs
    )


def shard_documents(output: Path, manifest: dict) -> dict[str, list[str]]:
    """Every document in the shards, decoded, by split (EOS checked and removed)."""
    tokenizer = load_tokenizer(output / "tokenizer.json", "<|endoftext|>")
    eos = manifest["tokenizer"]["eos_id"]
    out: dict[str, list[str]] = {"train": [], "valid": []}
    for shard in manifest["shards"]:
        reader = ShardReader(output / shard["name"])
        for i in range(len(reader)):
            ids = reader[i].tolist()
            assert ids[-1] == eos and eos not in ids[:-1]
            out[shard["split"]].append(tokenizer.decode(ids[:-1], skip_special_tokens=False))
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """200 distinct documents, plus 10 exact and 10 near copies of some of them in a later file."""
    root = tmp_path_factory.mktemp("planted")
    rng, words, texts = distinct_documents(seed=7, count=200)
    exact = [texts[i] for i in range(0, 100, 10)]
    near = [near_copy(rng, texts[i], words, 0.01) for i in range(5, 105, 10)]
    write_jsonl(root / "corpus" / "a.jsonl", texts[:120])
    write_jsonl(root / "corpus" / "b.jsonl.gz", texts[120:] + exact + near, compress=True)
    cfg = config([str(root / "corpus")])
    output = root / "out"
    return {"cfg": cfg, "texts": texts, "output": output, "manifest": run(cfg, output)}


def test_planted_duplicates_are_removed_and_everything_else_kept(planted):
    counts = planted["manifest"]["counts"]
    assert counts == {
        "in": 220,
        "kept": 200,
        "filtered": {},
        "exact_duplicates": 10,
        "near_duplicates": 10,
        "malformed": 0,
    }
    documents = shard_documents(planted["output"], planted["manifest"])
    written = documents["train"] + documents["valid"]
    assert sorted(written) == sorted(planted["texts"])  # each original exactly once


def test_shards_are_megatron_readable_and_match_the_manifest(planted):
    output, manifest = planted["output"], planted["manifest"]
    assert len(manifest["shards"]) > 2  # max_tokens is small: several shards per split
    assert {s["split"] for s in manifest["shards"]} == {"train", "valid"}
    for shard in manifest["shards"]:
        dataset = IndexedDataset(str(output / shard["name"]))
        assert len(dataset) == shard["documents"]
        assert int(dataset.sequence_lengths.sum()) == shard["tokens"]
        assert file_sha256(output / f"{shard['name']}.bin") == shard["bin_sha256"]
        assert file_sha256(output / f"{shard['name']}.idx") == shard["idx_sha256"]
    assert manifest["tokenizer"]["dtype"] == "uint16"


def test_validation_split_is_stable_when_the_corpus_grows(planted, tmp_path):
    grown = tmp_path / "grown"
    _, _, extra = distinct_documents(seed=99, count=40)
    write_jsonl(grown / "a.jsonl", planted["texts"][:120])
    write_jsonl(grown / "b.jsonl", planted["texts"][120:] + extra)
    cfg = config([str(grown)], dedup={"near": {"enabled": False}})
    manifest = run(cfg, tmp_path / "out")
    before = set(shard_documents(planted["output"], planted["manifest"])["valid"])
    after = set(shard_documents(tmp_path / "out", manifest)["valid"])
    assert before and before <= after  # every earlier validation document is still one


def without_run_details(manifest: dict) -> dict:
    """The manifest less what describes the run rather than the data."""
    return {**manifest, "timings_s": None, "execution": None}


def test_two_runs_write_identical_bytes_and_work_is_removed_unless_kept(planted, tmp_path):
    assert not (planted["output"] / ".work").exists()  # removed after a successful run
    manifest = run(planted["cfg"], tmp_path / "again", keep_work=True)
    assert (tmp_path / "again" / ".work" / "tokens").is_dir()
    assert same_outputs(tmp_path / "again", planted["output"])
    assert without_run_details(manifest) == without_run_details(planted["manifest"])


def same_outputs(a: Path, b: Path) -> bool:
    """The same shards, tokenizer files, quarantine and removed sample, byte for byte."""
    names = sorted(p.name for p in a.iterdir() if p.suffix in (".bin", ".idx"))
    assert names == sorted(p.name for p in b.iterdir() if p.suffix in (".bin", ".idx"))
    removed = sorted(f"removed/{p.name}" for p in (a / "removed").glob("*.jsonl"))
    assert removed == sorted(f"removed/{p.name}" for p in (b / "removed").glob("*.jsonl"))
    fixed = ["tokenizer.json", "tokenizer_config.json", "quarantine.jsonl"]
    return all(
        (a / name).read_bytes() == (b / name).read_bytes() for name in [*names, *fixed, *removed]
    )


def test_a_finished_output_is_not_redone_and_a_foreign_one_is_refused(planted, tmp_path):
    again = run(planted["cfg"], planted["output"])
    assert again == planted["manifest"]
    other = config(planted["cfg"].data.model_dump()["inputs"], shards={"max_tokens": 999})
    with pytest.raises(PrepareError, match="--overwrite"):
        run(other, planted["output"])
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(PrepareError, match="not a Kiln data directory"):
        run(other, stranger, overwrite=True)
    assert (stranger / "notes.txt").read_text() == "mine"


def test_weights_and_limits(tmp_path):
    _, _, texts = distinct_documents(seed=3, count=120)
    write_jsonl(tmp_path / "double.jsonl", texts[:40])
    write_jsonl(tmp_path / "half.jsonl", texts[40:100])
    write_jsonl(tmp_path / "limited.jsonl", texts[100:])
    cfg = config(
        [
            {"path": str(tmp_path / "double.jsonl"), "weight": 2.0},
            {"path": str(tmp_path / "half.jsonl"), "weight": 0.5},
            {"path": str(tmp_path / "limited.jsonl"), "limit": 7},
        ]
    )
    manifest = run(cfg, tmp_path / "out")
    counts = manifest["counts"]
    assert counts["in"] == 40 + 60 + 7
    dropped = counts["filtered"]["input_weight"]
    assert 15 < dropped < 45  # about half of the 60
    assert counts["kept"] == 40 + (60 - dropped) + 7
    written = shard_documents(tmp_path / "out", manifest)
    everything = written["train"] + written["valid"]
    assert all(everything.count(t) == 2 for t in texts[:40])
    assert sum(everything.count(t) for t in texts[40:100]) == 60 - dropped
    assert [t for t in texts[100:] if t in everything] == texts[100:107]
    weights_step = next(s for s in manifest["steps"] if s["step"] == "weights")
    assert weights_step == {"step": "weights", "removed": dropped, "extra_copies": 40}
    # A second copy goes in a second pass over the corpus order, never beside its original.
    for split, stream in written.items():
        doubled = [i for i, t in enumerate(stream) if t in texts[:40]]
        firsts = {}
        for i in doubled:
            firsts.setdefault(stream[i], i)
        seconds = [i for i in doubled if firsts[stream[i]] != i]
        assert len(seconds) == len(firsts), split
        assert min(seconds, default=len(stream)) > max(firsts.values(), default=-1), split
        assert all(a != b for a, b in zip(stream, stream[1:], strict=False))


def test_every_kind_of_bad_input_is_quarantined_and_counted(tmp_path):
    corpus = tmp_path / "bad"
    _, _, texts = distinct_documents(seed=5, count=12)
    good = [json.dumps({"text": t}) for t in texts[:6]]
    lines = [
        good[0],
        "{not json",  # malformed JSON
        "[1, 2, 3]",  # not an object
        json.dumps({"body": "no text field"}),
        json.dumps({"text": None}),
        json.dumps({"text": 42}),
        json.dumps({"text": "   "}),
        json.dumps({"text": "has a NUL \u0000 byte " + texts[6]}),
        good[1],
    ]
    corpus.mkdir()
    (corpus / "mixed.jsonl").write_bytes(
        ("\n".join(lines) + "\n").encode() + b'{"text": "bad utf-8 \xff\xfe"}\n' + good[2].encode()
    )
    (corpus / "empty.jsonl").write_bytes(b"")
    whole = gzip.compress(("\n".join(good[3:6]) + "\n").encode(), mtime=0)
    (corpus / "truncated.jsonl.gz").write_bytes(whole[: len(whole) * 2 // 3])
    (corpus / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    write_jsonl(corpus / "fine.jsonl", texts[7:12])
    manifest = run(config([str(corpus)], dedup={"near": {"enabled": False}}), tmp_path / "out")
    counts = manifest["counts"]
    lines = (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()
    quarantine = [json.loads(line) for line in lines]
    assert counts["malformed"] == len(quarantine)
    reasons = " | ".join(q["reason"] for q in quarantine).lower()
    for expected in ("json", "object", "missing", "null", "string", "empty", "nul", "utf-8"):
        assert expected in reasons, expected
    assert "truncated" in reasons or "gzip" in reasons
    assert {Path(q["source"]).name for q in quarantine} >= {
        "mixed.jsonl",
        "empty.jsonl",
        "truncated.jsonl.gz",
        "latin1.txt",
    }
    assert all(q["location"] for q in quarantine)
    mixed = [q for q in quarantine if q["source"].endswith("mixed.jsonl")]
    assert len(mixed) == 8  # every bad line of mixed.jsonl, each once
    kept_documents = shard_documents(tmp_path / "out", manifest)
    kept = kept_documents["train"] + kept_documents["valid"]
    assert texts[0] in kept and texts[1] in kept and texts[2] in kept  # around the bad lines
    assert set(texts[7:12]) <= set(kept)
    assert counts["in"] == counts["kept"] + counts["malformed"] + sum(counts["filtered"].values())


def test_near_duplicates_across_files_keep_the_earliest(tmp_path):
    rng, words, texts = distinct_documents(seed=11, count=30)
    original = texts[0]
    copies = [near_copy(rng, original, words, 0.01) for _ in range(4)]
    write_jsonl(tmp_path / "c" / "1.jsonl", texts[1:15] + [original])
    write_jsonl(tmp_path / "c" / "2.jsonl", [copies[0], *texts[15:], copies[1]])
    write_jsonl(tmp_path / "c" / "3.jsonl", copies[2:])
    manifest = run(config([str(tmp_path / "c")]), tmp_path / "out")
    assert manifest["counts"]["near_duplicates"] == 4
    written = shard_documents(tmp_path / "out", manifest)
    everything = written["train"] + written["valid"]
    assert original in everything and not set(copies) & set(everything)
    near = next(s for s in manifest["steps"] if s["step"] == "near_dedup")
    assert near["similar_pairs"] >= 4


def test_token_dtype_follows_the_vocabulary(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(70_000)}
    vocab["<|endoftext|>"] = 70_000
    big = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()
    big.save(str(tmp_path / "big.json"))
    _, _, texts = distinct_documents(seed=1, count=10)
    write_jsonl(tmp_path / "c.jsonl", texts)
    cfg = validate_tree(
        {
            "data": {"inputs": [str(tmp_path / "c.jsonl")]},
            "tokenizer": {"path": str(tmp_path / "big.json")},
        }
    )
    manifest = run(cfg, tmp_path / "out")
    assert manifest["tokenizer"]["dtype"] == "int32"
    assert manifest["tokenizer"]["source"].startswith("loaded from")
    shard = manifest["shards"][0]
    assert IndexedDataset(str(tmp_path / "out" / shard["name"]))[0].dtype == np.int32


def test_documents_longer_than_a_piece_round_trip(tmp_path):
    # Pieces of at most 700 characters, for training and encoding alike: long documents are cut
    # and their ids joined, and decoding gives back every document exactly.
    _, _, texts = distinct_documents(seed=13, count=12, min_words=1500, max_words=3000)
    write_jsonl(tmp_path / "long.jsonl", texts)
    cfg = config([str(tmp_path / "long.jsonl")], tokenize={"max_piece_chars": 700})
    manifest = run(cfg, tmp_path / "out")
    written = shard_documents(tmp_path / "out", manifest)
    assert sorted(written["train"] + written["valid"]) == sorted(texts)
    assert min(len(t) for t in texts) > 10 * 700


def test_tokenizer_sample_split_and_weights_are_independent_choices():
    from data_pipeline.selection import copies_of, hash_pairs, in_tokenizer_sample, split_of
    from data_pipeline.text.dedup import text_hash

    pairs = hash_pairs([text_hash(f"document {i}") for i in range(20_000)])
    valid = split_of(pairs[:, 0], 0.1)
    sampled = in_tokenizer_sample(pairs, 0.1)
    extra = copies_of(pairs[:, 0], 1.1) == 2
    for choice in (valid, sampled, extra):
        assert 0.08 < choice.mean() < 0.12
    # independent: about a tenth of each set falls in another, not all or none of it
    assert 0.07 < sampled[valid].mean() < 0.13
    assert 0.07 < extra[valid].mean() < 0.13
    assert 0.07 < extra[sampled].mean() < 0.13


def test_output_does_not_depend_on_part_size_or_on_splitting_large_files(tmp_path):
    """One run reads every file whole (one part); another cuts the large JSON Lines file, a
    file of blank lines and a Parquet file into spans of many parts. Shards, tokenizer,
    quarantine (with file-wide line numbers) and counts are the same."""
    rng, words, texts = distinct_documents(seed=17, count=160)
    corpus = tmp_path / "corpus"
    lines = [json.dumps({"text": t}) for t in texts[:100]]
    for position, bad in [(3, "{not json"), (40, json.dumps({"body": 1})), (77, "[1, 2]")]:
        lines.insert(position, bad)
    lines += [
        json.dumps({"text": texts[5]}),
        json.dumps({"text": near_copy(rng, texts[9], words, 0.01)}),
    ]
    corpus.mkdir()
    (corpus / "a_big.jsonl").write_text("\n".join(lines) + "\n")
    (corpus / "b_blank.jsonl").write_text("\n \n\t\n" * 20_000)  # an empty file, 100 kB
    strings = [t if i % 9 else None for i, t in enumerate(texts[100:150])]
    pq.write_table(pa.table({"text": strings}), corpus / "c_rows.parquet", row_group_size=7)
    write_jsonl(corpus / "d_small.jsonl", texts[150:] + [texts[120]])
    manifests = {}
    for name, part_size in (("whole", 50.0), ("spans", 0.02)):
        cfg = config([str(corpus)], part_size_mb=part_size)
        manifests[name] = run(cfg, tmp_path / name)
    assert same_outputs(tmp_path / "whole", tmp_path / "spans")
    whole, spans = manifests["whole"], manifests["spans"]
    for key in ("counts", "shards", "steps", "tokenizer", "inputs"):
        assert whole[key] == spans[key], key
    quarantine = [json.loads(x) for x in (tmp_path / "spans" / "quarantine.jsonl").open()]
    big = [(q["location"], q["reason"][:12]) for q in quarantine if "a_big" in q["source"]]
    assert [location for location, _ in big] == ["line 4", "line 41", "line 78"]
    blank = [q for q in quarantine if "b_blank" in q["source"]]
    assert [(q["location"], q["reason"]) for q in blank] == [("file", "empty file")]
    assert whole["counts"]["malformed"] == 3 + 1 + 6  # bad lines, the empty file, null rows
    assert whole["counts"]["exact_duplicates"] == 2 and whole["counts"]["near_duplicates"] == 1


def rewrapped(text: str, width: int, indent: str = "") -> str:
    """The same words, wrapped at another width and indented: only whitespace changes."""
    return "\n".join(indent + line for line in textwrap.wrap(text, width))


def test_near_dedup_sees_words_not_whitespace_or_case(tmp_path):
    """Re-wrapped, re-indented and re-cased copies share every normalised word 5-gram."""
    rng, words, texts = distinct_documents(seed=23, count=40)
    originals = texts[:6]
    copies = [
        rewrapped(originals[0], 40),
        rewrapped(originals[1], 72, indent="    "),
        " ".join(w.upper() if i % 3 else w for i, w in enumerate(originals[2].split(" "))),
        originals[3].replace(".", " .").replace("\n\n", "\n \n"),
        "\t" + originals[4].replace(" ", "  "),
        rewrapped(originals[5].lower(), 30, indent="\t"),
    ]
    write_jsonl(tmp_path / "c" / "1.jsonl", texts)
    write_jsonl(tmp_path / "c" / "2.jsonl", copies)
    manifest = run(config([str(tmp_path / "c")]), tmp_path / "out")
    assert manifest["counts"]["filtered"] == {}
    assert manifest["counts"]["exact_duplicates"] == 0
    assert manifest["counts"]["near_duplicates"] == len(copies)
    written = shard_documents(tmp_path / "out", manifest)
    assert sorted(written["train"] + written["valid"]) == sorted(texts)


def test_removed_samples_hold_what_each_rule_removed(tmp_path):
    rng, words, texts = distinct_documents(seed=29, count=60)
    short = [f"only a few words here, number {i}" for i in range(7)]  # min_words
    no_stop_words = [t.replace(" the ", " x ").replace(" of ", " y ") for t in texts[:5]]
    no_stop_words = [
        " ".join(w for w in t.split() if w.strip(".,").lower() not in STOP_WORDS)
        for t in no_stop_words
    ]
    repeated_lines = ["\n".join([t.split("\n")[0]] * 6) for t in texts[5:9]]
    corpus = (
        texts[9:]
        + short
        + no_stop_words
        + repeated_lines
        + texts[20:23]
        + [near_copy(rng, texts[30], words, 0.01)]
    )
    write_jsonl(tmp_path / "c.jsonl", corpus)
    cfg = config([str(tmp_path / "c.jsonl")], removed_sample=3, part_size_mb=0.02)
    manifest = run(cfg, tmp_path / "out")
    counts = manifest["counts"]
    folder = tmp_path / "out" / "removed"
    sample = {p.stem: [json.loads(x) for x in p.open()] for p in folder.glob("*.jsonl")}
    assert set(sample) == {*counts["filtered"], "exact_duplicates", "near_duplicates"}
    assert manifest["removed_sample"] == {
        f"removed/{kind}.jsonl": len(rows) for kind, rows in sorted(sample.items())
    }
    quality = QualityFilter(cfg.data.filters)
    removed = {**counts["filtered"], "exact_duplicates": counts["exact_duplicates"]}
    removed["near_duplicates"] = counts["near_duplicates"]
    assert removed["exact_duplicates"] == 3 and removed["near_duplicates"] == 1
    for rule, rows in sample.items():
        assert len(rows) == min(3, removed[rule]), rule
        for row in rows:
            assert row["source"].endswith("c.jsonl") and row["location"].startswith("line ")
            if rule in counts["filtered"]:
                assert quality.first_failure(row["text"]) == rule
    # a duplicate comes with the document it repeats, as kept in the shards
    for row in sample["exact_duplicates"]:
        assert row["text"] == row["repeats"]["text"]
        assert int(row["location"][5:]) > int(row["repeats"]["location"][5:])
    (near,) = sample["near_duplicates"]
    assert near["repeats"]["text"] == texts[30] and near["text"] != texts[30]
    # chosen by hash: another part size picks the same documents
    again = run(config([str(tmp_path / "c.jsonl")], removed_sample=3), tmp_path / "again")
    assert again["removed_sample"] == manifest["removed_sample"]
    for path in folder.glob("*.jsonl"):
        assert (tmp_path / "again" / "removed" / path.name).read_bytes() == path.read_bytes()


def test_the_prepared_folder_loads_in_auto_tokenizer(planted):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(planted["output"]))
    assert tokenizer.eos_token_id == planted["manifest"]["tokenizer"]["eos_id"]
