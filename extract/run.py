"""The resumable extraction loop: images → detector → regions → HDF5 shards.

Three stages overlap: decoding and resizing in DataLoader worker processes,
the detector on the main thread (batches of similar aspect ratio), and
shard writing on a writer thread. Completed images are only ever recorded
through `ShardWriter.commit` (``.partial`` file, rename, manifest update
under a lock), so a run killed at any moment leaves complete shards only, and
the next run skips every image they hold, removes dead writers' partial files
and adopts shards a kill left out of the manifest.

Under torchrun, rank r of w takes images r, r+w, r+2w, ... of the sorted
input (before skipping finished ones, so the slices stay disjoint across
reruns) and commits its own shards to the same directory.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.config import ExtractConfig, ExtractError
from extract.images import (
    MIN_INPUT_SIDE,
    ImageError,
    ImageFile,
    ImageListError,
    boxes_to_original,
    decode_image,
    find_images,
    opencv_single_threaded,
    prepare_image,
    read_image_list,
)
from extract.runtime import Launch, StopSignals, progress_bar, resolve_device, signals_deferred
from extract.shards import (
    FeatureStore,
    RegionRecord,
    ShardWriter,
    adopt_orphan_shards,
    read_manifest,
    remove_stale_partials,
)
from extract.weights import LoadedWeights, load_weights

WORKER_TIMEOUT = 600  # seconds; decoding one image never takes this long
MODEL_NAME = "bottom-up-attention Faster R-CNN ResNet-101 C4, Visual Genome 1600 objects / 400 attributes"


@dataclass
class ExtractSummary:
    """What a run did (this rank's share)."""

    total: int = 0  # images in this rank's slice of the input
    done: int = 0  # extracted and committed by this run
    skipped: int = 0  # already in complete shards, or listed as failed by an earlier run
    failed: list[dict[str, str]] = field(default_factory=list)  # failed in this run: {"path", "reason"}
    shards: list[str] = field(default_factory=list)  # shard files this run wrote
    signum: int | None = None  # the signal that stopped the run (SIGINT, SIGTERM); a rerun continues
    seconds: float = 0.0
    backend: str = ""
    launch: Launch = field(default_factory=Launch)

    @property
    def interrupted(self) -> bool:
        return self.signum is not None


# --------------------------------------------------------------------------- inputs and resume state


def list_sources(images_dir: Path, image_list: Path | None, out_dir: Path) -> list[ImageFile]:
    """The run's images, sorted by id; ImageListError when there are none."""
    sources = read_image_list(image_list, images_dir) if image_list else find_images(images_dir, exclude=[out_dir])
    if not sources:
        where = f"{image_list} (relative to {images_dir})" if image_list else str(images_dir)
        raise ImageListError(f"{where}: no images found (looked for .jpg, .jpeg, .png, .bmp, .gif, .tif, .webp, "
                             ".ppm/.pgm)")
    return sources


def finished_ids(out_dir: Path) -> tuple[set[str], set[str]]:
    """(ids in complete shards, ids the manifest lists as failed); a damaged shard is a ShardFormatError."""
    if not (out_dir / "manifest.json").exists():
        return set(), set()
    manifest = read_manifest(out_dir)
    done = set(FeatureStore(out_dir).image_ids) if manifest.shards else set()
    return done, {item["path"] for item in manifest.failed}


def _unlisted_shards(out_dir: Path) -> list[Path]:
    listed = {entry.name for entry in read_manifest(out_dir).shards} if (out_dir / "manifest.json").exists() else set()
    return [path for path in sorted(out_dir.glob("shard-*.h5")) if path.name not in listed]


def run_settings(config: ExtractConfig, weights: LoadedWeights) -> dict[str, Any]:
    """The manifest's settings: what must match on resume, plus how the first run ran."""
    return {"output": config.output_settings(), "weights_sha256": weights.sha256, "weights_file": weights.path.name,
            "model": MODEL_NAME, "config_digest": config.digest()}


def check_resumable(out_dir: Path, settings: dict[str, Any]) -> None:
    """ExtractError when OUT already holds features made with other weights or output settings."""
    if not (out_dir / "manifest.json").exists():
        return
    previous = read_manifest(out_dir).settings
    if not previous:
        return
    if previous.get("weights_sha256") not in (None, settings["weights_sha256"]):
        raise ExtractError(f"{out_dir}: extracted with other weights (sha256 {previous['weights_sha256'][:12]}…, "
                           f"not {settings['weights_sha256'][:12]}…); use the same --weights or another --out")
    old = previous.get("output")
    if old is None:
        raise ExtractError(f"{out_dir}: holds features not written by `tshsr-pipe extract`; use another --out")
    new = json.loads(json.dumps(settings["output"]))  # tuples → lists, as the manifest stores them
    if old != new:
        differences = [f"{key}: {old.get(key)} → {new.get(key)}" for key in sorted(set(old) | set(new))
                       if old.get(key) != new.get(key)]
        raise ExtractError(f"{out_dir}: extracted with other settings ({'; '.join(differences)[:300]}); "
                           "rerun with the same options or use another --out")


# --------------------------------------------------------------------------- decoding workers


class PreparedImages(torch.utils.data.Dataset):
    """Decodes and preprocesses one image per item; a failure is returned as its reason, never raised."""

    def __init__(self, sources: list[ImageFile], config: ExtractConfig) -> None:
        self.sources = sources
        self.detector = config.detector
        self.max_pixels = int(config.max_megapixels * 1_000_000)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> dict[str, Any]:
        detector = self.detector
        try:
            decoded = decode_image(self.sources[index].path, self.max_pixels, detector.max_size)
            prepared = prepare_image(decoded, detector.min_size, detector.max_size, detector.pixel_mean)
        except ImageError as error:
            return {"index": index, "error": str(error)}
        except Exception as error:  # noqa: BLE001 - one strange file must not end the run
            return {"index": index, "error": f"could not decode ({type(error).__name__}: {error})"}
        return {"index": index, "tensor": torch.from_numpy(prepared.tensor), "scale": prepared.scale,
                "original_size": prepared.original_size}


def _worker_init(_: int) -> None:
    # Workers share the cores with the detector: one thread each, or they oversubscribe the CPU.
    torch.set_num_threads(1)


def _decoded_stream(dataset: PreparedImages, workers: int) -> Iterator[dict[str, Any]]:
    if workers == 0:
        return (dataset[i] for i in range(len(dataset)))
    opencv_single_threaded()  # before forking: an OpenCV thread pool does not survive a fork
    # A worker that is silent for WORKER_TIMEOUT seconds raises instead of hanging the run.
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                         worker_init_fn=_worker_init, prefetch_factor=4, timeout=WORKER_TIMEOUT)
    return iter(loader)


def _batches(items: Iterator[dict[str, Any]], batch_size: int, on_error: Callable[[dict[str, Any]], None]
             ) -> Iterator[list[dict[str, Any]]]:
    """Batches of decoded images; within a window of a few batches, similar aspect ratios go together."""
    window: list[dict[str, Any]] = []
    span = batch_size * 4 if batch_size > 1 else 1

    def flush() -> Iterator[list[dict[str, Any]]]:
        window.sort(key=lambda item: item["tensor"].shape[1] / item["tensor"].shape[2])
        for start in range(0, len(window), batch_size):
            yield window[start:start + batch_size]
        window.clear()

    for item in items:
        if "error" in item:
            on_error(item)
            continue
        window.append(item)
        if len(window) >= span:
            yield from flush()
    yield from flush()


def pad_batch(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(3, h_i, w_i) images → (N, 3, H, W) zero-padded at the bottom and right (zero = the pixel mean)."""
    height = max(MIN_INPUT_SIDE, *(t.shape[1] for t in tensors))
    width = max(MIN_INPUT_SIDE, *(t.shape[2] for t in tensors))
    batch = tensors[0].new_zeros((len(tensors), 3, height, width))
    for row, tensor in enumerate(tensors):
        batch[row, :, : tensor.shape[1], : tensor.shape[2]] = tensor
    return batch


# --------------------------------------------------------------------------- shard writing thread


class ShardWriterThread(threading.Thread):
    """Commits records to shards off the main thread: every `shard_size` images or `commit_minutes`.

    A failure of the writer (a full disk: `StorageError`) ends the thread; the main thread
    gets that same exception, once, from its next `put` or from `finish`.
    """

    def __init__(self, writer: ShardWriter, settings: dict[str, Any], shard_size: int, commit_minutes: float
                 ) -> None:
        super().__init__(name="shard-writer", daemon=True)
        self.writer = writer
        self.settings = settings
        self.shard_size = shard_size
        self.commit_seconds = commit_minutes * 60
        self.inbox: queue.Queue[RegionRecord | dict[str, str] | None] = queue.Queue(maxsize=4 * shard_size)
        self.failed: list[dict[str, str]] = []
        self.shards: list[str] = []
        self.error: BaseException | None = None
        self._error_raised = False
        self._last_commit = time.monotonic()

    def _commit(self) -> None:
        if len(self.writer) or self.failed:
            name = self.writer.commit(failed=self.failed, settings=self.settings)
            if name:
                self.shards.append(name)
            self.failed = []
        self._last_commit = time.monotonic()

    def run(self) -> None:
        try:
            while True:
                try:
                    item = self.inbox.get(timeout=1.0)
                except queue.Empty:
                    item = ...
                if item is None:
                    self._commit()
                    return
                if isinstance(item, RegionRecord):
                    self.writer.add(item)
                elif isinstance(item, dict):
                    self.failed.append(item)
                due = time.monotonic() - self._last_commit >= self.commit_seconds
                if len(self.writer) >= self.shard_size or (due and (len(self.writer) or self.failed)):
                    self._commit()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread, which raises it
            self.error = error

    def _raise_error(self) -> None:
        if self.error is not None and not self._error_raised:
            self._error_raised = True
            raise self.error  # the writer's own exception: a StorageError stays one line, a bug keeps its trace

    def put(self, item: RegionRecord | dict[str, str]) -> None:
        while True:
            self._raise_error()
            if self.error is not None:
                return  # reported already; the run is ending
            try:
                self.inbox.put(item, timeout=1.0)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Commit what is buffered and stop; raises the writer's error if it was not raised yet."""
        if self.is_alive():
            self.inbox.put(None)
            self.join()
        self._raise_error()


# --------------------------------------------------------------------------- the run


def _record(source: ImageFile, item: dict[str, Any], regions: Any, dtype: np.dtype) -> RegionRecord:
    boxes = boxes_to_original(regions.boxes.float().cpu().numpy(), item["scale"], item["original_size"])
    return RegionRecord(
        image_id=source.image_id, features=regions.features.to(torch.float32).cpu().numpy().astype(dtype),
        boxes=boxes, image_size=tuple(item["original_size"]),
        object_ids=regions.object_ids.cpu().numpy().astype(np.int16),
        object_scores=regions.object_scores.float().cpu().numpy(),
        attr_ids=regions.attr_ids.cpu().numpy().astype(np.int16),
        attr_scores=regions.attr_scores.float().cpu().numpy())


def extract_features(images_dir: str | os.PathLike, out_dir: str | os.PathLike, weights_path: str | os.PathLike,
                     config: ExtractConfig | None = None, *, image_list: str | os.PathLike | None = None,
                     launch: Launch | None = None, progress: bool = True,
                     on_image: Callable[[str], None] | None = None) -> ExtractSummary:
    """Extract region features of every image under `images_dir` (or in `image_list`) into `out_dir`.

    Resumable: images already in complete shards are skipped (and images a
    previous run failed on, unless ``config.retry_failed``). The device, the
    backend and the weights are checked before anything is written. SIGINT or SIGTERM stops the
    run after committing what is buffered (`ExtractSummary.signum` says which);
    a full disk raises `StorageError` with the earlier shards and manifest intact.
    """
    from extract.boxes import select_regions
    from extract.detector import build_detector, resolve_backend

    started = time.monotonic()
    config = config or ExtractConfig()
    launch = launch or Launch.from_env()
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    device = resolve_device(config.device, launch)  # the quick refusals first: loading the weights takes seconds
    if config.half and device.type != "cuda":
        raise ExtractError("--half needs a GPU (--device cuda); on CPU the detector runs in float32")
    backend = resolve_backend(config.backend)
    weights = load_weights(weights_path, config.detector)
    if not images_dir.is_dir():
        raise ImageListError(f"{images_dir}: no such directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExtractError(f"{out_dir}: exists and is not a directory")
    sources = list_sources(images_dir, Path(image_list) if image_list else None, out_dir)
    mine = sources[launch.rank::launch.world_size]
    settings = run_settings(config, weights)
    summary = ExtractSummary(total=len(mine), backend=backend, launch=launch)

    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    if _unlisted_shards(out_dir):  # a kill between a shard's rename and its manifest entry
        adopt_orphan_shards(out_dir)
    check_resumable(out_dir, settings)
    done, failed_before = finished_ids(out_dir)
    pending = [s for s in mine if s.image_id not in done and (config.retry_failed or s.image_id not in failed_before)]
    summary.skipped = len(mine) - len(pending)
    if not pending:
        summary.seconds = time.monotonic() - started
        return summary

    batch_size = config.batch_size or (4 if device.type == "cuda" else 1)
    dtype = np.dtype(config.feature_dtype)
    stream = _decoded_stream(PreparedImages(pending, config), config.workers)  # workers start decoding now
    detector = build_detector(backend, config.detector, weights, device)
    del weights  # the arrays now live in the detector
    extractor = {"model": MODEL_NAME, "backend": backend, "config_digest": config.digest(),
                 "weights_sha256": settings["weights_sha256"]}
    writer = ShardWriterThread(
        ShardWriter(out_dir, max_boxes=config.boxes_per_image, feature_dim=2048, dtype=config.feature_dtype,
                    extractor=extractor),
        settings, config.shard_size, config.commit_minutes)
    writer.start()
    label = "extracting" if not launch.distributed else f"extracting (rank {launch.rank}/{launch.world_size})"
    bar = progress_bar(len(pending), label, "img", enabled=progress and launch.is_main)
    selection = {"mode": config.box_mode, "num_boxes": config.num_boxes, "min_boxes": config.min_boxes,
                 "max_boxes": config.max_boxes, "conf_threshold": config.conf_threshold,
                 "nms_threshold": config.nms_threshold}

    def fail(source: ImageFile, reason: str) -> None:
        entry = {"path": source.image_id, "reason": reason}
        summary.failed.append(entry)
        writer.put(entry)
        bar.update(1)
        bar.set_postfix(failed=len(summary.failed), refresh=False)
        if on_image:
            on_image(source.image_id)

    def detect(batch: list[dict[str, Any]]) -> list[RegionRecord]:
        images = pad_batch([item["tensor"] for item in batch]).to(device, non_blocking=True)
        sizes = [(int(item["tensor"].shape[1]), int(item["tensor"].shape[2])) for item in batch]
        autocast = torch.autocast(device_type="cuda", dtype=torch.float16, enabled=config.half)
        with torch.inference_mode(), autocast:
            outputs = detector(images, sizes)
            regions = [select_regions(output, **selection) for output in outputs]
            # Every record is built before any is queued, so a batch retried image by image is never written twice.
            return [_record(pending[item["index"]], item, found, dtype)
                    for item, found in zip(batch, regions, strict=True)]

    def emit(records: list[RegionRecord]) -> None:
        for record in records:
            writer.put(record)
            summary.done += 1
            bar.update(1)
            if on_image:
                on_image(record.image_id)

    def detector_failure(error: RuntimeError) -> str:
        return f"detector failed ({str(error).splitlines()[0][:200]})"

    stop = StopSignals(raise_now=True)
    try:
        with stop:
            for batch in _batches(stream, batch_size, lambda item: fail(pending[item["index"]], item["error"])):
                try:
                    records = detect(batch)
                except RuntimeError as error:  # e.g. out of GPU memory: one image at a time, then give up on it
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    if len(batch) == 1:
                        fail(pending[batch[0]["index"]], detector_failure(error))
                        continue
                    for item in batch:
                        try:
                            single = detect([item])
                        except RuntimeError as item_error:
                            fail(pending[item["index"]], detector_failure(item_error))
                            continue
                        emit(single)
                    continue
                emit(records)
    except KeyboardInterrupt:  # `Stopped` from StopSignals (SIGINT or SIGTERM), or a Ctrl-C just outside it
        summary.signum = stop.signum or signal.SIGINT
    finally:
        bar.close()
        del stream  # stops the decoding workers
        with signals_deferred() as received:  # the commit of what is buffered must not itself be cut
            writer.finish()
        if received and summary.signum is None:
            summary.signum = received[0]
    summary.shards = writer.shards
    summary.seconds = time.monotonic() - started
    return summary
