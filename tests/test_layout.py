"""The package layout: no import circle among train/ modules, every module says what it owns, and the
README's layout map lists exactly the files of train/."""

import ast
import types
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "train"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(TRAIN.rglob("*.py"))}


def imports(path: Path, mods: set[str], module_level_only: bool) -> set[str]:
    """train modules imported by `path` (`from train.x import y` counts train.x.y when that is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in mods}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("train"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in mods else node.module)
    return {m for m in out if m in mods and m != "train"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def graph(module_level_only: bool) -> dict[str, set[str]]:
    mods = modules()
    names = set(mods)
    # a package's __init__ is imported with each of its modules: not an edge of interest
    return {name: {m for m in imports(path, names, module_level_only) if not name.startswith(m + ".")}
            for name, path in mods.items()}


def test_no_import_circle_at_module_level():
    cycle = find_cycle(graph(module_level_only=True))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_import_circle_with_function_level_imports():
    cycle = find_cycle(graph(module_level_only=False))
    assert cycle is None, "import circle (counting imports inside functions): " + " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_has_a_docstring():
    missing = [str(p.relative_to(ROOT)) for p in TRAIN.rglob("*.py") if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"modules without a first docstring line saying what they own: {missing}"


def test_readme_layout_map_lists_every_train_file():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- layout map: start -->\n(.*?)<!-- layout map: end -->", readme, re.S)
    assert m, "README.md has no layout map (<!-- layout map: start --> ... <!-- layout map: end -->)"
    listed = re.findall(r"^- `(train/[^`]+\.py)` — \S", m.group(1), re.M)
    lines = [line for line in m.group(1).splitlines() if line.strip()]
    assert len(listed) == len(lines), "every layout-map line is '- `train/...py` — what it owns'"
    actual = sorted(str(p.relative_to(ROOT)) for p in TRAIN.rglob("*.py"))
    assert len(listed) == len(set(listed)), "a file is listed twice"
    assert sorted(listed) == actual, (f"missing from the README: {sorted(set(actual) - set(listed))}; "
                                      f"listed but absent: {sorted(set(listed) - set(actual))}")


def test_gpu_tests_name_only_what_exists():
    """tests/test_gpu.py is skipped without CUDA, so a name it uses that a refactor removed (once
    `lora_kernels._triton`) would only fail on a GPU. Every train module attribute and every name it imports
    from train must exist, checked here on CPU."""
    import importlib

    tree = ast.parse((ROOT / "tests" / "test_gpu.py").read_text(encoding="utf-8"))
    aliases, missing = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("train"):
            parent = importlib.import_module(node.module)
            for a in node.names:
                if not hasattr(parent, a.name):
                    try:
                        importlib.import_module(f"{node.module}.{a.name}")
                    except ImportError:
                        missing.append(f"{node.module}.{a.name}")
                        continue
                target = getattr(parent, a.name, None) or importlib.import_module(f"{node.module}.{a.name}")
                if isinstance(target, types.ModuleType):
                    aliases[a.asname or a.name] = target
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if not hasattr(aliases[node.value.id], node.attr):
                missing.append(f"{aliases[node.value.id].__name__}.{node.attr} (line {node.lineno})")
    assert aliases, "test_gpu.py imports no train module: this check would check nothing"
    assert not missing, f"tests/test_gpu.py uses names that do not exist: {missing}"
