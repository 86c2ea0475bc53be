"""The next step's micro-batches, built on a background thread while this step computes.

Building a batch (gathering packed samples out of memory-mapped shards) is host work that
would otherwise stall the GPU between steps. One worker thread builds the batches of the
position the loop asks for next; on a GPU they are put in pinned (page-locked) memory, so
that the engine's `non_blocking` copy to the device is asynchronous. A position other than
the one prepared (the first step, a resume) is built on the spot.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


class BatchPrefetcher:
    """`get(position, following)`: the batches at `position` (consumed samples), and starts
    building those at `following` (None: no further step)."""

    def __init__(self, build: Callable[[int], list[Batch]], pin: bool) -> None:
        self.build, self.pin = build, pin
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-batches")
        self.pending: tuple[int, Future] | None = None

    def get(self, position: int, following: int | None) -> list[Batch]:
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] == position:
            batches = pending[1].result()  # re-raises what the build raised
        else:
            if pending is not None:
                pending[1].cancel()
            batches = self._prepared(position)
        if following is not None:
            self.pending = (following, self.executor.submit(self._prepared, following))
        return batches

    def _prepared(self, position: int) -> list[Batch]:
        batches = self.build(position)
        if self.pin:
            batches = [tuple(tensor.pin_memory() for tensor in batch) for batch in batches]
        return batches

    def close(self) -> None:
        self.pending = None
        self.executor.shutdown(wait=True, cancel_futures=True)
