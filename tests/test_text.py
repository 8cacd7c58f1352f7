"""Tokenisation (pinned), vocabulary building and its SGRAF-compatible file, the vocab command."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from matching.data.text import Vocabulary, VocabularyError, tokenize
from pipelines.cli import cli

PINNED = {
    "A man's dog, running!": ["a", "man", "'s", "dog", ",", "running", "!"],
    "Two well-dressed people at 3:30 p.m. eat 2.5 pies.":
        ["two", "well-dressed", "people", "at", "3:30", "p.m.", "eat", "2.5", "pies", "."],
    'Café crème "brûlée" -- naïve': ["café", "crème", "``", "brûlée", "''", "--", "naïve"],
    "Don't stop; it's 100% fun...": ["do", "n't", "stop", ";", "it", "'s", "100", "%", "fun", "..."],
    "  Several   spaces\tand a TAB ": ["several", "spaces", "and", "a", "tab"],
}


@pytest.mark.parametrize("caption", PINNED)
def test_tokenizer_output_is_pinned(caption):
    assert tokenize(caption) == PINNED[caption]


def test_tokenizer_equals_nltk_word_tokenize_with_preserve_line():
    from nltk import word_tokenize

    for caption in PINNED:
        assert tokenize(caption) == word_tokenize(caption.lower(), preserve_line=True)


def test_the_plain_caption_path_equals_nltk_on_every_string_near_it(monkeypatch):
    """`tokenize` splits plain captions itself; on strings made of what a plain caption holds, and of what
    would make it not plain (repeated commas, digits beside commas, inner periods, the contraction words,
    capitals, tabs), it must give what NLTK gives."""
    import random

    from nltk.tokenize import NLTKWordTokenizer

    import matching.data.text as text

    nltk = NLTKWordTokenizer()
    pieces = ["a", "Dog", "z", "0", "9", "w0123", " ", " ", ",", ",", ".", "..", "\t", "cannot", "gonna", "wanna",
              "gimme", "can", "not", "got", "ta", "3,5", "é", "'s", "!"]
    generator = random.Random(0)
    for _ in range(20000):
        caption = "".join(generator.choice(pieces) for _ in range(generator.randint(0, 12)))
        assert tokenize(caption) == nltk.tokenize(caption.lower()), repr(caption)
    calls = []
    monkeypatch.setattr(text, "_TOKENIZER", type("Spy", (), {"tokenize": lambda self, s: calls.append(s) or []})())
    assert tokenize("A man riding a wave on top of a surfboard.") == \
        ["a", "man", "riding", "a", "wave", "on", "top", "of", "a", "surfboard", "."]
    tokenize("Two dogs, one ball, 3 kids")
    assert calls == ["two dogs, one ball, 3 kids"]  # digits and commas: NLTK's rules decide
    assert tokenize("Two dogs, one ball.") == ["two", "dogs", ",", "one", "ball", "."] and len(calls) == 1


def test_vocabulary_threshold_order_and_encoding():
    captions = ["a dog runs", "A dog sits.", "a cat sits", "a dog"]
    vocab = Vocabulary.build(captions, threshold=2)
    # counts: a 4, dog 3, sits 2; runs, cat, "." once
    assert vocab.words == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "sits"]
    assert vocab.encode("A dog sits on a mat") == [1, 4, 5, 6, 3, 4, 3, 2]
    assert vocab.decode([1, 5, 99]) == ["<start>", "dog", "<unk>"]


def test_vocabulary_file_is_sgraf_layout_and_round_trips(tmp_path):
    vocab = Vocabulary.build(["x y", "x"], threshold=1)
    vocab.save(tmp_path / "v.json")
    payload = json.loads((tmp_path / "v.json").read_text())
    assert payload["idx"] == 6 and payload["idx2word"]["0"] == "<pad>" and payload["word2idx"]["x"] == 4
    assert Vocabulary.load(tmp_path / "v.json") == vocab


def test_malformed_vocabularies(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(VocabularyError, match="a.json: unreadable"):
        Vocabulary.load(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"word2idx": {"x": 0}, "idx2word": {"0": "x"}, "idx": 1}))
    with pytest.raises(VocabularyError, match="b.json: a vocabulary starts with"):
        Vocabulary.load(tmp_path / "b.json")
    words = {"0": "<pad>", "1": "<start>", "2": "<end>", "3": "<unk>", "4": "a"}
    (tmp_path / "c.json").write_text(json.dumps({"word2idx": {"a": 2}, "idx2word": words, "idx": 5}))
    with pytest.raises(VocabularyError, match="disagrees"):
        Vocabulary.load(tmp_path / "c.json")
    with pytest.raises(VocabularyError, match="no such vocabulary"):
        Vocabulary.load(tmp_path / "missing.json")


def test_vocab_command_counts_train_and_val_only(tmp_path):
    lines = ["i1\tzebra zebra zebra zebra\ttrain", "i2\tlion lion\tval", "i2\tlion lion\trestval",
             "i3\tsecret secret secret secret secret\ttest"]
    (tmp_path / "caps.tsv").write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(cli, ["vocab", str(tmp_path / "caps.tsv"), "--out", str(tmp_path / "v.json")])
    assert result.exit_code == 0, result.output
    vocab = Vocabulary.load(tmp_path / "v.json")
    assert "zebra" in vocab.word2idx and "lion" in vocab.word2idx and "secret" not in vocab.word2idx
    assert "5 words" in result.output or f"{len(vocab)} words" in result.output
