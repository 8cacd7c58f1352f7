"""Several processes (torchrun) training or scoring as one, on PyTorch's own distributed engine.

- `setup` joins the process group torchrun describes in the environment
  (NCCL on GPUs, gloo on CPUs) and picks this rank's device.
- `gather_embedded` all-gathers a batch's embeddings with gradients flowing
  back to their owners, so the hardest-negative loss sees the global batch.
- `GlobalBatchNorm1d` normalises with the statistics of the global batch
  (SyncBatchNorm does this on GPUs only; this works with gloo too), so N
  processes × batch B compute what one process computes on batch N·B.
- `GlobalBatchScores` is the module DistributedDataParallel wraps.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from matching.encoders import Embedded
from matching.model import TSHSR
from matching.scoring import ImageSource, SlicedImages, score_matrix


@dataclass
class DistContext:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def _differentiable_collectives():
    """torch.distributed.nn.functional is the public autograd-aware collectives API; torch 2.14
    marks it deprecated in favour of a private module, so its FutureWarning is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed.nn.functional", category=FutureWarning)
        yield


def from_env() -> DistContext:
    """The layout torchrun put in the environment (a single process when there is none)."""
    return DistContext(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
                       int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: str) -> tuple[DistContext, torch.device]:
    """Join the process group if torchrun started us; returns the context and this rank's device.

    With ``--device cuda`` each rank takes ``cuda:LOCAL_RANK``.
    """
    ctx = from_env()
    target = torch.device(device)
    if target.type == "cuda" and ctx.enabled and target.index is None:
        target = torch.device("cuda", ctx.local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if ctx.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    return ctx, target


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def _gather_padded(tensor: Tensor, rows: list[int], length: int | None = None) -> Tensor:
    """All-gather tensors of different first (and optionally second) sizes, with autograd."""
    pad_rows = max(rows) - tensor.shape[0]
    pads = [0, 0] * (tensor.dim() - 1) + [0, pad_rows]
    if length is not None and tensor.dim() >= 2:
        pads[-3] = length - tensor.shape[1]  # second dimension
    padded = nn.functional.pad(tensor, pads) if any(pads) else tensor
    with _differentiable_collectives():
        parts = dist_fn.all_gather(padded)
    return torch.cat([part[:n] for part, n in zip(parts, rows, strict=True)])


def gather_embedded(emb: Embedded) -> Embedded:
    """Every rank's Embedded, concatenated in rank order; gradients flow back to each owner."""
    sizes = torch.tensor([len(emb), emb.local.shape[1]], device=emb.local.device)
    everyone = [torch.zeros_like(sizes) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, sizes)
    rows = [int(s[0]) for s in everyone]
    length = max(int(s[1]) for s in everyone)
    local = _gather_padded(emb.local, rows, length)
    mask = _gather_padded(emb.mask.to(emb.local.dtype), rows, length).bool()
    return Embedded(local, mask, _gather_padded(emb.glob, rows))


def gather_rows(tensor: Tensor) -> Tensor:
    """All-gather (no gradient) tensors whose first dimension differs between ranks."""
    sizes = torch.tensor([tensor.shape[0]], device=tensor.device)
    everyone = [torch.zeros_like(sizes) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, sizes)
    rows = [int(s) for s in everyone]
    padded = nn.functional.pad(tensor, [0, 0] * (tensor.dim() - 1) + [0, max(rows) - tensor.shape[0]])
    parts = [torch.zeros_like(padded) for _ in rows]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, rows, strict=True)])


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch across all ranks.

    Same parameters and buffers as nn.BatchNorm1d (checkpoints are interchangeable).
    """

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        dims = [0] if input.dim() == 2 else [0, 2]  # (B, C) or (B, C, L): statistics per channel C
        count = torch.tensor(float(input.numel() // input.shape[1]), device=input.device)
        stats = torch.stack([input.sum(dims), input.pow(2).sum(dims)])  # (2, C)
        with _differentiable_collectives():
            stats = dist_fn.all_reduce(stats)  # differentiable sum over ranks
            total = dist_fn.all_reduce(count)
        mean = stats[0] / total
        var = stats[1] / total - mean.pow(2)  # biased, as batch norm normalises
        with torch.no_grad():
            momentum = self.momentum if self.momentum is not None else 0.1
            self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
            unbiased = var.detach() * total / (total - 1).clamp(min=1)
            self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
            self.num_batches_tracked.add_(1)
        shape = [1, -1] + [1] * (input.dim() - 2)
        normed = (input - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return normed * self.weight.view(shape) + self.bias.view(shape)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm1d for a GlobalBatchNorm1d with the same state (in place)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            replacement = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                            child.track_running_stats).to(child.weight.device)
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            convert_batchnorm(child)
    return module


class GlobalBatchScores(nn.Module):
    """The module DDP wraps: this rank's images against all captions, and all images against its captions."""

    def __init__(self, model: TSHSR) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: Tensor, num_boxes: Tensor, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """→ (rows (b, G): local images × global captions, cols (G, b): global images × local captions)."""
        images = self.model.encode_images(features, num_boxes)
        captions = self.model.encode_captions(tokens, lengths)
        all_images, all_captions = gather_embedded(images), gather_embedded(captions)
        return self.model.pair_scores(images, all_captions), self.model.pair_scores(all_images, captions)


def score_matrix_ranks(model: TSHSR, images: ImageSource, captions: Sequence[Sequence[int]], ctx: DistContext,
                       device: torch.device, **kwargs: Any) -> np.ndarray:
    """`score_matrix` with the images split among the ranks; every rank gets the whole matrix.

    Rank r scores its contiguous share of the images against all captions; the
    rows are gathered in rank order, so the result equals one process's.
    """
    if not ctx.enabled:
        return score_matrix(model, images, captions, device=device, **kwargs)
    bounds = np.linspace(0, len(images), ctx.world_size + 1).astype(int)
    share = SlicedImages(images, int(bounds[ctx.rank]), int(bounds[ctx.rank + 1]))
    rows = score_matrix(model, share, captions, device=device, **kwargs)
    # NCCL gathers CUDA tensors only; gloo takes CPU tensors.
    gathered = gather_rows(torch.from_numpy(rows).to(device if dist.get_backend() == "nccl" else "cpu"))
    return gathered.cpu().numpy()


def rng_states(ctx: DistContext, state: Any) -> list[Any]:
    """Every rank's RNG state, in rank order (a collective: all ranks call it)."""
    if not ctx.enabled:
        return [state]
    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return states


def agree(ctx: DistContext, flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on any (stop requests must be taken by all ranks together)."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([int(flag)], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
