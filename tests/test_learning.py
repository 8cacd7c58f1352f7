"""Training with the defaults learns what a bag of words cannot: binding colours to shapes.

Equations pinned to a reference do not show that a model still learns: a default (a loss term,
a sampler) can stop it. These tests train on `make_binding_scenes`, where scenes come in groups
that share their colour and shape words and differ only in which colour goes with which shape,
and compare the trained model with the best any bag-of-words ranker can do on the same test
split (`bag_of_words_ceiling`), not only with chance.
"""

from __future__ import annotations

import pytest
import torch

from matching.config import Config, EvaluationSettings
from pipelines.synthetic import Scene, SceneObject, bag_of_words_ceiling, make_binding_scenes

# A small model and a short schedule; everything else (the loss and its terms, the sampler, the batch norm,
# the fast similarity head, the first stage) is the library's default.
SIZES = {"embed_size": 256, "sim_dim": 64, "word_dim": 64}
SCHEDULE = {"batch_size": 32, "epochs": 3, "warmup_epochs": 2, "learning_rate": 3e-3, "lr_decay_epoch": 0,
            "workers": 0, "features_in_memory": True, "checkpoint_every": 0, "val_images": 0}
MARGIN = 30.0  # R@1 points above the bag-of-words ceiling (measured: about 55 above it)


def test_binding_scenes_defeat_a_bag_of_words():
    scenes = make_binding_scenes(300, seed=4)
    groups: dict[tuple, list[Scene]] = {}
    for scene in scenes:
        bag = (tuple(sorted(o.colour for o in scene.described)), tuple(sorted(o.shape for o in scene.described)))
        groups.setdefault(bag, []).append(scene)
    pairs = {tuple(sorted(o.words for o in scene.described)) for scene in scenes}
    assert len(pairs) == len(scenes)  # no two scenes describe the same objects
    for members in groups.values():
        assert len({scene.split for scene in members}) == 1  # look-alikes stay in one split
    assert min(len(members) for members in groups.values()) >= 2  # every scene has a look-alike
    for scene in scenes:
        described = {(o.colour, o.shape) for o in scene.described}
        unnamed = scene.objects[len(scene.described):]
        assert len(unnamed) >= 2 and not any(o.colour in {c for c, _ in described} for o in unnamed)
    ceiling = bag_of_words_ceiling(scenes, "test")
    assert 30 <= ceiling["t2i_r1"] <= 50 and 30 <= ceiling["i2t_r1"] <= 50


def test_asking_for_more_binding_scenes_than_exist_is_an_error_not_a_hang():
    assert len(make_binding_scenes(3360, seed=1, objects=(3,))) == 3360  # 56 colour sets × 20 shape sets × 3
    with pytest.raises(ValueError, match="at most 3360 different scenes, fewer than 3361"):
        make_binding_scenes(3361, seed=1, objects=(3,))
    # groups of two and three: 840 + 3,360 scenes; the last ones can only come from whichever size has sets left
    assert len(make_binding_scenes(4200, seed=2)) == 4200


def test_the_bag_of_words_ceiling_counts_look_alikes():
    def scene(number: int, *pairs: tuple[str, str]) -> Scene:
        return Scene(f"s{number}", [SceneObject(c, s, "left") for c, s in pairs], "test")

    scenes = [scene(0, ("red", "circle"), ("blue", "star")), scene(1, ("blue", "circle"), ("red", "star")),
              scene(2, ("green", "ring"))]
    # scenes 0 and 1 share a bag: one of them can come first (t2i 2 of 3 bags' scenes), each gets 1/2 (i2t)
    assert bag_of_words_ceiling(scenes, "test") == pytest.approx({"t2i_r1": 200 / 3, "i2t_r1": 100 * 2 / 3})


@pytest.mark.slow
def test_the_defaults_learn_the_binding_a_bag_of_words_cannot(tmp_path):
    from matching.data.vocabulary import build_vocabulary
    from matching.retrieval.evaluate import evaluate_checkpoint
    from matching.training.loop import train
    from pipelines.synthetic import write_feature_dataset

    scenes = make_binding_scenes(1000, seed=0)
    features = write_feature_dataset(tmp_path / "features", scenes, feature_dim=64, max_boxes=16, seed=0,
                                     place_rate=0.0)
    captions = features / "captions.jsonl"
    build_vocabulary(captions, tmp_path / "vocab.json", threshold=1)
    ceiling = bag_of_words_ceiling(scenes, "test")
    torch.manual_seed(0)
    train(Config().updated(model=SIZES, train=SCHEDULE), features=features, captions=captions,
          vocab_path=tmp_path / "vocab.json", run_dir=tmp_path / "run", device="cpu", progress=False,
          log=lambda line: None)
    test = evaluate_checkpoint(tmp_path / "run" / "model_best.pt", features, captions, device="cpu",
                               settings=EvaluationSettings(split="test", protocol="full")).results["full"]
    for direction in ("i2t", "t2i"):
        assert test[f"{direction}_r1"] >= ceiling[f"{direction}_r1"] + MARGIN, (
            f"{direction} R@1 {test[f'{direction}_r1']:.1f}: not {MARGIN} above the bag-of-words ceiling "
            f"{ceiling[f'{direction}_r1']:.1f}")


def test_the_default_step_optimises_the_papers_loss_alone():
    """The defaults add nothing to the paper's hinge: the logged loss is the hinge of the model's scores, and
    the paper model's gradients are that hinge's (the first-stage head learns from detached inputs)."""
    from matching.data.pairs import Batch
    from matching.model.tshsr import build_model
    from matching.retrieval.scoring import pad_tokens
    from matching.tasks.matching import train_step
    from matching.training.loss import hardest_negative_loss
    from tests.conftest import random_captions, random_images, tiny_config

    features, num_boxes = random_images(6, 7, 24, seed=2)
    tokens, lengths = pad_tokens(random_captions(6, 40, seed=3))
    batch = Batch(torch.from_numpy(features), torch.from_numpy(num_boxes), tokens, lengths, torch.arange(6),
                  torch.arange(6))
    defaults = Config().to_dict()
    config = Config.from_dict({**defaults, "model": {**defaults["model"], **tiny_config(dropout=0.0).__dict__}})
    config = config.updated(train={"grad_clip": 0.0})
    torch.manual_seed(1)
    model = build_model(config.model).train()
    reference = build_model(config.model).train()
    reference.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    outcome = train_step(model, optimizer, batch, config, torch.device("cpu"), hardest=True)
    scores = reference(batch.features, batch.num_boxes, tokens, lengths)
    loss = hardest_negative_loss(scores, config.train.margin, hardest=True)
    loss.backward()
    assert outcome.loss == pytest.approx(float(loss.detach()), rel=1e-6)
    expected = {name: p.grad for name, p in reference.named_parameters() if not name.startswith("first_stage.")}
    for name, parameter in model.named_parameters():
        if name in expected:
            got = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
            want = expected[name] if expected[name] is not None else torch.zeros_like(parameter)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
