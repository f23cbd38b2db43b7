"""The import graph of app/, worker/, fewshot/ and maml_serve/: no cycles anywhere (function-level
imports included), app -> worker only in the CLI, a pure core, a client that needs no service."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("app", "worker", "fewshot", "maml_serve")
# Frameworks the ML core must not need: web, queue, database and settings.
FORBIDDEN_IN_FEWSHOT = (
    "fastapi",
    "celery",
    "sqlalchemy",
    "redis",
    "starlette",
    "pydantic_settings",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.relative_to(ROOT).parts:
                continue
            found[_module_name(path)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, module- or function-level, except under `if TYPE_CHECKING:`."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Absolute names this module imports (for `from x import y`, `x.y` when that is a module)."""
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        names.add(base)
        for alias in node.names:
            if f"{base}.{alias.name}" in known:
                names.add(f"{base}.{alias.name}")
    return names


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {module: _imported(module, path, known) for module, path in known.items()}


def _internal(name: str, known: dict[str, set[str]]) -> str | None:
    """The known module a name refers to (a name inside a module counts as that module)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    edges = {
        module: {t for n in names if (t := _internal(n, graph)) and t != module}
        for module, names in graph.items()
    }
    colour: dict[str, int] = {}
    trail: list[str] = []

    def visit(module: str) -> list[str] | None:
        colour[module] = 1
        trail.append(module)
        for target in sorted(edges[module]):
            if colour.get(target) == 1:
                return [*trail[trail.index(target) :], target]
            if target not in colour and (found := visit(target)):
                return found
        colour[module] = 2
        trail.pop()
        return None

    for module in sorted(edges):
        if module not in colour and (found := visit(module)):
            return found
    return None


def test_the_graph_sees_known_edges() -> None:
    graph = _graph()
    # Guards the parser itself: a module-level, a relative-free from-import and a function-level one.
    assert "app.jobs.kinds" in graph["app.jobs.state"]
    assert "worker.celery_app" in graph["app.cli"]
    assert "app.jobs.runner" in graph["app.jobs.dispatch"]


def test_no_import_cycle_among_app_modules() -> None:
    graph = {m: names for m, names in _graph().items() if m.split(".")[0] == "app"}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycle_in_any_package() -> None:
    # A package's __init__ re-exporting its modules is no cycle unless a module imports the
    # package back; each package is checked alone and all four together.
    graph = _graph()
    for package in PACKAGES:
        own = {m: n for m, n in graph.items() if m.split(".")[0] == package}
        cycle = _cycle(own)
        assert cycle is None, f"import cycle in {package}: " + " -> ".join(cycle or [])
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_client_imports_only_itself() -> None:
    offenders = {
        module: sorted(n for n in names if n.split(".")[0] in ("app", "worker", "fewshot"))
        for module, names in _graph().items()
        if module.split(".")[0] == "maml_serve"
    }
    assert {m: n for m, n in offenders.items() if n} == {}


def test_app_imports_worker_only_in_its_cli() -> None:
    offenders = {
        module: sorted(n for n in names if n.split(".")[0] == "worker")
        for module, names in _graph().items()
        if module.split(".")[0] == "app" and module != "app.cli"
    }
    assert {m: n for m, n in offenders.items() if n} == {}


def test_fewshot_imports_no_web_queue_or_database_framework() -> None:
    offenders = {
        module: sorted(n for n in names if n.split(".")[0] in FORBIDDEN_IN_FEWSHOT)
        for module, names in _graph().items()
        if module.split(".")[0] == "fewshot"
    }
    assert {m: n for m, n in offenders.items() if n} == {}
    assert not any(
        n.split(".")[0] in ("app", "worker")
        for module, names in _graph().items()
        if module.split(".")[0] == "fewshot"
        for n in names
    ), "fewshot must not import the service"


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c.x"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


# The service's layers, lowest first; a module may import its own layer and those below it.
# core: settings, database, storage, errors, the tables, the model cache and the ML adapter;
# jobs: the job engine (state machine, kinds, runner, dispatch, reaper); domains: one package per
# thing a caller works with; routes: the HTTP surface (every views.py, shared dependencies, the
# console); entry points: the app factory, the CLI and the Celery worker.
LAYERS = ("core", "jobs", "domains", "routes", "entry")
DOMAINS = (
    "adaptations",
    "datasets",
    "health",
    "initializations",
    "keys",
    "meta_training",
    "predictions",
    "tasks",
    "uploads",
)


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] == "worker" or module in ("app.main", "app.cli"):
        return LAYERS.index("entry")
    if parts[0] != "app":
        return None
    if (
        module in ("app.deps", "app.middleware")
        or parts[-1] == "views"
        or parts[1:2] == ["console"]
    ):
        return LAYERS.index("routes")
    if parts[1:2] and parts[1] in DOMAINS:
        return LAYERS.index("domains")
    if parts[1:2] == ["jobs"]:
        return LAYERS.index("jobs")
    return LAYERS.index("core")


def _internal_edges() -> Iterator[tuple[str, str]]:
    graph = _graph()
    for module, names in graph.items():
        for name in names:
            target = _internal(name, graph)
            if target is not None and target != module:
                yield module, target


def test_every_app_module_has_a_layer() -> None:
    for module in _graph():
        if module.split(".")[0] in ("app", "worker"):
            assert _layer(module) is not None, module
    assert _layer("app.core.runtime") == 0 and _layer("app.jobs.state") == 1
    assert _layer("app.tasks.service") == 2 and _layer("app.tasks.views") == 3
    assert _layer("app.main") == 4


def test_imports_go_down_the_layers_only() -> None:
    upward = sorted(
        f"{module} ({LAYERS[a]}) -> {target} ({LAYERS[b]})"
        for module, target in _internal_edges()
        if (a := _layer(module)) is not None
        and (b := _layer(target)) is not None
        and b > a
        and module != "app.cli"  # the CLI starts the worker (checked below)
    )
    assert upward == []


def test_domain_packages_import_each_other_without_cycles() -> None:
    folders: dict[str, set[str]] = {}
    for module, target in _internal_edges():
        a, b = module.split("."), target.split(".")
        if a[0] == b[0] == "app" and a[1:2] != b[1:2] and {*a[1:2], *b[1:2]} <= set(DOMAINS):
            folders.setdefault(a[1], set()).add(b[1])
    graph = {folder: folders.get(folder, set()) for folder in DOMAINS}
    cycle = _cycle(graph)
    assert cycle is None, "domain packages in a cycle: " + " -> ".join(cycle or [])


def test_the_service_reaches_the_ml_core_through_one_adapter() -> None:
    graph = _graph()
    reaching = {
        module: sorted(n for n in names if n.split(".")[0] == "fewshot")
        for module, names in graph.items()
        if module.split(".")[0] in ("app", "worker")
    }
    assert {m: n for m, n in reaching.items() if n} == {
        "app.core.ml": ["fewshot", "fewshot.serving"]
    }
    import fewshot.serving

    assert not [name for name in fewshot.serving.__all__ if name.startswith("_")]


def test_the_errors_the_worker_raises_need_no_web_framework() -> None:
    # Storage, the job engine and the error types are shared with the Celery worker; the HTTP
    # rendering of errors lives in app.core.problems, which only the API imports.
    graph = _graph()
    for module in ("app.core.errors", "app.core.storage", "app.jobs.state", "app.jobs.runner"):
        web = sorted(n for n in graph[module] if n.split(".")[0] in ("fastapi", "starlette"))
        assert web == [], f"{module} imports {web}"
    assert "fastapi" in {n.split(".")[0] for n in graph["app.core.problems"]}


def test_no_private_name_of_the_ml_core_is_used() -> None:
    offenders = []
    for module, path in _modules().items():
        if module.split(".")[0] not in ("app", "worker"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "ml"
                and node.attr.startswith("_")
            ):
                offenders.append(f"{module}: ml.{node.attr}")
    assert offenders == []
