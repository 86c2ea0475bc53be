"""`kiln import-hf HF_DIR --config CONFIG --run-dir DIR`: continue pretraining a Hugging Face
Llama, GPT-2, MegatronBert (masked LM, as `model.arch: bert`) or T5 (`T5ForConditionalGeneration`
v1.0 or v1.1, as `model.arch: t5`) model with Kiln.

The model section of the run comes from the Hugging Face `config.json` (everything else from
CONFIG and its overrides; a t5's `model.max_seq_length`, which T5's relative positions leave
open, is 512 unless an override sets it), and the weights become the run's step-0
checkpoint in Kiln's layout-independent form. `kiln train DIR/config.yaml --run-dir DIR` then
starts from it in any parallel layout: every rank slices the weights for its own place, and
Adam starts afresh.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from data_pipeline import atomic
from pretrain.config import ConfigError, RunConfig, dump_config, resolve_run, validate_tree
from pretrain.config.loader import apply_overrides, read_tree
from pretrain.train.checkpoint import TrainerState, latest_checkpoint, tag_of
from pretrain.train.dcp_io import Region, save_chunks
from pretrain.train.state_pieces import MODEL, state_key
from pretrain.train.weights import DESCRIPTION, FORMAT

from .mapping import ConversionError, from_hf, model_settings

# Model settings an imported checkpoint leaves open, which overrides may set.
OPEN_MODEL_KEYS = {"t5": ("model.max_seq_length",)}
# Buffers older `transformers` saved (GPT-2's causal mask, Llama's rotary frequencies, BERT's
# position ids); MegatronBert's tied decoder (`cls.predictions.decoder.*`) is never read either.
IGNORED_SUFFIXES = (
    ".attn.bias",
    ".attn.masked_bias",
    "rotary_emb.inv_freq",
    "embeddings.position_ids",
)


def read_hf_config(folder: Path):
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise ConversionError(f"{folder}: no config.json, not a Hugging Face model folder")
    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:  # invalid JSON, an unknown model_type
        problem = " ".join(str(error).split()).split(". ")[0].rstrip(".")  # its first sentence
        raise ConversionError(f"{folder}/config.json: {problem}") from None


def read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder: safetensors (one file or sharded) or PyTorch .bin."""
    for index_name, loader in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", _load_bin),
    ):
        index = folder / index_name
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as error:
                raise ConversionError(f"{index}: not a weight index ({error!r})") from None
            tensors: dict[str, torch.Tensor] = {}
            for file in files:
                tensors.update(loader(str(folder / file)))
            return _normalise_names(tensors)
    for single, loader in (("model.safetensors", load_file), ("pytorch_model.bin", _load_bin)):
        if (folder / single).is_file():
            return _normalise_names(loader(str(folder / single)))
    raise ConversionError(f"{folder}: no model.safetensors or pytorch_model.bin weights")


def _load_bin(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _normalise_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop buffers saved by old versions; GPT-2 checkpoints of `GPT2Model` lack the
    `transformer.` prefix of `GPT2LMHeadModel`."""
    tensors = {n: t for n, t in tensors.items() if not n.endswith(IGNORED_SUFFIXES)}
    if "wte.weight" in tensors and "transformer.wte.weight" not in tensors:
        tensors = {
            (n if n.startswith("lm_head.") else f"transformer.{n}"): t for n, t in tensors.items()
        }
    return tensors


def check_same_tokenizer(folder: Path, data_dir: Path) -> str:
    """The data must be tokenised with the model's own tokenizer; a note when unknowable."""
    from tokenizers import Tokenizer

    from pretrain.data import read_manifest

    data_tokenizer = Path(data_dir) / read_manifest(data_dir)["tokenizer"]["file"]
    model_tokenizer = folder / "tokenizer.json"
    if not model_tokenizer.is_file():
        return (
            f"note: {folder} has no tokenizer.json, so Kiln could not check that the data was "
            "tokenised with the model's tokenizer"
        )
    ours = Tokenizer.from_file(str(data_tokenizer)).get_vocab()
    theirs = Tokenizer.from_file(str(model_tokenizer)).get_vocab()
    if ours != theirs:
        differing = len(set(ours.items()) ^ set(theirs.items()))
        raise ConfigError(
            f"data.path: the data was tokenised with another tokenizer than {model_tokenizer} "
            f"({differing} token ids differ); prepare it with "
            f"tokenizer.path={model_tokenizer}"
        )
    return "tokenizer: the data's is the model's"


def build_config(config_path: Path, overrides: list[str], settings: dict) -> RunConfig:
    """CONFIG and its overrides, with the model section taken from the imported model (and
    the overrides of what it leaves open, `OPEN_MODEL_KEYS`): the run's configuration."""
    open_keys = OPEN_MODEL_KEYS.get(settings["arch"], ())
    chosen = [o for o in overrides if o.split("=", 1)[0].strip() in open_keys]
    touched = [o for o in overrides if o.split("=", 1)[0].startswith("model.") and o not in chosen]
    if touched:
        free = f" (only {', '.join(open_keys)} can be)" if open_keys else ""
        raise ConfigError(
            f"{touched[0]}: the model comes from the imported checkpoint; it cannot be "
            f"overridden{free}"
        )
    tree = read_tree(Path(config_path))
    apply_overrides(tree, [o for o in overrides if o not in chosen])
    tree["model"] = dict(settings)
    apply_overrides(tree, chosen)
    return resolve_run(validate_tree(tree))


def read_model(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Kiln's model settings and canonical fp32 weights of a Hugging Face model folder."""
    from pretrain.config import ModelConfig, resolve_model

    settings = model_settings(read_hf_config(folder))
    tensors = read_hf_tensors(folder)
    weights = from_hf(resolve_model(ModelConfig(**settings)), tensors)
    return settings, {name: t.to(torch.float32).contiguous() for name, t in weights.items()}


def refuse_existing_checkpoint(run_dir: Path) -> None:
    """An import starts a run: it never replaces one."""
    if latest_checkpoint(run_dir / "checkpoints") is not None:
        raise ConfigError(
            f"--run-dir = {run_dir}: already holds a checkpoint; import into a new directory"
        )


def write_initial_checkpoint(
    run_dir: Path, cfg: RunConfig, weights: dict[str, torch.Tensor], source: Path
) -> Path:
    """`checkpoints/step_00000000`: the fp32 weights under their canonical keys in one DCP
    file, as a one-rank layout would save them, and no optimizer state: every layout
    reshards from it."""
    refuse_existing_checkpoint(run_dir)
    root = run_dir / "checkpoints"
    tag = tag_of(0)
    staging = root / ".staging" / tag
    shutil.rmtree(staging, ignore_errors=True)
    chunks = [
        Region(state_key(MODEL, name), tuple(t.shape), (0,) * t.dim(), t)
        for name, t in weights.items()
    ]
    save_chunks(staging, chunks, {})
    layout = {"tensor": 1, "pipeline": 1, "data": None, "zero_stage": None, "precision": None}
    description = {"format": FORMAT, "layout": layout, "optimizer_step": None}
    description["source"] = f"the Hugging Face model {source}"
    atomic.write_json(staging / DESCRIPTION, description)
    atomic.write_json(staging / "trainer_state.json", asdict(TrainerState()))
    atomic.write_text(staging / "config.yaml", dump_config(cfg))
    shutil.copyfile(run_dir / "tokenizer.json", staging / "tokenizer.json")
    final = root / tag
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    atomic.write_text(root / "latest", tag + "\n")
    return final
