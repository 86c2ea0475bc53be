"""`kiln data prepare`: run the stages as Ray tasks, resumably, and write shards plus a manifest.

    read + clean steps          a task per part        clean/  (+ both dedup shuffles' map side)
    exact dedup                 a task per hash bucket                             exact/
    near dedup (beside exact)   band, pair and connected-components tasks per bucket  near/
    tokenizer                   a task per part picks its sample, trained here; or loaded
    tokenise                    a task per part: the survivors, their copies and split  tokens/
    shards                      a task per shard: a fixed range of a split's token stream
    removed sample              a tree of tasks keeping the best candidates per kind
    quarantine, manifest        counts that reconcile, shard checksums, timings

The driver holds the plan (per-part metadata) and each task's small result, never texts, tokens,
signatures, pairs or drop lists. Intermediate results live in OUTPUT/.work; each is renamed into
place when complete, so a run killed at any point and started again redoes only unfinished work
and writes the same bytes. After a successful run .work is removed (`keep_work` keeps it).
"""

from __future__ import annotations

import resource
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from . import atomic
from .config import DataConfig, ResolvedTokenizer
from .errors import PrepareError
from .format import token_dtype
from .manifest import MANIFEST, build_manifest, reconcile
from .plan import Part, Plan, fingerprint, plan_parts, save_plan
from .progress import StageProgress
from .ray_cluster import (
    RayCluster,
    explain,
    log_failure,
    ray_session,
    run_tasks,
    use_ray_token_auth_if_available,
    user_error,
)
from .selection import SPLITS, passes
from .stages import STAGE_DIRS, WorkDir
from .stages.clean import clean_part
from .stages.exact import exact_duplicates
from .stages.near import connected_components, near_band_task, near_finalize, near_pair_task
from .stages.quarantine import write_quarantine
from .stages.removed import FAN_IN, merge_candidates, part_candidates, write_removed
from .stages.sample import sample_part, sample_texts
from .stages.shards import Segment, write_shard
from .stages.tokenize import tokenize_part
from .tokenizer import (
    TokenizerError,
    file_sha256,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
    write_tokenizer_config,
)

__all__ = ["PrepareError", "prepare", "use_ray_token_auth_if_available"]

# Told each stage's name, seconds, amount and unit as the stage ends (see `prepare`).
StageReport = Callable[[str, float, int, str], None]

WORK = ".work"
PLAN_HEAD_START_S = 1.0  # a plan this quick is checked (and fails) before Ray starts


def prepare(
    data: DataConfig,
    tokenizer: ResolvedTokenizer,
    output: Path,
    resolved_config: dict[str, Any],
    ray_address: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    keep_work: bool = False,
    on_stage: StageReport | None = None,
) -> dict[str, Any]:
    """Prepare `data.inputs` into shards under `output`; return the manifest. `on_stage` is
    told each stage's measurements as the stage ends (dashboards)."""
    output = Path(output).absolute()  # workers on other nodes have other working directories
    with ThreadPoolExecutor(max_workers=1) as background:
        planning = background.submit(plan_parts, data)  # listing a large corpus takes a while
        plan = _result_within(planning, PLAN_HEAD_START_S)  # bad paths fail here, before Ray
        if plan is not None:
            key = _claim_output(output, fingerprint(data, tokenizer, plan), overwrite)
            if (output / MANIFEST).exists():
                return atomic.read_json(output / MANIFEST)  # this exact job is already complete
        started = time.perf_counter()
        with ray_session(ray_address, output) as cluster:
            import ray

            ray_seconds = time.perf_counter() - started
            if cluster.dashboard_url:
                print(f"Ray dashboard: {cluster.dashboard_url}", file=sys.stderr, flush=True)
            if plan is None:
                plan = planning.result()
                key = _claim_output(output, fingerprint(data, tokenizer, plan), overwrite)
                if (output / MANIFEST).exists():
                    return atomic.read_json(output / MANIFEST)
            job = PrepareJob(data, tokenizer, plan, output, cluster, show_progress, on_stage)
            job.timings["ray_start"] = round(ray_seconds, 3)
            try:
                manifest = job.run(key, resolved_config)
            except ray.exceptions.RayError as error:
                mistake = user_error(error)
                if mistake is not None:
                    raise mistake from None
                log = log_failure(job.work.root, error)
                raise PrepareError(f"{explain(error)} (details in {log})") from None
    if not keep_work:
        shutil.rmtree(output / WORK, ignore_errors=True)
    return manifest


def _result_within(future: Future, seconds: float) -> Plan | None:
    try:
        return future.result(timeout=seconds)
    except FutureTimeout:
        return None


def _claim_output(output: Path, key: str, overwrite: bool) -> str:
    """The output directory holds this job (finished or not), nothing, or (with --overwrite)
    is emptied; returns the job's fingerprint."""
    work = output / WORK
    marker = work / "fingerprint"
    manifest = output / MANIFEST
    owned = (marker.exists() and marker.read_text().strip() == key) or (
        manifest.exists() and atomic.read_json(manifest).get("fingerprint") == key
    )
    occupied = output.exists() and any(output.iterdir())
    if occupied and not owned:
        ours = work.exists() or manifest.exists()
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
    if not manifest.exists():
        work.mkdir(parents=True, exist_ok=True)
        if not owned:
            atomic.write_text(marker, key + "\n")
    return key


class Meter:
    """Counts a stage's finished tasks and amount (documents, tokens, pairs) on its bar."""

    def __init__(self, progress: StageProgress, bar: Any) -> None:
        self.progress, self.bar, self.amount = progress, bar, 0

    def advance(self, tasks: int, amount: int = 0) -> None:
        self.amount += amount
        self.progress.advance(self.bar, tasks, amount)

    def extend(self, tasks: int) -> None:
        self.progress.extend(self.bar, tasks)


class PrepareJob:
    """The stages of one `kiln data prepare` run, each a method that runs its tasks."""

    def __init__(
        self,
        data: DataConfig,
        tokenizer: ResolvedTokenizer,
        plan: Plan,
        output: Path,
        cluster: RayCluster,
        show_progress: bool,
        on_stage: StageReport | None = None,
    ) -> None:
        self.data, self.tokenizer_cfg, self.plan = data, tokenizer, plan
        self.parts = plan.parts
        self.output = output
        self.work = WorkDir(output / WORK)
        self.cluster = cluster
        self.window = 2 * cluster.cpus  # tasks in flight: enough to keep every CPU busy
        self.show_progress = show_progress
        self.timings: dict[str, float] = {}
        self.throughput: dict[str, dict[str, Any]] = {}
        self.on_stage = on_stage

    @property
    def exact_buckets(self) -> int:
        return self.plan.exact_buckets if self.data.dedup.exact.enabled else 0

    @property
    def near_buckets(self) -> int:
        return self.plan.near_buckets if self.data.dedup.near.enabled else 0

    def run(self, key: str, resolved_config: dict[str, Any]) -> dict[str, Any]:
        for stage in STAGE_DIRS:
            (self.work.root / stage).mkdir(parents=True, exist_ok=True)
        atomic.remove_temporaries(self.output)
        save_plan(self.work.root, self.data, self.tokenizer_cfg, self.plan)
        with StageProgress(self.show_progress) as self.progress:
            clean = self.clean()
            line_offsets, empty_files = _span_fixups(self.parts, clean)
            with ThreadPoolExecutor(max_workers=1) as beside:
                exact_running = beside.submit(self.exact_dedup)  # both read only clean/
                near = self.near_dedup()
                exact = exact_running.result()
            tokenizer = self.train_or_load_tokenizer(clean)
            tokenized = self.tokenize(clean)
            shards = self.write_shards(tokenized, tokenizer["dtype"])
            removed = self.write_removed_sample(line_offsets)
            clean = self.write_quarantine(clean, line_offsets, empty_files)
        manifest = build_manifest(
            config=resolved_config,
            fingerprint=key,
            plan=self.plan,
            clean=clean,
            exact_removed=sum(r["removed"] for r in exact),
            tokenized=tokenized,
            near=near,
            shards=shards,
            removed=removed,
            tokenizer=tokenizer,
            timings=self.timings,
            throughput=self.throughput,
            execution={
                "ray_nodes": self.cluster.nodes,
                "ray_cpus": self.cluster.cpus,
                "nodes_used": len({r.get("node") for r in [*clean, *tokenized]} - {"", None}),
                # ru_maxrss is in KiB on Linux: what this (driver) process ever held.
                "driver_peak_rss_mb": round(
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
                ),
            },
        )
        reconcile(manifest["counts"])
        atomic.write_json(self.output / MANIFEST, manifest)
        return manifest

    # ----------------------------------------------------------------- running tasks

    @contextmanager
    def _stage(self, name: str, description: str, total: int, unit: str) -> Iterator[Meter]:
        """Time a stage and give it a progress bar; what it counts is its throughput."""
        meter = Meter(self.progress, self.progress.stage(description, total=total, unit=unit))
        started = time.perf_counter()
        yield meter
        self.timings[name] = round(time.perf_counter() - started, 3)
        self.throughput[name] = {"amount": meter.amount, "unit": unit}
        if self.on_stage is not None:
            self.on_stage(name, self.timings[name], meter.amount, unit)

    def _map(
        self,
        function: Callable[..., dict],
        calls: Iterable[tuple],
        done_files: Iterable[Path],
        on_result: Callable[[dict], None],
        num_cpus: float = 1,
    ) -> None:
        """Run `function` over `calls`, reading the result of a call whose done file exists
        (finished by an earlier run) instead of running it again."""
        todo = []
        for call, done in zip(calls, done_files, strict=True):
            if done.exists():
                on_result(atomic.read_json(done))
            else:
                todo.append(call)
        run_tasks(function, todo, on_result, window=self.window, num_cpus=num_cpus)

    def _per_part(
        self,
        stage: str,
        function: Callable[..., dict],
        calls: list[tuple],
        meter: Meter,
        amount: str,
    ) -> dict[int, dict]:
        results: dict[int, dict] = {}

        def collect(result: dict) -> None:
            results[result["part"]] = result
            meter.advance(1, result[amount])

        done = [self.work.part_file(stage, part, ".json") for part in self.parts]
        self._map(function, calls, done, collect)
        return results

    # ----------------------------------------------------------------- the stages

    def clean(self) -> list[dict]:
        with self._stage(
            "read_clean_filter", "read, clean, filter", len(self.parts), "documents"
        ) as meter:
            calls = [
                (p, self.data, str(self.work.root), self.plan.exact_buckets, self.plan.near_buckets)
                for p in self.parts
            ]
            results = self._per_part("clean", clean_part, calls, meter, "in")
        return [results[p.index] for p in self.parts]

    def exact_dedup(self) -> list[dict]:
        buckets = self.exact_buckets
        results: list[dict] = []
        with self._stage("exact_dedup", "exact dedup", buckets, "documents") as meter:

            def collect(result: dict) -> None:
                results.append(result)
                meter.advance(1, result["documents"])

            calls = [(len(self.parts), str(self.work.root), b) for b in range(buckets)]
            done = [self.work.bucket_file("exact", "drop", b, ".json") for b in range(buckets)]
            self._map(exact_duplicates, calls, done, collect)
        return results

    def train_or_load_tokenizer(self, clean: list[dict]) -> dict[str, Any]:
        cfg = self.tokenizer_cfg
        target = self.output / "tokenizer.json"
        with self._stage(
            "tokenizer", "tokenizer", 0 if cfg.path else len(self.parts), "documents"
        ) as meter:
            if not target.exists():
                if cfg.path:
                    tokenizer = load_tokenizer(cfg.path, cfg.eos_token)
                    if cfg.mask_token and tokenizer.token_to_id(cfg.mask_token) is None:
                        raise TokenizerError(
                            f"{cfg.path}: the tokenizer has no {cfg.mask_token} token, which "
                            "the masked-LM objective (model.arch: bert) needs"
                        )
                    missing = [t for t in cfg.required_tokens if tokenizer.token_to_id(t) is None]
                    if missing:
                        raise TokenizerError(
                            f"{cfg.path}: the tokenizer lacks {len(missing)} of the tokens span "
                            f"corruption (model.arch: t5) needs, first {missing[0]}: it needs "
                            "the decoder's start token and the sentinels (spans section)"
                        )
                else:
                    kept_bytes = sum(c["kept_bytes"] for c in clean)
                    share = min(1.0, cfg.train_sample_mb * 1e6 / max(kept_bytes, 1))
                    calls = [
                        (
                            p,
                            str(self.work.root),
                            self.exact_buckets,
                            self.near_buckets,
                            share,
                            self.data.tokenize.max_piece_chars,
                        )
                        for p in self.parts
                    ]
                    self._per_part("sample", sample_part, calls, meter, "documents")
                    tokenizer = train_tokenizer(sample_texts(self.work, self.parts), cfg)
                save_tokenizer(tokenizer, target)
        tokenizer = load_tokenizer(target, cfg.eos_token)
        write_tokenizer_config(self.output, tokenizer, cfg.eos_token)
        vocab = tokenizer.get_vocab_size()
        return {
            "file": target.name,
            "source": f"loaded from {cfg.path}" if cfg.path else "trained",
            "sha256": file_sha256(target),
            "vocab_size": vocab,
            "eos_token": cfg.eos_token,
            "eos_id": tokenizer.token_to_id(cfg.eos_token),
            "dtype": np.dtype(token_dtype(vocab)).name,
        }

    def tokenize(self, clean: list[dict]) -> list[dict]:
        with self._stage("tokenize", "tokenise", len(self.parts), "tokens") as meter:
            todo = [p for p in self.parts if not self.work.part_file("tokens", p, ".json").exists()]
            # Few large parts and many CPUs: give each task several encoding threads.
            threads = max(
                1, min(self.cluster.cpus // max(len(todo), 1), self.cluster.largest_node_cpus)
            )
            calls = [
                (
                    p,
                    self.data,
                    self.tokenizer_cfg,
                    str(self.work.root),
                    self.exact_buckets,
                    self.near_buckets,
                    passes(self.data),
                    threads,
                )
                for p in self.parts
            ]
            # Largest first, so that the stage does not end waiting on one big part.
            order = sorted(range(len(calls)), key=lambda i: -clean[i]["kept_bytes"])
            results: dict[int, dict] = {}

            def collect(result: dict) -> None:
                results[result["part"]] = result
                meter.advance(1, result["tokens"])

            done = [self.work.part_file("tokens", self.parts[i], ".json") for i in order]
            self._map(tokenize_part, [calls[i] for i in order], done, collect, num_cpus=threads)
        return [results[p.index] for p in self.parts]

    def near_dedup(self) -> dict[str, int]:
        buckets = self.near_buckets
        if not buckets:
            return {"candidate_pairs": 0, "similar_pairs": 0, "removed": 0, "rounds": 0}
        root = str(self.work.root)
        with self._stage("near_dedup", "near dedup", 2 * buckets, "pairs") as meter:
            bands = [
                (len(self.parts), root, b, self.data.dedup.near, buckets) for b in range(buckets)
            ]
            self._buckets(near_band_task, bands, "band", lambda r: meter.advance(1))
            counts = Counter()

            def count_pairs(result: dict) -> None:
                counts.update(
                    candidate_pairs=result["candidate_pairs"], similar_pairs=result["similar_pairs"]
                )
                meter.advance(1, result["candidate_pairs"])

            pairs = [(buckets, root, b, buckets) for b in range(buckets)]
            self._buckets(near_pair_task, pairs, "pairs", count_pairs)
            rounds = self._connected_components(buckets, meter)
            removed = Counter()
            meter.extend(buckets)
            finalize = [(root, rounds, b, buckets) for b in range(buckets)]
            self._buckets(
                near_finalize,
                finalize,
                "drop",
                lambda r: (removed.update(removed=r["removed"]), meter.advance(1)),
            )
        return {**counts, "removed": removed["removed"], "rounds": rounds}

    def _connected_components(self, buckets: int, meter: Meter) -> int:
        def run(step: Callable[..., dict], calls: list[tuple], done: list[Path]) -> list[dict]:
            meter.extend(len(calls))
            results: list[dict] = []
            self._map(step, calls, done, results.append)
            meter.advance(len(results))
            return results

        return connected_components(str(self.work.root), buckets, run)

    def _buckets(
        self, function: Callable, calls: list[tuple], name: str, on_result: Callable[[dict], Any]
    ) -> None:
        done = [self.work.bucket_file("near", name, call[2], ".json") for call in calls]
        self._map(function, calls, done, on_result)

    def write_shards(self, tokenized: list[dict], dtype: str) -> list[dict]:
        jobs = list(_shard_jobs(tokenized, self.data.shards.max_tokens))
        shards: dict[str, dict] = {}
        with self._stage("shards", "write shards", len(jobs), "tokens") as meter:

            def collect(result: dict) -> None:
                shards[result["name"]] = result
                meter.advance(1, result["tokens"])

            calls = [
                (str(self.work.root), str(self.output), name, split, dtype, token_range, segments)
                for name, split, token_range, segments in jobs
            ]
            done = [self.work.file("shards", f"{name}.json") for name, *_ in jobs]
            self._map(write_shard, calls, done, collect)
        return [shards[name] for name, *_ in jobs if shards[name]["documents"]]

    def write_removed_sample(self, line_offsets: dict[tuple[int, int], int]) -> dict[str, int]:
        """Merge the parts' candidates in a tree of tasks (at most `FAN_IN` files each), then
        write OUTPUT/removed/KIND.jsonl from the last level."""
        limit = self.data.removed_sample
        if not limit:
            return {}
        inputs = [str(f) for p in self.parts for f in part_candidates(self.work, p.index)]
        level = 0
        with self._stage("removed_sample", "removed sample", 1, "candidates") as meter:
            while len(inputs) > 1 or level == 0:
                groups = [inputs[i : i + FAN_IN] for i in range(0, len(inputs), FAN_IN)]
                outputs = [
                    str(self.work.file("removed", f"level{level:02d}_{i:06d}.parquet"))
                    for i in range(len(groups))
                ]
                meter.extend(len(groups))
                done = [Path(output + ".json") for output in outputs]
                self._map(
                    merge_candidates,
                    [(group, out, limit) for group, out in zip(groups, outputs, strict=True)],
                    done,
                    lambda result: meter.advance(1, result["rows"]),
                )
                inputs, level = outputs, level + 1
            written: dict[str, int] = {}
            run_tasks(
                write_removed,
                [(str(self.work.root), str(self.output), inputs[0], line_offsets)],
                written.update,
                window=1,
            )
            meter.advance(1)
        return dict(sorted(written.items()))

    def write_quarantine(
        self,
        clean: list[dict],
        line_offsets: dict[tuple[int, int], int],
        empty_files: dict[tuple[int, int], str],
    ) -> list[dict]:
        """Join the quarantines; return the clean counts with the empty files found across
        spans counted as malformed."""
        clean = [dict(c) for c in clean]
        for part, _ in empty_files:
            clean[part]["in"] += 1
            clean[part]["malformed"] += 1
        spans = [(p.index, len(clean[p.index]["spans"])) for p in self.parts]
        with self._stage("quarantine", "quarantine", 1, "records") as meter:
            run_tasks(
                write_quarantine,
                [(str(self.work.root), str(self.output), spans, line_offsets, empty_files)],
                lambda written: meter.advance(1, written),
                window=1,
            )
        return clean


def _shard_jobs(
    tokenized: list[dict], max_tokens: int
) -> Iterator[tuple[str, str, tuple[int, int], list[Segment]]]:
    """(name, split, token range, segments) of every shard: segment (part, pass) of a split
    starts where the one before ends, passes outermost; shard k covers tokens [k M, (k+1) M)."""
    for split in SPLITS:
        segments: list[Segment] = []
        ends: list[int] = []
        position = 0
        for pass_index in range(len(tokenized[0]["streams"][split]) if tokenized else 0):
            for result in tokenized:
                tokens = result["streams"][split][pass_index][1]
                if tokens:
                    segments.append(Segment(result["part"], pass_index, position))
                    position += tokens
                    ends.append(position)
        starts = np.array([s.start for s in segments], dtype=np.int64)
        stops = np.array(ends, dtype=np.int64)
        for k in range(-(-position // max_tokens)):
            low, high = k * max_tokens, (k + 1) * max_tokens
            first = int(np.searchsorted(stops, low, side="right"))
            last = int(np.searchsorted(starts, high, side="left"))
            yield f"{split}_{k:05d}", split, (low, high), segments[first:last]


def _span_fixups(
    parts: list[Part], clean: list[dict]
) -> tuple[dict[tuple[int, int], int], dict[tuple[int, int], str]]:
    """For spans of files read in pieces: the lines of the file before each span, and, after
    the last span of a file in which no span found a record, that file (it is empty)."""
    offsets: dict[tuple[int, int], int] = {}
    empty: dict[tuple[int, int], str] = {}
    lines: Counter[str] = Counter()
    records: Counter[str] = Counter()
    for part in parts:
        for index, (piece, read) in enumerate(
            zip(part.pieces, clean[part.index]["spans"], strict=False)
        ):
            if piece.span is None:
                continue
            offsets[(part.index, index)] = lines[piece.file]
            lines[piece.file] += read["lines"]
            records[piece.file] += read["records"]
            if piece.span[1] is None and records[piece.file] == 0:
                empty[(part.index, index)] = piece.file
    return {key: value for key, value in offsets.items() if value}, empty
