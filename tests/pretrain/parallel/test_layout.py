"""The rank layout: TP fastest, then DP, then pipeline stage; megatron-core and DeepSpeed
must agree on it, and the start-up check notices when they do not."""

from __future__ import annotations

import pytest

from pretrain.parallel.layout import Coordinates, Layout
from tests.support.distributed import run_ranks
from tests.support.layout_workers import agreement

pytestmark = pytest.mark.integration


def test_tensor_rank_varies_fastest_then_data_then_stage():
    layout = Layout(tensor=2, pipeline=2, data=2)
    assert layout.world_size == 8
    assert [layout.coordinates(r) for r in (0, 1, 2, 5, 7)] == [
        Coordinates(pipe=0, data=0, tensor=0),
        Coordinates(pipe=0, data=0, tensor=1),
        Coordinates(pipe=0, data=1, tensor=0),
        Coordinates(pipe=1, data=0, tensor=1),
        Coordinates(pipe=1, data=1, tensor=1),
    ]


def test_megatron_and_deepspeed_agree_on_the_same_layout(tmp_path):
    assert run_ranks(agreement, 2, tmp_path, 2, (2, 1, 1)) == "agree"


def test_a_disagreement_is_reported_with_both_views(tmp_path):
    # megatron-core was given TP=2 but the layout claims two data-parallel replicas
    message = run_ranks(agreement, 2, tmp_path, 2, (1, 1, 2))
    assert message.startswith("rank 1: Kiln's layout says")
    assert "megatron-core Coordinates(pipe=0, data=0, tensor=1)" in message
