"""The (n_images × n_captions) score matrix in bounded memory.

Each image and each caption is encoded exactly once. Captions are grouped by
exact length (no padded word is ever scored) and images ordered by their box
counts (a block is cut to its most boxes); then every caption group is scored
against image blocks, all pairs of a block in one pass of `SimilarityHead`.
Blocks are small on a CPU, where they must stay in cache, and as large as the
memory budget allows on a GPU. Runs under `torch.inference_mode` on any device.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from matching.config import PRECISIONS
from matching.model.encoders import Embedded
from matching.model.similarity import default_chunk_rows
from matching.model.tshsr import TSHSR

CPU_BUDGET_BYTES = 2 << 30
CPU_BLOCK_PAIRS = 256  # pairs per head call on a CPU: every per-pair tensor of a block stays in cache


class ImageSource(Protocol):
    """Anything that yields region features by position: arrays in memory or a FeatureStore."""

    def __len__(self) -> int: ...

    def load(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """(features (B, K, D) float32, num_boxes (B,) int64) of images start..stop-1."""
        ...


@dataclass
class ImageArrays:
    """Region features already in memory."""

    features: np.ndarray | Tensor  # (n, K, D)
    num_boxes: np.ndarray | Tensor  # (n,)

    def __len__(self) -> int:
        return len(self.features)

    def load(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        features = torch.as_tensor(self.features[start:stop]).float()
        return features, torch.as_tensor(self.num_boxes[start:stop]).long()


@dataclass
class StoreImages:
    """Images of a FeatureStore, in the order of `image_ids`."""

    store: object  # extract.shards.FeatureStore, or any object with its batch(image_ids)
    image_ids: Sequence[str]

    def __len__(self) -> int:
        return len(self.image_ids)

    def load(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        batch = self.store.batch(self.image_ids[start:stop])  # type: ignore[attr-defined]
        return torch.from_numpy(batch.features), torch.from_numpy(batch.num_boxes)


@dataclass
class SlicedImages:
    """Images start..stop-1 of another source (one rank's share)."""

    source: ImageSource
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def load(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        return self.source.load(self.start + start, self.start + stop)


def pad_tokens(captions: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Token-id lists → (tokens (B, L) padded with 0, lengths (B,))."""
    lengths = torch.tensor([len(c) for c in captions], dtype=torch.long)
    tokens = torch.zeros(len(captions), int(lengths.max()), dtype=torch.long)
    for row, caption in enumerate(captions):
        tokens[row, : len(caption)] = torch.as_tensor(caption, dtype=torch.long)
    return tokens, lengths


def bytes_per_pair(num_regions: int, num_words: int, embed_size: int, sim_dim: int, *, streams: str = "both",
                   reasoning_stream: str = "i2t", reasoning_steps: int = 3) -> int:
    """Peak working memory of one image-caption pair in `SimilarityHead` (no autograd, float32), in bytes.

    The d-sized attended vectors live in chunks of rows (see `chunk_bytes`), so a pair
    holds only what is alive in the head's largest phase: a stream's attention maps (K·L,
    four of them) with its projected nodes (L·m, or 2·K·m), the node matrix being put
    together, or a reasoning layer's input nodes (and the first layer's), its query and
    message products and output (three n×m) and five n×n relation matrices.
    `tests/test_fast_paths.py` holds this against the peak measured by torch's profiler.
    `embed_size` is unused: nothing d-sized is kept per pair.
    """
    del embed_size
    k, length, m, steps = num_regions, num_words, sim_dim, reasoning_steps

    def reasoning(n: int) -> int:
        return (2 if steps >= 2 else 1) * n * m + 3 * n * m + 5 * n * n

    phases = []
    if streams in ("i2t", "both"):  # attention and projection; the node matrix made; reasoning
        phases += [4 * k * length + length * m, k * length + 2 * length * m + (length + 1) * m]
        if steps and reasoning_stream == "i2t":
            phases.append(k * length + reasoning(length + 1))
    if streams in ("t2i", "both"):
        phases.append(4 * k * length + 2 * k * m)
        if steps and reasoning_stream == "t2i":
            phases += [k * length + k * m + (k + 1) * m, k * length + reasoning(k + 1)]
    return 4 * (max(phases) + 3 * m)


def chunk_bytes(chunk_rows: int, embed_size: int) -> int:
    """Working memory of `attend_project`'s d-sized buffer (the forward pass holds one).

    `chunk_rows` must count at least one group's rows (Bc·L words or Bi·K regions): a chunk
    never splits a group.
    """
    return 4 * chunk_rows * embed_size


def default_budget(device: torch.device) -> int:
    """Half the free GPU memory, or 2 GiB on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return CPU_BUDGET_BYTES


def block_shape(pairs: int, n_images: int, n_captions: int) -> tuple[int, int]:
    """(images, captions) of a block of at most `pairs` pairs, as square as the counts allow."""
    captions = max(1, min(n_captions, int(pairs**0.5)))
    images = max(1, min(n_images, pairs // captions))
    captions = max(1, min(n_captions, pairs // images))
    return images, captions


def encode_images(model: TSHSR, images: ImageSource, device: torch.device, batch_size: int = 128) -> Embedded:
    """Encode every image once; the result lives on `device`."""
    parts = []
    for start in range(0, len(images), batch_size):
        features, num_boxes = images.load(start, min(start + batch_size, len(images)))
        parts.append(model.encode_images(features.to(device), num_boxes.to(device)))
    return Embedded(torch.cat([p.local for p in parts]), torch.cat([p.mask for p in parts]),
                    torch.cat([p.glob for p in parts]))


def encode_captions(model: TSHSR, captions: Sequence[Sequence[int]], device: torch.device,
                    batch_size: int = 128) -> list[tuple[Tensor, Embedded]]:
    """Encode every caption once, in blocks of similar length: [(caption indices, Embedded)]."""
    order = sorted(range(len(captions)), key=lambda i: len(captions[i]))
    blocks = []
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        tokens, lengths = pad_tokens([captions[i] for i in index])
        blocks.append((torch.tensor(index), model.encode_captions(tokens.to(device), lengths.to(device))))
    return blocks


def length_groups(blocks: list[tuple[Tensor, Embedded]]) -> list[tuple[Tensor, Embedded]]:
    """Length-sorted caption blocks regrouped by exact length: [(caption indices, Embedded (n_L, L, d))].

    No word of a group is padding, so scoring a group wastes nothing on padded words.
    """
    pieces: dict[int, list[tuple[Tensor, Embedded]]] = {}
    for index, emb in blocks:
        lengths = emb.mask.sum(1).cpu()
        for length in lengths.unique().tolist():
            rows = (lengths == length).nonzero().squeeze(1)
            on_device = rows.to(emb.local.device)
            part = Embedded(emb.local[on_device, :length], emb.mask[on_device, :length], emb.glob[on_device])
            pieces.setdefault(length, []).append((index[rows], part))
    return [(torch.cat([i for i, _ in parts]),
             Embedded(torch.cat([e.local for _, e in parts]), torch.cat([e.mask for _, e in parts]),
                      torch.cat([e.glob for _, e in parts])))
            for _, parts in sorted(pieces.items())]




@contextlib.contextmanager
def matmul_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Matrix products in float32 (exact), TF32 (CUDA tensor cores; float32 on a CPU) or bfloat16 autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    elif precision == "tf32" and device.type == "cuda":
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    else:
        yield


class ScoringProgress:
    """Pairs scored so far: a bar with rate and ETA on a terminal, else a log line every `interval` s."""

    def __init__(self, total: int, *, bar: bool, log: Callable[[str], None] | None, interval: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from extract.runtime import interactive, progress_bar

        self.total, self.done, self.log, self.interval, self.clock = total, 0, None, interval, clock
        self.bar = progress_bar(total, "scoring", "pair", enabled=bar)
        if log is not None and not (bar and interactive()):
            self.log = log
        self.start = self.last = clock()

    def update(self, pairs: int) -> None:
        self.done += pairs
        self.bar.update(pairs)
        now = self.clock()
        if self.log is not None and now - self.last >= self.interval and self.done < self.total:
            self.last = now
            self.log(self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (f"scoring: {self.done:,}/{self.total:,} pairs ({100 * self.done / self.total:.0f}%), "
                f"{rate:,.0f} pairs/s, ETA {_duration(eta)}")

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def score_matrix(
    model: TSHSR,
    images: ImageSource | Embedded,
    captions: Sequence[Sequence[int]] | Any,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
    memory_budget: int | None = None,
    progress: bool = False,
    precision: str = "float32",
    log: Callable[[str], None] | None = None,
    log_every: float = 30.0,
    block_pairs: int | None = None,
) -> np.ndarray:
    """Scores of every image against every caption: (n_images, n_captions) float32.

    Args:
        model: the network; put in eval mode for the call and restored after.
        images: region features (`ImageArrays`, `StoreImages` or any `ImageSource`), or images
            already encoded by this model (an `Embedded`, e.g. from a search index).
        captions: token-id lists (with <start>/<end>), in column order, or captions this model already
            encoded (`matching.retrieval.shortlist.CaptionGroups`: anything with `groups`).
        device: where to compute; the model is moved there.
        batch_size: images/captions per encoder batch.
        memory_budget: bytes of working memory for a block of pairs (default: half
            the free GPU memory, or 2 GiB on the CPU).
        progress: show a progress bar with the rate and ETA (on a terminal).
        precision: "float32" (exact), "tf32" (CUDA TF32 matmuls) or "bf16" (bfloat16 autocast).
        log: called with a line (pairs done, pairs/s, ETA) every `log_every` seconds when no bar is shown.
        block_pairs: pairs per block of the head (default: 256 on a CPU, where blocks stay in
            cache, and as many as the budget allows on a GPU).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if len(images) == 0 or len(captions) == 0:
        return np.zeros((len(images), len(captions)), np.float32)
    device = torch.device(device)
    budget = memory_budget or default_budget(device)
    was_training = model.training
    model.eval().to(device)
    scores = np.zeros((len(images), len(captions)), np.float32)
    try:
        with torch.inference_mode():
            image_emb = images.to(device) if isinstance(images, Embedded) else encode_images(
                model, images, device, batch_size)
            groups = (captions.groups if hasattr(captions, "groups")
                      else length_groups(encode_captions(model, captions, device, batch_size)))
            # Images in order of their box counts: a block is cut to its most boxes.
            box_counts = image_emb.mask.sum(1).cpu()
            image_order = torch.argsort(box_counts, stable=True)
            if bool((box_counts != box_counts[0]).any()):
                image_emb = image_emb.select(image_order.to(device))
            rows_of = image_order.numpy()
            n_images, num_regions, embed_size = image_emb.local.shape
            head = model.head
            sim_dim = head.score.in_features
            chunk_rows = max(1, min(default_chunk_rows(device), budget // 2 // (4 * embed_size)))
            tracker = ScoringProgress(n_images * len(captions), bar=progress, log=log, interval=log_every)
            for index, caption_emb in groups:
                per_pair = bytes_per_pair(num_regions, caption_emb.local.shape[1], embed_size, sim_dim,
                                          streams=head.streams, reasoning_stream=head.reasoning_stream,
                                          reasoning_steps=len(head.reasoning))
                length = caption_emb.local.shape[1]
                pairs = max(1, (budget - chunk_bytes(chunk_rows, embed_size)) // per_pair)
                if block_pairs is not None or device.type != "cuda":
                    pairs = min(pairs, block_pairs or CPU_BLOCK_PAIRS)
                while True:  # a chunk holds one group's rows at least: Bc·L words, Bi·K regions
                    img_step, cap_step = block_shape(pairs, n_images, len(index))
                    rows = max(chunk_rows, cap_step * length, img_step * num_regions)
                    if pairs == 1 or per_pair * img_step * cap_step + chunk_bytes(rows, embed_size) <= budget:
                        break
                    pairs //= 2
                for c0 in range(0, len(index), cap_step):
                    cap_block = caption_emb.select(slice(c0, c0 + cap_step))
                    columns = index[c0:c0 + cap_step].numpy()
                    for i0 in range(0, n_images, img_step):
                        with matmul_precision(precision, device):
                            block = model.pair_scores(image_emb.select(slice(i0, i0 + img_step)), cap_block,
                                                      chunk_rows=chunk_rows)
                        rows = rows_of[i0:i0 + img_step]
                        scores[np.ix_(rows, columns)] = block.float().cpu().numpy()
                        tracker.update(len(rows) * len(columns))
            tracker.close()
    finally:
        model.train(was_training)
    return scores
