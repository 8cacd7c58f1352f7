"""Extraction throughput (images/s) against the detector's own forward time, on CPU and on GPU when present.

Writes random weights in the published layout (or uses --weights) and N
generated JPEGs of COCO's usual 640x480 / 480x640, then times, per device:

- decode: decoding + resizing alone, one process (what each worker does);
- model: the detector's forward pass and region selection on images already
  decoded and resized, at the same batch size (the baseline);
- pipeline: ``extract_features`` end to end (decoding workers, batching,
  selection, float16 conversion, HDF5 shards, manifest).

pipeline/model near 1.0 means the pipeline adds nothing to the model's own
time. Numbers drift on a shared machine; the ratio is measured in one run.

    python benchmarks/bench_extract.py [--images 4] [--device cpu|cuda|all] [--workers 2]
                                       [--batch-size 0] [--min-size 600 --max-size 1000 --rois 300] [--half]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from extract.boxes import select_regions
from extract.config import DetectorConfig, ExtractConfig
from extract.detector import build_detector, resolve_backend
from extract.images import decode_image, prepare_image
from extract.run import extract_features, pad_batch
from extract.testing import random_published_weights
from extract.weights import load_weights, save_weights_pkl


def write_images(directory: Path, count: int) -> list[Path]:
    """COCO-like photos: smooth colour fields with texture and a few objects, 640x480 and 480x640."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        height, width = (480, 640) if index % 3 else (640, 480)
        coarse = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.int16)
        image = image + rng.integers(-20, 21, image.shape)
        for _ in range(8):
            y, x = rng.integers(0, height - 40), rng.integers(0, width - 40)
            image[y:y + rng.integers(20, 200), x:x + rng.integers(20, 200)] = rng.integers(0, 256, 3)
        path = directory / f"img{index:04d}.jpg"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_rate(paths: list[Path], detector: DetectorConfig) -> float:
    start = time.perf_counter()
    for path in paths:
        prepare_image(decode_image(path), detector.min_size, detector.max_size, detector.pixel_mean)
    return len(paths) / (time.perf_counter() - start)


def model_rate(paths: list[Path], config: ExtractConfig, weights_path: Path, device: torch.device,
               batch_size: int) -> tuple[float, float]:
    """(images/s of forward + selection, share of that time in res5) on pre-decoded images."""
    detector_config = config.detector
    weights = load_weights(weights_path, detector_config)
    detector = build_detector(config.backend, detector_config, weights, device)
    prepared = [torch.from_numpy(prepare_image(decode_image(p), detector_config.min_size, detector_config.max_size,
                                               detector_config.pixel_mean).tensor) for p in paths]
    batches = [prepared[i:i + batch_size] for i in range(0, len(prepared), batch_size)]
    res5_time = [0.0]
    res5 = getattr(detector, "box_head", None)
    if res5 is not None:  # the torchvision backend: time res5 separately
        def before(*_):
            _sync(device)
            res5_time.append(time.perf_counter())

        def after(*_):
            _sync(device)
            res5_time[0] += time.perf_counter() - res5_time.pop()

        res5.res5.register_forward_pre_hook(before)
        res5.res5.register_forward_hook(after)
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=config.half)

    def run(batch: list[torch.Tensor]) -> None:
        images = pad_batch(batch).to(device)
        with torch.inference_mode(), autocast:
            outputs = detector(images, [tuple(t.shape[1:]) for t in batch])
            for output in outputs:
                select_regions(output).features.cpu()

    run(batches[0][:1])  # warm-up (kernel selection, allocator)
    res5_time[:] = [0.0]
    _sync(device)
    start = time.perf_counter()
    for batch in batches:
        run(batch)
    _sync(device)
    elapsed = time.perf_counter() - start
    return len(paths) / elapsed, res5_time[0] / elapsed


def pipeline_rate(images_dir: Path, config: ExtractConfig, weights_path: Path) -> float:
    with tempfile.TemporaryDirectory() as out:
        summary = extract_features(images_dir, out, weights_path, config, progress=False)
        assert summary.done == len(list(images_dir.glob("*.jpg"))), summary
        return summary.done / summary.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--device", default="all", help="cpu, cuda, or all (cpu, and cuda when present)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=0, help="0: 1 on CPU, 4 on GPU")
    parser.add_argument("--min-size", type=int, default=600)
    parser.add_argument("--max-size", type=int, default=1000)
    parser.add_argument("--rois", type=int, default=300)
    parser.add_argument("--half", action="store_true", help="float16 autocast on GPU")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--weights", type=Path, help="real weights instead of random ones in the same layout")
    args = parser.parse_args()

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    detector = dataclasses.replace(DetectorConfig(), min_size=args.min_size, max_size=args.max_size,
                                   rpn_post_nms_topk=args.rois)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        weights = args.weights
        if weights is None:
            weights = save_weights_pkl(random_published_weights(DetectorConfig()), root / "weights.pkl")
        paths = write_images(root / "images", args.images)
        print(f"{args.images} JPEGs 640x480/480x640 → {args.min_size}/{args.max_size} px, {args.rois} RoIs, "
              f"backend {resolve_backend(args.backend)}, torch threads {torch.get_num_threads()}")
        print(f"decode + resize alone (one process): {decode_rate(paths, detector):7.2f} images/s")
        for device_name in devices:
            device = torch.device(device_name)
            batch = args.batch_size or (4 if device.type == "cuda" else 1)
            half = args.half and device.type == "cuda"
            config = ExtractConfig(detector=detector, device=device_name, batch_size=batch, workers=args.workers,
                                   half=half, backend=args.backend)
            model, res5_share = model_rate(paths, config, weights, device, batch)
            pipeline = pipeline_rate(root / "images", config, weights)
            label = f"{device_name}{' half' if half else ''}, batch {batch}"
            print(f"{label}: model {model:7.3f} images/s ({1 / model:6.2f} s/image, {res5_share:.0%} in res5)  "
                  f"pipeline {pipeline:7.3f} images/s ({args.workers} workers)  pipeline/model {pipeline / model:5.2f}")


if __name__ == "__main__":
    main()
