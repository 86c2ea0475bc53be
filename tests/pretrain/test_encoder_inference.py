"""`kiln eval` and `kiln generate` on an encoder (`model.arch: bert`): the masked-token loss
and accuracy of the validation batches masked as training masks them, and <mask> filling."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import run_kiln
from tests.support.training import BERT, VOCAB, records, train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bert_run(bert_data, tmp_path_factory) -> Path:
    """A tiny encoder trained 30 steps on one process (validated every 5 steps)."""
    run_dir = tmp_path_factory.mktemp("bert") / "run"
    result = train(bert_data, run_dir, 1, *BERT, "train.steps=30")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return run_dir


def test_eval_reports_the_training_loops_masked_loss_and_an_accuracy(bert_run):
    final = [r for r in records(bert_run) if r["step"] == 30 and "val_loss" in r][-1]
    result = run_kiln("eval", str(bert_run), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(result.stdout)
    assert numbers["step"] == 30 and numbers["sequences"] == 2 * 8
    assert numbers["loss"] == pytest.approx(final["val_loss"], abs=1e-5)
    assert numbers["perplexity"] == pytest.approx(final["val_ppl"], rel=1e-4)
    # ~15% of 16 x 64 tokens are chosen (never a special token)
    assert 0.08 * 16 * 64 < numbers["masked_tokens"] < 0.22 * 16 * 64
    assert 0.0 <= numbers["accuracy"] <= 1.0
    assert numbers["accuracy"] > 2 / VOCAB, "no better than guessing uniformly"

    printed = run_kiln("eval", str(bert_run))
    assert printed.returncode == 0, printed.stderr[-3000:]
    line = printed.stdout.splitlines()[-1]
    loss = re.search(r"masked-token loss ([0-9.]+)", line)
    accuracy = re.search(r"masked-token accuracy ([0-9.]+)", line)
    assert loss and accuracy, printed.stdout
    assert float(loss.group(1)) == pytest.approx(numbers["loss"], abs=1e-6)
    assert float(accuracy.group(1)) == pytest.approx(numbers["accuracy"], abs=1e-4)
    assert f"{numbers['masked_tokens']:,} masked tokens" in line


def test_generate_fills_each_mask_with_its_top_candidates(bert_run):
    prompt = "def <mask>(self): return <mask>"
    result = run_kiln("generate", str(bert_run), "--prompt", prompt, "--top-k", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    *candidates, filled = result.stdout.splitlines()
    assert [line.split(":")[0] for line in candidates] == ["<mask> 1", "<mask> 2"]
    for line in candidates:
        options = line.split(": ", 1)[1].split(" | ")
        probabilities = [float(option.rsplit(" ", 1)[1]) for option in options]
        assert len(options) == 3 and 0 < sum(probabilities) <= 1.0 + 1e-3
        assert probabilities == sorted(probabilities, reverse=True)
    assert "<mask>" not in filled
    assert filled.startswith("def") and "(self): return" in filled


def test_generate_refuses_an_encoder_prompt_without_a_mask(bert_run):
    result = run_kiln("generate", str(bert_run), "--prompt", "def main(self):")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "has no <mask>" in result.stderr
