"""Building a vocabulary file from the texts a model will read: captions, or multi-query query sets.

One function for the `vocab` command and the pipeline's vocab stage.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from matching.data.text import Vocabulary, VocabularyError


def build_vocabulary(captions: str | os.PathLike, out: str | os.PathLike, *,
                     splits: Sequence[str] | None = None, threshold: int = 4) -> tuple[Vocabulary, int]:
    """Count the words of the texts a model of the file's task reads (`Task.vocabulary_texts`: a caption
    file's `splits`, default train and val; a multi-query JSONL file's queries, default train) and
    write `out` in SGRAF's layout.

    Returns (the vocabulary, how many texts were counted). A split the file does not have is an
    error naming the splits it has.
    """
    if threshold < 1:
        raise VocabularyError(f"the threshold must be at least 1, not {threshold}")
    from matching.tasks import task_of_data

    texts = task_of_data(captions).vocabulary_texts(captions, splits)
    built = Vocabulary.build(texts, threshold)
    built.save(out)
    return built, len(texts)
