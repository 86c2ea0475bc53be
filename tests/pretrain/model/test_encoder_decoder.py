"""The T5-style encoder-decoder in one process: T5's relative position buckets, a decoder that
never sees the future, an encoder that sees both directions, and the span-corruption loss
wired to the decoder's targets."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.model.encoder_decoder import EncoderDecoder, relative_position_buckets

VOCAB = 300


@pytest.fixture(scope="module")
def model(one_process) -> EncoderDecoder:
    config = ModelConfig(
        arch="t5",
        num_layers=2,
        decoder_layers=2,
        hidden_size=64,
        num_heads=4,
        ffn_hidden_size=96,
        vocab_size=VOCAB,
        max_seq_length=64,
        relative_buckets=8,
        relative_max_distance=20,
    )
    return EncoderDecoder(config, seed=5).eval()


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 20), (16, 40)])
def test_relative_position_buckets_are_t5s(bidirectional, buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    queries, keys = 260, 300  # distances up to 299 past max_distance both ways
    ours = relative_position_buckets(
        queries, keys, bidirectional, buckets, max_distance, torch.device("cpu")
    )
    relative = torch.arange(keys)[None, :] - torch.arange(queries)[:, None]
    theirs = T5Attention._relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=buckets, max_distance=max_distance
    )
    assert torch.equal(ours, theirs)
    assert int(ours.max()) == buckets - 1  # the far buckets are reached


@torch.no_grad()
def test_the_decoder_never_sees_the_future(model):
    encoder_ids = torch.randint(0, VOCAB, (1, 40))
    decoder_ids = torch.randint(0, VOCAB, (1, 12))
    before = model(encoder_ids, decoder_ids)
    changed = decoder_ids.clone()
    changed[0, 7] = (changed[0, 7] + 1) % VOCAB
    after = model(encoder_ids, changed)
    difference = (after - before).abs().amax(dim=-1)[0]
    assert torch.all(difference[:7] == 0), "a position saw a later decoder token"
    assert torch.all(difference[7:] > 1e-6), "the changed token and those after it must change"


@torch.no_grad()
def test_the_encoder_sees_both_directions(model):
    encoder_ids = torch.randint(0, VOCAB, (1, 40))
    before = model.encode(encoder_ids)
    changed = encoder_ids.clone()
    changed[0, 20] = (changed[0, 20] + 1) % VOCAB
    difference = (model.encode(changed) - before).abs().amax(dim=-1)[0]
    assert torch.all(difference > 1e-6), "every encoder position reads token 20"
    decoder_ids = torch.randint(0, VOCAB, (1, 12))
    logits = model(encoder_ids, decoder_ids), model(changed, decoder_ids)
    assert torch.all((logits[1] - logits[0]).abs().amax(dim=-1) > 1e-6)


def test_the_loss_is_the_mean_cross_entropy_of_the_decoders_targets(model):
    encoder_ids = torch.randint(0, VOCAB, (2, 40))
    decoder_ids, targets = torch.randint(0, VOCAB, (2, 2, 12))
    with torch.no_grad():
        logits = model(encoder_ids, decoder_ids)[..., :VOCAB]
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss = model(encoder_ids, decoder_ids, targets)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
