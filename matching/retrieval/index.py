"""A search index: a gallery's images encoded once by a model, saved for fast repeated search.

Encoding the regions (2048→d for every box, then the self-attention pooling) costs more than
scoring one query against the whole gallery, so `search --index FILE` keeps the encoded
images, in float32 (exactly what the model computes), with the checksums of the checkpoint
and of the feature shards they came from. `open_index` is the one way in: it loads an index
that fits, builds one that does not exist yet, and refuses a stale one with a message.

Layout (a plain dict, loaded with ``torch.load(weights_only=True)``)::

    {"format": "tshsr-pipe-index", "format_version": 2,
     "checkpoint_sha256": …, "shards_sha256": [...], "num_images": n, "image_ids": [...],
     "local": (n, K, d) float32, "mask": (n, K) bool, "glob": (n, d) float32}

Version 1 (tshsr-pipe 0.1) stored float16 embeddings without a version; it is refused with
the advice to rebuild.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from extract.safeio import atomic_write, sha256_file
from extract.shards import FeatureStore
from matching.model.encoders import Embedded
from matching.model.tshsr import TSHSR
from matching.retrieval.scoring import StoreImages, encode_images

FORMAT = "tshsr-pipe-index"
FORMAT_VERSION = 2


class SearchIndexError(ValueError):
    """An index file that does not belong to this checkpoint and gallery, or cannot be read."""


@dataclass
class GalleryIndex:
    """A gallery's images as the model encodes them."""

    image_ids: list[str]
    encoded: Embedded  # (n, K, d) local, (n, K) mask, (n, d) glob
    built: bool  # True when this call encoded the gallery (and wrote the index)


def _identity(checkpoint_path: str | os.PathLike, store: FeatureStore, image_ids: list[str]) -> dict:
    return {"checkpoint_sha256": sha256_file(checkpoint_path),
            "shards_sha256": [entry.sha256 for entry in store.manifest.shards], "num_images": len(image_ids)}


def build_index(model: TSHSR, checkpoint_path: str | os.PathLike, store: FeatureStore, image_ids: list[str],
                out: str | os.PathLike, *, device: str | torch.device = "cpu", batch_size: int = 128) -> GalleryIndex:
    """Encode `image_ids` and write the index atomically."""
    with torch.inference_mode():
        emb = encode_images(model.eval().to(device), StoreImages(store, image_ids), torch.device(device), batch_size)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **_identity(checkpoint_path, store, image_ids),
               "image_ids": list(image_ids), "local": emb.local.float().cpu(), "mask": emb.mask.cpu(),
               "glob": emb.glob.float().cpu()}
    with atomic_write(out) as handle:
        torch.save(payload, handle)
    return GalleryIndex(list(image_ids), emb, built=True)


def load_index(path: str | os.PathLike, checkpoint_path: str | os.PathLike, store: FeatureStore,
               image_ids: list[str]) -> GalleryIndex:
    """The index at `path`; SearchIndexError if it was built from another model or gallery."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn or foreign file (torch's own message would advise an unsafe load)
        raise SearchIndexError(f"{path}: not a readable search index; rebuild it with --rebuild-index") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SearchIndexError(f"{path}: not a tshsr-pipe search index")
    version = int(payload.get("format_version", 1))
    if version > FORMAT_VERSION:
        raise SearchIndexError(f"{path}: index format_version {version} is newer than this tshsr-pipe reads "
                               f"({FORMAT_VERSION}); upgrade tshsr-pipe or rebuild it with --rebuild-index")
    if version < FORMAT_VERSION:
        raise SearchIndexError(f"{path}: an index of an older tshsr-pipe (format_version {version}, float16 "
                               "embeddings); rebuild it with --rebuild-index")
    expected = _identity(checkpoint_path, store, image_ids)
    for key, what in (("checkpoint_sha256", "checkpoint"), ("shards_sha256", "feature shards"),
                      ("num_images", "gallery")):
        if payload.get(key) != expected[key]:
            raise SearchIndexError(f"{path}: built for another {what}; rebuild it with --rebuild-index")
    if payload["image_ids"] != list(image_ids):
        raise SearchIndexError(f"{path}: built for another set of images; rebuild it with --rebuild-index")
    return GalleryIndex(payload["image_ids"], Embedded(payload["local"], payload["mask"], payload["glob"]),
                        built=False)


def open_index(path: str | os.PathLike, model: TSHSR, checkpoint_path: str | os.PathLike, store: FeatureStore,
               image_ids: list[str], *, rebuild: bool = False, device: str | torch.device = "cpu",
               batch_size: int = 128) -> GalleryIndex:
    """Load the index at `path` if it fits this checkpoint and gallery, build it if it does not exist
    (or `rebuild`), refuse it (SearchIndexError) if it is stale."""
    if Path(path).exists() and not rebuild:
        return load_index(path, checkpoint_path, store, image_ids)
    return build_index(model, checkpoint_path, store, image_ids, path, device=device, batch_size=batch_size)
