"""The shape of core/: no import cycles, packages depend one way, no Streamlit, modules of a readable size."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "core"
# A package may import its own modules, the foundation and the packages before it, never one after it.
LAYERS = ["foundation", "data", "models", "evaluation", "training", "jobs", "review", "serving", "cli"]
FOUNDATION = {"core.allocator", "core", "core.errors", "core.config", "core.files", "core.digests", "core.db", "core.gpu", "core.access", "core.storage"}
MAX_LINES = 400
# Inside core/data the rooms depend one way too: the dataset itself (modules directly in core/data), then photos, labels,
# remote (S3 and shards), layouts (the readers) and curation (pools and balancing).
DATA_ROOMS = ["", "photos", "labels", "remote", "layouts", "curation"]


def module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_imports(path: Path) -> set[str]:
    """Every core module `path` imports, at the top or inside a function (a lazy import is still a dependency)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("core")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("core") and not node.level:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if (CORE.parent / candidate.replace(".", "/")).with_suffix(".py").is_file()
                          or (CORE.parent / candidate.replace(".", "/") / "__init__.py").is_file() else node.module)
    return found


def layer(module: str) -> int:
    if module in FOUNDATION or module == "core.__main__":
        return 0 if module != "core.__main__" else LAYERS.index("cli")
    return LAYERS.index(module.split(".")[1])


MODULES = {module_name(p): p for p in CORE.rglob("*.py")}
GRAPH = {name: {m for m in core_imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def test_every_package_is_a_known_layer():
    packages = {p.name for p in CORE.iterdir() if (p / "__init__.py").is_file()}
    assert packages <= set(LAYERS[1:]), packages - set(LAYERS[1:])


def test_dependencies_point_one_way():
    wrong = [f"{name} → {dep}" for name, deps in GRAPH.items() for dep in deps if layer(dep) > layer(name)]
    assert not wrong, "imports against the layer order " + " < ".join(LAYERS) + ":\n" + "\n".join(sorted(wrong))


def data_room(module: str) -> int:
    parts = module.split(".")
    is_room = len(parts) > 3 or (len(parts) == 3 and (CORE / "data" / parts[2] / "__init__.py").is_file())
    return DATA_ROOMS.index(parts[2] if is_room else "")


def test_every_data_room_is_known():
    rooms = {p.name for p in (CORE / "data").iterdir() if (p / "__init__.py").is_file()}
    assert rooms == set(DATA_ROOMS[1:]), rooms ^ set(DATA_ROOMS[1:])


def test_data_rooms_depend_one_way():
    data = [name for name in GRAPH if name.startswith("core.data")]
    wrong = [f"{name} → {dep}" for name in data for dep in GRAPH[name]
             if dep.startswith("core.data") and data_room(dep) > data_room(name)]
    assert not wrong, "imports against the order of core/data's rooms " + " < ".join(r or "core.data" for r in DATA_ROOMS) \
        + ":\n" + "\n".join(sorted(wrong))


def test_the_room_check_finds_a_wrong_import():
    """The checker itself: a label module importing a reader must be reported."""
    saved = GRAPH["core.data.labels.splits"]
    try:
        GRAPH["core.data.labels.splits"] = saved | {"core.data.layouts.registry"}
        with pytest.raises(AssertionError, match="splits → core.data.layouts.registry"):
            test_data_rooms_depend_one_way()
    finally:
        GRAPH["core.data.labels.splits"] = saved


def test_no_import_cycles():
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for dep in GRAPH[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in GRAPH:
        if name not in index:
            visit(name)
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_check_finds_a_cycle():
    """The checker itself: a made-up two-module loop must be reported."""
    saved = dict(GRAPH)
    try:
        GRAPH["core.fake_a"], GRAPH["core.fake_b"] = {"core.fake_b"}, {"core.fake_a"}
        with pytest.raises(AssertionError, match="fake_a"):
            test_no_import_cycles()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


def test_core_never_imports_streamlit_or_pages():
    offenders = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name}: {n}" for n in names if n.split(".")[0] in ("streamlit", "app_pages")]
    assert not offenders, offenders


def test_modules_stay_readable():
    """A module over MAX_LINES lines says at its top why it is one piece."""
    long = [name for name, path in MODULES.items()
            if len(path.read_text().splitlines()) > MAX_LINES and "one piece" not in path.read_text()[:600]]
    assert not long, f"over {MAX_LINES} lines without a reason at the top: {long}"


def test_every_module_says_its_job():
    missing = [name for name, path in MODULES.items() if ast.get_docstring(ast.parse(path.read_text())) is None]
    assert not missing, missing
