"""Caption files: Karpathy split JSON, TSV and JSONL (docs/formats.md, "Captions").

- Karpathy JSON (``dataset_coco.json``, ``dataset_flickr30k.json``): ``images[]``
  with ``filename``, ``split`` and ``sentences[].raw``. The image id is the
  file name; ``restval`` counts as ``train``, as is customary.
- TSV: ``image_id<TAB>caption`` per line, optionally ``<TAB>split``.
- JSONL: one ``{"image_id": …, "caption": …, "split": …}`` object per line
  (``split`` optional).

A caption without a split belongs to whichever split is asked for, so a
plain two-column TSV of test captions can be evaluated as it is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLIT_ALIASES = {"restval": "train", "val": "val", "dev": "val", "validation": "val"}


class CaptionFormatError(ValueError):
    """A caption file is malformed; the message names the file and line."""


@dataclass(frozen=True)
class Caption:
    image_id: str
    text: str
    split: str | None  # train, val, test, or None when the file does not say
    where: str  # "file:line", for error messages


def split_name(value: object) -> str | None:
    """A split as written in a file, normalised (lower case, restval → train, dev → val); None if absent."""
    if value is None or value == "":
        return None
    name = str(value).strip().lower()
    return SPLIT_ALIASES.get(name, name)


def read_text_file(path: Path, error: type[CaptionFormatError] | None = None, kind: str = "caption file") -> str:
    """A UTF-8 text file (a BOM allowed); `error` (default CaptionFormatError) names the file, and the
    line of a byte that is not UTF-8, when it cannot be read."""
    error = error or CaptionFormatError
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such {kind}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a file") from None
    except OSError as failure:
        raise error(f"{path}: unreadable ({failure.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as failure:
        line = raw[: failure.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not valid UTF-8 (byte {raw[failure.start]:#04x})") from None


def _karpathy(path: Path, payload: dict) -> list[Caption]:
    images = payload.get("images")
    if not isinstance(images, list):
        raise CaptionFormatError(f"{path}: a Karpathy split file needs an 'images' list")
    captions = []
    for number, image in enumerate(images):
        where = f"{path}:images[{number}]"
        if not isinstance(image, dict) or "filename" not in image:
            raise CaptionFormatError(f"{where}: entry without a 'filename'")
        sentences = image.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise CaptionFormatError(f"{where} ({image['filename']}): no sentences")
        for k, sentence in enumerate(sentences):
            text = sentence.get("raw") if isinstance(sentence, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise CaptionFormatError(f"{where}.sentences[{k}] ({image['filename']}): empty caption")
            captions.append(Caption(str(image["filename"]), text.strip(), split_name(image.get("split")),
                                    f"{where}.sentences[{k}]"))
    return captions


def _jsonl(path: Path, text: str) -> list[Caption]:
    captions = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise CaptionFormatError(f"{path}:{number}: not a JSON object ({error.msg})") from None
        if not isinstance(record, dict) or "image_id" not in record or "caption" not in record:
            raise CaptionFormatError(f"{path}:{number}: needs 'image_id' and 'caption'")
        caption = record["caption"]
        if not isinstance(caption, str) or not caption.strip():
            raise CaptionFormatError(f"{path}:{number}: empty caption")
        captions.append(Caption(str(record["image_id"]).strip(), caption.strip(),
                                split_name(record.get("split")), f"{path}:{number}"))
    return captions


def _tsv(path: Path, text: str) -> list[Caption]:
    captions = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) not in (2, 3):
            raise CaptionFormatError(f"{path}:{number}: expected image_id<TAB>caption[<TAB>split], "
                                     f"found {len(fields)} tab-separated fields")
        image_id, caption = fields[0].strip(), fields[1].strip()
        if not image_id:
            raise CaptionFormatError(f"{path}:{number}: empty image id")
        if not caption:
            raise CaptionFormatError(f"{path}:{number}: empty caption")
        captions.append(Caption(image_id, caption, split_name(fields[2]) if len(fields) == 3 else None,
                                f"{path}:{number}"))
    return captions


def read_captions(path: str | os.PathLike, split: str | Sequence[str] | None = None) -> list[Caption]:
    """Every caption of a file, in file order; keep only `split` (a name or names) when given."""
    path = Path(path)
    text = read_text_file(path)
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" or (stripped.startswith("{") and '"images"' in stripped[:4096]):
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as error:
            raise CaptionFormatError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
        if not isinstance(payload, dict):
            raise CaptionFormatError(f"{path}: expected a Karpathy split object with an 'images' list")
        captions = _karpathy(path, payload)
    elif path.suffix.lower() == ".jsonl" or stripped.startswith("{"):
        captions = _jsonl(path, text)
    else:
        captions = _tsv(path, text)
    if not captions:
        raise CaptionFormatError(f"{path}: no captions")
    if split is None:
        return captions
    wanted = {split_name(s) for s in ([split] if isinstance(split, str) else split)}
    return [c for c in captions if c.split is None or c.split in wanted]


def read_split(path: str | os.PathLike, split: str | Sequence[str], purpose: str = "") -> list[Caption]:
    """The captions of `split` (a name or names; captions without a split count for any),
    or a CaptionFormatError naming the split, the file and the splits it has."""
    everything = read_captions(path)
    selected = select_split(everything, split)
    if not selected:
        raise missing_split(path, split, [c.split for c in everything], purpose, "captions")
    return selected


def select_split(items: Sequence[Any], split: str | Sequence[str]) -> list[Any]:
    """The items (anything with a `.split`) of `split`; items without a split count for any."""
    wanted = {split_name(s) for s in ([split] if isinstance(split, str) else split)}
    return [item for item in items if item.split is None or item.split in wanted]


def missing_split(path: str | os.PathLike, split: str | Sequence[str], splits: Sequence[str | None],
                  purpose: str = "", what: str = "captions") -> CaptionFormatError:
    """The error for a split a file does not have, naming the splits it has with their counts."""
    counts: dict[str, int] = {}
    for name in splits:
        counts[str(name)] = counts.get(str(name), 0) + 1
    names = "', '".join(sorted({str(split_name(s)) for s in ([split] if isinstance(split, str) else split)}))
    listed = ", ".join(f"{name} ({n} {what})" for name, n in sorted(counts.items()))
    return CaptionFormatError(f"{path}: no {what} of split '{names}'" + (f" for {purpose}" if purpose else "")
                              + f"; the file has {listed}")


def group_by_image(captions: Iterable[Caption]) -> dict[str, list[Caption]]:
    """Captions per image id, images in order of first appearance, captions in file order."""
    groups: dict[str, list[Caption]] = {}
    for caption in captions:
        groups.setdefault(caption.image_id, []).append(caption)
    return groups


def resolve_image_ids(image_ids: Iterable[str], available: Iterable[str]) -> dict[str, str]:
    """Map caption image ids to feature ids: exact, else by file name, else by file stem.

    Features keep each image's path under the extracted directory
    ("val2014/COCO_val2014_000000391895.jpg"); Karpathy files name only the
    file. Ids that match nothing, or match several features, are left out.
    """
    available = list(available)
    exact = set(available)
    by_name: dict[str, list[str]] = {}
    by_stem: dict[str, list[str]] = {}
    for feature_id in available:
        name = feature_id.rsplit("/", 1)[-1]
        by_name.setdefault(name, []).append(feature_id)
        by_stem.setdefault(name.rsplit(".", 1)[0], []).append(feature_id)
    resolved = {}
    for image_id in image_ids:
        if image_id in exact:
            resolved[image_id] = image_id
            continue
        name = image_id.rsplit("/", 1)[-1]
        for table, key in ((by_name, name), (by_stem, name.rsplit(".", 1)[0])):
            matches = table.get(key, [])
            if len(matches) == 1:
                resolved[image_id] = matches[0]
                break
    return resolved


def evaluation_set(captions: Sequence[Caption], available: Iterable[str],
                   captions_per_image: int = 5) -> tuple[list[str], list[Caption]]:
    """The images and their first `captions_per_image` captions, in the layout `recall_metrics` expects.

    Returns (feature ids of the n images, the n·cpi captions with caption k of
    image i at position i·cpi + k). Raises CaptionFormatError naming the caption
    whose image has no features, or an image with too few captions.
    """
    groups = group_by_image(captions)
    if not groups:
        raise CaptionFormatError("no captions in the requested split")
    resolved = resolve_image_ids(groups, available)
    image_ids, ordered = [], []
    for image_id, group in groups.items():
        if image_id not in resolved:
            raise CaptionFormatError(f"{group[0].where}: image {image_id!r} has no features")
        if len(group) < captions_per_image:
            raise CaptionFormatError(f"{group[0].where}: image {image_id!r} has {len(group)} captions; "
                                     f"evaluation needs {captions_per_image} per image")
        image_ids.append(resolved[image_id])
        ordered.extend(group[:captions_per_image])
    return image_ids, ordered
