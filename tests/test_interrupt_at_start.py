"""Ctrl-C while cait starts (its imports take seconds) is one line and exit status 130,
as Ctrl-C anywhere else (issue 28). The interrupt is made deterministic: an import hook
raises KeyboardInterrupt when the named module is imported, as Python does when SIGINT
arrives while that import runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")

HOOK = """
import sys

class Interrupt:  # Ctrl-C while {module} is being imported
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, Interrupt())
"""
# `python -m cait ARGS`, and the console script pip writes for `cait = "cait.cli:main"`
PYTHON_M = (
    "import runpy; sys.argv = ['cait', *{argv!r}]; "
    "runpy.run_module('cait', run_name='__main__', alter_sys=True)"
)
CONSOLE_SCRIPT = "from cait.cli import main; sys.argv = ['cait', *{argv!r}]; sys.exit(main())"


def _start(entry: str, module: str, argv: list[str]) -> subprocess.CompletedProcess:
    code = textwrap.dedent(HOOK.format(module=module)) + entry.format(argv=argv)
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.parametrize(
    "entry, module, argv",
    [
        (PYTHON_M, "cait.cli.convert", ["--help"]),  # importing the command line itself
        (PYTHON_M, "cait.runtime", ["eval", "--help"]),  # a command's flags, from the library
        (CONSOLE_SCRIPT, "cait.runtime", ["eval", "--help"]),
        (CONSOLE_SCRIPT, "yaml", ["models"]),  # what main imports before it runs
    ],
    ids=["python-m:cli", "python-m:flags", "script:flags", "script:main"],
)
def test_ctrl_c_while_starting_is_one_line_and_130(entry, module, argv):
    done = _start(entry, module, argv)
    assert done.returncode == 130, done.stderr
    assert done.stderr == "cait: interrupted\n"
    assert done.stdout == ""


@pytest.mark.parametrize("entry", [PYTHON_M, CONSOLE_SCRIPT], ids=["python-m", "script"])
def test_ctrl_c_while_importing_torch_is_one_line_and_130(entry):
    # `import cait` loads no torch (its public names load on first use); `cait models` does
    done = _start(entry, "torch", ["models"])
    assert (done.returncode, done.stderr) == (130, "cait models: interrupted\n")
