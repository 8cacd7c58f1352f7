"""Multi-query data: one image described by several region queries, given one per round.

The multi-query JSONL format has one image per line::

    {"image_id": "2345", "split": "train", "queries": ["a red car", "wet pavement", ...]}

``split`` is optional (a set without one belongs to whichever split is asked
for, as for captions); the queries keep their order, which is the order of
the rounds at evaluation time.

- `read_query_sets` / `write_query_sets`: the format, with ``file:line`` errors.
- `import_vg_queries`: DrillDown's Visual Genome layout (HMRN's data) into the
  format: the region-graph JSON of every image listed in ``vg_{train,val,test}.txt``,
  phrases cleaned (`clean_phrase`: HMRN lower-cases only; our default, ``strict``, also
  strips whitespace and drops blank phrases), exact duplicates dropped, images with fewer
  than `max_turns` queries dropped, with counts of everything dropped and of what the
  other cleaning would have changed.
- `build_query_vocab`: a vocabulary of the training queries (same tokenizer as captions);
  HMRN itself reads DrillDown's vocabulary of every Visual Genome phrase
  (`matching.importers.drilldown`).
- `MultiQueryDataset` + `QuerySetBatchSampler` + `collate_query_sets`: training
  draws `max_turns` of an image's queries in a fresh random order each epoch,
  fixed by (seed, epoch, image) so a resumed or multi-worker run draws the
  same; evaluation keeps the first `max_turns` in file order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from extract.safeio import atomic_write
from extract.shards import FeatureStore
from matching.config import PHRASE_CLEANINGS
from matching.data.captions import (
    CaptionFormatError,
    missing_split,
    read_text_file,
    resolve_image_ids,
    select_split,
    split_name,
)
from matching.data.pairs import EpochBatchSampler
from matching.data.text import Vocabulary

VG_SPLITS = ("train", "val", "test")
SPLIT_FILE = "vg_{}.txt"


class QueryFormatError(CaptionFormatError):
    """A multi-query or Visual Genome file is malformed; the message names the file (and line)."""


@dataclass(frozen=True)
class QuerySet:
    """The queries that describe one image, in round order."""

    image_id: str
    queries: tuple[str, ...]
    split: str | None  # train, val, test, or None when the file does not say
    where: str  # "file:line", for error messages


def _decode(path: Path) -> str:
    return read_text_file(path, QueryFormatError, "file")


def read_query_sets(path: str | os.PathLike, split: str | Sequence[str] | None = None) -> list[QuerySet]:
    """Every query set of a multi-query JSONL file in file order; keep only `split` (a name or names)."""
    path = Path(path)
    sets: list[QuerySet] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(_decode(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise QueryFormatError(f"{where}: not a JSON object ({error.msg})") from None
        if not isinstance(record, dict) or "image_id" not in record or "queries" not in record:
            raise QueryFormatError(f"{where}: needs 'image_id' and 'queries'")
        image_id = str(record["image_id"]).strip()
        if not image_id:
            raise QueryFormatError(f"{where}: empty image_id")
        queries = record["queries"]
        if not isinstance(queries, list) or not queries:
            raise QueryFormatError(f"{where}: 'queries' must be a non-empty list of texts")
        for k, query in enumerate(queries):  # a blank query is kept: HMRN's phrases include a few
            if not isinstance(query, str):
                raise QueryFormatError(f"{where}: query {k} is not a text")
        if image_id in seen:
            raise QueryFormatError(f"{where}: image {image_id!r} already has a line ({path}:{seen[image_id]})")
        seen[image_id] = number
        sets.append(QuerySet(image_id, tuple(queries), split_name(record.get("split")), where))
    if not sets:
        raise QueryFormatError(f"{path}: no query sets")
    if split is None:
        return sets
    return select_split(sets, split)


def read_query_split(path: str | os.PathLike, split: str | Sequence[str], purpose: str = "") -> list[QuerySet]:
    """The query sets of `split`, or a QueryFormatError naming the split, the file and the splits it has."""
    sets = read_query_sets(path)
    selected = select_split(sets, split)
    if not selected:
        raise QueryFormatError(str(missing_split(path, split, [s.split for s in sets], purpose, "query sets")))
    return selected


def is_query_file(path: str | os.PathLike) -> bool:
    """True when `path` is a multi-query JSONL file (its first record has "queries"), not a caption file."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    return isinstance(record, dict) and "queries" in record
    except (OSError, ValueError):
        return False
    return False


def write_query_sets(path: str | os.PathLike, sets: Iterable[QuerySet]) -> Path:
    """Write query sets as multi-query JSONL, atomically (a reader never sees half a file)."""
    with atomic_write(path, "w", encoding="utf-8") as handle:
        for item in sets:
            record = {"image_id": item.image_id, "split": item.split, "queries": list(item.queries)}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return Path(path)


def build_query_vocab(sets: Iterable[QuerySet], threshold: int = 4, splits: Sequence[str] = ("train",)) -> Vocabulary:
    """The vocabulary of the queries of `splits` (sets without a split count), tokenised as captions are."""
    wanted = {split_name(s) for s in splits}
    return Vocabulary.build((q for s in sets if s.split is None or s.split in wanted for q in s.queries), threshold)


# --------------------------------------------------------------------------- Visual Genome / DrillDown


@dataclass
class ImportCounts:
    """What `import_vg_queries` kept and dropped, and what the other phrase cleaning would have changed."""

    max_turns: int  # the queries an image needs to be kept
    cleaning: str = "strict"  # the phrase cleaning used (PHRASE_CLEANINGS)
    images: dict[str, int] = field(default_factory=dict)  # split → images written
    too_few_queries: dict[str, int] = field(default_factory=dict)  # split → images dropped (< max_turns)
    missing: dict[str, int] = field(default_factory=dict)  # split → listed images without region annotations
    duplicate_phrases: int = 0  # phrases dropped as exact duplicates of an earlier one of the same image
    empty_phrases: int = 0  # phrases dropped as blank (strict cleaning)
    blank_queries: int = 0  # blank queries written (HMRN's cleaning keeps blank phrases; one reads as <end> alone)
    missing_examples: list[str] = field(default_factory=list)  # the first few missing image ids
    # The other cleaning, on the same annotations: images only it keeps, images only this one keeps, and
    # images both keep whose first `max_turns` queries (those evaluated) differ in more than whitespace.
    other_keeps: int = 0
    other_drops: int = 0
    other_changes: int = 0

    def summary(self) -> str:
        """One line per split, one for the phrases and one for the other cleaning, for the console."""
        lines = [f"{split}: {self.images.get(split, 0)} images kept, {self.too_few_queries.get(split, 0)} with "
                 f"fewer than {self.max_turns} distinct phrases dropped, {self.missing.get(split, 0)} listed "
                 "without region annotations" for split in self.images]
        if self.cleaning == "hmrn":
            lines.append(f"phrases lower-cased only (HMRN's cleaning): {self.duplicate_phrases} exact duplicates "
                         f"dropped, {self.blank_queries} blank phrases kept as queries")
            other = "the strict cleaning (--cleaning strict: stripped, blank phrases dropped)"
        else:
            lines.append(f"phrases lower-cased and stripped: {self.duplicate_phrases} exact duplicates and "
                         f"{self.empty_phrases} blank phrases dropped")
            other = "HMRN's cleaning (--cleaning hmrn: lower-cased only, blanks kept)"
        lines.append(f"{other} would keep {self.other_keeps} images dropped here, drop {self.other_drops} kept here, "
                     f"and change the first {self.max_turns} queries of {self.other_changes} images both keep")
        if self.missing_examples:
            lines.append(f"images listed but not annotated, e.g.: {', '.join(self.missing_examples)}")
        return "\n".join(lines)


def read_split_list(path: Path) -> list[str]:
    """DrillDown's ``vg_{split}.txt``: one integer image id a line; returns the ids as strings."""
    ids = []
    for number, line in enumerate(_decode(path).splitlines(), start=1):
        token = line.strip()
        if not token:
            continue
        try:
            ids.append(str(int(token)))
        except ValueError:
            raise QueryFormatError(f"{path}:{number}: {token!r} is not an integer image id") from None
    return ids


def clean_phrase(phrase: str, cleaning: str = "strict") -> str | None:
    """A region phrase as a query: lower-cased (HMRN's vg.py does only this, ``hmrn``), and for ``strict`` also
    stripped, None (dropped) when blank."""
    lowered = phrase.lower()
    if cleaning == "hmrn":
        return lowered
    if cleaning != "strict":
        raise ValueError(f"unknown phrase cleaning {cleaning!r}; choose one of {', '.join(PHRASE_CLEANINGS)}")
    return lowered.strip() or None


def image_phrases(regions: object, source: str, cleaning: str = "strict") -> tuple[list[str], int, int]:
    """One image's queries from its ``regions`` list: (phrases, duplicates dropped, blank phrases).

    HMRN's order: duplicates (the same phrase after `clean_phrase`) are dropped keeping the
    first in file order, then the phrases are ordered by ``region_id``. Blank phrases are
    dropped by the strict cleaning and kept (once, as duplicates are) by HMRN's.
    """
    if not isinstance(regions, list):
        raise QueryFormatError(f"{source}: 'regions' must be a list")
    kept: dict[str, int] = {}  # phrase → region_id
    duplicates = blank = 0
    for index, region in enumerate(regions):
        if not isinstance(region, dict) or not isinstance(region.get("phrase"), str):
            raise QueryFormatError(f"{source}: regions[{index}] has no text 'phrase'")
        try:
            region_id = int(region["region_id"])
        except (KeyError, TypeError, ValueError):
            raise QueryFormatError(f"{source}: regions[{index}] has no integer 'region_id'") from None
        phrase = clean_phrase(region["phrase"], cleaning)
        if phrase is None or not phrase.strip():
            blank += 1
        if phrase is None:
            continue
        if phrase in kept:
            duplicates += 1
        else:
            kept[phrase] = region_id
    return sorted(kept, key=kept.__getitem__), duplicates, blank


def _words(phrases: Sequence[str]) -> list[str]:
    return [" ".join(phrase.split()) for phrase in phrases]


def _load_json(path: Path) -> object:
    try:
        return json.loads(_decode(path))
    except json.JSONDecodeError as error:
        raise QueryFormatError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None


def _regions_from_file(path: Path) -> dict[str, object]:
    """Visual Genome's ``region_descriptions.json`` / ``region_graphs.json``: image id → its regions list."""
    payload = _load_json(path)
    if not isinstance(payload, list):
        raise QueryFormatError(f"{path}: expected a list of images with 'regions' (Visual Genome's layout)")
    table: dict[str, object] = {}
    for index, entry in enumerate(payload):
        if not isinstance(entry, dict) or "regions" not in entry:
            raise QueryFormatError(f"{path}: entry {index} has no 'regions'")
        image_id = entry.get("image_id", entry.get("id"))
        if image_id is None and isinstance(entry["regions"], list) and entry["regions"]:
            first = entry["regions"][0]
            image_id = first.get("image_id") if isinstance(first, dict) else None
        try:
            table[str(int(image_id))] = entry["regions"]
        except (TypeError, ValueError):
            raise QueryFormatError(f"{path}: entry {index} names no integer image id ('image_id' or 'id')") from None
    return table


def import_vg_queries(regions: str | os.PathLike, splits_dir: str | os.PathLike, out: str | os.PathLike, *,
                      max_turns: int = 10, splits: Sequence[str] = VG_SPLITS, cleaning: str = "strict") -> ImportCounts:
    """DrillDown's Visual Genome annotations → a multi-query JSONL file (HMRN's data preparation).

    Args:
        regions: DrillDown's ``rg_jsons`` directory (``<image id>.json`` holding
            ``{"regions": [{"region_id", "phrase", ...}]}``), or Visual Genome's
            ``region_descriptions.json`` (a list of images with their regions).
        splits_dir: the directory with DrillDown's split lists ``vg_train.txt``,
            ``vg_val.txt``, ``vg_test.txt``.
        out: the JSONL file to write (atomically); images in split order, then list order.
        max_turns: images with fewer distinct phrases are dropped (HMRN: 10).
        cleaning: ``strict`` (lower-cased, stripped, blank phrases dropped) or ``hmrn``
            (lower-cased only, HMRN's): `clean_phrase`.

    Returns the counts of what was kept and dropped, and of what the other cleaning would
    have kept, dropped and changed (docs/multi-query.md, "Reproducing HMRN's table").
    """
    regions, splits_dir = Path(regions), Path(splits_dir)
    if max_turns < 1:
        raise ValueError(f"max_turns must be at least 1, not {max_turns}")
    if cleaning not in PHRASE_CLEANINGS:
        raise ValueError(f"unknown phrase cleaning {cleaning!r}; choose one of {', '.join(PHRASE_CLEANINGS)}")
    other = next(c for c in PHRASE_CLEANINGS if c != cleaning)
    table = _regions_from_file(regions) if regions.is_file() else None
    if table is None and not regions.is_dir():
        raise QueryFormatError(f"{regions}: no such directory of region-graph JSON files (rg_jsons) or file")
    lists: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for split in splits:
        path = splits_dir / SPLIT_FILE.format(split)
        lists[split] = read_split_list(path)
        for image_id in lists[split]:
            if image_id in owner:
                raise QueryFormatError(f"{path}: image {image_id} is also listed in "
                                       f"{splits_dir / SPLIT_FILE.format(owner[image_id])}")
            owner[image_id] = split
    counts = ImportCounts(max_turns, cleaning)
    sets: list[QuerySet] = []
    for split, image_ids in lists.items():
        kept = short = missing = 0
        for image_id in image_ids:
            if table is not None:
                source = f"{regions} (image {image_id})"
                image_regions = table.get(image_id)
            else:
                path = regions / f"{image_id}.json"
                source = str(path)
                image_regions = None
                if path.exists():
                    payload = _load_json(path)
                    if not isinstance(payload, dict) or "regions" not in payload:
                        raise QueryFormatError(f"{path}: expected an object with a 'regions' list")
                    image_regions = payload["regions"]
            if image_regions is None:
                missing += 1
                if len(counts.missing_examples) < 5:
                    counts.missing_examples.append(image_id)
                continue
            phrases, duplicates, blank = image_phrases(image_regions, source, cleaning)
            counts.duplicate_phrases += duplicates
            if cleaning == "strict":
                counts.empty_phrases += blank
            alternative = image_phrases(image_regions, source, other)[0]
            if len(phrases) < max_turns:
                counts.other_keeps += len(alternative) >= max_turns
                short += 1
                continue
            if len(alternative) < max_turns:
                counts.other_drops += 1
            elif _words(alternative[:max_turns]) != _words(phrases[:max_turns]):
                counts.other_changes += 1  # whitespace alone changes no token, so it is not counted
            counts.blank_queries += sum(1 for phrase in phrases if not phrase.strip())
            sets.append(QuerySet(image_id, tuple(phrases), split, source))
            kept += 1
        counts.images[split], counts.too_few_queries[split], counts.missing[split] = kept, short, missing
    if not sets:
        raise QueryFormatError(f"{regions}: no image of the split lists has {max_turns} distinct phrases")
    write_query_sets(out, sets)
    return counts


# --------------------------------------------------------------------------- datasets


@dataclass
class QuerySetData:
    """Query sets tied to feature ids and token ids: set i describes image_ids[i]."""

    image_ids: list[str]  # feature ids, one per set
    queries: list[list[list[int]]]  # per set, per query: token ids, wrapped as the model reads them
    texts: list[tuple[str, ...]]  # the raw queries, for logs and search pages

    def __len__(self) -> int:
        return len(self.image_ids)


def build_query_data(sets: Sequence[QuerySet], available: Sequence[str], vocab: Vocabulary,
                     max_turns: int, wrap: str = "start-end") -> QuerySetData:
    """Resolve each set's image against the feature ids and tokenise its queries (wrapped by `wrap`,
    `matching.config.TEXT_WRAPS`: the model's `query_wrap`).

    Raises QueryFormatError naming the line of a set whose image has no features or
    that has fewer than `max_turns` queries.
    """
    image_ids = set_images(sets, available, max_turns)
    return QuerySetData(image_ids, [[vocab.encode(q, wrap) for q in item.queries] for item in sets],
                        [item.queries for item in sets])


def set_images(sets: Sequence[QuerySet], available: Sequence[str], max_turns: int) -> list[str]:
    """The feature id of each set's image; QueryFormatError naming the line of a set whose image has no
    features or that has fewer than `max_turns` queries."""
    if not sets:
        raise QueryFormatError("no query sets in the requested split")
    resolved = resolve_image_ids([s.image_id for s in sets], available)
    for item in sets:
        if item.image_id not in resolved:
            raise QueryFormatError(f"{item.where}: image {item.image_id!r} has no features")
        if len(item.queries) < max_turns:
            raise QueryFormatError(f"{item.where}: image {item.image_id!r} has {len(item.queries)} queries; "
                                   f"{max_turns} rounds need {max_turns}")
    return [resolved[item.image_id] for item in sets]


class MultiQueryDataset(Dataset):
    """Item = (features (K, D) float32, num_boxes, [token tensors of the drawn queries], set index).

    The key is a set index (evaluation: the first `max_turns` queries in file
    order) or a (set index, epoch) pair from `QuerySetBatchSampler` (training:
    `max_turns` queries drawn without replacement in a random order fixed by
    (seed, epoch, set index), so workers and resumed runs draw the same).
    """

    def __init__(self, store: FeatureStore, data: QuerySetData, max_turns: int, *, seed: int = 0,
                 in_memory: bool = False) -> None:
        self.store = store
        self.data = data
        self.max_turns = max_turns
        self.seed = seed
        self.memory: np.ndarray | None = None
        self.memory_boxes: np.ndarray | None = None
        if in_memory:
            self.memory = np.zeros((len(data), store.max_boxes, store.feature_dim), store.dtype)
            self.memory_boxes = np.zeros(len(data), np.int64)
            for row, image_id in enumerate(data.image_ids):
                features, _, k, _ = store.get(image_id)
                self.memory[row, :k] = features
                self.memory_boxes[row] = k

    def __len__(self) -> int:
        return len(self.data)

    def drawn(self, index: int, epoch: int | None) -> list[int]:
        """Positions of the queries used for set `index`: drawn for an epoch, or the first max_turns."""
        count = len(self.data.queries[index])
        if epoch is None:
            return list(range(min(count, self.max_turns)))
        rng = np.random.default_rng([self.seed, epoch, index])
        return rng.permutation(count)[: self.max_turns].tolist()

    def image(self, index: int) -> tuple[np.ndarray, int]:
        """(features (K, D) float32 padded to the store's K, num_boxes) of set `index`'s image."""
        if self.memory is not None and self.memory_boxes is not None:
            return self.memory[index].astype(np.float32), int(self.memory_boxes[index])
        features, _, k, _ = self.store.get(self.data.image_ids[index])
        padded = np.zeros((self.store.max_boxes, features.shape[1]), np.float32)
        padded[:k] = features
        return padded, k

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, list[torch.Tensor], int]:
        index, epoch = (key, None) if isinstance(key, (int, np.integer)) else key
        index = int(index)
        features, k = self.image(index)
        queries = [torch.tensor(self.data.queries[index][q], dtype=torch.long) for q in self.drawn(index, epoch)]
        return torch.from_numpy(features), k, queries, index


@dataclass
class QuerySetBatch:
    features: torch.Tensor  # (B, K, D) float32, K = the batch's most boxes
    num_boxes: torch.Tensor  # (B,)
    tokens: torch.Tensor  # (B, T, L) int64, 0-padded; T = the batch's most queries
    lengths: torch.Tensor  # (B, T) tokens per query, 0 for a padded query
    set_index: torch.Tensor  # (B,)

    def pin_memory(self) -> QuerySetBatch:
        return QuerySetBatch(*(t.pin_memory() for t in vars(self).values()))

    def to(self, device: torch.device | str) -> QuerySetBatch:
        return QuerySetBatch(*(t.to(device, non_blocking=True) for t in vars(self).values()))


def pad_query_sets(sets: Sequence[Sequence[Sequence[int] | torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists per set → (tokens (B, T, L) 0-padded, lengths (B, T), 0 for a padded query)."""
    turns = max(len(s) for s in sets)
    longest = max(len(q) for s in sets for q in s)
    tokens = torch.zeros(len(sets), turns, longest, dtype=torch.long)
    lengths = torch.zeros(len(sets), turns, dtype=torch.long)
    for b, queries in enumerate(sets):
        for t, query in enumerate(queries):
            tokens[b, t, : len(query)] = torch.as_tensor(query, dtype=torch.long)
            lengths[b, t] = len(query)
    return tokens, lengths


def collate_query_sets(items: Sequence[tuple[torch.Tensor, int, list[torch.Tensor], int]]) -> QuerySetBatch:
    """Stack MultiQueryDataset items, padding boxes to the most, queries and tokens to the longest."""
    k = max(item[1] for item in items)
    tokens, lengths = pad_query_sets([item[2] for item in items])
    return QuerySetBatch(features=torch.stack([item[0][:k] for item in items]),
                         num_boxes=torch.tensor([item[1] for item in items]), tokens=tokens, lengths=lengths,
                         set_index=torch.tensor([item[3] for item in items]))


class QuerySetBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shuffled batches of (set index, epoch) keys, every set once per epoch, order fixed by (seed, epoch).

    The batching, `start_batch` (resume) and DistributedDataParallel slicing are
    `EpochBatchSampler`'s (uniform batches); the epoch travels with each
    key so that the dataset draws that epoch's queries even in persistent workers.
    """

    def __init__(self, num_sets: int, batch_size: int, *, seed: int = 0, drop_last: bool = False,
                 num_replicas: int = 1, rank: int = 0) -> None:
        self.inner = EpochBatchSampler(np.ones(num_sets, np.int64), batch_size, seed=seed, drop_last=drop_last,
                                       num_replicas=num_replicas, rank=rank)

    @property
    def epoch(self) -> int:
        return self.inner.epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.inner.set_epoch(epoch, start_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.inner.epoch
        for batch in self.inner:
            yield [(index, epoch) for index in batch]

    def __len__(self) -> int:
        return len(self.inner)
