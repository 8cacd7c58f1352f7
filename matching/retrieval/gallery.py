"""An encoded gallery: a gallery's images as one model encodes them, written once, read row by row.

Encoding the regions costs more than scoring a query against the whole gallery, so `search`
and `serve` keep the gallery encoded (`--index DIR`, `tshsr-pipe index`). On disk it is a
directory whose arrays are memory-mapped: a search reads only the rows of the images it
re-scores (`select`), and resident memory does not grow with the gallery beyond the first
stage's index. Nothing in it reads the feature shards again, so a server keeps answering if
they change under it.

Layout (docs/formats.md, "Encoded galleries")::

    gallery.json        {"format": "tshsr-pipe-gallery", "format_version": 1, "checkpoint_sha256",
                         "shards_sha256", "num_images", "num_regions", "embed_size", "vector_dim",
                         "dtype", "index": {"kind", …}, "parts": [{"name", "num_images"}, …]}
    image_ids.json      the gallery's image ids, in order
    part-00000/         one per encoding process (torchrun ranks), in image order:
        local.npy       (n, K, d) region embeddings, float16 (or float32)
        num_boxes.npy   (n,) int16
        glob.npy        (n, d) float32, v̄
        vectors.npy     (n, e) float32, the first stage's vectors (`TSHSR.image_vectors`)
        boxes.npy       (n, K, 4) float32, sizes.npy (n, 2) int32: what a hit shows
    index.faiss         the first stage's faiss index over every vector (`INDEX_KINDS`)

Building is streamed (a block of images at a time, written as it is encoded), checked against
the free disk space first, and atomic (`extract.safeio.replacing_directory`): a full disk is
one `StorageError` naming the file, and leaves nothing half-written. A gallery built for
another checkpoint or other shards is refused with the advice to rebuild it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.safeio import StorageError, replacing_directory, sha256_file, storage_failure, write_json
from matching.config import FLAT_UP_TO, GALLERY_DTYPES, INDEX_KINDS
from matching.model.encoders import Embedded
from matching.retrieval.shortlist import GlobalIndex, global_vectors

FORMAT = "tshsr-pipe-gallery"
FORMAT_VERSION = 1
GALLERY_FILE = "gallery.json"
IDS_FILE = "image_ids.json"
INDEX_FILE = "index.faiss"
ARRAYS = ("local", "num_boxes", "glob", "vectors", "boxes", "sizes")


class SearchIndexError(ValueError):
    """An encoded gallery that does not belong to this checkpoint and these shards, or cannot be read."""


def index_kind_for(size: int, asked: str = "auto") -> str:
    """The first stage's faiss index for a gallery of `size` images: flat (exact) up to `FLAT_UP_TO`, HNSW beyond;
    `asked` one of `INDEX_KINDS` forces it."""
    if asked == "auto":
        return "flat" if size <= FLAT_UP_TO else "hnsw"
    if asked not in INDEX_KINDS:
        raise SearchIndexError(f"unknown index kind {asked!r}; choose auto or one of {', '.join(INDEX_KINDS)}")
    return asked


class _NpyStream:
    """A .npy file written block by block (the header first), so a full disk is an error at the write that fails."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: str) -> None:
        self.path, self.dtype, self.rows = path, np.dtype(dtype), 0
        self.handle = open(path, "wb")  # noqa: SIM115 - closed by close()
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self.handle, header)

    def write(self, block: np.ndarray) -> None:
        self.handle.write(np.ascontiguousarray(block, dtype=self.dtype).data)
        self.rows += len(block)

    def close(self) -> None:
        self.handle.close()


def _identity(checkpoint_path: str | os.PathLike, store: Any, image_ids: Sequence[str]) -> dict[str, Any]:
    return {"checkpoint_sha256": sha256_file(checkpoint_path),
            "shards_sha256": [entry.sha256 for entry in store.manifest.shards], "num_images": len(image_ids)}


@dataclass
class _Part:
    arrays: dict[str, np.ndarray]  # memory maps (or arrays) of `ARRAYS`
    start: int  # the gallery position of its first image


class EncodedGallery:
    """A gallery's images as the model encodes them (see the module docstring)."""

    def __init__(self, image_ids: list[str], parts: list[_Part], index: GlobalIndex, meta: dict[str, Any],
                 *, path: Path | None = None, built: bool = False) -> None:
        self.image_ids, self.parts, self.index, self.meta = image_ids, parts, index, meta
        self.path, self.built = path, built
        self._starts = np.asarray([part.start for part in parts], np.int64)

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def index_kind(self) -> str:
        return self.index.kind

    def _rows(self, positions: np.ndarray) -> list[tuple[_Part, np.ndarray, np.ndarray]]:
        """(part, rows in it, where they go in the answer) for gallery positions."""
        owner = np.searchsorted(self._starts, positions, side="right") - 1
        found = []
        for number in np.unique(owner):
            where = np.flatnonzero(owner == number)
            part = self.parts[int(number)]
            found.append((part, positions[where] - part.start, where))
        return found

    def take(self, name: str, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows of one of `ARRAYS` for gallery positions, read from the disk only for those rows."""
        positions = np.asarray(positions, np.int64).reshape(-1)
        first = self.parts[0].arrays[name]
        out = np.empty((len(positions), *first.shape[1:]), first.dtype)
        for part, rows, where in self._rows(positions):
            order = np.argsort(rows, kind="stable")  # sorted reads: a forward pass over the file
            out[where[order]] = part.arrays[name][rows[order]]
        return out

    def select(self, positions: Sequence[int] | np.ndarray | slice, device: torch.device | str = "cpu") -> Embedded:
        """The encoded images at gallery positions, as the model's `Embedded` (float32) on `device`."""
        if isinstance(positions, slice):
            positions = np.arange(len(self))[positions]
        positions = np.asarray(positions, np.int64).reshape(-1)
        # torch widens float16 with the processor's vector conversion: 0.8 ms for the 200 images of 36 × 1024
        # a search re-ranks, numpy's astype 6.7 ms (docs/search.md, "serve")
        local = torch.from_numpy(self.take("local", positions)).float()
        counts = torch.from_numpy(self.take("num_boxes", positions).astype(np.int64))
        mask = torch.arange(local.shape[1])[None, :] < counts[:, None]
        glob = torch.from_numpy(self.take("glob", positions))
        return Embedded(local, mask, glob).to(device)

    def blocks(self, size: int, device: torch.device | str = "cpu") -> Any:
        """(start, Embedded) of consecutive blocks of `size` images, for scoring every image."""
        for start in range(0, len(self), size):
            yield start, self.select(slice(start, start + size), device)

    def display(self, position: int) -> tuple[np.ndarray, tuple[int, int]]:
        """(boxes (k, 4) in image pixels, (height, width)) of one image, for drawing a hit."""
        k = int(self.take("num_boxes", [position])[0])
        size = self.take("sizes", [position])[0]
        return self.take("boxes", [position])[0, :k], (int(size[0]), int(size[1]))

    def nearest(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The first stage: each query vector's `k` nearest images, (cosines (q, k), positions (q, k)), best first."""
        return self.index.search(vectors, k)

    # ------------------------------------------------------------------ building and opening

    @classmethod
    def encode(cls, model: torch.nn.Module, store: Any, image_ids: Sequence[str], *, device: torch.device,
               batch_size: int = 128, index_kind: str = "auto") -> EncodedGallery:
        """The gallery encoded in memory (float32, exactly what the model computes): for one search, or a
        small gallery."""
        arrays = _encode_arrays(model, store, list(image_ids), device, batch_size)
        index = GlobalIndex.build(global_vectors(torch.from_numpy(arrays["vectors"])),
                                  index_kind_for(len(image_ids), index_kind))
        meta = {"num_images": len(image_ids), "dtype": "float32", "index": {"kind": index.kind}}
        return cls(list(image_ids), [_Part(arrays, 0)], index, meta, built=True)

    @classmethod
    def open(cls, path: str | os.PathLike, checkpoint_path: str | os.PathLike | None = None, store: Any = None,
             image_ids: Sequence[str] | None = None) -> EncodedGallery:
        """The gallery at `path`, memory-mapped; SearchIndexError if it was built from another checkpoint, other
        shards or other images (the ones given), or cannot be read."""
        import faiss

        path = Path(path)
        if path.is_file():
            raise SearchIndexError(f"{path}: a search index file of an older tshsr-pipe; rebuild it with "
                                   "--rebuild-index (the encoded gallery is now a directory)")
        try:
            meta = json.loads((path / GALLERY_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise SearchIndexError(f"{path}: not a readable encoded gallery ({str(error).splitlines()[0]}); "
                                   "rebuild it with --rebuild-index") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise SearchIndexError(f"{path}: not a tshsr-pipe encoded gallery")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise SearchIndexError(f"{path}: gallery format_version {meta['format_version']} is newer than this "
                                   f"tshsr-pipe reads ({FORMAT_VERSION}); upgrade tshsr-pipe or rebuild it")
        if checkpoint_path is not None and store is not None and image_ids is not None:
            expected = _identity(checkpoint_path, store, image_ids)
            for key, what in (("checkpoint_sha256", "checkpoint"), ("shards_sha256", "feature shards"),
                              ("num_images", "gallery")):
                if meta.get(key) != expected[key]:
                    raise SearchIndexError(f"{path}: built for another {what}; rebuild it with --rebuild-index")
        try:
            ids = json.loads((path / IDS_FILE).read_text(encoding="utf-8"))
            parts, start = [], 0
            for entry in meta["parts"]:
                arrays = {name: np.load(path / entry["name"] / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
                if any(len(array) != entry["num_images"] for array in arrays.values()):
                    raise ValueError(f"{entry['name']}: arrays of another length than {entry['num_images']}")
                parts.append(_Part(arrays, start))
                start += entry["num_images"]
            index = GlobalIndex(faiss.read_index(str(path / INDEX_FILE)), meta["index"]["kind"], start,
                                int(meta["vector_dim"]))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            raise SearchIndexError(f"{path}: a damaged encoded gallery ({str(error).splitlines()[0][:200]}); "
                                   "rebuild it with --rebuild-index") from None
        if image_ids is not None and ids != list(image_ids):
            raise SearchIndexError(f"{path}: built for another set of images; rebuild it with --rebuild-index")
        if start != len(ids) or index.index.ntotal != len(ids):
            raise SearchIndexError(f"{path}: a damaged encoded gallery (its parts and index disagree); rebuild it")
        return cls(ids, parts, index, meta, path=path)


def _encode_arrays(model: torch.nn.Module, store: Any, image_ids: list[str], device: torch.device,
                   batch_size: int, sink: Callable[[dict[str, np.ndarray]], None] | None = None,
                   dtype: str = "float32") -> dict[str, np.ndarray]:
    """Encode images block by block: each block's arrays go to `sink` (streamed to disk), or are gathered
    and returned (in memory)."""
    gathered: dict[str, list[np.ndarray]] = {name: [] for name in ARRAYS}
    was_training = model.training
    model.eval().to(device)
    try:
        with torch.inference_mode():
            for start in range(0, len(image_ids), batch_size):
                ids = image_ids[start:start + batch_size]
                batch = store.batch(ids)
                emb = model.encode_images(torch.from_numpy(batch.features).to(device),
                                          torch.from_numpy(batch.num_boxes).to(device))
                block = {"local": emb.local.float().cpu().numpy().astype(dtype, copy=False),
                         "num_boxes": emb.mask.sum(1).cpu().numpy().astype(np.int16),
                         "glob": emb.glob.float().cpu().numpy(),
                         "vectors": global_vectors(model.image_vectors(emb)),
                         "boxes": _pad_boxes(batch.boxes, emb.local.shape[1]),
                         "sizes": batch.image_size.astype(np.int32)}
                if sink is not None:
                    sink(block)
                else:
                    for name, array in block.items():
                        gathered[name].append(array)
    finally:
        model.train(was_training)
    if sink is not None:
        return {}
    return {name: np.concatenate(arrays) if arrays else np.zeros((0,)) for name, arrays in gathered.items()}


def _pad_boxes(boxes: np.ndarray, k: int) -> np.ndarray:
    """Boxes (B, K_store, 4) cut or padded to the model's K regions."""
    out = np.zeros((len(boxes), k, 4), np.float32)
    width = min(k, boxes.shape[1])
    out[:, :width] = boxes[:, :width]
    return out


def gallery_bytes(num_images: int, num_regions: int, embed_size: int, vector_dim: int, dtype: str) -> int:
    """Disk space of an encoded gallery (the arrays and a flat index)."""
    per_image = (num_regions * embed_size * np.dtype(dtype).itemsize + 2 + embed_size * 4 + 2 * vector_dim * 4
                 + num_regions * 16 + 8)
    return num_images * per_image + (1 << 20)


def build_gallery(model: torch.nn.Module, checkpoint_path: str | os.PathLike, store: Any, image_ids: Sequence[str],
                  out: str | os.PathLike, *, device: torch.device, batch_size: int = 128, dtype: str = "float16",
                  index_kind: str = "auto", launch: Any = None,
                  progress: Callable[[int], None] | None = None) -> EncodedGallery:
    """Encode `image_ids` into an encoded gallery at `out`, atomically (see the module docstring).

    Under torchrun (`launch` with several ranks) each rank encodes its contiguous share into a part
    of its own, and rank 0 merges: it moves the parts into place, writes the ids and the metadata
    and builds the first stage's index (`index_kind`: auto, flat, ivf or hnsw). Every rank returns
    the opened gallery. `dtype`: how the region embeddings are stored (float16 halves the disk and
    the reads; docs/search.md measures what it changes in rankings).
    """
    if dtype not in GALLERY_DTYPES:
        raise SearchIndexError(f"gallery dtype {dtype!r}: choose one of {', '.join(GALLERY_DTYPES)}")
    out = Path(out)
    image_ids = list(image_ids)
    rank, world = (launch.rank, launch.world_size) if launch is not None else (0, 1)
    staging = out.parent / f".{out.name}.parts"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # what a killed build left
        _check_room(out, model, store, len(image_ids), dtype)
        staging.mkdir(parents=True, exist_ok=True)
    _barrier(world)
    bounds = np.linspace(0, len(image_ids), world + 1).astype(int)
    mine = image_ids[bounds[rank]:bounds[rank + 1]]
    part = staging / f"part-{rank:05d}"
    _write_part(model, store, mine, part, device=device, batch_size=batch_size, dtype=dtype, progress=progress)
    _barrier(world)
    if rank == 0:
        identity = _identity(checkpoint_path, store, image_ids)
        with replacing_directory(out) as tmp:
            parts = []
            for number in range(world):
                name = f"part-{number:05d}"
                shutil.move(str(staging / name), str(tmp / name))
                parts.append({"name": name, "num_images": int(bounds[number + 1] - bounds[number])})
            vectors = np.concatenate([np.load(tmp / p["name"] / "vectors.npy") for p in parts])
            kind = index_kind_for(len(image_ids), index_kind)
            index = GlobalIndex.build(vectors, kind)
            _write_index(index, tmp / INDEX_FILE)
            local = np.load(tmp / parts[0]["name"] / "local.npy", mmap_mode="r")
            write_json(tmp / IDS_FILE, image_ids, indent=None)
            write_json(tmp / GALLERY_FILE, {"format": FORMAT, "format_version": FORMAT_VERSION, **identity,
                                            "num_regions": int(local.shape[1]), "embed_size": int(local.shape[2]),
                                            "vector_dim": int(vectors.shape[1]), "dtype": dtype,
                                            "index": {"kind": kind}, "parts": parts})
            del local
        shutil.rmtree(staging, ignore_errors=True)
    _barrier(world)
    gallery = EncodedGallery.open(out)
    gallery.built = True
    return gallery


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _check_room(out: Path, model: torch.nn.Module, store: Any, num_images: int, dtype: str) -> None:
    """A one-line StorageError before any work when the device cannot hold the gallery."""
    embed = model.image_encoder.fc.out_features
    regions = model.image_encoder.num_regions
    with torch.inference_mode():
        probe = model.eval().encode_images(torch.zeros(1, regions, store.feature_dim), torch.tensor([1]))
        vector_dim = int(model.image_vectors(probe).shape[1])
    needed = gallery_bytes(num_images, regions, embed, vector_dim, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if needed > free:
        raise StorageError(f"{out}: the encoded gallery needs {needed / 2**30:.2f} GiB and its device has "
                           f"{free / 2**30:.2f} GiB free; nothing was written (free space, or --index elsewhere)")


def _write_part(model: torch.nn.Module, store: Any, image_ids: list[str], part: Path, *, device: torch.device,
                batch_size: int, dtype: str, progress: Callable[[int], None] | None) -> None:
    """One process's share, streamed block by block into `part`/*.npy."""
    part.mkdir(parents=True, exist_ok=True)
    streams: dict[str, _NpyStream] = {}
    current = None
    try:
        def sink(block: dict[str, np.ndarray]) -> None:
            nonlocal current
            for name, array in block.items():
                if name not in streams:
                    current = part / f"{name}.npy"
                    streams[name] = _NpyStream(current, (len(image_ids), *array.shape[1:]), array.dtype.str)
                current = streams[name].path
                streams[name].write(array)
            if progress is not None:
                progress(len(block["num_boxes"]))

        _encode_arrays(model, store, image_ids, device, batch_size, sink=sink, dtype=dtype)
        if not image_ids:  # an empty share still has its (empty) arrays
            for name in ARRAYS:
                np.save(part / f"{name}.npy", np.zeros((0,), np.float32))
    except BaseException as error:
        failure = storage_failure(error, current or part)
        for stream in streams.values():
            stream.close()
        shutil.rmtree(part, ignore_errors=True)
        if failure is not None and failure is not error:
            raise failure from None
        raise
    for stream in streams.values():
        stream.close()


def _write_index(index: GlobalIndex, path: Path) -> None:
    import faiss

    try:
        faiss.write_index(index.index, str(path))
    except RuntimeError as error:
        failure = storage_failure(OSError(28, str(error)), path) if "write" in str(error).lower() else None
        if failure is not None:
            raise failure from None
        raise


def open_gallery(path: str | os.PathLike, model: torch.nn.Module, checkpoint_path: str | os.PathLike, store: Any,
                 image_ids: Sequence[str], *, rebuild: bool = False, device: torch.device | str = "cpu",
                 batch_size: int = 128, dtype: str = "float16", index_kind: str = "auto") -> EncodedGallery:
    """Open the encoded gallery at `path` if it fits this checkpoint and gallery, build it if it does not exist
    (or `rebuild`), refuse it (SearchIndexError) if it is stale."""
    if Path(path).exists() and not rebuild:
        return EncodedGallery.open(path, checkpoint_path, store, image_ids)
    return build_gallery(model, checkpoint_path, store, image_ids, path, device=torch.device(device),
                         batch_size=batch_size, dtype=dtype, index_kind=index_kind)
