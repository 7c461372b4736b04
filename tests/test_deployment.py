"""A real federation on loopback: a SuperLink and SuperNodes as separate processes.

What users deploy — one SuperLink, one ``flower-supernode`` per organisation with its own
private text, layer budget and model cache (``--node-config``), and ``flwr run . <connection>``
from a laptop — started here as real processes on 127.0.0.1 with free ports, each SuperNode
with its own FLWR_HOME as if on its own machine. The second federation runs with TLS and
SuperNode authentication on, and in the same topology as ``docker/compose.yml`` (the SuperLink
in process isolation with a separate SuperExec that authenticates with a shared secret).

Every process a test starts is stopped by its PID, with the processes it started (found by a
marker in their environment, so detached ones too), also when the test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from fedspallm_strategy.wire.payload import decode

ROOT = Path(__file__).resolve().parents[1]
MAKE_CERTS = ROOT / "docker" / "make_certs.py"
NUM_LAYERS = 4  # tiny-llama
# keep-replies: the checks below read each node's payload from replies/; float32 values: the
# hostile node's attacks and their expected reasons are written for the model's dtype.
RUN_CONFIG = (
    "model='tiny-llama' seqlen=64 calib-samples=4 eval-windows=2 round-timeout=240.0 "
    "keep-replies=true payload-dtype='float32'"
)
LAYER = re.compile(r"\.layers\.(\d+)\.")

pytestmark = pytest.mark.skipif(
    shutil.which("flower-superlink") is None or shutil.which("flower-supernode") is None,
    reason="needs the flower-superlink and flower-supernode commands (pip install flwr)",
)


# ------------------------------------------------------------------ processes
def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (held open together, so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent can reap it


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def _pids_with_marker(marker: bytes) -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes():
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


class Federation:
    """Starts Flower processes with logs under ``root``; :meth:`stop` ends all of them."""

    def __init__(self, root: Path):
        self.root = root
        self.marker = f"FEDSPALLM_DEPLOYMENT_TEST={uuid.uuid4().hex}"
        self.processes: dict[str, subprocess.Popen] = {}
        self.cli_home = root / "cli-home"  # the laptop's FLWR_HOME: SuperLink connections

    def env(self, flwr_home: Path) -> dict[str, str]:
        key, value = self.marker.split("=")
        return {
            **os.environ,
            key: value,
            "FLWR_HOME": str(flwr_home),
            # The machine already has our dependencies: no uv installs per run.
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1",
            # Several ClientApps share 2 cores: one thread each, not 2 spinning per process.
            "OMP_NUM_THREADS": "1",
        }

    def start(
        self,
        name: str,
        args: list[str],
        *,
        cwd: Path | None = None,
        home: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen:
        """Start ``args`` in its own session, logging to ``<root>/<name>.log``.

        By default as a machine of its own (its own FLWR_HOME); ``cwd`` and ``home`` run it
        elsewhere, e.g. ``flwr run`` in the project with the CLI's home.
        """
        log = (self.root / f"{name}.log").open("wb")
        home = home or self.root / name / "flwr-home"  # a machine of its own
        home.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            args,
            cwd=cwd or home.parent,
            env={**self.env(home), **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self, tail: int = 2500) -> str:
        return "\n".join(f"--- {name}.log\n{self.log(name)[-tail:]}" for name in self.processes)

    def wait_for(self, name: str, pattern: str, timeout: float = 90) -> re.Match:
        """Poll ``name``'s log for ``pattern``; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := re.search(pattern, self.log(name)):
                return match
            if self.processes[name].poll() is not None:
                pytest.fail(f"{name} exited ({self.processes[name].returncode})\n{self.logs()}")
            time.sleep(0.5)
        pytest.fail(f"{name}: no {pattern!r} after {timeout} s\n{self.logs()}")

    def wait_healthy(self, name: str, url: str, ca: Path | None = None, timeout=60) -> None:
        verify = ssl.create_default_context(cafile=str(ca)) if ca else False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                pytest.fail(f"{name} exited ({self.processes[name].returncode})\n{self.logs()}")
            try:
                if httpx.get(url, verify=verify, timeout=2).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        pytest.fail(f"{name}: {url} not healthy after {timeout} s\n{self.logs()}")

    def connect(self, name: str, port: int, root_certificates: Path | None = None) -> str:
        """Write a SuperLink connection into the CLI's config.toml; returns its name."""
        self.cli_home.mkdir(parents=True, exist_ok=True)
        security = (
            f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
        )
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{name}"\n\n'
            f'[superlink.{name}]\naddress = "127.0.0.1:{port}"\n{security}\n'
        )
        return name

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["flwr", *args],
            cwd=ROOT,
            env=self.env(self.cli_home),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self) -> None:
        """SIGTERM every started process and its descendants by PID, then SIGKILL leftovers."""
        key = self.marker.encode()
        children = _children_by_parent()
        pids: set[int] = set()
        stack = [process.pid for process in self.processes.values()]
        while stack:  # the started processes and everything below them
            pid = stack.pop()
            if pid not in pids:
                pids.add(pid)
                stack.extend(children.get(pid, []))
        pids |= _pids_with_marker(key)  # and any that left the tree (detached, orphaned)
        for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            for pid in sorted(pids):
                if _alive(pid):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                pids |= _pids_with_marker(key)  # anything started meanwhile
                if not any(_alive(pid) for pid in pids):
                    break
                time.sleep(0.2)
        for process in self.processes.values():
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        left = [pid for pid in pids if _alive(pid)]
        assert not left, f"processes still running after SIGKILL: {left}"


@pytest.fixture(name="federation")  # named: other modules import it as federation_fixture
def federation_fixture(tmp_path):
    federation = Federation(tmp_path)
    try:
        yield federation
    finally:
        federation.stop()


# ---------------------------------------------------------------------- data
def write_private_texts(root: Path, count: int) -> list[Path]:
    """``count`` organisations' private texts: different Python documentation topics each."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    paths = []
    for index in range(count):
        text = "\n\n".join(topics[name] for name in names[index * 9 : (index + 1) * 9])
        path = root / f"org-{index + 1}" / "private.txt"
        path.parent.mkdir(parents=True)
        path.write_text(text[:6000])
        paths.append(path)
    return paths


def supernode_args(
    superlink_port: int, runtime_port: int, node_config: str, security: list[str]
) -> list[str]:
    return [
        "flower-supernode",
        *security,
        "--superlink",
        f"127.0.0.1:{superlink_port}",
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),  # each SuperNode's Runtime API (its ClientApps) on its own port
        "--node-config",
        node_config,
    ]


def run_status(federation: Federation, connection: str, run_id: str) -> str:
    """A run's status as ``flwr ls`` reports it, e.g. ``finished:completed``."""
    listing = federation.flwr("ls", connection, "--format", "json")
    runs = {run["run-id"]: run for run in json.loads(listing.stdout)["runs"]}
    return runs[run_id]["status"]


def run_and_check(
    federation: Federation, connection: str, output_dir: Path, nodes: int, extra: str = ""
):
    """``flwr run . <connection>``; returns (run id, run folder, report) of a completed run."""
    overrides = f"{RUN_CONFIG} output-dir='{output_dir}' min-clients={nodes} {extra}".strip()
    result = federation.flwr(
        "run", ".", connection, "--stream", "--run-config", overrides, timeout=420
    )
    log = result.stdout + result.stderr
    match = re.search(r"Successfully started run (\d+)", log)
    assert match, log[-3000:] + federation.logs()
    run_id = match.group(1)

    # `--stream` exits 0 even when the run failed: the status comes from `flwr ls`.
    status = run_status(federation, connection, run_id)
    assert status == "finished:completed", log[-4000:] + federation.logs()

    folders = list(output_dir.glob(f"*-fedspallm-{run_id}"))
    assert len(folders) == 1, log[-3000:]
    assert f"FedSpaLLM run folder: {folders[0]}" in log
    report = json.loads((folders[0] / "report.json").read_text())
    return run_id, folders[0], report


def check_nodes_pruned_their_layers(
    run_dir: Path, report: dict, budgets: dict[str, int], failed: frozenset[str] = frozenset()
):
    """Each node was given exactly its budget of layers, and its payload holds only those.

    ``failed`` nodes were given their layers too, but sent no payload; the others' layers
    cover the model.
    """
    clients = report["clients"]
    assert set(clients) == set(budgets), clients.keys()
    covered = set()
    for node, budget in budgets.items():
        entry = clients[node]
        assert entry["layer-budget"] == budget
        layers = [layer for round_layers in entry["layers"].values() for layer in round_layers]
        assert len(layers) == len(set(layers)) == budget, entry
        replies = sorted((run_dir / "replies").glob(f"node-{node}-part-*.safetensors"))
        if node in failed:
            assert not replies and not entry["metrics"], entry
            continue
        covered |= set(layers)
        assert len(replies) == 1, replies
        _, masks = decode(replies[0].read_bytes())
        in_payload = {int(LAYER.search(name).group(1)) for name in masks}
        assert in_payload == set(layers), (node, in_payload, layers)
        assert entry["metrics"]["layers"] == budget
    assert covered == set(range(NUM_LAYERS))


# --------------------------------------------------------------------- tests
def test_missing_data_path_is_a_clear_error(tmp_path):
    """What a node with a wrong ``data-path`` replies: its path, not a hub lookup."""
    from fedspallm_strategy.config import private_data_path

    with pytest.raises(FileNotFoundError, match="node config data-path .*does not exist"):
        private_data_path(str(tmp_path / "no-such-file.txt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        private_data_path("wikitext2")  # a data-path is always a local path
    text = tmp_path / "ok.txt"
    text.write_text("hello")
    assert private_data_path(str(text)) == text.resolve()


def test_make_certs(tmp_path):
    """The CA signs a server certificate with the SANs asked for; node keys load as Flower's."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    out = tmp_path / "certs"
    args = [sys.executable, str(MAKE_CERTS), "--out", str(out), "--supernodes", "2"]
    subprocess.run([*args, "--host", "link.example.org"], check=True, capture_output=True)
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"link.example.org", "localhost", "superlink"} <= set(
        sans.get_values_for_type(x509.DNSName)
    )
    assert "127.0.0.1" in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    for index in (1, 2):
        private = load_ssh_private_key((out / f"supernode-{index}.key").read_bytes(), None)
        public = load_ssh_public_key((out / f"supernode-{index}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert (out / f"supernode-{index}.key").stat().st_mode & 0o077 == 0
    assert (out / "superexec.secret").read_bytes()

    # Running it again keeps everything, adds what is missing, re-issues for a new host.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    subprocess.run(
        [*args, "--supernodes", "3", "--host", "link.example.org"], check=True, capture_output=True
    )
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(after) - set(before) == {"supernode-3.key", "supernode-3.pub"}
    assert all(after[name] == content for name, content in before.items())
    subprocess.run([*args, "--host", "10.0.0.7"], check=True, capture_output=True)
    server = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "10.0.0.7" in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert (out / "ca.crt").read_bytes() == before["ca.crt"]


def test_insecure_federation_with_node_configs(federation, tmp_path):
    """SuperLink + 4 SuperNodes, each with its own text, budget and model cache.

    Three nodes hold text (budgets 2, 2, 4 of tiny-llama's 4 layers); the fourth's data-path
    does not exist: its reply is an error, recorded as a rejection, and the run completes
    from the others.
    """
    superlink_port, *runtime_ports = free_ports(5)
    texts = write_private_texts(tmp_path, 3)
    missing = tmp_path / "org-4" / "not-there.txt"
    budgets = [2, 2, 4, 2]
    caches = [tmp_path / f"org-{i + 1}" / "model-cache" for i in range(4)]

    federation.start(
        "superlink",
        ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(superlink_port)],
    )
    federation.wait_healthy("superlink", f"http://127.0.0.1:{superlink_port}/health")
    for index, data in enumerate([*texts, missing]):
        node_config = (
            f"data-path='{data}' layer-budget={budgets[index]} cache-dir='{caches[index]}'"
        )
        federation.start(
            f"supernode-{index + 1}",
            supernode_args(superlink_port, runtime_ports[index], node_config, ["--insecure"]),
        )
    node_ids = [
        federation.wait_for(f"supernode-{i + 1}", r"SuperNode ID: (\d+)").group(1) for i in range(4)
    ]
    connection = federation.connect("loopback", superlink_port)

    # Pruned with exact masked least squares, then one recovery round: the three nodes with
    # text fine-tune the global model, half of the loss from the dense model's targets.
    recovery = (
        "reconstruction='lsq' recovery-rounds=1 recovery-steps=2 recovery-samples=2 "
        "recovery-lr=0.001 recovery-distill=0.5"
    )
    run_id, run_dir, report = run_and_check(
        federation, connection, tmp_path / "runs", nodes=4, extra=recovery
    )

    bad = node_ids[3]
    check_nodes_pruned_their_layers(
        run_dir, report, dict(zip(node_ids, budgets, strict=True)), failed=frozenset({bad})
    )
    # The node without data replied with an error naming its data path, in both rounds.
    assert {r["node"] for r in report["rejected"]} == {int(bad)}, report["rejected"]
    (recovered,) = report["recovery"]["per-round"]
    assert recovered["clients"] == 3
    assert report["recovery"]["distill"] == 0.5
    rounds = [r["round"] for r in report["rejected"]]
    assert rounds[0] == 1 and rounds[-1] == recovered["round"], report["rejected"]
    reason = report["rejected"][0]["reason"]
    assert "data-path" in reason and str(missing) in reason and "does not exist" in reason
    # Recovered, and still exactly at the target sparsity.
    assert report["sparsity"]["overall"] == 0.5
    # Each node converted the model into its own cache-dir (safetensors on its own disk).
    for cache in caches[:3]:
        assert list((cache / "models" / "tiny-llama").glob("*.safetensors")), cache


HOSTILE_NODE = ROOT / "tests" / "hostile_node"  # sitecustomize.py: patches the ClientApp
ATTACKS = {  # FEDSPALLM_HOSTILE -> what the server's reason says
    "lying-array": "not a valid .npy array",
    "scale:1e30": "differ from the dense weights",
    "scale:1000": "differ from the dense weights",
    "sign-flip": "differ from the dense weights",
    "keep-all": "this reply may hold",
}


def test_hostile_organisations_cannot_fail_the_run_or_move_the_model(federation, tmp_path):
    """Two honest SuperNodes and five hostile ones, each running a modified ClientApp (one
    attack each). The run completes; the report names each hostile node and its reason; the
    saved model is exactly the two honest nodes' merge, finite, at exactly 50 %."""
    import torch

    from fedspallm_strategy.config import RunConfig
    from fedspallm_strategy.strategies.one_shot import MergeStrategy
    from llm_pruning.families import prunable_weights
    from llm_pruning.models import load_model
    from server_app.inprocess import _set_task_identity

    attacks = list(ATTACKS)
    superlink_port, *runtime_ports = free_ports(3 + len(attacks))
    texts = write_private_texts(tmp_path, 2 + len(attacks))
    federation.start(
        "superlink",
        ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(superlink_port)],
    )
    federation.wait_healthy("superlink", f"http://127.0.0.1:{superlink_port}/health")
    for index, text in enumerate(texts):
        attack = attacks[index - 2] if index >= 2 else None
        hostile = {"PYTHONPATH": str(HOSTILE_NODE), "FEDSPALLM_HOSTILE": attack} if attack else {}
        cache = tmp_path / f"org-{index + 1}" / "model-cache"
        federation.start(
            f"supernode-{index + 1}",
            supernode_args(
                superlink_port,
                runtime_ports[index],
                f"data-path='{text}' cache-dir='{cache}'",
                ["--insecure"],
            ),
            env=hostile,
        )
    node_ids = [
        int(federation.wait_for(f"supernode-{i + 1}", r"SuperNode ID: (\d+)").group(1))
        for i in range(len(texts))
    ]
    connection = federation.connect("loopback", superlink_port)

    _, run_dir, report = run_and_check(
        federation, connection, tmp_path / "runs", nodes=len(texts), extra="resolve=false"
    )

    reasons = {r["node"]: r["reason"] for r in report["rejected"]}
    assert sorted(reasons) == sorted(node_ids[2:]), report["rejected"]
    for node, attack in zip(node_ids[2:], attacks, strict=True):
        assert ATTACKS[attack] in reasons[node], (attack, reasons[node])
    assert report["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-9)

    # The saved model is the merge of the two honest replies alone.
    _set_task_identity(1)
    saved, _ = load_model(str(run_dir / "model"))
    expected, _ = load_model("tiny-llama")
    config = RunConfig.from_mapping(
        {"model": "tiny-llama", "seqlen": 64, "resolve": False, "payload-dtype": "float32"}
    )
    strategy = MergeStrategy(expected, config)
    honest = {
        node: sorted((run_dir / "replies").glob(f"node-{node}-part-*")) for node in node_ids[:2]
    }
    strategy.assignments = {node: list(range(NUM_LAYERS)) for node in honest}
    strategy.aggregate_train(
        1, [_stored_reply(node, paths[0].read_bytes()) for node, paths in honest.items()]
    )
    saved_params, expected_params = (
        dict(saved.named_parameters()),
        dict(expected.named_parameters()),
    )
    for layer in range(NUM_LAYERS):
        for name in prunable_weights(saved, layer):
            weight = saved_params[name].data
            assert bool(torch.isfinite(weight).all()), name
            assert torch.equal(weight, expected_params[name].data), name


def _stored_reply(node: int, data: bytes):
    import numpy as np
    from flwr.app import Array, ArrayRecord, Message, RecordDict

    from fedspallm_strategy.wire.protocol import PAYLOAD_KEY

    request = Message(RecordDict(), message_type="train", dst_node_id=node, group_id="1")
    request.metadata.__dict__["_message_id"] = f"stored-{node}"
    record = ArrayRecord({PAYLOAD_KEY: Array(np.frombuffer(data, dtype=np.uint8))})
    return Message(RecordDict({PAYLOAD_KEY: record}), reply_to=request)


def test_tls_federation_with_supernode_authentication(federation, tmp_path):
    """TLS everywhere, SuperNode authentication on, and the compose topology.

    The SuperLink runs in process isolation with its own SuperExec (authenticated by a
    shared secret), as in docker/compose.yml. Two registered SuperNodes (budgets 1 and 3)
    prune; a SuperNode whose key was never registered is turned away.
    """
    superlink_port, *runtime_ports = free_ports(4)
    certs = tmp_path / "certs"
    subprocess.run(
        [sys.executable, str(MAKE_CERTS), "--out", str(certs), "--supernodes", "3"],
        check=True,
        capture_output=True,
    )
    texts = write_private_texts(tmp_path, 2)
    budgets = [1, 3]
    ca = certs / "ca.crt"

    federation.start(
        "superlink",
        [
            "flower-superlink",
            "--ssl-ca-certfile",
            str(ca),
            "--ssl-certfile",
            str(certs / "server.crt"),
            "--ssl-keyfile",
            str(certs / "server.key"),
            "--enable-supernode-auth",
            "--isolation",
            "process",
            "--superexec-auth-secret-file",
            str(certs / "superexec.secret"),
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(superlink_port),
        ],
    )
    federation.wait_healthy("superlink", f"https://127.0.0.1:{superlink_port}/health", ca)
    federation.start(
        "superexec-serverapp",
        [
            "flower-superexec",
            "--root-certificates",
            str(ca),
            "--runtime-api-address",
            f"127.0.0.1:{superlink_port}",
            "--superexec-auth-secret-file",
            str(certs / "superexec.secret"),
        ],
    )
    connection = federation.connect("secure", superlink_port, root_certificates=ca)

    # Register the organisations' public keys (what the SuperLink's operator does).
    registered = []
    for index in (1, 2):
        result = federation.flwr(
            "supernode",
            "register",
            str(certs / f"supernode-{index}.pub"),
            connection,
            "--format",
            "json",
        )
        assert result.returncode == 0, result.stdout + result.stderr
        registered.append(str(json.loads(result.stdout)["node-id"]))

    for index in (1, 2):
        node_config = f"data-path='{texts[index - 1]}' layer-budget={budgets[index - 1]}"
        security = [
            "--root-certificates",
            str(ca),
            "--auth-supernode-private-key",
            str(certs / f"supernode-{index}.key"),
        ]
        federation.start(
            f"supernode-{index}",
            supernode_args(superlink_port, runtime_ports[index - 1], node_config, security),
        )
    node_ids = [
        federation.wait_for(f"supernode-{i}", r"SuperNode ID: (\d+)").group(1) for i in (1, 2)
    ]
    assert node_ids == registered

    # A SuperNode with a key the SuperLink does not know cannot join.
    intruder = federation.start(
        "supernode-3",
        supernode_args(
            superlink_port,
            runtime_ports[2],
            "layer-budget=4",
            [
                "--root-certificates",
                str(ca),
                "--auth-supernode-private-key",
                str(certs / "supernode-3.key"),
                "--max-retries",
                "0",
            ],
        ),
    )
    assert intruder.wait(timeout=90) != 0, federation.log("supernode-3")
    assert "Failed to activate SuperNode" in federation.log("supernode-3")

    run_id, run_dir, report = run_and_check(federation, connection, tmp_path / "runs", nodes=2)

    check_nodes_pruned_their_layers(run_dir, report, dict(zip(node_ids, budgets, strict=True)))
    assert report["rejected"] == []
    listing = federation.flwr("supernode", "ls", connection, "--format", "json")
    online = {str(n["node-id"]) for n in json.loads(listing.stdout)["nodes"]}
    assert online == set(node_ids), listing.stdout


# ------------------------------------------------------------- docker files
# Docker cannot run here: check what can be checked without it — every command in the
# compose files parses with the installed Flower's own argument parsers, every node config
# with Flower's parser and ours, and the services fit together.
DOCKER = ROOT / "docker"
VARIABLE = re.compile(r"\$\{(\w+):([-?])([^}]*)\}")  # ${X:-default} or ${X:?message}
REQUIRED = "192.0.2.1"  # stands for a variable the user must set


def _compose(*names: str) -> dict:
    """The compose files merged like `docker compose -f a -f b` (enough for these files)."""
    yaml = pytest.importorskip("yaml")

    def merge(base, override):
        if isinstance(base, dict) and isinstance(override, dict):
            return {k: merge(base[k], v) if k in base else v for k, v in override.items()} | {
                k: v for k, v in base.items() if k not in override
            }
        return override

    merged: dict = {}
    for name in names:
        text = VARIABLE.sub(
            lambda m: m.group(3) if m.group(2) == "-" else REQUIRED, (DOCKER / name).read_text()
        )
        loaded = yaml.safe_load(text)
        assert "$" not in json.dumps(loaded), f"{name}: a variable without a default"
        merged = merge(merged, loaded)
    return merged


def _parsers():
    try:
        from flwr.supercore.cli.flower_superexec import _parse_args as superexec
        from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink as superlink
        from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode as supernode
    except ImportError as error:  # private helpers of flwr 1.41; moved in another version
        pytest.skip(f"Flower's command-line parsers moved: {error}")
    return {"superlink": superlink(), "supernode": supernode(), "superexec": superexec()}


def test_compose_commands_parse_with_flower_and_fit_together():
    from flwr.common.config import parse_config_args

    from fedspallm_strategy.config import NodeConfig

    compose = _compose("compose.yml")
    services = compose["services"]
    parsers = _parsers()
    version = services["superlink"]["image"].split(":")[1]
    assert services["superlink"]["image"] == f"flwr/superlink:{version}"

    link = parsers["superlink"].parse_args(services["superlink"]["command"])
    assert link.isolation == "process" and link.enable_supernode_auth and not link.insecure
    assert not link.runtime_dependency_install
    env = services["superlink"]["environment"]
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    link_port = link.port
    assert services["superlink"]["ports"] == [f"{link_port}:{link_port}"]
    secrets = {s["target"]: s["source"] for s in services["superlink"]["secrets"]}
    for path in (link.ssl_ca_certfile, link.ssl_certfile, link.ssl_keyfile):
        assert path.removeprefix("/run/secrets/") in secrets, path

    server = parsers["superexec"].parse_args(services["superexec-serverapp"]["command"])
    assert server.runtime_api_address == f"superlink:{link_port}"
    assert server.superexec_auth_secret_file == link.superexec_auth_secret_file
    assert server.root_certificates and not server.insecure

    supernodes = sorted(name for name in services if name.startswith("supernode-"))
    assert len(supernodes) >= 2
    volumes_used = []
    for name in supernodes:
        service = services[name]
        assert service["image"] == f"flwr/supernode:{version}"
        node = parsers["supernode"].parse_args(service["command"])
        assert node.superlink == f"superlink:{link_port}" and node.isolation == "process"
        assert node.root_certificates and node.auth_supernode_private_key and not node.insecure
        config = NodeConfig.from_mapping(parse_config_args([node.node_config]))
        assert config.data_path and config.layer_budget and config.cache_dir

        # Its ClientApps run in its own SuperExec, where the node config's paths must be.
        clientapp = services[name.replace("supernode-", "superexec-clientapp-")]
        executor = parsers["superexec"].parse_args(clientapp["command"])
        assert executor.runtime_api_address == f"{name}:{node.port}"
        mounts = {v.split(":")[1]: v.split(":")[0] for v in clientapp["volumes"]}
        assert mounts[config.data_path].startswith("private-data")
        assert clientapp["volumes"][0].endswith(":ro")  # the private text, read-only
        assert mounts[config.cache_dir].startswith("model-cache")
        volumes_used += [mounts[config.data_path], mounts[config.cache_dir]]
        assert set(clientapp["networks"]) & set(service["networks"]) - {"federation"}
        assert "federation" not in clientapp["networks"]  # reaches only its own SuperNode
    assert len(volumes_used) == len(set(volumes_used)), "each organisation its own volumes"
    assert set(volumes_used) <= set(compose["volumes"])

    # Every secret is a file make_certs.py writes; every superexec is built from our image.
    made = {"ca.crt", "server.crt", "server.key", "superexec.secret"}
    made |= {f"supernode-{i}.key" for i in range(1, len(supernodes) + 1)}
    assert {Path(s["file"]).name for s in compose["secrets"].values()} == made
    for name, service in services.items():
        if name.startswith("superexec-"):
            assert service["build"]["dockerfile"] == "docker/Dockerfile"
            assert service["environment"]["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


def test_compose_gpu_override_reserves_a_gpu_per_organisation():
    compose = _compose("compose.yml", "compose.gpu.yml")
    for name, service in compose["services"].items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
        if name.startswith("superexec-clientapp-"):
            assert service["build"]["dockerfile"] == "docker/Dockerfile.cuda"
            assert service["build"]["context"] == ".."
            (device,) = devices["devices"]
            assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        else:
            assert not devices, name  # the SuperLink and the ServerApp need no GPU


def test_compose_remote_override_points_supernodes_at_another_host():
    base = _compose("compose.yml")["services"]
    remote = _compose("compose.yml", "compose.remote.yml")["services"]
    for name, service in remote.items():
        if name.startswith("supernode-"):
            # "superlink" is in the server certificate's SANs: TLS verification holds.
            assert service.pop("extra_hosts") == [f"superlink:{REQUIRED}"]
        assert service == base[name]


def test_dockerfiles_install_the_package_on_the_official_superexec_image():
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    compose_version = _compose("compose.yml")["services"]["superlink"]["image"].split(":")[1]
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (DOCKER / name).read_text()
        assert re.search(r"^FROM flwr/superexec:\$\{FLWR_VERSION\}$", text, re.M), name
        default = re.search(r"^ARG FLWR_VERSION=(\S+)$", text, re.M).group(1)
        assert default == compose_version, (name, default, compose_version)
        for package in packages:  # the image must hold every package the wheel has
            assert re.search(rf"^COPY .*\b{package} ", text, re.M), (name, package)
        ignore = (DOCKER / f"{name}.dockerignore").read_text().split()
        assert all(f"!{package}/" in ignore for package in packages), name


@pytest.mark.skipif(
    subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0
    if shutil.which("docker")
    else True,
    reason="docker compose v2 not available",
)
def test_docker_compose_config(tmp_path):
    """`docker compose config` validates the files where the compose plugin is installed."""
    certs = DOCKER / "certs"
    if not certs.exists():
        subprocess.run([sys.executable, str(MAKE_CERTS), "--out", str(certs)], check=True)
    env = {**os.environ, "SUPERLINK_IP": REQUIRED}
    for files in (["compose.yml"], ["compose.yml", "compose.gpu.yml", "compose.remote.yml"]):
        args = [arg for name in files for arg in ("-f", str(DOCKER / name))]
        result = subprocess.run(
            ["docker", "compose", *args, "config", "--quiet"],
            capture_output=True,
            text=True,
            env=env,
        )
        assert result.returncode == 0, result.stderr
