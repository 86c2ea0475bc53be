"""`kiln eval RUN_DIR_OR_CHECKPOINT [--data SHARDS]`: validation loss and perplexity.

The checkpoint's model runs in one process (on a GPU when there is one) over the validation
split of the run's data, or of another prepared directory with the same tokenizer. By default
it reads what the training loop's evaluation reads, the first `eval.batches` global batches of
`train.seq_length` tokens, so the two report the same loss; `--batches N` reads more or fewer
and `--all` every validation sequence once. A decoder's loss is the mean next-token cross
entropy over those tokens; perplexity is its exponential.

An encoder (`model.arch: bert`) reads the same sequences masked as the training loop masks
its validation batches (`Masker`, split "valid", the run's seed and masking section), and
reports the masked-token loss over the chosen positions, averaged over micro-batches of
`train.micro_batch_size` sequences as the training loop averages it (so that it equals the
logged `val_loss`; `--micro-batch-size` changes only how many sequences run at once), and the
masked-token accuracy: the share of all chosen positions whose most likely token of the real
vocabulary is the original one.

An encoder-decoder (`model.arch: t5`) reads the same samples corrupted as the training loop
corrupts its validation batches (`SpanCorruptor`, split "valid") and reports the
span-corruption loss: the mean cross entropy of the decoder's targets (sentinels, the spans'
tokens, EOS), every sample holding `spans.decoder_length` of them.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from pretrain.data import (
    DataDirError,
    build_validation_samples,
    configured_sources,
    micro_batch,
    read_manifest,
)
from pretrain.data.masking import IGNORED, Masker, masked_micro_batch
from pretrain.data.spans import SpanCorruptor, sample_length, span_micro_batch
from pretrain.inference import load_model
from pretrain.train.checkpoint import TrainerState

ENCODER_ONLY = ("accuracy", "masked_tokens")


@dataclass
class Evaluation:
    checkpoint: str
    step: int
    data: list[str]
    sequences: int
    tokens: int
    loss: float
    perplexity: float
    accuracy: float | None = None  # an encoder's masked-token accuracy
    masked_tokens: int | None = None  # an encoder's chosen positions, which both are over

    def as_dict(self) -> dict:
        """Every field; an encoder's fields only for an encoder (a decoder's are unchanged)."""
        out = asdict(self)
        if self.accuracy is None:
            for name in ENCODER_ONLY:
                del out[name]
        return out


def check_tokenizer(data_dir: Path, tokenizer: Tokenizer) -> None:
    """Evaluating on data tokenised by another tokenizer would give meaningless numbers."""
    manifest = read_manifest(data_dir)
    theirs = Tokenizer.from_file(str(Path(data_dir) / manifest["tokenizer"]["file"]))
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise DataDirError(
            f"{data_dir}: its tokenizer is not the checkpoint's; prepare the data with "
            "tokenizer.path set to the run's tokenizer.json"
        )


def evaluate(
    path: Path,
    data: Path | None = None,
    batches: int | None = None,
    every_sequence: bool = False,
    micro_batch_size: int | None = None,
    progress: bool | None = None,
) -> Evaluation:
    """The checkpoint's validation loss (an encoder's: masked-token loss and accuracy);
    `every_sequence` reads each directory's whole validation split once (a decoder's loss is
    then the mean over all their tokens)."""
    loaded = load_model(Path(path))
    cfg = loaded.cfg
    seq_length = cfg.train.seq_length
    sources = [(str(data), 1.0)] if data is not None else configured_sources(cfg.data)
    for directory, _ in sources:
        check_tokenizer(Path(directory), loaded.tokenizer)
    if cfg.model.arch == "bert":
        return evaluate_encoder(
            loaded, sources, batches, every_sequence, micro_batch_size, progress
        )
    read = micro_batch
    target_tokens = seq_length
    if cfg.model.encoder_decoder:
        corruptor = SpanCorruptor.for_tokenizer(
            Path(sources[0][0]) / "tokenizer.json",
            cfg.spans,
            cfg.tokenizer.eos_token,
            cfg.train.seed,
        )
        target_tokens = corruptor.decoder_length

        def read(samples, indices):
            return span_micro_batch(samples, indices, corruptor, "valid")

    runner = LossRunner(loaded.model, cfg, micro_batch_size, progress, read)
    parts = [
        runner.mean_loss(samples, n)
        for samples, n in validation_reads(cfg, sources, batches, every_sequence)
    ]
    count = sum(n for _, n in parts)
    mean = sum(loss * n for loss, n in parts) / count
    return Evaluation(
        checkpoint=str(loaded.checkpoint),
        step=TrainerState.read(loaded.checkpoint).step,
        data=[str(p) for p, _ in sources],
        sequences=count,
        tokens=count * target_tokens,
        loss=mean,
        perplexity=math.exp(min(mean, 50.0)),
    )


def validation_reads(cfg, sources, batches: int | None, every_sequence: bool) -> list:
    """(samples, how many to read) of the validation split: each directory's every sequence
    once, or the first `batches` (default `eval.batches`) global batches, as training reads."""
    seq_length, seed = sample_length(cfg), cfg.train.seed
    if every_sequence:
        out = []
        for directory, _ in sources:
            samples = build_validation_samples([(directory, 1.0)], seq_length, seed)
            out.append((samples, len(samples.sources[0])))
        return out
    samples = build_validation_samples(sources, seq_length, seed)
    return [(samples, (batches or cfg.eval.batches) * cfg.train.global_batch_size)]


def evaluate_encoder(
    loaded,
    sources: list[tuple[str, float]],
    batches: int | None,
    every_sequence: bool,
    micro_batch_size: int | None,
    progress: bool | None,
) -> Evaluation:
    """An encoder's masked-token loss and accuracy over the validation sequences, masked as
    the training loop masks them (the masker of the first source's tokenizer, as there)."""
    cfg = loaded.cfg
    seq_length, seed = cfg.train.seq_length, cfg.train.seed
    masker = Masker.for_tokenizer(Path(sources[0][0]) / "tokenizer.json", cfg.masking, seed)
    runner = MaskedLMRunner(loaded.model, cfg, micro_batch_size, progress, masker)
    parts = [
        runner.scores(samples, n)
        for samples, n in validation_reads(cfg, sources, batches, every_sequence)
    ]
    size = cfg.train.micro_batch_size
    mean = float(np.mean([loss for part in parts for loss in part.micro_batch_losses(size)]))
    count = sum(part.sequences for part in parts)
    chosen = sum(int(part.chosen.sum()) for part in parts)
    correct = sum(int(part.correct.sum()) for part in parts)
    return Evaluation(
        checkpoint=str(loaded.checkpoint),
        step=TrainerState.read(loaded.checkpoint).step,
        data=[str(p) for p, _ in sources],
        sequences=count,
        tokens=count * seq_length,
        loss=mean,
        perplexity=math.exp(min(mean, 50.0)),
        accuracy=correct / max(chosen, 1),
        masked_tokens=chosen,
    )


class LossRunner:
    """Mean loss of a one-process model over the first N samples of a source: next-token
    (`micro_batch`), or a t5's span corruption (`read` gives its three arrays)."""

    def __init__(
        self, model, cfg, micro_batch_size: int | None, progress: bool | None, read=micro_batch
    ) -> None:
        self.read = read
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device)
        self.size = micro_batch_size or cfg.train.micro_batch_size
        self.autocast = self.device.type == "cuda" and cfg.train.precision != "fp32"
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
        self.show = sys.stderr.isatty() if progress is None else progress

    @torch.no_grad()
    def mean_loss(self, samples, count: int) -> tuple[float, int]:
        from tqdm import tqdm

        if count < 1:
            raise DataDirError("no validation sequence to evaluate")
        total = 0.0
        starts = range(0, count, self.size)
        for start in tqdm(starts, desc="eval", unit="batch", disable=not self.show):
            arrays = self.read(samples, range(start, min(start + self.size, count)))
            tensors = [torch.from_numpy(array).to(self.device) for array in arrays]
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
                loss = self.model(*tensors)
            rows = tensors[0].shape[0]
            total += float(loss) * rows  # each row holds the same number of target tokens
        return total / count, count


@dataclass
class MaskedScores:
    """Per sequence: the summed cross entropy over its chosen positions, how many positions
    were chosen, and at how many the most likely real token is the original one."""

    loss: np.ndarray
    chosen: np.ndarray
    correct: np.ndarray

    @property
    def sequences(self) -> int:
        return int(self.loss.shape[0])

    def micro_batch_losses(self, size: int) -> list[float]:
        """The loss of each micro-batch of `size` consecutive sequences, as the model's loss
        takes it (the mean over its chosen positions; 0 when none is chosen)."""
        return [
            float(self.loss[i : i + size].sum() / max(int(self.chosen[i : i + size].sum()), 1))
            for i in range(0, self.sequences, size)
        ]


class MaskedLMRunner(LossRunner):
    """An encoder's masked-token scores over the first N validation samples of a source."""

    def __init__(
        self, model, cfg, micro_batch_size: int | None, progress: bool | None, masker: Masker
    ) -> None:
        super().__init__(model, cfg, micro_batch_size, progress)
        self.masker = masker
        self.vocab = cfg.model.vocab_size

    @torch.no_grad()
    def scores(self, samples, count: int) -> MaskedScores:
        from tqdm import tqdm

        if count < 1:
            raise DataDirError("no validation sequence to evaluate")
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        starts = range(0, count, self.size)
        for start in tqdm(starts, desc="eval", unit="batch", disable=not self.show):
            indices = range(start, min(start + self.size, count))
            inputs, targets = masked_micro_batch(samples, indices, self.masker, "valid")
            inputs = torch.from_numpy(inputs).to(self.device)
            targets = torch.from_numpy(targets).to(self.device)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
                logits = self.model(inputs)
            parts.append(masked_token_scores(logits, targets, self.vocab))
        loss, chosen, correct = (np.concatenate(column) for column in zip(*parts, strict=True))
        return MaskedScores(loss, chosen, correct)


def masked_token_scores(
    logits: torch.Tensor, targets: torch.Tensor, vocab_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of one-process logits [B, S, V] (V padded) and targets [B, S] (IGNORED where
    not chosen): the summed fp32 cross entropy over the real vocabulary at its chosen
    positions, their number, and how many of them the argmax gets right."""
    chosen = targets != IGNORED
    rows = chosen.nonzero()[:, 0]
    picked = logits[chosen][:, :vocab_size].float()
    truth = targets[chosen]
    losses = F.cross_entropy(picked, truth, reduction="none")
    hits = (picked.argmax(dim=-1) == truth).to(torch.int64)
    batch = targets.shape[0]
    loss = torch.zeros(batch, device=logits.device).index_add_(0, rows, losses)
    correct = torch.zeros(batch, dtype=torch.int64, device=logits.device).index_add_(0, rows, hits)
    return (
        loss.double().cpu().numpy(),
        chosen.sum(dim=-1).cpu().numpy(),
        correct.cpu().numpy(),
    )
