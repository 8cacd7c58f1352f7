"""Autograd-aware collectives of torch.distributed, for the modules that need the global batch.

A leaf module (imported by the batch norm and by `matching.training.distributed`): it needs only torch.
Outside torchrun (no process group) every function is the identity of one process.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from torch import Tensor


@contextlib.contextmanager
def differentiable_collectives() -> Iterator[None]:
    """torch.distributed.nn.functional is the public autograd-aware collectives API; torch 2.14
    marks it deprecated in favour of a private module, so its FutureWarning is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed.nn.functional", category=FutureWarning)
        yield


def world_size() -> int:
    """Processes in the initialised process group (1 when there is none)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum over every process, with gradients flowing back to each."""
    if world_size() == 1:
        return tensor
    import torch.distributed.nn.functional as dist_fn

    with differentiable_collectives():
        return dist_fn.all_reduce(tensor)


def all_gather(tensor: Tensor) -> list[Tensor]:
    """Every process's tensor (same shape on all), in rank order, with gradients flowing back to each."""
    if world_size() == 1:
        return [tensor]
    import torch.distributed.nn.functional as dist_fn

    with differentiable_collectives():
        return list(dist_fn.all_gather(tensor))
