"""Loading: `extends:` merging, typed overrides, derived values, round trip of the resolved YAML."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from pretrain.config import ConfigError, KilnConfig, dump_config, load_config, validate_tree
from tests.conftest import CONFIGS

# Kiln's configurations (configs/lm_eval holds task files for lm-eval, not Kiln configurations)
ALL_CONFIGS = sorted(p for p in CONFIGS.glob("*/*.yaml") if p.parent.name != "lm_eval")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_is_valid(path):
    load_config(path)


def test_extends_merges_in_order_and_own_keys_win(tmp_path):
    write(tmp_path / "base/a.yaml", "train: {steps: 10, seed: 1}\noptim: {lr: 0.1}\n")
    write(tmp_path / "base/b.yaml", "train: {steps: 20}\noptim: {min_lr: 0.0}\n")
    top = write(
        tmp_path / "run/top.yaml",
        """
        extends: [../base/a.yaml, ../base/b.yaml]
        train: {seed: 7}
        """,
    )
    cfg = load_config(top)
    assert cfg.train.steps == 20  # b, later in the list, wins over a
    assert cfg.train.seed == 7  # the file's own keys win over everything it extends
    assert cfg.optim.lr == 0.1 and cfg.optim.min_lr == 0.0  # mappings merge key by key


def test_extends_chains_and_accepts_a_single_path(tmp_path):
    write(tmp_path / "a.yaml", "train: {steps: 5}\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\noptim: {warmup_steps: 5}\n")
    cfg = load_config(write(tmp_path / "c.yaml", "extends: [b.yaml]\n"))
    assert (cfg.train.steps, cfg.optim.warmup_steps) == (5, 5)


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "extends: [b.yaml]\n")
    write(tmp_path / "b.yaml", "extends: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"extends itself \(a.yaml -> b.yaml -> a.yaml\)"):
        load_config(tmp_path / "a.yaml")


def test_lists_are_replaced_not_concatenated(tmp_path):
    write(tmp_path / "a.yaml", "data: {blend: [{path: x}, {path: y}]}\n")
    cfg = load_config(write(tmp_path / "b.yaml", "extends: a.yaml\ndata: {blend: [{path: z}]}\n"))
    assert [b.path for b in cfg.data.blend] == ["z"]


def test_overrides_are_typed_by_the_schema():
    cfg = load_config(
        CONFIGS / "train/tiny.yaml",
        [
            "model.num_layers=6",
            "optim.lr=2e-4",  # YAML 1.2 float, which plain PyYAML reads as text
            "train.activation_checkpointing=true",
            "logging.wandb.project=123",  # a text field keeps digits as text
            "logging.wandb.name=null",
            "model.arch=gpt",
        ],
    )
    assert cfg.model.num_layers == 6
    assert cfg.optim.lr == pytest.approx(2e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.activation_checkpointing == "full"  # the earlier `true`
    assert cfg.logging.wandb.project == "123"
    assert cfg.logging.wandb.name is None
    assert cfg.model.arch == "gpt" and cfg.model.tie_embeddings is True  # gpt default: tied


def test_override_of_a_list_item():
    cfg = load_config(
        CONFIGS / "train/tiny.yaml",
        ["data.path=null", "data.blend=[{path: a}, {path: b}]", "data.blend.1.weight=3"],
    )
    assert [(b.path, b.weight) for b in cfg.data.blend] == [("a", 1.0), ("b", 3.0)]


def test_yaml_files_read_exponent_floats(tmp_path):
    cfg = load_config(write(tmp_path / "a.yaml", "optim: {lr: 1e-3, min_lr: 1E-5}\n"))
    assert (cfg.optim.lr, cfg.optim.min_lr) == (1e-3, 1e-5)


def test_derived_values_are_filled_in():
    cfg = load_config(
        CONFIGS / "train/tiny.yaml", ["parallel.tensor=2", "train.global_batch_size=96"], 8
    )
    assert (cfg.parallel.data, cfg.world_size) == (4, 8)
    assert cfg.train.gradient_accumulation_steps == 3
    # 16 sequences = micro 8 x 4 data-parallel ranks would not fit; the rule says so
    with pytest.raises(ConfigError, match="train.global_batch_size = 16"):
        load_config(CONFIGS / "train/tiny.yaml", world_size=4)
    cfg = load_config(CONFIGS / "train/tiny.yaml", ["train.global_batch_size=64"], world_size=4)
    assert cfg.train.gradient_accumulation_steps == 2


def test_world_size_from_the_cluster_section():
    cfg = load_config(CONFIGS / "train/llama-7b.yaml")
    assert (cfg.cluster.nodes, cfg.cluster.gpus_per_node) == (4, 8)
    assert (cfg.parallel.tensor, cfg.parallel.data) == (2, 16)
    assert cfg.train.gradient_accumulation_steps == 1024 // (2 * 16)
    # an explicit world size wins over the cluster section
    assert load_config(CONFIGS / "train/llama-7b.yaml", world_size=64).parallel.data == 32


def test_architecture_defaults():
    llama = load_config(CONFIGS / "model/llama-7b.yaml", ["model.ffn_hidden_size=null"]).model
    assert llama.ffn_hidden_size == 11008  # 8h/3 rounded up to 256, as Llama sizes its MLP
    assert llama.tie_embeddings is False
    gpt = load_config(CONFIGS / "model/125m.yaml").model
    assert gpt.ffn_hidden_size == 4 * 768 and gpt.tie_embeddings is True
    assert gpt.num_kv_heads == gpt.num_heads


def test_data_only_config_has_no_model():
    cfg = validate_tree({"tokenizer": {"vocab_size": 4096}, "data": {"path": "out"}})
    assert cfg.model is None and cfg.tokenizer.vocab_size == 4096


def test_tokenizer_vocab_defaults_to_the_model_vocab():
    assert load_config(CONFIGS / "model/tiny.yaml").tokenizer.vocab_size == 8192


def test_sections_are_independent_between_configs():
    a = validate_tree({}, world_size=2)
    b = validate_tree({})
    assert (a.parallel.data, b.parallel.data) == (2, 1)


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_resolved_yaml_round_trips(path):
    cfg = load_config(path)
    again = KilnConfig.model_validate(
        yaml.safe_load(dump_config(cfg)), context={"world_size": cfg.world_size}
    )
    assert again == cfg


def test_world_size_must_be_positive():
    with pytest.raises(ConfigError, match="world size = 0"):
        load_config(CONFIGS / "train/tiny.yaml", world_size=0)
