"""DrillDown's pickled vocabulary (HMRN's vg_vocab_14284.pkl): read safely, its word indices kept."""

from __future__ import annotations

import os
import pickle
import sys

import pytest
from click.testing import CliRunner

from matching.data.text import Vocabulary, VocabularyError
from matching.importers.drilldown import load_any_vocab, read_drilldown_vocab
from pipelines.cli import cli

# Not sorted by frequency, as DrillDown's file is not: its words come in the order its counter met them.
WORDS = ["<pad>", "<start>", "<end>", "<unk>", "the", "clock", "is", "green", "man", "a"]


def drilldown_state(words=WORDS) -> dict:
    return {"word2idx": {w: i for i, w in enumerate(words)}, "idx2word": dict(enumerate(words)), "idx": len(words)}


def write_drilldown_vocab(path, monkeypatch, words=WORDS, protocol=pickle.HIGHEST_PROTOCOL, module="__main__"):
    """A pickle of DrillDown's layout: the Vocabulary object of a script run as __main__, rebuilt from its state.

    The class is made here and registered under `module` only while it is pickled, as DrillDown's lib/vocab.py
    did when it ran as a script; the file then names `__main__.Vocabulary` exactly as the published one does.
    """
    vocabulary_class = type("Vocabulary", (), {"__module__": module})
    target = sys.modules.setdefault(module, type(sys)(module))
    monkeypatch.setattr(target, "Vocabulary", vocabulary_class, raising=False)
    vocab = vocabulary_class()
    vocab.__dict__.update(drilldown_state(words))
    with open(path, "wb") as handle:
        pickle.dump(vocab, handle, protocol)
    monkeypatch.delattr(target, "Vocabulary")
    return path


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_drilldowns_pickled_vocabulary_keeps_its_word_indices(tmp_path, monkeypatch, protocol):
    path = write_drilldown_vocab(tmp_path / "vg_vocab_14284.pkl", monkeypatch, protocol=protocol)
    assert b"__main__" in path.read_bytes() and b"Vocabulary" in path.read_bytes()  # the published file's class
    vocab = read_drilldown_vocab(path)
    assert vocab.words == WORDS
    assert vocab.encode("The clock is green", wrap="end") == [4, 5, 6, 7, 2]  # HMRN's tokens: words, then <end>
    assert vocab.encode("a man") == [1, 9, 8, 2]
    assert load_any_vocab(path) == vocab


def test_a_copy_saved_from_hmrns_vocab_module_and_a_plain_dict_read_the_same(tmp_path, monkeypatch):
    resaved = write_drilldown_vocab(tmp_path / "a.pkl", monkeypatch, module="vocab")
    plain = tmp_path / "b.pkl"
    plain.write_bytes(pickle.dumps(drilldown_state()))
    assert read_drilldown_vocab(resaved).words == read_drilldown_vocab(plain).words == WORDS


def test_vocab_from_drilldown_writes_our_json_with_the_same_indices(tmp_path, monkeypatch):
    path = write_drilldown_vocab(tmp_path / "vg_vocab_14284.pkl", monkeypatch)
    result = CliRunner().invoke(cli, ["vocab", "--from-drilldown", str(path), "--out", str(tmp_path / "v.json")])
    assert result.exit_code == 0, result.output
    assert "10 words (DrillDown's vg_vocab_14284.pkl, its word indices kept)" in result.output
    written = Vocabulary.load(tmp_path / "v.json")
    assert written.words == WORDS and load_any_vocab(tmp_path / "v.json") == written
    mixed = CliRunner().invoke(cli, ["vocab", str(path), "--from-drilldown", str(path), "--out", str(tmp_path / "w")])
    assert mixed.exit_code == 2 and "give no CAPTIONS, --split or --threshold" in mixed.output
    threshold = CliRunner().invoke(cli, ["vocab", "--from-drilldown", str(path), "--threshold", "10", "--out",
                                         str(tmp_path / "w")])
    assert threshold.exit_code == 2 and not (tmp_path / "w").exists()
    neither = CliRunner().invoke(cli, ["vocab", "--out", str(tmp_path / "w")])
    assert neither.exit_code == 2 and "give CAPTIONS" in neither.output


class _RunsCommand:
    """Unpickling this calls os.system: what a tampered vocabulary file would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class Vocabulary2:
    """A class DrillDown never pickled."""


def test_hostile_and_foreign_pickles_are_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.pkl"
    hostile.write_bytes(pickle.dumps({"word2idx": _RunsCommand(f"touch {marker}")}))
    with pytest.raises(VocabularyError, match=r"hostile\.pkl: refused: .*refused posix\.system"):
        read_drilldown_vocab(hostile)
    assert not marker.exists()
    foreign = tmp_path / "foreign.pkl"
    foreign.write_bytes(pickle.dumps(Vocabulary2()))
    with pytest.raises(VocabularyError, match=r"refused tests\.test_multiquery_drilldown_vocab\.Vocabulary2"):
        read_drilldown_vocab(foreign)
    result = CliRunner().invoke(cli, ["vocab", "--from-drilldown", str(hostile), "--out", str(tmp_path / "v.json")])
    assert result.exit_code == 2 and "refused" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and not marker.exists() and not (tmp_path / "v.json").exists()


@pytest.mark.parametrize("state, message", [
    ({"words": WORDS}, "not DrillDown's vocabulary layout"),
    ([1, 2], "not DrillDown's vocabulary layout"),
    ({**drilldown_state(), "idx2word": {0: "<pad>", 2: "<end>"}}, "no index 1"),
    ({**drilldown_state(), "word2idx": {**drilldown_state()["word2idx"], "the": 5}}, "word2idx disagrees"),
    ({**drilldown_state(), "idx": 99}, "idx = 99"),
    (drilldown_state(["<unk>", "<pad>", "<start>", "<end>", "a"]), "starts with <pad>"),
])
def test_a_pickle_of_another_layout_is_named(tmp_path, state, message):
    path = tmp_path / "v.pkl"
    path.write_bytes(pickle.dumps(state))
    with pytest.raises(VocabularyError, match=message):
        read_drilldown_vocab(path)


def test_damaged_and_missing_files(tmp_path, monkeypatch):
    path = write_drilldown_vocab(tmp_path / "v.pkl", monkeypatch)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(VocabularyError, match=r"v\.pkl: not a readable pickle"):
        read_drilldown_vocab(path)
    with pytest.raises(VocabularyError, match="no such DrillDown vocabulary"):
        read_drilldown_vocab(tmp_path / "missing.pkl")
