"""The first-stage head trains beside the paper's model and changes nothing the paper's model learns."""

from __future__ import annotations

import pytest
import torch

from matching.config import Config
from matching.data.pairs import Batch
from matching.model.first_stage import first_stage_loss
from matching.model.tshsr import build_model
from matching.retrieval.scoring import pad_tokens
from matching.tasks.matching import train_step
from tests.conftest import random_captions, random_images, tiny_config


def paper_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("first_stage.")}


def batch_of(n: int = 8, seed: int = 0) -> Batch:
    features, num_boxes = random_images(n, 7, 24, seed=seed)
    tokens, lengths = pad_tokens(random_captions(n, 40, seed=seed + 1))
    image_index = torch.arange(n)
    image_index[-1] = image_index[-2]  # two captions of one image: not negatives of each other
    return Batch(torch.from_numpy(features), torch.from_numpy(num_boxes), tokens, lengths, torch.arange(n),
                 image_index)


@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_a_step_with_the_head_gives_the_paper_model_the_same_gradients_and_weights(clip):
    """Same initial weights, same dropout masks, same gradients and same update, bit for bit, with and
    without the head; the clipping threshold 0.05 is far below the gradients' norm, so a shared norm
    (the head's gradient counted in the paper model's) would change the step."""
    models, grads, streams = {}, {}, {}
    for dim in (0, 16):
        torch.manual_seed(3)
        model = build_model(tiny_config(first_stage_dim=dim)).train()  # dropout 0.4: the masks must agree too
        config = Config(model=tiny_config(first_stage_dim=dim)).updated(train={"grad_clip": clip})
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(4)
        outcome = train_step(model, optimizer, batch_of(), config, torch.device("cpu"), hardest=True)
        models[dim], grads[dim] = model, {n: p.grad.clone() for n, p in model.named_parameters()
                                          if not n.startswith("first_stage.")}
        streams[dim] = torch.get_rng_state()
        assert ("first_stage_loss" in outcome.parts) == bool(dim)
    assert grads[0].keys() == grads[16].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[16][name]), name
    with_head, without = paper_state(models[16]), paper_state(models[0])
    assert with_head.keys() == without.keys()
    for name in without:
        assert torch.equal(with_head[name], without[name]), name
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in models[16].first_stage.parameters())
    # the same random stream after the step: the next step's dropout masks agree as well
    assert torch.equal(streams[0], streams[16])


def test_a_training_run_with_the_head_trains_the_same_paper_model(toy, tmp_path):
    """Whole runs (data order, dropout, Adam, clipping, checkpoints) with and without the head: the paper
    model's weights after 12 steps are identical."""
    from matching.training.loop import train
    from tests.conftest import toy_config

    features, captions, vocab = toy
    states = {}
    for dim in (0, 32):
        config = toy_config(epochs=1).updated(model={"first_stage_dim": dim})
        train(config, features=features, captions=captions, vocab_path=vocab, run_dir=tmp_path / str(dim),
              max_steps=12, val_split=None, device="cpu", progress=False, log=lambda line: None)
        states[dim] = torch.load(tmp_path / str(dim) / "checkpoint_last.pt", weights_only=True)
    without = states[0]["model"]
    with_head = {k: v for k, v in states[32]["model"].items() if not k.startswith("first_stage.")}
    assert with_head.keys() == without.keys()
    for name in without:
        assert torch.equal(with_head[name], without[name]), name
    assert states[32]["progress"]["epoch_parts"]["first_stage_loss"] > 0
    assert states[32]["progress"]["epoch_loss"] == states[0]["progress"]["epoch_loss"]


def test_the_head_loss_is_infonce_both_ways_with_other_captions_of_the_image_left_out():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(4, 6), dim=1)
    captions = torch.nn.functional.normalize(torch.randn(4, 6), dim=1)
    same = torch.eye(4, dtype=torch.bool)
    same[2, 3] = same[3, 2] = True  # captions 2 and 3 describe one image
    logits = images @ captions.t() / 0.1
    expected = 0.0
    for i in range(4):
        row = [j for j in range(4) if j == i or not same[i, j]]
        expected -= float(torch.log_softmax(logits[i, row], 0)[row.index(i)])
        column = [j for j in range(4) if j == i or not same[j, i]]
        expected -= float(torch.log_softmax(logits[column, i], 0)[column.index(i)])
    assert float(first_stage_loss(images, captions, 0.1, same)) == pytest.approx(expected, rel=1e-5)


def test_the_head_draws_nothing_from_the_global_random_stream():
    torch.manual_seed(11)
    build_model(tiny_config(first_stage_dim=0))
    after_without = torch.rand(4)
    torch.manual_seed(11)
    build_model(tiny_config(first_stage_dim=24))
    assert torch.equal(torch.rand(4), after_without)
