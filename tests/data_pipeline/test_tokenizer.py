"""The tokenizer: training determinism, lossless round trip, loading in transformers and in
Megatron's HuggingFaceTokenizer with the right EOS, and bounded, token-neutral encoding of very
long documents."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from data_pipeline.config import TokenizerConfig
from data_pipeline.readers import stdlib_corpus_files
from data_pipeline.tokenizer import (
    DocumentEncoder,
    TokenizerError,
    load_tokenizer,
    save_tokenizer,
    split_pieces,
    train_tokenizer,
    write_tokenizer_config,
)

CONFIG = TokenizerConfig(vocab_size=2048, train_sample_mb=1)

TRICKY = [
    "def f(x):\n    return x  # comment\n",
    "Ünïcödé ✓ — “quotes” ‘and’ … emoji 🎉 and CJK 漢字 and Thai ภาษาไทย",
    "  leading and trailing spaces  ",
    "tabs\tand\n\nblank lines\n",
    "<|endoftext|> written literally in a document",
    "a" * 5000,
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    texts = []
    for path in stdlib_corpus_files()[:150]:
        try:
            texts.append(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    return texts


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    tokenizer = train_tokenizer(corpus, CONFIG)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(tokenizer, path)
    return path


def test_vocabulary_size_and_specials(trained):
    tokenizer = load_tokenizer(trained, "<|endoftext|>")
    assert tokenizer.get_vocab_size() == 2048
    assert tokenizer.token_to_id("<|endoftext|>") == 0
    assert tokenizer.token_to_id("<|pad|>") == 1


def test_training_is_deterministic(corpus, trained, tmp_path):
    again = tmp_path / "again.json"
    save_tokenizer(train_tokenizer(corpus, CONFIG), again)
    assert again.read_bytes() == trained.read_bytes()


def test_round_trip_is_lossless(corpus, trained):
    tokenizer = load_tokenizer(trained, "<|endoftext|>")
    encoder = DocumentEncoder(tokenizer, "<|endoftext|>", max_piece_chars=1000)
    texts = corpus[:40] + TRICKY
    for text, ids in zip(texts, encoder.encode(texts), strict=True):
        assert ids[-1] == 0  # EOS after every document
        assert tokenizer.decode(ids[:-1].tolist(), skip_special_tokens=False) == text


def test_special_token_text_in_a_document_is_not_a_special_token(trained):
    tokenizer = load_tokenizer(trained, "<|endoftext|>")
    encoder = DocumentEncoder(tokenizer, "<|endoftext|>", max_piece_chars=1000)
    (ids,) = encoder.encode(["x <|endoftext|> y"])
    assert list(ids).count(0) == 1  # only the appended EOS


def test_transformers_loads_it(trained, corpus):
    hf = PreTrainedTokenizerFast(tokenizer_file=str(trained))
    tokenizer = load_tokenizer(trained, "<|endoftext|>")
    text = corpus[3]
    assert hf.encode(text) == tokenizer.encode(text).ids
    assert hf.decode(hf.encode(text)) == text


def test_pieces_are_bounded_and_concatenate_to_the_text(corpus):
    text = "\n".join(corpus[:20])
    pieces = split_pieces(text, 997)
    assert "".join(pieces) == text
    assert all(0 < len(p) <= 997 for p in pieces)
    assert split_pieces("short", 10) == ["short"]
    assert split_pieces("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]  # no space: hard cuts


def long_documents(corpus: list[str]) -> dict[str, str]:
    rng = random.Random(4)
    lines = ["x", "pass", "y=1", "return", "foo(bar)", "}", "\tindent", "# note"]
    code = "".join(
        "\n" + " " * rng.randint(0, 12) + rng.choice(lines) for _ in range(6000)
    )  # indented lines, most without a space between words: cut after newlines is not neutral
    words = ["the", "cat", "sat,", "on", "mat.", "Hello", "world!", "it's", "don't", "(a)"]
    return {
        "python sources": "\n\n".join(corpus[:12]),
        "indented code": code,
        "prose": " ".join(rng.choice(words) for _ in range(8000)),
        "runs without spaces": "a" * 5000 + "1" * 3000 + "b" * 2500 + "x y " * 500 + "z" * 9000,
        "cjk": "".join(
            rng.choice("日本語の文章です。漢字とかなが混ざる、句読点もある") for _ in range(9000)
        ),
        "mixed": "".join(
            rng.choice(["ab12", "xyz", "99", "--", "..", "ñé", "\t\n", "   ", "'s", "'"])
            for _ in range(9000)
        ),
    }


@pytest.mark.parametrize(
    "kind", ["python sources", "indented code", "prose", "runs without spaces", "cjk", "mixed"]
)
def test_long_documents_encode_to_the_tokens_of_the_whole(trained, corpus, kind):
    tokenizer = load_tokenizer(trained, "<|endoftext|>")
    text = long_documents(corpus)[kind]
    encoder = DocumentEncoder(tokenizer, "<|endoftext|>", max_piece_chars=300)
    pieces = encoder.pieces(text)
    assert "".join(pieces) == text and len(pieces) > 10
    whole = tokenizer.encode(text, add_special_tokens=False).ids
    assert encoder.encode([text])[0][:-1].tolist() == whole
    assert encoder.forced_cuts == 0


def test_a_run_longer_than_the_stretch_is_cut_and_counted(trained):
    tokenizer = load_tokenizer(trained, "<|endoftext|>")
    encoder = DocumentEncoder(tokenizer, "<|endoftext|>", max_piece_chars=100)
    text = "a" * (DocumentEncoder.STRETCH * 100 * 2 + 50)
    assert [len(p) for p in encoder.pieces(text)] == [6400, 6400, 50]
    assert encoder.forced_cuts == 2
    assert tokenizer.decode(encoder.encode([text])[0][:-1].tolist()) == text


def test_tokenizer_config_names_the_eos_for_transformers_and_megatron(trained, tmp_path):
    from megatron.core.tokenizers.text.libraries.huggingface_tokenizer import (
        HuggingFaceTokenizer,
    )
    from transformers import AutoTokenizer

    folder = tmp_path / "prepared"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(trained.read_bytes())
    write_tokenizer_config(folder, load_tokenizer(trained, "<|endoftext|>"), "<|endoftext|>")
    auto = AutoTokenizer.from_pretrained(str(folder))
    assert auto.eos_token == "<|endoftext|>" and auto.eos_token_id == 0
    assert auto.pad_token_id == 1
    megatron = HuggingFaceTokenizer(str(folder), use_fast=True)
    assert megatron.eod == 0
    assert (
        megatron.text_to_ids("def f(x):")
        == load_tokenizer(trained, "<|endoftext|>").encode("def f(x):").ids
    )


def test_a_very_long_document_is_encoded_in_bounded_pieces(trained):
    tokenizer = load_tokenizer(trained, "<|endoftext|>")
    text = ("lorem ipsum dolor sit amet " * 400_000)[:10_000_000]  # 10 MB, one document
    (ids,) = DocumentEncoder(tokenizer, "<|endoftext|>", max_piece_chars=100_000).encode([text])
    assert ids.dtype == np.uint16
    assert tokenizer.decode(ids[:-1].tolist()) == text


def test_unusable_tokenizer_files_are_one_line_errors(tmp_path, trained):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a loadable tokenizer.json"):
        load_tokenizer(broken, "<|endoftext|>")
    with pytest.raises(TokenizerError, match="no EOS token '<eos>'"):
        load_tokenizer(trained, "<eos>")
