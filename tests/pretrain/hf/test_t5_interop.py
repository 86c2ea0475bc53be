"""T5 in and out of Kiln, on tiny models built in memory: a Kiln t5 exported as `kiln export`
writes it gives its logits in `T5ForConditionalGeneration` (v1.1 and v1.0), also after
`transformers` saved and loaded it again; a Hugging Face T5 imported as `kiln import-hf` reads
it gives Hugging Face's logits in Kiln's `EncoderDecoder` and exports back to identical tensors;
the names map both ways exactly; what Kiln's t5 cannot hold is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from pretrain.config import ModelConfig
from pretrain.hf.export import export_hf
from pretrain.hf.importer import build_config, read_model, write_initial_checkpoint
from pretrain.hf.mapping import (
    T5_EMBEDDING_COPIES,
    T5_UNUSED,
    ConversionError,
    from_hf,
    hf_config,
    model_settings,
    to_hf,
)
from pretrain.inference import load_model
from pretrain.model.build import build_model
from pretrain.train.state_pieces import VOCAB_PADDED, canonical_parts
from pretrain.train.weights import load_weights
from tests.conftest import REPO

transformers = pytest.importorskip("transformers")

EOS, START = "<|endoftext|>", "<|pad|>"
SENTINELS = 8
WORDS = 250  # ordinary tokens w0..w249; EOS, START and the sentinels follow
VOCAB = 300  # the model's rows: more than the tokenizer's, fewer than the padded 384
VERSIONS = {  # T5 v1.1: gated-GELU, untied head; v1.0: ReLU, head tied and scaled
    "v1.1": dict(feed_forward="gated-gelu", tie_embeddings=False),
    "v1.0": dict(feed_forward="relu", tie_embeddings=True),
}
# Decoder shorter than the encoder, more decoder layers than encoder layers, and distances
# beyond relative_max_distance: T5's logarithmic and last buckets are all used.
ENCODER_LENGTH, DECODER_LENGTH = 40, 13
CONFIG = REPO / "configs/train/tiny.yaml"  # the rest of a run's configuration
OVERRIDES = [
    "train.seq_length=32",
    "train.precision=fp32",
    f"spans.sentinels={SENTINELS}",
    "model.max_seq_length=64",
]


@pytest.fixture(scope="module", autouse=True)
def process_group(one_process) -> None:
    """Every test here builds models in this process."""


def model_config(version: str) -> ModelConfig:
    return ModelConfig(
        arch="t5", num_layers=2, decoder_layers=3, hidden_size=32, num_heads=4,
        ffn_hidden_size=64, vocab_size=VOCAB, max_seq_length=64, relative_buckets=8,
        relative_max_distance=20, norm_eps=1e-6, **VERSIONS[version],
    )  # fmt: skip


def write_tokenizer(path: Path) -> Path:
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(WORDS)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([EOS, START, *[f"<extra_id_{i}>" for i in range(SENTINELS)]])
    tokenizer.save(str(path))
    return path


def token_ids() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    encoder = torch.randint(0, VOCAB, (2, ENCODER_LENGTH), generator=generator)
    decoder = torch.randint(0, VOCAB, (2, DECODER_LENGTH), generator=generator)
    return encoder, decoder


def kiln_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(*token_ids())[..., :VOCAB]


def hf_logits(model) -> torch.Tensor:
    encoder, decoder = token_ids()
    with torch.no_grad():
        return model.eval()(input_ids=encoder, decoder_input_ids=decoder).logits


def canonical_weights(model: torch.nn.Module, config: ModelConfig) -> dict[str, torch.Tensor]:
    """A one-rank model's weights under canonical names, as a checkpoint holds them: the
    projections of fused layers apart, exactly the vocabulary's rows."""
    out = {}
    for part in canonical_parts(model, config.num_layers):
        tensor = part.parameter.detach().narrow(0, part.first_row, part.rows)
        out[part.name] = (tensor[:VOCAB] if part.name in VOCAB_PADDED else tensor).clone()
    return out


def kiln_run(version: str, run_dir: Path) -> tuple[torch.nn.Module, Path]:
    """A Kiln t5 with O(1) logits (weights far from their small initial ones, norms away from
    one, a bias table that matters) and a run directory holding it as a checkpoint (the
    layout-independent one-rank form, written by the import's writer)."""
    config = model_config(version)
    model = build_model(config, seed=5)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "norm" in name:
                parameter.copy_(1 + 0.2 * noise)
            elif "position_bias" in name or "tokens" in name:
                parameter.copy_(noise)
            else:
                parameter.copy_(noise * parameter.shape[1] ** -0.5)
    run_dir.mkdir()
    write_tokenizer(run_dir / "tokenizer.json")
    cfg = build_config(CONFIG, OVERRIDES, config.model_dump())
    write_initial_checkpoint(run_dir, cfg, canonical_weights(model, config), run_dir)
    return model, run_dir


def hugging_face_t5(version: str, out: Path) -> Path:
    """A random `T5ForConditionalGeneration` as the Hub ships one: v1.0 as `save_pretrained`
    writes it (no lm_head), v1.1 with its own lm_head and `tie_word_embeddings: false` (no
    scale_decoder_outputs, as written before `transformers` 5)."""
    tokenizer_file = write_tokenizer(out.with_name(f"{out.name}-tokenizer.json"))
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    pad, eos = tokenizer.token_to_id(START), tokenizer.token_to_id(EOS)
    v11 = version == "v1.1"
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        dropout_rate=0.0, feed_forward_proj="gated-gelu" if v11 else "relu",
        tie_word_embeddings=not v11, pad_token_id=pad, eos_token_id=eos,
        decoder_start_token_id=pad,
    )  # fmt: skip
    torch.manual_seed(3)
    model = transformers.T5ForConditionalGeneration(config)
    with torch.no_grad():  # norms away from one, a bias table that matters
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.2 * torch.randn_like(parameter))
            elif "relative_attention_bias" in name:
                parameter.copy_(torch.randn_like(parameter))
    model.save_pretrained(out)
    if v11:
        tensors = load_file(out / "model.safetensors")
        tensors["lm_head.weight"] = torch.randn(VOCAB, 32) * 32**-0.5
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        written = json.loads((out / "config.json").read_text())
        written.pop("scale_decoder_outputs")
        written["tie_word_embeddings"] = False
        (out / "config.json").write_text(json.dumps(written, indent=2))
    transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file), eos_token=EOS, pad_token=START
    ).save_pretrained(out)
    return out


def import_hf(source: Path, run_dir: Path) -> Path:
    """`kiln import-hf` without the data check: settings and weights, the run's config, the
    step-0 checkpoint."""
    settings, weights = read_model(source)
    run_dir.mkdir()
    write_tokenizer(run_dir / "tokenizer.json")
    cfg = build_config(CONFIG, OVERRIDES, settings)
    write_initial_checkpoint(run_dir, cfg, weights, source)
    return run_dir


def load_seq2seq(folder: Path):
    return transformers.AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float32)


# -- export ----------------------------------------------------------------------------------
@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_exported_t5_gives_kilns_logits(tmp_path, version):
    model, run_dir = kiln_run(version, tmp_path / "run")
    out = tmp_path / "hf"
    export_hf(run_dir, out, dtype="float32")
    config = json.loads((out / "config.json").read_text())
    v11 = version == "v1.1"
    assert config["architectures"] == ["T5ForConditionalGeneration"]
    assert (config["tie_word_embeddings"], config["scale_decoder_outputs"]) == (not v11, not v11)
    assert config["feed_forward_proj"] == ("gated-gelu" if v11 else "relu")
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) == v11

    hf = load_seq2seq(out)
    assert (hf.lm_head.weight is hf.shared.weight) == (not v11)
    assert hf.encoder.embed_tokens.weight is hf.shared.weight
    assert hf.decoder.embed_tokens.weight is hf.shared.weight
    ours, theirs = kiln_logits(model), hf_logits(hf)
    assert theirs.shape == ours.shape == (2, DECODER_LENGTH, VOCAB)
    assert ours.abs().max() > 1  # large enough for a wrong bucket or head scale to show
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)

    kiln_tokenizer = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    sentinels = [f"<extra_id_{i}>" for i in range(SENTINELS)]
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == (EOS, START, None)
    assert tokenizer.extra_special_tokens == sentinels
    text = "w5 w17 <extra_id_0> w42 <extra_id_1> w7"
    # T5's tokenizer ends a text with EOS, as Kiln's encoder inputs end in training
    eos_id = kiln_tokenizer.token_to_id(EOS)
    assert tokenizer(text)["input_ids"] == [*kiln_tokenizer.encode(text).ids, eos_id]
    generation = json.loads((out / "generation_config.json").read_text())
    pad, eos = kiln_tokenizer.token_to_id(START), kiln_tokenizer.token_to_id(EOS)
    assert (generation["decoder_start_token_id"], generation["eos_token_id"]) == (pad, eos)
    assert (config["decoder_start_token_id"], config["pad_token_id"]) == (pad, pad)


def test_a_v1_1_export_saved_and_loaded_by_transformers_stays_untied(tmp_path):
    """`transformers` 5 writes the loaded v1.1 back with tie_word_embeddings true and
    scale_decoder_outputs false; loaded again it is still untied and unscaled: Kiln's logits."""
    model, run_dir = kiln_run("v1.1", tmp_path / "run")
    export_hf(run_dir, tmp_path / "hf", dtype="float32")
    load_seq2seq(tmp_path / "hf").save_pretrained(tmp_path / "again")
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert (written["tie_word_embeddings"], written["scale_decoder_outputs"]) == (True, False)
    again = load_seq2seq(tmp_path / "again")
    assert again.config.scale_decoder_outputs is False
    assert not torch.equal(again.lm_head.weight, again.shared.weight)
    torch.testing.assert_close(hf_logits(again), kiln_logits(model), rtol=0, atol=1e-4)


# -- import ----------------------------------------------------------------------------------
@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_imported_t5_gives_hugging_faces_logits(tmp_path, version):
    source = hugging_face_t5(version, tmp_path / "source")
    settings, weights = read_model(source)
    assert settings["feed_forward"] == VERSIONS[version]["feed_forward"]
    assert settings["tie_embeddings"] == VERSIONS[version]["tie_embeddings"]
    assert settings["max_seq_length"] == 512  # T5's relative positions set no limit
    model = build_model(ModelConfig(**settings), initialize=False)
    load_weights(model, weights)
    hf = load_seq2seq(source)
    ours, theirs = kiln_logits(model), hf_logits(hf)
    assert theirs.abs().max() > 1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)

    # the run `kiln import-hf` starts: its checkpoint, loaded as `kiln generate` loads it
    run_dir = import_hf(source, tmp_path / "run")
    loaded = load_model(run_dir)
    assert loaded.cfg.model.max_seq_length == 64  # the override of what T5 leaves open
    torch.testing.assert_close(kiln_logits(loaded.model), theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_hugging_face_to_kiln_to_hugging_face_is_identical(tmp_path, version):
    source = hugging_face_t5(version, tmp_path / "source")
    run_dir = import_hf(source, tmp_path / "run")
    export_hf(run_dir, tmp_path / "back", dtype="float32")
    before = load_file(source / "model.safetensors")
    after = load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name


# -- names and refusals ----------------------------------------------------------------------
@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_t5_names_are_an_exact_inverse(version):
    """HF -> Kiln -> HF gives the same tensors, for exactly the keys and shapes of the
    `transformers` model of the exported configuration; the copies of the embedding and the
    unused cross-attention table of older checkpoints are dropped."""
    model = model_config(version)
    hf = transformers.T5ForConditionalGeneration(hf_config(model, 1, torch.float32, 0))
    shapes = {k: v.shape for k, v in hf.state_dict().items()}
    for key in [*T5_EMBEDDING_COPIES, *(["lm_head.weight"] if model.tie_embeddings else [])]:
        shapes.pop(key)  # tied: transformers fills it from shared.weight
    generator = torch.Generator().manual_seed(0)
    theirs = {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}
    ours = from_hf(model, theirs)
    assert len(ours) == len(theirs)
    kiln = build_model(model, initialize=False)
    assert set(ours) == {part.name for part in canonical_parts(kiln, model.num_layers)}
    back = to_hf(model, ours)
    assert back.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert torch.equal(back[key], tensor), key
    older = {**theirs, **dict.fromkeys(T5_EMBEDDING_COPIES, theirs["shared.weight"])}
    older[T5_UNUSED[0]] = torch.randn(8, 4)
    assert all(torch.equal(from_hf(model, older)[k], t) for k, t in ours.items())


def one_line_refusal(call, match: str) -> None:
    with pytest.raises(ConversionError, match=match) as refused:
        call()
    assert "\n" not in str(refused.value)


def hf_tensors(model: ModelConfig) -> dict[str, torch.Tensor]:
    """Every tensor of the `transformers` model of `model`'s configuration, tied ones too."""
    hf = transformers.T5ForConditionalGeneration(hf_config(model, 1, torch.float32, 0))
    return {name: tensor.clone() for name, tensor in hf.state_dict().items()}


def test_what_kilns_t5_cannot_hold_is_refused():
    config = hf_config(model_config("v1.1"), 1, torch.float32, 0).to_dict()
    derived = ("dense_act_fn", "is_gated_act")  # from feed_forward_proj, as in a Hub config
    config = {k: v for k, v in config.items() if k not in derived}
    for key, value, reason in [
        ("feed_forward_proj", "gated-silu", r"\(dense_act_fn silu\): .*gated-gelu .*or relu"),
        ("d_kv", 16, r": Kiln's head size is d_model / num_heads \(32 / 4\)"),
    ]:
        changed = transformers.T5Config(**{**config, key: value})
        one_line_refusal(
            lambda c=changed: model_settings(c), f"t5 config {key} = {value}.*{reason}"
        )

    v10, v11 = model_config("v1.0"), model_config("v1.1")
    scaled_with_own_head = hf_tensors(v10)
    scaled_with_own_head["lm_head.weight"] += 1
    one_line_refusal(
        lambda: from_hf(v10, scaled_with_own_head),
        "lm_head.weight differs from shared.weight while scale_decoder_outputs is true",
    )
    unscaled_without_head = hf_tensors(v11)
    del unscaled_without_head["lm_head.weight"]
    one_line_refusal(
        lambda: from_hf(v11, unscaled_without_head),
        "no lm_head.weight while scale_decoder_outputs is false",
    )
    two_embeddings = hf_tensors(v11)
    two_embeddings["encoder.embed_tokens.weight"] += 1
    one_line_refusal(lambda: from_hf(v11, two_embeddings), "embeds the encoder's and the decoder's")
    with_biases = hf_tensors(v11)
    with_biases["encoder.block.0.layer.0.SelfAttention.q.bias"] = torch.zeros(32)
    one_line_refusal(lambda: from_hf(v11, with_biases), "no place for")
