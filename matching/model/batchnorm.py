"""Batch normalisation that ignores padding and, under torchrun, uses the global batch's statistics.

The image self-attention pooling normalises per region index (SGRAF's BatchNorm1d over 36
channels, one per region). With adaptive box counts (10–100 regions) most high region slots
are padding in most images; a plain BatchNorm1d would take their statistics from the constant
bias rows of padded slots, and a real region in such a slot would be blown up at evaluation.
`MaskedBatchNorm1d` computes the training statistics over the valid rows only; with every row
valid it computes exactly what `nn.BatchNorm1d` computes.

Under torchrun (several processes) the statistics are summed over all processes with a
differentiable all-reduce, so N processes × batch B normalise as one process with batch N·B
(SyncBatchNorm does this for GPUs only; this works with gloo on CPUs too).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from matching.model.collectives import all_reduce_sum, world_size


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over (B, C) or (B, C, N) whose training statistics skip padded rows.

    Same parameters and buffers as `nn.BatchNorm1d`, so checkpoints (and SGRAF's weights)
    load as they are. `mask` (B, C) marks the valid (sample, channel) rows: for input
    (B, C, N) a row is the N values of one channel of one sample. A channel with no valid
    row in the batch keeps its running statistics and is normalised with them.
    """

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:  # noqa: A002 - nn.BatchNorm1d's name
        """input (B, C) or (B, C, N), mask (B, C) bool or None → same shape as input."""
        distributed = self.training and world_size() > 1
        if not self.training or (mask is None and not distributed):
            return super().forward(input)
        shape = [1, -1] + [1] * (input.dim() - 2)  # broadcast a (C,) vector over input
        per_row = input.shape[2] if input.dim() == 3 else 1
        weight = (mask if mask is not None else input.new_ones(input.shape[:2], dtype=torch.bool)).to(input.dtype)
        weight = weight.unsqueeze(-1) if input.dim() == 3 else weight  # (B, C, 1) or (B, C)
        dims = [0, 2] if input.dim() == 3 else [0]
        stats = torch.stack([(input * weight).sum(dims), (input.pow(2) * weight).sum(dims),
                             weight.sum(0).reshape(-1) * per_row])  # (3, C): Σx, Σx², count
        if distributed:
            stats = all_reduce_sum(stats)
        total, count = stats[:2], stats[2]
        seen = count > 0  # (C,) channels with at least one valid row
        safe = count.clamp(min=1)
        mean = total[0] / safe
        var = (total[1] / safe - mean.pow(2)).clamp(min=0)  # biased, as batch norm normalises
        with torch.no_grad():
            momentum = self.momentum if self.momentum is not None else 0.1
            unbiased = var * safe / (safe - 1).clamp(min=1)
            self.running_mean.copy_(torch.where(seen, (1 - momentum) * self.running_mean + momentum * mean,
                                                self.running_mean))
            self.running_var.copy_(torch.where(seen, (1 - momentum) * self.running_var + momentum * unbiased,
                                               self.running_var))
            self.num_batches_tracked.add_(1)
        mean = torch.where(seen, mean, self.running_mean)
        var = torch.where(seen, var, self.running_var)
        normed = (input - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return normed * self.weight.view(shape) + self.bias.view(shape)
