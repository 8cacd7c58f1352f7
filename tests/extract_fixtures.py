"""Fixtures for the extractor tests: random published-layout weights and generated image sets.

The weights are the real ResNet-101 model's (65M parameters, built once per
session and cached under pytest's base temp dir); the test-time settings
shrink the images (shorter side 128 px), the RoIs (40) and the RoI grid (6x6)
so that a forward pass takes a fraction of a second on two cores.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.config import DetectorConfig, ExtractConfig

TEST_DETECTOR = DetectorConfig(min_size=128, max_size=200, rpn_post_nms_topk=40, pooler_resolution=6)


def small_config(**overrides) -> ExtractConfig:
    """ExtractConfig with the test-time detector, inline decoding and small shards."""
    return ExtractConfig(**{"detector": TEST_DETECTOR, "workers": 0, "shard_size": 3, **overrides})


def weights_file(directory: Path) -> Path:
    """Random weights in the published .pkl layout, written once into `directory`."""
    from extract.testing import random_published_weights
    from extract.weights import save_weights_pkl

    path = directory / "faster_rcnn_from_caffe_attr.pkl"
    if not path.exists():
        save_weights_pkl(random_published_weights(DetectorConfig(), seed=0), path)
    return path


@pytest.fixture(scope="session")
def published_weights(tmp_path_factory) -> Path:
    """Path of the session's random weights file (shared by every test module)."""
    return weights_file(tmp_path_factory.getbasetemp())


def scene(height: int, width: int, seed: int) -> np.ndarray:
    """(h, w, 3) uint8: a coloured background with a few solid rectangles."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = rng.integers(0, 256, 3)
    for _ in range(6):
        y, x = rng.integers(0, height), rng.integers(0, width)
        h, w = rng.integers(8, height // 2 + 9), rng.integers(8, width // 2 + 9)
        image[y:y + h, x:x + w] = rng.integers(0, 256, 3)
    return image


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92, **options)
    return buffer.getvalue()


def exif_rotated_jpeg(path: Path, array: np.ndarray, orientation: int = 6) -> None:
    """A JPEG whose stored pixels are `array` and whose EXIF says to rotate it for display."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, "JPEG", quality=92, exif=exif)


# Images of `write_image_set` that cannot be used, with a word their reason contains.
BAD_IMAGES = {"broken/corrupt.jpg": "not an image", "broken/empty.png": "empty", "broken/truncated.jpg": "truncated"}


def write_image_set(root: Path) -> dict[str, tuple[int, int]]:
    """The test images: normal ones, awkward formats and broken files; returns id → (height, width) of the good."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "broken").mkdir(exist_ok=True)
    (root / "nested" / "deeper").mkdir(parents=True, exist_ok=True)
    sizes = {}

    def save(image_id: str, image: Image.Image, size: tuple[int, int], **options) -> None:
        image.save(root / image_id, **options)
        sizes[image_id] = size

    save("a.jpg", Image.fromarray(scene(120, 160, 1)), (120, 160), quality=92)
    save("nested/b.png", Image.fromarray(scene(160, 120, 2)), (160, 120))
    save("nested/deeper/c.JPG", Image.fromarray(scene(150, 150, 3)), (150, 150), quality=92)
    save("gray.jpg", Image.fromarray(scene(100, 140, 4)).convert("L"), (100, 140), quality=92)
    rgba = Image.fromarray(scene(110, 170, 5)).convert("RGBA")
    alpha = np.full((110, 170), 255, np.uint8)
    alpha[:, :60] = 0  # a transparent band
    rgba.putalpha(Image.fromarray(alpha))
    save("alpha.png", rgba, (110, 170))
    save("wide.png", Image.fromarray(scene(24, 400, 6)), (24, 400))  # 1:17, shorter side < 16 px after resizing
    exif_rotated_jpeg(root / "rotated.jpg", scene(90, 150, 7))  # stored 90x150, shown 150x90
    sizes["rotated.jpg"] = (150, 90)
    save("cmyk.jpg", Image.fromarray(scene(100, 130, 8)).convert("CMYK"), (100, 130), quality=92)
    deep = (scene(90, 120, 9)[:, :, 0].astype(np.uint16) * 257)
    save("sixteen.png", Image.fromarray(deep), (90, 120))  # Pillow stores uint16 as a 16-bit PNG
    (root / "broken" / "corrupt.jpg").write_bytes(b"this is not an image\n" * 10)
    (root / "broken" / "empty.png").write_bytes(b"")
    whole = jpeg_bytes(Image.fromarray(scene(120, 160, 10)))
    (root / "broken" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "notes.txt").write_text("not an image extension, never listed\n")
    (root / ".hidden.jpg").write_bytes(whole)
    return sizes
