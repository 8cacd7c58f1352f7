"""DrillDown's vocabulary (``data/caches/vg_vocab_14284.pkl``, the one HMRN reads) as our vocabulary.

DrillDown built it from every Visual Genome region phrase (nltk tokens, lower-cased, words
seen at least 10 times) and saved the vocabulary object itself with ``pickle.dump``: the
pickle names the class ``__main__.Vocabulary`` (the script that wrote it ran as ``__main__``;
HMRN's and DrillDown's ``vocab.py`` define the same class, so a re-saved copy may name
``vocab.Vocabulary``), rebuilt empty and given the state
``{"word2idx": {word: index}, "idx2word": {index: word}, "idx": size}`` with ``<pad>`` = 0,
``<start>`` = 1, ``<end>`` = 2, ``<unk>`` = 3. A plain dict in that layout is read the same.

The file is read with `extract.safepickle.restricted_load`, which admits plain data and, by
module and name, exactly that class, rebuilt as a stand-in that only stores its state: a
pickle naming anything else is refused before anything in it runs. The word indices are kept
as they are, so a model trained on DrillDown's indices (HMRN's checkpoints) reads the same
words (docs/multi-query.md, "Reproducing HMRN's table").
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from extract.safepickle import refused, restricted_load
from matching.data.text import Vocabulary, VocabularyError

PICKLED_CLASSES = (("__main__", "Vocabulary"), ("vocab", "Vocabulary"))  # the names DrillDown's class is saved under


class _PickledVocabulary:
    """What the pickle's Vocabulary object becomes here: its state, nothing else (no method of the original)."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _stand_in() -> type:
    return _PickledVocabulary


def read_drilldown_vocab(path: str | os.PathLike) -> Vocabulary:
    """DrillDown's pickled vocabulary as a `Vocabulary` with the same word indices.

    VocabularyError naming the file when it is missing, refused (it names a callable other
    than DrillDown's Vocabulary class) or not in DrillDown's layout.
    """
    path = Path(path)
    if not path.is_file():
        raise VocabularyError(f"{path}: no such DrillDown vocabulary (data/caches/vg_vocab_14284.pkl)")
    try:
        with open(path, "rb") as handle:
            payload = restricted_load(handle, extra={name: _stand_in for name in PICKLED_CLASSES})
    except pickle.UnpicklingError as error:
        if not refused(error):  # a torn or damaged file: the unpickler itself gave up
            raise VocabularyError(f"{path}: not a readable pickle ({error})") from None
        raise VocabularyError(f"{path}: refused: the pickle needs more than plain data and DrillDown's "
                              f"Vocabulary class ({error}); it was not loaded, as that could run code") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError,
            UnicodeDecodeError, OSError) as error:
        raise VocabularyError(f"{path}: not a readable pickle ({type(error).__name__}: {error})") from None
    state = payload.state if isinstance(payload, _PickledVocabulary) else payload
    return vocabulary_from_state(state, str(path))


def vocabulary_from_state(state: Any, source: str) -> Vocabulary:
    """``{"word2idx", "idx2word", "idx"}`` (DrillDown's Vocabulary state) → a `Vocabulary`, every index checked."""
    if not isinstance(state, dict) or not isinstance(state.get("idx2word"), dict) \
            or not isinstance(state.get("word2idx"), dict):
        found = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise VocabularyError(f"{source}: not DrillDown's vocabulary layout (expected word2idx, idx2word and idx; "
                              f"found {found})")
    idx2word, word2idx = state["idx2word"], state["word2idx"]
    size = len(idx2word)
    missing = next((i for i in range(size) if i not in idx2word and str(i) not in idx2word), None)
    if missing is not None:
        raise VocabularyError(f"{source}: idx2word has {size} entries but no index {missing}")
    words = [idx2word[i] if i in idx2word else idx2word[str(i)] for i in range(size)]
    if not all(isinstance(word, str) for word in words):
        raise VocabularyError(f"{source}: idx2word holds values that are not words")
    if len(word2idx) != size or any(not isinstance(index, int) or not 0 <= index < size or words[index] != word
                                    for word, index in word2idx.items()):
        raise VocabularyError(f"{source}: word2idx disagrees with idx2word")
    if "idx" in state and state["idx"] != size:
        raise VocabularyError(f"{source}: idx = {state['idx']!r} but the vocabulary has {size} words")
    try:
        return Vocabulary(words)
    except VocabularyError as error:
        raise VocabularyError(f"{source}: {error}") from None


def import_drilldown_vocab(path: str | os.PathLike, out: str | os.PathLike) -> Vocabulary:
    """Write DrillDown's pickled vocabulary as our vocabulary JSON (SGRAF's layout, the same indices)."""
    vocab = read_drilldown_vocab(path)
    vocab.save(out)
    return vocab


def is_pickle(path: str | os.PathLike) -> bool:
    """Whether a file is a pickle (DrillDown's vocabulary: a .pkl name, or the first byte of protocol 2 and later)."""
    if Path(path).suffix.lower() in (".pkl", ".pickle"):
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(1) == b"\x80"
    except OSError:
        return False


def load_any_vocab(path: str | os.PathLike) -> Vocabulary:
    """A vocabulary JSON (`tshsr-pipe vocab`), or DrillDown's pickled vocabulary read as above."""
    return read_drilldown_vocab(path) if is_pickle(path) else Vocabulary.load(path)
