"""The image pooling's batch norm: padded region slots never enter the statistics (adaptive box counts)."""

from __future__ import annotations

import torch
from torch import nn

from matching.model.batchnorm import MaskedBatchNorm1d
from matching.model.encoders import ImageEncoder
from matching.model.tensors import length_mask


def test_with_every_row_valid_it_is_batchnorm1d():
    torch.manual_seed(0)
    plain, masked = nn.BatchNorm1d(5), MaskedBatchNorm1d(5)
    x = torch.randn(8, 5, 12)
    for _ in range(3):
        torch.testing.assert_close(masked(x, torch.ones(8, 5, dtype=torch.bool)), plain(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked.running_mean, plain.running_mean)
    torch.testing.assert_close(masked.running_var, plain.running_var, atol=1e-6, rtol=1e-5)
    masked.eval(), plain.eval()
    torch.testing.assert_close(masked(x), plain(x))


def test_statistics_are_those_of_the_valid_rows_alone():
    torch.manual_seed(1)
    norm = MaskedBatchNorm1d(4, momentum=1.0)  # running statistics = the last batch's
    x = torch.randn(6, 4, 10)
    mask = torch.rand(6, 4) > 0.4
    mask[0] = True
    norm(x, mask)
    for channel in range(4):
        rows = x[mask[:, channel], channel]  # (valid samples, 10)
        torch.testing.assert_close(norm.running_mean[channel], rows.mean(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(norm.running_var[channel], rows.var(unbiased=True), atol=1e-5, rtol=1e-5)


def test_training_with_adaptive_box_counts_leaves_padded_slots_alone():
    """Images of 3..6 boxes padded to 10 slots: slots 6..9 are never real, their statistics never move,
    and the statistics of the slots that are sometimes real come from real regions only."""
    torch.manual_seed(2)
    encoder = ImageEncoder(img_dim=16, embed_size=8, num_regions=10, dropout=0.0)
    norm = encoder.pool.local_proj[1]
    assert isinstance(norm, MaskedBatchNorm1d)
    encoder.train()
    for _ in range(5):
        num_boxes = torch.randint(3, 7, (12,))
        features = torch.randn(12, 10, 16).abs() * length_mask(num_boxes, 10).unsqueeze(-1)
        encoder(features, num_boxes)
    assert torch.equal(norm.running_mean[6:], torch.zeros(4)) and torch.equal(norm.running_var[6:], torch.ones(4))
    assert (norm.running_mean[:6] != 0).all()
    # A plain BatchNorm1d would have taken the constant bias rows of the padded slots.
    plain = nn.BatchNorm1d(10)
    plain.train()
    local = encoder.fc(features)
    local = local / (local.norm(dim=-1, keepdim=True) + 1e-8) * length_mask(num_boxes, 10).unsqueeze(-1)
    plain(encoder.pool.local_proj[0](local))
    assert (plain.running_var[6:] < 0.95).all()  # zero-variance padded rows pulled the statistics down
