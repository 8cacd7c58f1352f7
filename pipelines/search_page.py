"""A self-contained HTML page of search results, with the attended boxes drawn on the images."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path

from extract.safeio import write_text
from matching.retrieval.search import Hit

BOX_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4")
THUMBNAIL = 360


def _thumbnail(path: Path, regions: Sequence[tuple[Sequence[float], float]] | None) -> str | None:
    """A base64 JPEG of the image with its regions drawn, or None when the file cannot be read."""
    from PIL import Image, ImageDraw, ImageOps

    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (OSError, ValueError):
        return None
    draw = ImageDraw.Draw(image)
    width = max(2, round(max(image.size) / 200))
    for number, (box, weight) in enumerate(regions or []):
        colour = BOX_COLOURS[number % len(BOX_COLOURS)]
        draw.rectangle(box, outline=colour, width=width)
        draw.text((box[0] + width + 1, box[1] + width), f"{100 * weight:.0f}%", fill=colour)
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(images_dir: Path | None, image_id: str, regions=None) -> str:
    encoded = _thumbnail(images_dir / image_id, regions) if images_dir else None
    if encoded:
        return f'<img src="data:image/jpeg;base64,{encoded}" alt="{html.escape(image_id)}">'
    note = "image file not found" if images_dir else "pass --images DIR to show the image"
    boxes = "".join(f"<li>box {[round(v) for v in box]}: {100 * w:.0f}%</li>" for box, w in regions or [])
    return f'<div class="missing">{html.escape(note)}<ul>{boxes}</ul></div>'


def write_search_page(path: str | os.PathLike, *, query: str, hits: Sequence[Hit], mode: str,
                      images_dir: str | os.PathLike | None = None, checkpoint: str = "") -> Path:
    """Write the page; `mode` is "text" (a text ranked the images) or "image" (an image ranked captions)."""
    images = Path(images_dir) if images_dir else None
    rows = []
    if mode == "text":
        for hit in hits:
            caption = f"#{hit.rank} · {hit.score:.4f} · {html.escape(hit.item)}"
            if hit.round_ranks:  # a multi-query search: the image's rank after each round
                caption += f" · rank by round {' → '.join(map(str, hit.round_ranks))}"
            rows.append(f'<figure>{_figure(images, hit.image_id, hit.regions)}<figcaption>{caption}</figcaption>'
                        "</figure>")
        header = f"<h1>“{html.escape(query)}”</h1><p>The top {len(hits)} images; boxes: the regions the " \
                 "words attend to most, with their attention weight.</p>"
        body = '<div class="grid">' + "".join(rows) + "</div>"
    else:
        shown = hits[0].image_id if hits else query
        items = "".join(f'<li class="{"hit" if h.matches_query_image else ""}"><b>{h.score:.4f}</b> '
                        f'{html.escape(h.item)}{" ✓" if h.matches_query_image else ""}</li>' for h in hits)
        header = f"<h1>{html.escape(query)}</h1><p>The top {len(hits)} captions; ✓ marks the image's own.</p>"
        body = f'<div class="pair"><figure>{_figure(images, shown)}</figure><ol>{items}</ol></div>'
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tshsr-pipe search: {html.escape(query)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; width: {THUMBNAIL}px; }}
figcaption {{ font-size: 0.85em; word-break: break-all; }}
.missing {{ width: {THUMBNAIL}px; min-height: 120px; background: #eee; font-size: 0.85em; padding: 0.5em; }}
.pair {{ display: flex; gap: 2em; }}
li.hit {{ color: #1a7f37; }}
footer {{ margin-top: 2em; font-size: 0.8em; color: #777; }}
</style></head><body>
{header}
{body}
<footer>{html.escape(checkpoint)}</footer>
</body></html>
"""
    return write_text(path, page)
