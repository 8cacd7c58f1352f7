"""Import SCAN/SGRAF precomputed features (``{split}_ims.npy`` + ``{split}_caps.txt``) as shards.

A precomp directory holds, per split (train, dev, test, testall):

- ``{split}_ims.npy``: (n_images, K, D) float32 region features; some releases
  repeat every image once per caption (n_images = n_captions);
- ``{split}_caps.txt``: one caption per line, the captions of image i at
  lines i·cpi … i·cpi + cpi − 1;
- ``{split}_ids.txt`` (optional): image ids, one per image or one per caption.

The arrays are memory-mapped and copied shard by shard, so COCO's
113K × 36 × 2048 train file converts without being loaded whole. Everything
is checked before the first shard is written; the shards are written by the
importers' one resumable loop (`extract.shards.import_shards`): they appear
only complete, and a kill or a full disk (a one-line
`extract.safeio.StorageError`) keeps the shards written before it, so a rerun
continues.
The captions go to ``OUT/captions.jsonl`` with their split (``dev`` → ``val``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extract.safeio import atomic_write
from extract.shards import RegionRecord, ShardFormatError, import_shards
from matching.data.captions import CaptionFormatError

SPLITS = ("train", "dev", "test", "testall")
SPLIT_NAMES = {"dev": "val"}
CAPTIONS_FILE = "captions.jsonl"


@dataclass
class PrecompSplit:
    name: str  # the file prefix (train, dev, test, testall)
    images: np.ndarray  # memory-mapped (n_rows, K, D)
    captions: list[str]
    image_ids: list[str]  # one per distinct image
    row_step: int  # 1, or cpi when every image is repeated once per caption
    captions_per_image: int

    @property
    def num_images(self) -> int:
        return len(self.image_ids)


def _read_lines(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise CaptionFormatError(f"{path}:{line}: not valid UTF-8 (byte {raw[error.start]:#04x})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def open_split(directory: Path, split: str, captions_per_image: int = 5) -> PrecompSplit:
    """Open and check one split without reading the features."""
    ims_path, caps_path = directory / f"{split}_ims.npy", directory / f"{split}_caps.txt"
    if not caps_path.exists():
        raise CaptionFormatError(f"{caps_path}: missing (every {split}_ims.npy needs its {split}_caps.txt)")
    try:
        images = np.load(ims_path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise ShardFormatError(f"{ims_path}: not a readable .npy array ({error})") from None
    if images.ndim != 3:
        raise ShardFormatError(f"{ims_path}: shape {images.shape}, expected (images, regions, features)")
    captions = _read_lines(caps_path)
    for number, caption in enumerate(captions, start=1):
        if not caption.strip():
            raise CaptionFormatError(f"{caps_path}:{number}: empty caption")
    n_rows, n_caps = images.shape[0], len(captions)
    if n_rows == n_caps and captions_per_image > 1:
        row_step = captions_per_image  # rkiros layout: the image repeated for each of its captions
    elif n_rows * captions_per_image == n_caps:
        row_step = 1
    else:
        raise CaptionFormatError(f"{caps_path}: {n_caps} captions for {n_rows} images in {ims_path.name}; "
                                 f"expected {captions_per_image} per image (--captions-per-image)")
    if n_caps % captions_per_image:
        raise CaptionFormatError(f"{caps_path}: {n_caps} captions is not a multiple of {captions_per_image}")
    n_images = n_caps // captions_per_image
    ids_path = directory / f"{split}_ids.txt"
    if ids_path.exists():
        raw_ids = [line.strip() for line in _read_lines(ids_path)]
        if len(raw_ids) == n_caps:
            raw_ids = raw_ids[::captions_per_image]
        if len(raw_ids) != n_images:
            raise CaptionFormatError(f"{ids_path}: {len(raw_ids)} ids for {n_images} images")
        if any(not i for i in raw_ids):
            raise CaptionFormatError(f"{ids_path}:{raw_ids.index('') + 1}: empty id")
        image_ids = raw_ids
    else:
        image_ids = [f"{split}/{i}" for i in range(n_images)]
    if len(set(image_ids)) != len(image_ids):
        raise CaptionFormatError(f"{ids_path}: an image id appears twice")
    return PrecompSplit(split, images, captions, image_ids, row_step, captions_per_image)


def import_precomp(
    directory: str | os.PathLike,
    out: str | os.PathLike,
    *,
    splits: Sequence[str] | None = None,
    captions_per_image: int = 5,
    shard_size: int = 1000,
    dtype: str = "float16",
    on_images: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Convert the precomp splits found in `directory` into shards + ``captions.jsonl`` in `out`.

    Returns {split: images}. Images already in `out` (a rerun, or test ⊂ testall) are not
    written again. `on_images(n)` is called as images are written (progress).
    """
    directory, out = Path(directory), Path(out)
    if not directory.is_dir():
        raise ShardFormatError(f"{directory}: no such directory")
    wanted = list(splits) if splits else [s for s in SPLITS if (directory / f"{s}_ims.npy").exists()]
    if not wanted:
        raise ShardFormatError(f"{directory}: no {{split}}_ims.npy files (looked for {', '.join(SPLITS)})")
    opened = []
    for split in wanted:  # check everything before writing anything
        if not (directory / f"{split}_ims.npy").exists():
            raise ShardFormatError(f"{directory / f'{split}_ims.npy'}: missing")
        opened.append(open_split(directory, split, captions_per_image))
    shapes = {s.images.shape[1:] for s in opened}
    if len(shapes) > 1:
        raise ShardFormatError(f"{directory}: the splits' features differ in shape: {sorted(shapes)}")
    regions, dim = shapes.pop()
    settings = {"source": "scan-precomp", "directory": str(directory), "captions_per_image": captions_per_image,
                "dtype": dtype}

    def items() -> Iterator[tuple[str, Callable[[], RegionRecord]] | None]:
        for split in opened:
            for index, image_id in enumerate(split.image_ids):
                yield image_id, lambda split=split, index=index, image_id=image_id: RegionRecord(
                    image_id, np.asarray(split.images[index * split.row_step], dtype=np.float32),
                    np.zeros((regions, 4), np.float32), (0, 0))
            yield None  # each split in shards of its own

    import_shards(out, items(), max_boxes=regions, dtype=dtype, settings=settings, shard_size=shard_size,
                  extractor={"model": "scan-precomp", "source": str(directory)}, on_images=on_images)
    counts = {SPLIT_NAMES.get(split.name, split.name): split.num_images for split in opened}
    _write_captions(out / CAPTIONS_FILE, opened)
    return counts


def _write_captions(path: Path, splits: Sequence[PrecompSplit]) -> None:
    with atomic_write(path, "w", encoding="utf-8") as handle:
        for split in splits:
            name = SPLIT_NAMES.get(split.name, split.name)
            for number, caption in enumerate(split.captions):
                image_id = split.image_ids[number // split.captions_per_image]
                handle.write(json.dumps({"image_id": image_id, "caption": caption.strip(), "split": name},
                                        ensure_ascii=False) + "\n")
