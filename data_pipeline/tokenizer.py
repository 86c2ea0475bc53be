"""The tokenizer: train a byte-level BPE with `tokenizers`, or load an existing tokenizer.json;
encode documents into token ids with an EOS after each, in bounded pieces.

Byte-level BPE (GPT-2's pre-tokenisation, no normaliser, no unknown token) encodes any text,
and decode(encode(text)) == text for every string. The saved tokenizer.json loads with
`transformers.PreTrainedTokenizerFast(tokenizer_file=...)`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .config import TokenizerConfig
from .format import token_dtype


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used, as one line."""


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train a byte-level BPE of `cfg.vocab_size` entries (special tokens included)."""
    assert cfg.vocab_size is not None, "tokenizer.vocab_size is resolved by validation"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(cfg.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path, eos_token: str) -> Tokenizer:
    """Load a tokenizer.json; its vocabulary must hold `eos_token`."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for unreadable files
        raise TokenizerError(f"{path}: not a loadable tokenizer.json ({error})") from None
    if tokenizer.token_to_id(eos_token) is None:
        raise TokenizerError(f"{path}: the vocabulary has no EOS token {eos_token!r}")
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> str:
    """Write tokenizer.json atomically; return its sha256."""
    tmp = path.with_name(path.name + ".tmp")
    tokenizer.save(str(tmp))
    digest = file_sha256(tmp)
    os.replace(tmp, path)
    return digest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_pieces(text: str, max_chars: int) -> list[str]:
    """Cut `text` into pieces of at most `max_chars` characters whose concatenation is `text`.

    A cut goes before a single space that sits between two non-space characters, where byte-level
    BPE's pre-tokenisation already splits (" word" is its own pre-token), so the pieces encode to
    the same ids as the whole would; failing that, after a newline; failing that, anywhere.
    """
    if len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = _space_cut(text, start, end)
        if cut is None:
            newline = text.rfind("\n", start + 1, end)
            cut = newline + 1 if newline > start else end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _space_cut(text: str, start: int, end: int) -> int | None:
    position = end
    while True:
        position = text.rfind(" ", start + 1, position)
        if position <= start:
            return None
        if not text[position - 1].isspace() and not text[position + 1 : position + 2].isspace():
            return position


ENCODE_BATCH_PIECES = 32


def _bounded_runs(pieces: list[str], max_chars: int) -> Iterator[tuple[int, int]]:
    """Consecutive [start, stop) runs of pieces holding at most `max_chars` characters
    (a run holds at least one piece)."""
    start, chars = 0, 0
    for index, piece in enumerate(pieces):
        if index > start and chars + len(piece) > max_chars:
            yield start, index
            start, chars = index, 0
        chars += len(piece)
    if start < len(pieces):
        yield start, len(pieces)


class DocumentEncoder:
    """Encode documents to token ids, each followed by the EOS id, in bounded batches/pieces."""

    def __init__(self, tokenizer: Tokenizer, eos_token: str, max_piece_chars: int) -> None:
        eos = tokenizer.token_to_id(eos_token)
        if eos is None:
            raise TokenizerError(f"the tokenizer has no EOS token {eos_token!r}")
        # A document that contains the text "<|endoftext|>" must not get an EOS id in the middle:
        # special tokens are matched only where the encoder puts them.
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.eos_id = eos
        self.max_piece_chars = max_piece_chars
        self.dtype = token_dtype(tokenizer.get_vocab_size())

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text, EOS appended, as arrays of the shard dtype."""
        pieces: list[str] = []
        owners: list[int] = []
        for index, text in enumerate(texts):
            parts = split_pieces(text, self.max_piece_chars)
            pieces.extend(parts)
            owners.extend([index] * len(parts))
        per_doc: list[list[np.ndarray]] = [[] for _ in texts]
        for start, stop in _bounded_runs(pieces, self.max_piece_chars * ENCODE_BATCH_PIECES):
            # Encoding objects hold strings and masks besides the ids: keep few alive at once.
            encodings = self.tokenizer.encode_batch_fast(
                pieces[start:stop], add_special_tokens=False
            )
            for owner, encoding in zip(owners[start:stop], encodings, strict=True):
                per_doc[owner].append(np.asarray(encoding.ids, dtype=self.dtype))
        eos = np.asarray([self.eos_id], dtype=self.dtype)
        return [np.concatenate([*parts, eos]) for parts in per_doc]

    def encode_stream(self, texts: Iterable[str], batch_documents: int) -> Iterator[np.ndarray]:
        batch: list[str] = []
        for text in texts:
            batch.append(text)
            if len(batch) == batch_documents:
                yield from self.encode(batch)
                batch = []
        if batch:
            yield from self.encode(batch)
