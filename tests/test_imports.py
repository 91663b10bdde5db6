"""No import cycle inside `tinysr_diffusers`: the graph of every module's imports of the package's own modules, at
module level and inside functions (what runs when a function is called), read from the source with `ast`.

Imports under `if TYPE_CHECKING:` never run and are left out. A name imported from a lazy package (one with an
`_import_structure`, as the package root, `models` and `pipelines`) is an import of the submodule that defines it.
"""

import ast
from pathlib import Path
from typing import Iterator, Optional


PACKAGE = "tinysr_diffusers"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _lazy_names(package: str) -> dict[str, str]:
    """A lazy package's public names -> the submodule defining each (from its `_import_structure` literal)."""
    path = MODULES.get(package)
    if path is None or path.name != "__init__.py":
        return {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_import_structure" for t in node.targets):
            structure = ast.literal_eval(node.value)
            return {name: f"{package}.{module}" for module, names in structure.items() for name in names}
    return {}


def _target(package: str, name: str) -> str:
    """The module that `from package import name` runs: a submodule, the one a lazy package resolves the name to
    (followed through nested lazy packages), or the package itself."""
    if f"{package}.{name}" in MODULES:
        return f"{package}.{name}"
    module = _lazy_names(package).get(name)
    if module is None:
        return package
    return _target(module, name) if module in MODULES and MODULES[module].name == "__init__.py" else module


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def _import_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every import statement under `node`, anywhere but in the body of an `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield from _import_nodes(ast.Module(body=[other], type_ignores=[]))
        else:
            yield from _import_nodes(child)


def _base(module: str, node: ast.ImportFrom) -> Optional[str]:
    """The absolute module an `ImportFrom` names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports(module: str) -> set[str]:
    """The package's modules that `module` imports."""
    found = set()
    for node in _import_nodes(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        else:
            base = _base(module, node)
            found.update(_target(base, alias.name) for alias in node.names)
    return {name for name in found if name in MODULES and name != module}


def cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """The strongly connected components of more than one module (Tarjan): (a shortest cycle through the first of
    its modules, all its modules) each."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append((_a_cycle(graph, set(component)), sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _a_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One cycle through the smallest module of a strongly connected `component` (breadth first: a shortest one)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph[node] & component):
                if successor == start:
                    return paths[node] + [start]
                if successor not in paths:
                    paths[successor] = paths[node] + [successor]
                    following.append(successor)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def test_the_graph_sees_module_and_function_level_imports():
    """The reader itself, on modules whose imports are known: a module-level, a function-level and a lazy name."""
    graph = {module: imports(module) for module in MODULES}
    assert "tinysr_diffusers.tiling" in graph["tinysr_diffusers.models.autoencoder_tinysr"]  # module level
    assert "tinysr_diffusers.pipelines.pipeline_tinysr" in graph["tinysr_diffusers.onnx_export"]  # in a function
    assert "tinysr_diffusers.pipelines.pipeline_one_step_sr" not in graph["tinysr_diffusers.devices"]  # TYPE_CHECKING
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": {"b", "d"}, "d": set()}
    assert cycles(graph) == [(["a", "b", "a"], ["a", "b", "c"])]


def test_no_import_cycle_inside_the_package():
    graph = {module: imports(module) for module in MODULES}
    found = cycles(graph)
    report = [f"{' -> '.join(cycle)} (a ring of {len(members)}: {', '.join(members)})" for cycle, members in found]
    assert not found, "import cycles:\n" + "\n".join(report)



# The packages that ship (`setup.py`): none may import the benchmarks, which are not shipped and build on them
# (benchmarks import the library, pruning and training; never the reverse).
SHIPPED = ("tinysr_diffusers", "pruning", "training")


def _names_benchmarks(name: str) -> bool:
    return name == "benchmarks" or name.startswith("benchmarks.")


def benchmark_imports(path: Path) -> list[tuple[int, str]]:
    """(line, statement) of every import of `benchmarks` in a file, at module level or inside functions, by statement
    or by `importlib.import_module` / `__import__` of a literal name; under `if TYPE_CHECKING:` too (a type-only
    import still ties a shipped package to the benchmarks)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if not node.level else []
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
            "import_module", "__import__"
        ):
            names = [arg.value for arg in node.args[:1] if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
        else:
            continue
        if any(_names_benchmarks(name) for name in names):
            found.append((node.lineno, ast.unparse(node)))
    return sorted(found)


def test_the_reader_finds_benchmark_imports_at_any_depth(tmp_path):
    module = tmp_path / "module.py"
    module.write_text(
        "import os, benchmarks.quality\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from benchmarks.reporting import cpu_model\n"
        "def f():\n"
        "    from benchmarks import reporting\n"
        "    from benchmarks_extra import x\n"
        "    from .benchmarks import y\n"
        "    return importlib.import_module('benchmarks.efficiency'), importlib.import_module(name)\n"
    )
    assert benchmark_imports(module) == [
        (1, "import os, benchmarks.quality"),
        (4, "from benchmarks.reporting import cpu_model"),
        (6, "from benchmarks import reporting"),
        (9, "importlib.import_module('benchmarks.efficiency')"),
    ]


def test_no_shipped_package_imports_the_benchmarks():
    repository = ROOT.parent
    found = [
        f"{path.relative_to(repository)}:{line}: {statement}"
        for package in SHIPPED
        for path in sorted((repository / package).rglob("*.py"))
        for line, statement in benchmark_imports(path)
    ]
    report = "\n".join(found)
    assert not found, f"benchmarks may import these packages, never the reverse; imports of benchmarks:\n{report}"
