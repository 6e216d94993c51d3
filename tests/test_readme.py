"""README.md's variant table is the registry's, and `cait models` prints the same table."""

from __future__ import annotations

from pathlib import Path

from cait.cli import main
from cait.models.registry import list_models, variant_table

README = Path(__file__).resolve().parents[1] / "README.md"
HEADER = "| name | embed dim | SA depth | heads | img | LayerScale ε | params | top-1 |"


def _readme_table() -> str:
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index(HEADER)
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def test_the_readme_variant_table_is_the_registry_s():
    expected = variant_table(markdown=True)
    assert _readme_table() == expected, (
        "README.md's variant table differs from the registry's; replace it with the output of\n"
        '  .venv/bin/python -c "from cait.models.registry import variant_table; '
        'print(variant_table(markdown=True))"'
    )


def test_the_text_table_has_every_variant_with_parameters_and_aligned_columns():
    lines = variant_table().splitlines()
    assert len(lines) == 1 + len(list_models())
    assert all(line.split()[-2].endswith("M") for line in lines[1:])  # params in every row
    # numbers are right-aligned: each column's last character is at the same position
    ends = {len(line.split("  1e-")[0]) for line in lines if "  1e-" in line}
    assert len(ends) == 1, lines
    params_end = {line.index("M ") for line in lines[1:]}
    assert len(params_end) == 1, lines


def test_cait_models_prints_the_readme_table(capsys):
    assert main(["models"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    assert printed == variant_table(), printed
