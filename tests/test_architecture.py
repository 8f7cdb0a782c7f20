"""docs/architecture.md is true of the tree: its module table lists exactly the modules there
are, the import stack has no upward import, each `egoslots` verb is one command module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from egoslots.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = ("pipeline", "cache", "stages")
LONG = 400  # lines: a longer module is named under "Long modules" with its reason


def tree_modules() -> set[str]:
    found = {p.name for p in ROOT.glob("*.py")} - {"setup.py"}
    for package in PACKAGES:
        found |= {str(p.relative_to(ROOT)) for p in (ROOT / package).rglob("*.py")}
    # an __init__.py with nothing but a docstring is no module a reader needs described
    return {m for m in found if not _only_docstring(ROOT / m)}


def _only_docstring(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return (
        path.name == "__init__.py"
        and path.parent != ROOT
        and all(
            isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body
        )
    )


def table_rows(heading: str) -> dict[str, str]:
    """`module` -> the rest of its row, for the table under ``heading``."""
    text = DOC.read_text()
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    rows = {}
    for line in text[start : end if end > 0 else None].splitlines():
        match = re.match(r"\| `([^`]+\.py)` \| (.+) \|$", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def test_module_table_lists_exactly_the_modules_in_the_tree():
    listed = set(table_rows("## Modules: one job each"))
    there = tree_modules()
    assert not there - listed, (
        f"modules missing from docs/architecture.md: {sorted(there - listed)}"
    )
    assert not listed - there, (
        f"docs/architecture.md lists modules not in the tree: {sorted(listed - there)}"
    )


def test_every_module_says_its_job_and_long_ones_are_named_with_a_reason():
    long_listed = set(table_rows("### Long modules"))
    for module in sorted(tree_modules()):
        source = (ROOT / module).read_text()
        assert ast.get_docstring(ast.parse(source)), f"{module} has no docstring"
        lines = source.count("\n")
        if lines > LONG:
            assert module in long_listed, (
                f"{module} has {lines} lines but no reason under Long modules"
            )
    for module in long_listed:
        assert (ROOT / module).read_text().count("\n") > LONG, f"{module} is no longer long"


def test_the_doc_keeps_no_hand_kept_line_counts():
    for line in DOC.read_text().splitlines():
        if line.startswith("| module") or line.startswith("| file"):
            assert "lines" not in line


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n.split(".")[0] == "egoslots"}


def test_imports_only_go_down_the_stack():
    command_modules = {f"egoslots.stages.{p.stem}" for p in (ROOT / "stages").glob("*.py")}
    rules = {
        "pipeline": ("egoslots.cache", "egoslots.stages", "egoslots.cli"),
        "cache": ("egoslots.stages", "egoslots.cli"),
        "stages/machinery": ("egoslots.cli",),
    }
    for folder, banned in rules.items():
        for path in (ROOT / folder).rglob("*.py"):
            for name in _imports(path):
                assert not name.startswith(banned), f"{path.relative_to(ROOT)} imports {name}"
                if folder == "stages/machinery":
                    top = ".".join(name.split(".")[:3])
                    assert top not in command_modules - {"egoslots.stages.__init__"}, (
                        f"{path.relative_to(ROOT)} imports the command module {top}"
                    )


def test_each_verb_is_one_command_module_named_after_it():
    modules = {target.split(":")[0] for target, _ in COMMANDS.values()}
    expected = {f"egoslots.stages.{verb.replace('-', '_')}" for verb in COMMANDS}
    assert modules == expected
    on_disk = {f"egoslots.stages.{p.stem}" for p in (ROOT / "stages").glob("*.py")}
    assert on_disk - {"egoslots.stages.__init__"} == expected


def test_every_package_folder_is_installed():
    """pyproject.toml lists the packages by hand (the folders map under `egoslots`): a new
    sub-package missing there would work in a checkout and be absent from a wheel."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    folders = {"egoslots"} | {
        "egoslots." + str(p.parent.relative_to(ROOT)).replace("/", ".")
        for package in PACKAGES
        for p in (ROOT / package).rglob("__init__.py")
    }
    assert listed == folders
