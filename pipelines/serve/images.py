"""Image files of the gallery: found by gallery id only, opened only under the images directory.

A request names an image id; the id is looked up in the gallery's set of ids (a request for
"../../etc/passwd" is simply not in it), and only a gallery id is ever joined to the images
directory, after refusing ids that are absolute or climb out with "..". Symbolic links inside
the directory are the operator's own and are followed.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

THUMBNAIL_SIDE = 360  # pixels, the longer side


class ImageFiles:
    """The files of `image_ids` under `root` (None: no image files, the page shows box lists)."""

    def __init__(self, root: str | os.PathLike | None, image_ids: Iterable[str], side: int = THUMBNAIL_SIDE) -> None:
        self.root = Path(root) if root is not None else None
        self.ids = frozenset(image_ids)
        self.side = side
        self.thumbnail = functools.lru_cache(maxsize=512)(self._thumbnail)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.ids

    def path(self, image_id: str) -> Path | None:
        """The file of a gallery image, or None (not a gallery id, no directory, no such file, an unsafe id)."""
        if self.root is None or image_id not in self.ids:
            return None
        relative = PurePosixPath(image_id)
        if relative.is_absolute() or ".." in relative.parts or "\0" in image_id:
            return None
        path = self.root.joinpath(*relative.parts)
        return path if path.is_file() else None

    def _thumbnail(self, image_id: str) -> bytes | None:
        """A JPEG of the image, the longer side at most `side` pixels; None when there is no readable file."""
        from PIL import Image, ImageOps

        path = self.path(image_id)
        if path is None:
            return None
        try:
            with Image.open(path) as opened:
                image = ImageOps.exif_transpose(opened).convert("RGB")
                image.thumbnail((self.side, self.side))
        except (OSError, ValueError, Image.DecompressionBombError):
            return None
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()
