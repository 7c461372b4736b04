"""Shared fixtures: an isolated model cache and fresh copies of the tiny models.

The whole session writes converted models under one cache directory: a pytest temporary
directory, or ``$FEDSPALLM_TEST_CACHE`` when a developer sets it, so that the one-time
SmolLM2 GGUF conversion (about 25 s) can be reused across runs::

    FEDSPALLM_TEST_CACHE=~/.cache/fedspallm-tests python -m pytest

Tests run torch on one CPU thread (``FEDSPALLM_TEST_THREADS`` to change it): the tiny models'
matrices are far too small to gain from intra-op threads, and on a busy machine OpenMP threads
that wait for a descheduled sibling made the suite several times slower (45 s -> 210 s on a
loaded 2-core box).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llm_pruning.models import load_model

# A local SuperLink that a test starts (``flwr run``) must run on this environment, not
# re-install the app's dependencies per run (an unpinned CUDA torch; README, "Two commands").
# Set here, at import, so the suite does not depend on the caller exporting it: the README's
# test command does not, and `.ci/run` runs that command. A value already set is kept.
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

ModelAndTokenizer = tuple[PreTrainedModel, PreTrainedTokenizerBase]


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point ``FEDSPALLM_CACHE`` at a per-session (or developer-chosen) directory.

    Set in ``os.environ`` itself, not with ``monkeypatch``, so that it holds for the whole
    session and for any subprocess a test starts.
    """
    reused = os.environ.get("FEDSPALLM_TEST_CACHE")
    cache = Path(reused).expanduser() if reused else tmp_path_factory.mktemp("fedspallm-cache")
    cache.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("FEDSPALLM_CACHE")
    os.environ["FEDSPALLM_CACHE"] = str(cache)
    try:
        yield cache
    finally:
        if previous is None:
            os.environ.pop("FEDSPALLM_CACHE", None)
        else:
            os.environ["FEDSPALLM_CACHE"] = previous


@pytest.fixture(scope="session", autouse=True)
def torch_threads() -> Iterator[int]:
    previous = torch.get_num_threads()
    threads = int(os.environ.get("FEDSPALLM_TEST_THREADS", "1"))
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_cache(model_cache: Path) -> Path:
    """Build both tiny models once per session (later loads take ~0.1 s)."""
    for name in ("tiny-llama", "tiny-opt"):
        load_model(name)
    return model_cache


# Tests prune models in place: each test gets its own copy, loaded from the session cache.


@pytest.fixture
def tiny_llama(tiny_cache: Path) -> ModelAndTokenizer:
    return load_model("tiny-llama")


@pytest.fixture
def tiny_opt(tiny_cache: Path) -> ModelAndTokenizer:
    return load_model("tiny-opt")


@pytest.fixture(params=["tiny-llama", "tiny-opt"])
def tiny_model(request: pytest.FixtureRequest, tiny_cache: Path) -> ModelAndTokenizer:
    """Each test using this runs once per family (LLaMA and OPT)."""
    return load_model(request.param)


@pytest.fixture(scope="session")
def smollm2_cache(model_cache: Path) -> Path:
    """Convert the built-in SmolLM2 GGUF once per session (tens of seconds, unless reused)."""
    load_model("smollm2-135m")
    return model_cache


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``--dist loadgroup``), a test module runs on one worker, so its
    module-scoped fixtures (a pruned model, a run) are built once; and every test that starts
    the local SuperLink runs on one worker, in turn: it listens on fixed ports (DESIGN §6), so
    two at once would share one SuperLink and the second test's ``flower_home`` would skip.
    """
    for item in items:
        uses_superlink = "flower_home" in getattr(item, "fixturenames", ())
        group = "local-superlink" if uses_superlink else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
