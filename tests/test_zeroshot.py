"""Zero-shot accuracy through lm-eval: a local multiple-choice task, scored by hand and by the
run; a run asking for tasks it cannot score fails before any node works."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys

import pytest
import torch
import torch.nn.functional as F

from client_app.app import app as client_app
from fedspallm_strategy.config import ConfigError, RunConfig
from llm_pruning.evaluate import perplexity
from llm_pruning.layer_store import layer_store
from llm_pruning.models import load_model
from llm_pruning.zeroshot import TaskError, TaskSuite, zero_shot
from server_app.federation import run_federation
from server_app.inprocess import InProcessGrid

# lm-eval is the `eval` extra; these tests need it (they skip without it, saying so). The
# pre-flight ones further down need it only where they say so: without it a run refuses first,
# and the tests of that refusal hide lm-eval themselves, so they run on every machine.
LM_EVAL_MISSING = "needs lm-eval (the eval extra): pip install 'fedspallm[eval]'"
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason=LM_EVAL_MISSING
)
# What a run with eval-tasks says, before any node works, when lm-eval cannot be imported.
REFUSAL = (
    r"^eval-tasks: zero-shot evaluation needs lm-eval, not installed: "
    r"pip install 'fedspallm\[eval\]'$"
)

TINY = {"model": "tiny-llama", "seqlen": 64, "calib-samples": 2, "eval-windows": 2}
QUESTIONS = [
    "The capital of France is",
    "Water boils at",
    "A list in Python is created with",
    "The opposite of hot is",
    "Two plus two equals",
    "Cats like to chase",
]
CHOICES = [
    ["Paris", "a river", "blue cheese"],
    ["ten degrees", "one hundred degrees", "noon"],
    ["brackets", "a hammer", "quiet"],
    ["cold", "warm soup", "a banana split"],
    ["four", "seventeen", "a triangle"],
    ["mice", "the moon tonight", "tax law"],
]
# The first four documents' answer is the model's own choice, the last two its least likely
# one: the model scores 4 of 6 by construction.
RIGHT = 4


@torch.no_grad()
def choice_loglikelihoods(model, tokenizer, question: str, choices: list[str]) -> list[float]:
    """Sum of log p(choice tokens | question), continuation ``" " + choice`` (lm-eval's target
    delimiter): the whole string encoded, the question's tokens cut off the front."""
    context = tokenizer(question, add_special_tokens=False).input_ids
    scores = []
    for choice in choices:
        ids = tokenizer(question + " " + choice, add_special_tokens=False).input_ids
        assert ids[: len(context)] == context  # byte-level: the question's tokens are a prefix
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # (T, V)
        logprobs = F.log_softmax(logits[:-1], dim=-1)  # position t predicts token t + 1
        scores.append(sum(logprobs[t - 1, ids[t]].item() for t in range(len(context), len(ids))))
    return scores


@pytest.fixture
def task(tmp_path, tiny_llama):
    """A task YAML over six documents whose answers are set from the dense model's own
    log-likelihoods; returns (path, hit per document for acc, and for acc_norm)."""
    pytest.importorskip("lm_eval", reason=LM_EVAL_MISSING)
    model, tokenizer = tiny_llama
    docs, hits, norm_hits = [], [], []
    for number, (question, choices) in enumerate(zip(QUESTIONS, CHOICES, strict=True)):
        scores = torch.tensor(choice_loglikelihoods(model, tokenizer, question, choices))
        normalised = scores / torch.tensor([float(len(c)) for c in choices])  # lm-eval's acc_norm
        for values in (scores, normalised):  # no near-ties that float noise could flip
            top = values.sort(descending=True).values
            assert top[0] - top[1] > 1e-3 and top[-2] - top[-1] > 1e-3
        label = int(scores.argmax()) if number < RIGHT else int(scores.argmin())
        docs.append({"question": question, "choices": choices, "label": label})
        hits.append(label == int(scores.argmax()))
        norm_hits.append(label == int(normalised.argmax()))
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    path = tmp_path / "tasks" / "tiny_mc.yaml"
    path.parent.mkdir()
    path.write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return path, hits, norm_hits


def test_accuracy_is_the_share_of_documents_whose_likeliest_choice_is_the_answer(task, tiny_llama):
    path, hits, norm_hits = task
    model, tokenizer = tiny_llama
    result = zero_shot(model, tokenizer, [str(path)], batch_size=4, device="cpu")
    scores = result["tiny_mc"]
    assert scores["samples"] == len(QUESTIONS)
    assert scores["acc"] == pytest.approx(RIGHT / len(QUESTIONS), abs=1e-4)
    assert scores["acc"] == pytest.approx(sum(hits) / len(hits), abs=1e-4)
    assert scores["acc_norm"] == pytest.approx(sum(norm_hits) / len(norm_hits), abs=1e-4)
    # The standard error of a mean of 0/1 hits: sqrt(p (1 - p) / (n - 1)).
    p, n = RIGHT / len(QUESTIONS), len(QUESTIONS)
    assert scores["acc_stderr"] == pytest.approx((p * (1 - p) / (n - 1)) ** 0.5, abs=1e-4)


def test_limit_scores_only_the_first_documents(task, tiny_llama):
    path, hits, _ = task
    model, tokenizer = tiny_llama
    scores = zero_shot(model, tokenizer, [str(path)], batch_size=2, device="cpu", limit=2)
    assert scores["tiny_mc"]["samples"] == 2
    assert scores["tiny_mc"]["acc"] == pytest.approx(sum(hits[:2]) / 2, abs=1e-4)


def test_a_lazy_model_is_scored_whole_then_back_on_disk(task, tiny_cache):
    path, _, _ = task
    eager, tokenizer = load_model("tiny-llama")
    model, _ = load_model("tiny-llama", lazy=True)
    suite = TaskSuite([str(path)])
    assert suite.evaluate(model, tokenizer, batch_size=4, device="cpu") == suite.evaluate(
        eager, tokenizer, batch_size=4, device="cpu"
    )
    assert layer_store(model).resident() == []  # the layers went back on the meta device
    tokens = torch.arange(256) % 200
    assert perplexity(model, tokens, seqlen=64) == pytest.approx(
        perplexity(eager, tokens, seqlen=64), rel=1e-5
    )


def test_a_run_reports_the_zero_shot_accuracy_of_every_model(task, tmp_path, tiny_llama, caplog):
    caplog.set_level(logging.INFO, logger="server_app")
    path, _, _ = task
    # A float wire: the server rebuilds each member's model from its replies and scores it on
    # the tasks too (under int8 each member reports its own perplexity, and no accuracy).
    exact = {"resolve": False, "payload-dtype": "float32", "eval-tasks": str(path)}
    config = RunConfig.from_mapping({**TINY, "output-dir": str(tmp_path), **exact})
    run_dir = run_federation(InProcessGrid.simulation(client_app, 2, {}), config, run_id=1)
    report = json.loads((run_dir / "report.json").read_text())
    section = report["zero-shot"]
    assert set(section) == {"dense", "global", "standalone"}
    assert section["dense"]["tiny_mc"]["acc"] == pytest.approx(RIGHT / len(QUESTIONS), abs=1e-4)
    for scores in (section["global"], *section["standalone"]["per_client"].values()):
        assert 0 <= scores["tiny_mc"]["acc"] <= 1 and scores["tiny_mc"]["samples"] == 6
    per_client = section["standalone"]["per_client"]
    assert set(per_client) == set(report["perplexity"]["standalone"]["per_client"])
    mean = sum(c["tiny_mc"]["acc"] for c in per_client.values()) / len(per_client)
    assert section["standalone"]["mean"]["tiny_mc"]["acc"] == pytest.approx(mean, abs=1e-4)
    assert "tiny_mc" in (run_dir / "model" / "README.md").read_text()  # the model card
    assert "zero-shot acc (acc_norm) of dense: tiny_mc 0.6667" in caplog.text  # the summary
    assert "zero-shot acc (acc_norm) of standalone mean: tiny_mc" in caplog.text
    # The saved global model scores as the report says.
    model, tokenizer = load_model(str(run_dir / "model"))
    again = zero_shot(model, tokenizer, [str(path)], batch_size=4, device="cpu")
    assert again["tiny_mc"] == section["global"]["tiny_mc"]


def test_without_lm_eval_a_run_with_tasks_fails_naming_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "tiny_mc.yaml"
    path.write_text("task: tiny_mc\n")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails
    config = RunConfig.from_mapping({**TINY, "output-dir": str(tmp_path), "eval-tasks": str(path)})
    grid = InProcessGrid.simulation(client_app, 2, {})
    with pytest.raises(ConfigError, match=REFUSAL):
        run_federation(grid, config, run_id=1)
    assert not grid.sent  # not even the resources query
    assert not list(tmp_path.glob("*-fedspallm-*"))


def test_without_lm_eval_a_missing_task_file_is_refused_for_lm_eval_first(tmp_path, monkeypatch):
    # lm-eval is checked before the task files: a user without the extra learns that first.
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails
    missing = tmp_path / "no-such-task.yaml"
    config = RunConfig.from_mapping(
        {**TINY, "output-dir": str(tmp_path), "eval-tasks": f"{missing}"}
    )
    grid = InProcessGrid.simulation(client_app, 2, {})
    with pytest.raises(ConfigError, match=REFUSAL):
        run_federation(grid, config, run_id=1)
    assert not grid.sent


@needs_lm_eval
def test_a_missing_task_file_fails_before_any_node_works(tmp_path):
    missing = tmp_path / "no-such-task.yaml"
    config = RunConfig.from_mapping(
        {**TINY, "output-dir": str(tmp_path), "eval-tasks": f"{missing}"}
    )
    grid = InProcessGrid.simulation(client_app, 2, {})
    with pytest.raises(ConfigError, match=r"^eval-tasks: task file .*no-such-task.yaml"):
        run_federation(grid, config, run_id=1)
    assert not grid.sent


def test_a_task_file_whose_data_is_missing_fails_before_any_node_works(task, tmp_path):
    path, _, _ = task
    (tmp_path / "docs.jsonl").unlink()
    config = RunConfig.from_mapping({**TINY, "output-dir": str(tmp_path), "eval-tasks": str(path)})
    grid = InProcessGrid.simulation(client_app, 2, {})
    with pytest.raises(
        ConfigError, match=r"^eval-tasks: task .*tiny_mc.yaml.* could not be loaded"
    ):
        run_federation(grid, config, run_id=1)
    assert not grid.sent


@needs_lm_eval
def test_an_unknown_task_name_fails_with_the_close_names():
    # Scans lm-eval's own task folder (some seconds); no data is loaded for a name not found.
    with pytest.raises(TaskError, match=r"unknown lm-eval task 'boolqq'; did you mean .*boolq"):
        TaskSuite(["boolqq"])


def test_eval_tasks_is_a_comma_separated_list_without_repeats():
    config = RunConfig.from_mapping({"eval-tasks": " boolq, ./my_task.yaml ,"})
    assert config.eval_tasks == ("boolq", "./my_task.yaml")
    assert RunConfig().eval_tasks == ()
    with pytest.raises(ConfigError, match="eval-tasks lists a task twice"):
        RunConfig.from_mapping({"eval-tasks": "piqa,piqa"})
