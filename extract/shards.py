"""The feature-shard format: the contract between `extract` and `matching`.

A feature directory holds ``shard-00000.h5``, ``shard-00001.h5``, ... and
``manifest.json`` (DESIGN §3). This module is the only place that knows the
layout; it needs nothing but h5py and numpy.

Each shard holds, for N images with at most K boxes each:

==============  ==============  ===========================================
dataset         shape / dtype   meaning
==============  ==============  ===========================================
image_ids       (N,) utf-8      the image's id (its path under the input dir)
features        (N, K, D) f16   pooled region features (f32 as an option)
boxes           (N, K, 4) f32   x1 y1 x2 y2 in original-image pixels
num_boxes       (N,) int16      rows past num_boxes are zero
image_size      (N, 2) int32    (height, width) of the original image
object_ids ...  (N, K)          optional detector outputs
==============  ==============  ===========================================

A shard is written as ``*.h5.partial`` and renamed only once complete, then
recorded in the manifest under a file lock, so several processes (torchrun
ranks) can add shards to one directory and a killed run never leaves a
half-written shard where a reader would look.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from extract.safeio import pid_alive, sha256_file, write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_CACHE = "index.json"
LOCK_FILE = ".manifest.lock"
SHARD_PATTERN = "shard-{:05d}.h5"
OPTIONAL_DATASETS = {
    "object_ids": np.int16,
    "object_scores": np.float32,
    "attr_ids": np.int16,
    "attr_scores": np.float32,
}


class ShardFormatError(ValueError):
    """A feature directory or shard does not follow the format; the message names the file."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- manifest


@dataclass
class ShardEntry:
    name: str  # file name inside the feature directory
    num_images: int
    sha256: str


@dataclass
class Manifest:
    """The directory's table of contents; saved as ``manifest.json``."""

    format_version: int = FORMAT_VERSION
    settings: dict[str, Any] = field(default_factory=dict)  # extraction settings of the first run
    shards: list[ShardEntry] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)  # {"path": ..., "reason": ...}
    created: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)

    @property
    def num_images(self) -> int:
        return sum(entry.num_images for entry in self.shards)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "created": self.created,
            "updated": self.updated,
            "num_images": self.num_images,
            "settings": self.settings,
            "shards": [vars(entry) for entry in self.shards],
            "failed": self.failed,
        }

    @classmethod
    def from_dict(cls, payload: dict[str, Any], source: str = MANIFEST) -> Manifest:
        try:
            version = int(payload["format_version"])
            if version > FORMAT_VERSION:
                raise ShardFormatError(
                    f"{source}: format_version {version} is newer than this tshsr-pipe reads "
                    f"({FORMAT_VERSION}); upgrade tshsr-pipe"
                )
            return cls(
                format_version=version,
                settings=dict(payload.get("settings", {})),
                shards=[ShardEntry(str(s["name"]), int(s["num_images"]), str(s["sha256"]))
                        for s in payload.get("shards", [])],
                failed=list(payload.get("failed", [])),
                created=str(payload.get("created", _now())),
                updated=str(payload.get("updated", _now())),
            )
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, ShardFormatError):
                raise
            raise ShardFormatError(f"{source}: not a tshsr-pipe manifest ({error!r})") from None


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Read ``DIR/manifest.json``; a clear ShardFormatError when it is missing or malformed."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise ShardFormatError(f"{directory}: no such feature directory")
    if not path.exists():
        raise ShardFormatError(f"{path}: missing; is {directory} a feature directory written by "
                               "`tshsr-pipe extract` or `import-precomp`?")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardFormatError(f"{path}: unreadable manifest ({error})") from None
    return Manifest.from_dict(payload, str(path))


@contextlib.contextmanager
def locked_manifest(directory: str | os.PathLike) -> Iterator[Manifest]:
    """Read-modify-write the manifest under an exclusive lock; saved atomically on exit.

    The lock (``flock`` on a side file) serialises processes on one machine and on
    shared file systems that honour it, so torchrun ranks can commit shards at once.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            manifest = read_manifest(root) if (root / MANIFEST).exists() else Manifest()
            yield manifest
            manifest.updated = _now()
            write_json(root / MANIFEST, manifest.to_dict(), indent=1)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- writing


def remove_stale_partials(directory: str | os.PathLike) -> list[Path]:
    """Delete ``*.h5.partial`` files left by dead processes of this host; returns them.

    Partial files carry their writer's host and pid in the name, so a live
    writer's file (another rank) is never touched.
    """
    removed = []
    host = socket.gethostname()
    for path in Path(directory).glob("*.h5.partial"):
        parts = path.name[: -len(".h5.partial")].split("~")  # shard~HOST~PID~SEQ
        if len(parts) == 4 and (parts[1] != host or (parts[2].isdigit() and pid_alive(int(parts[2])))):
            continue  # another machine's, or a live writer's
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def adopt_orphan_shards(directory: str | os.PathLike) -> list[str]:
    """Record complete shards that a killed run renamed but did not yet enter in the manifest.

    A shard is renamed into place before the manifest is updated; a kill in
    between leaves a valid shard the manifest does not list. Valid orphans are
    adopted, invalid ones removed. Returns the adopted names.
    """
    root = Path(directory)
    adopted = []
    with locked_manifest(root) as manifest:
        listed = {entry.name for entry in manifest.shards}
        for path in sorted(root.glob("shard-*.h5")):
            if path.name in listed:
                continue
            try:
                with h5py.File(path, "r") as handle:
                    count = int(handle["image_ids"].shape[0])
                    _check_shard_layout(handle, path)
            except (OSError, KeyError, ShardFormatError):
                path.unlink(missing_ok=True)
                continue
            manifest.shards.append(ShardEntry(path.name, count, sha256_file(path)))
            adopted.append(path.name)
    return adopted


@dataclass
class RegionRecord:
    """One image's detector output, ready for a shard."""

    image_id: str
    features: np.ndarray  # (k, D)
    boxes: np.ndarray  # (k, 4) x1 y1 x2 y2, original pixels
    image_size: tuple[int, int]  # (height, width)
    object_ids: np.ndarray | None = None  # (k,)
    object_scores: np.ndarray | None = None
    attr_ids: np.ndarray | None = None
    attr_scores: np.ndarray | None = None


class ShardWriter:
    """Collects RegionRecords and writes them as one shard.

    Records are buffered in memory (a shard is a few hundred images); ``commit``
    writes ``shard~HOST~PID~SEQ.h5.partial``, renames it to the next free
    ``shard-NNNNN.h5`` and enters it in the manifest, all under the manifest lock.
    """

    _sequence = 0

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_boxes: int,
        feature_dim: int = 2048,
        dtype: str = "float16",
        extractor: dict[str, str] | None = None,
    ) -> None:
        if dtype not in ("float16", "float32"):
            raise ValueError(f"feature dtype must be float16 or float32, not {dtype!r}")
        self.directory = Path(directory)
        self.max_boxes = max_boxes
        self.feature_dim = feature_dim
        self.dtype = np.dtype(dtype)
        self.extractor = dict(extractor or {})
        self.records: list[RegionRecord] = []

    def __len__(self) -> int:
        return len(self.records)

    def add(self, record: RegionRecord) -> None:
        k = len(record.boxes)
        if record.features.shape != (k, self.feature_dim):
            raise ValueError(f"{record.image_id}: features {record.features.shape}, "
                             f"expected ({k}, {self.feature_dim})")
        if k > self.max_boxes:
            raise ValueError(f"{record.image_id}: {k} boxes, the shard holds at most {self.max_boxes}")
        self.records.append(record)

    def _write(self, path: Path) -> None:
        n, k, dim = len(self.records), self.max_boxes, self.feature_dim
        features = np.zeros((n, k, dim), self.dtype)
        boxes = np.zeros((n, k, 4), np.float32)
        num_boxes = np.zeros((n,), np.int16)
        sizes = np.zeros((n, 2), np.int32)
        optional = {name: np.zeros((n, k), dt) for name, dt in OPTIONAL_DATASETS.items()
                    if all(getattr(r, name) is not None for r in self.records)}
        for row, record in enumerate(self.records):
            count = len(record.boxes)
            features[row, :count] = record.features
            boxes[row, :count] = record.boxes
            num_boxes[row] = count
            sizes[row] = record.image_size
            for name, array in optional.items():
                array[row, :count] = getattr(record, name)
        with h5py.File(path, "w") as handle:
            handle.create_dataset("image_ids", data=[r.image_id for r in self.records],
                                  dtype=h5py.string_dtype("utf-8"))
            handle.create_dataset("features", data=features, chunks=(1, k, dim))
            handle.create_dataset("boxes", data=boxes)
            handle.create_dataset("num_boxes", data=num_boxes)
            handle.create_dataset("image_size", data=sizes)
            for name, array in optional.items():
                handle.create_dataset(name, data=array)
            handle.attrs["format_version"] = FORMAT_VERSION
            handle.attrs["extractor"] = json.dumps(self.extractor, sort_keys=True)
            handle.attrs["created"] = _now()
            handle.flush()
        with open(path, "rb+") as raw:
            os.fsync(raw.fileno())

    def commit(self, failed: Sequence[dict[str, str]] = (), settings: dict[str, Any] | None = None) -> str | None:
        """Write the buffered records as a complete shard; returns its name (None if empty).

        ``failed`` images (``{"path", "reason"}``) are recorded in the manifest in
        the same locked update, so the manifest never says less than the shards;
        images written by this commit leave the failed list (a successful retry).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        name = None
        if self.records:
            ShardWriter._sequence += 1
            partial = self.directory / (
                f"shard~{socket.gethostname()}~{os.getpid()}~{ShardWriter._sequence}.h5.partial")
            try:
                self._write(partial)
                digest = sha256_file(partial)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
        with locked_manifest(self.directory) as manifest:
            if settings and not manifest.settings:
                manifest.settings = dict(settings)
            if self.records:
                taken = {entry.name for entry in manifest.shards}
                taken |= {p.name for p in self.directory.glob("shard-*.h5")}
                index = 0
                while SHARD_PATTERN.format(index) in taken:
                    index += 1
                name = SHARD_PATTERN.format(index)
                os.replace(partial, self.directory / name)
                manifest.shards.append(ShardEntry(name, len(self.records), digest))
            # An image written now is no longer failed (a retried one that succeeded this time).
            written = {record.image_id for record in self.records}
            manifest.failed = [item for item in manifest.failed if item["path"] not in written]
            known = {item["path"] for item in manifest.failed}
            manifest.failed.extend(item for item in failed if item["path"] not in known)
        self.records = []
        return name


# --------------------------------------------------------------------------- reading


def _check_shard_layout(handle: h5py.File, path: Path) -> None:
    for name in ("image_ids", "features", "boxes", "num_boxes", "image_size"):
        if name not in handle:
            raise ShardFormatError(f"{path}: dataset {name!r} missing")
    n = handle["image_ids"].shape[0]
    features = handle["features"]
    if features.ndim != 3 or features.shape[0] != n:
        raise ShardFormatError(f"{path}: features have shape {features.shape}, expected ({n}, K, D)")
    if handle["boxes"].shape != (n, features.shape[1], 4):
        raise ShardFormatError(f"{path}: boxes have shape {handle['boxes'].shape}")
    if handle["num_boxes"].shape != (n,) or handle["image_size"].shape != (n, 2):
        raise ShardFormatError(f"{path}: num_boxes or image_size has the wrong shape")
    version = int(handle.attrs.get("format_version", 0))
    if version < 1 or version > FORMAT_VERSION:
        raise ShardFormatError(f"{path}: format_version {version}, this tshsr-pipe reads 1..{FORMAT_VERSION}")


@dataclass
class RegionBatch:
    """Features of several images, padded to a common number of boxes."""

    image_ids: list[str]
    features: np.ndarray  # (B, K, D) float32
    boxes: np.ndarray  # (B, K, 4)
    num_boxes: np.ndarray  # (B,) int64
    image_size: np.ndarray  # (B, 2)


class FeatureStore:
    """Random access by image id to every image of a feature directory.

    The id → (shard, row) index is built once and cached in ``index.json``
    beside the manifest, keyed by the shards' checksums. HDF5 files are opened
    lazily and reopened after a fork, so a store can be handed to DataLoader
    workers.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if not self.manifest.shards:
            raise ShardFormatError(f"{self.directory}: the manifest lists no shards (no images extracted)")
        for entry in self.manifest.shards:
            if not (self.directory / entry.name).exists():
                raise ShardFormatError(f"{self.directory / entry.name}: shard listed in the manifest is missing")
        self._index = self._load_index()
        self._handles: dict[str, h5py.File] = {}
        self._pid = os.getpid()
        first = self._handle(self.manifest.shards[0].name)
        self.max_boxes = int(first["features"].shape[1])
        self.feature_dim = int(first["features"].shape[2])
        self.dtype = np.dtype(first["features"].dtype)  # float16 or float32, as written

    @staticmethod
    def has_images(directory: str | os.PathLike) -> bool:
        """True when `directory` has a manifest listing at least one shard."""
        try:
            return bool(read_manifest(directory).shards)
        except ShardFormatError:
            return False

    # The index maps every image id to (shard number, row).
    def _load_index(self) -> dict[str, tuple[int, int]]:
        key = [entry.sha256 for entry in self.manifest.shards]
        cache = self.directory / INDEX_CACHE
        if cache.exists():
            try:
                payload = json.loads(cache.read_text(encoding="utf-8"))
                if payload.get("shards") == key:
                    return {image_id: (int(s), int(r)) for image_id, (s, r) in payload["index"].items()}
            except (OSError, ValueError, KeyError, TypeError):
                pass  # rebuild below
        index: dict[str, tuple[int, int]] = {}
        for number, entry in enumerate(self.manifest.shards):
            path = self.directory / entry.name
            try:
                with h5py.File(path, "r") as handle:
                    _check_shard_layout(handle, path)
                    ids = handle["image_ids"].asstr()[:]
            except OSError as error:
                raise ShardFormatError(f"{path}: unreadable shard ({error})") from None
            for row, image_id in enumerate(ids):
                if image_id in index:
                    other = self.manifest.shards[index[image_id][0]].name
                    raise ShardFormatError(f"{path}: image {image_id!r} also in {other}")
                index[image_id] = (number, row)
        with contextlib.suppress(OSError):  # a read-only directory simply has no cache
            write_json(cache, {"shards": key, "index": index}, indent=None)
        return index

    def _handle(self, name: str) -> h5py.File:
        if os.getpid() != self._pid:  # forked into a worker: never share HDF5 handles
            self._handles, self._pid = {}, os.getpid()
        if name not in self._handles:
            self._handles[name] = h5py.File(self.directory / name, "r")
        return self._handles[name]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._index

    @property
    def image_ids(self) -> list[str]:
        """All ids, in shard order."""
        return list(self._index)

    def locate(self, image_id: str) -> tuple[str, int]:
        """(shard file name, row) of an image; KeyError naming the directory if absent."""
        try:
            number, row = self._index[image_id]
        except KeyError:
            raise KeyError(f"image {image_id!r} is not in {self.directory}") from None
        return self.manifest.shards[number].name, row

    def get(self, image_id: str) -> tuple[np.ndarray, np.ndarray, int, tuple[int, int]]:
        """(features (k, D) float32, boxes (k, 4), k, (height, width)) of one image, unpadded."""
        name, row = self.locate(image_id)
        handle = self._handle(name)
        k = int(handle["num_boxes"][row])
        features = handle["features"][row, :k].astype(np.float32)
        boxes = handle["boxes"][row, :k]
        height, width = (int(v) for v in handle["image_size"][row])
        return features, boxes, k, (height, width)

    def detections(self, image_id: str) -> dict[str, np.ndarray]:
        """The optional detector outputs (object/attribute ids and scores) present for an image."""
        name, row = self.locate(image_id)
        handle = self._handle(name)
        k = int(handle["num_boxes"][row])
        return {key: handle[key][row, :k] for key in OPTIONAL_DATASETS if key in handle}

    def batch(self, image_ids: Sequence[str], max_boxes: int | None = None) -> RegionBatch:
        """Features of several images, padded to ``max_boxes`` (default: the store's K)."""
        k_max = max_boxes or self.max_boxes
        n = len(image_ids)
        features = np.zeros((n, k_max, self.feature_dim), np.float32)
        boxes = np.zeros((n, k_max, 4), np.float32)
        num_boxes = np.zeros((n,), np.int64)
        sizes = np.zeros((n, 2), np.int64)
        for row, image_id in enumerate(image_ids):
            feats, bxs, k, size = self.get(image_id)
            if k > k_max:
                raise ShardFormatError(f"image {image_id!r} has {k} boxes, more than {k_max}")
            features[row, :k], boxes[row, :k], num_boxes[row], sizes[row] = feats, bxs, k, size
        return RegionBatch(list(image_ids), features, boxes, num_boxes, sizes)

    def verify(self) -> list[str]:
        """Check every shard's sha256 against the manifest; returns the problems found."""
        problems = []
        for entry in self.manifest.shards:
            digest = sha256_file(self.directory / entry.name)
            if digest != entry.sha256:
                problems.append(f"{self.directory / entry.name}: sha256 {digest[:12]}… does not match "
                                f"the manifest's {entry.sha256[:12]}…")
        return problems

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles = {}
