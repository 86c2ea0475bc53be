"""Peak memory of one training step's forward and backward with the loss taken whole (the
fp32 softmax of every logit kept for backward: Kiln's loss until now) and as `cross_entropy`
takes it by default (bf16: chunks, each chunk's fp32 softmax recomputed in backward; fp32:
whole, megatron-core works in place in the logits), side by side on the same model and batch.

    .venv/bin/python bench/loss_memory.py [--config configs/train/tiny.yaml]
        [--dtypes fp32,bf16] [--chunk-elements N] [key=value ...]

Peak: the highest sum of the bytes allocated less the bytes freed, over every allocation and
free PyTorch's profiler records (`profile_memory`) from the start of the forward to the end of
the backward (gradients included, weights not: they were allocated before), on CPU; on a GPU,
`torch.cuda.max_memory_allocated` over the same span. The logits are the largest activation
of a small model (a 8192-token vocabulary against a 256-wide hidden state), so the loss
decides the peak here; at 7B (hidden 4096, vocabulary 32000) they are one large tensor among
many. `--chunk-elements` defaults to a chunk of 4 sequences so that the tiny batch is cut at
all (Kiln's default cuts at 2**26 fp32 logits, 256 MiB). Each way is measured twice,
interleaved, and the lower peak kept. Both ways give the same loss and gradients (checked).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pretrain.startup import quiet_imports  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peak_bytes(step, device: torch.device) -> int:
    """The peak of live tensor bytes while `step()` runs (above what was live before)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # every allocation (+bytes) and free (-bytes) the profiler saw, in order
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def one_step(model, inputs, targets, chunk_elements: int | None) -> tuple[float, list]:
    """Forward and backward with the loss taken whole (None) or Kiln's way; loss, gradients."""
    from pretrain.model.transformer import cross_entropy

    model.zero_grad(set_to_none=True)
    logits = model(inputs)
    loss = cross_entropy(logits, targets, model.config.vocab_size, chunk_elements=chunk_elements)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def collect(outcome: list, *args) -> None:
    outcome.append(one_step(*args))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs/train/tiny.yaml"))
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--chunk-elements", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    quiet_imports()
    from megatron.core import parallel_state

    from pretrain.config import load_config, resolve_run
    from pretrain.model import transformer
    from tests.support.distributed import free_port

    cfg = resolve_run(load_config(Path(args.config), args.overrides, world_size=1))
    model_cfg = cfg.model
    seq, micro = cfg.train.seq_length, cfg.train.micro_batch_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist.init_process_group(
        "gloo" if device.type == "cpu" else "nccl",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
    )
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    chunk = args.chunk_elements or 4 * seq * model_cfg.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_cfg.vocab_size, (micro, seq + 1), generator=generator)
    inputs, targets = ids[:, :-1].to(device), ids[:, 1:].to(device)
    print(
        f"{model_cfg.arch} {model_cfg.num_layers}x{model_cfg.hidden_size}, vocabulary "
        f"{model_cfg.vocab_size}, {micro} x {seq} tokens on {device.type}; logits "
        f"{micro * seq * model_cfg.vocab_size / 2**20:.1f} M elements, chunks of "
        f"{chunk / 2**20:.1f} M"
    )
    for name in args.dtypes.split(","):
        with torch.device(device):
            model = transformer.Transformer(model_cfg, seed=1, dtype=DTYPES[name])
        model.to(DTYPES[name])  # as DeepSpeed casts it (norm weights too)
        model.train()
        results = {}
        one_step(model, inputs, targets, None)  # warm-up: one-time buffers (RoPE tables...)
        for label, elements in (("whole", None), ("kiln", chunk)) * 2:
            outcome: list = []
            peak = peak_bytes(partial(collect, outcome, model, inputs, targets, elements), device)
            peak = min(peak, results.get(label, (0, 0, peak))[2])
            results[label] = (*outcome[0], peak)
        (whole, whole_grads, whole_peak) = results["whole"]
        (chunked, chunked_grads, chunked_peak) = results["kiln"]
        tolerance = 1e-5 if name == "fp32" else 2e-2
        assert abs(chunked - whole) <= tolerance * abs(whole), (chunked, whole)
        for a, b in zip(whole_grads, chunked_grads, strict=True):
            torch.testing.assert_close(b, a, rtol=tolerance, atol=tolerance)
        print(
            f"{name:>5}: peak whole {whole_peak / 2**20:7.1f} MiB, kiln "
            f"{chunked_peak / 2**20:7.1f} MiB ({chunked_peak / whole_peak:.2f}x); "
            f"loss {whole:.6f} / {chunked:.6f}"
        )
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
