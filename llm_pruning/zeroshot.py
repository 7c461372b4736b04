"""Zero-shot accuracy with lm-evaluation-harness (the optional ``eval`` extra).

The papers score pruned models on multiple-choice suites (BoolQ, PIQA, HellaSwag, ...): each
choice's summed log-probability after the question; the highest one is the model's answer.
``lm-eval`` runs that protocol on a model held in memory here, so a pruned model is scored
without being saved and reloaded.

A task is an lm-eval task name (data from the hub: online only) or the path to a task YAML
file (data from local files: works offline). :class:`TaskSuite` resolves them once, before
any pruning, and then scores any number of models.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llm_pruning.families import num_layers
from llm_pruning.layer_store import layer_store

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'fedspallm[eval]'"
# What the report keeps of lm-eval's results, by lm-eval's own metric names.
METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")


class TaskError(ValueError):
    """lm-eval is missing, or a task cannot be found or loaded."""


def is_task_file(spec: str) -> bool:
    """Whether ``spec`` names a task YAML file rather than an lm-eval task name."""
    return spec.endswith((".yaml", ".yml")) or "/" in spec or spec.startswith(("~", "."))


def check_tasks(specs: Sequence[str]) -> None:
    """The cheap checks, before the model is loaded: lm-eval imports, task files exist."""
    _import_lm_eval()
    for spec in specs:
        if is_task_file(spec) and not Path(spec).expanduser().is_file():
            raise TaskError(f"task file {spec!r} does not exist")


def _import_lm_eval():
    try:
        # The top-level package first: a submodule still cached in sys.modules would import.
        importlib.import_module("lm_eval")
        return importlib.import_module("lm_eval.tasks")
    except ImportError as error:
        raise TaskError(
            f"zero-shot evaluation needs lm-eval, not installed: {INSTALL_HINT}"
        ) from error


class TaskSuite:
    """lm-eval tasks, resolved and their data loaded once; :meth:`evaluate` scores a model.

    Resolving builds an lm-eval ``TaskManager`` (scanning lm-eval's own task folder takes a
    while, so it is skipped when every task is a local file) whose ``include_path`` holds the
    folders of the local task files, and loads every task's documents: an unknown name, a
    malformed YAML file or data that cannot be read (or downloaded) fails here, naming the task.
    """

    def __init__(self, specs: Sequence[str]):
        check_tasks(specs)
        tasks = _import_lm_eval()
        self.specs = [
            str(Path(spec).expanduser().resolve()) if is_task_file(spec) else spec for spec in specs
        ]
        folders = sorted({str(Path(spec).parent) for spec in self.specs if is_task_file(spec)})
        self.manager = tasks.TaskManager(
            include_path=folders or None,
            include_defaults=not all(is_task_file(spec) for spec in self.specs),
        )
        for spec, given in zip(self.specs, specs, strict=True):
            if not is_task_file(spec) and spec not in self.manager.all_tasks:
                close = difflib.get_close_matches(spec, self.manager.all_tasks, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise TaskError(
                    f"unknown lm-eval task {given!r}{hint} (a local task is the path to its "
                    "YAML file)"
                )
            try:
                self.manager.load([spec])
            except Exception as error:  # noqa: BLE001 - YAML, datasets and the hub raise anything
                raise TaskError(
                    f"task {given!r} could not be loaded: {type(error).__name__}: {error}"
                ) from error

    def evaluate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int,
        device: str | torch.device,
        limit: int | None = None,
    ) -> dict[str, dict[str, float]]:
        """Accuracy per task: ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr",
        "samples"}}`` (metrics a task lacks are left out; ``samples``: documents scored).

        A lazy model is materialised whole for the duration (lm-eval runs the whole model's
        forward), so this needs the whole model in memory on ``device``; the perplexity path
        (:mod:`llm_pruning.evaluate`) still holds one decoder layer at a time.
        """
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        with materialised(model, device):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            results = simple_evaluate(
                model=lm,
                tasks=list(self.specs),
                task_manager=self.manager,
                limit=limit,
                log_samples=False,
                # Multiple-choice scoring draws nothing at random: leave the caller's global
                # generators alone (lm-eval would reseed them).
                random_seed=None,
                numpy_random_seed=None,
                torch_random_seed=None,
            )
        return _accuracies(results)


def zero_shot(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    *,
    batch_size: int,
    device: str | torch.device,
    limit: int | None = None,
) -> dict[str, dict[str, float]]:
    """Accuracy of ``model`` on lm-eval ``tasks`` (names or task YAML paths); see
    :meth:`TaskSuite.evaluate`. Scoring several models? Build one :class:`TaskSuite`."""
    suite = TaskSuite(tasks)
    return suite.evaluate(model, tokenizer, batch_size=batch_size, device=device, limit=limit)


def _accuracies(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's ``{"results": {task: {"acc,none": ...}}}`` as ``{task: {"acc": ...}}``."""
    samples = results.get("n-samples", {})
    accuracies = {}
    for task, values in results["results"].items():
        kept = {}
        for metric in METRICS:
            value = values.get(f"{metric},none")
            if isinstance(value, int | float):  # "N/A" where lm-eval has no stderr
                kept[metric] = round(float(value), 4)
        if not kept:
            continue  # a task that reports no accuracy (e.g. a generation task)
        if task in samples:
            kept["samples"] = int(samples[task]["effective"])
        accuracies[task] = kept
    return accuracies


@contextmanager
def materialised(model: PreTrainedModel, device: str | torch.device) -> Iterator[None]:
    """The whole model on ``device`` for a ``with`` block, then back on the CPU.

    The decoder layers of a lazy model are loaded from its store first, and the ones that were
    not resident before are unloaded again afterwards (pinned ones stay, as ``on_device``
    leaves them).
    """
    store = layer_store(model)
    loaded = []
    if store is not None:
        for index in range(num_layers(model)):
            if not store.is_resident(index):
                store.load(index, "cpu")
                loaded.append(index)
    try:
        model.to(device)
        yield
    finally:
        model.to("cpu")
        for index in loaded:
            store.unload(index)
