"""Retrieval metrics and the standard protocols (docs/decisions.md, "Evaluation"; docs/formats.md, "Metrics files").

`sims` is always (n_images, n_images · captions_per_image) with caption k of
image i in column i·cpi + k. Ranks are 0-based and ties count against the
query (a caption scoring exactly as high as the ground truth ranks above it),
so a collapsed model that gives every pair the same score gets R@1 = 0, not 100.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RECALL_KEYS = ("r1", "r5", "r10")
METRIC_KEYS = tuple(f"{d}_{k}" for d in ("i2t", "t2i") for k in (*RECALL_KEYS, "medr", "meanr")) + ("rsum",)
PROTOCOLS = ("all", "full", "coco1k", "coco5k", "f30k", "hmrn")
MATCHING_PROTOCOLS = PROTOCOLS[:5]
HMRN_PROTOCOL = "hmrn"  # HMRN's evaluation script, for multi-query models (`matching.tasks.multiquery`)
COCO_TEST_IMAGES = 5000
COCO_FOLD_IMAGES = 1000
F30K_TEST_IMAGES = 1000
_ROW_CHUNK = 256


class MetricsError(ValueError):
    """A protocol that does not fit the data (image count, folds); the message says what would."""


def _check(sims: np.ndarray, captions_per_image: int) -> np.ndarray:
    sims = np.asarray(sims)
    if sims.ndim != 2:
        raise ValueError(f"sims must be a 2-d (images × captions) matrix, not shape {sims.shape}")
    if captions_per_image < 1 or sims.shape[1] != sims.shape[0] * captions_per_image:
        raise ValueError(f"sims has shape {sims.shape}: expected (n, n·{captions_per_image}) "
                         f"with {captions_per_image} captions per image")
    if not np.isfinite(sims).all():
        raise ValueError("sims contains NaN or infinite scores")
    return sims


def i2t_ranks(sims: np.ndarray, captions_per_image: int = 5) -> np.ndarray:
    """For each image, the 0-based rank of its best-scored ground-truth caption among all captions."""
    sims = _check(sims, captions_per_image)
    n, cpi = sims.shape[0], captions_per_image
    ranks = np.empty(n, np.int64)
    for start in range(0, n, _ROW_CHUNK):
        rows = np.arange(start, min(start + _ROW_CHUNK, n))
        block = sims[rows]  # (b, n·cpi)
        truth = block.reshape(len(rows), n, cpi)[np.arange(len(rows)), rows]  # (b, cpi)
        best = truth.max(axis=1, keepdims=True)
        ranks[rows] = (block >= best).sum(axis=1) - (truth >= best).sum(axis=1)
    return ranks


def t2i_ranks(sims: np.ndarray, captions_per_image: int = 5) -> np.ndarray:
    """For each caption, the 0-based rank of its image among all images."""
    sims = _check(sims, captions_per_image)
    n_captions = sims.shape[1]
    owner = np.arange(n_captions) // captions_per_image
    ranks = np.empty(n_captions, np.int64)
    for start in range(0, n_captions, _ROW_CHUNK):
        cols = np.arange(start, min(start + _ROW_CHUNK, n_captions))
        block = sims[:, cols]  # (n, b)
        truth = block[owner[cols], np.arange(len(cols))]  # (b,)
        ranks[cols] = (block >= truth).sum(axis=0) - 1
    return ranks


def _summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    return {
        f"{prefix}_r1": 100.0 * float(np.mean(ranks < 1)),
        f"{prefix}_r5": 100.0 * float(np.mean(ranks < 5)),
        f"{prefix}_r10": 100.0 * float(np.mean(ranks < 10)),
        f"{prefix}_medr": float(np.floor(np.median(ranks)) + 1),
        f"{prefix}_meanr": float(ranks.mean() + 1),
    }


def recall_metrics(sims: np.ndarray, captions_per_image: int = 5, *,
                   t2i_sims: np.ndarray | None = None) -> dict[str, float]:
    """R@1/5/10 (percent), medr and meanr in both directions, and rsum (the six recalls summed).

    `t2i_sims`: a separate matrix to rank images for each caption (two-stage retrieval ranks
    each direction by its own shortlist); default `sims` for both directions.
    """
    metrics = _summary(i2t_ranks(sims, captions_per_image), "i2t")
    metrics.update(_summary(t2i_ranks(sims if t2i_sims is None else t2i_sims, captions_per_image), "t2i"))
    metrics["rsum"] = sum(metrics[f"{d}_{k}"] for d in ("i2t", "t2i") for k in RECALL_KEYS)
    return metrics


def fold_metrics(sims: np.ndarray, fold_images: int, captions_per_image: int = 5) -> dict[str, Any]:
    """Metrics averaged over consecutive folds of `fold_images` images (MSCOCO 1K: 5 × 1000).

    Every key is the mean of the folds' values (so rsum is the mean rsum, which
    equals the sum of the mean recalls); the folds' own metrics are under "folds".
    """
    sims = _check(sims, captions_per_image)
    n = sims.shape[0]
    if n % fold_images or n == 0:
        raise MetricsError(f"{n} images do not split into folds of {fold_images}")
    folds = [recall_metrics(sims[rows, cols], captions_per_image)
             for rows, cols in galleries(n, fold_images, captions_per_image)]
    return mean_of_folds(folds)


def mean_of_folds(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """Every numeric key averaged over the folds (rsum: the mean rsum), the folds' own under "folds"."""
    keys = [key for key, value in folds[0].items() if isinstance(value, (int, float))]
    return {**{key: float(np.mean([fold[key] for fold in folds])) for key in keys}, "folds": folds}


def galleries(n_images: int, gallery_images: int, captions_per_image: int = 5) -> list[tuple[slice, slice]]:
    """(image rows, caption columns) of consecutive galleries of `gallery_images` images each."""
    cpi = captions_per_image
    return [(slice(start, start + gallery_images), slice(start * cpi, (start + gallery_images) * cpi))
            for start in range(0, n_images - gallery_images + 1, gallery_images)]


def protocol_galleries(n_images: int, protocol: str,
                       captions_per_image: int = 5) -> dict[str, list[tuple[slice, slice]]]:
    """{protocol name: its galleries}: the five 1000-image folds for coco1k, all images otherwise."""
    return {name: galleries(n_images, COCO_FOLD_IMAGES if name == "coco1k" else n_images, captions_per_image)
            for name in protocol_names(n_images, protocol)}


def protocol_names(n_images: int, protocol: str) -> list[str]:
    """The protocols a request resolves to for `n_images` test images; MetricsError if it cannot apply.

    Called before scoring, so a mismatch is reported before any work is done.
    """
    if protocol not in MATCHING_PROTOCOLS:
        hint = " (HMRN's multi-query evaluation)" if protocol == HMRN_PROTOCOL else ""
        raise MetricsError(f"protocol {protocol!r}{hint} does not apply to a matching evaluation; choose one of "
                           f"{', '.join(MATCHING_PROTOCOLS)}")
    expected = {"coco1k": COCO_TEST_IMAGES, "coco5k": COCO_TEST_IMAGES, "f30k": F30K_TEST_IMAGES}
    if protocol in expected and n_images != expected[protocol]:
        raise MetricsError(f"protocol {protocol} needs {expected[protocol]} test images, "
                         f"the split has {n_images}; use --protocol full")
    if protocol == "all":
        return {COCO_TEST_IMAGES: ["coco1k", "coco5k"], F30K_TEST_IMAGES: ["f30k"]}.get(n_images, ["full"])
    return [protocol]


def evaluate_protocol(sims: np.ndarray, protocol: str = "all",
                      captions_per_image: int = 5) -> dict[str, dict[str, Any]]:
    """Metrics under a named protocol: {protocol name: metrics}.

    - ``coco1k``: mean over 5 folds of 1000 images (needs the 5000 MSCOCO test images);
    - ``coco5k``: all 5000 MSCOCO test images;
    - ``f30k``: the 1000 Flickr30K test images;
    - ``full``: all images, whatever their number;
    - ``all``: every protocol the matrix fits (coco1k + coco5k for 5000 images,
      f30k for 1000, else full).
    """
    sims = _check(sims, captions_per_image)
    results: dict[str, dict[str, Any]] = {}
    for name in protocol_names(sims.shape[0], protocol):
        if name == "coco1k":
            results[name] = fold_metrics(sims, COCO_FOLD_IMAGES, captions_per_image)
        else:
            results[name] = recall_metrics(sims, captions_per_image)
    return results


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A readable table: one row per protocol, image→text and text→image recalls, medr, meanr, rsum."""
    header = (f"{'protocol':<9} | {'image → text':^34} | {'text → image':^34} | {'rsum':>6}\n"
              f"{'':<9} | {'R@1':>6} {'R@5':>6} {'R@10':>6} {'medr':>6} {'meanr':>6} "
              f"| {'R@1':>6} {'R@5':>6} {'R@10':>6} {'medr':>6} {'meanr':>6} | {'':>6}")
    lines = [header, "-" * len(header.splitlines()[1])]
    for name, m in results.items():
        label = f"{name} (mean of {len(m['folds'])} folds)" if "folds" in m else name
        cells = " ".join(f"{m[f'i2t_{k}']:6.1f}" for k in (*RECALL_KEYS, "medr", "meanr"))
        cells_t = " ".join(f"{m[f't2i_{k}']:6.1f}" for k in (*RECALL_KEYS, "medr", "meanr"))
        lines.append(f"{name:<9} | {cells} | {cells_t} | {m['rsum']:6.1f}")
        if "folds" in m:
            lines.append(f"{'':<9}   ({label})")
    return "\n".join(lines)


def chance_metrics(n_images: int, captions_per_image: int = 5) -> dict[str, float]:
    """Expected recalls (percent) of a model that ranks at random, for comparison with real ones.

    t2i: the one true image is in the top K with probability K/n. i2t: at least one of the
    cpi true captions is in the top K of n·cpi with probability 1 − C(n·cpi − cpi, K) / C(n·cpi, K).
    """
    from math import comb

    total = n_images * captions_per_image
    metrics = {}
    for k in (1, 5, 10):
        kk = min(k, total)
        metrics[f"i2t_r{k}"] = 100.0 * (1 - comb(total - captions_per_image, kk) / comb(total, kk))
        metrics[f"t2i_r{k}"] = 100.0 * min(1.0, k / n_images)
    metrics["rsum"] = sum(metrics.values())
    return metrics


# --------------------------------------------------------------------------- multi-query retrieval (HMRN)
#
# A multi-query score tensor is (rounds, Q, N): query set q against image n after round r.
# Query set q describes image q (Q = N) unless `targets` says otherwise. Ties count against
# the query, as above (``ties="against"``), or fall where HMRN's evaluation script puts them:
# the image's position in ``np.argsort(row)[::-1]`` (``ties="argsort"``). Which sets and
# images are ranked is the task's protocol (`matching.tasks.multiquery`).

ROUND_KEYS = ("r1", "r5", "r10", "meanr")
TIES = ("against", "argsort")


def round_ranks(scores: np.ndarray, targets: np.ndarray | None = None, ties: str = "against") -> np.ndarray:
    """(R, Q) 0-based rank of each query set's target image among the N images, at each round.

    Args:
        scores: (R, Q, N) scores of query set q against image n at round r.
        targets: (Q,) the column of each set's image; default q (requires Q = N).
        ties: ``against``: an image scoring exactly as the target ranks above it; ``argsort``: HMRN's
            script's rank, the target's position in ``np.argsort(row)[::-1]`` (the order numpy's sort
            leaves equal scores in; the same as ``against`` where no other image ties with the target).
    """
    if ties not in TIES:
        raise ValueError(f"unknown tie rule {ties!r}; choose one of {', '.join(TIES)}")
    scores = np.asarray(scores)
    if scores.ndim != 3:
        raise ValueError(f"scores must be a 3-d (rounds × query sets × images) tensor, not shape {scores.shape}")
    rounds, n_sets, n_images = scores.shape
    if targets is None:
        if n_sets != n_images:
            raise ValueError(f"scores has {n_sets} query sets for {n_images} images; give each set's target image")
        targets = np.arange(n_sets)
    targets = np.asarray(targets, np.int64)
    if targets.shape != (n_sets,) or (n_sets and (targets.min() < 0 or targets.max() >= n_images)):
        raise ValueError(f"targets must be {n_sets} image columns in 0..{n_images - 1}")
    ranks = np.empty((rounds, n_sets), np.int64)
    for start in range(0, n_sets, _ROW_CHUNK):
        rows = np.arange(start, min(start + _ROW_CHUNK, n_sets))
        block = scores[:, rows]  # (R, b, N)
        if not np.isfinite(block).all():
            raise ValueError("scores contain NaN or infinite values")
        truth = block[:, np.arange(len(rows)), targets[rows]]  # (R, b)
        if ties == "against":
            ranks[:, rows] = (block >= truth[..., None]).sum(axis=2) - 1
            continue
        ranks[:, rows] = (block > truth[..., None]).sum(axis=2)
        tied = (block == truth[..., None]).sum(axis=2) > 1  # (R, b) another image scores as the target
        for r, j in zip(*np.nonzero(tied), strict=True):
            order = np.argsort(block[r, j].astype(np.float64))[::-1]  # HMRN's script sorts float64 rows
            ranks[r, rows[j]] = int(np.flatnonzero(order == targets[rows[j]])[0])
    return ranks


def round_metrics(scores: np.ndarray, targets: np.ndarray | None = None,
                  ties: str = "against") -> dict[str, list[dict[str, float]]]:
    """Per-round R@1/5/10 (percent) and mean rank: {"rounds": [{"round": 1, "r1", "r5", "r10", "meanr"}, …]}.

    R@K is the share of 0-based ranks below K and the mean rank is the mean 0-based rank + 1, as in
    HMRN's script; `ties` as in `round_ranks`."""
    ranks = round_ranks(scores, targets, ties)
    return {"rounds": [{"round": r + 1, "r1": 100.0 * float(np.mean(row < 1)), "r5": 100.0 * float(np.mean(row < 5)),
                        "r10": 100.0 * float(np.mean(row < 10)), "meanr": float(row.mean() + 1)}
                       for r, row in enumerate(ranks)]}


def round_chance(n_images: int) -> dict[str, float]:
    """What a model ranking at random gets: R@K = K/N (percent), mean rank (N + 1)/2."""
    return {"r1": 100.0 * min(1.0, 1 / n_images), "r5": 100.0 * min(1.0, 5 / n_images),
            "r10": 100.0 * min(1.0, 10 / n_images), "meanr": (n_images + 1) / 2}


def format_round_table(metrics: dict[str, list[dict[str, float]]], chance: dict[str, float] | None = None) -> str:
    """The per-round table: one row per round (R@1, R@5, R@10, mean rank), optionally a chance row."""
    header = f"{'round':>6} | {'R@1':>6} {'R@5':>6} {'R@10':>6} {'meanr':>8}"
    lines = [header, "-" * len(header)]
    for row in metrics["rounds"]:
        lines.append(f"{row['round']:>6} | {row['r1']:6.1f} {row['r5']:6.1f} {row['r10']:6.1f} {row['meanr']:8.1f}")
    if chance is not None:
        lines.append(f"{'chance':>6} | {chance['r1']:6.1f} {chance['r5']:6.1f} {chance['r10']:6.1f} "
                     f"{chance['meanr']:8.1f}")
    return "\n".join(lines)
