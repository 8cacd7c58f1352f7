"""A full disk while writing shards (`extract`, `import-precomp`): one line naming the path and exit 2, never a
segmentation fault; no partial file; earlier shards and the manifest intact; a rerun after freeing space continues.

HDF5 cannot recover from a write that fails under it (the file stays open inside the library and the interpreter
crashes at exit), so each case runs in a child process on a small file system the test mounts itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.shards import FeatureStore, read_manifest
from tests.extract_fixtures import published_weights, scene  # noqa: F401 - fixture
from tests.smallfs import small_filesystem

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, **kwargs)


def resize(mount: Path, megabytes: int) -> None:
    """Give the test's file system more room: what a user does by freeing space."""
    subprocess.run(["mount", "-o", f"remount,size={megabytes}m", str(mount)], check=True, timeout=30)


def directory_state(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error: ")]


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from extract.safeio import StorageError
    from extract.shards import RegionRecord, ShardWriter

    out, names = sys.argv[1], sys.argv[2:]
    writer = ShardWriter(out, max_boxes=36, feature_dim=2048, dtype="float32")  # 295 KB an image
    for name in names:
        writer.add(RegionRecord(name, np.ones((36, 2048), np.float32), np.zeros((36, 4), np.float32), (10, 10)))
    try:
        print("COMMITTED", writer.commit())
    except StorageError as error:
        print("STORAGE", error)
        print("BUFFERED", len(writer))
""")


def test_a_shard_that_does_not_fit_is_a_storage_error_and_leaves_the_directory_as_it_was(tmp_path):
    with small_filesystem(tmp_path / "small", megabytes=1) as mount:
        out = mount / "features"
        first = run(["-c", WRITER, str(out), "a", "b"])
        assert first.returncode == 0 and "COMMITTED shard-00000.h5" in first.stdout, first.stderr
        before = directory_state(out)
        full = run(["-c", WRITER, str(out), "c", "d", "e"])  # 0.9 MB more on a 1 MB file system
        assert full.returncode == 0, full.stderr[-2000:]  # was a segmentation fault (-11) after HDF5 tracebacks
        assert full.stderr == ""
        message = full.stdout.split("STORAGE ")[1].splitlines()[0]
        assert message.startswith(f"{out}/shard~") and "no space left on device" in message
        assert "BUFFERED 3" in full.stdout
        assert directory_state(out) == before  # no partial or temporary file; the manifest and shard as they were
        assert FeatureStore(out).image_ids == ["a", "b"]
        resize(mount, 4)
        again = run(["-c", WRITER, str(out), "c", "d", "e"])
        assert "COMMITTED shard-00001.h5" in again.stdout, again.stderr
        assert FeatureStore(out).image_ids == ["a", "b", "c", "d", "e"]


def test_import_precomp_on_a_full_disk_ends_in_one_line_and_a_rerun_continues(tmp_path):
    src = tmp_path / "precomp"
    src.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("dev", 1), ("train", 8)):  # float16 shards: 147 KB an image
        np.save(src / f"{split}_ims.npy", rng.normal(size=(n, 36, 2048)).astype(np.float32))
        captions = [f"{split} {i} caption {c}\n" for i in range(n) for c in range(5)]
        (src / f"{split}_caps.txt").write_text("".join(captions))
    with small_filesystem(tmp_path / "small", megabytes=1) as mount:
        out = mount / "features"
        args = ["-m", "pipelines.cli", "import-precomp", str(src), "--out", str(out), "--split", "dev",
                "--split", "train"]
        full = run(args)
        assert full.returncode == 2, full.stderr[-2000:]  # was 139, a segmentation fault
        assert "Traceback" not in full.stderr and "HDF5" not in full.stderr
        (line,) = error_lines(full.stderr)
        assert line.startswith(f"Error: {out}/shard~") and "no space left on device" in line
        assert [entry.num_images for entry in read_manifest(out).shards] == [1]  # the dev split, kept
        assert sorted(p.name for p in out.iterdir()) == [".manifest.lock", "manifest.json", "shard-00000.h5"]
        resize(mount, 4)
        again = run(args)
        assert again.returncode == 0, again.stderr
        assert len(FeatureStore(out)) == 9 and (out / "captions.jsonl").exists()


@pytest.mark.slow
def test_extract_on_a_full_disk_ends_in_one_line_and_a_rerun_continues(tmp_path, published_weights):  # noqa: F811
    images = tmp_path / "images"
    images.mkdir()
    for n in range(3):
        Image.fromarray(scene(60, 80, n)).save(images / f"{n}.png")
    with small_filesystem(tmp_path / "small", megabytes=1) as mount:
        out = mount / "features"
        # float32 and 100 boxes: 0.8 MB a shard of one image, so the second shard does not fit.
        args = ["-m", "pipelines.cli", "extract", str(images), "--out", str(out), "--weights", str(published_weights),
                "--min-size", "64", "--max-size", "100", "--rois", "4", "--num-boxes", "100", "--float32",
                "--shard-size", "1", "--workers", "0", "--quiet", "--device", "cpu"]
        full = run(args, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        assert full.returncode == 2, full.stderr[-2000:]  # was 139, a segmentation fault
        assert "Traceback" not in full.stderr and "HDF5" not in full.stderr
        assert full.stderr.count("\n") == 1
        (line,) = error_lines(full.stderr)
        assert line.startswith(f"Error: {out}/shard~") and "no space left on device" in line
        assert sorted(p.name for p in out.iterdir()) == [".manifest.lock", "manifest.json", "shard-00000.h5"]
        assert FeatureStore(out).image_ids == ["0.png"]
        resize(mount, 4)
        again = run(args)
        assert again.returncode == 0, again.stderr
        assert "2 extracted, 1 skipped" in again.stdout
        assert sorted(FeatureStore(out).image_ids) == ["0.png", "1.png", "2.png"]
