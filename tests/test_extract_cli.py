"""`tshsr-pipe extract`: one-line errors with exit code 2, a summary, a no-op rerun; import boundaries."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from extract.shards import FeatureStore
from extract.weights import WEIGHTS_URL
from pipelines.cli import cli
from tests.extract_fixtures import published_weights, scene  # noqa: F401 - fixture

SMALL = ["--min-size", "128", "--max-size", "200", "--rois", "40", "--workers", "0", "--quiet"]


class _Hostile:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(scene(120, 160, 1)).save(root / "one.jpg")
    Image.fromarray(scene(140, 120, 2)).save(root / "two.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return root


def test_help_explains_the_command():
    result = CliRunner().invoke(cli, ["extract", "--help"])
    assert result.exit_code == 0
    for words in ("--weights", "--boxes", "--retry-failed", "torchrun", "--device"):
        assert words in result.output


def test_missing_weights_name_where_they_are_published(images, tmp_path, monkeypatch):
    monkeypatch.delenv("TSHSR_EXTRACT_WEIGHTS", raising=False)
    result = CliRunner().invoke(cli, ["extract", str(images), "--out", str(tmp_path / "f")])
    assert result.exit_code == 2
    assert result.output.startswith("Error: --weights is required") and WEIGHTS_URL in result.output
    result = CliRunner().invoke(cli, ["extract", str(images), "--out", str(tmp_path / "f"),
                                      "--weights", str(tmp_path / "nope.pkl")])
    assert result.exit_code == 2 and "nope.pkl: no such weights file" in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_hostile_weights_are_refused_before_anything_runs(images, tmp_path):
    marker = tmp_path / "pwned"
    weights = tmp_path / "faster_rcnn_from_caffe_attr.pkl"
    weights.write_bytes(pickle.dumps({"model": {"backbone.stem.conv1.weight": _Hostile(str(marker))}}))
    out = tmp_path / "features"
    result = CliRunner().invoke(cli, ["extract", str(images), "--out", str(out), "--weights", str(weights)])
    assert result.exit_code == 2
    assert "refused" in result.output and result.output.count("\n") == 1
    assert not marker.exists() and not out.exists()


def test_wrong_weights_and_options_are_user_errors(images, tmp_path):
    weights = tmp_path / "other.pkl"
    weights.write_bytes(pickle.dumps({"model": {"fc.weight": np.zeros((10, 3), np.float32)}}))
    result = CliRunner().invoke(cli, ["extract", str(images), "--out", str(tmp_path / "f"), "--weights", str(weights)])
    assert result.exit_code == 2 and "not the bottom-up-attention attribute model" in result.output


def test_half_needs_a_gpu(images, tmp_path, published_weights):  # noqa: F811
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    result = CliRunner().invoke(cli, ["extract", str(images), "--out", str(tmp_path / "f"), "--weights",
                                      str(published_weights), "--half"])
    assert result.exit_code == 2 and "--half needs a GPU" in result.output


def test_extract_reports_and_reruns_as_a_no_op(images, tmp_path, published_weights):  # noqa: F811
    out = tmp_path / "features"
    args = ["extract", str(images), "--out", str(out), "--weights", str(published_weights), *SMALL]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "2 extracted, 0 skipped (done or failed before), 1 failed; 3 images in all" in result.output
    assert "failed: broken.jpg: " in result.output
    store = FeatureStore(out)
    assert sorted(store.image_ids) == ["one.jpg", "two.png"]
    assert store.get("one.jpg")[2] == 36 and store.get("one.jpg")[3] == (120, 160)
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "0 extracted, 3 skipped" in again.output
    changed = CliRunner().invoke(cli, args + ["--num-boxes", "20"])
    assert changed.exit_code == 2 and "extracted with other settings" in changed.output


def test_backend_detectron2_without_detectron2_is_a_user_error(images, tmp_path, published_weights):  # noqa: F811
    pytest.importorskip("torchvision")
    from extract.detector import detectron2_available

    if detectron2_available():
        pytest.skip("detectron2 is installed")
    result = CliRunner().invoke(cli, ["extract", str(images), "--out", str(tmp_path / "f"), "--weights",
                                      str(published_weights), "--backend", "detectron2"])
    assert result.exit_code == 2 and "detectron2 is not installed" in result.output


def test_shards_and_torchvision_backend_never_import_detectron2():
    probe = textwrap.dedent("""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"detectron2", "matching"}:
                    raise ImportError(f"blocked {name}")
                return None

        import extract.shards
        assert "torch" not in sys.modules and "cv2" not in sys.modules, "extract.shards imports too much"
        sys.meta_path.insert(0, Block())
        import extract.boxes, extract.config, extract.detector, extract.images, extract.run, extract.testing
        import extract.torchvision_backend, extract.weights
        from extract.detector import resolve_backend
        assert "cv2" not in sys.modules, "cv2 is imported where it is not used"
        print("OK", resolve_backend("auto"))
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "OK torchvision" in result.stdout


def test_verify_says_clean_or_lists_each_problem_and_exits_2(tmp_path):
    from extract.shards import RegionRecord, ShardWriter

    writer = ShardWriter(tmp_path / "f", max_boxes=3, feature_dim=8)
    for image_id in ("a", "b"):
        writer.add(RegionRecord(image_id, np.ones((2, 8), np.float32), np.zeros((2, 4), np.float32), (5, 5)))
    writer.commit()
    clean = CliRunner().invoke(cli, ["verify", str(tmp_path / "f"), "--quiet"])
    assert clean.exit_code == 0, clean.output
    assert clean.output == f"{tmp_path / 'f'}: 1 shards, 2 images, 3 boxes of 8 float16 features; every shard " \
                           "matches the manifest\n"
    shard = tmp_path / "f" / "shard-00000.h5"
    with h5py.File(shard, "r+") as handle:
        handle["features"][0, 0, 0] = 42  # the same size, another checksum
    broken = CliRunner().invoke(cli, ["verify", str(tmp_path / "f"), "--quiet"])
    assert broken.exit_code == 2
    assert broken.stdout.startswith(f"{shard}: sha256 ") and broken.stdout.count("\n") == 2
    assert f"{shard}: 1 images do not match their checksums (first 'a', row 0)" in broken.stdout
    assert broken.stderr == f"Error: {tmp_path / 'f'}: 2 problem(s) found\n"
    missing = CliRunner().invoke(cli, ["verify", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "nowhere: no such feature directory" in missing.output
