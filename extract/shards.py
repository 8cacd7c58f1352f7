"""The feature-shard format: the contract between `extract` and `matching`.

A feature directory holds ``shard-00000.h5``, ``shard-00001.h5``, ... and
``manifest.json`` (docs/formats.md, "Feature directories"). This module is the only place that knows the
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
checksums       (N,) uint32     CRC-32 of each image's stored rows (format 2)
object_ids ...  (N, K)          optional detector outputs
==============  ==============  ===========================================

Every read checks the image's checksum (`image_checksum`): a shard truncated or
overwritten under a running process, which HDF5 would read as zeros without a
complaint, is a ShardFormatError naming the shard and the image, never silent
zeros fed to training or scoring.

A shard is built in memory, written as ``*.h5.partial`` and renamed only once
complete, then recorded in the manifest under a file lock, so several processes
(torchrun ranks) can add shards to one directory and a killed run never leaves a
half-written shard where a reader would look.

HDF5 never writes to the disk itself: the library cannot recover from a failed
write (a full disk leaves the file open inside HDF5 with a cache it cannot flush,
and the interpreter then dies in a segmentation fault at exit). The shard is built
in a memory buffer and its bytes are written by `extract.safeio`, whose failures
are one-line `StorageError`s.

Opening a `FeatureStore` checks every shard cheaply (present, the size the manifest
recorded, a readable header, the layout); `verify_features` checks everything
(checksums, shapes, dtypes, ids, box counts, the failed list).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import io
import json
import os
import socket
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from extract.safeio import atomic_write, pid_alive, sha256_file, storage_failure, write_json

FORMAT_VERSION = 2  # 2: every image has a checksum (`checksums`), verified on every read; 1 is still read
MANIFEST = "manifest.json"
INDEX_CACHE = "index.json"
LOCK_FILE = ".manifest.lock"
SHARD_PATTERN = "shard-{:05d}.h5"
FEATURE_DTYPES = ("float16", "float32")
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
    num_bytes: int | None = None  # file size; None in manifests written before sizes were recorded

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "num_images": self.num_images, "sha256": self.sha256}
        if self.num_bytes is not None:
            entry["num_bytes"] = self.num_bytes
        return entry


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
            "shards": [entry.to_dict() for entry in self.shards],
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
                shards=[ShardEntry(str(s["name"]), int(s["num_images"]), str(s["sha256"]),
                                   None if s.get("num_bytes") is None else int(s["num_bytes"]))
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
    try:
        lock = open(root / LOCK_FILE, "a+")  # noqa: SIM115 - closed below, after the unlock
    except OSError as error:
        raise storage_failure(error, root / LOCK_FILE) or error from None
    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            # Only a holder of this lock writes the manifest: a temporary file of it now is a killed writer's.
            for stale in root.glob(f".{MANIFEST}.*.tmp"):
                stale.unlink(missing_ok=True)
            manifest = read_manifest(root) if (root / MANIFEST).exists() else Manifest()
            yield manifest
            manifest.updated = _now()
            write_json(root / MANIFEST, manifest.to_dict(), indent=1)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- writing


def _partial_writer(path: Path) -> tuple[str, str] | None:
    """(host, pid) of a shard's partial file or of its temporary file, from its name; None for other files."""
    name = path.name.lstrip(".")
    if ".h5.partial" not in name:
        return None
    parts = name[: name.index(".h5.partial")].split("~")  # shard~HOST~PID~SEQ
    return (parts[1], parts[2]) if len(parts) == 4 else ("", "")


def remove_stale_partials(directory: str | os.PathLike) -> list[Path]:
    """Delete the partial shards (and their temporary files) left by dead processes of this host; returns them.

    Partial files carry their writer's host and pid in the name, so a live
    writer's file (another rank) is never touched.
    """
    removed = []
    host = socket.gethostname()
    for path in sorted(Path(directory).glob("*.h5.partial*")):
        writer = _partial_writer(path)
        if writer is None:
            continue
        if writer != ("", "") and (writer[0] != host or (writer[1].isdigit() and pid_alive(int(writer[1])))):
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
                    count = _check_shard_layout(handle, path).num_images
            except (OSError, KeyError, ShardFormatError):
                path.unlink(missing_ok=True)
                continue
            manifest.shards.append(ShardEntry(path.name, count, sha256_file(path), path.stat().st_size))
            adopted.append(path.name)
    return adopted


def image_checksum(features: np.ndarray, boxes: np.ndarray, num_boxes: int, image_size: Sequence[int]) -> int:
    """CRC-32 of one image's stored rows: its padded features (K, D) in the shard's dtype, boxes (K, 4) float32,
    its box count (int16) and size (int32 × 2), in that order."""
    crc = zlib.crc32(np.ascontiguousarray(features).data)
    crc = zlib.crc32(np.ascontiguousarray(boxes, dtype=np.float32).data, crc)
    crc = zlib.crc32(np.asarray([num_boxes], np.int16).data, crc)
    return zlib.crc32(np.asarray(image_size, np.int32).data, crc)


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

    def _image(self) -> io.BytesIO:
        """The shard as HDF5 bytes in memory, built from the buffered records.

        HDF5 writes into a memory buffer only, where a write cannot fail; the bytes reach
        the disk through `extract.safeio` (see the module docstring for why).
        """
        n, k, dim = len(self.records), self.max_boxes, self.feature_dim
        boxes = np.zeros((n, k, 4), np.float32)
        num_boxes = np.zeros((n,), np.int16)
        sizes = np.zeros((n, 2), np.int32)
        optional = {name: np.zeros((n, k), dt) for name, dt in OPTIONAL_DATASETS.items()
                    if all(getattr(r, name) is not None for r in self.records)}
        for row, record in enumerate(self.records):
            count = len(record.boxes)
            boxes[row, :count] = record.boxes
            num_boxes[row] = count
            sizes[row] = record.image_size
            for name, array in optional.items():
                array[row, :count] = getattr(record, name)
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as handle:
            handle.create_dataset("image_ids", data=[r.image_id for r in self.records],
                                  dtype=h5py.string_dtype("utf-8"))
            # Row by row (one chunk each), so the features are never held twice besides the records.
            features = handle.create_dataset("features", (n, k, dim), self.dtype, chunks=(1, k, dim))
            padded = np.zeros((k, dim), self.dtype)
            checksums = np.zeros((n,), np.uint32)
            for row, record in enumerate(self.records):
                count = len(record.boxes)
                padded[:count] = record.features
                padded[count:] = 0
                features[row] = padded
                checksums[row] = image_checksum(padded, boxes[row], int(num_boxes[row]), sizes[row])
            handle.create_dataset("boxes", data=boxes)
            handle.create_dataset("num_boxes", data=num_boxes)
            handle.create_dataset("image_size", data=sizes)
            handle.create_dataset("checksums", data=checksums)
            for name, array in optional.items():
                handle.create_dataset(name, data=array)
            handle.attrs["format_version"] = FORMAT_VERSION
            handle.attrs["extractor"] = json.dumps(self.extractor, sort_keys=True)
            handle.attrs["created"] = _now()
        return buffer

    def _write(self, path: Path) -> tuple[str, int]:
        """Write the buffered records as a shard file at `path` (atomically); returns (sha256, bytes)."""
        image = self._image().getbuffer()
        with atomic_write(path) as handle:
            handle.write(image)
        return hashlib.sha256(image).hexdigest(), len(image)

    def commit(self, failed: Sequence[dict[str, str]] = (), settings: dict[str, Any] | None = None) -> str | None:
        """Write the buffered records as a complete shard; returns its name (None if empty).

        ``failed`` images (``{"path", "reason"}``) are recorded in the manifest in
        the same locked update, so the manifest never says less than the shards;
        images written by this commit leave the failed list (a successful retry).
        A full disk raises `StorageError` and leaves no partial file, the manifest and the
        earlier shards as they were, and the records buffered (unless the shard was complete
        and only the manifest could not be saved: the next run adopts it).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        name = None
        renamed = False
        if self.records:
            ShardWriter._sequence += 1
            partial = self.directory / (
                f"shard~{socket.gethostname()}~{os.getpid()}~{ShardWriter._sequence}.h5.partial")
            try:
                digest, size = self._write(partial)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
        try:
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
                    renamed = True
                    manifest.shards.append(ShardEntry(name, len(self.records), digest, size))
                # An image written now is no longer failed (a retried one that succeeded this time).
                written = {record.image_id for record in self.records}
                manifest.failed = [item for item in manifest.failed if item["path"] not in written]
                known = {item["path"] for item in manifest.failed}
                manifest.failed.extend(item for item in failed if item["path"] not in known)
        except BaseException:
            if renamed:  # complete but not in the manifest: the next run adopts it (adopt_orphan_shards)
                self.records = []
            elif self.records:
                partial.unlink(missing_ok=True)
            raise
        self.records = []
        return name


# --------------------------------------------------------------------------- checking


def _verify_hint(directory: str | os.PathLike) -> str:
    return f"run `tshsr-pipe verify {directory}` to check every shard"


@dataclass(frozen=True)
class ShardLayout:
    """What a shard's header says: N images of at most K boxes of D-dimensional features."""

    num_images: int  # N
    max_boxes: int  # K
    feature_dim: int  # D
    dtype: np.dtype  # of the features: float16 or float32


def _check_shard_layout(handle: h5py.File, path: Path) -> ShardLayout:
    """The shard's layout, read from its header; ShardFormatError naming the first way it breaks the format
    (docs/formats.md)."""
    version = handle.attrs.get("format_version", 0)
    if not isinstance(version, (int, np.integer)) or not 1 <= int(version) <= FORMAT_VERSION:
        raise ShardFormatError(f"{path}: format_version {version}, this tshsr-pipe reads 1..{FORMAT_VERSION}")
    for name in ("image_ids", "features", "boxes", "num_boxes", "image_size"):
        if not isinstance(handle.get(name), h5py.Dataset):
            raise ShardFormatError(f"{path}: dataset {name!r} missing")
    ids = handle["image_ids"]
    if ids.ndim != 1 or h5py.check_string_dtype(ids.dtype) is None:
        raise ShardFormatError(f"{path}: image_ids are {ids.dtype} of shape {ids.shape}, expected (N,) strings")
    n = ids.shape[0]
    features = handle["features"]
    if features.ndim != 3 or features.shape[0] != n:
        raise ShardFormatError(f"{path}: features have shape {features.shape}, expected ({n}, K, D)")
    if features.dtype.name not in FEATURE_DTYPES:
        raise ShardFormatError(f"{path}: features are {features.dtype}, expected {' or '.join(FEATURE_DTYPES)}")
    k = features.shape[1]
    expected = {"boxes": ((n, k, 4), np.float32), "num_boxes": ((n,), np.int16), "image_size": ((n, 2), np.int32),
                **{name: ((n, k), dtype) for name, dtype in OPTIONAL_DATASETS.items() if name in handle}}
    if int(version) >= 2:
        if "checksums" not in handle:
            raise ShardFormatError(f"{path}: dataset 'checksums' missing (format_version {version} has one)")
        expected["checksums"] = ((n,), np.uint32)
    for name, (shape, dtype) in expected.items():
        dataset = handle[name]
        if not isinstance(dataset, h5py.Dataset) or dataset.shape != shape or dataset.dtype != np.dtype(dtype):
            found = f"{dataset.dtype} {dataset.shape}" if isinstance(dataset, h5py.Dataset) else "a group"
            raise ShardFormatError(f"{path}: {name} is {found}, expected {np.dtype(dtype)} {shape}")
    return ShardLayout(n, k, features.shape[2], features.dtype)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def check_shard(directory: Path, entry: ShardEntry) -> ShardLayout:
    """The cheap checks of one listed shard: present, of the recorded size, a readable header, the right layout.

    Reads the file's metadata only (milliseconds a shard); `verify_features` reads everything.
    """
    path = directory / entry.name
    if not path.is_file():
        raise ShardFormatError(f"{path}: shard listed in the manifest is missing; {_verify_hint(directory)}")
    size = path.stat().st_size
    if entry.num_bytes is not None and size != entry.num_bytes:
        raise ShardFormatError(f"{path}: {size} bytes, the manifest recorded {entry.num_bytes} (truncated or "
                               f"replaced); {_verify_hint(directory)}")
    try:
        with h5py.File(path, "r") as handle:
            layout = _check_shard_layout(handle, path)
    except ShardFormatError as error:
        raise ShardFormatError(f"{error}; {_verify_hint(directory)}") from None
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        raise ShardFormatError(f"{path}: not a readable HDF5 shard ({_first_line(error)}); "
                               f"{_verify_hint(directory)}") from None
    if layout.num_images != entry.num_images:
        raise ShardFormatError(f"{path}: holds {layout.num_images} images, the manifest says {entry.num_images}; "
                               f"{_verify_hint(directory)}")
    return layout


@dataclass
class Verification:
    """What `verify_report` found: the problems (one line each, [] when clean) and what the directory holds."""

    problems: list[str]
    shards: int = 0
    images: int = 0
    max_boxes: int = 0  # the most boxes a shard allows (K)
    feature_dim: int = 0
    dtype: str = ""

    def summary(self, directory: str | os.PathLike) -> str:
        """One line on a clean directory."""
        shape = f"{self.max_boxes} boxes of {self.feature_dim} {self.dtype} features; " if self.shards else ""
        return (f"{directory}: {self.shards} shards, {self.images} images, {shape}every shard matches the "
                "manifest")


def verify_features(directory: str | os.PathLike, on_shard: Callable[[str], None] | None = None) -> list[str]:
    """The problems `verify_report` finds; [] when the directory is clean."""
    return verify_report(directory, on_shard=on_shard).problems


def verify_report(directory: str | os.PathLike, *, on_start: Callable[[int], None] | None = None,
                  on_shard: Callable[[str], None] | None = None) -> Verification:
    """Check a feature directory against its manifest, reading every byte (the manifest once).

    Checked: every listed shard exists with the recorded size and sha256; its datasets have
    the shapes and dtypes of the shard format (docs/formats.md) and as many images as the
    manifest says; every image matches its checksum (format 2); image ids are non-empty and
    unique across shards; num_boxes lies within 0..K; all shards share D and the feature dtype;
    the failed list holds {path, reason} entries, none of them also stored; no shard file is
    missing from the manifest.
    `on_start(shards)` is called once the manifest is read, `on_shard(name)` after each shard
    (progress).
    """
    root = Path(directory)
    try:
        manifest = read_manifest(root)
    except ShardFormatError as error:
        return Verification([str(error)])
    if on_start:
        on_start(len(manifest.shards))
    problems: list[str] = []
    owner: dict[str, str] = {}  # image id → the shard that holds it
    kinds: dict[tuple[int, str], str] = {}  # (D, dtype) → the first shard that has it
    most_boxes = 0
    for entry in manifest.shards:
        found, boxes = _verify_shard(root, entry, owner, kinds)
        problems.extend(found)
        most_boxes = max(most_boxes, boxes)
        if on_shard:
            on_shard(entry.name)
    if len(kinds) > 1:
        problems.append(f"{root}: the shards differ in feature size or dtype: "
                        + ", ".join(f"{shard} has {dim} {dtype}" for (dim, dtype), shard in kinds.items()))
    listed = {entry.name for entry in manifest.shards}
    if len(listed) != len(manifest.shards):
        problems.append(f"{root / MANIFEST}: a shard is listed twice")
    for path in sorted(root.glob("shard-*.h5")):
        if path.name not in listed:
            problems.append(f"{path}: not in the manifest (a run stopped between writing it and recording it; "
                            "the next `tshsr-pipe extract` into this directory adopts it)")
    seen_failed: set[str] = set()
    for number, item in enumerate(manifest.failed):
        if not (isinstance(item, dict) and isinstance(item.get("path"), str) and isinstance(item.get("reason"), str)):
            problems.append(f"{root / MANIFEST}: failed entry {number} is not {{path, reason}}: {str(item)[:80]}")
            continue
        if item["path"] in seen_failed:
            problems.append(f"{root / MANIFEST}: {item['path']!r} is listed as failed twice")
        seen_failed.add(item["path"])
        if item["path"] in owner:
            problems.append(f"{root / MANIFEST}: {item['path']!r} is listed as failed but stored in "
                            f"{owner[item['path']]}")
    (dim, dtype) = next(iter(kinds), (0, ""))
    return Verification(problems, len(manifest.shards), manifest.num_images, most_boxes, dim, dtype)




def _verify_shard(root: Path, entry: ShardEntry, owner: dict[str, str], kinds: dict[tuple[int, str], str]
                  ) -> tuple[list[str], int]:
    """(the shard's problems, its K: the most boxes it allows; 0 when unreadable)."""
    path = root / entry.name
    if not path.is_file():
        return [f"{path}: shard listed in the manifest is missing"], 0
    problems = []
    size = path.stat().st_size
    if entry.num_bytes is not None and size != entry.num_bytes:
        problems.append(f"{path}: {size} bytes, the manifest recorded {entry.num_bytes}")
    digest = sha256_file(path)
    if digest != entry.sha256:
        problems.append(f"{path}: sha256 {digest[:12]}… does not match the manifest's {entry.sha256[:12]}…")
    try:
        with h5py.File(path, "r") as handle:
            layout = _check_shard_layout(handle, path)
            ids = handle["image_ids"].asstr()[:]
            num_boxes = handle["num_boxes"][:]
            if "checksums" in handle:
                checksums, boxes, sizes = handle["checksums"][:], handle["boxes"][:], handle["image_size"][:]
                bad = [row for row in range(layout.num_images)
                       if image_checksum(handle["features"][row], boxes[row], int(num_boxes[row]), sizes[row])
                       != int(checksums[row])]
                if bad:
                    problems.append(f"{path}: {len(bad)} images do not match their checksums (first {ids[bad[0]]!r}, "
                                    f"row {bad[0]})")
    except ShardFormatError as error:
        return [*problems, str(error)], 0
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        return [*problems, f"{path}: not a readable HDF5 shard ({_first_line(error)})"], 0
    kinds.setdefault((layout.feature_dim, layout.dtype.name), entry.name)
    if layout.num_images != entry.num_images:
        problems.append(f"{path}: holds {layout.num_images} images, the manifest says {entry.num_images}")
    if any(not image_id for image_id in ids):
        problems.append(f"{path}: an image id is empty (row {[bool(i) for i in ids].index(False)})")
    for image_id in ids:
        if image_id in owner:
            where = "twice in this shard" if owner[image_id] == entry.name else f"also in {owner[image_id]}"
            problems.append(f"{path}: image {image_id!r} {where}")
            break  # one line a shard: a shard stored twice would otherwise list every id
        owner[image_id] = entry.name
    for image_id in ids:  # the remaining ids still count as seen
        owner.setdefault(image_id, entry.name)
    outside = np.flatnonzero((num_boxes < 0) | (num_boxes > layout.max_boxes))
    if len(outside):
        problems.append(f"{path}: {len(outside)} images have num_boxes outside 0..{layout.max_boxes} "
                        f"(first {ids[outside[0]]!r}: {int(num_boxes[outside[0]])})")
    return problems, layout.max_boxes


# --------------------------------------------------------------------------- importing


@dataclass
class ShardImport:
    """What `import_shards` did."""

    written: int  # images written by this call
    skipped: int  # images already in the directory (a resumed import, or an id seen before in this one)
    feature_dim: int  # D of the directory's shards (0 when nothing was written or found)
    max_boxes: int  # K of the directory's shards


def import_shards(out: str | os.PathLike, items: Iterable[tuple[str, Callable[[], RegionRecord]] | None], *,
                  max_boxes: int, dtype: str = "float16", extractor: dict[str, str] | None = None,
                  settings: dict[str, Any] | None = None, shard_size: int = 1000,
                  check: Callable[[RegionRecord, int, int], None] | None = None,
                  on_images: Callable[[int], None] | None = None) -> ShardImport:
    """The resumable loop of every feature importer: (image id, reader) pairs → shards in `out`.

    Before writing, what a killed earlier run left is tidied: its partial files are removed
    and a shard it renamed but did not record is adopted (`remove_stale_partials`,
    `adopt_orphan_shards`). Images already in the directory, or met earlier in `items`, are
    skipped without calling their reader; a rerun therefore continues where a kill, a full disk
    or an error stopped, and the directory keeps its own K and D. Shards of `shard_size` images
    are committed as they fill (a kill loses at most one shard's work); a None among the items
    commits the shard begun (so that, e.g., each split has shards of its own). `check(record, K, D)`
    may refuse a record with an error naming its source; `on_images(n)` is called with each
    committed shard's image count.
    """
    out = Path(out)
    if out.is_dir():
        remove_stale_partials(out)
        if any(out.glob("shard-*.h5")):
            adopt_orphan_shards(out)
    present: set[str] = set()
    feature_dim = 0
    if FeatureStore.has_images(out):
        store = FeatureStore(out)
        present, feature_dim, max_boxes = set(store.image_ids), store.feature_dim, store.max_boxes
        store.close()
    writer: ShardWriter | None = None
    written = skipped = 0

    def commit() -> None:
        nonlocal written
        assert writer is not None
        count = len(writer)
        writer.commit(settings=settings)
        written += count
        if on_images:
            on_images(count)

    for item in items:
        if item is None:
            if writer is not None and len(writer):
                commit()
            continue
        image_id, read = item
        if image_id in present:
            skipped += 1
            continue
        record = read()
        feature_dim = feature_dim or record.features.shape[1]
        if check is not None:
            check(record, max_boxes, feature_dim)
        if writer is None:
            writer = ShardWriter(out, max_boxes=max_boxes, feature_dim=feature_dim, dtype=dtype,
                                 extractor=extractor or {})
        writer.add(record)
        present.add(image_id)
        if len(writer) == shard_size:
            commit()
    if writer is not None and len(writer):
        commit()
    return ShardImport(written, skipped, feature_dim, max_boxes)


# --------------------------------------------------------------------------- reading


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

    Opening checks every shard cheaply (`check_shard`): a missing, truncated or replaced
    shard is a ShardFormatError naming it, before any work starts. The id → (shard, row)
    index is built once and cached in ``index.json`` beside the manifest, keyed by the
    shards' checksums. HDF5 files are opened lazily and reopened after a fork, so a store
    can be handed to DataLoader workers; a read that fails later (a shard damaged during
    the run) is a ShardFormatError naming the shard too.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if not self.manifest.shards:
            raise ShardFormatError(f"{self.directory}: the manifest lists no shards (no images extracted)")
        layouts = [check_shard(self.directory, entry) for entry in self.manifest.shards]
        kinds = {(layout.feature_dim, layout.dtype) for layout in layouts}
        if len(kinds) > 1:
            raise ShardFormatError(f"{self.directory}: the shards differ in feature size or dtype "
                                   f"({sorted((d, t.name) for d, t in kinds)})")
        self.max_boxes = max(layout.max_boxes for layout in layouts)
        self.feature_dim = layouts[0].feature_dim
        self.dtype = np.dtype(layouts[0].dtype)  # float16 or float32, as written
        self._handles: dict[str, h5py.File] = {}
        self._pid = os.getpid()
        self._index = self._load_index()

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
            with self._reading(entry.name):
                with h5py.File(self.directory / entry.name, "r") as handle:
                    ids = handle["image_ids"].asstr()[:]
            for row, image_id in enumerate(ids):
                if image_id in index:
                    other = self.manifest.shards[index[image_id][0]].name
                    raise ShardFormatError(f"{self.directory / entry.name}: image {image_id!r} also in {other}")
                index[image_id] = (number, row)
        with contextlib.suppress(OSError):  # a read-only or full directory simply has no cache
            write_json(cache, {"shards": key, "index": index}, indent=None)
        return index

    @contextlib.contextmanager
    def _reading(self, name: str) -> Iterator[None]:
        """HDF5 read failures → ShardFormatError naming the shard (and the handle is dropped)."""
        try:
            yield
        except (OSError, RuntimeError) as error:
            stale = self._handles.pop(name, None)
            if stale is not None:
                with contextlib.suppress(Exception):
                    stale.close()
            raise ShardFormatError(f"{self.directory / name}: reading failed ({_first_line(error)}); "
                                   f"the shard is damaged or was changed; {_verify_hint(self.directory)}") from None

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
        """(features (k, D) float32, boxes (k, 4), k, (height, width)) of one image, unpadded.

        The image's stored rows are checked against its checksum (format 2 shards): a mismatch
        is a ShardFormatError naming the shard and the image.
        """
        name, row = self.locate(image_id)
        with self._reading(name):
            handle = self._handle(name)
            k = int(handle["num_boxes"][row])
            size = handle["image_size"][row]
            if "checksums" in handle:
                stored = handle["features"][row]  # (K, D) as written, padding included
                boxes = handle["boxes"][row]
                if image_checksum(stored, boxes, k, size) != int(handle["checksums"][row]):
                    raise ShardFormatError(
                        f"{self.directory / name}: image {image_id!r} (row {row}) does not match its checksum: the "
                        f"shard was changed, truncated or damaged after it was written; {_verify_hint(self.directory)}")
                features, boxes = stored[:k].astype(np.float32), boxes[:k]
            else:  # a format 1 shard has no checksums
                features = handle["features"][row, :k].astype(np.float32)
                boxes = handle["boxes"][row, :k]
        return features, boxes, k, (int(size[0]), int(size[1]))

    def detections(self, image_id: str) -> dict[str, np.ndarray]:
        """The optional detector outputs (object/attribute ids and scores) present for an image."""
        name, row = self.locate(image_id)
        with self._reading(name):
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
        """Every check of `verify_features` on this store's directory; the problems found, [] when clean."""
        return verify_features(self.directory)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles = {}
