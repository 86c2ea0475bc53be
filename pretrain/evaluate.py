"""`kiln eval RUN_DIR_OR_CHECKPOINT [--data SHARDS]`: validation loss and perplexity.

The checkpoint's model runs in one process (on a GPU when there is one) over the validation
split of the run's data, or of another prepared directory with the same tokenizer. By default
it reads what the training loop's evaluation reads, the first `eval.batches` global batches of
`train.seq_length` tokens, so the two report the same loss; `--batches N` reads more or fewer
and `--all` every validation sequence once. The loss is the mean next-token cross entropy
over those tokens; perplexity is its exponential.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from pretrain.data import (
    DataDirError,
    build_validation_samples,
    configured_sources,
    micro_batch,
    read_manifest,
)
from pretrain.inference import load_model
from pretrain.train.checkpoint import TrainerState


@dataclass
class Evaluation:
    checkpoint: str
    step: int
    data: list[str]
    sequences: int
    tokens: int
    loss: float
    perplexity: float

    def as_dict(self) -> dict:
        return asdict(self)


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
    """The checkpoint's validation loss; `every_sequence` reads each directory's whole
    validation split once (the loss is then the mean over all their tokens)."""
    loaded = load_model(Path(path))
    cfg = loaded.cfg
    seq_length, seed = cfg.train.seq_length, cfg.train.seed
    sources = [(str(data), 1.0)] if data is not None else configured_sources(cfg.data)
    for directory, _ in sources:
        check_tokenizer(Path(directory), loaded.tokenizer)
    runner = LossRunner(loaded.model, cfg, micro_batch_size, progress)
    if every_sequence:
        parts = []
        for directory, _ in sources:
            samples = build_validation_samples([(directory, 1.0)], seq_length, seed)
            parts.append(runner.mean_loss(samples, len(samples.sources[0])))
        count = sum(n for _, n in parts)
        mean = sum(loss * n for loss, n in parts) / count
    else:
        samples = build_validation_samples(sources, seq_length, seed)
        count = (batches or cfg.eval.batches) * cfg.train.global_batch_size
        mean, _ = runner.mean_loss(samples, count)
    return Evaluation(
        checkpoint=str(loaded.checkpoint),
        step=TrainerState.read(loaded.checkpoint).step,
        data=[str(p) for p, _ in sources],
        sequences=count,
        tokens=count * seq_length,
        loss=mean,
        perplexity=math.exp(min(mean, 50.0)),
    )


class LossRunner:
    """Mean next-token loss of a one-process model over the first N samples of a source."""

    def __init__(self, model, cfg, micro_batch_size: int | None, progress: bool | None) -> None:
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
            inputs, targets = micro_batch(samples, range(start, min(start + self.size, count)))
            inputs = torch.from_numpy(inputs).to(self.device)
            targets = torch.from_numpy(targets).to(self.device)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
                loss = self.model(inputs, targets)
            total += float(loss) * inputs.shape[0]  # each row holds the same number of tokens
        return total / count, count
