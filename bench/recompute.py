"""Activation memory and step time of `train.activation_checkpointing` none / selective / full,
side by side in one process on the same model and batch.

    .venv/bin/python bench/recompute.py [--config configs/train/tiny.yaml] [--steps 5]
        [key=value ...]

Memory: the bytes of every tensor autograd saves for backward during one forward pass
(`torch.autograd.graph.saved_tensors_hooks`), counting each storage once: what activation
checkpointing trades for compute, measured exactly rather than through the allocator. Time:
the median of `--steps` forward+backward passes of each mode, interleaved so that noise on the
machine hits all three alike. All three give the same loss and gradients (checked here).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pretrain.startup import quiet_imports  # noqa: E402

MODES = ("none", "selective", "full")


def saved_bytes(model, inputs, targets) -> tuple[int, torch.Tensor]:
    """Bytes autograd keeps for backward in one forward (each storage once), and the loss."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(inputs, targets)
    return sum(storages.values()), loss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs/train/tiny.yaml"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    quiet_imports()
    from megatron.core import parallel_state

    from pretrain.config import load_config, resolve_run
    from pretrain.model.transformer import Transformer

    cfg = resolve_run(load_config(args.config, args.overrides, world_size=1))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    models = {mode: Transformer(cfg.model, seed=cfg.train.seed, recompute=mode) for mode in MODES}
    for model in models.values():
        model.train()
    generator = torch.Generator().manual_seed(0)
    shape = (cfg.train.micro_batch_size, cfg.train.seq_length + 1)
    tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    memory, losses, grads, times = {}, {}, {}, {mode: [] for mode in MODES}
    for mode, model in models.items():
        memory[mode], loss = saved_bytes(model, inputs, targets)
        loss.backward()
        losses[mode] = loss.item()
        grads[mode] = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
    for step in range(args.steps):
        order = MODES if step % 2 == 0 else tuple(reversed(MODES))
        for mode in order:
            started = time.perf_counter()
            models[mode](inputs, targets).backward()
            times[mode].append(time.perf_counter() - started)
            models[mode].zero_grad(set_to_none=True)
    same = all(
        losses[mode] == losses["none"]
        and all(torch.equal(a, b) for a, b in zip(grads[mode], grads["none"], strict=True))
        for mode in MODES
    )
    print(
        f"{cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, micro-batch "
        f"{shape[0]} x {cfg.train.seq_length} tokens, fp32 on CPU; same loss and gradients: {same}"
    )
    base_time = statistics.median(times["none"])
    for mode in MODES:
        median = statistics.median(times[mode])
        print(
            f"{mode:>9}: saved activations {memory[mode] / 2**20:8.1f} MiB "
            f"({memory[mode] / memory['none']:.2f}x none), step {median * 1000:7.1f} ms "
            f"({median / base_time:.2f}x none)"
        )
    dist.destroy_process_group()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
