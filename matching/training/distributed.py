"""Several processes (torchrun) training or scoring as one, on PyTorch's own distributed engine.

- `setup` joins the process group torchrun describes in the environment
  (NCCL on GPUs, gloo on CPUs) and picks this rank's device.
- `gather_embedded` all-gathers a batch's embeddings with gradients flowing
  back to their owners, so the hardest-negative loss sees the global batch.
- batch normalisation uses the global batch's statistics by itself
  (`matching.model.batchnorm.MaskedBatchNorm1d`), so N processes × batch B
  compute what one process computes on batch N·B.
- `GlobalBatchScores` is the module DistributedDataParallel wraps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from extract.runtime import Launch, resolve_device
from matching.model.collectives import all_gather
from matching.model.encoders import Embedded
from matching.model.tshsr import TSHSR
from matching.retrieval.scoring import ImageSource, SlicedImages, score_matrix


def setup(device: str) -> tuple[Launch, torch.device]:
    """Join the process group if torchrun started us; returns the layout and this rank's device.

    ``--device cuda`` (or ``auto`` on a GPU machine) gives each rank ``cuda:LOCAL_RANK``;
    a device this machine lacks is a `DeviceError`.
    """
    launch = Launch.from_env()
    target = resolve_device(device, launch)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if launch.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    return launch, target


def teardown(launch: Launch) -> None:
    if launch.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _gather_padded(tensor: Tensor, rows: list[int], length: int | None = None) -> Tensor:
    """All-gather tensors of different first (and optionally second) sizes, with autograd."""
    pad_rows = max(rows) - tensor.shape[0]
    pads = [0, 0] * (tensor.dim() - 1) + [0, pad_rows]
    if length is not None and tensor.dim() >= 2:
        pads[-3] = length - tensor.shape[1]  # second dimension
    padded = nn.functional.pad(tensor, pads) if any(pads) else tensor
    parts = all_gather(padded)
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


def gather_vectors(vectors: Tensor) -> Tensor:
    """Every rank's (b, e) vectors, concatenated in rank order; gradients flow back to each owner."""
    sizes = torch.tensor([len(vectors)], device=vectors.device)
    everyone = [torch.zeros_like(sizes) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, sizes)
    return _gather_padded(vectors, [int(s) for s in everyone])


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


@dataclass
class GlobalBatchOutput:
    """A rank's share of the global batch's score matrices (b local rows or columns, G global)."""

    rows: Tensor  # (b, G) this rank's images × every caption
    cols: Tensor  # (G, b) every image × this rank's captions
    global_rows: Tensor  # (b, G) the same for the global vectors' cosines cos(v̄, t̄)
    global_cols: Tensor  # (G, b)
    head_rows: Tensor | None = None  # (b, G) cosines of the first-stage head's vectors (None without a head)
    head_cols: Tensor | None = None  # (G, b)


class GlobalBatchScores(nn.Module):
    """The module DDP wraps: this rank's images against all captions, and all images against its captions."""

    def __init__(self, model: TSHSR) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: Tensor, num_boxes: Tensor, tokens: Tensor, lengths: Tensor) -> GlobalBatchOutput:
        """This rank's rows and columns of the global batch's score matrices (see `GlobalBatchOutput`)."""
        images = self.model.encode_images(features, num_boxes)
        captions = self.model.encode_captions(tokens, lengths)
        all_images, all_captions = gather_embedded(images), gather_embedded(captions)
        out = GlobalBatchOutput(self.model.pair_scores(images, all_captions),
                                self.model.pair_scores(all_images, captions),
                                self.model.global_scores(images, all_captions),
                                self.model.global_scores(all_images, captions))
        if self.model.first_stage is not None:
            image_vectors, caption_vectors = self.model.image_vectors(images), self.model.caption_vectors(captions)
            all_image_vectors = gather_vectors(image_vectors)
            all_caption_vectors = gather_vectors(caption_vectors)
            out.head_rows = image_vectors @ all_caption_vectors.t()
            out.head_cols = all_image_vectors @ caption_vectors.t()
        return out


def score_matrix_ranks(model: TSHSR, images: ImageSource, captions: Sequence[Sequence[int]], launch: Launch,
                       device: torch.device, **kwargs: Any) -> np.ndarray:
    """`score_matrix` with the images split among the ranks; every rank gets the whole matrix.

    Rank r scores its contiguous share of the images against all captions; the
    rows are gathered in rank order, so the result equals one process's.
    """
    return images_split_among_ranks(lambda share: score_matrix(model, share, captions, device=device, **kwargs),
                                    images, launch, device, image_axis=0)


def images_split_among_ranks(score: Callable[[ImageSource], np.ndarray], images: ImageSource, launch: Launch,
                             device: torch.device, image_axis: int) -> np.ndarray:
    """Run `score` on this rank's contiguous share of `images` and gather the shares along `image_axis`.

    Used for the matching score matrix (images on axis 0) and the multi-query round scores
    (rounds × sets × images, images on axis 2); every rank gets the whole array.
    """
    if not launch.distributed:
        return score(images)
    bounds = np.linspace(0, len(images), launch.world_size + 1).astype(int)
    part = score(SlicedImages(images, int(bounds[launch.rank]), int(bounds[launch.rank + 1])))
    moved = np.ascontiguousarray(np.moveaxis(part, image_axis, 0))  # images first, for gather_rows
    # NCCL gathers CUDA tensors only; gloo takes CPU tensors.
    gathered = gather_rows(torch.from_numpy(moved).to(device if dist.get_backend() == "nccl" else "cpu"))
    return np.moveaxis(gathered.cpu().numpy(), 0, image_axis)


def rng_states(launch: Launch, state: Any) -> list[Any]:
    """Every rank's RNG state, in rank order (a collective: all ranks call it)."""
    if not launch.distributed:
        return [state]
    states: list[Any] = [None] * launch.world_size
    dist.all_gather_object(states, state)
    return states


def agree(launch: Launch, flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on any (stop requests must be taken by all ranks together)."""
    if not launch.distributed:
        return flag
    value = torch.tensor([int(flag)], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
