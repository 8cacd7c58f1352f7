"""Tokenisation and the vocabulary (docs/formats.md, "Vocabulary").

Captions are lower-cased and split by nltk's `NLTKWordTokenizer`, the
tokenizer that `nltk.word_tokenize(text, preserve_line=True)` runs; unlike
plain `word_tokenize` it needs no punkt data, so nothing is downloaded.
A caption is wrapped in <start> … <end>, which count toward its length; a multi-query model
can read its queries as HMRN does, words followed by <end> only (`matching.config.TEXT_WRAPS`).

Most captions are plain: lower-case letters, digits and spaces, a final period, commas between
words. For those, NLTK's thirty-odd rules reduce to setting the period and the commas apart, so
`tokenize` does just that (a tenth of the time) and sends every other caption to the tokenizer;
a test checks the two agree on every plain string it generates (docs/decisions.md).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from nltk.tokenize import NLTKWordTokenizer

from extract.safeio import write_text
from matching.config import TEXT_WRAPS

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
_TOKENIZER = NLTKWordTokenizer()
# Plain captions (after lower-casing): words of a-z and 0-9 between single spaces, at most one period, at the
# end; commas only in captions without digits (NLTK keeps "3,5" whole) and never two in a row ("a,,b" keeps
# ",b"). NLTK's contraction rules split six plain words ("cannot" → "can not"): those take the full path.
_PLAIN = re.compile(r"(?:[a-z0-9 ]*|(?:[a-z ]|,(?!,))*)\.? *")
_SPLIT_WORDS = re.compile(r"\b(?:cannot|gimme|gonna|gotta|lemme|wanna)\b")


class VocabularyError(ValueError):
    """A vocabulary file is malformed or does not fit; the message names the file."""


def tokenize(caption: str) -> list[str]:
    """Lower-case word tokens of a caption ("A dog's toy." → ["a", "dog", "'s", "toy", "."])."""
    text = caption.lower()
    if _PLAIN.fullmatch(text) and not _SPLIT_WORDS.search(text):
        return text.replace(",", " , ").replace(".", " . ").split()
    return _TOKENIZER.tokenize(text)


class Vocabulary:
    """Word ↔ index, with <pad>=0, <start>=1, <end>=2, <unk>=3; SGRAF's JSON layout on disk."""

    def __init__(self, words: Sequence[str]) -> None:
        if tuple(words[:4]) != SPECIALS:
            raise VocabularyError(f"a vocabulary starts with {', '.join(SPECIALS)}, not {list(words[:4])}")
        self.words = list(words)
        self.word2idx = {word: index for index, word in enumerate(self.words)}
        if len(self.word2idx) != len(self.words):
            raise VocabularyError("the vocabulary lists a word twice")

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    def __call__(self, word: str) -> int:
        return self.word2idx.get(word, 3)

    def encode(self, caption: str, wrap: str = "start-end") -> list[int]:
        """Token ids of a text: [<start>, words…, <end>] (`wrap` start-end, captions) or [words…, <end>] (end,
        HMRN's queries); unknown words map to <unk>."""
        if wrap not in TEXT_WRAPS:
            raise ValueError(f"unknown wrap {wrap!r}; choose one of {', '.join(TEXT_WRAPS)}")
        words = [self(token) for token in tokenize(caption)]
        return [*words, 2] if wrap == "end" else [1, *words, 2]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.words[i] if 0 <= i < len(self.words) else UNK for i in ids]

    @classmethod
    def build(cls, captions: Iterable[str], threshold: int = 4) -> Vocabulary:
        """Every word occurring at least `threshold` times, most frequent first (ties alphabetical)."""
        counts = Counter(token for caption in captions for token in tokenize(caption))
        kept = sorted((w for w, n in counts.items() if n >= threshold and w not in SPECIALS),
                      key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept])

    def to_json(self) -> dict:
        """SGRAF's layout: word2idx, idx2word (string keys) and idx (the size)."""
        return {"word2idx": dict(self.word2idx),
                "idx2word": {str(i): w for i, w in enumerate(self.words)},
                "idx": len(self.words)}

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON file atomically."""
        write_text(path, json.dumps(self.to_json()))

    @classmethod
    def from_json(cls, payload: object, source: str = "vocabulary") -> Vocabulary:
        """Read SGRAF's layout (their shipped coco/f30k vocab files load as they are)."""
        try:
            idx2word = payload["idx2word"]  # type: ignore[index]
            word2idx = payload["word2idx"]  # type: ignore[index]
            size = len(idx2word)
            words = [idx2word[str(i)] for i in range(size)]
        except (KeyError, TypeError) as error:
            raise VocabularyError(f"{source}: not a vocabulary file (needs word2idx and idx2word with "
                                  f"keys 0..n-1; missing {error})") from None
        for word, index in word2idx.items():
            if not isinstance(index, int) or index >= size or words[index] != word:
                raise VocabularyError(f"{source}: word2idx[{word!r}] = {index!r} disagrees with idx2word")
        try:
            return cls(words)
        except VocabularyError as error:
            raise VocabularyError(f"{source}: {error}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise VocabularyError(f"{path}: no such vocabulary file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise VocabularyError(f"{path}: unreadable vocabulary ({error})") from None
        return cls.from_json(payload, str(path))

