"""Every validation rule, given a bad configuration through the real `kiln` command:
exit code 2, one line on stderr naming the key, the value and the rule, no traceback."""

from __future__ import annotations

import pytest

TINY = "configs/train/tiny.yaml"

# (overrides, key that must be named, value as shown, words of the rule)
BAD = [
    # cross-field rules
    (["parallel.tensor=3"], "parallel.tensor", "3", "must divide model.num_heads (8)"),
    (["parallel.tensor=8"], "parallel.tensor", "8", "must divide model.num_kv_heads (4)"),
    (
        ["model.ffn_hidden_size=690", "parallel.tensor=4"],
        "parallel.tensor",
        "4",
        "must divide model.ffn_hidden_size (690)",
    ),
    (["model.num_kv_heads=3"], "model.num_kv_heads", "3", "must divide model.num_heads (8)"),
    (["model.hidden_size=250"], "model.hidden_size", "250", "divisible by model.num_heads"),
    (
        ["model.hidden_size=264", "model.num_heads=24", "model.num_kv_heads=8"],
        "model.hidden_size",
        "264",
        "even head size",
    ),
    (
        ["parallel.pipeline=2", "parallel.zero_stage=2"],
        "parallel.zero_stage",
        "2",
        "do not work with pipeline",
    ),
    (
        ["parallel.pipeline=2", "parallel.zero_stage=3"],
        "parallel.zero_stage",
        "3",
        "do not work with pipeline",
    ),
    (["parallel.pipeline=5"], "parallel.pipeline", "5", "cannot exceed model.num_layers (4)"),
    (["train.seq_length=512"], "train.seq_length", "512", "model.max_seq_length (256)"),
    (
        ["train.gradient_accumulation_steps=3"],
        "train.global_batch_size",
        "16",
        "8 x 3 x 1 = 24",
    ),
    (
        ["train.micro_batch_size=3"],
        "train.global_batch_size",
        "16",
        "multiple of train.micro_batch_size x data-parallel size (3 x 1 = 3)",
    ),
    (["optim.min_lr=0.1"], "optim.min_lr", "0.1", "must not exceed optim.lr"),
    (["optim.warmup_steps=301"], "optim.warmup_steps", "301", "must not exceed train.steps"),
    (["tokenizer.vocab_size=9000"], "tokenizer.vocab_size", "9000", "model.vocab_size (8192)"),
    (["data.path=a", "data.blend=[{path: b}]"], "data.blend", "[...]", "not both"),
    (["data.path=null", "data.blend=[]"], "data.blend", "[]", "at least one entry"),
    (
        ["cluster.gpus_per_node=8", "cluster.procs_per_node=2"],
        "cluster.procs_per_node",
        "2",
        "one process per GPU",
    ),
    (
        ["cluster.nodes=3", "cluster.procs_per_node=1", "parallel.tensor=2"],
        "parallel.tensor",
        "2",
        "cluster.nodes x processes per node (3) must be a multiple",
    ),
    # unknown keys, with suggestions
    (["model.num_layer=4"], "model.num_layer", "4", "did you mean model.num_layers?"),
    (["paralel.tensor=2"], "paralel", "{...}", "did you mean parallel?"),
    (["optim.learning_rate=1"], "optim.learning_rate", "1", "unknown key"),
    (
        ["logging.wandb.mod=online"],
        "logging.wandb.mod",
        "'online'",
        "did you mean logging.wandb.mode",
    ),
    # wrong types
    (["model.num_layers=abc"], "model.num_layers", "'abc'", "valid integer"),
    (["model.num_layers=true"], "model.num_layers", "True", "valid integer"),
    (["model.num_layers=2.5"], "model.num_layers", "2.5", "valid integer"),
    (["optim.lr=fast"], "optim.lr", "'fast'", "valid number"),
    (["model.arch=mamba"], "model.arch", "'mamba'", "'llama', 'gpt', 'bert' or 't5'"),
    # t5 (the tiny recipe has seq_length 256, max_seq_length 256)
    (
        ["model.arch=t5", "parallel.pipeline=2", "model.num_kv_heads=8"],
        "parallel.pipeline",
        "2",
        "two",
    ),
    (
        ["model.arch=t5", "model.positions=rotary", "model.num_kv_heads=8"],
        "model.positions",
        "'rotary'",
        "relative",
    ),
    (["model.positions=relative"], "model.positions", "'relative'", "t5's only"),
    (["model.feed_forward=relu"], "model.feed_forward", "'relu'", "t5 only"),
    (["model.arch=t5", "model.num_kv_heads=4"], "model.num_kv_heads", "4", "grouped-query"),
    (
        ["model.arch=t5", "spans.decoder_length=50", "model.num_kv_heads=8"],
        "spans.decoder_length",
        "50",
        "derived",
    ),
    (
        ["model.arch=t5", "spans.sentinels=10", "model.num_kv_heads=8"],
        "train.seq_length",
        "256",
        "spans.sentinels (10)",
    ),
    (["spans.sentinel_template=<x>"], "spans.sentinel_template", "'<x>'", "one {}"),
    (["train.precision=fp8"], "train.precision", "'fp8'", "'fp32', 'bf16' or 'fp16'"),
    (["logging.wandb.mode=on"], "logging.wandb.mode", "'on'", "'offline', 'online' or 'disabled'"),
    (["optim.schedule=step"], "optim.schedule", "'step'", "'cosine', 'linear' or 'constant'"),
    (["data.blend=[{path: a, weight: -1}]"], "data.blend[0].weight", "-1", "greater than 0"),
    # negative and zero sizes
    (["model.num_layers=-2"], "model.num_layers", "-2", "greater than 0"),
    (["model.hidden_size=0"], "model.hidden_size", "0", "greater than 0"),
    (["model.vocab_size=-1"], "model.vocab_size", "-1", "greater than 0"),
    (["train.micro_batch_size=0"], "train.micro_batch_size", "0", "greater than 0"),
    (["train.steps=-10"], "train.steps", "-10", "greater than 0"),
    (["parallel.tensor=0"], "parallel.tensor", "0", "greater than 0"),
    (["parallel.zero_stage=4"], "parallel.zero_stage", "4", "less than or equal to 3"),
    (["optim.lr=-0.1"], "optim.lr", "-0.1", "greater than 0"),
    (["optim.weight_decay=-1"], "optim.weight_decay", "-1", "greater than or equal to 0"),
    (["train.seed=-1"], "train.seed", "-1", "greater than or equal to 0"),
    # the masked-LM objective of encoders
    (["masking.probability=0"], "masking.probability", "0", "greater than 0"),
    (["masking.probability=1.0"], "masking.probability", "1.0", "less than 1"),
    (
        ["masking.mask_fraction=0.9", "masking.random_fraction=0.2"],
        "masking.random_fraction",
        "0.2",
        "plus masking.mask_fraction (0.9) must not exceed 1",
    ),
    (
        ["model.arch=bert", "model.tie_embeddings=false"],
        "model.tie_embeddings",
        "False",
        "masked-LM decoder is its embedding matrix",
    ),
]


def assert_one_clean_line(result, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.mark.parametrize(("overrides", "key", "value", "rule"), BAD, ids=lambda x: str(x))
def test_rule_violation_is_one_line_naming_key_value_and_rule(kiln, overrides, key, value, rule):
    result = kiln("config", "validate", TINY, *overrides)
    line = assert_one_clean_line(result, rule)
    assert f"invalid configuration: {key} = {value}:" in line


def test_world_size_must_equal_tensor_pipeline_data(kiln):
    result = kiln("config", "validate", TINY, "parallel.data=3", "--world-size", "4")
    assert_one_clean_line(result, "parallel.data = 3", "world size (4) must equal")


def test_world_size_must_be_a_multiple_of_model_parallel_size(kiln):
    result = kiln("config", "validate", TINY, "parallel.tensor=2", "--world-size", "3")
    assert_one_clean_line(result, "parallel.tensor = 2", "world size (3) must be a multiple")


def test_global_batch_counts_every_data_parallel_rank(kiln):
    # micro 8 x 4 ranks = 32 sequences per micro step, which 16 cannot hold
    result = kiln("config", "validate", TINY, "--world-size", "4")
    assert_one_clean_line(result, "train.global_batch_size = 16", "(8 x 4 = 32)")


def test_several_problems_are_counted_on_the_one_line(kiln):
    result = kiln("config", "validate", TINY, "model.num_layers=-1", "train.steps=0")
    assert_one_clean_line(result, "model.num_layers = -1", "(and 1 more problem)")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("model: [1\n", "invalid YAML at line 2"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("extends: 3\n", "must be a path or a list of paths"),
        ("extends: [missing.yaml]\n", "missing.yaml: configuration file not found"),
        ("extends: [self.yaml]\n", "extends itself"),
    ],
)
def test_broken_files_are_one_line(kiln, tmp_path, content, message):
    path = tmp_path / "self.yaml"
    path.write_text(content)
    assert_one_clean_line(kiln("config", "validate", str(path)), message)


def test_missing_config_file(kiln):
    assert_one_clean_line(kiln("config", "show", "configs/nope.yaml"), "file not found")


def test_malformed_override(kiln):
    assert_one_clean_line(kiln("config", "show", TINY, "model"), "must look like section.key=value")


def test_override_into_a_value(kiln):
    line = assert_one_clean_line(kiln("config", "show", TINY, "train.steps.x=1"))
    assert "train.steps is a value, not a section" in line
