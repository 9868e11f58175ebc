"""The tree shows the architecture: no function in src/ longer than 60 lines (argparse builders, which
are declarative tables, aside), no module longer than 400 lines, and the README's layout table naming
exactly the modules and packages that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "mistral7b"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400
DECLARATIVE = {"add_arguments"}  # argparse builders: one line per option


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_functions_are_short():
    long = []
    for path in _modules():
        for fn in _functions(ast.parse(path.read_text())):
            lines = fn.end_lineno - fn.lineno + 1
            if lines > MAX_FUNCTION_LINES and fn.name not in DECLARATIVE:
                long.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name} ({lines} lines)")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


def test_modules_are_short():
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in _modules()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, "modules over 400 lines:\n" + "\n".join(long)


def test_checker_sees_long_functions(tmp_path):
    """The checker itself: a 61-line function is found, a 60-line one is not."""
    body = "\n".join(f"    x{i} = {i}" for i in range(59))
    tree = ast.parse(f"def ok():\n{body}\n\n\ndef too_long():\n{body}\n    y = 0\n")
    sizes = {fn.name: fn.end_lineno - fn.lineno + 1 for fn in _functions(tree)}
    assert sizes == {"ok": 60, "too_long": 61}


def test_readme_layout_matches_the_tree():
    """Every row of the README's layout table names a module or package that exists, and every module
    and package of src/mistral7b has a row (a package's row covers its modules)."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout"):]
    named = set()
    for row in re.findall(r"^\| (.+?) \|", table, re.M):
        named |= {name.strip("`/") for name in re.findall(r"`([^`]+)`", row)}
    existing = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    existing |= {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    for package in (p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()):
        existing |= {f"{package.name}/{m.stem}" for m in package.glob("*.py") if m.stem not in ("__init__", "__main__")}
    top = {n.split("/")[0] for n in named}
    for row in re.findall(r"^\| `(\w+)/` \|(.+)\|$", table, re.M):  # a package's row names each of its modules
        package, text = row
        modules = {m.stem for m in (PACKAGE / package).glob("*.py") if m.stem not in ("__init__", "__main__")}
        unnamed = {m for m in modules if f"`{m}`" not in text}
        assert not unnamed, f"README's row for {package}/ lacks {sorted(unnamed)}"
    assert not named - existing, f"README names what does not exist: {sorted(named - existing)}"
    missing = {n for n in existing if n.split("/")[0] not in top}
    assert not missing, f"README's layout table lacks: {sorted(missing)}"
