"""Building a vocabulary file from the texts a model will read: captions, or multi-query query sets.

One function for the `vocab` command and the pipeline's vocab stage.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from matching.data.captions import read_split
from matching.data.queries import is_query_file, read_query_split
from matching.data.text import Vocabulary, VocabularyError


def build_vocabulary(captions: str | os.PathLike, out: str | os.PathLike, *,
                     splits: Sequence[str] | None = None, threshold: int = 4) -> tuple[Vocabulary, int]:
    """Count the words of a caption file's `splits` (default train and val) or of a multi-query JSONL
    file's query sets (default train: HMRN builds its vocabulary from the training queries), and write
    `out` in SGRAF's layout.

    Returns (the vocabulary, how many texts were counted). A split the file does not have is an
    error naming the splits it has.
    """
    if threshold < 1:
        raise VocabularyError(f"the threshold must be at least 1, not {threshold}")
    if is_query_file(captions):
        texts = [q for item in read_query_split(captions, list(splits or ("train",)), "the vocabulary")
                 for q in item.queries]
    else:
        texts = [c.text for c in read_split(captions, list(splits or ("train", "val")), "the vocabulary")]
    built = Vocabulary.build(texts, threshold)
    built.save(out)
    return built, len(texts)
