"""docs/architecture.md: `import matching` needs only torch, numpy, h5py and nltk; from extract only extract.shards
and the standard-library leaves below every package (extract.safeio, extract.runtime, extract.safepickle)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import importlib, pkgutil, sys

    class Block:
        # Make the optional heavy packages unimportable, as on a machine without them.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"detectron2", "cv2", "torchvision", "matplotlib", "click", "PIL"}:
                raise ImportError(f"blocked {name}")
            return None

    sys.meta_path.insert(0, Block())
    import matching
    for info in pkgutil.walk_packages(matching.__path__, "matching."):
        importlib.import_module(info.name)
    leaked = sorted(m for m in sys.modules
                    if m.startswith(("pipelines", "extract."))
                    and m not in {"extract.shards", "extract.safeio", "extract.runtime", "extract.safepickle"})
    print("LEAKED", leaked)
""")


def test_matching_imports_without_optional_packages_and_only_the_shared_extract_leaves():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "LEAKED []" in result.stdout, result.stdout
