"""`kiln data prepare`: run the stages on Ray, resumably, and write shards plus a manifest.

    read + normalise + filter   Ray tasks over parts              clean/
    exact dedup                 Ray tasks over hash partitions    exact/
    tokenizer                   train on a hash-chosen sample, or load
    tokenise + MinHash          Ray Data actor pool over parts    tokens/
    near dedup                  Ray tasks over band-key partitions, union-find on the driver
    shards                      corpus order, train/valid by hash, weights applied
    manifest                    counts that reconcile, shard checksums, timings

Intermediate results live in OUTPUT/.work; each is renamed into place when complete, so a run
killed at any point and started again redoes only unfinished work and writes the same bytes.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from . import atomic
from .config import DataConfig, TokenizerConfig
from .format import token_dtype
from .manifest import MANIFEST, build_manifest, reconcile
from .plan import Part, fingerprint, plan_parts, save_plan
from .progress import StageProgress
from .shards import SPLITS, SplitWriter, copies_of, in_tokenizer_sample, split_of
from .stages import (
    PartTokenizer,
    clean_part,
    exact_duplicates,
    hash_pairs,
    load_tokens,
    near_candidates,
    read_clean,
    signatures_of,
    tokens_path,
)
from .steps.dedup import estimated_jaccard, near_duplicates
from .tokenizer import (
    file_sha256,
    load_tokenizer,
    save_tokenizer,
    split_pieces,
    train_tokenizer,
)

WORK = ".work"


class PrepareError(RuntimeError):
    """A problem with the output directory or the run as a whole, as one line."""


def prepare(
    data: DataConfig,
    tokenizer: TokenizerConfig,
    output: Path,
    resolved_config: dict[str, Any],
    ray_address: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Prepare `data.inputs` into shards under `output`; return the manifest."""
    parts = plan_parts(data)  # bad paths fail here, before Ray starts
    if ray_address:
        _check_reachable(ray_address)
    key = fingerprint(data, tokenizer, parts)
    output = Path(output)
    work = output / WORK
    _claim_output(output, work, key, overwrite)
    existing = output / MANIFEST
    if existing.exists():
        return atomic.read_json(existing)  # this exact job is already complete
    for sub in ("clean", "exact", "tokens", "near", "shards"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    atomic.remove_temporaries(output)
    save_plan(work, data, tokenizer, parts)

    timings: dict[str, float] = {}
    with _ray(ray_address) as cpus, StageProgress(show_progress) as progress:
        timer = functools.partial(_timed, timings)
        with timer("read_clean_filter"):
            clean = _run_clean(parts, data, work, cpus, progress)
        with timer("exact_dedup"):
            exact_drop = _run_exact(parts, data, work, cpus)
        with timer("tokenizer"):
            tokenizer_info = _run_tokenizer(parts, data, tokenizer, work, output, exact_drop, clean)
        with timer("tokenize"):
            tokenized = _run_tokenize(parts, data, work, cpus, progress)
        with timer("near_dedup"):
            near = _run_near(parts, data, work, cpus, progress)
        with timer("shards"):
            shards, weights = _write_shards(
                parts, data, work, output, tokenizer_info, near["drop"], progress
            )
    _write_quarantine(parts, work, output)
    manifest = build_manifest(
        config=resolved_config,
        fingerprint=key,
        parts=parts,
        clean=clean,
        exact_removed=len(exact_drop),
        tokenized=tokenized,
        near=near,
        weights=weights,
        shards=shards,
        tokenizer=tokenizer_info,
        timings=timings,
    )
    reconcile(manifest["counts"])
    atomic.write_json(existing, manifest)
    return manifest


def _claim_output(output: Path, work: Path, key: str, overwrite: bool) -> None:
    """The output directory holds this job, nothing, or (with --overwrite) is emptied."""
    marker = work / "fingerprint"
    owned = marker.exists() and marker.read_text().strip() == key
    occupied = output.exists() and any(output.iterdir())
    if occupied and not owned:
        ours = work.exists() or (output / MANIFEST).exists()
        if not ours:
            raise PrepareError(
                f"{output}: is not empty and not a Kiln data directory; choose another --output"
            )
        if not overwrite:
            raise PrepareError(
                f"{output}: holds data prepared with another configuration or other inputs; "
                "choose another --output or pass --overwrite to replace it"
            )
        shutil.rmtree(output)
    work.mkdir(parents=True, exist_ok=True)
    if not owned:
        atomic.write_text(marker, key + "\n")


def _timed(timings: dict[str, float], name: str):
    @contextmanager
    def timer():
        started = time.perf_counter()
        yield
        timings[name] = round(time.perf_counter() - started, 3)

    return timer()


@contextmanager
def _ray(address: str | None):
    """Connect to the cluster at `address`, or start Ray on this machine; yield its CPU count."""
    if address:
        use_ray_token_auth_if_available()  # before importing ray, which reads it at import
    import ray
    import ray.data

    logging.getLogger("ray").setLevel(logging.ERROR)  # Kiln reports progress and errors itself
    started = False
    if not ray.is_initialized():
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                logging_level=logging.ERROR,
                configure_logging=True,
            )
        except (ConnectionError, RuntimeError, ray.exceptions.RayError) as error:
            if address is None:
                raise
            first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise PrepareError(
                f"cannot connect to the Ray cluster at {address}: {first} (a cluster with token "
                "authentication needs RAY_AUTH_MODE=token and its token in ~/.ray/auth_token "
                "or RAY_AUTH_TOKEN)"
            ) from None
        started = True
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    try:
        yield max(1, int(ray.cluster_resources().get("CPU", 1)))
    finally:
        if started:
            ray.shutdown()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after Ray's minutes of retries, when nothing listens at HOST:PORT."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # ray://, auto and other forms are Ray's to resolve
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise PrepareError(
            f"cannot reach the Ray cluster at {address}: {error.strerror or error} "
            "(start one with `ray start --head`, or leave out --ray-address to run locally)"
        ) from None


def use_ray_token_auth_if_available() -> None:
    """`ray start` turns token authentication on when a token exists, but a driver connecting by
    address does not (Ray 2.60): do for the driver what `ray start` did for the cluster."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or Path(token_file).is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def _finished(
    parts: list[Part], done_file: Callable[[Part], Path]
) -> tuple[dict[int, dict], list[Part]]:
    """Counts of the parts a stage already finished (in an earlier run), and the parts to do."""
    results = {}
    todo = []
    for part in parts:
        done = done_file(part)
        if done.exists():
            results[part.index] = atomic.read_json(done)
        else:
            todo.append(part)
    return results, todo


def _run_clean(
    parts: list[Part], data: DataConfig, work: Path, cpus: int, progress: StageProgress
) -> list[dict]:
    results, todo = _finished(parts, lambda part: work / "clean" / f"{part.name}.json")
    task = progress.stage("read, clean, filter", total=len(parts), unit="documents")
    progress.advance(task, len(results), sum(r["in"] for r in results.values()))
    if todo:
        # Plain Ray tasks: on small machines Ray Data ran these maps one at a time.
        import ray

        remote = ray.remote(clean_part).options(num_cpus=1)
        pending = [remote.remote(part, data, work) for part in todo]
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            result = ray.get(finished[0])
            results[result["part"]] = result
            progress.advance(task, 1, result["in"])
    return [results[p.index] for p in parts]


def _run_exact(parts: list[Part], data: DataConfig, work: Path, cpus: int) -> np.ndarray:
    done = work / "exact" / "drop.npy"
    if not data.dedup.exact.enabled:
        return np.zeros(0, dtype=np.int64)
    if done.exists():
        return np.load(done)
    import ray

    partitions = _partitions(cpus)
    task = ray.remote(exact_duplicates)
    drops = ray.get([task.remote(parts, work, p, partitions) for p in range(partitions)])
    drop = np.sort(np.concatenate(drops)) if drops else np.zeros(0, dtype=np.int64)
    atomic.write_npy(done, drop)
    return drop


def _partitions(cpus: int) -> int:
    return max(2, 2 * cpus)


def _run_tokenizer(
    parts: list[Part],
    data: DataConfig,
    cfg: TokenizerConfig,
    work: Path,
    output: Path,
    exact_drop: np.ndarray,
    clean: list[dict],
) -> dict[str, Any]:
    target = output / "tokenizer.json"
    source = "loaded" if cfg.path else "trained"
    if not target.exists():
        if cfg.path:
            tokenizer = load_tokenizer(cfg.path, cfg.eos_token)
        else:
            kept_bytes = sum(c["kept_bytes"] for c in clean)
            share = min(1.0, cfg.train_sample_mb * 1e6 / max(kept_bytes, 1))
            sample = _sample(parts, work, exact_drop, share, data.tokenize.max_piece_chars)
            tokenizer = train_tokenizer(sample, cfg)
        save_tokenizer(tokenizer, target)
    tokenizer = load_tokenizer(target, cfg.eos_token)
    vocab = tokenizer.get_vocab_size()
    return {
        "file": target.name,
        "source": source if not cfg.path else f"loaded from {cfg.path}",
        "sha256": file_sha256(target),
        "vocab_size": vocab,
        "eos_token": cfg.eos_token,
        "eos_id": tokenizer.token_to_id(cfg.eos_token),
        "dtype": np.dtype(token_dtype(vocab)).name,
    }


def _sample(
    parts: list[Part], work: Path, drop: np.ndarray, share: float, max_piece_chars: int
) -> Iterable[str]:
    """Kept, deduplicated texts whose hash falls in the first `share` of the hash space, long
    ones in the same bounded pieces the encoder uses (the trainer's memory grows with the
    longest sequence it is given)."""
    for part in parts:
        table = read_clean(work, part, ["id", "text", "hash"])
        if table.num_rows == 0:
            continue
        ids = table.column("id").to_numpy()
        chosen = in_tokenizer_sample(hash_pairs(table.column("hash").to_pylist()), share)
        chosen &= ~np.isin(ids, drop)
        texts = table.column("text")
        for index in np.flatnonzero(chosen):
            yield from split_pieces(texts[int(index)].as_py(), max_piece_chars)


def _run_tokenize(
    parts: list[Part], data: DataConfig, work: Path, cpus: int, progress: StageProgress
) -> list[dict]:
    import ray.data

    results, todo = _finished(parts, lambda part: tokens_path(work, part, ".json"))
    task = progress.stage("tokenise", total=len(parts), unit="tokens")
    progress.advance(task, len(results), sum(r["tokens"] for r in results.values()))
    if todo:
        # This plan has no read tasks (the part list comes from the driver), so the pool may
        # take every CPU without starving anything.
        actors = data.tokenize.actors or cpus
        with warnings.catch_warnings():
            # max_restarts is only reachable through **ray_remote_args, deprecated in Ray 2.60
            # (removal announced for 2.64; Kiln pins 2.60.x).
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            dataset = ray.data.from_items(
                [{"part": p.index} for p in todo], override_num_blocks=len(todo)
            ).map_batches(
                PartTokenizer,
                fn_constructor_kwargs={
                    "work": str(work),
                    "threads": max(1, cpus // actors),  # no more encoding threads than CPUs
                },
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=min(actors, len(todo))),
                num_cpus=1,
                max_restarts=0,  # a failed run resumes from its finished parts instead
            )
        for row in dataset.iter_rows():
            results[int(row["part"])] = {
                "part": int(row["part"]),
                "documents": int(row["documents"]),
                "tokens": int(row["tokens"]),
            }
            progress.advance(task, 1, int(row["tokens"]))
    return [results[p.index] for p in parts]


def _run_near(
    parts: list[Part], data: DataConfig, work: Path, cpus: int, progress: StageProgress
) -> dict[str, Any]:
    done = work / "near" / "stats.json"
    empty = {"drop": np.zeros(0, dtype=np.int64), "candidate_pairs": 0, "similar_pairs": 0}
    if not data.dedup.near.enabled:
        return empty
    if done.exists():
        return {**atomic.read_json(done), "drop": np.load(work / "near" / "drop.npy")}
    import ray

    task = progress.stage("near dedup", total=1, unit="pairs")
    partitions = _partitions(cpus)
    remote = ray.remote(near_candidates)
    found = ray.get([remote.remote(parts, work, p, partitions) for p in range(partitions)])
    pairs = np.concatenate(found, axis=0) if found else np.zeros((0, 2), dtype=np.int64)
    pairs = np.unique(pairs, axis=0) if len(pairs) else pairs
    if len(pairs):
        members = np.unique(pairs)
        signatures = signatures_of(parts, work, members)
        rows = np.searchsorted(members, pairs)
        similarity = estimated_jaccard(signatures[rows[:, 0]], signatures[rows[:, 1]])
        similar = similarity >= data.dedup.near.threshold
        drop = near_duplicates(pairs, similar)
    else:
        similar = np.zeros(0, dtype=bool)
        drop = np.zeros(0, dtype=np.int64)
    atomic.write_npy(work / "near" / "drop.npy", drop)
    stats = {"candidate_pairs": int(len(pairs)), "similar_pairs": int(similar.sum())}
    atomic.write_json(done, stats)
    progress.advance(task, 1, int(len(pairs)))
    return {**stats, "drop": drop}


def _write_shards(
    parts: list[Part],
    data: DataConfig,
    work: Path,
    output: Path,
    tokenizer_info: dict[str, Any],
    near_drop: np.ndarray,
    progress: StageProgress,
) -> tuple[list[dict], dict[str, int]]:
    dtype = np.dtype(tokenizer_info["dtype"]).type
    writers = {
        split: SplitWriter(output, work / "shards", split, dtype, data.shards.max_tokens)
        for split in SPLITS
    }
    weights: Counter[str] = Counter()
    task = progress.stage("write shards", total=len(parts), unit="tokens")
    for part in parts:
        meta, tokens = load_tokens(work, part, np.dtype(dtype))
        ids, lengths, hashes = meta["ids"], meta["lengths"], meta["hash64"]
        ends = np.cumsum(lengths)
        starts = ends - lengths
        keep = ~np.isin(ids, near_drop)
        copies = copies_of(hashes, data.inputs[part.input_index].weight)
        valid = split_of(hashes, data.shards.validation_fraction)
        written = 0
        for index in np.flatnonzero(keep):
            if copies[index] == 0:
                weights["filtered"] += 1
                continue
            weights["kept"] += 1
            weights["extra_copies"] += int(copies[index]) - 1
            document = tokens[starts[index] : ends[index]]
            writer = writers["valid" if valid[index] else "train"]
            for _ in range(int(copies[index])):
                writer.add(document)
                written += len(document)
        progress.advance(task, 1, written)
    for writer in writers.values():
        writer.close()
    shards = [vars(info) for split in SPLITS for info in writers[split].shards]
    return shards, dict(weights)


def _write_quarantine(parts: list[Part], work: Path, output: Path) -> None:
    chunks = [(work / "clean" / f"{p.name}.quarantine.jsonl").read_text() for p in parts]
    atomic.write_text(output / "quarantine.jsonl", "".join(chunks))
