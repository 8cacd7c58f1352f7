"""Checkpoints: a plain dict of tensors and plain data, loaded with ``torch.load(weights_only=True)``.

Layout::

    {"format": "tshsr-pipe", "format_version": 1,
     "config": {"model": {...}, "train": {...}},   # Config.to_dict()
     "vocab": ["<pad>", "<start>", ...],          # index order
     "model": state_dict,
     ...}                                          # training state when saved by train

Written to a temporary file and renamed (`extract.safeio.atomic_write`), so a kill or a full disk
never leaves a torn checkpoint.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from extract.safeio import atomic_write
from matching.config import Config, ConfigError
from matching.data.text import Vocabulary, VocabularyError

FORMAT = "tshsr-pipe"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit; the message names the file."""


def save(path: str | os.PathLike, model: torch.nn.Module, config: Config, vocab: Vocabulary,
         **extra: Any) -> Path:
    """Write model weights, config and vocabulary (plus `extra` plain data) atomically.

    A full disk raises `extract.safeio.StorageError` and leaves the previous file intact.
    """
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_dict(),
               "vocab": list(vocab.words),
               "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}
    with atomic_write(path) as handle:
        torch.save(payload, handle)
    return Path(path)


def load_payload(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """The raw checkpoint dict, read with the weights-only unpickler (no code can run).

    `mmap` maps the tensors instead of reading them (cheap when only the plain data is wanted).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        reason = load_failure(error)
        if reason == "GLOBAL argparse.Namespace":  # the options SGRAF's and HMRN's train.py save with the weights
            raise CheckpointError(f"{path}: not a tshsr-pipe checkpoint but one of SGRAF's or HMRN's train.py (it "
                                  "holds their argparse options); convert it with `tshsr-pipe import-sgraf` or "
                                  "`tshsr-pipe import-hmrn`") from None
        if reason.startswith("GLOBAL"):
            raise CheckpointError(f"{path}: refused: it holds objects other than tensors and plain data "
                                  f"({reason}); it was not loaded, as that could run code") from None
        raise CheckpointError(f"{path}: not a checkpoint ({reason})") from None
    except Exception as error:  # torch raises RuntimeError, EOFError, zipfile errors … for torn files
        raise CheckpointError(f"{path}: not a readable checkpoint ({load_failure(error)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a tshsr-pipe checkpoint (an SGRAF or HMRN checkpoint? "
                              "convert it with `tshsr-pipe import-sgraf` or `tshsr-pipe import-hmrn`)")
    if int(payload.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {payload['format_version']} is newer than this "
                              f"tshsr-pipe reads ({FORMAT_VERSION}); upgrade tshsr-pipe")
    return payload


def build_network(config: Config) -> torch.nn.Module:
    """A freshly initialised network for a config of any task (TSHSR for matching, HMRN for multi-query)."""
    from matching.tasks import get_task

    return get_task(config.task).build_model(config.model)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[Any, Config, Vocabulary]:
    """Rebuild the model from its saved config and load its weights: (model in eval mode, config, vocab).

    The model is a `TSHSR` for a matching checkpoint and an `HMRN` for a multi-query one
    (`config.task` says which).
    """
    payload = load_payload(path)
    try:
        config = Config.from_checkpoint(payload["config"])
        vocab = Vocabulary(payload["vocab"])
        model = build_network(config)
        model.load_state_dict(payload["model"])
    except (KeyError, ConfigError, VocabularyError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path}: inconsistent checkpoint ({_first_line(error)})") from None
    if len(vocab) != config.model.vocab_size:
        raise CheckpointError(f"{path}: vocabulary of {len(vocab)} words but the model embeds "
                              f"{config.model.vocab_size}")
    return model.to(map_location).eval(), config, vocab


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines or [type(error).__name__])[0][:300]


def load_failure(error: BaseException) -> str:
    """Why torch could not load a file, in a few words; never torch's advice to load it unsafely.

    A pickle naming a class the weights-only unpickler does not admit gives "GLOBAL module.name".
    """
    text = str(error)
    blocked = re.search(r"GLOBAL ([\w.]+)", text)
    if blocked:
        return f"GLOBAL {blocked.group(1)}"
    first = _first_line(error)
    if "weights_only" in text or "Weights only" in text or len(first) < 12:
        return "damaged, or not written by torch.save"
    if "mmap" in first:  # mmap needs the zip format that torch.save writes since torch 1.6
        return "an old (pre-zip) torch file"
    return first
