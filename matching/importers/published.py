"""Reading a checkpoint saved by SGRAF's or HMRN's ``train.py`` without letting it run code.

Both save ``{"model": [img_enc, txt_enc, sim_enc state dicts], "opt": argparse.Namespace,
"epoch", "best_rsum", "Eiters"}`` with plain ``torch.save``. The Namespace makes it a general
pickle, so it is read with torch's weights-only unpickler admitting exactly one extra class,
`argparse.Namespace`: a file whose pickle names anything else (``os.system`` …) is refused
before anything in it runs (docs/pipeline.md, "import-sgraf"; docs/multi-query.md, "import-hmrn").
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from matching import checkpoint
from matching.checkpoint import CheckpointError

PARTS = ("img_enc", "txt_enc", "sim_enc")  # the three state dicts of "model", in order
# The encoders and the self-attention poolings, which SGRAF and HMRN name alike (regex on the key inside its
# part → our name; \1 carries indices). Each importer adds its own similarity and reasoning keys to part 2.
ENCODER_KEYS = {
    0: [(r"fc\.(weight|bias)", r"image_encoder.fc.\1")],
    1: [(r"embed\.weight", r"text_encoder.embed.weight"),
        (r"cap_rnn\.(.+)", r"text_encoder.gru.\1")],
}
POOLING_KEYS = [
    (r"v_global_w\.embedding_local\.([01])\.(.+)", r"image_encoder.pool.local_proj.\1.\2"),
    (r"v_global_w\.embedding_global\.([01])\.(.+)", r"image_encoder.pool.global_proj.\1.\2"),
    (r"v_global_w\.embedding_common\.0\.(.+)", r"image_encoder.pool.score.\1"),
    (r"t_global_w\.embedding_local\.0\.(.+)", r"text_encoder.pool.local_proj.0.\1"),
    (r"t_global_w\.embedding_global\.0\.(.+)", r"text_encoder.pool.global_proj.0.\1"),
    (r"t_global_w\.embedding_common\.0\.(.+)", r"text_encoder.pool.score.\1"),
]


def read_published(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """Read a `kind` ("SGRAF", "HMRN") checkpoint with the restricted unpickler; CheckpointError naming the
    file if it is refused or not in that layout."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such {kind} checkpoint")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: refused: its pickle names objects an {kind} checkpoint does not "
                              f"hold, so it was not loaded ({checkpoint.load_failure(error)})") from None
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable checkpoint ({checkpoint.load_failure(error)})") from None
    if not isinstance(payload, dict) or "model" not in payload or "opt" not in payload:
        raise CheckpointError(f"{path}: not an {kind} checkpoint (expected keys 'model' and 'opt')")
    model = payload["model"]
    if not isinstance(model, (list, tuple)) or len(model) != 3 or not all(isinstance(p, dict) for p in model):
        raise CheckpointError(f"{path}: 'model' should be [img_enc, txt_enc, sim_enc] state dicts")
    if not isinstance(payload["opt"], argparse.Namespace):
        raise CheckpointError(f"{path}: 'opt' is a {type(payload['opt']).__name__}, not {kind}'s Namespace")
    return payload


def rename_keys(parts: Sequence[dict[str, torch.Tensor]],
                key_map: dict[int, list[tuple[str, str]]]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The three state dicts under our names (`key_map`: part → [(regex, replacement)]), and the keys that
    map to nothing, as ``part.key``."""
    state: dict[str, torch.Tensor] = {}
    unknown = []
    for number, part in enumerate(parts):
        for key, value in part.items():
            for pattern, replacement in key_map[number]:
                if re.fullmatch(pattern, key):
                    state[re.sub(pattern, replacement, key)] = value
                    break
            else:
                unknown.append(f"{PARTS[number]}.{key}")
    return state, unknown


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, layout: str) -> None:
    """Load converted weights; BatchNorm step counters that predate torch 0.4.1 are filled with zeros (unused in
    eval). CheckpointError naming the file when the weights do not fit `layout` ("SGRAF's SGR layout")."""
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{source}: weights do not fit {layout} ({checkpoint._first_line(error)})") \
            from None
