"""The layout: folders of one kind each, imports that run one way, modules a screen can hold.

The import graph is read from the source (every ``import`` and ``from ... import``, also
those inside functions and under ``TYPE_CHECKING``), so a cycle fails here before it fails
at import time in one process and not another.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("llm_pruning", "fedspallm_strategy", "server_app", "client_app")
MAX_LINES = 420  # "a few hundred lines at most"

# What each subpackage of fedspallm_strategy may import of the others: the configuration at
# the bottom, the wire above it, the maths and the run state above the wire, the strategies
# on top. The top-level __init__ (the public API) may import any of them.
SUBPACKAGES = {
    "config": set(),
    "wire": {"config"},
    "merge": {"config", "wire"},
    "run": {"config", "wire"},
    "strategies": {"config", "wire", "merge", "run"},
}
FLOWER_FREE = ("llm_pruning", "fedspallm_strategy.config", "fedspallm_strategy.merge")
FLOWER_FREE += ("fedspallm_strategy.run",)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")
    }


def _imported(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports: ``from a.b import c`` is ``a.b.c`` when that is a
    module, else ``a.b``."""
    found = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path.parent)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found |= {
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            }
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(path, set(modules)) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of two or more modules (Tarjan), plus self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert sorted(find_cycles(graph)) == [["a", "b", "c"], ["e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_packages_import_each_other_without_a_cycle():
    graph = import_graph()
    assert "fedspallm_strategy.strategies.registry" in graph  # the graph is the real one
    assert "fedspallm_strategy.strategies.base" in graph["fedspallm_strategy.strategies.exact"]
    assert find_cycles(graph) == []


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "fedspallm_strategy" and len(parts) > 2 else None


def test_subpackages_import_only_downwards():
    wrong = sorted(
        f"{module} -> {other}"
        for module, imported in import_graph().items()
        if (source := _subpackage(module)) is not None
        for other in imported
        if (target := _subpackage(other)) not in (None, source)
        and target not in SUBPACKAGES[source]
    )
    assert wrong == []


def test_every_module_of_the_shared_package_sits_in_a_folder_of_its_kind():
    flat = sorted(
        path.name
        for path in (ROOT / "fedspallm_strategy").glob("*.py")
        if path.name != "__init__.py"
    )
    assert flat == []
    folders = {p.name for p in (ROOT / "fedspallm_strategy").iterdir() if p.is_dir()}
    assert set(SUBPACKAGES) <= folders
    assert folders - {"__pycache__"} == set(SUBPACKAGES)


def test_the_engine_and_the_shared_package_never_import_the_apps():
    offenders = sorted(
        f"{module} -> {other}"
        for module, imported in import_graph().items()
        if module.split(".")[0] in ("llm_pruning", "fedspallm_strategy")
        for other in imported
        if other.split(".")[0] in ("server_app", "client_app")
        or (module.startswith("llm_pruning") and other.startswith("fedspallm_strategy"))
    )
    assert offenders == []


def test_no_module_is_longer_than_a_few_hundred_lines():
    long = {
        str(path.relative_to(ROOT)): lines
        for path in _modules().values()
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def _imports_flwr(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "flwr" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "flwr":
            return True
    return False


@pytest.mark.parametrize("prefix", FLOWER_FREE)
def test_the_maths_the_engine_and_the_run_state_never_import_flwr(prefix):
    modules = {name: path for name, path in _modules().items() if name.startswith(prefix)}
    assert modules  # the prefix names real modules
    assert sorted(name for name, path in modules.items() if _imports_flwr(path)) == []
    # The check itself can fail: a strategy does import flwr.
    assert _imports_flwr(ROOT / "fedspallm_strategy" / "strategies" / "base.py")


def test_public_api_imports_without_flower():
    code = (
        "import sys\n"
        "from fedspallm_strategy import (\n"
        "    l0_aggregate, expand_mask, encode, decode, PayloadError, MatrixMerger, RunConfig,\n"
        "    plan_rounds, decode_values, check_kept_values, sample_layers,\n"
        ")\n"
        "import llm_pruning.engine, llm_pruning.evaluate\n"
        "assert 'flwr' not in sys.modules, 'flwr was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# What the ClientApp may use of the shared package: the configuration, the wire protocol
# (keys, round plan, codecs), and the per-process set-up (logging, the allocator setting);
# never the server's strategies, maths or state.
CLIENT_SIDE = (
    "fedspallm_strategy.config",
    "fedspallm_strategy.wire",
    "fedspallm_strategy.run.logs",
    "fedspallm_strategy.run.allocator",
)


def _server_side(imported: set[str]) -> set[str]:
    return {
        name
        for name in imported
        if name.startswith("fedspallm_strategy") and not name.startswith(CLIENT_SIDE)
    }


def test_the_client_app_imports_no_server_strategy():
    graph = import_graph()
    used = {name: _server_side(graph[name]) for name in graph if name.startswith("client_app")}
    assert {name: modules for name, modules in used.items() if modules} == {}
    # The check itself can fail: the ServerApp's orchestration does import the strategies.
    assert _server_side(graph["server_app.federation"])
