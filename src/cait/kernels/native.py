"""The C++ CPU kernels in ``cait/kernels/csrc``, compiled on first use.

They are built with torch's JIT extension builder (:func:`torch.utils.cpp_extension.load`,
which needs a C++ compiler and ``ninja``, a dependency of :mod:`cait`; one source file, so
the build is short) into torch's extension cache (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), once per machine and source version, and registered as
``torch.ops.cait.*``. The build is announced only when one is due (no library in the cache
newer than the source); a cached kernel loads without a message. Without a C++ compiler,
or when the build fails, :mod:`cait` warns once, in one line of its own (torch's builder's
warnings are not shown), and runs the same computation in Python.
``CAIT_NATIVE=0`` in the environment skips the build and always uses Python.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

__all__ = ["available"]

logger = logging.getLogger(__name__)

NAME = "cait_native"
SOURCES = [Path(__file__).parent / "csrc" / "talking_heads.cpp"]
# What a build takes, for the message before it: 17 s measured with an empty
# TORCH_EXTENSIONS_DIR on the 2-core development machine while a test suite ran beside it
# (about 10 s when idle).
BUILD_TIME = "10-20 s"

_loaded: bool | None = None  # None: not tried yet in this process
_lock = threading.Lock()


def available() -> bool:
    """Whether ``torch.ops.cait.*`` can be used, building and loading them the first time.

    False when ``CAIT_NATIVE=0`` or when the build failed (logged once, with the reason).
    """
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = _load()
    return _loaded


def _load() -> bool:
    if os.environ.get("CAIT_NATIVE", "1") == "0":
        logger.info("CAIT_NATIVE=0: the C++ CPU kernels are not used")
        return False
    compiler = _compiler()
    if shutil.which(compiler) is None:  # say it in our words, not torch's
        logger.warning(
            "no C++ compiler found (%s): the Python path runs instead of cait's C++ CPU "
            "kernels (install one, or set CAIT_NATIVE=0 to skip the build)",
            compiler,
        )
        return False
    try:
        with _builder_quiet():
            _build_and_load()
    except Exception as err:  # no ninja, a failed build: Python instead
        logger.warning(
            "cait's C++ CPU kernels could not be built, so the slower Python path runs "
            "instead (set CAIT_NATIVE=0 to skip the build): %s",
            str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__,
        )
        return False
    return True


def _compiler() -> str:
    """The C++ compiler torch's builder runs: ``$CXX`` (its first word), else ``c++``."""
    words = os.environ.get("CXX", "").split()
    return words[0] if words else "c++"


@contextlib.contextmanager
def _builder_quiet() -> Iterator[None]:
    """Torch's builder speaks only of errors: what it logs and warns otherwise is not
    for a user of cait to act on ("No CUDA runtime is found" under CUDA builds of torch on
    machines without a GPU, which says nothing about this CPU-only build; a compiler it
    calls "not compatible"; version bounds it has none for). A failed build still says
    why, in our one line."""
    builder_log = logging.getLogger("torch.utils.cpp_extension")
    level = builder_log.level
    builder_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        builder_log.setLevel(level)


def _build_and_load() -> None:
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # the `ninja` package's binary, off PATH in a venv
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    if _needs_build(_build_directory()):
        logger.info(
            "compiling cait's C++ CPU kernels (once per machine and source version, about %s)",
            BUILD_TIME,
        )
    else:
        logger.debug("loading cait's C++ CPU kernels from torch's extension cache")
    load(
        name=NAME,
        sources=[str(path) for path in SOURCES],
        extra_cflags=["-O2", "-fopenmp"],
        is_python_module=False,
    )


def _build_directory() -> Path | None:
    """Where torch builds and caches the kernel; None where torch's layout is unknown."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(NAME, verbose=False))
    except Exception:  # a private helper of torch's: a torch without it announces every load
        return None


def _needs_build(directory: Path | None) -> bool:
    """Whether loading from ``directory`` will compile: no built library there, or one older
    than a source (what ninja, which torch runs, rebuilds for)."""
    library = directory / f"{NAME}.so" if directory is not None else None
    if library is None or not library.is_file():
        return True
    built = library.stat().st_mtime
    return any(source.stat().st_mtime > built for source in SOURCES)
