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


# ------------------------------------------------------------------------------- one fact, one place


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module of the package that `path` imports, at the top or inside a function."""
    name = _module_name(path).split(".")
    package = name if path.name == "__init__.py" else name[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            found.add(".".join(base + ([node.module] if node.module else [])))
            if not node.module:
                found |= {".".join(base + [alias.name]) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mistral7b."):
            found.add(node.module.removeprefix("mistral7b."))
    return {m for m in found if m}


def _code_strings(path: Path) -> list[str]:
    """String constants and attribute names of a module, docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.append(node.value)
        elif isinstance(node, ast.Attribute):
            out.append(node.attr)
    return out


# gguf_reader is here because the tokenizer (a GGUF's vocabulary) and loading/ (its tensors) share one reader
CORE = {"config", "utils", "weights", "model", "attention", "attention_cpu", "attention_cpu_c", "cpu_fused", "cpu_pool",
        "native", "flash_decode", "cache", "gguf_reader"}


def test_lower_layers_never_import_upward():
    """tokenizer/ never imports loading/ (nor anything above it), directly or through the core; the core
    imports only the core."""
    wrong = []
    for path in _modules():
        name = _module_name(path)
        top = name.split(".")[0]
        for imported in _imports(path):
            first = imported.split(".")[0]
            if (top == "tokenizer" and first not in CORE | {"tokenizer"}) or (top in CORE and first not in CORE):
                wrong.append(f"{name} imports {imported}")
    assert not wrong, "imports from a lower layer up:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles_at_module_level():
    graph = {}
    for path in _modules():
        tree = ast.parse(path.read_text())
        top_level = ast.Module(body=[n for n in tree.body if isinstance(n, ast.ImportFrom)], type_ignores=[])
        name, package = _module_name(path), _module_name(path).split(".")
        package = package if path.name == "__init__.py" else package[:-1]
        edges = set()
        for node in top_level.body:
            if node.level:
                base = package[: len(package) - node.level + 1]
                edges.add(".".join(base + ([node.module] if node.module else [])))
        graph[name] = {e for e in edges if e and e != name}
    state: dict[str, int] = {}

    def visit(node, trail):
        if state.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(node):] + [node]))
        if state.get(node) == 2 or node not in graph:
            return
        state[node] = 1
        for nxt in sorted(graph[node]):
            if not nxt.startswith(node + "."):  # a package importing its own modules is not a cycle
                visit(nxt, trail + [node])
        state[node] = 2

    for node in sorted(graph):
        visit(node, [])


def test_fused_layout_shard_rule_and_format_detection_live_in_one_place():
    """The fused rows (wqkv = q, k, v; w13 = w1, w3) are named in code only by the model and the weight
    map; the shard rule (heads and hidden units over N) only by the weight map; the checkpoint
    format is told apart only by `loading.find_format`."""
    fused, shard_rule, detection = set(), set(), set()
    for path in _modules():
        name = _module_name(path)
        strings = _code_strings(path)
        if any("wqkv" in s or "w13" in s for s in strings):
            fused.add(name)
        text = path.read_text()
        if re.search(r"n_kv_heads\s*//\s*world|hidden_dim\s*//\s*world", text):
            shard_rule.add(name)
        if re.search(r'"params\.json"\)\.is_file\(\)|glob\("\*\.gguf"\)|(?<!def )is_quantized_folder\(', text):
            detection.add(name)
    assert fused == {"model", "weights"}, fused
    assert shard_rule == {"weights"}, shard_rule
    assert detection == {"loading"}, detection


def test_bench_without_hf_never_imports_transformers(monkeypatch):
    """`bench --no-hf` builds our model alone: an import of transformers would fail here."""
    import sys

    import torch

    from mistral7b import bench
    from mistral7b.config import ModelConfig

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    config = ModelConfig(dim=32, n_layers=1, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=50)
    args = __import__("argparse").Namespace(device="cpu", no_hf=True, tensor_parallel_size=1)
    model, hf = bench.build_models(config, args, None)
    assert hf is None and model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 50)


# ------------------------------------------------------------------------ no module-level mutable state

MUTATORS = {"append", "extend", "insert", "update", "setdefault", "pop", "popitem", "clear", "add", "discard",
            "remove", "move_to_end", "appendleft", "__setitem__", "__delitem__"}
CONTAINERS = {"dict", "list", "set", "OrderedDict", "defaultdict", "deque", "Counter", "WeakValueDictionary",
              "WeakKeyDictionary"}
# Being removed by the EngineClient change (issue 23 item 5); delete the entry with it.
KNOWN_STATE = {("server.driver", "_drivers")}


def _is_container(value) -> bool:
    if isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)):
        return True
    f = value.func if isinstance(value, ast.Call) else None
    return (f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None) in CONTAINERS


def module_state(source: str) -> list[tuple[str, int]]:
    """(name, line) of each `global` statement, and of each change anywhere in the module to a container
    bound at module level: item or slice assignment, `del`, `+=`, or a mutating method. A container
    never changed after it is built is a constant table; functools caches of pure functions are allowed."""
    tree = ast.parse(source)
    containers = set()
    for node in tree.body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        if getattr(node, "value", None) is not None and _is_container(node.value):
            containers |= {t.id for t in targets if isinstance(t, ast.Name)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found += [(name, node.lineno) for name in node.names]
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            for t in node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]:
                base = t.value if isinstance(t, ast.Subscript) else t if isinstance(node, ast.AugAssign) else None
                if isinstance(base, ast.Name) and base.id in containers:
                    found.append((base.id, node.lineno))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
            if isinstance(node.func.value, ast.Name) and node.func.value.id in containers:
                found.append((node.func.value.id, node.lineno))
    return found


def test_no_module_level_mutable_state():
    """Settings and shared objects live on objects: no `global`, no module-level container changed at run time."""
    found = [f"{_module_name(p)}:{line} {name}" for p in _modules() for name, line in module_state(p.read_text())
             if (_module_name(p), name) not in KNOWN_STATE]
    assert not found, "module-level mutable state:\n" + "\n".join(found)


def test_state_checker_catches_what_it_replaced():
    """The old structured.py executor (a global set on first use), its process-wide grammar caches, and a
    module-level list grown by a function are found; a constant table is not."""
    old_executor = ("_EXECUTOR = None\n\ndef _executor():\n    global _EXECUTOR\n"
                    "    if _EXECUTOR is None:\n        _EXECUTOR = 1\n")
    assert module_state(old_executor) == [("_EXECUTOR", 4)]
    caches = "_CACHES: dict[int, object] = {}\n\ndef cache(k):\n    _CACHES[k] = object()\n"
    assert module_state(caches) == [("_CACHES", 4)]
    valid = "from collections import OrderedDict\n_VALID = OrderedDict()\n\ndef f(g):\n    _VALID.popitem(last=False)\n"
    assert module_state(valid) == [("_VALID", 5)]
    assert module_state("SEEN = []\n\ndef f(x):\n    SEEN += [x]\n") == [("SEEN", 4)]
    assert module_state("TABLE = {'a': 1}\n\ndef f(k):\n    return TABLE[k]\n") == []


def _imported_modules(path: Path, tree) -> set[str]:
    """Local names that `path` binds to modules of the package (`from . import x`, `import mistral7b.x as y`)."""
    package = _module_name(path).split(".") if path.name == "__init__.py" else _module_name(path).split(".")[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            for alias in node.names:
                target = PACKAGE.joinpath(*base, alias.name)
                if target.with_suffix(".py").is_file() or (target / "__init__.py").is_file():
                    names.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.asname and a.name.startswith("mistral7b")}
    return names


def foreign_writes(path: Path, source: str | None = None) -> list[tuple[str, int]]:
    """(module.name, line) of each assignment to another module's attribute: a setting kept on a module."""
    tree = ast.parse(path.read_text() if source is None else source)
    modules = _imported_modules(path, tree)
    found = []
    for node in ast.walk(tree):
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AugAssign) else [])
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in modules:
                found.append((f"{t.value.id}.{t.attr}", node.lineno))
    return found


def test_no_module_is_configured_from_outside():
    """No module sets another module's attributes (as benchmarks once set quant.kernels.CUDA_ROWS_KERNEL)."""
    found = [f"{_module_name(p)}:{line} {name}" for p in _modules() for name, line in foreign_writes(p)]
    assert not found, "\n".join(found)
    old = "from . import kernels\n\ndef f():\n    kernels.CUDA_ROWS_KERNEL = 'triton'\n"
    assert foreign_writes(PACKAGE / "quant" / "a_module.py", old) == [("kernels.CUDA_ROWS_KERNEL", 4)]


# ------------------------------------------------------------------------------ the bench stays outside

BENCH_USERS = {"cli.bench"}  # the command; everything else in the library runs without the benchmark


def test_library_never_imports_bench():
    wrong = []
    for path in _modules():
        name = _module_name(path)
        if name == "bench" or name.startswith("bench.") or name in BENCH_USERS:
            continue
        tree = ast.parse(path.read_text())
        absolute = {a.name.removeprefix("mistral7b.")
                    for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        wrong += [f"{name} imports {m}" for m in _imports(path) | absolute if m == "bench" or m.startswith("bench.")]
    assert not wrong, "\n".join(wrong)
    assert not (PACKAGE / "bench_peers.py").exists() and (PACKAGE / "bench" / "peers.py").is_file()
