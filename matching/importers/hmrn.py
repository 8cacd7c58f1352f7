"""Import a checkpoint of HMRN's own ``train.py`` (``model_best.pth.tar``, I-T or T-I) as a tshsr-pipe checkpoint.

HMRN (LZH-053/HMRN) saves what SGRAF saves: ``{"model": [img_enc, txt_enc, sim_enc state dicts],
"opt": argparse.Namespace, "epoch", "best_rsum", "Eiters"}``, read here with the same restricted
unpickler (`matching.importers.published`: tensors, plain data and `argparse.Namespace` only; a
pickle naming anything else is refused before it runs). Its modules map one to one onto ours:

    img_enc.fc                          → image_encoder.fc
    txt_enc.embed, txt_enc.cap_rnn      → text_encoder.embed, text_encoder.gru
    sim_enc.v_global_w / t_global_w     → image_encoder.pool / text_encoder.pool (SGRAF's self-attention)
    sim_enc.sim_tranloc_w / sim_tranglo_w → reasoning.sim_local.proj / reasoning.sim_global.proj
    sim_enc.ICR_module.N                → reasoning.layers.N (query, key, update)
    sim_enc.sim_w                       → reasoning.score

The options come from ``opt``: ``cross_attention_direction`` (I-T → i2t, T-I → t2i),
``temperature_lambda_i2t`` / ``_t2i`` (the reasoning's attention uses the t2i one, as HMRN's code
does), ``alpha``, ``beta``, ``tau``, ``max_turns``, the normalisations and the recipe; the sizes come
from the weights. HMRN's queries are their words followed by ``<end>`` (``EOS_idx`` 2), so the model
reads queries with ``query_wrap: end``; the vocabulary is DrillDown's (``vg_vocab_14284.pkl``, given
as it is or converted by ``tshsr-pipe vocab --from-drilldown``). The round weight stays ours
(`matching.config.MultiQueryConfig.round_weight`); ``evaluate --protocol hmrn`` scores with HMRN's
rounded one (docs/multi-query.md, "Reproducing HMRN's table").
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
from matching.config import PRESETS, Config, MultiQueryConfig, TrainConfig
from matching.importers.published import ENCODER_KEYS, POOLING_KEYS, load_into, read_published, rename_keys

DIRECTIONS = {"I-T": "i2t", "T-I": "t2i"}  # HMRN's cross_attention_direction → our direction
HMRN_DROPOUT = 0.4  # nn.Dropout(0.4) of HMRN's text encoder and self-attention poolings (not an option there)

# HMRN name (regex on the key inside its state dict) → our name; \1 carries indices.
_KEY_MAP = {
    **ENCODER_KEYS,
    2: [*POOLING_KEYS,
        (r"sim_tranloc_w\.(weight|bias)", r"reasoning.sim_local.proj.\1"),
        (r"sim_tranglo_w\.(weight|bias)", r"reasoning.sim_global.proj.\1"),
        (r"sim_w\.(weight|bias)", r"reasoning.score.\1"),
        (r"ICR_module\.(\d+)\.graph_query_w\.(weight|bias)", r"reasoning.layers.\1.query.\2"),
        (r"ICR_module\.(\d+)\.graph_key_w\.(weight|bias)", r"reasoning.layers.\1.key.\2"),
        (r"ICR_module\.(\d+)\.sim_graph_w\.(weight|bias)", r"reasoning.layers.\1.update.\2")],
}
# The weights whose shapes give the sizes: (part, key).
_SIZED = ((0, "fc.weight"), (1, "embed.weight"), (2, "v_global_w.embedding_local.1.weight"),
          (2, "sim_tranloc_w.weight"))


def read_hmrn(path: str | os.PathLike) -> dict[str, Any]:
    """Read an HMRN checkpoint with the restricted unpickler; CheckpointError if refused or malformed."""
    return read_published(path, "HMRN")


def _option(opt: argparse.Namespace, name: str, default: Any, kind: type, source: str) -> Any:
    value = getattr(opt, name, default)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: opt.{name} = {value!r} is not a {kind.__name__}") from None


def hmrn_config(opt: argparse.Namespace, parts: list[dict[str, torch.Tensor]], source: str) -> MultiQueryConfig:
    """Our MultiQueryConfig for an HMRN checkpoint: its options, the sizes taken from its weights."""
    missing = [f"{('img_enc', 'txt_enc', 'sim_enc')[part]}.{key}" for part, key in _SIZED if key not in parts[part]]
    if missing:
        raise CheckpointError(f"{source}: not HMRN's layout: no {', '.join(missing)}")
    direction = getattr(opt, "cross_attention_direction", None)
    if direction not in DIRECTIONS:
        raise CheckpointError(f"{source}: opt.cross_attention_direction = {direction!r}; HMRN's checkpoints are "
                              f"{' or '.join(DIRECTIONS)}")
    end = _option(opt, "EOS_idx", 2, int, source)
    if end != 2:
        raise CheckpointError(f"{source}: opt.EOS_idx = {end}; HMRN's queries end with <end> = 2 (DrillDown's "
                              "vocabulary), which is what tshsr-pipe appends")
    fc, embed = parts[0]["fc.weight"], parts[1]["embed.weight"]
    gru = parts[1]
    layers = sum(1 for key in gru if re.fullmatch(r"cap_rnn\.weight_ih_l\d+", key))
    steps = sum(1 for key in parts[2] if re.fullmatch(r"ICR_module\.\d+\.graph_query_w\.weight", key))
    t2i = _option(opt, "temperature_lambda_t2i", 15.0, float, source)
    return MultiQueryConfig(
        vocab_size=int(embed.shape[0]), word_dim=int(embed.shape[1]), img_dim=int(fc.shape[1]),
        embed_size=int(fc.shape[0]), sim_dim=int(parts[2]["sim_tranloc_w.weight"].shape[0]),
        num_regions=int(parts[2]["v_global_w.embedding_local.1.weight"].shape[0]),
        gru_layers=max(layers, 1), bidirectional="cap_rnn.weight_ih_l0_reverse" in gru, dropout=HMRN_DROPOUT,
        normalize_images=not _option(opt, "no_imgnorm", False, bool, source),
        normalize_text=not _option(opt, "no_txtnorm", False, bool, source),
        query_readout="last", max_turns=_option(opt, "max_turns", 10, int, source),
        direction=DIRECTIONS[direction], lambda_i2t=_option(opt, "temperature_lambda_i2t", 5.0, float, source),
        lambda_t2i=t2i, lambda_reasoning=t2i, reasoning_steps=steps,
        local_weight=_option(opt, "alpha", 0.6, float, source),
        reasoning_weight=_option(opt, "beta", 0.3, float, source),
        tau=_option(opt, "tau", 40.0, float, source), query_wrap="end").validate()


def hmrn_recipe(opt: argparse.Namespace, source: str) -> TrainConfig:
    """HMRN's recipe (`PRESETS["hmrn"]`) with the values its ``opt`` recorded."""
    recipe = TrainConfig(**PRESETS["hmrn"])
    recipe.learning_rate = _option(opt, "learning_rate", recipe.learning_rate, float, source)
    recipe.batch_size = _option(opt, "batch_size", recipe.batch_size, int, source)
    recipe.grad_clip = _option(opt, "grad_clip", recipe.grad_clip, float, source)
    recipe.epochs = _option(opt, "num_epochs", recipe.epochs, int, source)
    recipe.lr_decay_epoch = _option(opt, "lr_update", recipe.lr_decay_epoch, int, source)
    recipe.seed = _option(opt, "seed", recipe.seed, int, source)
    return recipe.validate()


def convert_state(parts: list[dict[str, torch.Tensor]], source: str) -> dict[str, torch.Tensor]:
    """HMRN's three state dicts → our state dict; a key that maps to nothing is named."""
    state, unknown = rename_keys(parts, _KEY_MAP)
    if unknown:
        hint = (" (an SGRAF checkpoint? convert it with `tshsr-pipe import-sgraf`)"
                if any(".SGR_module." in key or key.endswith("sim_eval_w.weight") for key in unknown) else "")
        raise CheckpointError(f"{source}: keys not in HMRN's model: {', '.join(unknown[:8])}"
                              + (" …" if len(unknown) > 8 else "") + hint)
    return state


def import_hmrn(path: str | os.PathLike, vocab_path: str | os.PathLike, out: str | os.PathLike) -> tuple[Path, Config]:
    """Convert an HMRN checkpoint (either direction) plus its vocabulary (DrillDown's pickle, or our JSON of it)
    into our checkpoint at `out`."""
    from matching.importers.drilldown import load_any_vocab
    from matching.model.hmrn import build_hmrn

    source = str(path)
    payload = read_hmrn(path)
    parts = list(payload["model"])
    opt = payload["opt"]
    state = convert_state(parts, source)  # another tool's layout is named before its options are read
    model_config = hmrn_config(opt, parts, source)
    vocab = load_any_vocab(vocab_path)
    if len(vocab) != model_config.vocab_size:
        raise CheckpointError(f"{vocab_path}: {len(vocab)} words, but {source} embeds {model_config.vocab_size}; "
                              "use the vocabulary the model was trained with (DrillDown's vg_vocab_14284.pkl)")
    config = Config(model=model_config, train=hmrn_recipe(opt, source), task="multi-query")
    model = build_hmrn(model_config)
    load_into(model, state, source, "HMRN's layout")
    extra = {"imported_from": {"kind": "hmrn", "file": os.path.basename(source),
                               "direction": str(opt.cross_attention_direction),
                               "epoch": int(payload.get("epoch", 0) or 0),
                               "best_rsum": float(payload.get("best_rsum", 0.0) or 0.0)}}
    return checkpoint.save(out, model, config, vocab, **extra), config
