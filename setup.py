"""Builds the compiled data path in fastpath/.

FLANNELPY_DEBUG=1 builds with asserts, line tracing and no -O3 (see docs/architecture.md);
FLANNELPY_ASAN=1 adds AddressSanitizer for the fuzzing CI step.
FLANNELPY_NO_EXT=1 builds no extension: scripts/setup.sh installs the project editable that way and then
builds the extensions once, in place (an editable install would compile them a second time, elsewhere).
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("FLANNELPY_DEBUG") == "1"
asan = os.environ.get("FLANNELPY_ASAN") == "1"

cflags = ["-O0", "-g"] if debug else ["-O3"]
ldflags: list[str] = []
macros: list[tuple[str, str | None]] = []
if asan:
    cflags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    ldflags += ["-fsanitize=address"]
if debug:
    macros.append(("CYTHON_TRACE_NOGIL", "1"))

extensions = [
    Extension(
        f"fastpath.{name}",
        [f"fastpath/{name}.pyx"],
        include_dirs=["fastpath"],
        depends=["fastpath/offload.h", "fastpath/offload.pxd", "fastpath/sockets.pxd"],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        define_macros=macros,
    )
    for name in ("core", "io", "offload")
    if os.path.exists(f"fastpath/{name}.pyx") and os.environ.get("FLANNELPY_NO_EXT") != "1"
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level="3",
        nthreads=os.cpu_count() or 1,
        annotate=debug,
        compiler_directives={
            "boundscheck": debug,
            "wraparound": False,
            "initializedcheck": debug,
            "linetrace": debug,
            "embedsignature": True,
        },
    ),
)
