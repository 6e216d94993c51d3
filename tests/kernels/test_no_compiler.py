"""Without a usable C++ compiler the kernel's build ends in one line of ours, never in
torch's builder's warnings, which a user of cait cannot act on (issue 28)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")
LOAD = (
    "import logging; logging.basicConfig(format='%(levelname)s %(name)s: %(message)s'); "
    "from cait.kernels import native; print(native.available())"
)


def _available(cxx: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CAIT_NATIVE"}
    # an empty extension cache: the build is due, as on a fresh machine
    env.update(PYTHONPATH=SRC, CXX=cxx, TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"))
    return subprocess.run(
        [sys.executable, "-c", LOAD], capture_output=True, text=True, env=env, timeout=300
    )


def test_no_compiler_is_one_line_of_ours(tmp_path):
    done = _available(str(tmp_path / "no" / "g++"), tmp_path)
    assert done.stdout == "False\n"
    assert done.stderr == (
        f"WARNING cait.kernels.native: no C++ compiler found ({tmp_path / 'no' / 'g++'}): "
        "the Python path runs instead of cait's C++ CPU kernels (install one, or set "
        "CAIT_NATIVE=0 to skip the build)\n"
    )


def test_a_compiler_torch_calls_not_compatible_is_not_torchs_warning(tmp_path):
    """A compiler torch does not know (it answers -v, but not as gcc or clang does):
    torch warns it is "not compatible"; then it compiles nothing."""
    compiler = tmp_path / "othercxx"
    compiler.write_text(
        '#!/bin/sh\ncase "$1" in -v|--version|-dumpfullversion) echo "other 1.0";; '
        "*) exit 1;; esac\n"
    )
    compiler.chmod(0o755)
    done = _available(str(compiler), tmp_path)
    assert done.stdout == "False\n"
    assert "not compatible" not in done.stderr and "WARNING !!" not in done.stderr
    assert done.stderr.startswith("WARNING cait.kernels.native: cait's C++ CPU kernels could")
    assert done.stderr.count("\n") == 1, done.stderr
