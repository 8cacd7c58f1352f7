"""A real `tshsr-pipe serve` process on a free loopback port, for the server and browser tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args: list[str], port: int, timeout: float = 120) -> subprocess.Popen:
    """`tshsr-pipe serve ARGS` on 127.0.0.1:PORT, once /healthz answers."""
    import httpx

    process = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", *args, "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited {process.returncode}: {process.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("serve did not answer /healthz in time")


def stop_server(process: subprocess.Popen) -> tuple[int, str, str]:
    """Ctrl-C (SIGINT) and wait: (exit code, stdout, stderr)."""
    process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("serve did not stop within 30 s of Ctrl-C") from None
    return process.returncode, out, err
