"""`kiln export`, `kiln import-hf` and `kiln eval`: models in and out of Kiln, and their loss.

kiln export RUN_DIR_OR_CHECKPOINT --to hf OUT_DIR [--dtype D] [--max-shard-size S] [--overwrite]
kiln import-hf HF_DIR --config CONFIG --run-dir DIR [key=value ...]
kiln eval RUN_DIR_OR_CHECKPOINT [--data SHARDS] [--batches N | --all] [--json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cluster.rundir import check_trainable, prepare_run_dir
from data_pipeline.errors import KilnError


def add_parser(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export", help="Write a checkpoint as a Hugging Face model folder."
    )
    export.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT")
    export.add_argument("out", metavar="OUT_DIR", type=Path)
    export.add_argument("--to", choices=["hf"], required=True, help="Output format: hf.")
    export.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="Weights' type; auto: the training precision.",
    )
    export.add_argument(
        "--max-shard-size", default="5GB", metavar="SIZE", help="Largest weight file (5GB)."
    )
    export.add_argument("--overwrite", action="store_true", help="Replace a non-empty OUT_DIR.")
    export.set_defaults(handler=_export)

    importer = commands.add_parser(
        "import-hf",
        help="Start a run from a Hugging Face Llama, GPT-2 or MegatronBert (masked LM) model.",
    )
    importer.add_argument("hf_dir", metavar="HF_DIR", type=Path)
    importer.add_argument("--config", required=True, type=Path, metavar="CONFIG")
    importer.add_argument("--run-dir", required=True, type=Path, metavar="DIR")
    importer.add_argument("overrides", nargs="*", metavar="key=value", default=[])
    importer.set_defaults(handler=_import_hf)

    evaluate = commands.add_parser(
        "eval",
        help="Validation loss and perplexity of a checkpoint (an encoder's: masked-token loss "
        "and accuracy).",
    )
    evaluate.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT")
    evaluate.add_argument(
        "--data", type=Path, default=None, metavar="SHARDS", help="A prepared data directory."
    )
    amount = evaluate.add_mutually_exclusive_group()
    amount.add_argument(
        "--batches", type=int, default=None, metavar="N", help="Global batches (eval.batches)."
    )
    amount.add_argument("--all", action="store_true", help="Every validation sequence once.")
    evaluate.add_argument("--micro-batch-size", type=int, default=None, metavar="N")
    evaluate.add_argument("--json", action="store_true", help="Print one JSON object.")
    evaluate.set_defaults(handler=_eval)


def _quiet() -> None:
    from pretrain.startup import quiet_imports

    quiet_imports()


def _export(args: argparse.Namespace) -> int:
    _quiet()
    from pretrain.hf.export import export_hf

    done = export_hf(
        Path(args.checkpoint),
        args.out,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    print(
        f"kiln export: {done['architecture']} ({done['parameters']:,} parameters, "
        f"{done['dtype']}) from {done['checkpoint']} -> {done['out']} "
        f"({len(done['files'])} weight file(s))"
    )
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    _quiet()
    from pretrain.hf.importer import (
        build_config,
        check_same_tokenizer,
        read_model,
        refuse_existing_checkpoint,
        write_initial_checkpoint,
    )

    settings, weights = read_model(args.hf_dir)  # ConversionError: not a model Kiln can hold
    cfg = build_config(args.config, args.overrides, settings)
    check_trainable(cfg)
    run_dir: Path = args.run_dir
    refuse_existing_checkpoint(run_dir)  # before anything is written into it
    note = check_same_tokenizer(args.hf_dir, Path(cfg.data.path or cfg.data.blend[0].path))
    cfg = prepare_run_dir(cfg, run_dir, resume=True)
    checkpoint = write_initial_checkpoint(run_dir, cfg, weights, args.hf_dir)
    model = cfg.model
    print(
        f"kiln import-hf: {model.arch} {model.num_layers} layers x {model.hidden_size} "
        f"({sum(t.numel() for t in weights.values()):,} parameters) from {args.hf_dir} "
        f"-> {checkpoint}\n{note}\n"
        f"next: kiln train {run_dir / 'config.yaml'} --run-dir {run_dir} "
        "[--nproc N parallel.tensor=T parallel.pipeline=P ...]"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    _quiet()
    from pretrain.evaluate import evaluate

    for flag, value in (("--batches", args.batches), ("--micro-batch-size", args.micro_batch_size)):
        if value is not None and value < 1:
            raise KilnError(f"{flag} = {value}: must be at least 1")
    result = evaluate(
        Path(args.checkpoint),
        data=args.data,
        batches=args.batches,
        every_sequence=args.all,
        micro_batch_size=args.micro_batch_size,
    )
    if args.json:
        print(json.dumps(result.as_dict()))
    elif result.accuracy is not None:  # an encoder: over the masked (chosen) positions
        print(
            f"kiln eval: step {result.step} of {result.checkpoint}\n"
            f"masked-token loss {result.loss:.6f} | masked-token accuracy "
            f"{result.accuracy:.4f} | perplexity {result.perplexity:.3f} | "
            f"{result.masked_tokens:,} masked tokens of {result.sequences:,} sequences "
            f"({result.tokens:,} tokens) of {', '.join(result.data)}"
        )
    else:
        print(
            f"kiln eval: step {result.step} of {result.checkpoint}\n"
            f"validation loss {result.loss:.6f} | perplexity {result.perplexity:.3f} | "
            f"{result.sequences:,} sequences, {result.tokens:,} tokens of "
            f"{', '.join(result.data)}"
        )
    return 0
