"""Run a function in N real processes joined by gloo on loopback, and collect rank 0's result."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, fn: Callable, world: int, port: int, out: str, args: tuple) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        result = fn(rank, world, *args)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, tmp_path: Path, *args: Any) -> Any:
    """`fn(rank, world, *args)` in `world` spawned processes; rank 0's return value."""
    out = tmp_path / f"result_{fn.__name__}_{world}.pt"
    mp.start_processes(
        _entry, args=(fn, world, free_port(), str(out), args), nprocs=world, start_method="spawn"
    )
    return torch.load(out, weights_only=False)
