"""Run-time builds of the harness's own Cython loops (coreloop.pyx, udpflood.pyx), cached by source digest.

The cache lives outside the results ($XDG_CACHE_HOME or ~/.cache), so repeated runs and the smoke test
compile each loop once per source version; processes started inside the testbed's namespaces load the
harness's build instead of compiling again.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flannelpy-benchmarks"


def load(name: str, depends: Iterable[Path] = ()) -> ModuleType:
    """benchmarks/<name>.pyx as benchmarks.<name>, compiled on first use (Cython and a C compiler needed).

    `depends`: other files whose change must force a rebuild (pyximport only watches the .pyx itself).
    """
    import pyximport

    digest = hashlib.sha256()
    for source in (HERE / f"{name}.pyx", *depends):
        digest.update(Path(source).read_bytes())
    # pyximport keeps the first build_dir it was installed with, so install, import and uninstall each time.
    importers = pyximport.install(build_dir=str(cache_dir() / f"{name}-{digest.hexdigest()[:12]}"),
                                  language_level=3, inplace=False)
    # Cython looks for cimported .pxd files (fastpath/sockets.pxd) along sys.path: make sure the tree is on it.
    root = str(HERE.parent)
    added = root not in sys.path
    if added:
        sys.path.append(root)
    try:
        return importlib.import_module(f"benchmarks.{name}")
    finally:
        pyximport.uninstall(*importers)
        if added:
            sys.path.remove(root)
