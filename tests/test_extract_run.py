"""End-to-end extraction on generated images: the shard contract, resume, kills, ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from extract.boxes import select_regions
from extract.config import ExtractError
from extract.detector import build_detector, resolve_backend
from extract.images import boxes_to_original, decode_image, prepare_image
from extract.run import extract_features
from extract.runtime import Launch
from extract.safeio import sha256_file
from extract.shards import FeatureStore, read_manifest
from extract.weights import load_weights
from tests.extract_fixtures import (  # noqa: F401 - published_weights is a fixture
    BAD_IMAGES,
    TEST_DETECTOR,
    published_weights,
    small_config,
    write_image_set,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, published_weights):  # noqa: F811
    """The image set extracted once with decoding workers: (root, good sizes, summary)."""
    root = tmp_path_factory.mktemp("run")
    sizes = write_image_set(root / "images")
    summary = extract_features(root / "images", root / "features", published_weights, small_config(workers=1),
                               progress=False)
    return root, sizes, summary


def _all_rows(directory: Path) -> dict[str, dict]:
    rows = {}
    for entry in read_manifest(directory).shards:
        with h5py.File(directory / entry.name, "r") as handle:
            for row, image_id in enumerate(handle["image_ids"].asstr()[:]):
                assert image_id not in rows, f"{image_id} twice"
                rows[image_id] = {name: handle[name][row] for name in handle}
    return rows


def test_shards_follow_the_contract(first_run, published_weights):  # noqa: F811
    root, sizes, summary = first_run
    out = root / "features"
    assert summary.done == len(sizes) and summary.skipped == 0 and not summary.interrupted
    assert {f["path"] for f in summary.failed} == set(BAD_IMAGES)
    manifest = read_manifest(out)
    assert manifest.num_images == len(sizes)
    reasons = {item["path"]: item["reason"] for item in manifest.failed}
    assert reasons.keys() == BAD_IMAGES.keys()
    for image_id, word in BAD_IMAGES.items():
        assert word in reasons[image_id]
    assert manifest.settings["weights_sha256"] == sha256_file(published_weights)
    assert manifest.settings["output"]["selection"] == {"box_mode": "fixed", "nms_threshold": 0.3, "num_boxes": 36}
    assert not list(out.glob("*.partial"))
    for entry in manifest.shards:
        assert sha256_file(out / entry.name) == entry.sha256
        with h5py.File(out / entry.name, "r") as handle:
            n = entry.num_images
            assert handle["features"].dtype == np.float16 and handle["features"].shape == (n, 36, 2048)
            assert handle["boxes"].dtype == np.float32 and handle["boxes"].shape == (n, 36, 4)
            assert handle["num_boxes"].dtype == np.int16 and handle["image_size"].dtype == np.int32
            for name, dtype in (("object_ids", np.int16), ("object_scores", np.float32), ("attr_ids", np.int16),
                                ("attr_scores", np.float32)):
                assert handle[name].dtype == dtype and handle[name].shape == (n, 36)
            assert handle.attrs["format_version"] == 2
            extractor = json.loads(handle.attrs["extractor"])
            assert extractor["weights_sha256"] == manifest.settings["weights_sha256"]
            assert extractor["backend"] == resolve_backend("auto") and extractor["config_digest"]
    rows = _all_rows(out)
    assert rows.keys() == sizes.keys()
    for image_id, row in rows.items():
        height, width = sizes[image_id]
        assert tuple(row["image_size"]) == (height, width), image_id
        k = int(row["num_boxes"])
        assert k == 36 or (image_id == "wide.png" and 10 <= k <= 36), (image_id, k)  # a 12-px-high input
        boxes = row["boxes"][:k]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 3] <= height).all() and (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert not row["features"][k:].any() and not row["boxes"][k:].any()  # padding rows are zero
        assert np.isfinite(row["features"][:k].astype(np.float32)).all() and row["features"][:k].any()
        assert row["object_ids"][:k].max() < 1600 and row["attr_ids"][:k].max() < 400
        assert (row["object_scores"][:k] > 0).all() and (row["object_scores"][:k] <= 1).all()
    store = FeatureStore(out)
    assert store.verify() == [] and len(store) == len(sizes)


def test_stored_regions_are_the_detectors_for_that_image(first_run, published_weights):  # noqa: F811
    root, _, _ = first_run
    decoded = decode_image(root / "images" / "nested" / "b.png")
    prepared = prepare_image(decoded, TEST_DETECTOR.min_size, TEST_DETECTOR.max_size, TEST_DETECTOR.pixel_mean)
    detector = build_detector("torchvision", TEST_DETECTOR, load_weights(published_weights, TEST_DETECTOR))
    with torch.inference_mode():
        output = detector(torch.from_numpy(prepared.tensor)[None], [tuple(prepared.tensor.shape[1:])])[0]
    regions = select_regions(output)
    features, boxes, k, size = FeatureStore(root / "features").get("nested/b.png")
    assert k == len(regions.index) and size == decoded.original_size
    np.testing.assert_allclose(boxes, boxes_to_original(regions.boxes.numpy(), prepared.scale, size), atol=1e-3)
    np.testing.assert_allclose(features, regions.features.numpy(), rtol=2e-3, atol=2e-3)  # float16 storage


def test_a_rerun_does_nothing(first_run, published_weights):  # noqa: F811
    root, sizes, _ = first_run
    out = root / "features"
    before = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in out.iterdir()}
    summary = extract_features(root / "images", out, published_weights, small_config(), progress=False)
    assert summary.done == 0 and summary.failed == [] and summary.skipped == len(sizes) + len(BAD_IMAGES)
    after = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in out.iterdir()}
    assert after == before


def test_other_output_settings_are_refused_on_resume(first_run, published_weights):  # noqa: F811
    root, _, _ = first_run
    with pytest.raises(ExtractError, match="box_mode"):
        extract_features(root / "images", root / "features", published_weights, small_config(box_mode="adaptive"),
                         progress=False)
    with pytest.raises(ExtractError, match="feature_dtype"):
        extract_features(root / "images", root / "features", published_weights,
                         small_config(feature_dtype="float32"), progress=False)


def _small_set(root: Path, names: tuple[str, ...] = ("a.jpg", "gray.jpg", "nested/b.png", "broken/corrupt.jpg")
               ) -> Path:
    full = root / "all"
    write_image_set(full)
    images = root / "images"
    for name in names:
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes((full / name).read_bytes())
    return images


def test_adaptive_mode_keeps_10_to_100_regions_and_retry_failed(tmp_path, published_weights):  # noqa: F811
    images = _small_set(tmp_path)
    out = tmp_path / "features"
    config = small_config(box_mode="adaptive", batch_size=2, feature_dtype="float32")
    summary = extract_features(images, out, published_weights, config, progress=False)
    assert summary.done == 3 and [f["path"] for f in summary.failed] == ["broken/corrupt.jpg"]
    rows = _all_rows(out)
    for row in rows.values():
        assert row["features"].shape == (100, 2048) and row["features"].dtype == np.float32
        assert 10 <= int(row["num_boxes"]) <= TEST_DETECTOR.rpn_post_nms_topk
    # The broken file is repaired: a plain rerun skips it, --retry-failed extracts it and clears the failure.
    (images / "broken" / "corrupt.jpg").write_bytes((images / "a.jpg").read_bytes())
    assert extract_features(images, out, published_weights, config, progress=False).done == 0
    retried = extract_features(images, out, published_weights,
                               small_config(box_mode="adaptive", feature_dtype="float32", retry_failed=True),
                               progress=False)
    assert retried.done == 1 and retried.failed == []
    assert read_manifest(out).failed == [] and "broken/corrupt.jpg" in FeatureStore(out)


def test_a_shard_a_kill_left_out_of_the_manifest_is_adopted_not_extracted_again(tmp_path, published_weights):  # noqa: F811
    """The window a SIGKILL can hit: a shard renamed into place, the manifest not yet updated."""
    from extract.shards import locked_manifest

    images = _small_set(tmp_path, ("a.jpg", "gray.jpg", "nested/b.png"))
    out = tmp_path / "features"
    assert extract_features(images, out, published_weights, small_config(shard_size=2), progress=False).done == 3
    with locked_manifest(out) as manifest:
        unlisted = manifest.shards.pop()  # the last shard, as if the kill came before its manifest entry
    assert (out / unlisted.name).exists() and read_manifest(out).num_images == 3 - unlisted.num_images
    rerun = extract_features(images, out, published_weights, small_config(shard_size=2), progress=False)
    assert rerun.done == 0 and rerun.skipped == 3
    store = FeatureStore(out)
    assert sorted(store.image_ids) == ["a.jpg", "gray.jpg", "nested/b.png"] and store.verify() == []


def _ids_in_shard_files(out: Path) -> list[str]:
    """The image ids of every complete shard file in `out`, listed in the manifest or not."""
    ids = []
    for path in sorted(out.glob("shard-*.h5")):
        with h5py.File(path, "r") as handle:
            ids += list(handle["image_ids"].asstr()[:])
    return ids


def _run_child(code: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


CHILD = """
    import os, signal, sys
    from extract.run import extract_features
    from tests.extract_fixtures import small_config
    images, out, weights, stop_after, how, shard_size = sys.argv[1:] if len(sys.argv) > 1 else ({args})
    seen = []
    def on_image(image_id):
        seen.append(image_id)
        if len(seen) == int(stop_after):
            os.kill(os.getpid(), getattr(signal, how))
    summary = extract_features(images, out, weights, small_config(shard_size=int(shard_size)), progress=False,
                               on_image=on_image)
    print("SUMMARY", summary.done, summary.signum)
"""


@pytest.mark.slow
@pytest.mark.parametrize("stop_after, how, shard_size", [(2, "SIGKILL", 2), (5, "SIGKILL", 2), (3, "SIGTERM", 100)])
def test_a_stopped_run_resumes_without_loss_or_duplicates(tmp_path, published_weights, stop_after, how, shard_size):  # noqa: F811
    """SIGKILL mid-run (with a shard commit likely in flight) or SIGTERM; the rerun completes the set exactly."""
    images = tmp_path / "images"
    sizes = write_image_set(images)
    out = tmp_path / "features"
    args = ", ".join(repr(str(a)) for a in (images, out, published_weights, stop_after, how, shard_size))
    child = _run_child(CHILD.format(args=args))
    stdout, stderr = child.communicate(timeout=300)
    if how == "SIGKILL":
        assert child.returncode == -signal.SIGKILL, stderr
    else:  # SIGTERM stops the run gracefully: what was extracted is committed, and the signal is told
        assert child.returncode == 0, stderr
        done, signum = stdout.split("SUMMARY")[1].split()
        assert signum == str(int(signal.SIGTERM)) and int(done) >= 2  # the third image seen is the first broken one
        assert read_manifest(out).num_images == int(done)
    # What is stored: the manifest's shards and any shard a kill renamed into place before it was listed
    # (the rerun adopts those, so their images are not extracted again either).
    before = len(_ids_in_shard_files(out))
    assert before < len(sizes)
    summary = extract_features(images, out, published_weights, small_config(), progress=False)
    assert before + summary.done == len(sizes)
    assert not list(out.glob("*.partial"))
    store = FeatureStore(out)  # raises on an image stored twice
    assert sorted(store.image_ids) == sorted(sizes) and store.verify() == []
    assert {item["path"] for item in read_manifest(out).failed} == set(BAD_IMAGES)


def test_ctrl_c_commits_what_was_extracted_and_tells_the_signal(tmp_path, published_weights):  # noqa: F811
    images = _small_set(tmp_path)
    out = tmp_path / "features"
    handler = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN where the tests run in the background

    def interrupt_after_first(image_id: str) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    summary = extract_features(images, out, published_weights, small_config(shard_size=100), progress=False,
                               on_image=interrupt_after_first)
    assert summary.signum == signal.SIGINT and summary.interrupted and summary.done == 1
    assert FeatureStore(out).image_ids == ["a.jpg"] and not list(out.glob("*.partial"))
    assert signal.getsignal(signal.SIGINT) is handler  # the handlers are given back


@pytest.mark.slow
def test_torchrun_ranks_write_disjoint_shards_into_one_directory(tmp_path, published_weights):  # noqa: F811
    images = _small_set(tmp_path, ("a.jpg", "gray.jpg", "nested/b.png", "cmyk.jpg", "broken/empty.png"))
    out = tmp_path / "features"
    code = CHILD.format(args=", ".join(repr(str(a)) for a in (images, out, published_weights, 0, "SIGKILL", 1)))
    children = [_run_child(code, {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}) for rank in (0, 1)]
    for child in children:
        _, stderr = child.communicate(timeout=300)
        assert child.returncode == 0, stderr
    store = FeatureStore(out)
    assert sorted(store.image_ids) == ["a.jpg", "cmyk.jpg", "gray.jpg", "nested/b.png"]
    assert len(read_manifest(out).shards) == 4  # shard size 1: every image its own shard, none clobbered
    assert [f["path"] for f in read_manifest(out).failed] == ["broken/empty.png"]
    # Rank 1 alone, rerun: its slice (every second image) is done; nothing is redone.
    again = extract_features(images, out, published_weights, small_config(), launch=Launch(1, 2, 1), progress=False)
    assert again.done == 0 and again.total == 2
