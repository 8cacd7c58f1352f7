"""A search index: a gallery's images encoded once by a model, saved for fast repeated search.

Encoding the regions (2048→d for every box, then the self-attention pooling) costs more than
scoring one query against the whole gallery, so `search --index FILE` keeps the encoded
images (float16) with the checksums of the checkpoint and of the feature shards they came
from; a stale index is refused with a clear message and rebuilt on request.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from extract.safeio import sha256_file
from extract.shards import FeatureStore
from matching.encoders import Embedded
from matching.model import TSHSR
from matching.scoring import StoreImages, encode_images

FORMAT = "tshsr-pipe-index"


class SearchIndexError(ValueError):
    """An index file that does not belong to this checkpoint and gallery."""


def _identity(checkpoint_path: str | os.PathLike, store: FeatureStore, image_ids: list[str]) -> dict:
    return {"checkpoint_sha256": sha256_file(checkpoint_path),
            "shards_sha256": [entry.sha256 for entry in store.manifest.shards], "num_images": len(image_ids)}


def build_index(model: TSHSR, checkpoint_path: str | os.PathLike, store: FeatureStore, image_ids: list[str],
                out: str | os.PathLike, *, device: str = "cpu", batch_size: int = 128) -> tuple[list[str], Embedded]:
    """Encode `image_ids` and write the index atomically; returns (ids, embeddings)."""
    with torch.inference_mode():
        emb = encode_images(model.eval().to(device), StoreImages(store, image_ids), torch.device(device), batch_size)
    payload = {"format": FORMAT, **_identity(checkpoint_path, store, image_ids), "image_ids": list(image_ids),
               "local": emb.local.half().cpu(), "mask": emb.mask.cpu(), "glob": emb.glob.half().cpu()}
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, target)
    return list(image_ids), emb


def load_index(path: str | os.PathLike, checkpoint_path: str | os.PathLike, store: FeatureStore,
               image_ids: list[str]) -> tuple[list[str], Embedded]:
    """The index's ids and embeddings (float32); SearchIndexError if it was built from another model or gallery."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a torn or foreign file
        raise SearchIndexError(f"{path}: not a readable index ({str(error).splitlines()[0][:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SearchIndexError(f"{path}: not a tshsr-pipe search index")
    expected = _identity(checkpoint_path, store, image_ids)
    for key, what in (("checkpoint_sha256", "checkpoint"), ("shards_sha256", "feature shards"),
                      ("num_images", "gallery")):
        if payload.get(key) != expected[key]:
            raise SearchIndexError(f"{path}: built for another {what}; rebuild it with --rebuild-index")
    if payload["image_ids"] != list(image_ids):
        raise SearchIndexError(f"{path}: built for another set of images; rebuild it with --rebuild-index")
    return payload["image_ids"], Embedded(payload["local"].float(), payload["mask"], payload["glob"].float())
