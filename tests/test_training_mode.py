"""The training-mode forward (batch statistics, dropout placement) against an independent reference.

`tests/reference.py` checks eval mode, where batch norm uses its running statistics and dropout is
off. Here the model is in training mode: the image pooling's batch norms normalise with the
batch's own statistics (over the valid regions only), and dropout acts on the word embeddings and
on both branches of each self-attention pooling. Every dropout module gets a fixed mask, and the
reference below applies the same masks where the design says dropout goes, computing the batch
statistics by hand, image by image and caption by caption on unpadded tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from tests.conftest import random_captions, random_images, tiny_config, tiny_model
from tests.reference import gru_direction, l2n, linear, pair_score

DROPOUT = 0.3


def fixed_masks(model: nn.Module, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """A 0 / 1/(1-p) mask for every dropout module, installed in place of its random draw."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout):
            mask = (torch.rand(shapes[name], generator=generator) > DROPOUT).double() / (1 - DROPOUT)
            masks[name] = mask
            module.forward = lambda x, mask=mask: x * mask.to(x.dtype)
    return masks


def batch_stats(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of all values in `rows` (batch norm's training statistics)."""
    values = torch.cat([r.reshape(-1) for r in rows])
    return values.mean(), values.var(unbiased=False)


def norm(p: dict, name: str, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, channel: int | slice):
    return (x - mean) / torch.sqrt(var + 1e-5) * p[f"{name}.weight"][channel] + p[f"{name}.bias"][channel]


def reference_batch(model, cfg, features, num_boxes, captions, masks) -> torch.Tensor:
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    # Images: V_b = l2norm(fc(regions)); the pooling's local branch is batch-normalised per region slot k
    # over the images that have a region k, its global branch per feature over the batch.
    V = [l2n(linear(p, "image_encoder.fc", features[b, : num_boxes[b]].double())) for b in range(len(features))]
    local = [linear(p, "image_encoder.pool.local_proj.0", v) for v in V]  # (k_b, d)
    query = [linear(p, "image_encoder.pool.global_proj.0", v.mean(0)) for v in V]  # (d,)
    slots = max(int(n) for n in num_boxes)
    stats = [batch_stats([x[k] for x in local if len(x) > k]) for k in range(slots)]
    g_mean = torch.stack(query).mean(0)
    g_var = torch.stack(query).var(0, unbiased=False)
    images = []
    for b, v in enumerate(V):
        rows = torch.stack([norm(p, "image_encoder.pool.local_proj.1", local[b][k], *stats[k], k)
                            for k in range(len(v))])
        loc = torch.tanh(rows) * masks["image_encoder.pool.local_proj.3"][b, : len(v)]
        glo = torch.tanh(norm(p, "image_encoder.pool.global_proj.1", query[b], g_mean, g_var, slice(None)))
        glo = glo * masks["image_encoder.pool.global_proj.3"][b]
        weights = torch.softmax(linear(p, "image_encoder.pool.score", loc * glo)[:, 0], 0)
        images.append((v, l2n((weights[:, None] * v).sum(0))))
    # Captions: dropout on the word embeddings, BiGRU averaged, l2norm; the pooling has no batch norm.
    texts = []
    for c, tokens in enumerate(captions):
        words = p["text_encoder.embed.weight"][torch.tensor(tokens)] * masks["text_encoder.dropout"][c, : len(tokens)]
        T = (gru_direction(p, "", words) + gru_direction(p, "_reverse", words.flip(0)).flip(0)) / 2
        T = l2n(T)
        loc = torch.tanh(linear(p, "text_encoder.pool.local_proj.0", T)) * masks["text_encoder.pool.local_proj.2"][
            c, : len(tokens)]
        glo = torch.tanh(linear(p, "text_encoder.pool.global_proj.0", T.mean(0)))
        glo = glo * masks["text_encoder.pool.global_proj.2"][c]
        weights = torch.softmax(linear(p, "text_encoder.pool.score", loc * glo)[:, 0], 0)
        texts.append((T, l2n((weights[:, None] * T).sum(0))))
    return torch.tensor([[pair_score(p, cfg, im, tx) for tx in texts] for im in images])


def test_training_forward_matches_the_reference_with_batch_statistics_and_dropout():
    for variant in ({}, {"streams": "i2t", "reasoning": "sgr"}):
        cfg = tiny_config(dropout=DROPOUT, **variant)
        model = tiny_model(seed=4, dropout=DROPOUT, **variant)
        features, num_boxes = random_images(5, 7, 24, seed=6, min_boxes=2)
        captions = random_captions(5, 40, seed=7)
        lengths = torch.tensor([len(c) for c in captions])
        tokens = torch.zeros(5, int(lengths.max()), dtype=torch.long)
        for row, c in enumerate(captions):
            tokens[row, : len(c)] = torch.tensor(c)
        d, words = 16, int(lengths.max())
        masks = fixed_masks(model, {"text_encoder.dropout": (5, words, 10),
                                    "image_encoder.pool.local_proj.3": (5, 7, d),
                                    "image_encoder.pool.global_proj.3": (5, d),
                                    "text_encoder.pool.local_proj.2": (5, words, d),
                                    "text_encoder.pool.global_proj.2": (5, d)})
        model.train()
        with torch.no_grad():
            scores = model(torch.from_numpy(features), torch.from_numpy(num_boxes), tokens, lengths)
        expected = reference_batch(model, cfg, torch.from_numpy(features), num_boxes, captions, masks)
        torch.testing.assert_close(scores.double(), expected.double(), atol=1e-5, rtol=1e-5)
        # The masks matter: the same batch in eval mode scores differently.
        model.eval()
        with torch.no_grad():
            assert (model(torch.from_numpy(features), torch.from_numpy(num_boxes), tokens, lengths).double()
                    - expected).abs().max() > 1e-4  # 20× the tolerance above

