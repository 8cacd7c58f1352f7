"""Checkpoints: a plain dict of tensors and plain data, loaded with ``torch.load(weights_only=True)``.

Layout::

    {"format": "tshsr-pipe", "format_version": 1,
     "config": {"model": {...}, "train": {...}},   # Config.to_dict()
     "vocab": ["<pad>", "<start>", ...],          # index order
     "model": state_dict,
     ...}                                          # training state when saved by train

Written to a temporary file and renamed, so a kill never leaves a torn checkpoint.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from matching.config import Config, ConfigError
from matching.model import TSHSR, build_model
from matching.text import Vocabulary, VocabularyError

FORMAT = "tshsr-pipe"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit; the message names the file."""


def save(path: str | os.PathLike, model: TSHSR, config: Config, vocab: Vocabulary,
         **extra: Any) -> Path:
    """Write model weights, config and vocabulary (plus `extra` plain data) atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_dict(),
               "vocab": list(vocab.words),
               "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, target)
    return target


def load_payload(path: str | os.PathLike) -> dict[str, Any]:
    """The raw checkpoint dict, read with the weights-only unpickler (no code can run)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: refused: it holds objects other than tensors and plain data "
                              f"({_first_line(error)})") from None
    except Exception as error:  # torch raises RuntimeError, EOFError, zipfile errors … for torn files
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(error)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a tshsr-pipe checkpoint (an SGRAF checkpoint? "
                              "convert it with `tshsr-pipe import-sgraf`)")
    if int(payload.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {payload['format_version']} is newer than this "
                              f"tshsr-pipe reads ({FORMAT_VERSION}); upgrade tshsr-pipe")
    return payload


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[TSHSR, Config, Vocabulary]:
    """Rebuild the model from its saved config and load its weights: (model in eval mode, config, vocab)."""
    payload = load_payload(path)
    try:
        config = Config.from_dict(payload["config"])
        vocab = Vocabulary(payload["vocab"])
        model = build_model(config.model)
        model.load_state_dict(payload["model"])
    except (KeyError, ConfigError, VocabularyError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path}: inconsistent checkpoint ({_first_line(error)})") from None
    if len(vocab) != config.model.vocab_size:
        raise CheckpointError(f"{path}: vocabulary of {len(vocab)} words but the model embeds "
                              f"{config.model.vocab_size}")
    return model.to(map_location).eval(), config, vocab


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    blocked = [line for line in lines if "GLOBAL" in line or "global" in line]
    return (blocked or lines or [type(error).__name__])[0][:300]
