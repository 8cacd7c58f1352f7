"""A small synthetic image–caption world that a model can learn: coloured shapes and their names.

Each scene holds one to three objects (a colour and a shape, at a place).
Captions name them in varied templates ("a red circle beside a blue
square"). Two renderings of the same scenes:

- `write_feature_dataset`: the fast path: region features made directly
  (one region per object from colour and shape prototypes, plus clutter), as
  shards and a captions file, ready for `vocab` and `train`.
- `render_scene`: real pixels (PIL) for the full path through the detector.

`make_binding_scenes` makes a harder world for checking that training learns what the paper's
model learns: scenes come in groups that share their colour words and their shape words but
bind them differently, so no bag of words can tell a group's scenes apart
(`bag_of_words_ceiling` computes how far a perfect bag-of-words ranker gets).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extract.safeio import atomic_write

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 170), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
PLACES = ("left", "right", "top", "bottom", "middle")
TEMPLATES_ONE = ("{0}", "there is {0}", "a picture of {0}", "{0} on a plain background", "just {0}")
TEMPLATES_MANY = ("{0} and {1}", "{0} beside {1}", "there is {0} next to {1}", "a picture with {0} and {1}",
                  "{1} together with {0}")
SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))


@dataclass
class SceneObject:
    colour: str
    shape: str
    place: str

    @property
    def words(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def named(self) -> str:
        """The object with its article: "a red circle", "an orange star"."""
        return f"{'an' if self.colour[0] in 'aeiou' else 'a'} {self.words}"


@dataclass
class Scene:
    image_id: str
    objects: list[SceneObject]
    split: str
    named: int | None = None  # captions name the first `named` objects (the rest are only seen); None: all

    @property
    def described(self) -> list[SceneObject]:
        """The objects every caption names."""
        return self.objects[: self.named] if self.named is not None else self.objects

    def captions(self, rng: np.random.Generator, count: int = 5, place_rate: float = 0.3) -> list[str]:
        """`count` different-looking captions that all name every described object (its place with `place_rate`)."""
        texts = []
        described = self.described
        for _ in range(count):
            objects = [described[i] for i in rng.permutation(len(described))]
            if len(objects) == 1:
                text = TEMPLATES_ONE[rng.integers(len(TEMPLATES_ONE))].format(objects[0].named)
            else:
                named = [o.named + (f" on the {o.place}" if rng.random() < place_rate else "") for o in objects]
                first = ", ".join(named[:-1])
                text = TEMPLATES_MANY[rng.integers(len(TEMPLATES_MANY))].format(first, named[-1])
            texts.append(text[0].upper() + text[1:] + ".")
        return texts


def make_scenes(n_images: int, seed: int = 0, max_objects: int = 3) -> list[Scene]:
    """`n_images` random scenes with distinct object sets, split 80/10/10 into train/val/test."""
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    scenes, seen = [], set()
    bounds = np.cumsum([share for _, share in SPLITS]) * n_images
    while len(scenes) < n_images:
        count = int(rng.integers(1, max_objects + 1))
        objects = [SceneObject(colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))],
                               PLACES[rng.integers(len(PLACES))]) for _ in range(count)]
        key = tuple(sorted(o.words for o in objects))
        if key in seen or len(set(key)) < len(key):
            continue
        seen.add(key)
        index = len(scenes)
        split = next(name for (name, _), bound in zip(SPLITS, bounds, strict=True) if index < bound)
        scenes.append(Scene(f"scene_{index:05d}.png", objects, split))
    return scenes


def make_binding_scenes(n_images: int, seed: int = 0, objects: tuple[int, ...] = (2, 3),
                        distractors: tuple[int, int] = (2, 4)) -> list[Scene]:
    """`n_images` scenes in groups that only the binding of colours to shapes tells apart.

    A group of k scenes (k drawn from `objects`) takes k distinct colours and k distinct
    shapes; scene j pairs colour i with shape (i + j) mod k, so every scene of the group has
    the same colour words and the same shape words, and each (colour, shape) pair is in one
    scene only ("a red circle and a blue square" against "a blue circle and a red square").
    Captions name those k objects; each scene also shows a few objects no caption names
    (`distractors`: how many, at least and at most), of colours and shapes outside the group's,
    so pooled image vectors mix what is described with what is not. No two groups share
    their colours and shapes. A group stays in one split (80/10/10), so a test gallery holds
    each scene's look-alikes: a bag-of-words ranker cannot do better than 1/k there
    (`bag_of_words_ceiling`), a model that binds words to regions can.
    """
    from math import comb

    colours, seen = list(COLOURS), set()
    groups = {k: comb(len(colours), k) * comb(len(SHAPES), k) for k in set(objects)}  # distinct colour/shape sets
    if sum(k * n for k, n in groups.items()) < n_images:
        raise ValueError(f"groups of {', '.join(map(str, sorted(groups)))} objects make at most "
                         f"{sum(k * n for k, n in groups.items())} different scenes, fewer than {n_images}")
    rng = np.random.default_rng(seed)
    scenes: list[Scene] = []
    used: dict[int, int] = {}  # colour/shape sets taken, by group size
    bounds = np.cumsum([share for _, share in SPLITS]) * n_images
    while len(scenes) < n_images:
        left = n_images - len(scenes)
        open_sizes = [k for k in objects if used.get(k, 0) < groups[k]]  # sizes with colour/shape sets left
        # a group size that leaves room for whole groups, so every scene keeps its look-alikes
        sizes = [k for k in open_sizes if k == left or left - k >= min(objects)] or open_sizes
        k = int(rng.choice(sizes))
        chosen_colours = [colours[i] for i in rng.choice(len(colours), size=k, replace=False)]
        chosen_shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), size=k, replace=False)]
        signature = (frozenset(chosen_colours), frozenset(chosen_shapes))
        if signature in seen:
            continue
        seen.add(signature)
        used[k] = used.get(k, 0) + 1
        other_colours = [c for c in colours if c not in chosen_colours]
        other_shapes = [s for s in SHAPES if s not in chosen_shapes]
        split = next(name for (name, _), bound in zip(SPLITS, bounds, strict=True) if len(scenes) < bound)
        for shift in range(min(k, n_images - len(scenes))):
            members = [SceneObject(chosen_colours[i], chosen_shapes[(i + shift) % k], PLACES[rng.integers(len(PLACES))])
                       for i in range(k)]
            for _ in range(int(rng.integers(distractors[0], distractors[1] + 1)) if other_shapes else 0):
                members.append(SceneObject(other_colours[rng.integers(len(other_colours))],
                                           other_shapes[rng.integers(len(other_shapes))],
                                           PLACES[rng.integers(len(PLACES))]))
            scenes.append(Scene(f"scene_{len(scenes):05d}.png", members, split, named=k))
    return scenes


def bag_of_words_ceiling(scenes: list[Scene], split: str) -> dict[str, float]:
    """R@1 (percent, both directions) of a perfect bag-of-words ranker on a split's scenes.

    Every caption of a scene names the same objects (`Scene.described`); its other words
    (templates, places) are drawn independently of what the features show, so the only
    information a bag of words holds about the scene is the multiset of colour words and the
    multiset of shape words it names. A ranker that sees only that bag gives every scene
    with the same bag the same score: text → image, the best it can do is to put one of them
    first (R@1 = 1/n for a bag shared by n scenes); image → text, its first caption is one of
    the n·cpi equally scored captions (1/n in expectation). With unique bags this is 100; on
    `make_binding_scenes` it is the mean of 1/k over the scenes.
    """
    chosen = [scene for scene in scenes if scene.split == split]
    if not chosen:
        raise ValueError(f"no scenes in split {split!r}")

    def bag(scene: Scene) -> tuple:
        return (tuple(sorted(o.colour for o in scene.described)), tuple(sorted(o.shape for o in scene.described)))

    bags: dict[tuple, int] = {}
    for scene in chosen:
        bags[bag(scene)] = bags.get(bag(scene), 0) + 1
    t2i = 100.0 * len(bags) / len(chosen)  # one scene of each bag first; every scene has as many captions
    i2t = 100.0 * float(np.mean([1.0 / bags[bag(scene)] for scene in chosen]))
    return {"i2t_r1": i2t, "t2i_r1": t2i}


def write_captions(path: str | os.PathLike, scenes: list[Scene], seed: int = 0, per_image: int = 5,
                   place_rate: float = 0.3) -> Path:
    """captions.jsonl with image_id, caption and split (`place_rate`: how often an object's place is named)."""
    rng = np.random.default_rng(seed + 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", encoding="utf-8") as handle:
        for scene in scenes:
            for text in scene.captions(rng, per_image, place_rate):
                handle.write(json.dumps({"image_id": scene.image_id, "caption": text, "split": scene.split}) + "\n")
    return path


def write_feature_dataset(out: str | os.PathLike, scenes: list[Scene], *, feature_dim: int = 64,
                          max_boxes: int = 6, noise: float = 0.35, seed: int = 0, image_size: int = 64,
                          place_rate: float = 0.3) -> Path:
    """Shards of synthetic region features for `scenes`: one region per object, the rest clutter.

    A region's feature is relu(colour prototype + shape prototype + noise), so
    a model must learn which words go with which directions; clutter regions
    are noise. An object's box is where `render_scene` draws it in an image of
    `image_size` pixels (so search pages draw the attended boxes on the shapes);
    clutter boxes are random. Returns the feature directory (with captions.jsonl
    beside the shards; `place_rate`: how often a caption names an object's place, which
    the features do not show).
    """
    from extract.shards import RegionRecord, ShardWriter

    rng = np.random.default_rng(seed)
    colour_proto = {c: rng.normal(size=feature_dim) for c in COLOURS}
    shape_proto = {s: rng.normal(size=feature_dim) for s in SHAPES}
    out = Path(out)
    writer = ShardWriter(out, max_boxes=max_boxes, feature_dim=feature_dim, dtype="float32",
                         extractor={"model": "synthetic-shapes", "seed": str(seed)})
    for scene in scenes:
        k = int(rng.integers(len(scene.objects) + 1, max_boxes + 1))
        features = np.abs(rng.normal(scale=noise, size=(k, feature_dim)))
        for row, obj in enumerate(scene.objects):
            features[row] = np.maximum(colour_proto[obj.colour] + shape_proto[obj.shape]
                                       + rng.normal(scale=noise, size=feature_dim), 0)
        corners = rng.uniform(0, 0.7, size=(k, 2))
        boxes = np.concatenate([corners, corners + rng.uniform(0.1, 0.3, size=(k, 2))], axis=1)  # clutter
        for row, (cx, cy, radius) in enumerate(scene_layout(scene)):
            boxes[row] = (cx - radius, cy - radius, cx + radius, cy + radius)
        order = rng.permutation(k)
        features = features[order].astype(np.float32)
        boxes = (boxes[order] * image_size).astype(np.float32)
        writer.add(RegionRecord(scene.image_id, features, boxes, (image_size, image_size)))
        if len(writer) == 500:
            writer.commit()
    writer.commit(settings={"source": "synthetic", "images": len(scenes)})
    write_captions(out / "captions.jsonl", scenes, seed, place_rate=place_rate)
    return out


PLACE_CENTRES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
                 "middle": (0.5, 0.5)}


def _star(cx: float, cy: float, r: float, points: int = 5) -> list[tuple[float, float]]:
    import math

    return [(cx + (r if i % 2 == 0 else r * 0.45) * math.sin(math.pi * i / points),
             cy - (r if i % 2 == 0 else r * 0.45) * math.cos(math.pi * i / points)) for i in range(2 * points)]


def scene_layout(scene: Scene) -> list[tuple[float, float, float]]:
    """Where each object of a scene is drawn: (x, y, radius) as fractions of the image side.

    Fixed by the scene alone (not by the size or the seed of a rendering), so the rendered
    pixels and the boxes of the generated region features (`write_feature_dataset`) agree.
    """
    rng = np.random.default_rng([int(scene.image_id.split("_")[-1].split(".")[0]), 7])
    used: list[tuple[float, float]] = []
    layout = []
    for obj in scene.objects:
        cx, cy = PLACE_CENTRES[obj.place]
        cx, cy = cx + rng.uniform(-0.08, 0.08), cy + rng.uniform(-0.08, 0.08)
        while any(abs(cx - ux) < 0.12 and abs(cy - uy) < 0.12 for ux, uy in used):  # keep objects apart
            cx, cy = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)
        used.append((cx, cy))
        layout.append((cx, cy, rng.uniform(0.09, 0.14)))
    return layout


def render_scene(scene: Scene, size: int = 192, seed: int = 0):
    """The scene as a PIL image: each object drawn at its place (`scene_layout`) on a noisy light background."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, int(scene.image_id.split("_")[-1].split(".")[0])])
    background = rng.integers(200, 240, size=3)
    pixels = np.clip(rng.normal(background, 8, size=(size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for obj, (cx, cy, radius) in zip(scene.objects, scene_layout(scene), strict=True):
        x, y, r = cx * size, cy * size, radius * size
        colour = tuple(int(c) for c in np.clip(np.array(COLOURS[obj.colour]) + rng.normal(0, 10, 3), 0, 255))
        box = (x - r, y - r, x + r, y + r)
        if obj.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif obj.shape == "square":
            draw.rectangle(box, fill=colour)
        elif obj.shape == "triangle":
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=colour)
        elif obj.shape == "star":
            draw.polygon(_star(x, y, r * 1.2), fill=colour)
        elif obj.shape == "cross":
            draw.rectangle((x - r, y - r / 3, x + r, y + r / 3), fill=colour)
            draw.rectangle((x - r / 3, y - r, x + r / 3, y + r), fill=colour)
        else:  # ring
            draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    return image


def write_image_dataset(out: str | os.PathLike, scenes: list[Scene], *, size: int = 192, seed: int = 0) -> Path:
    """PNG files of the scenes in OUT/images and their captions in OUT/captions.jsonl; returns OUT/images.

    Each file is written whole or not at all (`atomic_write`), so a rerun after a kill may skip every file
    that exists: none is torn.
    """
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for scene in scenes:
        target = images / scene.image_id
        if not target.exists():
            with atomic_write(target) as handle:
                render_scene(scene, size, seed).save(handle, format="PNG")
    write_captions(out / "captions.jsonl", scenes, seed)
    return images


# --------------------------------------------------------------------------- multi-query scenes

# A small palette, so that any one object appears in many scenes: a single query is
# ambiguous, while a scene's set of objects is (almost) unique.
MULTIQUERY_COLOURS = ("red", "green", "blue", "yellow")
MULTIQUERY_SHAPES = ("circle", "square", "triangle", "star")


def make_multiquery_scenes(n_images: int, *, objects_per_scene: int = 4, colours: tuple[str, ...] = MULTIQUERY_COLOURS,
                           shapes: tuple[str, ...] = MULTIQUERY_SHAPES, seed: int = 0) -> list[Scene]:
    """`n_images` scenes of `objects_per_scene` different objects each, no two with the same set, split 80/10/10."""
    from math import comb

    kinds = [(c, s) for c in colours for s in shapes]
    if comb(len(kinds), objects_per_scene) < n_images:
        raise ValueError(f"{len(kinds)} kinds of object make fewer than {n_images} different scenes "
                         f"of {objects_per_scene}")
    rng = np.random.default_rng(seed)
    bounds = np.cumsum([share for _, share in SPLITS]) * n_images
    scenes, seen = [], set()
    while len(scenes) < n_images:
        chosen = rng.choice(len(kinds), size=objects_per_scene, replace=False)
        key = tuple(sorted(int(i) for i in chosen))
        if key in seen:
            continue
        seen.add(key)
        index = len(scenes)
        split = next(name for (name, _), bound in zip(SPLITS, bounds, strict=True) if index < bound)
        objects = [SceneObject(kinds[i][0], kinds[i][1], PLACES[rng.integers(len(PLACES))]) for i in chosen]
        scenes.append(Scene(f"scene_{index:05d}.png", objects, split))
    return scenes


def write_multiquery_dataset(out: str | os.PathLike, scenes: list[Scene], *, feature_dim: int = 32,
                             max_boxes: int = 6, noise: float = 0.35, seed: int = 0) -> Path:
    """Region features of `scenes` (as `write_feature_dataset`) and OUT/queries.jsonl, one query per object.

    Each scene's queries name its objects ("a red circle", "a blue star", …) in a random
    order; returns the feature directory.
    """
    from matching.data.queries import QuerySet, write_query_sets

    out = write_feature_dataset(out, scenes, feature_dim=feature_dim, max_boxes=max_boxes, noise=noise, seed=seed)
    rng = np.random.default_rng(seed + 2)
    sets = [QuerySet(scene.image_id, tuple(scene.objects[i].named for i in rng.permutation(len(scene.objects))),
                     scene.split, scene.image_id) for scene in scenes]
    write_query_sets(out / "queries.jsonl", sets)
    return out
