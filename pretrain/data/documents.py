"""Training samples packed from a seeded per-epoch shuffle of documents, then shuffled: Megatron's
document-then-sample shuffle (GPTDataset's document, sample and shuffle indices), computed per
epoch and kept for the last two, so that the neighbours in a sequence are random documents, not
neighbours in the corpus (the same file, the same site).

Epoch e of a split: the documents of each pass are permuted by
`np.random.default_rng([seed, e, pass]).permutation`, laid end to end (EOS ends every document)
and cut into windows of seq_length + 1 tokens overlapping by one, as `PackedSequences` does; a
pass's partial last window is left out, so a window never holds two passes. `kiln data prepare`
writes the copies an input weight asks for a pass apart, so a document and its copy never share
a sequence. The epoch's windows are then read in the order
`np.random.default_rng([seed, e]).permutation`. Every index is a pure function of (data, seed,
index): a run resumed at any step, under any layout, reads what an uninterrupted run would.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .stream import DataDirError, TokenStream, check_index, check_seed


@dataclass(frozen=True)
class DocumentTable:
    """Where each document of a split lies in its token stream, and where each pass starts
    (a pass is documents [passes[k], passes[k + 1]))."""

    starts: np.ndarray  # int64 stream offset of each document
    lengths: np.ndarray  # int64 tokens of each document (EOS included)
    passes: np.ndarray  # int64 first document of each pass, then the document count

    @classmethod
    def of(cls, lengths: np.ndarray, pass_documents: list[int] | None) -> DocumentTable:
        lengths = np.asarray(lengths, dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1])) if len(lengths) else lengths
        counts = list(pass_documents) if pass_documents else [len(lengths)]
        if sum(counts) != len(lengths):
            raise DataDirError(
                f"the manifest's passes hold {sum(counts)} documents but the shards {len(lengths)}"
            )
        passes = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        return cls(starts, lengths, passes)


class _Epoch:
    """One epoch's document order and window layout, per pass."""

    def __init__(self, table: DocumentTable, seed: int, epoch: int, seq_length: int) -> None:
        self.order: list[np.ndarray] = []  # per pass: its documents in shuffled order
        self.ends: list[np.ndarray] = []  # per pass: stream end of each, in that order
        windows = []
        for index in range(len(table.passes) - 1):
            first, stop = int(table.passes[index]), int(table.passes[index + 1])
            rng = np.random.default_rng([seed, epoch, index])
            order = first + rng.permutation(stop - first)
            ends = np.cumsum(table.lengths[order])
            self.order.append(order)
            self.ends.append(ends)
            total = int(ends[-1]) if len(ends) else 0
            windows.append(max(total - 1, 0) // seq_length)
        self.first_window = np.concatenate(([0], np.cumsum(windows))).astype(np.int64)


class ShuffledDocumentSamples:
    """An endless sequence over epochs: index g reads window perm_e[g % n] of epoch e = g // n,
    where the windows are cut from the epoch's shuffled documents (see the module docstring)."""

    def __init__(
        self,
        stream: TokenStream,
        table: DocumentTable,
        seq_length: int,
        seed: int,
        cache_epochs: int = 2,
    ) -> None:
        if seq_length < 1:
            raise ValueError(f"seq_length must be at least 1, got {seq_length}")
        self.stream, self.table = stream, table
        self.seq_length, self.seed = int(seq_length), check_seed(seed)
        self._cache_epochs = max(1, int(cache_epochs))
        self._epochs: OrderedDict[int, tuple[_Epoch, np.ndarray]] = OrderedDict()
        self.epoch_size = int(self._epoch(0)[0].first_window[-1])
        if self.epoch_size <= 0:
            raise DataDirError(
                f"packing into sequences of {seq_length} needs a pass of at least seq_length+1 "
                f"= {seq_length + 1} tokens, but the split holds {len(stream)} in all"
            )

    def __len__(self) -> int:
        return self.epoch_size

    def _epoch(self, epoch: int) -> tuple[_Epoch, np.ndarray]:
        cached = self._epochs.get(epoch)
        if cached is None:
            layout = _Epoch(self.table, self.seed, epoch, self.seq_length)
            n = int(layout.first_window[-1])
            dtype = np.int32 if n <= np.iinfo(np.int32).max else np.int64
            perm = np.random.default_rng([self.seed, epoch]).permutation(np.arange(n, dtype=dtype))
            cached = (layout, perm)
            self._epochs[epoch] = cached
            while len(self._epochs) > self._cache_epochs:
                self._epochs.popitem(last=False)
        else:
            self._epochs.move_to_end(epoch)
        return cached

    def locate(self, g: int) -> tuple[int, int, int]:
        """(epoch, pass, window within the pass) that global index g reads."""
        epoch, position = divmod(check_index(g), self.epoch_size)
        layout, perm = self._epoch(epoch)
        window = int(perm[position])
        pass_index = int(np.searchsorted(layout.first_window, window, side="right")) - 1
        return epoch, pass_index, window - int(layout.first_window[pass_index])

    def sample(self, g: int) -> np.ndarray:
        """seq_length + 1 int64 tokens of global index g."""
        epoch, pass_index, window = self.locate(g)
        layout = self._epoch(epoch)[0]
        order, ends = layout.order[pass_index], layout.ends[pass_index]
        position = window * self.seq_length  # in the pass's shuffled stream
        want = self.seq_length + 1
        out = np.empty(want, dtype=np.int64)
        k = int(np.searchsorted(ends, position, side="right"))  # the document holding it
        offset = position - (int(ends[k - 1]) if k else 0)
        done = 0
        while done < want:
            document = int(order[k])
            take = min(want - done, int(self.table.lengths[document]) - offset)
            start = int(self.table.starts[document]) + offset
            out[done : done + take] = self.stream.read(start, take)
            done, offset, k = done + take, 0, k + 1
        return out
