"""The typed configuration of a Kiln run: one pydantic model per section, one root model.

Field-level rules (types, signs, choices) live on the fields; rules that tie fields of one
section together live on that section; rules across sections and the world size live on
`KilnConfig`. `KilnConfig.model_validate(tree, context={"world_size": N})` checks them all
and fills in the derived values (data-parallel size, gradient accumulation, defaults that
depend on the architecture), so a validated configuration is a resolved one. Validators named
`_resolve_*` fill values in, those named `_check_*` only check. The types at the end
(`RunConfig`, `ResolvedModel`, ...) say it: the same sections with the resolved fields plain;
`resolve_run` gives the training code its `RunConfig`.
"""

from __future__ import annotations

import math
from typing import Literal, TypeGuard

from pydantic import (
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from data_pipeline.config import DataConfig, ResolvedTokenizer, TokenizerConfig
from data_pipeline.config_base import ConfigSection, rule_violation

DEFAULT_VOCAB_SIZE = 32000
MLFLOW_SCHEMES = ("http://", "https://", "sqlite:///")


class ModelConfig(ConfigSection):
    """A transformer. Decoders: `llama` (RMSNorm, RoPE, SwiGLU, GQA, no biases) and `gpt`
    (LayerNorm, learned positions, GELU, biases). Encoder: `bert` (pre-LayerNorm as Megatron's
    BERT, bidirectional attention, GELU, biases, a masked-LM head tied to the embedding).
    Encoder-decoder: `t5` (T5: RMSNorm, relative position buckets, unscaled attention, no
    biases; v1.1's gated-GELU and untied head by default, v1.0's ReLU and tied head if set)."""

    arch: Literal["llama", "gpt", "bert", "t5"] = "llama"
    num_layers: PositiveInt = Field(description="Layers (t5: the encoder's).")
    decoder_layers: PositiveInt | None = Field(
        default=None, description="t5 only: the decoder's layers; defaults to num_layers."
    )
    hidden_size: PositiveInt
    num_heads: PositiveInt
    num_kv_heads: PositiveInt | None = Field(default=None, description="Defaults to num_heads.")
    ffn_hidden_size: PositiveInt | None = Field(
        default=None, description="Defaults to 4h (gpt) or 8h/3 rounded up to 256 (llama)."
    )
    vocab_size: PositiveInt
    max_seq_length: PositiveInt
    positions: Literal["learned", "rotary", "relative"] | None = Field(
        default=None,
        description="Position embedding; defaults: llama rotary, gpt/bert learned, t5 relative "
        "(T5's bucketed bias per head, the only kind t5 takes).",
    )
    relative_buckets: PositiveInt = Field(
        default=32, description="t5: relative position buckets (half per direction in the encoder)."
    )
    relative_max_distance: PositiveInt = Field(
        default=128, description="t5: distances from here on share the last bucket."
    )
    feed_forward: Literal["gated-gelu", "relu"] | None = Field(
        default=None,
        description="t5 only: T5 v1.1's gated-GELU (the default) or T5 v1.0's ReLU; llama is "
        "SwiGLU, gpt and bert GELU.",
    )
    rope_base: PositiveFloat = 10000.0
    tie_embeddings: bool | None = Field(
        default=None,
        description="Defaults: gpt and bert yes (bert must), llama and t5 no (a tied t5 scales "
        "the decoder's output by hidden_size**-0.5, as T5 v1.0).",
    )
    norm_eps: PositiveFloat = 1e-5
    init_std: PositiveFloat = 0.02

    @model_validator(mode="after")
    def _resolve_defaults(self) -> ModelConfig:
        """The defaults that depend on the architecture; a t5's decoder and MLP too."""
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = default_ffn_hidden_size(self.arch, self.hidden_size)
        if self.tie_embeddings is None:
            self.tie_embeddings = self.arch in ("gpt", "bert")
        if self.positions is None:
            self.positions = {"llama": "rotary", "t5": "relative"}.get(self.arch, "learned")
        if self.arch == "t5":
            self.decoder_layers = self.decoder_layers or self.num_layers
            self.feed_forward = self.feed_forward or "gated-gelu"
        return self

    @model_validator(mode="after")
    def _check_encoder_decoder(self) -> ModelConfig:
        """t5's settings on t5 only; t5's own rules."""
        if self.arch != "t5":
            for key in ("decoder_layers", "feed_forward"):
                if getattr(self, key) is not None:
                    raise rule_violation(key, getattr(self, key), "applies to model.arch t5 only")
            if self.positions == "relative":
                raise rule_violation(
                    "positions", "relative", "relative position buckets are t5's only"
                )
            return self
        if self.positions != "relative":
            raise rule_violation(
                "positions", self.positions, "t5 takes relative position buckets only"
            )
        if self.num_kv_heads != self.num_heads:
            raise rule_violation(
                "num_kv_heads", self.num_kv_heads, "t5 has no grouped-query attention"
            )
        if self.relative_buckets < 2:
            raise rule_violation(
                "relative_buckets", self.relative_buckets, "t5 needs at least 2 (one per side)"
            )
        return self

    @model_validator(mode="after")
    def _check_shape(self) -> ModelConfig:
        """bert's tied decoder; heads that split the hidden size and share the KV heads."""
        if self.arch == "bert" and not self.tie_embeddings:
            raise rule_violation(
                "tie_embeddings",
                False,
                "a bert model's masked-LM decoder is its embedding matrix (as in BERT)",
            )
        if self.hidden_size % self.num_heads:
            raise rule_violation(
                "hidden_size",
                self.hidden_size,
                f"must be divisible by model.num_heads ({self.num_heads})",
            )
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise rule_violation(
                "num_kv_heads",
                self.num_kv_heads,
                f"must divide model.num_heads ({self.num_heads})",
            )
        if self.positions == "rotary" and (self.hidden_size // self.num_heads) % 2:
            raise rule_violation(
                "hidden_size",
                self.hidden_size,
                "rotary embeddings need an even head size (hidden_size / num_heads)",
            )
        return self

    @property
    def causal(self) -> bool:
        """Decoders attend to earlier tokens only; an encoder to every token (t5: the
        encoder; its decoder is causal)."""
        return self.arch in ("llama", "gpt")

    @property
    def biases(self) -> bool:
        """gpt and bert have biases in every linear layer and norm; llama and t5 none."""
        return self.arch in ("gpt", "bert")

    @property
    def encoder_decoder(self) -> bool:
        return self.arch == "t5"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def default_ffn_hidden_size(arch: str, hidden_size: int) -> int:
    """4h for GPT, BERT and T5; for Llama, SwiGLU's 2/3 of 4h rounded up to a multiple of 256."""
    if arch != "llama":
        return 4 * hidden_size
    return 256 * math.ceil(int(8 * hidden_size / 3) / 256)


class ParallelConfig(ConfigSection):
    """Rank layout: tensor-parallel rank varies fastest, then data-parallel, then stage."""

    tensor: PositiveInt = 1
    pipeline: PositiveInt = 1
    data: PositiveInt | None = Field(
        default=None, description="Data-parallel size; derived from the world size when unset."
    )
    zero_stage: int | None = Field(
        default=None,
        ge=0,
        le=3,
        description="DeepSpeed ZeRO stage; unset: the recommended one (`zero_stage_reason`).",
    )
    pipeline_partition: Literal["parameters", "uniform"] = "parameters"

    @model_validator(mode="after")
    def _zero_with_pipeline(self) -> ParallelConfig:
        if self.zero_stage is not None and self.pipeline > 1 and self.zero_stage >= 2:
            raise rule_violation(
                "zero_stage",
                self.zero_stage,
                f"ZeRO stage 2 and 3 do not work with pipeline parallelism "
                f"(parallel.pipeline = {self.pipeline}); use stage 0 or 1",
            )
        return self


def recommended_zero_stage(precision: str, pipeline: int) -> int:
    """bf16/fp16 without pipeline parallelism: 2; otherwise 1 (see `zero_stage_reason`)."""
    return 2 if precision != "fp32" and pipeline == 1 else 1


def zero_stage_reason(precision: str, pipeline: int) -> str:
    """Why `recommended_zero_stage` recommends its stage, for `kiln config show`."""
    if pipeline > 1:
        return (
            "DeepSpeed's pipeline engine supports ZeRO 0 and 1 only; stage 1 partitions the "
            "optimizer state across data-parallel ranks"
        )
    if precision == "fp32":
        return (
            "it partitions Adam's state across data-parallel ranks at no extra communication "
            "(stage 0 keeps it whole on every rank)"
        )
    stage_one = (
        "DeepSpeed's stage 1 in bf16 (with fp32 gradient accumulation) is its BF16_Optimizer, "
        "with an unpartitioned fp32 gradient buffer and no overlap; "
        if precision == "bf16"
        else ""
    )
    return (
        f"{stage_one}stage 2 partitions the fp32 gradients too and reduce-scatters them in "
        "buckets while backward runs (overlap_comm) into one contiguous buffer "
        "(contiguous_gradients), for the same traffic as stage 1"
    )


class TrainConfig(ConfigSection):
    micro_batch_size: PositiveInt = 1
    global_batch_size: PositiveInt | None = Field(
        default=None, description="Sequences per optimizer step; defaults to micro x data-parallel."
    )
    gradient_accumulation_steps: PositiveInt | None = Field(
        default=None, description="Derived from the global batch when unset."
    )
    seq_length: PositiveInt | None = Field(
        default=None, description="Defaults to model.max_seq_length."
    )
    steps: PositiveInt = 1000
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    seed: NonNegativeInt = 1234
    activation_checkpointing: Literal["none", "selective", "full"] = Field(
        default="none",
        description="Recompute in the backward pass: `full` each whole block (+33% compute), "
        "`selective` only the attention core and the MLP activation (little compute, the "
        "largest activations); `true`/`false` mean full/none.",
    )

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _recompute_from_bool(cls, value):
        on_off = {True: "full", False: "none", "true": "full", "false": "none"}
        if isinstance(value, bool | str) and value in on_off:  # the earlier on/off form
            return on_off[value]
        return value

    compile: bool | None = Field(
        default=None,
        description="torch.compile each block's compute (norms, RoPE, attention, MLP "
        "activation); unset: on for GPUs, off on CPU.",
    )
    max_skipped_steps: PositiveInt = Field(
        default=10,
        description="Stop after this many steps in a row skipped for a NaN/Inf loss or "
        "gradient (fp16 loss-scale overflows count only at the minimum scale).",
    )
    initial_loss_scale_power: int = Field(
        default=16,
        ge=0,
        le=32,
        description="fp16: the dynamic loss scale starts at 2**this (DeepSpeed's "
        "initial_scale_power) and is halved as overflows occur; other precisions ignore it.",
    )


class OptimConfig(ConfigSection):
    """AdamW with linear warmup, then a cosine, linear or constant schedule down to min_lr."""

    lr: PositiveFloat = 3e-4
    min_lr: NonNegativeFloat = 3e-5
    warmup_steps: NonNegativeInt = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: NonNegativeFloat = 0.1
    grad_clip: NonNegativeFloat = Field(default=1.0, description="0 disables clipping.")
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    beta2: float = Field(default=0.95, ge=0.0, lt=1.0)
    eps: PositiveFloat = 1e-8

    @model_validator(mode="after")
    def _min_below_peak(self) -> OptimConfig:
        if self.min_lr > self.lr:
            raise rule_violation("min_lr", self.min_lr, f"must not exceed optim.lr ({self.lr})")
        return self


class MaskingConfig(ConfigSection):
    """Masked-LM objective of `model.arch: bert` (BERT's recipe): `probability` of the tokens
    are chosen (never a special token), of which `mask_fraction` become `token`,
    `random_fraction` a random non-special token and the rest stay; the loss is over the
    chosen ones. Drawn per (train.seed, sample index): a resume masks the same way."""

    probability: float = Field(default=0.15, gt=0.0, lt=1.0)
    mask_fraction: float = Field(default=0.8, ge=0.0, le=1.0)
    random_fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    token: str = Field(default="<mask>", description="The mask token; the tokenizer must have it.")

    @model_validator(mode="after")
    def _fractions(self) -> MaskingConfig:
        if self.mask_fraction + self.random_fraction > 1.0:
            raise rule_violation(
                "random_fraction",
                self.random_fraction,
                f"plus masking.mask_fraction ({self.mask_fraction}) must not exceed 1",
            )
        return self


class SpanConfig(ConfigSection):
    """Span corruption, the objective of `model.arch: t5` (T5, Raffel et al. 2020): of each
    sample's tokens `noise_density` are corrupted, in spans of `mean_span_length` on average;
    the encoder reads the sample with each span replaced by the next sentinel token and an EOS
    at the end, the decoder writes the spans, each after its sentinel, then EOS. Drawn per
    (train.seed, sample index): a resume corrupts the same way. `train.seq_length` is the
    encoder's length; the sample length and the decoder's length follow from it as T5's
    `compute_input_and_target_lengths` computes them."""

    noise_density: float = Field(default=0.15, gt=0.0, lt=1.0)
    mean_span_length: float = Field(default=3.0, ge=1.0)
    sentinels: PositiveInt = Field(default=100, description="Sentinel tokens in the tokenizer.")
    sentinel_template: str = Field(
        default="<extra_id_{}>", description="The i-th sentinel's text (Hugging Face's T5)."
    )
    start_token: str = Field(
        default="<|pad|>", description="The decoder's first input (T5 starts from its pad token)."
    )
    sample_tokens: PositiveInt | None = Field(
        default=None, description="Derived: tokens of a packed sample before corruption."
    )
    decoder_length: PositiveInt | None = Field(
        default=None, description="Derived: the decoder's length (spans, sentinels and EOS)."
    )

    @field_validator("sentinel_template")
    @classmethod
    def _template_has_slot(cls, value: str) -> str:
        if value.count("{}") != 1:
            raise ValueError("must contain one {} for the sentinel's number")
        return value

    def sentinel_tokens(self) -> list[str]:
        return [self.sentinel_template.format(i) for i in range(self.sentinels)]


def span_lengths(
    encoder_length: int, noise_density: float, mean_span_length: float
) -> tuple[int, int, int]:
    """(sample tokens, encoder length, decoder length) as T5's
    `compute_input_and_target_lengths`: the longest sample whose corrupted form (kept tokens,
    one sentinel per span, EOS) fits `encoder_length`; the decoder holds the noise tokens, one
    sentinel per span and EOS. Noise and spans are counted as the mask draws them (at least
    one of each), and T5's adjustment at density 0.5 is left out: no mask has its lengths."""

    def corrupted(tokens: int) -> tuple[int, int]:
        noise = min(max(round(tokens * noise_density), 1), tokens - 1)
        spans = span_count(tokens, noise_density, mean_span_length)
        return tokens - noise + spans + 1, noise + spans + 1

    tokens = max(encoder_length - 1, 2)
    while corrupted(tokens + 1)[0] <= encoder_length:
        tokens += 1
    encoder, decoder = corrupted(tokens)
    return tokens, encoder, decoder


def span_count(tokens: int, noise_density: float, mean_span_length: float) -> int:
    """Noise spans in a sample of `tokens` (T5's `random_spans_noise_mask`)."""
    noise = min(max(round(tokens * noise_density), 1), tokens - 1)
    return max(round(noise / mean_span_length), 1)


class CheckpointConfig(ConfigSection):
    # `async` is a Python keyword: the field is `async_save`, written `checkpoint.async`.
    model_config = ConfigDict(
        validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )

    interval: NonNegativeInt = Field(default=1000, description="Steps between saves; 0: at end.")
    keep: PositiveInt = 2
    async_save: bool = Field(
        default=True,
        alias="async",
        description="Write checkpoints in the background while training goes on (the state "
        "is first copied to host memory); saves at a stop or the end always wait.",
    )


class EvalConfig(ConfigSection):
    interval: NonNegativeInt = Field(default=1000, description="Steps between evaluations; 0: off.")
    batches: PositiveInt = 10


class WandbConfig(ConfigSection):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "kiln"
    entity: str | None = None
    name: str | None = None


class AlertConfig(ConfigSection):
    """Flags in metrics.jsonl and every dashboard: a loss above `loss_spike` x the running median
    of the last `window` losses, a throughput below `throughput_drop` x its running median, and
    a step skipped for a NaN/Inf loss or gradient. 0 switches a rule off."""

    loss_spike: NonNegativeFloat = 2.0
    throughput_drop: float = Field(default=0.5, ge=0.0, lt=1.0)
    window: PositiveInt = Field(default=50, description="Steps the running medians cover.")
    min_history: PositiveInt = Field(
        default=10, description="Steps measured before a rule judges (the medians settle)."
    )


class MlflowConfig(ConfigSection):
    """An MLflow run beside metrics.jsonl: the configuration as params, every step's metrics,
    metrics.jsonl and config.yaml as artifacts at the end. Off while `tracking_uri` is None."""

    tracking_uri: str | None = Field(
        default=None,
        description="An MLflow server (http:// or https://) or a local SQLite store "
        "(sqlite:///PATH, which needs the full `mlflow` package); None: off.",
    )
    experiment: str = Field(default="kiln", min_length=1)
    run_name: str | None = Field(default=None, description="None: MLflow picks a name.")
    flush_interval_s: NonNegativeFloat = Field(
        default=5.0,
        description="Seconds between uploads of the metrics logged meanwhile (one batch); "
        "0: every step.",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _known_store(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(MLFLOW_SCHEMES):
            raise ValueError(
                f"must start with one of {', '.join(MLFLOW_SCHEMES)} or be null (MLflow 3 "
                "refuses file stores)"
            )
        return value


class LoggingConfig(ConfigSection):
    interval: PositiveInt = Field(default=10, description="Steps between log lines.")
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    tensorboard: bool = Field(
        default=True,
        description="TensorBoard event files in the run directory's tensorboard/ (kiln dashboard "
        "shows them live).",
    )
    alerts: AlertConfig = Field(default_factory=AlertConfig)


class ClusterConfig(ConfigSection):
    """Where the processes run. On GPU nodes a node runs one process per GPU."""

    scheduler: Literal["local", "slurm", "k8s", "ray"] = "local"
    nodes: PositiveInt = 1
    gpus_per_node: NonNegativeInt = 0
    procs_per_node: PositiveInt | None = Field(
        default=None, description="Processes per CPU-only node; on GPU nodes, gpus_per_node."
    )

    @model_validator(mode="after")
    def _gpus_or_procs(self) -> ClusterConfig:
        if self.gpus_per_node and self.procs_per_node not in (None, self.gpus_per_node):
            raise rule_violation(
                "procs_per_node",
                self.procs_per_node,
                f"GPU nodes run one process per GPU (cluster.gpus_per_node = "
                f"{self.gpus_per_node}); set one of the two",
            )
        return self

    @property
    def world_size(self) -> int | None:
        per_node = self.procs_per_node or self.gpus_per_node
        return self.nodes * per_node if per_node else None


class KilnConfig(ConfigSection):
    """The whole run configuration. `model` is optional so that data-only configs validate."""

    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig | None = None
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    masking: MaskingConfig = Field(default_factory=MaskingConfig)
    spans: SpanConfig = Field(default_factory=SpanConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _resolve_and_check(self, info: ValidationInfo) -> KilnConfig:
        """The rules across sections and the values derived from them, in this order (the
        first broken rule is the one reported)."""
        world_size = (info.context or {}).get("world_size")
        self._check_tokenizer_vocab()
        self._resolve_tokenizer()
        encoder_length = None  # a t5's: train.seq_length
        if self.model is not None:
            self._check_model_against_layout(self.model)
            seq_length = self._resolve_seq_length(self.model)
            encoder_length = seq_length if self.model.encoder_decoder else None
        self._resolve_batch(self._resolve_data_parallel(world_size))
        if encoder_length is not None:
            self._check_encoder_decoder_layout()
            self._resolve_spans(encoder_length)
        self._resolve_zero_stage()
        self._check_zero_stage()
        self._check_warmup()
        return self

    @property
    def world_size(self) -> int:
        """tensor x pipeline x data-parallel processes. Validation always sets parallel.data;
        unset, it counts as 1, the size validation gives it without a world size."""
        par = self.parallel
        return par.tensor * par.pipeline * (par.data or 1)

    def _check_tokenizer_vocab(self) -> None:
        """A tokenizer trained here needs an embedding row for every token."""
        given = self.tokenizer.vocab_size
        if self.model is None or given is None or self.tokenizer.path is not None:
            return
        if given > self.model.vocab_size:
            raise rule_violation(
                "tokenizer.vocab_size",
                given,
                f"must not exceed model.vocab_size ({self.model.vocab_size}): "
                "the embedding needs a row for every token",
            )

    def _resolve_tokenizer(self) -> None:
        """The tokens the model's objective needs (trained in, or required of a loaded
        tokenizer), and the vocabulary size when unset: the model's, 32000 without one."""
        needed = []
        if self.model is not None and self.model.arch == "bert":
            self.tokenizer.mask_token = self.masking.token
            needed = [self.masking.token]
        if self.model is not None and self.model.encoder_decoder:
            needed = [self.spans.start_token, *self.spans.sentinel_tokens()]
            self.tokenizer.required_tokens = needed
        missing = [token for token in needed if token not in self.tokenizer.special_tokens]
        self.tokenizer.special_tokens = [*self.tokenizer.special_tokens, *missing]
        if self.tokenizer.vocab_size is None:
            self.tokenizer.vocab_size = self.model.vocab_size if self.model else DEFAULT_VOCAB_SIZE

    def _check_model_against_layout(self, model: ModelConfig) -> None:
        par, train = self.parallel, self.train
        divisible_by_tensor = {
            "model.num_heads": model.num_heads,
            "model.num_kv_heads": model.num_kv_heads,
            "model.ffn_hidden_size": model.ffn_hidden_size,
        }
        for key, value in divisible_by_tensor.items():
            if value is not None and value % par.tensor:
                raise rule_violation("parallel.tensor", par.tensor, f"must divide {key} ({value})")
        if model.num_layers < par.pipeline:
            raise rule_violation(
                "parallel.pipeline",
                par.pipeline,
                f"cannot exceed model.num_layers ({model.num_layers}): every stage needs a layer",
            )
        if train.seq_length is not None and train.seq_length > model.max_seq_length:
            raise rule_violation(
                "train.seq_length",
                train.seq_length,
                f"must not exceed model.max_seq_length ({model.max_seq_length})",
            )

    def _resolve_seq_length(self, model: ModelConfig) -> int:
        """train.seq_length when unset: the model's max_seq_length."""
        seq_length = self.train.seq_length or model.max_seq_length
        self.train.seq_length = seq_length
        return seq_length

    def _check_encoder_decoder_layout(self) -> None:
        if self.parallel.pipeline > 1:
            raise rule_violation(
                "parallel.pipeline",
                self.parallel.pipeline,
                "t5 trains without pipeline parallelism: DeepSpeed's pipeline passes one "
                "activation stream between stages, an encoder-decoder needs two (use "
                "parallel.tensor and ZeRO to split a large t5)",
            )

    def _resolve_spans(self, encoder_length: int) -> None:
        """t5: the sample and decoder lengths of span corruption, from the encoder's; given
        ones must equal them."""
        spans = self.spans
        tokens, encoder, decoder = span_lengths(
            encoder_length, spans.noise_density, spans.mean_span_length
        )
        # one more sample token adds at most one encoder token: every length is reached
        assert encoder == encoder_length, (encoder, encoder_length)
        count = span_count(tokens, spans.noise_density, spans.mean_span_length)
        if count > spans.sentinels or decoder < 3:
            raise rule_violation(
                "train.seq_length",
                encoder_length,
                f"a sample of {tokens} tokens has {count} noise spans, which needs between 1 "
                f"and spans.sentinels ({spans.sentinels}) sentinels and a decoder of 3 or more "
                f"tokens ({decoder})",
            )
        for key, value in (("sample_tokens", tokens), ("decoder_length", decoder)):
            given = getattr(spans, key)
            if given is not None and given != value:
                raise rule_violation(
                    f"spans.{key}", given, f"is derived from train.seq_length: {value}"
                )
            setattr(spans, key, value)

    def _resolve_data_parallel(self, world_size: int | None) -> int:
        """parallel.data when unset: the world size (the context's, else the cluster
        section's) over tensor x pipeline, 1 without one; a given one must agree with it."""
        par = self.parallel
        model_parallel = par.tensor * par.pipeline
        source = "the world size"
        if world_size is None and self.cluster.world_size is not None:
            world_size, source = self.cluster.world_size, "cluster.nodes x processes per node"
        if world_size is None:
            data = par.data or 1
        elif par.data is not None:
            data = par.data
            if model_parallel * data != world_size:
                raise rule_violation(
                    "parallel.data",
                    data,
                    f"{source} ({world_size}) must equal parallel.tensor x parallel.pipeline x "
                    f"parallel.data ({par.tensor} x {par.pipeline} x {data})",
                )
        elif world_size % model_parallel:
            raise rule_violation(
                "parallel.tensor",
                par.tensor,
                f"{source} ({world_size}) must be a multiple of parallel.tensor x "
                f"parallel.pipeline ({par.tensor} x {par.pipeline})",
            )
        else:
            data = world_size // model_parallel
        par.data = data
        return data

    def _resolve_batch(self, dp: int) -> None:
        """The global batch and gradient accumulation, the one unset from the other (1 step
        of accumulation when both are); given both, they must agree."""
        train = self.train
        per_step = train.micro_batch_size * dp
        if train.global_batch_size is None:
            train.gradient_accumulation_steps = train.gradient_accumulation_steps or 1
            train.global_batch_size = per_step * train.gradient_accumulation_steps
        elif train.gradient_accumulation_steps is not None:
            expected = per_step * train.gradient_accumulation_steps
            if train.global_batch_size != expected:
                raise rule_violation(
                    "train.global_batch_size",
                    train.global_batch_size,
                    f"must equal train.micro_batch_size x train.gradient_accumulation_steps x "
                    f"data-parallel size ({train.micro_batch_size} x "
                    f"{train.gradient_accumulation_steps} x {dp} = {expected})",
                )
        elif train.global_batch_size % per_step:
            raise rule_violation(
                "train.global_batch_size",
                train.global_batch_size,
                f"must be a multiple of train.micro_batch_size x data-parallel size "
                f"({train.micro_batch_size} x {dp} = {per_step})",
            )
        else:
            train.gradient_accumulation_steps = train.global_batch_size // per_step

    def _resolve_zero_stage(self) -> None:
        """parallel.zero_stage when unset: the recommended one (`zero_stage_reason`)."""
        if self.parallel.zero_stage is None:
            self.parallel.zero_stage = recommended_zero_stage(
                self.train.precision, self.parallel.pipeline
            )

    def _check_zero_stage(self) -> None:
        if self.train.precision != "fp32" and self.parallel.zero_stage == 0:
            raise rule_violation(
                "parallel.zero_stage",
                0,
                f"{self.train.precision} training keeps its fp32 master weights in DeepSpeed's "
                "ZeRO optimizer, where checkpoints find them: use stage 1 or above (on one "
                "process stage 1 costs nothing)",
            )

    def _check_warmup(self) -> None:
        if self.optim.warmup_steps > self.train.steps:
            raise rule_violation(
                "optim.warmup_steps",
                self.optim.warmup_steps,
                f"must not exceed train.steps ({self.train.steps})",
            )


# -- after validation ------------------------------------------------------------------------
# Validation fills in every derived value, and these types say so: the sections with those
# fields narrowed to plain types. `resolve_run` (loader.py) turns a validated KilnConfig with a
# model into a `RunConfig`, the configuration the training code takes; validating one again
# changes nothing (every `_resolve_*` keeps a value that is set, and every rule still holds).


class ResolvedModel(ModelConfig):
    """A validated model section: the defaults that depend on the architecture filled in."""

    num_kv_heads: PositiveInt
    ffn_hidden_size: PositiveInt
    positions: Literal["learned", "rotary", "relative"]
    tie_embeddings: bool


class ResolvedT5Model(ResolvedModel):
    """A validated t5 model section: its decoder's layers and its MLP filled in too."""

    arch: Literal["t5"]
    decoder_layers: PositiveInt
    feed_forward: Literal["gated-gelu", "relu"]


def is_encoder_decoder(model: ResolvedModel) -> TypeGuard[ResolvedT5Model]:
    """A t5, with its decoder's layers and its MLP resolved. Told by `arch`, so that a
    validated ModelConfig of a t5 passes too: validation fills them in for every t5."""
    return model.arch == "t5"


class ResolvedParallel(ParallelConfig):
    """A validated layout: the data-parallel size and the ZeRO stage resolved."""

    data: PositiveInt
    zero_stage: int = Field(ge=0, le=3)


class ResolvedTrain(TrainConfig):
    """Validated training settings: the batch and the sequence length resolved. `compile`
    stays None for "on for GPUs, off on CPU", decided where the device is known."""

    global_batch_size: PositiveInt
    gradient_accumulation_steps: PositiveInt
    seq_length: PositiveInt


class ResolvedSpans(SpanConfig):
    """A t5 run's span corruption: the sample's and the decoder's lengths derived."""

    sample_tokens: PositiveInt
    decoder_length: PositiveInt


class RunConfig(KilnConfig):
    """A training run's configuration: a model, and every value validation derives resolved.
    Made by `resolve_run`; a t5's is a `T5RunConfig`."""

    tokenizer: ResolvedTokenizer
    model: ResolvedModel
    parallel: ResolvedParallel
    train: ResolvedTrain


class T5RunConfig(RunConfig):
    """A t5's run: its model and its span corruption's lengths resolved too."""

    model: ResolvedT5Model
    spans: ResolvedSpans
