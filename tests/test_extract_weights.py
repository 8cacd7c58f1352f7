"""Weights: the published layout loads, hostile or wrong files are refused with a clear reason."""

from __future__ import annotations

import collections
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.config import DetectorConfig
from extract.safepickle import restricted_load
from extract.weights import (
    WEIGHTS_URL,
    WeightsError,
    check_state,
    expected_shapes,
    load_weights,
)
from tests.extract_fixtures import published_weights  # noqa: F401 - fixture

CONFIG = DetectorConfig()


def test_expected_layout_is_the_published_one():
    published = json.loads((Path(__file__).parent / "data" / "butd_attr_weight_keys.json").read_text())
    expected = expected_shapes(CONFIG)
    assert list(expected) == list(published)
    assert {name: list(shape) for name, shape in expected.items()} == published


def test_published_pickle_loads_and_is_checked(published_weights):  # noqa: F811
    loaded = load_weights(published_weights, CONFIG)
    assert set(loaded.state) == set(expected_shapes(CONFIG))
    assert all(value.dtype == np.float32 for value in loaded.state.values())
    assert len(loaded.sha256) == 64


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_restricted_unpickler_reads_numpy_and_plain_data_in_every_protocol(protocol):
    payload = {"model": collections.OrderedDict(a=np.arange(6, dtype=np.float32).reshape(2, 3),
                                                b=np.ones((2,), np.float64)),
               "__author__": "someone", "matching_heuristics": True, "scale": np.float32(2.5), "shape": (1, 2)}
    loaded = restricted_load(pickle.dumps(payload, protocol=protocol))
    np.testing.assert_array_equal(loaded["model"]["a"], payload["model"]["a"])
    assert loaded["model"]["b"].dtype == np.float64 and loaded["scale"] == np.float32(2.5)


class _RunsCommand:
    """Unpickling this calls os.system: what a tampered weights file would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Execs:
    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self):
        return (exec, (self.source,))


@pytest.mark.parametrize("make", [
    lambda marker: {"model": {"x": _RunsCommand(f"touch {marker}")}},
    lambda marker: {"model": {}, "__author__": _Execs(f"open({str(marker)!r}, 'w').close()")},
    lambda marker: [np.zeros(2), _RunsCommand(f"touch {marker}")],
])
def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path, make):
    marker = tmp_path / "pwned"
    path = tmp_path / "faster_rcnn_from_caffe_attr.pkl"
    path.write_bytes(pickle.dumps(make(marker), protocol=2))
    refused = r"faster_rcnn_from_caffe_attr.pkl: refused: .*(os|posix|builtins|__builtin__)\.(system|exec)"
    with pytest.raises(WeightsError, match=refused):
        load_weights(path, CONFIG)
    assert not marker.exists()


def test_object_arrays_are_refused(tmp_path):
    state = {name: np.zeros(shape, np.float32) for name, shape in expected_shapes(CONFIG).items()}
    state["roi_heads.box_predictor.cls_score.bias"] = np.array([None] * 1601, dtype=object)
    with pytest.raises(WeightsError, match="cls_score.bias has dtype object"):
        check_state(state, CONFIG, Path("w.pkl"))


def test_mismatches_are_listed(published_weights):  # noqa: F811
    state = dict(load_weights(published_weights, CONFIG).state)
    del state["backbone.res4.22.conv3.weight"]
    state["roi_heads.box_predictor.cls_score.weight"] = np.zeros((1600, 2048), np.float32)
    state["roi_heads.box_predictor.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(WeightsError) as error:
        check_state(state, CONFIG, Path("w.pkl"))
    message = str(error.value)
    assert "w.pkl: not the bottom-up-attention attribute model" in message
    assert "1 missing: backbone.res4.22.conv3.weight" in message
    assert "1 unexpected: roi_heads.box_predictor.extra.weight" in message
    assert "cls_score.weight [1600, 2048] (expected [1601, 2048])" in message
    assert "\n" not in message


def test_the_model_without_attributes_gets_a_hint(published_weights):  # noqa: F811
    state = {k: v for k, v in load_weights(published_weights, CONFIG).state.items()
             if k.split(".")[-2] not in ("cls_embedding", "fc_attr", "attr_score")}
    with pytest.raises(WeightsError, match="without attributes"):
        check_state(state, CONFIG, Path("faster_rcnn_from_caffe.pkl"))


def test_bottom_up_attention_pytorch_layout_is_recognised():
    state = {"roi_heads.box_predictor.cls_embed.weight": np.zeros((1601, 256), np.float32),
             "roi_heads.box_predictor.attr_linear1.weight": np.zeros((512, 2304), np.float32)}
    with pytest.raises(WeightsError, match="bottom-up-attention.pytorch's Caffe layout"):
        check_state(state, CONFIG, Path("bua-caffe-frcn-r101_with_attributes.pth"))


def test_nan_weights_are_refused(published_weights):  # noqa: F811
    state = dict(load_weights(published_weights, CONFIG).state)
    state["proposal_generator.rpn_head.conv.bias"] = np.full((512,), np.nan, np.float32)
    with pytest.raises(WeightsError, match="NaN or infinity: proposal_generator.rpn_head.conv.bias"):
        check_state(state, CONFIG, Path("w.pkl"))


def test_torch_files_load_with_weights_only(tmp_path, published_weights):  # noqa: F811
    state = load_weights(published_weights, CONFIG).state
    path = tmp_path / "model_final.pth"
    torch.save({"model": {name: torch.from_numpy(value) for name, value in state.items()}}, path)
    loaded = load_weights(path, CONFIG)
    np.testing.assert_array_equal(loaded.state["backbone.stem.conv1.weight"], state["backbone.stem.conv1.weight"])
    hostile = tmp_path / "hostile.pth"
    torch.save({"model": {"x": _RunsCommand(f"touch {tmp_path / 'pwned'}")}}, hostile)
    with pytest.raises(WeightsError, match="hostile.pth: refused or unreadable torch file"):
        load_weights(hostile, CONFIG)
    assert not (tmp_path / "pwned").exists()


def test_missing_empty_or_foreign_files(tmp_path):
    with pytest.raises(WeightsError, match=f"no such weights file; .*{WEIGHTS_URL}"):
        load_weights(tmp_path / "faster_rcnn_from_caffe_attr.pkl", CONFIG)
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(WeightsError, match="empty file"):
        load_weights(tmp_path / "empty.pkl", CONFIG)
    (tmp_path / "text.pkl").write_text("hello")
    with pytest.raises(WeightsError, match="text.pkl: "):
        load_weights(tmp_path / "text.pkl", CONFIG)
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(WeightsError, match="not a weights file"):
        load_weights(tmp_path / "list.pkl", CONFIG)
    with pytest.raises(WeightsError, match="is a directory"):
        load_weights(tmp_path, CONFIG)
