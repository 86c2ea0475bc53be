"""The training loop: data, engine, checkpoints and tracking put together, one step at a time.

Every rank runs `train(run_dir)`. The run directory holds the resolved `config.yaml` (written
by `kiln train` before any process starts); the loop resumes from the latest checkpoint there,
evaluates every `eval.interval` steps (`validation.py`), saves every `checkpoint.interval`
steps, at the end and when SIGTERM or SIGINT arrives, stops when the run diverges
(`divergence.py`), and logs every step to `metrics.jsonl`, TensorBoard, W&B and MLflow (those
configured) from rank 0, with system metrics and alerts (`alerts.py`).
"""

from __future__ import annotations

import contextlib
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.errors import KilnError
from pretrain.config import KilnConfig, RunConfig, dump_config, load_config, resolve_run
from pretrain.data import (
    DataDirError,
    build_train_samples,
    build_validation_samples,
    configured_sources,
)
from pretrain.data.masking import Masker, masked_micro_batch
from pretrain.data.prefetch import BatchPrefetcher
from pretrain.data.sampling import micro_batch, rank_batch_indices
from pretrain.data.spans import (
    SpanCorruptor,
    sample_length,
    span_micro_batch,
)
from pretrain.data.stream import read_manifest
from pretrain.model.sizing import count_parameters, human_count
from pretrain.model.transformer import attention_backend
from pretrain.parallel.layout import Layout, init_distributed, pick_device, setup_parallel

from . import fault_injection
from .alerts import RunWatch
from .checkpoint import CheckpointManager, TrainerState, describe_rank_layout
from .divergence import DivergenceWatch
from .engine import DTYPES, Batch, StepResult, TrainEngine, compile_enabled
from .flops import flops_per_token, mfu, peak_flops
from .schedule import lr_at
from .state_pieces import StateLayout
from .tracking import MetricsLog, MlflowSink, TensorBoardSink, TrackingError, WandbTracker
from .validation import Validator, val_metrics

EXIT_OK, EXIT_DIVERGED = 0, 3  # a user mistake: KilnError.exit_code (2)


class RunError(KilnError):
    """A user mistake found only where the ranks run (the data, the device)."""


class TrainingData:
    """This data-parallel rank's micro-batches of any step, training or validation."""

    def __init__(self, cfg: RunConfig, data_rank: int) -> None:
        sources = configured_sources(cfg.data)
        for path, _ in sources:
            vocab = read_manifest(path)["tokenizer"]["vocab_size"]
            if vocab > cfg.model.vocab_size:
                raise DataDirError(
                    f"{path}: its tokenizer has {vocab} tokens but model.vocab_size is "
                    f"{cfg.model.vocab_size}"
                )
        self.sources = sources
        length = sample_length(cfg)
        self.train = build_train_samples(sources, length, cfg.train.seed)
        # data prepared without a validation split trains when validation is off
        self.valid = (
            build_validation_samples(sources, length, cfg.train.seed) if cfg.eval.interval else None
        )
        self.cfg, self.data_rank = cfg, data_rank
        # the tokenizer is the same for every source (checked)
        tokenizer_file = Path(sources[0][0]) / "tokenizer.json"
        self.masker = self.corruptor = None
        if cfg.model.arch == "bert":
            self.masker = Masker.for_tokenizer(tokenizer_file, cfg.masking, cfg.train.seed)
        if cfg.model.encoder_decoder:
            self.corruptor = SpanCorruptor.for_tokenizer(
                tokenizer_file, cfg.spans, cfg.tokenizer.eos_token, cfg.train.seed
            )

    def batches(self, first_sample: int, split: str = "train") -> list[Batch]:
        """The global batch of samples [first_sample, first_sample + global batch): this
        rank's micro-batches of it. A run's position is its consumed sample count, so it
        carries over a resume under another layout, or another global batch size."""
        train, par = self.cfg.train, self.cfg.parallel
        samples = self.train if split == "train" else self.valid
        out = []
        for micro in range(train.gradient_accumulation_steps):
            indices = rank_batch_indices(
                first_sample,
                micro,
                train.micro_batch_size,
                self.data_rank,
                par.data,
                train.gradient_accumulation_steps,
            )
            if self.masker is not None:
                arrays = masked_micro_batch(samples, indices, self.masker, split)
            elif self.corruptor is not None:
                arrays = span_micro_batch(samples, indices, self.corruptor, split)
            else:
                arrays = micro_batch(samples, indices)
            out.append(tuple(torch.from_numpy(array) for array in arrays))
        return out


@dataclass
class StopRequest:
    """Set by SIGTERM/SIGINT; the loop saves a checkpoint and exits at the next step end."""

    signal_name: str | None = None
    previous: dict = field(default_factory=dict)

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank was asked to stop (ranks may see it apart)."""
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Reporter:
    """Rank 0's outputs: metrics.jsonl, TensorBoard, W&B, MLflow, the progress bar and the log
    lines. An MLflow server that cannot be reached or refuses the run at the start ends this
    rank with one line and exit code 2 (the launcher stops the others); one that fails later
    is left for the rest of the session, with one line, while training goes on."""

    def __init__(self, cfg: KilnConfig, run_dir: Path, start_step: int, active: bool) -> None:
        self.cfg, self.active, self.run_dir = cfg, active, run_dir
        self.last_step = start_step
        self.metrics = MetricsLog(run_dir / "metrics.jsonl") if active else None
        self.wandb = self.tensorboard = self.mlflow = None
        self.bar = None
        if not active:
            return
        self.metrics.truncate_after(start_step)
        config_dict = cfg.model_dump(mode="json")
        self.mlflow = MlflowSink.start(run_dir, cfg.logging.mlflow, config_dict)
        if cfg.logging.tensorboard:
            self.tensorboard = TensorBoardSink(run_dir / "tensorboard", start_step)
        self.wandb = WandbTracker.start(run_dir, cfg.logging.wandb, config_dict, None)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.steps, initial=start_step, unit="step", leave=True)
        if self.mlflow is not None:
            how = "resumed" if self.mlflow.resumed else "started"
            self.say(f"mlflow: {how} run {self.mlflow.run_id}: {self.mlflow.url}")

    def say(self, text: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def log(self, step: int, values: dict) -> None:
        if not self.active:
            return
        self.last_step = max(self.last_step, step)
        self.metrics.log(values, step)
        self.wandb.log(values, step)
        if self.tensorboard is not None:
            self.tensorboard.log(values, step)
        if self.mlflow is not None:
            try:
                self.mlflow.log(values, step)
            except TrackingError as error:
                self.mlflow = None
                self.say(
                    f"mlflow: {error}; no more MLflow logging in this session (metrics.jsonl "
                    "has every step; a resume sends the steps the MLflow run lacks)"
                )

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")

    def close(self) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
        if self.mlflow is not None:
            try:
                self.mlflow.close(self.run_dir, finished=self.last_step >= self.cfg.train.steps)
            except TrackingError as error:
                self.say(f"mlflow: {error}")
        if self.tensorboard is not None:
            self.tensorboard.close()
        self.wandb.finish()


def memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def system_metrics(device: torch.device) -> dict[str, float]:
    """This process's resident host memory now, and on a GPU its utilisation (when NVML
    answers) and the memory the caching allocator holds."""
    import psutil

    out = {"host_rss_mib": psutil.Process().memory_info().rss / 2**20}
    if device.type == "cuda":
        out["gpu_memory_reserved_mib"] = torch.cuda.memory_reserved(device) / 2**20
        # needs NVML (pynvml); absent, the metric is left out rather than guessed
        with contextlib.suppress(ModuleNotFoundError, RuntimeError):
            out["gpu_utilization"] = float(torch.cuda.utilization(device))
    return out


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        torch.manual_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed % 2**32)
        device = pick_device()
        if device.type == "cpu" and cfg.train.precision == "fp16":
            if not fault_injection.fp16_on_cpu():
                raise RunError(
                    "train.precision = fp16: DeepSpeed has no fp16 on CPU; use bf16 or fp32"
                )
            fault_injection.allow_fp16_on_cpu()
        init_distributed(device)
        layout = Layout(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.data)
        self.parallel = setup_parallel(layout, device)
        self.data = TrainingData(cfg, self.parallel.coordinates.data)
        self.prefetch = BatchPrefetcher(self.data.batches, pin=device.type == "cuda")
        self.layout = state_layout(cfg, self.parallel)
        self.checkpoints = CheckpointManager(
            run_dir, cfg.checkpoint.keep, cfg.checkpoint.interval, cfg.checkpoint.async_save
        )
        self.resume = self.checkpoints.resume(self.layout)
        resume = self.resume
        # A resume loads every weight, so the random initialisation is not drawn first.
        self.engine = TrainEngine(
            cfg,
            self.parallel,
            initialize=resume is None,
            prepare_module=None
            if resume is None
            else lambda module: self.checkpoints.load_weights(module, resume, self.layout),
        )
        self.validator = Validator(
            cfg.eval, cfg.train.global_batch_size, self.data.batches, self.engine.evaluate
        )
        self.optimizer_restored = False
        self.config_yaml = dump_config(cfg)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
        self.last_step_s = 0.0  # recorded with each save: a stop needs a step and a save
        self.flops_per_token = flops_per_token(
            cfg.model, cfg.train.seq_length, layout.tensor, cfg.spans.decoder_length
        )
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        self.peak = peak_flops(device_name, cfg.train.precision)

    def run(self) -> int:
        cfg, parallel, resume = self.cfg, self.parallel, self.resume
        if resume is None:
            state = TrainerState()
        else:
            state, self.optimizer_restored = self.checkpoints.restore(
                self.engine.module, self.engine.engine, resume, self.layout
            )
        report = Reporter(cfg, self.run_dir, state.step, parallel.is_logging_rank)
        self._introduce(report, state)
        stop = StopRequest()
        stop.install()
        try:
            return self._loop(state, report, stop)
        finally:
            stop.uninstall()
            self.checkpoints.close()
            self.prefetch.close()
            report.close()

    def _introduce(self, report: Reporter, state: TrainerState) -> None:
        cfg, layout = self.cfg, self.parallel.layout
        params = count_parameters(cfg.model)
        report.say(
            f"kiln train: {cfg.model.arch} {human_count(params)} parameters | "
            f"TP {layout.tensor} x PP {layout.pipeline} x DP {layout.data} "
            f"(ZeRO {cfg.parallel.zero_stage}, {cfg.train.precision}) on "
            f"{self.parallel.device.type} | {cfg.train.global_batch_size} x "
            f"{cfg.train.seq_length} tokens per step | {cfg.train.steps} steps"
        )
        backend = attention_backend(
            cfg.model,
            layout.tensor,
            cfg.train.seq_length,
            DTYPES[cfg.train.precision],
            self.parallel.device,
        )
        compiled = "compiled" if compile_enabled(cfg, self.parallel.device) else "eager"
        report.say(
            f"attention: scaled_dot_product_attention runs the {backend} kernel | block "
            f"compute {compiled} | recompute {cfg.train.activation_checkpointing}"
        )
        resume = self.resume
        if resume is None:
            return
        report.say(f"resumed from {resume.checkpoint} at step {state.step}")
        if resume.reshard:
            adam = (
                "with its Adam state"
                if self.optimizer_restored
                else "Adam starts afresh (the checkpoint holds no Adam state)"
            )
            source = resume.written_by.get("source") or describe_rank_layout(resume.written_by)
            report.say(
                f"resharded from {source} to {describe_rank_layout(self.layout.describe())}, {adam}"
            )

    def _loop(self, state: TrainerState, report: Reporter, stop: StopRequest) -> int:
        """Train to `train.steps`, or until a stop signal or divergence; the exit code."""
        cfg = self.cfg
        alerts = RunWatch(cfg.logging.alerts)
        divergence = DivergenceWatch(cfg.train.max_skipped_steps)
        self.validator.before_training(state.step, report)
        while state.step < cfg.train.steps:
            result, values = self._train_step(state, alerts, report)
            line = divergence.update(state, result)
            if line is not None:
                report.say(line)
            if divergence.must_stop:
                report.log(state.step, values)
                self.checkpoints.wait()
                report.say(divergence.stop_message(self.checkpoints.latest()))
                return EXIT_DIVERGED
            if self.validator.due(state.step):
                values.update(val_metrics(self.validator.validate()))
            self._record(state.step, result.loss, values, report)
            stopping = stop.agreed(self.parallel.device)
            if self.checkpoints.due(state.step, stopping):
                saving = time.perf_counter()
                self.save(state, report, wait=stopping)
                # the time the loop stood still for it (async: the copy to host memory)
                report.log(state.step, {"checkpoint_save_s": time.perf_counter() - saving})
            if stopping:
                self.checkpoints.wait()
                report.say(
                    f"kiln train: {stop.signal_name or 'stop requested'}: saved step "
                    f"{state.step}; run the same command again to resume"
                )
                return EXIT_OK
        return self._finish(state, report)

    def _train_step(
        self, state: TrainerState, alerts: RunWatch, report: Reporter
    ) -> tuple[StepResult, dict]:
        """Take the next step, advancing `state`; the step's result and metrics (its alerts
        flagged in them and said)."""
        cfg = self.cfg
        started = time.perf_counter()
        lr = lr_at(state.step, cfg.optim, cfg.train.steps)
        following = state.consumed_samples + cfg.train.global_batch_size
        last = state.step + 1 >= cfg.train.steps
        batches = self.prefetch.get(state.consumed_samples, None if last else following)
        waited = time.perf_counter() - started
        self.engine.test_nan_loss = fault_injection.nan_loss(state.step + 1)
        result = self.engine.train_step(batches, lr)
        elapsed = self.last_step_s = time.perf_counter() - started
        state.step += 1
        state.consumed_samples += cfg.train.global_batch_size
        values = self._step_metrics(result, lr, elapsed)
        values["data_wait_share"] = waited / elapsed
        for name, why in alerts.update(result.loss, values["tokens_per_s"], result.skipped).items():
            values[f"alert_{name}"] = 1
            report.say(f"step {state.step}: alert {name}: {why}")
        return result, values

    def _record(self, step: int, loss: float, values: dict, report: Reporter) -> None:
        report.log(step, values)
        report.progress(step, loss, values["tokens_per_s"])
        if step % self.cfg.logging.interval == 0 or "val_loss" in values:
            report.say(format_line(step, self.cfg.train.steps, values))

    def _finish(self, state: TrainerState, report: Reporter) -> int:
        """After the last step: the final save and validation, and the run's summary."""
        if self.checkpoints.due(state.step, stopping=True):
            self.save(state, report, wait=True)
        self.checkpoints.wait()
        self.validator.after_training(state.step, report)
        report.say(f"kiln train: done, {state.step} steps; checkpoint {self.checkpoints.latest()}")
        return EXIT_OK

    def save(self, state: TrainerState, report: Reporter, wait: bool = False) -> None:
        path = self.checkpoints.save(
            self.engine.module,
            self.engine.engine,
            self.layout,
            state,
            self.config_yaml,
            step_seconds=self.last_step_s,
            wait=wait,
        )
        done = wait or not self.cfg.checkpoint.async_save
        report.say(f"step {state.step}: {'saved' if done else 'saving'} {path}")

    def _step_metrics(self, result, lr: float, elapsed: float) -> dict:
        tokens_per_s = self.tokens_per_step / elapsed
        world = self.parallel.layout.world_size
        tflops = self.flops_per_token * tokens_per_s / world / 1e12
        return {
            "loss": result.loss,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / world,
            "tflops_per_device": tflops,
            "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak, world),
            "step_time_s": elapsed,
            "memory_mib": memory_mib(self.parallel.device),
            **system_metrics(self.parallel.device),
            "skipped": result.skipped,
            **(
                {"overflow": result.overflow, "loss_scale": result.loss_scale}
                if result.loss_scale is not None
                else {}
            ),
        }


def state_layout(cfg: RunConfig, parallel) -> StateLayout:
    """What checkpoint code needs to know about this rank's place in the run."""
    coordinates = parallel.coordinates
    return StateLayout(
        tensor=cfg.parallel.tensor,
        pipeline=cfg.parallel.pipeline,
        data=cfg.parallel.data,
        zero_stage=cfg.parallel.zero_stage,
        precision=cfg.train.precision,
        num_layers=cfg.model.num_layers,
        vocab_size=cfg.model.vocab_size,
        tensor_rank=coordinates.tensor,
        stage=coordinates.pipe,
        data_rank=coordinates.data,
    )


def format_line(step: int, total: int, values: dict) -> str:
    parts = [f"step {step}/{total}", f"loss {values['loss']:.4f}", f"lr {values['lr']:.2e}"]
    if values.get("grad_norm") is not None:
        parts.append(f"grad_norm {values['grad_norm']:.3f}")
    parts.append(f"{values['tokens_per_s']:,.0f} tok/s")
    if values.get("mfu") is not None:
        parts.append(f"MFU {values['mfu']:.1%}")
    if "val_loss" in values:
        parts.append(f"val_loss {values['val_loss']:.4f}")
    return " | ".join(parts)


def train(run_dir: Path) -> int:
    import os

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = resolve_run(load_config(run_dir / "config.yaml", world_size=world_size))
    if cfg.parallel.tensor > 1:  # before CUDA starts; the schedulers' scripts set it too
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    trainer = Trainer(cfg, run_dir)  # a user mistake is a KilnError, told by the entry point
    try:
        return trainer.run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
