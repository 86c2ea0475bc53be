"""A decoder-only (Llama, GPT) or encoder-only (BERT) transformer on megatron-core's
tensor-parallel layers, and the layers a T5-style encoder-decoder (`encoder_decoder.py`) shares.

Read top to bottom: initialisation, norms, rotary embedding, attention, MLP, block, embedding,
output layer, the model. Shapes: batch B, sequence S, hidden h, tensor-parallel size T. Between
layers activations are [B, S, h] and identical on every TP rank; a column-parallel layer splits its
output features across the T ranks, a row-parallel layer its input features, summing the
partial results. Attention heads and MLP features are therefore split T ways, and the
vocabulary too (embedding rows, output logits, cross entropy), padded to a multiple of 128 x T.

    llama: RMSNorm, rotary position embedding, SwiGLU MLP, grouped-query attention, no biases
    gpt:   LayerNorm, learned absolute positions, GELU MLP (tanh), biases
    bert:  as gpt, but attention is bidirectional, GELU exact, and the output is a masked-LM
           head: dense -> GELU -> LayerNorm -> the embedding matrix, plus a vocabulary bias
           (pre-LayerNorm blocks, as Megatron-LM's BERT and Hugging Face's MegatronBert)
    t5:    RMSNorm, a relative position bias added to unscaled scores, no biases, gated-GELU
           (v1.1) or ReLU (v1.0) MLP; its blocks are these, plus cross-attention

The projections that read the same input are fused into one column-parallel layer (q, k and v
into `qkv`; gate and up into `gate_up`): one matrix multiplication, and one tensor-parallel
all-reduce of the input's gradient in backward instead of three and two. A fused weight on
rank t holds [q_t; k_t; v_t], each part's own slice, so its layout depends on T; checkpoints,
exports and resharding therefore never see it: `projection_parts` names each part's rows by
its canonical, layout-independent name (`attention.q.weight`, `mlp.up.weight`...). Each full
weight is drawn on the CPU (`use_cpu_initialization`) before this rank keeps its slice, every
part of a fused layer on its own in order, and every layer is built under its own seed
(`seed`, layer index), so the same seed gives the same full weights for every tensor- and
pipeline-parallel layout.

Initialisation (`init_stds`) follows GPT-NeoX/Megatron: normal(0, init_std) everywhere, and
normal(0, init_std / sqrt(2 * num_layers)) for the two projections that write into the residual
stream (attention output, MLP down), so the residual's variance does not grow with depth. A t5
initialises as T5 (Mesh TensorFlow, Hugging Face's `_init_weights`), which its unscaled
attention is made for: embedding 1, q (h d_head)^-1/2, k and v h^-1/2, attention output
(heads d_head)^-1/2, MLP in h^-1/2, MLP out ffn^-1/2, position bias h^-1/2; its untied output
layer h^-1/2 (Hugging Face draws it at 1, which starts from logits of std sqrt(h)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, parallel_state, tensor_parallel
from torch import nn

from pretrain.config import ResolvedModel

from .sizing import padded_vocab_size

Module = TypeVar("Module", bound=nn.Module)


def normal_init(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return partial(nn.init.normal_, mean=0.0, std=std)


@dataclass
class LayerConfig(ModelParallelConfig):
    """megatron-core's layer settings, whether the initial weights are drawn at all, whether
    the attention core and the MLP activation are recomputed in backward (selective activation
    checkpointing), and whether the block's own compute is `torch.compile`d (`kernel`)."""

    draw_weights: bool = True
    recompute_core: bool = False
    compile_kernels: bool = False


def initializer(parallel: LayerConfig, std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """normal(0, std), or nothing for a model whose weights are loaded next. Not megatron-core's
    `perform_initialization=False`: that also skips marking the weights tensor-parallel."""
    if parallel.draw_weights:
        return normal_init(std)
    return _undrawn


def _undrawn(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def tp_group():
    """The tensor-parallel group, passed to every megatron-core layer (left out, megatron-core
    0.16 warns on each construction and each row-parallel forward)."""
    return parallel_state.get_tensor_model_parallel_group()


def residual_std(model: ResolvedModel) -> float:
    return model.init_std / math.sqrt(2.0 * model.num_layers)


@dataclass(frozen=True)
class InitStds:
    """The standard deviation each kind of weight is drawn with (see the module docstring)."""

    embedding: float
    q: float
    kv: float
    attention_out: float
    mlp_in: float
    mlp_out: float
    head: float
    position_bias: float


def init_stds(model: ResolvedModel) -> InitStds:
    if model.arch != "t5":
        std, residual = model.init_std, residual_std(model)
        return InitStds(std, std, std, residual, std, residual, std, std)
    h, inner = model.hidden_size, model.num_heads * model.head_dim
    return InitStds(
        embedding=1.0,
        q=(h * model.head_dim) ** -0.5,
        kv=h**-0.5,
        attention_out=inner**-0.5,
        mlp_in=h**-0.5,
        mlp_out=model.ffn_hidden_size**-0.5,
        head=h**-0.5,
        position_bias=h**-0.5,
    )


def residual_projection(
    in_features: int, model: ResolvedModel, parallel: LayerConfig, std: float
) -> tensor_parallel.RowParallelLinear:
    """A row-parallel projection back to the hidden size, writing into the residual stream:
    input features split across TP ranks, partial outputs summed."""
    return tensor_parallel.RowParallelLinear(
        in_features,
        model.hidden_size,
        config=parallel,
        tp_group=tp_group(),
        init_method=initializer(parallel, std),
        bias=model.biases,
        input_is_parallel=True,
        skip_bias_add=False,
    )


def parallel_config(
    tensor: int,
    dtype: torch.dtype = torch.float32,
    initialize: bool = True,
    recompute: str = "none",
    compile: bool = False,
) -> LayerConfig:
    """megatron-core's layer settings: weights drawn whole on the CPU, then sliced per rank;
    `initialize=False` leaves them undrawn, for a model whose weights are loaded next;
    `recompute="selective"` recomputes the attention core and the MLP activation; `compile`
    compiles the norms, the rotary embedding with attention, and the MLP activation."""
    return LayerConfig(
        tensor_model_parallel_size=tensor,
        use_cpu_initialization=True,
        params_dtype=dtype,
        draw_weights=initialize,
        recompute_core=recompute == "selective",
        compile_kernels=compile,
    )


def kernel(function: Callable, compile: bool) -> Callable:
    """`function` itself, or compiled. Only tensor-in, tensor-out compute is compiled: the
    megatron-core layers, whose autograd functions run tensor-parallel collectives, stay
    outside the compiled regions (dynamo would break its graphs on them). Every layer's
    wrapper shares one compiled code per function and input shape."""
    if compile:
        return torch.compile(function, fullgraph=True, dynamic=False)
    return function


@dataclass(frozen=True)
class FusedPart:
    """One projection inside a fused column-parallel layer: its canonical module name (q, k,
    v; gate, up) and its number of output features on one tensor-parallel rank."""

    name: str
    rows: int


def fused_column(
    parts: dict[str, tuple[int, float]], in_features: int, parallel: LayerConfig, bias: bool
) -> tensor_parallel.ColumnParallelLinear:
    """One column-parallel layer for several projections of the same input (`parts`: name ->
    (full output features, init std)). Rank t's weight is the concatenation of each part's
    t-th slice; each part's full weight is drawn on its own, in order, as a separate layer's
    would be. The weight (and bias) carries `fused_parts` for `projection_parts`."""
    tensor = parallel.tensor_model_parallel_size
    layer = tensor_parallel.ColumnParallelLinear(
        in_features,
        sum(size for size, _ in parts.values()),
        config=parallel,
        tp_group=tp_group(),
        init_method=_undrawn,
        bias=bias,
        gather_output=False,
    )
    layout = tuple(FusedPart(name, size // tensor) for name, (size, _) in parts.items())
    for parameter in (layer.weight, layer.bias):
        if parameter is not None:
            parameter.fused_parts = layout
    if parallel.draw_weights:
        rank = parallel_state.get_tensor_model_parallel_rank()
        slices = []
        for part in layout:  # megatron-core's CPU initialisation, one part at a time
            draw = normal_init(parts[part.name][1])
            full = draw(torch.empty(part.rows * tensor, in_features, dtype=torch.float32))
            slices.append(full[rank * part.rows : (rank + 1) * part.rows])
        with torch.no_grad():
            layer.weight.copy_(torch.cat(slices).to(parallel.params_dtype))
    return layer


def projection_parts(name: str, parameter: torch.Tensor) -> list[tuple[str, int, int]]:
    """(canonical name, first row, rows) of each projection a local parameter holds: the parts
    of a fused layer (`blocks.0.attention.qkv.weight` -> `blocks.0.attention.q.weight`, ...),
    or the parameter itself, whole."""
    parts = getattr(parameter, "fused_parts", None)
    if not parts:
        return [(name, 0, tuple(getattr(parameter, "ds_shape", parameter.shape))[0])]
    owner, _fused, leaf = name.rsplit(".", 2)
    out, row = [], 0
    for part in parts:
        out.append((f"{owner}.{part.name}.{leaf}", row, part.rows))
        row += part.rows
    return out


def maybe_recomputed(active: bool, function: Callable, *tensors: torch.Tensor) -> torch.Tensor:
    """`function(*tensors)`, its activations recomputed in backward when `active` (training)."""
    if active and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(function, *tensors, use_reentrant=False)
    return function(*tensors)


def seeded(seed: int, index: int, build: Callable[[], Module]) -> Module:
    """Build a layer under its own seed, leaving the global random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + index)
        return build()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()  # one cast, shared by the statistic and the scaling
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, compile: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.norm = kernel(rms_norm, compile)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm (same parameter names), optionally compiled."""

    def __init__(self, size: int, eps: float, compile: bool = False) -> None:
        super().__init__(size, eps=eps)
        self.norm = kernel(F.layer_norm, compile)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def make_norm(model: ResolvedModel, compile: bool = False) -> nn.Module:
    if model.arch in ("llama", "t5"):
        return RMSNorm(model.hidden_size, model.norm_eps, compile)
    return LayerNorm(model.hidden_size, model.norm_eps, compile)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, in the rotate-half convention (as Hugging Face's Llama).
    The angles are computed in fp32, never stored in a low-precision buffer (in bf16 the angle
    of position 2000 would be off by whole radians); the cos/sin tables are computed once per
    device and dtype, up to the longest sequence, and serve q and k alike."""

    def __init__(self, head_dim: int, max_seq_length: int, base: float) -> None:
        super().__init__()
        self.head_dim, self.base, self.max_seq_length = head_dim, base, max_seq_length
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(
        self, seq: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, [S, head_dim], in `dtype`: the first `seq` rows of one table per device
        and dtype (every sequence length, also generation's growing ones, slices the same)."""
        key = (device, dtype)
        if key not in self._tables or self._tables[key][0].shape[0] < seq:
            length = max(seq, self.max_seq_length)
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
            inverse = 1.0 / self.base ** (exponents / self.head_dim)
            positions = torch.arange(length, dtype=torch.float32, device=device)
            angles = torch.outer(positions, inverse)
            angles = torch.cat([angles, angles], dim=-1)
            self._tables[key] = (angles.cos().to(dtype), angles.sin().to(dtype))
        cos, sin = self._tables[key]
        return cos[:seq], sin[:seq]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, heads, S, head_dim]."""
        return rotate(x, *self.tables(x.shape[-2], x.device, x.dtype))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, heads, S, head_dim] with tables [S, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    causal: bool = True,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Rotary embedding of q and k (when given tables), then SDPA, causal for a decoder and
    over every position for an encoder (packed samples have no padding): [B, heads, S, d].
    `bias` [1, heads, Sq, Sk] is added to the scores (T5's relative position bias, with its
    causal mask in it for a decoder); `scale` replaces 1/sqrt(d) (T5: 1, none)."""
    if cos is not None and sin is not None:
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=bias,
        is_causal=causal and bias is None,
        scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )


class Attention(nn.Module):
    """Self-attention with grouped-query heads, through PyTorch's SDPA (flash on GPUs): causal
    in a decoder, bidirectional in an encoder; t5's takes the relative position bias and does
    not scale its scores."""

    def __init__(self, model: ResolvedModel, parallel: LayerConfig) -> None:
        super().__init__()
        tensor = parallel.tensor_model_parallel_size
        self.head_dim = model.head_dim
        self.heads = model.num_heads // tensor
        self.kv_heads = model.num_kv_heads // tensor
        stds = init_stds(model)
        self.qkv = fused_column(
            {
                "q": (model.num_heads * self.head_dim, stds.q),
                "k": (model.num_kv_heads * self.head_dim, stds.kv),
                "v": (model.num_kv_heads * self.head_dim, stds.kv),
            },
            model.hidden_size,
            parallel,
            bias=model.biases,
        )
        self.causal = model.causal
        self.scale = 1.0 if model.arch == "t5" else None
        self.split = (
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.kv_heads * self.head_dim,
        )
        self.out = residual_projection(
            model.num_heads * self.head_dim, model, parallel, stds.attention_out
        )
        self.rotary = (
            RotaryEmbedding(self.head_dim, model.max_seq_length, model.rope_base)
            if model.positions == "rotary"
            else None
        )
        self.recompute_core = parallel.recompute_core
        self.core = kernel(attention_core, parallel.compile_kernels)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, S, h]; `bias`: t5's position bias (and causal mask) for this rank's heads."""
        batch, seq, _ = x.shape

        projected, _ = self.qkv(x)
        q, k, v = (
            part.view(batch, seq, -1, self.head_dim).transpose(1, 2)
            for part in projected.split(self.split, dim=-1)
        )
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary.tables(seq, x.device, x.dtype)
        recompute = self.recompute_core and self.training
        y = maybe_recomputed(recompute, self.core, q, k, v, cos, sin, self.causal, bias, self.scale)
        y = y.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim)
        out, _ = self.out(y)
        return out


class MLP(nn.Module):
    """Gated: down(act(gate(x)) * up(x)) (llama: SiLU; t5 v1.1: tanh-GELU); otherwise
    down(act(fc(x))) (gpt: tanh-GELU; bert: exact GELU; t5 v1.0: ReLU)."""

    def __init__(self, model: ResolvedModel, parallel: LayerConfig) -> None:
        super().__init__()
        ffn = model.ffn_hidden_size
        activation = mlp_activation(model)
        self.gated = activation in (swiglu_of_fused, geglu_of_fused)
        stds = init_stds(model)
        if self.gated:
            self.gate_up = fused_column(
                {"gate": (ffn, stds.mlp_in), "up": (ffn, stds.mlp_in)},
                model.hidden_size,
                parallel,
                False,
            )
        else:
            self.fc = tensor_parallel.ColumnParallelLinear(
                model.hidden_size,
                ffn,
                config=parallel,
                tp_group=tp_group(),
                init_method=initializer(parallel, stds.mlp_in),
                bias=model.biases,
                gather_output=False,
            )
        self.down = residual_projection(ffn, model, parallel, stds.mlp_out)
        self.recompute_core = parallel.recompute_core
        self.activation = kernel(activation, parallel.compile_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recompute = self.recompute_core and self.training
        projected = self.gate_up(x)[0] if self.gated else self.fc(x)[0]
        hidden = maybe_recomputed(recompute, self.activation, projected)
        out, _ = self.down(hidden)
        return out


def mlp_activation(model: ResolvedModel) -> Callable[[torch.Tensor], torch.Tensor]:
    if model.arch == "t5":
        return geglu_of_fused if model.feed_forward == "gated-gelu" else F.relu
    return {"llama": swiglu_of_fused, "gpt": gelu, "bert": gelu_exact}[model.arch]


def swiglu_of_fused(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the fused [..., gate | up] projection (this rank's halves)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def geglu_of_fused(gate_up: torch.Tensor) -> torch.Tensor:
    """T5 v1.1's gelu_new(gate) * up (tanh-approximated GELU) of the fused projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_exact(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, model: ResolvedModel, parallel: LayerConfig) -> None:
        super().__init__()
        self.attention_norm = make_norm(model, parallel.compile_kernels)
        self.attention = Attention(model, parallel)
        self.mlp_norm = make_norm(model, parallel.compile_kernels)
        self.mlp = MLP(model, parallel)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), bias)
        return x + self.mlp(self.mlp_norm(x))


class Embedding(nn.Module):
    """Token embedding, vocabulary rows split across TP ranks; plus learned positions.
    With tied embeddings the same vocabulary-parallel matrix also gives the logits; an
    encoder's masked-LM head lives here too (`head`), beside the matrix it ends in, so that a
    pipeline's last stage, which holds a tied copy of this module, has all of it."""

    def __init__(self, model: ResolvedModel, parallel: LayerConfig) -> None:
        super().__init__()
        # Positions and the head are drawn first: the random draws of the token rows depend
        # on the vocabulary's padding, which depends on T.
        self.positions = None
        if model.positions == "learned":
            self.positions = nn.Embedding(model.max_seq_length, model.hidden_size)
            initializer(parallel, model.init_std)(self.positions.weight)
        self.head = MaskedLMHead(model, parallel) if model.arch == "bert" else None
        vocab = padded_vocab_size(model.vocab_size, parallel.tensor_model_parallel_size)
        self.tokens = tensor_parallel.VocabParallelEmbedding(
            vocab,
            model.hidden_size,
            init_method=initializer(parallel, init_stds(model).embedding),
            config=parallel,
            tp_group=tp_group(),
        )
        self.tied_output = (
            output_layer(model, parallel, weightless=True) if model.tie_embeddings else None
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids)
        if self.positions is not None:
            x = x + self.positions(torch.arange(ids.shape[1], device=ids.device))
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Tied output layer: vocabulary-parallel logits from the embedding matrix."""
        assert self.tied_output is not None, "logits() needs model.tie_embeddings"
        if self.head is not None:
            x = self.head(x)
        logits, _ = self.tied_output(x, weight=self.tokens.weight)
        return logits if self.head is None else logits + self.head.bias


class MaskedLMHead(nn.Module):
    """BERT's output transform, dense -> GELU -> LayerNorm, before the (tied) embedding matrix,
    and the bias per vocabulary row added after it, split across TP ranks as the logits are.
    The dense layer and the norm are replicated on every TP rank (their input and gradient
    are the same on all)."""

    def __init__(self, model: ResolvedModel, parallel: LayerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(model.hidden_size, model.hidden_size)
        initializer(parallel, model.init_std)(self.dense.weight)
        nn.init.zeros_(self.dense.bias)
        self.norm = LayerNorm(model.hidden_size, model.norm_eps, parallel.compile_kernels)
        tensor = parallel.tensor_model_parallel_size
        rows = padded_vocab_size(model.vocab_size, tensor) // tensor
        self.bias = nn.Parameter(torch.zeros(rows, dtype=parallel.params_dtype))
        tensor_parallel.set_tensor_model_parallel_attributes(self.bias, True, 0, 1)
        self.transform = kernel(gelu_exact, parallel.compile_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.transform(self.dense(x)))


def output_layer(
    model: ResolvedModel, parallel: LayerConfig, weightless: bool = False
) -> tensor_parallel.ColumnParallelLinear:
    """Hidden -> this rank's slice of the (padded) vocabulary; `weightless` borrows a weight."""
    return tensor_parallel.ColumnParallelLinear(
        model.hidden_size,
        padded_vocab_size(model.vocab_size, parallel.tensor_model_parallel_size),
        config=parallel,
        tp_group=tp_group(),
        init_method=initializer(parallel, init_stds(model).head),
        bias=False,
        gather_output=False,
        skip_weight_param_allocation=weightless,
    )


class OutputLayer(nn.Module):
    """The untied output layer: vocabulary-parallel logits [B, S, V/T]."""

    def __init__(self, model: ResolvedModel, parallel: LayerConfig) -> None:
        super().__init__()
        self.projection = output_layer(model, parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.projection(x)
        return logits


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """This rank's slice of the logits with the padding rows (ids >= vocab_size) pushed to the
    lowest float, so that they take no probability and get no gradient. The loss is then the
    loss over the real vocabulary alone: the same for every tensor-parallel size (whose
    padding differs) and the same as an exported model's, which has no padding rows."""
    per_rank = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * per_rank
    if start + per_rank <= vocab_size:
        return logits
    ids = torch.arange(start, start + per_rank, device=logits.device)
    return logits.masked_fill(ids >= vocab_size, torch.finfo(logits.dtype).min)


def attention_backend(
    model: ResolvedModel, tensor: int, seq_length: int, dtype: torch.dtype, device: torch.device
) -> str:
    """The kernel `scaled_dot_product_attention` picks for this model's attention (flash,
    cuDNN, memory-efficient or math), as PyTorch's own dispatcher decides it."""
    from torch.nn.attention import SDPBackend

    heads, kv_heads = model.num_heads // tensor, model.num_kv_heads // tensor
    q = torch.empty(1, heads, seq_length, model.head_dim, dtype=dtype, device=device)
    kv = torch.empty(1, kv_heads, seq_length, model.head_dim, dtype=dtype, device=device)
    # t5 adds its position bias (and a decoder's causal mask) to the scores
    bias = None
    if model.positions == "relative":
        bias = torch.empty(1, heads, seq_length, seq_length, dtype=dtype, device=device)
    try:  # a private helper: the dispatcher's own choice, not a re-implementation of it
        choice = torch._fused_sdp_choice(
            q, kv, kv, bias, 0.0, model.causal, enable_gqa=kv_heads != heads
        )
        return SDPBackend(choice).name.lower()
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return "unknown"


LOSS_CHUNK_ELEMENTS = 2**26  # fp32 logits one chunk of the loss may hold: 256 MiB


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    chunk_elements: int | None = LOSS_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Mean loss over vocabulary-parallel logits [B, S, V/T] of a vocabulary of `vocab_size`
    real tokens (the rest is padding), over the positions whose target is not IGNORED (a
    decoder's every next token; an encoder's masked positions).

    Of bf16/fp16 logits in training the loss is taken over chunks of at most `chunk_elements`
    logits, each chunk's fp32 softmax recomputed in backward: autograd keeps the logits in
    their own dtype only, never an fp32 copy of them all (megatron-core's saved softmax: 4
    bytes per logit, twice the bf16 logits themselves). fp32 logits are taken whole:
    megatron-core computes the softmax and its gradient in place in them, which no chunking
    beats. `chunk_elements=None` takes the loss whole in any dtype (the reference the chunked
    loss equals). megatron-core works in place: fp32 `logits` hold garbage afterwards."""
    count = (targets >= 0).sum().clamp(min=1)  # the positions that count (masked LM: chosen)
    low_precision = logits.dtype != torch.float32
    if chunk_elements is None or not low_precision or not torch.is_grad_enabled():
        return _loss_sum(logits.float(), targets, vocab_size) / count
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    tokens = max(1, chunk_elements // logits.shape[-1])
    total = sum(
        torch.utils.checkpoint.checkpoint(
            _chunk_loss_sum, chunk, chunk_targets, vocab_size, use_reentrant=False
        )
        for chunk, chunk_targets in zip(
            flat_logits.split(tokens), flat_targets.split(tokens), strict=True
        )
    )
    return total / count


def _chunk_loss_sum(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return _loss_sum(logits.float(), targets, vocab_size)  # a copy: the input stays intact


def _loss_sum(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Summed loss over the positions whose target is a token id (>= 0; IGNORED is left out)."""
    logits = mask_vocab_padding(logits, vocab_size)
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits, targets.clamp(min=0))
    return (losses * (targets >= 0)).sum()


@torch.no_grad()
def gather_logits(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from every rank's slice, without gradient (generation,
    evaluation). megatron-core's own gather allocates on CUDA, so this one uses all_gather."""
    group = parallel_state.get_tensor_model_parallel_group()
    if group.size() == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(group.size())]
    torch.distributed.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class Transformer(nn.Module):
    """The whole model on one pipeline stage. `forward(ids)` gives vocabulary-parallel
    logits; `forward(ids, targets)` the mean loss. Needs megatron-core's parallel_state set up
    (tensor-parallel size `tensor`) before it is built. The pipeline-parallel model
    (`pretrain.model.pipeline`) is made of the same layers, built under the same seeds."""

    def __init__(
        self,
        model: ResolvedModel,
        tensor: int = 1,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        recompute: str = "none",
        initialize: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        parallel = parallel_config(tensor, dtype, initialize, recompute, compile)
        layers = model.num_layers
        self.config = model
        self.checkpoint_blocks = recompute == "full"
        self.embedding = seeded(seed, 0, lambda: Embedding(model, parallel))
        self.blocks = nn.ModuleList(
            seeded(seed, 1 + i, lambda: Block(model, parallel)) for i in range(layers)
        )
        self.norm = seeded(seed, layers + 1, lambda: make_norm(model, compile))
        self.output = (
            None
            if model.tie_embeddings
            else seeded(seed, layers + 2, lambda: OutputLayer(model, parallel))
        )

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embedding(ids)
        for block in self.blocks:
            if self.checkpoint_blocks and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x)
        logits = self.embedding.logits(x) if self.output is None else self.output(x)
        return logits if targets is None else cross_entropy(logits, targets, self.config.vocab_size)
