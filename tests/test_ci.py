"""One test command: README.md's marked block is what `.ci/run` runs, and it runs the whole suite.

The README's test command is the ```bash block right after the line ``<!-- ci:test-command -->``;
`.ci/run` extracts that block and runs it as written (then lints), instead of spelling its own
installs and pytest line. These tests fail when the two could diverge again.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CI = ROOT / ".ci" / "run"
README = ROOT / "README.md"
MARKER = "<!-- ci:test-command -->"
PYTEST = "python -m pytest -q"


def ci_test_command(readme: Path) -> subprocess.CompletedProcess:
    """What `.ci/run` would run for ``readme`` (its own extraction, nothing installed)."""
    # `.ci/run` calls `python`: this interpreter's, whatever the caller's PATH holds.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(
        ["bash", str(CI), "--print-test-command", str(readme)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": path},
    )


def test_the_readme_has_one_marked_test_command_with_the_test_and_eval_extras_and_pytest():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert [line.strip() for line in lines].count(MARKER) == 1
    result = ci_test_command(README)
    assert result.returncode == 0, result.stderr
    command = result.stdout.strip()
    steps = [step.strip() for step in command.split("&&")]
    assert steps[-1] == PYTEST  # the whole suite, no selection: what CI runs
    assert steps.count(PYTEST) == 1 and "-n 0" not in command
    (editable,) = [step for step in steps if step.startswith("pip install -e ")]
    extras = re.fullmatch(r'pip install -e "\.\[([\w,-]+)\]"', editable)
    assert extras, editable
    wanted = set(extras.group(1).split(","))
    assert {"test", "eval"} <= wanted  # lm-eval: the zero-shot tests run, not skip
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert wanted <= set(pyproject["project"]["optional-dependencies"])
    assert steps[0].startswith("pip install torch==")  # pinned, before the project pulls one


def test_ci_runs_the_readme_command_instead_of_its_own():
    script = CI.read_text(encoding="utf-8").splitlines()
    code = [line.strip() for line in script if line.strip() and not line.strip().startswith("#")]
    # No install of the project and no pytest of its own: both come from the README.
    assert not [line for line in code if "pytest" in line or "pip install -e" in line]
    assert any(MARKER in line for line in code)  # the extraction reads the marked block
    runs = [i for i, line in enumerate(code) if line == 'bash -euo pipefail -c "$command"']
    lint = [i for i, line in enumerate(code) if line == "python -m ruff check ."]
    assert len(runs) == 1 and len(lint) == 1 and runs[0] < lint[0]  # lint after the tests
    assert code.index("set -euo pipefail") < runs[0]
    exports = [i for i, line in enumerate(code) if "FLWR_DISABLE_RUNTIME_DEPENDENCY" in line]
    assert exports and exports[0] < runs[0]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("# Tests\n\n```bash\npython -m pytest -q\n```\n", "found 0"),
        (f"{MARKER}\n```bash\na\n```\n{MARKER}\n```bash\nb\n```\n", "found 2"),
        (f"{MARKER}\n\n```bash\npython -m pytest -q\n```\n", "must open"),
        (f"{MARKER}\n```\npython -m pytest -q\n```\n", "must open"),
        (f"{MARKER}\n```bash\npython -m pytest -q\n", "not closed"),
        (f"{MARKER}\n```bash\n\n```\n", "empty"),
    ],
    ids=["no marker", "two markers", "blank line", "not bash", "not closed", "empty"],
)
def test_ci_refuses_a_readme_without_one_marked_command(tmp_path, text, why):
    readme = tmp_path / "README.md"
    readme.write_text(text, encoding="utf-8")
    result = ci_test_command(readme)
    assert result.returncode != 0 and result.stdout == ""
    assert why in result.stderr and MARKER in result.stderr


def test_ci_extracts_the_marked_block_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        f"```bash\npip install other\n```\n\n{MARKER}\n```bash\npip install x && {PYTEST}\n```\n"
        "```bash\necho later\n```\n",
        encoding="utf-8",
    )
    result = ci_test_command(readme)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"pip install x && {PYTEST}\n"
