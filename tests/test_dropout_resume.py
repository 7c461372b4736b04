"""Failures in a real federation on loopback: a SuperNode dies mid-run, a ServerApp is killed.

Real ``flower-superlink`` / ``flower-supernode`` processes and ``flwr run`` (the helpers of
``test_deployment.py``), tiny-llama (4 decoder layers). Every process a test starts is
stopped by PID by the ``federation`` fixture, also when the test fails; what a test kills on
purpose it kills by PID (or by the process group of a SuperNode it started) too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_deployment import (  # tests/ is on sys.path under pytest
    NUM_LAYERS,
    ROOT,
    Federation,
    _alive,
    _children_by_parent,
    federation_fixture,  # noqa: F401  (the `federation` fixture)
    free_ports,
    pytestmark,  # noqa: F401  (skipped without the Flower commands)
    run_status,
    supernode_args,
    write_private_texts,
)

from fedspallm_strategy.merge.expansion import num_to_prune

# The paper's one-shot rounds (resolve=false): a lost node's layers go to the others next
# round, and the server checkpoints every round. Layer-wise runs keep no checkpoint yet.
# keep-replies: the checks read each node's payloads from replies/.
BASE_CONFIG = (
    "model='tiny-llama' seqlen=64 calib-samples=4 eval-windows=2 resolve=false keep-replies=true"
)
UNAVAILABLE = "client error: Error: Node Unavailable"  # Flower's reply for an offline node


# ------------------------------------------------------------------ helpers
def start_federation(federation: Federation, root: Path, budgets: list[int]) -> tuple[str, list]:
    """A SuperLink and one SuperNode per budget (own text and cache); (connection, node ids)."""
    superlink_port, *runtime_ports = free_ports(1 + len(budgets))
    texts = write_private_texts(root, len(budgets))
    federation.start(
        "superlink",
        ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(superlink_port)],
    )
    federation.wait_healthy("superlink", f"http://127.0.0.1:{superlink_port}/health")
    for index, (text, budget) in enumerate(zip(texts, budgets, strict=True)):
        cache = root / f"org-{index + 1}" / "model-cache"
        node_config = f"data-path='{text}' layer-budget={budget} cache-dir='{cache}'"
        federation.start(
            f"supernode-{index + 1}",
            supernode_args(superlink_port, runtime_ports[index], node_config, ["--insecure"]),
        )
    node_ids = [
        federation.wait_for(f"supernode-{i}", r"SuperNode ID: (\d+)").group(1)
        for i in range(1, len(budgets) + 1)
    ]
    return federation.connect("loopback", superlink_port), node_ids


def start_run(federation: Federation, name: str, connection: str, run_config: str):
    """``flwr run . <connection> --stream`` in the background; its output in ``<name>.log``."""
    return federation.start(
        name,
        ["flwr", "run", ".", connection, "--stream", "--run-config", run_config],
        cwd=ROOT,
        home=federation.cli_home,
    )


def finish_run(federation: Federation, name: str, connection: str, timeout: float = 420) -> str:
    """Wait for a streamed run to end; check it completed; returns its run id."""
    try:
        federation.processes[name].wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}: still streaming after {timeout} s\n{federation.logs()}")
    log = federation.log(name)
    match = re.search(r"Successfully started run (\d+)", log)
    assert match, log[-3000:] + federation.logs()
    # `--stream` exits 0 even when the run failed: the status comes from `flwr ls`.
    status = run_status(federation, connection, match.group(1))
    assert status == "finished:completed", log[-5000:] + federation.logs()
    return match.group(1)


def run_log(federation: Federation, connection: str, run_id: str) -> str:
    """What a run that nobody streamed logged (for failure messages)."""
    shown = federation.flwr("log", run_id, connection, "--show", timeout=60)
    return f"--- flwr log {run_id}\n{(shown.stdout + shown.stderr)[-4000:]}"


def descendants(pid: int) -> list[int]:
    children, found, stack = _children_by_parent(), [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def kill_supernode(federation: Federation, name: str) -> None:
    """SIGKILL a SuperNode: its process group, and by PID whatever it started (its SuperExec
    and ClientApp processes), in case one left the group."""
    process = federation.processes[name]
    tree = descendants(process.pid)
    os.killpg(process.pid, signal.SIGKILL)  # started with start_new_session: group == pid
    for pid in tree:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    process.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in tree), tree


def serverapp_pids(federation: Federation) -> set[int]:
    """Live ``flwr-serverapp`` processes under the SuperLink.

    In Flower 1.41 a SuperLink in subprocess isolation (the default) starts a
    ``flower-superexec``, which starts one ``flwr-serverapp`` process per run.
    """
    pids = set()
    for pid in descendants(federation.processes["superlink"].pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if _alive(pid) and any(part.endswith(b"flwr-serverapp") for part in command[:2]):
            pids.add(pid)
    return pids


def check_sparse_model(model_dir: Path) -> dict[str, torch.Tensor]:
    """The saved model loads with transformers; every prunable matrix is exactly 50 % zeros."""
    from transformers import AutoModelForCausalLM

    from llm_pruning.families import num_layers, prunable_weights

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert num_layers(model) == NUM_LAYERS
    for layer in range(NUM_LAYERS):
        for name, linear in prunable_weights(model, layer).items():
            zeros = int((linear.weight == 0).sum())
            assert zeros == num_to_prune(linear.weight.numel(), 0.5), (name, zeros)
    return model.state_dict()


def layers_of(report: dict, node: str, server_round: int) -> list[int]:
    return report["clients"][node]["layers"].get(str(server_round), [])


# --------------------------------------------------------------------- tests
def test_killed_supernode_does_not_sink_the_run(federation, tmp_path):
    """SuperLink + 3 SuperNodes (budgets 2, 1, 1); the budget-2 node is SIGKILLed mid-run.

    When to kill: a ClientApp of tiny-llama replies seconds after its message arrives, so
    killing "during round 1, before the reply" by watching for round 1 would race. Instead the
    node is killed as soon as the server logs the budgets its query round collected
    ("node layer budgets", streamed by ``flwr run``), i.e. right before round 1 draws the
    layers, or as soon as the node logs that it received its train message, should the
    stream lag (its ClientApp, in the same process group, then dies with it: importing torch
    alone takes it seconds). That is deterministic: a SIGKILLed SuperNode cannot deregister,
    and the SuperLink keeps listing it online until it has missed its heartbeats (30 s apart,
    patience 2, in Flower 1.41), so round 1 still assigns it layers, and it can never reply;
    the test checks that it did not. Round 1 ends when the SuperLink declares the node
    offline (its reply becomes Flower's "Node Unavailable" error, 33-60 s after the kill) or
    at round-timeout, whichever is first; round-timeout is generous so that the live nodes'
    replies never miss it on a busy machine.

    Budgets 2 + 1 + 1 = 4 layers make round 1 give every layer to exactly one node, so the
    dead node's two layers are pending after round 1 and, since the strategy does not ask a
    node that failed the previous round again, round 2 gives one each to the two others.
    """
    connection, node_ids = start_federation(federation, tmp_path, [2, 1, 1])
    dead, alive = node_ids[0], node_ids[1:]
    output_dir = tmp_path / "runs"
    run_config = (
        f"{BASE_CONFIG} output-dir='{output_dir}' min-clients=3 num-rounds=3 round-timeout=120.0"
    )
    run = start_run(federation, "flwr-run", connection, run_config)
    deadline = time.monotonic() + 240
    while not (
        "node layer budgets" in federation.log("flwr-run")
        or "Receiving: train message" in federation.log("supernode-1")
    ):
        if run.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the run never reached round 1\n{federation.logs()}")
        time.sleep(0.2)
    kill_supernode(federation, "supernode-1")
    assert "Sending: train message" not in federation.log("supernode-1")  # it never replied

    run_id = finish_run(federation, "flwr-run", connection)
    (run_dir,) = output_dir.glob(f"*-fedspallm-{run_id}")
    assert f"FedSpaLLM run folder: {run_dir}" in federation.log("flwr-run")
    report = json.loads((run_dir / "report.json").read_text())

    # The dead node: given two layers in round 1, rejected for them, not asked again.
    lost = layers_of(report, dead, 1)
    assert len(lost) == 2, report["clients"]
    (rejected,) = report["rejected"]
    assert rejected["node"] == int(dead) and rejected["round"] == 1, rejected
    assert sorted(rejected["layers"]) == sorted(lost), rejected
    reason = rejected["reason"]
    assert reason == "no reply in time" or reason.startswith(UNAVAILABLE), reason
    assert layers_of(report, dead, 2) == [] and not report["clients"][dead]["metrics"]
    assert not list((run_dir / "replies").glob(f"node-{dead}-*"))

    # Its layers went to the two others in round 2; they pruned one layer in each round.
    assert sorted(layer for node in alive for layer in layers_of(report, node, 2)) == sorted(lost)
    covered = []
    for node in alive:
        assert [len(layers_of(report, node, r)) for r in (1, 2)] == [1, 1], report["clients"]
        covered += layers_of(report, node, 1) + layers_of(report, node, 2)
        assert len(list((run_dir / "replies").glob(f"node-{node}-part-*.safetensors"))) == 2
    assert sorted(covered) == list(range(NUM_LAYERS))
    assert "3" not in report["clients"][alive[0]]["layers"]  # round 3 had nothing left to do

    check_sparse_model(run_dir / "model")


def test_killed_serverapp_resumes_to_the_same_model(federation, tmp_path):
    """Run A uninterrupted; run B killed after its round-1 checkpoint; C resumes B: C == A.

    Two SuperNodes with a budget of 1 layer each cover 2 of tiny-llama's 4 layers per round,
    so a run takes 2 rounds. A and B run side by side on the same SuperNodes (to save time:
    nothing of A depends on B). B's ServerApp, the ``flwr-serverapp`` process the
    SuperLink's SuperExec started for it, is SIGKILLed by PID as soon as B's
    ``checkpoint/state.json`` says round 1 is complete; C is ``flwr run`` with
    ``resume-from`` = B's run folder, and must save a model bit-identical to A's.
    """
    connection, node_ids = start_federation(federation, tmp_path, [1, 1])
    output_dir = tmp_path / "runs"
    run_config = (
        f"{BASE_CONFIG} output-dir='{output_dir}' min-clients=2 num-rounds=2 round-timeout=240.0"
    )

    # B first, not streamed, so that its ServerApp is the only one when it appears.
    before = serverapp_pids(federation)
    started = federation.flwr("run", ".", connection, "--run-config", run_config)
    match = re.search(r"Successfully started run (\d+)", started.stdout + started.stderr)
    assert match, started.stdout + started.stderr + federation.logs()
    run_b = match.group(1)
    deadline = time.monotonic() + 60
    while not (new := serverapp_pids(federation) - before):
        if time.monotonic() > deadline:
            pytest.fail(f"no flwr-serverapp process for run {run_b}\n{federation.logs()}")
        time.sleep(0.1)
    (serverapp_b,) = new

    start_run(federation, "run-a", connection, run_config)

    # B's run folder appears with its first checkpoint; kill its ServerApp right then.
    state = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        states = list(output_dir.glob(f"*-fedspallm-{run_b}/checkpoint/state.json"))
        if states and json.loads(states[0].read_text())["completed_round"] >= 1:
            os.kill(serverapp_b, signal.SIGKILL)
            state = states[0]
            break
        if not _alive(serverapp_b):
            pytest.fail(f"B's ServerApp ended\n{run_log(federation, connection, run_b)}")
        time.sleep(0.1)
    if state is None:
        pytest.fail(f"B: no round-1 checkpoint\n{run_log(federation, connection, run_b)}")
    run_dir_b = state.parent.parent
    deadline = time.monotonic() + 10
    while _alive(serverapp_b) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(serverapp_b)
    # Killed after round 1 and before round 2 ended: the run is unfinished, with no model.
    assert json.loads(state.read_text())["completed_round"] == 1
    assert not (run_dir_b / "report.json").exists() and not (run_dir_b / "model").exists()
    assert run_status(federation, connection, run_b) != "finished:completed"

    start_run(federation, "run-c", connection, f"{run_config} resume-from='{run_dir_b}'")

    run_a = finish_run(federation, "run-a", connection)
    run_c = finish_run(federation, "run-c", connection)
    assert run_c not in (run_a, run_b)
    (run_dir_a,) = output_dir.glob(f"*-fedspallm-{run_a}")
    assert f"FedSpaLLM run folder: {run_dir_b}" in federation.log("run-c")
    assert not list(output_dir.glob(f"*-fedspallm-{run_c}"))  # C continued in B's folder
    report_a = json.loads((run_dir_a / "report.json").read_text())
    report_c = json.loads((run_dir_b / "report.json").read_text())
    assert report_c["run"]["id"] == int(run_c)
    assert report_a["rejected"] == report_c["rejected"] == []
    # The same layers went to the same nodes (named by their data path) in each round.
    for node in node_ids:
        assert report_c["clients"][node]["layers"] == report_a["clients"][node]["layers"]
        assert sorted(len(v) for v in report_a["clients"][node]["layers"].values()) == [1, 1]

    weights_a = check_sparse_model(run_dir_a / "model")
    weights_c = check_sparse_model(run_dir_b / "model")
    assert weights_a.keys() == weights_c.keys()
    different = [name for name in weights_a if not torch.equal(weights_a[name], weights_c[name])]
    assert different == []
