"""The package layout stays true: imports point one way, with no cycle and no hidden import.

The wings, lowest first (README, "Layout"):

    files, schema, threads, progress  <-  kernels  <-  models  <-  data  <-  runtime  <-  training
        <-  analysis, inference, export, bench  <-  app  <-  cli
        <-  the package's __init__ and __main__

A module may import its own wing or a lower one; wings of the same level (analysis,
inference, export, bench) do not import each other. Module-level imports of the whole
package form no cycle, and no function imports ``cait`` modules locally except in the CLI
(a local import is how a cycle hides). The model side (``kernels``, ``models``) imports no
distributed code. ``cait --help``, ``cait --version`` and ``cait models`` import none of the
packages that take seconds to load (timm, torchvision, gradio, onnx, matplotlib).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# module (or package) prefix -> level; the longest matching prefix wins
LEVELS = {
    "cait.files": 0,
    "cait.progress": 0,
    "cait.schema": 0,
    "cait.threads": 0,
    "cait.kernels": 1,
    "cait.models": 2,
    "cait.data": 3,
    "cait.runtime": 4,
    "cait.training": 5,
    "cait.analysis": 6,
    "cait.inference": 6,
    "cait.precision": 5,  # inference precisions (fp32, bf16, int8): used by inference, bench, app
    "cait.export": 6,
    "cait.bench": 6,
    "cait.app": 7,
    "cait.cli": 8,
    "cait": 9,  # cait/__init__.py and cait/__main__.py: the public API on top of it all
}
TOP = {"cait", "cait.__main__"}
LOCAL_IMPORTS_ALLOWED = {"cait.cli"}  # wings: every module of the CLI package
NO_DISTRIBUTED = ("cait.kernels", "cait.models")
# Third-party libraries that one concept owns: only these modules import them, at any level.
# timm: its interop (names, models, the export mapping) and its augmentation ops (RandAugment,
# Mixup, random erasing) in the training transforms; huggingface_hub: the Hub's download and
# upload.
OWNERS = {
    "timm": {"cait.models.timm_interop", "cait.data.transforms"},
    "huggingface_hub": {"cait.models.hub"},
    # the Hugging Face `datasets` folders (save_to_disk) of the hf: data source, read and written
    "datasets": {"cait.data.sources.hf", "cait.data.sources.convert"},
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module
    line: int
    local: bool  # inside a function or class body


def wing(module: str) -> str:
    """The LEVELS key a module belongs to."""
    if module in TOP:
        return "cait"
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        prefix = ".".join(parts[:n])
        if prefix in LEVELS:
            return prefix
    raise AssertionError(f"{module} is in no wing of LEVELS: add it there and to the README")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports_of(tree: ast.AST, source: str, known: set[str]) -> list[Import]:
    found: list[Import] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = local or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda
            )
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(source, alias.name, child.lineno, inside))
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                for alias in child.names:
                    sub = f"{child.module}.{alias.name}"  # `from cait import runtime`
                    target = sub if sub in known else child.module
                    found.append(Import(source, target, child.lineno, inside))
            elif isinstance(child, ast.ImportFrom) and child.level:
                raise AssertionError(f"{source}:{child.lineno}: relative import; use cait.*")
            visit(child, inside)

    visit(tree, False)
    return found


def collect(root: Path) -> tuple[set[str], list[Import]]:
    """Every module under ``root/cait`` and every import they make."""
    paths = sorted((root / "cait").rglob("*.py"))
    known = {module_name(p, root) for p in paths}
    imports: list[Import] = []
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        imports += _imports_of(tree, module_name(path, root), known)
    return known, imports


def _is_cait(name: str) -> bool:
    return name == "cait" or name.startswith("cait.")


def violations(known: set[str], imports: list[Import]) -> list[str]:
    """Every broken rule, one line each (empty when the layout holds)."""
    problems = []
    graph: dict[str, set[str]] = {m: set() for m in known}
    for imp in imports:
        if imp.source.startswith(NO_DISTRIBUTED) and (
            imp.target.startswith("torch.distributed") or imp.target == "cait.runtime"
        ):
            problems.append(f"{imp.source}:{imp.line} imports {imp.target}: distributed code")
        library = imp.target.split(".")[0]
        if library in OWNERS and imp.source not in OWNERS[library]:
            owners = ", ".join(sorted(OWNERS[library]))
            problems.append(f"{imp.source}:{imp.line} imports {imp.target}: only {owners} may")
        if not _is_cait(imp.target) or imp.target == imp.source:
            continue
        if imp.local and wing(imp.source) not in LOCAL_IMPORTS_ALLOWED:
            problems.append(f"{imp.source}:{imp.line} imports {imp.target} inside a function")
        src, dst = wing(imp.source), wing(imp.target)
        if src != dst and LEVELS[dst] >= LEVELS[src]:
            direction = "up" if LEVELS[dst] > LEVELS[src] else "sideways"
            problems.append(f"{imp.source}:{imp.line} imports {imp.target} ({direction})")
        if not imp.local and imp.target in graph:
            graph[imp.source].add(imp.target)
    problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected part of ``graph`` that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1 or v in graph[v]:
                cycles.append(sorted(part) + [sorted(part)[0]])

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


def test_the_package_layout_holds():
    known, imports = collect(SRC)
    assert "cait.models.cait" in known and len(imports) > 50  # the walk found the package
    problems = violations(known, imports)
    assert not problems, "\n".join(problems)


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "cait" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"models/a.py": "from cait.training import b\n", "training/b.py": ""}, "(up)"),
        ({"bench.py": "import cait.inference\n", "inference.py": ""}, "(sideways)"),
        (
            {"models/a.py": "def f():\n    from cait.models import b\n", "models/b.py": ""},
            "inside a function",
        ),
        (
            {
                "data/a.py": "from cait.data.b import x\n",
                "data/b.py": "from cait.data.a import y\n",
            },
            "import cycle: cait.data.a -> cait.data.b -> cait.data.a",
        ),
        ({"models/a.py": "import torch.distributed as dist\n"}, "distributed code"),
        ({"kernels/a.py": "from cait import runtime\n", "runtime.py": ""}, "distributed code"),
        ({"widgets/a.py": "import cait.models\n", "models/__init__.py": ""}, "in no wing"),
        ({"models/build.py": "def f():\n    import timm\n"}, "only cait.data.transforms"),
        ({"export.py": "from timm.models import load_checkpoint\n"}, "only cait.data"),
        ({"export.py": "from huggingface_hub import HfApi\n"}, "only cait.models.hub may"),
    ],
)
def test_the_checker_finds_each_broken_rule(tmp_path, files, expected):
    root = _fake_package(tmp_path, {"__init__.py": "", **files})
    try:
        problems = violations(*collect(root))
    except AssertionError as err:  # a module outside every wing
        problems = [str(err)]
    assert any(expected in p for p in problems), problems


def test_the_checker_accepts_downward_and_lazy_third_party_imports(tmp_path):
    files = {
        "__init__.py": "from cait.models import a\n",
        "models/__init__.py": "from cait.models.a import f\n",
        "models/a.py": "from cait.kernels import k\n\ndef f():\n    import torchvision\n",
        "models/timm_interop.py": "def f():\n    import timm\n",
        "kernels/__init__.py": "",
        "kernels/k.py": "",
        "cli/__init__.py": "def main():\n    from cait.models import a\n",
        "cli/train.py": "def run():\n    from cait.models import a\n",
    }
    assert violations(*collect(_fake_package(tmp_path, files))) == []


# --- the help path stays light ---------------------------------------------------------

# What `cait --help`, `cait --version` and `cait models` must not import: each costs
# seconds at start-up (timm and torchvision were 1.6 s of a 4 s `cait --help`), and none
# is needed to list the commands or the variants. A command's own flags and handler import
# what it needs when that command is chosen (cait.cli).
HEAVY = ("timm", "torchvision", "gradio", "onnx", "onnxscript", "matplotlib")
LIGHT_COMMANDS = (["--help"], ["--version"], ["models"])


def imported_modules(importtime: str) -> list[str]:
    """The modules that ``python -X importtime`` output reports imported."""
    modules = []
    for line in importtime.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if line.startswith("import time:") and len(fields) == 3 and fields[0].strip().isdigit():
            modules.append(fields[2].strip())
    return modules


def heavy_imports(importtime: str) -> list[str]:
    """The imported modules that belong to a package of :data:`HEAVY`."""
    return [m for m in imported_modules(importtime) if m.partition(".")[0] in HEAVY]


@pytest.mark.parametrize("argv", LIGHT_COMMANDS, ids=" ".join)
def test_the_help_path_stays_light(argv):
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "cait", *argv],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cait.cli" in imported_modules(done.stderr)  # the output was read
    heavy = sorted({m.partition(".")[0] for m in heavy_imports(done.stderr)})
    assert not heavy, f"`cait {' '.join(argv)}` imports {', '.join(heavy)}"


_IMPORTTIME_HEADER = "import time: self [us] | cumulative | imported package\n"


@pytest.mark.parametrize("package", HEAVY)
def test_the_light_check_finds_each_heavy_package(package):
    output = (
        _IMPORTTIME_HEADER
        + f"import time:       218 |    1591429 |       {package}.sub\n"
        + f"import time:       218 |    1591429 |     {package}\n"
        + "import time:      5722 |    1734490 | cait.cli\n"
    )
    assert heavy_imports(output) == [f"{package}.sub", package]


def test_the_light_check_accepts_light_modules():
    output = (
        _IMPORTTIME_HEADER
        + "import time:      2002 |    1403629 | torch\n"
        + "import time:        10 |         10 | timmy\n"  # a package named like one, not it
        + "import time:      5722 |    1734490 | cait.cli\n"
    )
    assert imported_modules(output) == ["torch", "timmy", "cait.cli"]
    assert heavy_imports(output) == []


# ------------------------------------------------ one module owns the weights-file format

FORMAT_MODULE = "cait.models.weights_file"
# The metadata entries that describe a model in a checkpoint; only the format module names
# them (issue 27). "model" is left out: it is also the weights' entry, and a word everywhere.
METADATA_KEYS = ("model_config", "data_settings", "class_names")


def metadata_key_mentions(root: Path) -> list[str]:
    """Every string constant that is exactly a metadata key (a dict key, a subscript, a
    comparison) in a module other than the format module, one line each. Attribute names
    (``loaded.class_names``) and words inside messages are not keys."""
    found = []
    for path in sorted((root / "cait").rglob("*.py")):
        module = module_name(path, root)
        if module == FORMAT_MODULE:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value in METADATA_KEYS:
                    found.append(f"{module}:{node.lineno} names the metadata key {node.value!r}")
    return found


def test_only_the_format_module_names_the_metadata_keys():
    source = (SRC / Path(*FORMAT_MODULE.split("."))).with_suffix(".py").read_text()
    named = {
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and node.value in METADATA_KEYS
    }
    assert named == set(METADATA_KEYS)  # the rule is about keys that exist, in that module
    mentions = metadata_key_mentions(SRC)
    assert not mentions, "\n".join(mentions)


def test_the_metadata_key_rule_catches_a_module_that_names_a_key(tmp_path):
    files = {
        "__init__.py": "",
        "models/weights_file.py": 'KEYS = ("model_config", "data_settings", "class_names")\n',
        "inference.py": (
            "def names(meta, loaded):\n"
            '    assert loaded.class_names, f"class_names: {meta}"\n'  # not keys
            '    return meta["class_names"]\n'
        ),
        "training/checkpoint.py": 'def spec(state):\n    return state.get("model_config")\n',
    }
    assert metadata_key_mentions(_fake_package(tmp_path, files)) == [
        "cait.inference:3 names the metadata key 'class_names'",
        "cait.training.checkpoint:2 names the metadata key 'model_config'",
    ]


# ---------------------------------------------------------------- sizes: a screen, a concept

MAX_FUNCTION_LINES = 80  # about a screen; argparse builders (add_parser) list flags, not logic
ARGPARSE_BUILDERS = {"add_parser", "build_parser"}
MAX_FILE_LINES = 500
# Files allowed past MAX_FILE_LINES because they hold one concept; a new one needs a reason.
ONE_CONCEPT_FILES = {
    "cait.models.layers": "the paper's layers, in its order (LAYOUT: one file)",
    "cait.kernels.talking_heads": "the talking-heads autograd function and its Python path",
}


def too_long(root: Path) -> list[str]:
    """Functions over a screen (argparse builders aside) and files over MAX_FILE_LINES that
    are not in ONE_CONCEPT_FILES, one line each."""
    problems = []
    for path in sorted((root / "cait").rglob("*.py")):
        text = path.read_text()
        module = module_name(path, root)
        lines = len(text.splitlines())
        if lines > MAX_FILE_LINES and module not in ONE_CONCEPT_FILES:
            problems.append(f"{module}: {lines} lines (> {MAX_FILE_LINES}): split it by concept")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and node.name not in ARGPARSE_BUILDERS:
                    problems.append(
                        f"{module}.{node.name}: {length} lines (> {MAX_FUNCTION_LINES})"
                    )
    return problems


def test_functions_fit_a_screen_and_big_files_hold_one_concept():
    assert not too_long(SRC), "\n".join(too_long(SRC))


def test_the_size_check_finds_a_long_function_and_a_big_file(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    files = {
        "__init__.py": "",
        "models/a.py": f"def long():\n{body}",
        "models/add.py": f"def add_parser(sub):\n{body}",
        "data/big.py": "x = 1\n" * (MAX_FILE_LINES + 1),
    }
    problems = too_long(_fake_package(tmp_path, files))
    assert any(p.startswith("cait.models.a.long: 81 lines") for p in problems), problems
    assert any(p.startswith("cait.data.big: 501 lines") for p in problems), problems
    assert not any("add_parser" in p for p in problems), problems


def test_import_cait_loads_no_torch_until_a_public_name_is_used():
    code = (
        "import sys, cait; light = 'torch' not in sys.modules; model = cait.CaiT; "
        "print(light, 'torch' in sys.modules, sorted(set(cait.__all__) - set(dir(cait))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split("\n")[0] == "True True []", done.stderr
