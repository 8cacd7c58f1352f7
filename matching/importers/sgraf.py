"""Import a published SGRAF SGR checkpoint (``model_best.pth.tar``) as a tshsr-pipe checkpoint.

SGRAF saves ``{"model": [img_enc, txt_enc, sim_enc state dicts], "opt":
argparse.Namespace, "epoch", "best_rsum", "Eiters"}`` with plain ``torch.save``.
The Namespace makes it a general pickle, so it is read with torch's
weights-only unpickler admitting exactly one extra class, `argparse.Namespace`
(`matching.importers.published`, shared with HMRN's importer): a file whose
pickle names anything else (``os.system`` …) is refused before anything in it runs.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

import torch

from matching import checkpoint
from matching.checkpoint import CheckpointError
from matching.config import Config, ModelConfig
from matching.data.text import Vocabulary
from matching.importers.published import ENCODER_KEYS, POOLING_KEYS, load_into, read_published, rename_keys
from matching.model.tshsr import build_model

# SGRAF name (regex on the key inside its state dict) → our name; \1 carries indices.
_KEY_MAP = {
    **ENCODER_KEYS,
    2: [*POOLING_KEYS,
        (r"sim_tranloc_w\.(weight|bias)", r"head.sim_local.proj.\1"),
        (r"sim_tranglo_w\.(weight|bias)", r"head.sim_global.proj.\1"),
        (r"sim_eval_w\.(weight|bias)", r"head.score.\1"),
        (r"SGR_module\.(\d+)\.graph_query_w\.(weight|bias)", r"head.reasoning.\1.query.\2"),
        (r"SGR_module\.(\d+)\.graph_key_w\.(weight|bias)", r"head.reasoning.\1.key.\2"),
        (r"SGR_module\.(\d+)\.sim_graph_w\.(weight|bias)", r"head.reasoning.\1.update.\2")],
}


def read_sgraf(path: str | os.PathLike) -> dict[str, Any]:
    """Read an SGRAF checkpoint with the restricted unpickler; CheckpointError if refused or malformed."""
    return read_published(path, "SGRAF")


def sgraf_config(opt: argparse.Namespace, parts: list[dict[str, torch.Tensor]], source: str) -> ModelConfig:
    """Our ModelConfig for an SGRAF SGR checkpoint: its options, shapes taken from the weights."""
    module = str(getattr(opt, "module_name", "SGR"))
    if module != "SGR":
        raise CheckpointError(f"{source}: an SGRAF {module} checkpoint; only SGR checkpoints can be imported "
                              "(tshsr-pipe has no SAF module)")
    embed = parts[1].get("embed.weight")
    bn = parts[2].get("v_global_w.embedding_local.1.weight")
    if embed is None or bn is None:
        raise CheckpointError(f"{source}: missing txt_enc 'embed.weight' or sim_enc "
                              "'v_global_w.embedding_local.1.weight'")
    steps = sum(1 for key in parts[2] if re.fullmatch(r"SGR_module\.\d+\.graph_query_w\.weight", key))
    return ModelConfig.sgraf_sgr(
        vocab_size=int(embed.shape[0]), word_dim=int(embed.shape[1]),
        img_dim=int(parts[0]["fc.weight"].shape[1]) if "fc.weight" in parts[0] else int(opt.img_dim),
        embed_size=int(getattr(opt, "embed_size", 1024)), sim_dim=int(getattr(opt, "sim_dim", 256)),
        num_regions=int(bn.shape[0]), gru_layers=int(getattr(opt, "num_layers", 1)),
        bidirectional=bool(getattr(opt, "bi_gru", True)),
        normalize_images=not bool(getattr(opt, "no_imgnorm", False)),
        normalize_text=not bool(getattr(opt, "no_txtnorm", False)),
        reasoning_steps=steps, first_stage_dim=0)  # SGRAF has no shortlist head


def convert_state(parts: list[dict[str, torch.Tensor]], source: str) -> dict[str, torch.Tensor]:
    """SGRAF's three state dicts → our state dict; every key must map."""
    state, unknown = rename_keys(parts, _KEY_MAP)
    if unknown:
        hint = " (an HMRN checkpoint? convert it with `tshsr-pipe import-hmrn`)" if any(
            ".ICR_module." in key for key in unknown) else ""
        raise CheckpointError(f"{source}: keys not in SGRAF's SGR model: {', '.join(unknown[:8])}"
                              + (" …" if len(unknown) > 8 else "") + hint)
    return state


def import_sgraf(path: str | os.PathLike, vocab_path: str | os.PathLike,
                 out: str | os.PathLike) -> tuple[Path, Config]:
    """Convert an SGRAF SGR checkpoint plus its vocabulary JSON into our checkpoint at `out`."""
    source = str(path)
    payload = read_sgraf(path)
    parts = list(payload["model"])
    model_config = sgraf_config(payload["opt"], parts, source)
    vocab = Vocabulary.load(vocab_path)
    if len(vocab) != model_config.vocab_size:
        raise CheckpointError(f"{vocab_path}: {len(vocab)} words, but {source} embeds "
                              f"{model_config.vocab_size}; use the vocabulary the model was trained with")
    opt = payload["opt"]
    config = Config(model=model_config)
    config.train.margin = float(getattr(opt, "margin", config.train.margin))
    config.train.learning_rate = float(getattr(opt, "learning_rate", config.train.learning_rate))
    config.train.batch_size = int(getattr(opt, "batch_size", config.train.batch_size))
    config.train.grad_clip = float(getattr(opt, "grad_clip", config.train.grad_clip))
    # SGRAF trained its global vectors only through the global node, never for retrieval on their
    # own, and has no first-stage head: it has no trained shortlist (evaluate and search score every pair).
    config.train.global_loss_weight = 0.0
    model = build_model(model_config)
    load_into(model, convert_state(parts, source), source, "SGRAF's SGR layout")
    extra = {"imported_from": {"kind": "sgraf", "file": os.path.basename(source),
                               "epoch": int(payload.get("epoch", 0) or 0),
                               "best_rsum": float(payload.get("best_rsum", 0.0) or 0.0)}}
    return checkpoint.save(out, model, config, vocab, **extra), config
