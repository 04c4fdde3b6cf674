"""The package's import layers (DESIGN.md, "Layers of the package"), read from the source.

Every ``.py`` file of ``ovseg/`` and of the command-line folders is parsed with ``ast`` (nothing
is imported), every import of ``ovseg.*`` is collected, including the ones inside functions,
and three rules are checked:

(a) imports point downward or sideways: never from a lower layer to a higher one;
(b) no circle between modules, lazy (in-function) imports included;
(c) no method module imports another method; methods share code through a few shared modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "ovseg"

# the layers, lowest first; a module may import from its own layer and the ones below it
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"errors", "io", "console"}),
    frozenset({"layers", "config", "vis", "data", "text"}),
    frozenset({"encoders", "evaluation"}),
    frozenset({"methods", "modeling"}),
    frozenset({"engine", "integrations"}),
)
# folders of command-line scripts beside the package: the top layer
TOP_FOLDERS = ("tools", "demo", "bench")
TOP_LEVEL = len(LAYERS)
# ovseg/__init__.py is the public facade: it may import anything (lazily); inside the package,
# importing it would be an import from the top
FACADE_LEVEL = TOP_LEVEL

# modules of ovseg/methods/ that every method may import; any other module there is a method
METHODS_PACKAGE = f"{PACKAGE}.methods"
SHARED_METHOD_MODULES = frozenset({"base", "common", "device", "labels", "sam_refine", "state"})


@dataclass(frozen=True)
class Import:
    """One import of an ``ovseg`` module, where it is written."""

    importer: str  # dotted module name, e.g. ovseg.engine.evaluate or tools.train_net
    target: str  # the imported module (a submodule when ``from pkg import submodule``)
    file: str
    line: int
    statement: str  # the source of the import statement

    def where(self) -> str:
        return f"{self.file}:{self.line}: {self.statement}"


# --------------------------------------------------------------------------- collecting


def module_name(relative: Path) -> str:
    """``ovseg/data/catalog.py`` -> ``ovseg.data.catalog``; ``ovseg/data/__init__.py`` ->
    ``ovseg.data``."""
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(root: Path) -> dict[str, str]:
    """``{path relative to root: source}`` of the package and the command-line folders."""
    sources = {}
    for folder in (PACKAGE, *TOP_FOLDERS):
        for path in sorted((root / folder).rglob("*.py")):
            sources[path.relative_to(root).as_posix()] = path.read_text(encoding="utf-8")
    return sources


def _resolve(name: str, modules: frozenset[str]) -> str:
    """The longest prefix of dotted ``name`` that is a known module (``name`` when none is):
    ``from ovseg.data.catalog import DatasetError`` depends on ``ovseg.data.catalog``."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return name


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module a (possibly relative) ``from ... import`` names."""
    if node.level == 0:
        return node.module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def collect_imports(sources: Mapping[str, str]) -> list[Import]:
    """Every import of an ``ovseg`` module in ``sources`` (``{relative path: source}``)."""
    names = {path: module_name(Path(path)) for path in sources}
    modules = frozenset(names.values())
    found = []
    for path, source in sources.items():
        importer = names[path]
        is_package = path.endswith("__init__.py")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source, filename=path)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, importer, is_package)
                # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            statement = lines[node.lineno - 1].strip() if targets else ""
            for target in dict.fromkeys(targets):
                if target == PACKAGE or target.startswith(f"{PACKAGE}."):
                    found.append(Import(importer, _resolve(target, modules), path,
                                        node.lineno, statement))
    return sorted(found, key=lambda i: (i.file, i.line, i.target))


# --------------------------------------------------------------------------- rules


def layer_of(module: str) -> int | None:
    """The layer of a module (0 = lowest); None for a package folder no layer names."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return TOP_LEVEL
    if len(parts) == 1:
        return FACADE_LEVEL
    for level, members in enumerate(LAYERS):
        if parts[1] in members:
            return level
    return None


def layer_violations(imports: Iterable[Import]) -> list[str]:
    """(a): imports from a lower layer to a higher one, and modules outside every layer."""
    problems = []
    for imp in imports:
        if imp.importer == PACKAGE:
            continue  # the facade may import anything
        source_level, target_level = layer_of(imp.importer), layer_of(imp.target)
        for module, level in ((imp.importer, source_level), (imp.target, target_level)):
            if level is None:
                problems.append(f"{imp.where()}: {module} is in no layer; add its folder to "
                                "LAYERS in tests/test_imports.py and to DESIGN.md")
        if source_level is not None and target_level is not None and target_level > source_level:
            problems.append(
                f"{imp.where()}: {imp.importer} (layer {source_level}) imports {imp.target} "
                f"(layer {target_level}); imports must point to the same or a lower layer"
            )
    return problems


def _method_of(module: str) -> str | None:
    """``ovseg.methods.trident`` (or ``ovseg.methods.trident.steps``) -> ``trident``; None for
    the registry, the shared modules and modules outside ``ovseg/methods/``."""
    if not module.startswith(f"{METHODS_PACKAGE}."):
        return None
    name = module[len(METHODS_PACKAGE) + 1:].split(".")[0]
    return None if name in SHARED_METHOD_MODULES else name


def method_violations(imports: Iterable[Import]) -> list[str]:
    """(c): a module of ``ovseg/methods/`` other than the registry importing a method it is not
    part of (a shared module importing a method counts too)."""
    problems = []
    for imp in imports:
        if not imp.importer.startswith(f"{METHODS_PACKAGE}."):
            continue  # the registry (ovseg/methods/__init__.py) imports every method
        target = _method_of(imp.target)
        if target is not None and target != _method_of(imp.importer):
            problems.append(
                f"{imp.where()}: {imp.importer} imports the method module {imp.target}; no "
                "method imports another - move what they share to a shared module ("
                + ", ".join(sorted(SHARED_METHOD_MODULES)) + ") or to ovseg/layers/"
            )
    return problems


def _cycles(graph: Mapping[str, set[str]]) -> Iterator[list[str]]:
    """One cycle per strongly connected component with a cycle (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    yield _path_in(set(component), graph)


def _path_in(component: set[str], graph: Mapping[str, set[str]]) -> list[str]:
    """A shortest closed path through ``component`` (strongly connected) from its first
    module back to it, e.g. ``[a, b, a]``."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if child in component and child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not a circle")  # pragma: no cover


def cycle_violations(imports: Iterable[Import]) -> list[str]:
    """(b): circles in the graph of module imports, each with the imports that close it."""
    imports = list(imports)
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], Import] = {}
    for imp in imports:
        graph.setdefault(imp.importer, set()).add(imp.target)
        where.setdefault((imp.importer, imp.target), imp)
    problems = []
    for cycle in _cycles(graph):
        steps = "; ".join(where[pair].where() for pair in zip(cycle, cycle[1:], strict=False))
        problems.append(f"import circle {' -> '.join(cycle)}: {steps}")
    return problems


def check_sources(sources: Mapping[str, str]) -> list[str]:
    """Every violation of the three rules in ``sources`` (``{relative path: source}``)."""
    imports = collect_imports(sources)
    return layer_violations(imports) + cycle_violations(imports) + method_violations(imports)


# --------------------------------------------------------------------------- the package


@pytest.fixture(scope="module")
def package_imports() -> list[Import]:
    return collect_imports(source_files(REPO))


def test_imports_point_down_the_layers(package_imports: list[Import]) -> None:
    problems = layer_violations(package_imports)
    assert not problems, "\n".join(problems)


def test_no_import_circles(package_imports: list[Import]) -> None:
    problems = cycle_violations(package_imports)
    assert not problems, "\n".join(problems)


def test_no_method_imports_another(package_imports: list[Import]) -> None:
    problems = method_violations(package_imports)
    assert not problems, "\n".join(problems)


def test_the_walk_sees_the_package(package_imports: list[Import]) -> None:
    importers = {imp.importer for imp in package_imports}
    # lazy imports count: ovseg/__init__.py imports only inside functions
    assert {"ovseg", "ovseg.engine.evaluate", "tools.train_net"} <= importers


# --------------------------------------------------------------------------- the checker


def _only_problem(sources: Mapping[str, str]) -> str:
    problems = check_sources(sources)
    assert len(problems) == 1, problems
    return problems[0]


def test_checker_catches_an_upward_import_inside_a_function() -> None:
    assert _only_problem({
        "ovseg/data/catalog.py": "import os\n\ndef f():\n    from ovseg.engine.trainer import T\n",
        "ovseg/engine/trainer.py": "T = 1\n",
    }).startswith(
        "ovseg/data/catalog.py:4: from ovseg.engine.trainer import T: ovseg.data.catalog "
        "(layer 1) imports ovseg.engine.trainer (layer 4)"
    )


def test_checker_allows_downward_imports_and_the_facade() -> None:
    assert check_sources({
        "ovseg/__init__.py": "def f():\n    from ovseg.engine import run\n",
        "ovseg/engine/__init__.py": "from ovseg.engine.run import run\n",
        "ovseg/engine/run.py": "import ovseg.io\nfrom ovseg import errors\n\ndef run(): ...\n",
        "ovseg/io.py": "from ovseg.errors import OvsegError\n",
        "ovseg/errors.py": "class OvsegError(Exception): ...\n",
        "tools/train_net.py": "import ovseg\nfrom ovseg.engine import run\n",
    }) == []


def test_checker_catches_imports_of_the_facade_and_unknown_folders() -> None:
    problems = check_sources({
        "ovseg/vis/overlay.py": "from ovseg import build_model\n",
        "ovseg/gadgets/x.py": "from ovseg.errors import OvsegError\n",
    })
    assert any("ovseg.vis.overlay (layer 1) imports ovseg (layer 5)" in p for p in problems)
    assert any("ovseg.gadgets.x is in no layer" in p for p in problems)


def test_checker_reports_a_circle_with_its_imports() -> None:
    problems = check_sources({
        "ovseg/data/catalog.py": "def f():\n    from ovseg.data import readers\n",
        "ovseg/data/readers.py": "from .catalog import DatasetError\n",
    })
    assert problems == [
        "import circle ovseg.data.catalog -> ovseg.data.readers -> ovseg.data.catalog: "
        "ovseg/data/catalog.py:2: from ovseg.data import readers; "
        "ovseg/data/readers.py:1: from .catalog import DatasetError"
    ]


def test_checker_catches_a_method_importing_another() -> None:
    assert _only_problem({
        "ovseg/methods/__init__.py": "from ovseg.methods import dense_clip, trident\n",
        "ovseg/methods/common.py": "X = 1\n",
        "ovseg/methods/dense_clip.py": "from ovseg.methods.common import X\n",
        "ovseg/methods/trident.py": "from ovseg.methods.common import X\n"
        "from ovseg.methods.dense_clip import labels_from_probabilities\n",
        "ovseg/methods/cloc/__init__.py": "from ovseg.methods.cloc import prompter\n",
        "ovseg/methods/cloc/prompter.py": "from . import head\n",
        "ovseg/methods/cloc/head.py": "",
    }).startswith(
        "ovseg/methods/trident.py:2: from ovseg.methods.dense_clip import "
        "labels_from_probabilities: ovseg.methods.trident imports the method module "
        "ovseg.methods.dense_clip"
    )
