"""Only the Flower wiring imports flwr: the maths and the engine work without Flower."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "fedspallm_strategy/strategies/base.py",
    "fedspallm_strategy/strategies/one_shot.py",
    "fedspallm_strategy/strategies/centralized.py",
    "fedspallm_strategy/strategies/exact.py",
    "fedspallm_strategy/strategies/secure_exact.py",
    "fedspallm_strategy/strategies/layerwise.py",
    "fedspallm_strategy/strategies/profile_round.py",
    "fedspallm_strategy/wire/replies.py",
    "fedspallm_strategy/strategies/grids.py",
    "fedspallm_strategy/wire/protocol.py",
}


def _imports_flwr(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "flwr" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "flwr":
            return True
    return False


def test_only_strategy_and_apps_import_flwr():
    offenders = [
        str(path.relative_to(ROOT))
        for package in ("llm_pruning", "fedspallm_strategy")
        for path in (ROOT / package).rglob("*.py")
        if str(path.relative_to(ROOT)) not in ALLOWED and _imports_flwr(path)
    ]
    assert offenders == []
    # The check itself can fail: the strategy module does import flwr.
    assert _imports_flwr(ROOT / "fedspallm_strategy" / "strategies" / "base.py")


def test_public_api_imports_without_flower():
    code = (
        "import sys\n"
        "from fedspallm_strategy.merge.aggregation import l0_aggregate\n"
        "from fedspallm_strategy.merge.expansion import expand_mask\n"
        "from fedspallm_strategy.wire.payload import encode, decode, PayloadError\n"
        "from fedspallm_strategy.merge.merging import MatrixMerger\n"
        "from fedspallm_strategy.wire.round_plan import plan_rounds\n"
        "from fedspallm_strategy.wire.values_payload import decode_values\n"
        "from fedspallm_strategy.merge.plausibility import check_kept_values\n"
        "import llm_pruning.engine, llm_pruning.evaluate\n"
        "assert 'flwr' not in sys.modules, 'flwr was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# What the ClientApp may use of the shared package: the wire protocol, its codecs, the run
# and node config, the round plan and logging; never the server's strategies or maths.
CLIENT_SIDE = {
    "fedspallm_strategy.wire.protocol",
    "fedspallm_strategy.config",
    "fedspallm_strategy.wire.payload",
    "fedspallm_strategy.wire.stats_payload",
    "fedspallm_strategy.wire.values_payload",
    "fedspallm_strategy.wire.secure_encoding",
    "fedspallm_strategy.wire.round_plan",
    "fedspallm_strategy.run.logs",
}


def _shared_imports(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedspallm_"):
            modules.add(node.module)
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names if a.name.startswith("fedspallm_")}
    return modules


def test_the_client_app_imports_no_server_strategy():
    used = {
        str(path.relative_to(ROOT)): _shared_imports(path) - CLIENT_SIDE
        for path in (ROOT / "client_app").rglob("*.py")
    }
    assert {path: modules for path, modules in used.items() if modules} == {}
    # The check itself can fail: the ServerApp's orchestration does import the strategies.
    assert _shared_imports(ROOT / "server_app" / "federation.py") - CLIENT_SIDE
