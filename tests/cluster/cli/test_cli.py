"""The `kiln` command's surface: help, version, config show and validate."""

from __future__ import annotations

import pytest
import yaml

from pretrain.config import load_config
from tests.conftest import REPO


def test_help_lists_the_commands(kiln):
    result = kiln("--help")
    assert result.returncode == 0
    assert "usage: kiln" in result.stdout
    commands = "config data train generate export import-hf eval submit runs status logs cancel"
    for command in [*commands.split(), "report"]:
        assert any(line.split()[:1] == [command] for line in result.stdout.splitlines()), command


def test_version(kiln):
    result = kiln("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == "kiln 0.1.0"


def test_show_prints_resolved_yaml_and_parameter_count(kiln):
    result = kiln(
        "config", "show", "configs/train/tiny.yaml", "model.num_layers=4", "parallel.tensor=2"
    )
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["model"]["num_layers"] == 4
    assert shown["parallel"] == {
        "tensor": 2,
        "pipeline": 1,
        "data": 1,
        "zero_stage": 0,
        "pipeline_partition": "parameters",
    }
    assert shown["train"]["gradient_accumulation_steps"] == 2
    assert "# parameters: 7.10M (7,096,576)" in result.stdout
    assert "# world size 2 = tensor 2 x pipeline 1 x data 1" in result.stdout


@pytest.mark.parametrize(
    "overrides,stage,words",
    [
        (["train.precision=bf16"], 2, "BF16_Optimizer, with an unpartitioned fp32 gradient"),
        (["train.precision=fp16"], 2, "reduce-scatters them in buckets while backward runs"),
        (["train.precision=fp32"], 1, "partitions Adam's state"),
        (["train.precision=bf16", "parallel.pipeline=2"], 1, "supports ZeRO 0 and 1 only"),
    ],
)
def test_an_unset_zero_stage_is_the_recommended_one_and_show_says_why(
    kiln, tmp_path, overrides, stage, words
):
    config = tmp_path / "no_stage.yaml"  # tiny.yaml without its explicit stage 0
    tiny = yaml.safe_load((REPO / "configs/train/tiny.yaml").read_text())
    del tiny["parallel"]["zero_stage"]
    tiny["extends"] = [str(REPO / "configs/model/tiny.yaml")]
    config.write_text(yaml.safe_dump(tiny))
    result = kiln("config", "show", str(config), *overrides)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["parallel"]["zero_stage"] == stage
    line = next(x for x in result.stdout.splitlines() if x.startswith("# ZeRO stage"))
    assert line.startswith(f"# ZeRO stage {stage} is recommended") and words in line
    assert "this configuration sets" not in line


def test_show_mentions_padded_vocabulary(kiln):
    result = kiln("config", "show", "configs/model/1.3b.yaml")
    assert "# parameters: 1.32B (1,315,723,264); 1,315,819,520 with the vocabulary padded" in (
        result.stdout
    )


def test_validate_with_world_size(kiln):
    result = kiln(
        "config",
        "validate",
        "configs/train/tiny.yaml",
        "parallel.pipeline=2",
        "train.global_batch_size=32",
        "--world-size",
        "4",
    )
    assert result.returncode == 0, result.stderr
    assert "world size 4 = tensor 1 x pipeline 2 x data 2" in result.stdout


def test_overrides_may_follow_options(kiln):
    result = kiln(
        "config", "validate", "configs/train/tiny.yaml", "--world-size", "2", "parallel.tensor=2"
    )
    assert result.returncode == 0, result.stderr
    assert "tensor 2 x pipeline 1 x data 1" in result.stdout


def test_unknown_option_is_a_usage_error(kiln):
    result = kiln("config", "show", "configs/train/tiny.yaml", "--bogus")
    assert result.returncode == 2
    assert "unrecognized arguments: --bogus" in result.stderr
    assert "Traceback" not in result.stderr


def test_show_output_is_a_config_kiln_reads_back(kiln, tmp_path):
    result = kiln("config", "show", "configs/train/llama-7b.yaml")
    path = tmp_path / "resolved.yaml"
    path.write_text(result.stdout)
    assert load_config(path) == load_config("configs/train/llama-7b.yaml")
