"""The packages' import graph, read from the source with `ast` (imports inside functions count as
much as those at the top): no import cycle in pipeline/ or rdinet/, pipeline/data/ imports nothing
from the package above it, and neither package imports the benchmarks."""
import ast
import graphlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "rdinet")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, modules=()) -> set[str]:
    """The modules `path` imports, by absolute name. `from x import y` imports x.y where that is
    one of `modules`, else x (whose own parent packages Python has imported first)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return names


def sources():
    return [path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """Each module of our packages -> the modules of our packages it imports."""
    modules = {module_name(path): path for path in sources()}
    return {name: {target for target in imported(path, modules) if target in modules and target != name}
            for name, path in modules.items()}


def test_the_sources_are_found(graph):
    assert {"pipeline.trainer", "pipeline.step", "pipeline.build", "pipeline.data.loader", "rdinet.model"} <= set(graph)
    assert "pipeline.step" in graph["pipeline.trainer"]  # a top-level import
    assert "pipeline.build" in graph["pipeline.evaluate"]  # one inside a function
    assert "pipeline.data.pipelines" in graph["pipeline.data.loader"]  # a relative one


def test_no_import_cycle(graph):
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")


def test_pipeline_data_imports_nothing_from_the_package_above(graph):
    upward = {(source, target) for source, targets in graph.items() for target in targets
              if source.startswith("pipeline.data") and not target.startswith("pipeline.data")}
    assert upward == set()
    relative_upward = [str(path) for path in (REPO / "pipeline" / "data").rglob("*.py")
                       for node in ast.walk(ast.parse(path.read_text()))
                       if isinstance(node, ast.ImportFrom) and node.level > 1]
    assert relative_upward == []


def test_the_library_and_the_trainer_import_nothing_from_the_benchmarks():
    found = {module_name(path): sorted(name for name in imported(path) if name.split(".")[0] == "benchmarks")
             for path in sources()}
    assert {name: names for name, names in found.items() if names} == {}
