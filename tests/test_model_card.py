"""The model card and fedspallm.json of model/, push-to-hub's pre-flight checks, and the
warning when the SuperLink installs runtime dependencies."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from transformers import AutoModelForCausalLM

from fedspallm_strategy.config import ConfigError, RunConfig
from server_app import app as server_app
from server_app import model_card as card_module
from server_app.model_card import (
    SPARSITY_WARNING,
    base_model,
    check_hub_access,
    model_card,
    run_file,
    write_model_files,
)

PER_MATRIX = {
    "model.layers.0.self_attn.q_proj.weight": 0.5,
    "model.layers.0.mlp.down_proj.weight": 0.53125,
}


def hand_report(**extra) -> dict:
    config = RunConfig(eval_windows=8, seqlen=512, eval_data=("python-docs", "a|b.txt"))
    return {
        "run": {"id": 7, "dir": "/runs/x", "nodes": [11, 12, 13]},
        "config": json.loads(json.dumps(config.as_dict())),  # as report.json holds it
        "sparsity": {
            "target": 0.5,
            "pattern": "unstructured",
            "overall": 0.507,
            "per_matrix": PER_MATRIX,
        },
        "perplexity": {
            "dense": {"python-docs": 15.0921, "a|b.txt": 30.5},
            "global": {"python-docs": 22.6712, "a|b.txt": 41.25},
            "standalone": {
                "per_client": {"11": {"python-docs": 23.04}, "12": {"python-docs": 23.56}},
                "mean": {"python-docs": 23.3001, "a|b.txt": 44.0},
            },
            "centralized": {"python-docs": 21.9876},
        },
        **extra,
    }


def front_matter(card: str) -> dict:
    """The card's YAML front matter, parsed by hand: ``key: value`` and ``- item`` lines."""
    lines = card.splitlines()
    assert lines[0] == "---"
    end = lines.index("---", 1)
    parsed, current = {}, None
    for line in lines[1:end]:
        if line.startswith("- "):
            parsed[current].append(line[2:])
        else:
            key, sep, value = line.partition(": ") if ": " in line else line.partition(":")
            assert sep, f"not a YAML mapping line: {line!r}"
            current = key
            parsed[key] = value if value else []
    return parsed


def table_row(card: str, first_cell: str) -> list[str]:
    (row,) = [line for line in card.splitlines() if line.startswith(f"| {first_cell} |")]
    return [cell.strip() for cell in row.strip("|").split(" | ")]


def test_card_states_the_run_and_every_perplexity():
    card = model_card(hand_report(), date="2026-12-01")
    meta = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "transformers"
    assert {"fedspallm", "pruning", "sparse", "sparsegpt", "unstructured-sparsity"} <= set(
        meta["tags"]
    )
    assert table_row(card, "strategy")[1] == "fedspallm"
    assert table_row(card, "pruner")[1] == "sparsegpt"
    assert table_row(card, "target sparsity")[1] == "50.00 %"
    assert table_row(card, "achieved sparsity")[1] == "50.70 %"
    assert table_row(card, "per matrix")[1].startswith("50.00 % to 53.12 % over 2 matrices")
    assert table_row(card, "clients")[1] == "3"
    assert table_row(card, "date")[1] == "2026-12-01"
    header = table_row(card, "eval set")
    assert header == [
        "eval set",
        "dense",
        "global (this model)",
        "standalone (mean)",
        "centralized",
    ]
    assert table_row(card, "python-docs") == [
        "python-docs",
        "15.0921",
        "22.6712",
        "23.3001",
        "21.9876",
    ]
    # A pipe in a source name is escaped, and a set centralized did not score shows a dash.
    assert table_row(card, "a\\|b.txt") == ["a\\|b.txt", "30.5000", "41.2500", "44.0000", "–"]
    assert "at most 8 evenly spaced windows of 512 tokens" in card
    assert '| `push-to-hub` | `""` |' in card and "| `eval-windows` | 8 |" in card
    assert "flwr run" not in card  # the config summary, not a command


def test_card_warns_that_sparsity_saves_nothing_in_dense_engines():
    card = model_card(hand_report(), date="2026-12-01")
    assert SPARSITY_WARNING in card
    warning = [line for line in card.splitlines() if "not compression" in line]
    assert warning and "same memory" in warning[0] and "same speed" in warning[0]
    assert "2:4" in warning[0] and "sparse" in warning[0]


def test_card_renders_zero_shot_accuracy_per_model_when_the_report_has_it():
    assert "Zero-shot" not in model_card(hand_report(), date="d")
    zero_shot = {
        "dense": {"piqa": 0.6812, "arc_easy": {"acc": 0.55, "acc_norm": 0.5}},
        "global": {"piqa": 0.6512},
        "standalone": {"per_client": {"11": {"piqa": 0.6}}, "mean": {"piqa": 0.6401}},
    }
    card = model_card(hand_report(**{"zero-shot": zero_shot}), date="d")
    assert "## Zero-shot accuracy" in card
    assert table_row(card, "task") == ["task", "dense", "global", "standalone"]
    assert table_row(card, "piqa") == ["piqa", "0.6812", "0.6512", "0.6401"]
    assert table_row(card, "arc_easy") == ["arc_easy", "0.5500 (0.5000)", "–", "–"]


def test_card_of_a_random_or_local_model_names_no_hub_base_model():
    for spec in ("tiny-llama", "/models/llama", "./m.gguf"):
        report = hand_report()
        report["config"]["model"] = spec
        assert "base_model" not in front_matter(model_card(report, date="d"))
        assert base_model(spec) is None
    assert base_model("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    report = hand_report()
    report["sparsity"]["pattern"] = report["config"]["pattern"] = "2:4"
    assert "2-4-sparsity" in front_matter(model_card(report, date="d"))["tags"]


def test_fedspallm_json_holds_config_and_per_matrix_sparsity_and_round_trips(tmp_path):
    report = hand_report()
    write_model_files(tmp_path, report, date="2026-12-01")
    loaded = json.loads((tmp_path / "fedspallm.json").read_text())
    assert loaded == run_file(report)
    assert loaded["config"] == report["config"]
    assert loaded["sparsity"]["per_matrix"] == PER_MATRIX
    assert (tmp_path / "README.md").read_text() == model_card(report, date="2026-12-01")


def test_a_run_writes_the_card_and_json_beside_a_loadable_model(tmp_path):
    from client_app.app import app as client_app
    from server_app.federation import run_federation
    from server_app.inprocess import InProcessGrid

    config = RunConfig.from_mapping(
        {
            "model": "tiny-llama",
            "seqlen": 64,
            "calib-samples": 2,
            "eval-windows": 1,
            "resolve": False,
            "output-dir": str(tmp_path),
        }
    )
    run_dir = run_federation(InProcessGrid.simulation(client_app, 2, {}), config, run_id=5)
    report = json.loads((run_dir / "report.json").read_text())
    card = (run_dir / "model" / "README.md").read_text()
    assert table_row(card, "clients")[1] == "2"
    assert table_row(card, "achieved sparsity")[1] == f"{100 * report['sparsity']['overall']:.2f} %"
    dense = report["perplexity"]["dense"]["python-docs"]
    assert table_row(card, "python-docs")[1] == f"{dense:.4f}"
    saved = json.loads((run_dir / "model" / "fedspallm.json").read_text())
    assert saved == {"config": report["config"], "sparsity": report["sparsity"]}
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert model.config.model_type == "llama"


# ------------------------------------------------------------------------ push-to-hub


@pytest.mark.parametrize("repo", ["owner/name", "my-org/llama_3.2-sparse"])
def test_push_to_hub_takes_a_repo_id(repo):
    assert RunConfig.from_mapping({"push-to-hub": repo}).push_to_hub == repo
    assert RunConfig().push_to_hub == ""


@pytest.mark.parametrize("repo", ["name", "a/b/c", "/abs/path", "owner/", "-x/y", "o w/n"])
def test_push_to_hub_refuses_what_is_not_owner_slash_name(repo):
    with pytest.raises(ConfigError, match="push-to-hub"):
        RunConfig.from_mapping({"push-to-hub": repo})


def test_push_to_hub_is_not_sent_to_clients():
    from fedspallm_strategy.wire.protocol import CLIENT_KEYS

    assert "push-to-hub" not in CLIENT_KEYS


def test_push_to_hub_without_a_token_fails_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(ConfigError, match="push-to-hub 'o/n': no Hugging Face token"):
        check_hub_access("o/n")
    # Through the run: it fails in the pre-flight checks, before the model is even loaded.
    from server_app.federation import run_federation

    loaded = []
    monkeypatch.setattr("server_app.federation.load_run_model", lambda *a: loaded.append(a))
    config = RunConfig.from_mapping({"push-to-hub": "o/n", "output-dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="no Hugging Face token"):
        run_federation(grid=None, config=config, run_id=1)
    assert loaded == []


def test_push_to_hub_with_the_hub_unreachable_fails_fast_and_says_so(monkeypatch):
    import time

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_not_a_real_token")
    # No network here; where there is one, point the endpoint at a port nobody listens on.
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(ConfigError, match="push-to-hub 'o/n': the hub at .* is unreachable"):
        check_hub_access("o/n", timeout=5)
    assert time.monotonic() - start < 10


def test_push_to_hub_against_the_real_hub_fails_fast_here_or_refuses_a_fake_token(monkeypatch):
    """Offline (this machine): unreachable. Online: the made-up token is refused. Either way
    a ConfigError naming the key, within the timeout."""
    import time

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_not_a_real_token")
    start = time.monotonic()
    with pytest.raises(ConfigError, match="push-to-hub 'o/n': .*(unreachable|refused)"):
        check_hub_access("o/n", timeout=5)
    assert time.monotonic() - start < 15


def test_push_to_hub_with_hf_hub_offline_set_fails_naming_it(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_token")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        check_hub_access("o/n")


def test_push_to_hub_with_a_refused_token_names_the_http_status(monkeypatch):
    class Refusing:
        status_code = 401

    class Session:
        def get(self, url, headers, timeout):
            assert url.endswith("/api/whoami-v2") and timeout == 3
            assert headers["authorization"] == "Bearer hf_token"
            return Refusing()

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_token")
    monkeypatch.setattr(card_module, "_hub_session", Session)
    with pytest.raises(ConfigError, match="refused the token .HTTP 401"):
        check_hub_access("o/n", timeout=3)


# ------------------------------------------------- runtime dependency installation warning


@pytest.fixture
def clean_process(monkeypatch, tmp_path):
    """A process that Flower did not install anything for, with FLWR_HOME in ``tmp_path``."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.delenv("VIRTUAL_ENV", raising=False)
    monkeypatch.setattr(sys, "argv", ["flwr-serverapp", "--insecure"])
    monkeypatch.setattr(sys, "prefix", "/usr")
    monkeypatch.setattr(sys, "path", ["/usr/lib/python3.11/site-packages"])
    return tmp_path / "flwr-home" / "runtime-envs"


def test_no_warning_where_flower_installed_nothing(clean_process, caplog):
    assert server_app.runtime_dependency_install() is None
    with caplog.at_level(logging.WARNING):
        server_app.warn_if_runtime_install()
    assert not caplog.records


def test_the_install_flag_of_the_superexec_is_detected(clean_process, monkeypatch):
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--allow-runtime-dependency-installation"])
    assert "--allow-runtime-dependency-installation" in server_app.runtime_dependency_install()


@pytest.mark.parametrize("where", ["VIRTUAL_ENV", "sys.prefix", "sys.path"])
def test_a_per_run_environment_is_detected_and_warned_about(
    clean_process, monkeypatch, caplog, where
):
    env = clean_process / "42"  # <FLWR_HOME>/runtime-envs/<run id>
    if where == "VIRTUAL_ENV":
        monkeypatch.setenv("VIRTUAL_ENV", str(env))
    elif where == "sys.prefix":
        monkeypatch.setattr(sys, "prefix", str(env))
    else:
        monkeypatch.setattr(sys, "path", [str(env / "lib" / "python3.11" / "site-packages")])
    assert server_app.runtime_dependency_install() == f"it runs on the per-run environment {env}"
    with caplog.at_level(logging.WARNING):
        server_app.warn_if_runtime_install()
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run" in record.getMessage()


def test_an_environment_under_another_flower_home_is_not_this_ones(clean_process, monkeypatch):
    monkeypatch.setenv("VIRTUAL_ENV", "/elsewhere/runtime-envs/42")
    assert server_app.runtime_dependency_install() is None
