"""`kiln export RUN_DIR_OR_CHECKPOINT --to hf OUT_DIR`: a Hugging Face model folder.

From the checkpoint's layout-independent weights (any TP/PP/DP/ZeRO layout wrote them; the fp32
master weights where the run trained in bf16/fp16) the folder gets

    config.json                 LlamaForCausalLM (arch llama), GPT2LMHeadModel (arch gpt),
                                MegatronBertForMaskedLM (arch bert) or
                                T5ForConditionalGeneration (arch t5; `write_config`)
    generation_config.json      the end-of-text token as BOS and EOS (decoders), or as EOS with
                                the decoder's start token as start and PAD (t5); none for bert
    model.safetensors           or model-0000N-of-0000M.safetensors + model.safetensors.index.json
                                when larger than --max-shard-size
    tokenizer.json, tokenizer_config.json
                                the run's tokenizer (`PreTrainedTokenizerFast`), with the
                                end-of-text token as BOS and EOS (a decoder) or as EOS, the
                                masking token as MASK and <|pad|> as PAD (bert), or as EOS, the
                                decoder's start token (spans.start_token) as PAD and the
                                sentinels as extra special tokens (t5)

which `transformers.AutoModelForCausalLM.from_pretrained` (bert: `AutoModelForMaskedLM`, t5:
`AutoModelForSeq2SeqLM`) and `AutoTokenizer.from_pretrained` load offline. The folder is
written beside OUT_DIR and renamed into place when complete.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from data_pipeline.errors import KilnError
from pretrain.config import ResolvedModel
from pretrain.inference import checkpoint_config, checkpoint_weights
from pretrain.train.checkpoint import resolve_checkpoint
from pretrain.train.weights import CheckpointError

from .mapping import hf_config, to_hf

PAD_TOKEN = "<|pad|>"  # a data tokenizer's default padding token (tokenizer.special_tokens)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRAINING_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SIZE_UNITS = {
    "": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


class ExportError(KilnError, ValueError):  # ValueError: parse_size's, as tested
    """A user mistake: an existing output folder, a bad size, an unexportable model."""


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes; also KB, MB, KiB, MiB, GiB and plain bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ExportError(f"--max-shard-size = {text}: expected a size such as 5GB or 500MB")
    number, unit = match.groups()
    size = int(float(number) * SIZE_UNITS[(unit or "").upper()])
    if size < 1:
        raise ExportError(f"--max-shard-size = {text}: must be positive")
    return size


def shard_groups(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Names in order, cut into groups of at most `max_bytes` (a bigger tensor stands alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def write_weights(tensors: dict[str, torch.Tensor], out: Path, max_bytes: int) -> list[str]:
    """model.safetensors, or numbered shards and their index as `save_pretrained` writes."""
    metadata = {"format": "pt"}
    groups = shard_groups(tensors, max_bytes)
    if len(groups) == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
        return ["model.safetensors"]
    files, weight_map = [], {}
    for number, names in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(out / file), metadata=metadata)
        weight_map.update(dict.fromkeys(names, file))
        files.append(file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def write_tokenizer(
    tokenizer_file: Path,
    eos_token: str,
    max_length: int,
    out: Path,
    special: dict | None = None,
    append_eos: bool = False,
) -> None:
    """A decoder's tokenizer has the end-of-text token as BOS and EOS; an encoder's or an
    encoder-decoder's (`special`: bert's mask_token and pad_token, t5's pad_token and
    extra_special_tokens) none as BOS. `append_eos` (t5) ends every encoded text with EOS, as
    Hugging Face's T5 tokenizer does and as Kiln's t5 encoder inputs end in training."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        eos_token=eos_token,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
        **({"bos_token": eos_token} if special is None else special),
    )
    if append_eos:
        eos = (eos_token, tokenizer.convert_tokens_to_ids(eos_token))
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"$A {eos_token}", pair=f"$A {eos_token} $B {eos_token}", special_tokens=[eos]
        )
    tokenizer.save_pretrained(str(out))


def write_config(
    config, model: ResolvedModel, eos_id: int | None, pad_id: int | None, out: Path
) -> None:
    """config.json, and generation_config.json for a model that generates.

    An untied t5 (T5 v1.1) gets `tie_word_embeddings: false` beside `scale_decoder_outputs:
    false`: `transformers` 5 reads v1.1 from the second (its T5Config ties in memory
    always), older releases from the first. Loading it, `transformers` 5 warns that
    `shared.weight` and `lm_head.weight` "are both present in the checkpoints with different
    values, so we will NOT tie them": that is the untied head meant, and cannot be silenced."""
    from transformers import GenerationConfig

    config.save_pretrained(str(out))
    if model.encoder_decoder and not model.tie_embeddings:
        file = out / "config.json"
        written = json.loads(file.read_text())
        written["tie_word_embeddings"] = False
        file.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    if model.causal:  # a masked LM does not generate
        GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id).save_pretrained(str(out))
    elif model.encoder_decoder:  # T5's decoder starts from its padding token
        GenerationConfig(
            decoder_start_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id
        ).save_pretrained(str(out))


def export_hf(
    path: Path,
    out: Path,
    dtype: str = "auto",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> dict:
    """Write the Hugging Face folder; what was written (for the command's summary)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out}: exists and is not empty; pass --overwrite to replace it")
    max_bytes = parse_size(max_shard_size)
    checkpoint = resolve_checkpoint(Path(path))
    cfg = checkpoint_config(checkpoint)
    model = cfg.model
    dtype_name = TRAINING_DTYPE[cfg.train.precision] if dtype == "auto" else dtype
    if dtype_name not in DTYPES:
        raise ExportError(f"--dtype = {dtype}: choose auto, float32, bfloat16 or float16")
    torch_dtype = DTYPES[dtype_name]
    tokenizer_file = checkpoint / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{checkpoint}: no tokenizer.json beside the weights")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    eos_id = tokenizer.token_to_id(cfg.tokenizer.eos_token)
    special = pad_id = None
    if model.arch == "bert":
        if tokenizer.token_to_id(cfg.masking.token) is None:
            raise CheckpointError(f"{tokenizer_file}: no masking token {cfg.masking.token}")
        special = {"mask_token": cfg.masking.token}
        pad_id = tokenizer.token_to_id(PAD_TOKEN)
        if pad_id is not None:
            special["pad_token"] = PAD_TOKEN
    if model.encoder_decoder:
        sentinels = cfg.spans.sentinel_tokens()
        for token in (cfg.spans.start_token, *sentinels):
            if tokenizer.token_to_id(token) is None:
                raise CheckpointError(f"{tokenizer_file}: no token {token} (spans section)")
        special = {"pad_token": cfg.spans.start_token, "extra_special_tokens": sentinels}
        pad_id = tokenizer.token_to_id(cfg.spans.start_token)
    config = hf_config(model, eos_id, torch_dtype, pad_id)  # refuses unexportable models first
    weights = checkpoint_weights(checkpoint)
    tensors = {
        name: tensor.to(torch_dtype).contiguous() for name, tensor in to_hf(model, weights).items()
    }

    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write_config(config, model, eos_id, pad_id, staging)
    files = write_weights(tensors, staging, max_bytes)
    write_tokenizer(
        tokenizer_file,
        cfg.tokenizer.eos_token,
        model.max_seq_length,
        staging,
        special,
        append_eos=model.encoder_decoder,
    )
    for file in staging.iterdir():
        file.chmod(0o644)  # safetensors writes 0600; a model folder is meant to be shared
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return {
        "checkpoint": str(checkpoint),
        "out": str(out),
        "architecture": config.architectures[0],
        "dtype": dtype_name,
        "parameters": sum(t.numel() for t in tensors.values()),
        "files": files,
    }
