"""The shared leaves: atomic writes that never leave a torn or partial file, storage errors, run locks,
stop signals and device names."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from extract.runtime import DeviceError, Launch, Stopped, StopSignals, exit_code, resolve_device
from extract.safeio import DirectoryLock, LockedError, StorageError, atomic_write, atomic_write_with, write_json
from tests.smallfs import small_filesystem


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"rsum": 1})
    with pytest.raises(ZeroDivisionError), atomic_write(target, "w", encoding="utf-8") as handle:
        handle.write('{"rsum": ')
        1 / 0  # noqa: B018 - the writer fails half-way
    assert target.read_text() == '{\n  "rsum": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_written_files_get_the_usual_permissions(tmp_path):
    target = write_json(tmp_path / "a.json", [])
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_disk_full_is_one_storage_error_naming_the_file_and_keeps_the_old_one(tmp_path):
    with small_filesystem(tmp_path / "small", megabytes=1) as mount:
        target = mount / "scores.npy"
        atomic_write_with(target, lambda tmp: np.save(open(tmp, "wb"), np.zeros(10, np.float32)))
        before = target.read_bytes()
        with pytest.raises(StorageError) as caught:
            with atomic_write(target) as handle:
                np.save(handle, np.zeros(2_000_000, np.float32))  # 8 MB on a 1 MB file system
        assert str(caught.value).startswith(f"{target}: ")
        assert "no space left" in str(caught.value) or "full" in str(caught.value)
        assert target.read_bytes() == before
        assert sorted(p.name for p in mount.iterdir()) == ["scores.npy"]


def test_torch_save_on_a_full_disk_is_a_storage_error(tmp_path):
    torch = pytest.importorskip("torch")
    with small_filesystem(tmp_path / "small", megabytes=1) as mount:
        target = mount / "checkpoint.pt"
        with pytest.raises(StorageError, match="checkpoint.pt"):
            with atomic_write(target) as handle:
                torch.save({"w": torch.zeros(1_000_000)}, handle)
        assert list(mount.iterdir()) == []


HOLDER = textwrap.dedent("""
    import sys, time
    from extract.safeio import DirectoryLock
    with DirectoryLock(sys.argv[1], what="run directory"):
        print("held", flush=True)
        time.sleep(60)
""")


def test_a_directory_lock_refuses_a_second_process_and_names_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"in use by .*:{holder.pid}"):
            DirectoryLock(tmp_path, what="run directory").acquire()
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed without releasing: its lock file is stale and taken over.
    assert (tmp_path / ".lock").exists()
    with DirectoryLock(tmp_path) as lock:
        assert lock.holder().endswith(f":{os.getpid()}")
    assert not (tmp_path / ".lock").exists()


def test_stop_signals_remember_the_signal_for_the_exit_code():
    # A signal a process sends itself is handled before os.kill returns to the next line (CPython runs the
    # Python handler at once, in the main thread), so each check below sees it without waiting.
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # a second signal stops at once
            os.kill(os.getpid(), signal.SIGINT)
    assert exit_code(stop.signum) == 143 and exit_code(signal.SIGINT) == 130 and exit_code(None) == 0
    with pytest.raises(Stopped) as caught, StopSignals(raise_now=True):
        os.kill(os.getpid(), signal.SIGINT)
    assert caught.value.signum == signal.SIGINT


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "tpu", ""])
def test_unknown_devices_are_named_in_one_line(name):
    with pytest.raises(DeviceError, match="not a device; use auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_auto_is_the_gpu_when_there_is_one_and_the_cpu_otherwise():
    torch = pytest.importorskip("torch")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu", Launch(rank=1, world_size=2, local_rank=1)).type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")
