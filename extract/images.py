"""Finding, decoding and preprocessing images, robustly.

Every image becomes 8-bit BGR as the Caffe tool's ``cv2.imread`` gave it, but
decoded with Pillow so that what a viewer shows is what the detector sees:

- EXIF orientation is applied (ids keep the file's name; sizes and boxes are
  those of the upright image);
- grayscale, palette, CMYK and 16-bit images are converted (16-bit scaled,
  not clipped); transparent pixels are composited over white;
- a file that is empty, truncated or not an image raises `ImageError` with a
  reason for the manifest, never a crash;
- an image above ``max_pixels`` is decoded at reduced scale when it is a JPEG
  (it is shrunk to at most 1000 px anyway) and refused otherwise.

Preprocessing is the original's: subtract the BGR pixel means, then resize
(bilinear) so the shorter side is 600 px unless the longer would exceed
1000 px. Boxes map back to original pixels by dividing by that one scale.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extract.config import ExtractError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm", ".pnm"})
MIN_INPUT_SIDE = 32  # the network needs a few res4 cells; thinner inputs are padded up to this


class ImageError(Exception):
    """An image that cannot be used; the message is the reason recorded in the manifest."""


class ImageListError(ExtractError):
    """The input directory or file list is unusable; the message names the file."""


@dataclass(frozen=True)
class ImageFile:
    """One input image: its id (path under the input directory, POSIX) and its path."""

    image_id: str
    path: Path


def _image_id(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def find_images(root: str | os.PathLike, exclude: Iterable[str | os.PathLike] = ()) -> list[ImageFile]:
    """Every image file under `root`, recursively, sorted by id; hidden files and `exclude` dirs skipped."""
    root = Path(root)
    if not root.is_dir():
        raise ImageListError(f"{root}: not a directory")
    excluded = {Path(p).resolve() for p in exclude}
    found = []
    for directory, subdirs, files in os.walk(root):
        here = Path(directory)
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and (here / d).resolve() not in excluded]
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(ImageFile(_image_id(here / name, root), here / name))
    return sorted(found, key=lambda source: source.image_id)


def read_image_list(list_file: str | os.PathLike, root: str | os.PathLike) -> list[ImageFile]:
    """Images named in a text file, one path a line (relative to `root` or absolute inside it).

    Blank lines and lines starting with ``#`` are skipped; duplicates count once.
    A listed file that does not exist is kept: it fails with its reason.
    """
    list_file, root = Path(list_file), Path(root)
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ImageListError(f"{list_file}: not UTF-8 text ({error.reason})") from None
    resolved_root = root.resolve()
    sources: dict[str, ImageFile] = {}
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry)
        if path.is_absolute():
            try:
                relative = path.resolve().relative_to(resolved_root)
            except ValueError:
                raise ImageListError(f"{list_file}:{number}: {entry} is not inside {root}") from None
            path = root / relative
        else:
            if ".." in path.parts:
                raise ImageListError(f"{list_file}:{number}: {entry} leaves {root}")
            path = root / path
        image_id = _image_id(path, root)
        sources.setdefault(image_id, ImageFile(image_id, path))
    return sorted(sources.values(), key=lambda source: source.image_id)


# --------------------------------------------------------------------------- decoding


@dataclass
class DecodedImage:
    """Pixels ready for preprocessing, and the size boxes are reported in."""

    pixels: np.ndarray  # (h, w, 3) uint8 BGR; smaller than original_size when decoded at reduced scale
    original_size: tuple[int, int]  # (height, width) of the upright image at full resolution


def _to_rgb(image) -> np.ndarray:  # noqa: ANN001 - a PIL image
    """Any Pillow mode → (h, w, 3) uint8 RGB; alpha composited over white, 16-bit scaled."""
    from PIL import Image

    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        array = np.asarray(image)
        top = 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        gray = np.clip(array.astype(np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        array = np.nan_to_num(np.asarray(image, dtype=np.float64))
        top = 1.0 if array.max(initial=0) <= 1.0 else 255.0
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"))


def _decode_open(image, max_pixels: int, target_max_side: int) -> DecodedImage:  # noqa: ANN001 - PIL image
    from PIL import ImageOps

    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that swap the axes
    original = (width, height) if turned else (height, width)
    if width * height > max_pixels:
        if image.format != "JPEG":
            raise ImageError(f"too large: {width}x{height} = {width * height / 1e6:.0f} megapixels "
                             f"(limit {max_pixels / 1e6:.0f}; only JPEGs are decoded at reduced scale)")
        # JPEG DCT scaling decodes at 1/2..1/8 scale, still above the size the detector resizes to.
        factor = max(width, height) / (2 * target_max_side)
        image.draft("RGB", (int(width / factor), int(height / factor)))
    image.load()
    rgb = _to_rgb(ImageOps.exif_transpose(image))
    return DecodedImage(np.ascontiguousarray(rgb[:, :, ::-1]), original)


def decode_image(path: str | os.PathLike, max_pixels: int = 250_000_000, target_max_side: int = 1000
                 ) -> DecodedImage:
    """Decode one image file as upright 8-bit BGR; ImageError with the reason when it cannot be used."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ImageError(f"unreadable: {error.strerror or error}") from None
    if size == 0:
        raise ImageError("empty file (0 bytes)")
    # Pillow's own bomb check is replaced by `max_pixels`, which decodes big JPEGs scaled down instead.
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(path) as image:
            return _decode_open(image, max_pixels, target_max_side)
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can decode") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError) as error:
        text = str(error).strip() or type(error).__name__
        if "truncated" in text:
            raise ImageError(f"truncated file ({text})") from None
        raise ImageError(f"corrupt image ({type(error).__name__}: {text})") from None
    except MemoryError:
        raise ImageError("out of memory while decoding") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


# --------------------------------------------------------------------------- preprocessing


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """The original's scale: shorter side to `min_size` unless the longer would pass `max_size`."""
    scale = min_size / min(height, width)
    if round(scale * max(height, width)) > max_size:
        scale = max_size / max(height, width)
    return scale


@dataclass
class PreparedImage:
    """One image as the detector takes it."""

    tensor: np.ndarray  # (3, h', w') float32, mean-subtracted BGR at the detector's scale
    scale: float  # resized = original * scale
    original_size: tuple[int, int]  # (height, width) boxes are reported in


def opencv_single_threaded():  # noqa: ANN201 - the cv2 module
    """cv2, with its thread pool stopped (call before forking decoding workers, and in them).

    A pool started in a process is inherited half-alive by forked children, where cv2 then hangs
    (seen: cv2.setNumThreads in a worker never returned after the parent had resized a large
    image). The decoding workers already work on several images at once.
    """
    import cv2

    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)
    return cv2


def prepare_image(decoded: DecodedImage, min_size: int, max_size: int,
                  pixel_mean: tuple[float, float, float]) -> PreparedImage:
    """Mean-subtract and resize as the original tool (float32, bilinear)."""
    cv2 = opencv_single_threaded()

    height, width = decoded.original_size
    scale = resize_scale(height, width, min_size, max_size)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))  # cv2 takes (w, h)
    pixels = decoded.pixels.astype(np.float32)
    pixels -= np.asarray(pixel_mean, dtype=np.float32)
    if (pixels.shape[1], pixels.shape[0]) != target:
        pixels = cv2.resize(pixels, target, interpolation=cv2.INTER_LINEAR)
    return PreparedImage(np.ascontiguousarray(pixels.transpose(2, 0, 1)), scale, (height, width))


def boxes_to_original(boxes: np.ndarray, scale: float, original_size: tuple[int, int]) -> np.ndarray:
    """(k, 4) boxes in resized pixels → original pixels, clipped to the image."""
    height, width = original_size
    out = boxes.astype(np.float32) / scale
    out[:, 0::2] = np.clip(out[:, 0::2], 0, width)
    out[:, 1::2] = np.clip(out[:, 1::2], 0, height)
    return out
