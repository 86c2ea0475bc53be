"""`kiln generate` on an encoder-decoder (`model.arch: t5`): sentinels filled by greedy or
sampled decoding from the decoder's start token, and a prompt without a sentinel refused."""

from __future__ import annotations

import ast

from tests.conftest import run_kiln

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
