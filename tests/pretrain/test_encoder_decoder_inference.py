"""`kiln generate` on an encoder-decoder (`model.arch: t5`): sentinels filled by greedy or
sampled decoding from the decoder's start token, and a prompt without a sentinel refused."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import run_kiln

pytestmark = pytest.mark.integration

PROMPT = "The <extra_id_0> of the <extra_id_1> was"


def test_generate_writes_a_line_per_sentinel_then_the_filled_prompt(runs):
    run_dir = runs("t5-single")
    args = ("generate", str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "12")
    greedy = run_kiln(*args, "--temperature", "0")
    assert greedy.returncode == 0, greedy.stderr[-3000:]
    *spans, filled = greedy.stdout.splitlines()
    assert [line.split(":")[0] for line in spans] == ["<extra_id_0>", "<extra_id_1>"]
    assert filled.startswith("The") and filled.endswith(" was")
    for line in spans:  # a written span replaces its sentinel in the filled prompt
        text = line.split(": ", 1)[1]
        if text != "(not written)":
            assert ast.literal_eval(text) in filled
    assert run_kiln(*args, "--temperature", "0").stdout == greedy.stdout, "greedy is greedy"
    sampled = run_kiln(*args, "--temperature", "1.0", "--seed", "3")
    assert sampled.returncode == 0 and sampled.stdout.count("<extra_id_") >= 2


def test_generate_refuses_an_encoder_decoder_prompt_without_a_sentinel(runs):
    result = run_kiln("generate", str(runs("t5-single")), "--prompt", "The cat sat")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "has no sentinel" in result.stderr


def test_the_exported_model_generates_what_kiln_generates(runs, tmp_path, one_process):
    """Greedy decoding of the exported T5ForConditionalGeneration (its tokenizer appends EOS,
    as T5's does and as Kiln's encoder inputs end) writes Kiln's tokens."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from pretrain.generate import fill_sentinels
    from pretrain.inference import load_model

    run_dir = runs("t5-single")
    out = tmp_path / "hf"
    exported = run_kiln("export", str(run_dir), "--to", "hf", str(out), "--dtype", "float32")
    assert exported.returncode == 0, exported.stderr[-3000:]
    prompt = "The<extra_id_0> of the<extra_id_1> was"  # no space before a sentinel to strip
    ours = fill_sentinels(load_model(run_dir), prompt, 12, 0.0, None, None, 0)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids[0, -1] == tokenizer.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<extra_id_1>") in ids[0].tolist()
    with torch.no_grad():
        written = model.generate(ids, do_sample=False, max_new_tokens=12)[0].tolist()
    assert written[0] == model.generation_config.decoder_start_token_id
    theirs = [t for t in written[1:] if t not in (tokenizer.eos_token_id, tokenizer.pad_token_id)]
    assert theirs == ours.tokens and len(ours.tokens) >= 1
