"""The tokenizer: train a byte-level BPE with `tokenizers`, or load an existing tokenizer.json;
encode documents into token ids with an EOS after each, in bounded pieces.

Byte-level BPE (GPT-2's pre-tokenisation, no normaliser, no unknown token) encodes any text,
and decode(encode(text)) == text for every string. The saved tokenizer.json loads with
`transformers.PreTrainedTokenizerFast(tokenizer_file=...)`; `write_tokenizer_config` adds what
`AutoTokenizer` needs to name the EOS.

Long documents are encoded in pieces so that time and memory stay bounded, and the pieces encode
to exactly the tokens of the whole document (`DocumentEncoder`): a cut goes only where the
pre-tokeniser splits anyway (between two non-space characters of different kinds, letter,
number or other, or before a single space between words), and each cut is checked by encoding
the text around it whole and in two halves. A run with no such place (a long string without
spaces or changes of kind) stretches its piece until one comes, up to `STRETCH` times the piece
size; beyond that a cut is forced and counted (`forced_cuts`).
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from . import atomic
from .config import ResolvedTokenizer
from .errors import KilnError
from .format import token_dtype

PAD_TOKEN = "<|pad|>"


class TokenizerError(KilnError):
    """A tokenizer file that cannot be used, as one line."""


def train_tokenizer(texts: Iterable[str], cfg: ResolvedTokenizer) -> Tokenizer:
    """Train a byte-level BPE of `cfg.vocab_size` entries (special tokens included)."""
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


def write_tokenizer_config(folder: Path, tokenizer: Tokenizer, eos_token: str) -> None:
    """tokenizer_config.json and special_tokens_map.json beside tokenizer.json, so that
    `transformers.AutoTokenizer` (and Megatron-LM's HuggingFaceTokenizer, which reads its EOS
    as the end of a document) load the folder with the EOS, BOS and padding tokens named."""
    special = {"eos_token": eos_token, "bos_token": eos_token}
    if tokenizer.token_to_id(PAD_TOKEN) is not None:
        special["pad_token"] = PAD_TOKEN
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000_000,
    }
    atomic.write_json(folder / "special_tokens_map.json", special)
    atomic.write_json(folder / "tokenizer_config.json", config)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_pieces(text: str, max_chars: int) -> list[str]:
    """Cut `text` into pieces of at most `max_chars` characters whose concatenation is `text`,
    before a single space between words where possible, else after a newline, else anywhere:
    bounded memory for the tokenizer's trainer, which only counts words. (Encoding uses
    `DocumentEncoder`'s token-neutral cuts instead.)"""
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


_SPACE, _LETTER, _NUMBER, _OTHER = range(4)


def _kind(char: str) -> int:
    """A character's kind as GPT-2's pre-tokenising pattern groups them."""
    if char.isspace():
        return _SPACE
    category = unicodedata.category(char)[0]
    return _LETTER if category == "L" else _NUMBER if category == "N" else _OTHER


def _cut_places(text: str, high: int, low: int, step: int) -> Iterator[int]:
    """Positions c (from `high` towards `low`, by `step` = -1 or 1) where the pre-tokeniser
    starts a new piece whatever precedes: between two non-space characters of different kinds
    (not after an apostrophe, which may begin "'s"), or before a single space between two
    non-space characters (" word")."""
    for c in range(high, low, step):
        if c <= 0 or c >= len(text):
            continue
        before, after = _kind(text[c - 1]), _kind(text[c])
        kinds_change = _SPACE not in (before, after) and before != after
        single_space = (
            before != _SPACE
            and text[c] == " "
            and c + 1 < len(text)
            and _kind(text[c + 1]) != _SPACE
        )
        if (kinds_change and text[c - 1] != "'") or single_space:
            yield c


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
    """Encode documents to token ids, each followed by the EOS id, in bounded batches and in
    pieces that encode to exactly the whole document's tokens (see the module's docstring)."""

    CHECK_CHARS = 256  # context encoded on each side of a cut to check it
    CANDIDATES = 16  # cut places checked before looking further
    STRETCH = 64  # a piece grows to this many times max_piece_chars to reach a clean cut

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
        self.forced_cuts = 0  # cuts made where no checked place was found

    def pieces(self, text: str) -> list[str]:
        """`text` cut into pieces of about `max_piece_chars` at checked, token-neutral places."""
        limit = self.max_piece_chars
        pieces, start = [], 0
        while len(text) - start > limit:
            end = start + limit
            farthest = min(len(text), start + self.STRETCH * limit)
            cut = self._neutral_cut(text, end, start + limit // 2, -1)
            if cut is None:
                cut = self._neutral_cut(text, end, farthest, 1)
            if cut is None:
                cut = farthest
                self.forced_cuts += cut < len(text)
            if cut >= len(text):
                break
            pieces.append(text[start:cut])
            start = cut
        pieces.append(text[start:])
        return pieces

    def _neutral_cut(self, text: str, high: int, low: int, step: int) -> int | None:
        for checked, cut in enumerate(_cut_places(text, high, low, step)):
            if checked == self.CANDIDATES:
                return None
            if self._splits_cleanly(text, cut):
                return cut
        return None

    def _splits_cleanly(self, text: str, cut: int) -> bool:
        """Whether the text around `cut` encodes to the same ids whole and in two halves."""
        left = text[max(0, cut - self.CHECK_CHARS) : cut]
        right = text[cut : cut + self.CHECK_CHARS]
        whole, first, second = self.tokenizer.encode_batch_fast(
            [left + right, left, right], add_special_tokens=False
        )
        return whole.ids == first.ids + second.ids

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text, EOS appended, as arrays of the shard dtype."""
        pieces: list[str] = []
        owners: list[int] = []
        for index, text in enumerate(texts):
            parts = self.pieces(text)
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
