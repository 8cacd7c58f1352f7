"""Reading plain pickles from other tools without letting them run code.

A pickle names the callables that rebuild its objects, so loading an untrusted one can run
anything. `RestrictedUnpickler` admits numpy arrays, numbers, strings and containers and
refuses every other global in `find_class`, before it could be called; a reader that needs one
more class (DrillDown's pickled vocabulary object) passes it by module and name with a stand-in
of its own (`extra`), never the original class.

Users: the detector weights (`extract.weights`), DrillDown's feature pickles
(`extract.drilldown`) and DrillDown's vocabulary (`matching.importers.drilldown`). This module
needs nothing but the standard library (numpy is imported only when a pickle names it), so every
package can use it (docs/architecture.md: a leaf below every package).
"""

from __future__ import annotations

import codecs
import importlib
import io
import pickle
from collections.abc import Callable, Mapping
from typing import Any

REFUSED, NOT_ALLOWED = "refused", "is not allowed"  # how a refusal's message starts or ends (`refused`)


def _numpy_attr(modules: tuple[str, ...], name: str) -> Any:
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {name}")


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes; only the text codecs they need."""
    if codecs.lookup(encoding).name not in ("latin-1", "iso8859-1", "utf-8"):
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r} {NOT_ALLOWED}")
    return codecs.encode(text, encoding, errors)


def _numpy(name: str) -> Any:
    return getattr(importlib.import_module("numpy"), name)


_MULTIARRAY = ("numpy._core.multiarray", "numpy.core.multiarray")
_NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")
ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_attr(_MULTIARRAY, "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_attr(_MULTIARRAY, "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): lambda: _numpy_attr(_MULTIARRAY, "scalar"),
    ("numpy._core.multiarray", "scalar"): lambda: _numpy_attr(_MULTIARRAY, "scalar"),
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_attr(_NUMERIC, "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_attr(_NUMERIC, "_frombuffer"),
    ("numpy", "ndarray"): lambda: _numpy("ndarray"),
    ("numpy", "dtype"): lambda: _numpy("dtype"),
    ("collections", "OrderedDict"): lambda: dict,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, numbers, strings and containers (and the `extra` classes); refuses any other global.

    Refusal happens in `find_class`, before a hostile file's callable could be reached, so
    loading a tampered file runs nothing of the attacker's.
    """

    def __init__(self, stream: Any, *, extra: Mapping[tuple[str, str], Callable[[], Any]] | None = None,
                 encoding: str = "latin1") -> None:
        super().__init__(stream, encoding=encoding)
        self.allowed = {**ALLOWED, **(extra or {})}

    def find_class(self, module: str, name: str) -> Any:
        factory = self.allowed.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"{REFUSED} {module}.{name}")
        return factory()

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"{REFUSED} a persistent id (not a plain data pickle)")


def refused(error: pickle.UnpicklingError) -> bool:
    """Whether an unpickling error is `RestrictedUnpickler` refusing a global (not a torn or damaged file)."""
    return str(error).startswith(REFUSED) or str(error).endswith(NOT_ALLOWED)


def restricted_load(data: bytes | io.BufferedIOBase | Any, *,
                    extra: Mapping[tuple[str, str], Callable[[], Any]] | None = None) -> Any:
    """Unpickle with `RestrictedUnpickler`; latin-1 so Python 2 pickles of numpy arrays load.

    `extra`: {(module, name): a factory returning the stand-in} for classes beyond plain data.
    """
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    return RestrictedUnpickler(stream, extra=extra).load()
