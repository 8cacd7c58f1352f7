"""The Docker image's recipe: hadolint-clean, pinned, non-root, failing without detectron2's CUDA ops."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def hadolint() -> str:
    beside_python = Path(sys.executable).with_name("hadolint")
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: install the test extras (pip install -e '.[test]')"
    return found


def test_hadolint_passes():
    result = subprocess.run([hadolint(), "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_recipe_is_pinned_non_root_and_checks_cuda_ops():
    text = DOCKERFILE.read_text()
    assert re.search(r"DETECTRON2_COMMIT=[0-9a-f]{40}\b", text)
    assert text.count("torch==2.14.1 torchvision==0.29.1") == 2  # builder and runtime
    assert re.search(r"FROM \$\{CUDA_DEVEL_IMAGE\} AS builder", text) and "COPY --from=builder /wheels" in text
    assert "_C.has_cuda()" in text and "FORCE_CUDA=1" in text and "TORCH_CUDA_ARCH_LIST" in text
    assert re.search(r"^USER 1000:1000$", text, re.M) and 'ENTRYPOINT ["tshsr-pipe"]' in text
