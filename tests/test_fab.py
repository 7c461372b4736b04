"""The Flower App Bundle (FAB) that `flwr build` packs for Flower Hub.

Builds the FAB with the real ``flwr build`` CLI (flwr writes the ``.fab`` into its working
directory, so it runs in a temporary directory and leaves nothing in the repository), opens it
as a zip and checks that it holds the app and nothing else: the app's packages, pyproject.toml,
README.md and LICENSE, but nothing from bench/ (results included), tests/ (the hostile node's
sitecustomize.py included), docker/, docs/, runs/, .ci/ or a CHANGELOG; and that it stays
within Flower Hub's limits (10 MB in all, 1 MB a file, 1000 files).

The packages are checked by top-level folder, never by module list: the modules inside them
move around. What goes in is decided by ``fab-include`` in ``[tool.flwr.app]``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The app's top-level packages; test_wheel_and_fab_ship_the_same_packages ties them to the
# wheel's package list in pyproject.toml.
APP_PACKAGES = ("llm_pruning", "fedspallm_strategy", "client_app", "server_app")
REQUIRED_FILES = ("pyproject.toml", "README.md", "LICENSE")
# `.info/CONTENT` is the manifest flwr writes into every FAB (flwr/cli/build.py).
ALLOWED_TOP_LEVEL = frozenset(APP_PACKAGES) | frozenset(REQUIRED_FILES) | {".info"}
# Named so that a failure says why; anything else outside ALLOWED_TOP_LEVEL fails too.
FORBIDDEN_TOP_LEVEL = ("bench", "tests", "docker", "docs", "runs", ".ci")

# Flower Hub's limits (flwr encodes them too: FAB_MAX_SIZE in flwr/common/constant.py for the
# FAB; MAX_TOTAL_BYTES, MAX_FILE_BYTES, MAX_FILE_COUNT in flwr/supercore/constant.py, checked
# by `flwr app publish`).
HUB_MAX_TOTAL_BYTES = 10 * 1024 * 1024
HUB_MAX_FILE_BYTES = 1 * 1024 * 1024
HUB_MAX_FILE_COUNT = 1000


def fab_problems(entries: list[tuple[str, int]], archive_bytes: int | None = None) -> list[str]:
    """Everything wrong with a FAB's contents, given as (path in the zip, uncompressed size).

    ``archive_bytes`` is the size of the .fab file itself, when there is one. An empty list
    means the FAB is fit for Flower Hub.
    """
    problems = []
    names = [name for name, _ in entries]
    for name in names:
        top = name.split("/", 1)[0]
        if top in FORBIDDEN_TOP_LEVEL or top.upper().startswith("CHANGELOG"):
            problems.append(f"{name}: {top} must stay out of the FAB")
        elif top not in ALLOWED_TOP_LEVEL:
            problems.append(f"{name}: not part of the app (allowed: {sorted(ALLOWED_TOP_LEVEL)})")
        elif "__pycache__" in name.split("/"):
            problems.append(f"{name}: bytecode cache")
    for package in APP_PACKAGES:
        if f"{package}/__init__.py" not in names:
            problems.append(f"package {package}/ missing (no {package}/__init__.py)")
    for required in REQUIRED_FILES:
        if required not in names:
            problems.append(f"{required} missing")
    files = [(name, size) for name, size in entries if not name.endswith("/")]
    if len(files) > HUB_MAX_FILE_COUNT:
        problems.append(f"{len(files)} files > {HUB_MAX_FILE_COUNT}")
    for name, size in files:
        if size > HUB_MAX_FILE_BYTES:
            problems.append(f"{name}: {size:,} bytes > {HUB_MAX_FILE_BYTES:,}")
    total = sum(size for _, size in files)
    if total > HUB_MAX_TOTAL_BYTES:
        problems.append(f"{total:,} bytes unpacked > {HUB_MAX_TOTAL_BYTES:,}")
    if archive_bytes is not None and archive_bytes > HUB_MAX_TOTAL_BYTES:
        problems.append(f"the .fab is {archive_bytes:,} bytes > {HUB_MAX_TOTAL_BYTES:,}")
    return problems


def _flwr_executable() -> str:
    """The `flwr` of the interpreter running the tests (its venv), else the one on PATH."""
    beside = Path(sys.executable).with_name("flwr")
    if beside.is_file():
        return str(beside)
    found = shutil.which("flwr")
    if found is None:
        pytest.fail("no `flwr` executable next to the interpreter or on PATH")
    return found


def _app_dir(tmp: Path) -> Path:
    """The project root, or a copy under a valid app name when the checkout's name is not one.

    `flwr build` refuses a directory whose name is not a valid app name (letters, digits and
    hyphens, starting with a letter; flwr/cli/utils.py validate_project_name). The copy skips
    what flwr would skip anyway (.venv, .git, caches, gitignored runs/).
    """
    from flwr.cli.utils import is_valid_name

    if is_valid_name(ROOT.name)[0]:
        return ROOT
    copy = tmp / "fedspallm"
    shutil.copytree(
        ROOT,
        copy,
        symlinks=True,
        ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "runs", "*.fab"),
    )
    return copy


@pytest.fixture(scope="module")
def fab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the FAB once with the real CLI; returns the path of the .fab."""
    work = tmp_path_factory.mktemp("fab-build")
    app = _app_dir(tmp_path_factory.mktemp("fab-app"))
    env = {**os.environ, "FLWR_HOME": str(work / "flwr-home")}
    before = set(ROOT.glob("*.fab"))
    result = subprocess.run(
        [_flwr_executable(), "build", "--app", str(app)],
        cwd=work,  # flwr build writes <publisher>.<name>.<version>.<hash>.fab into the cwd
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"flwr build failed:\n{result.stdout}\n{result.stderr}"
    assert set(ROOT.glob("*.fab")) == before, "flwr build left a .fab in the repository"
    built = list(work.glob("*.fab"))
    assert len(built) == 1, (built, result.stdout)
    return built[0]


def _entries(fab_path: Path) -> list[tuple[str, int]]:
    with zipfile.ZipFile(fab_path) as archive:
        return [(info.filename, info.file_size) for info in archive.infolist()]


def test_fab_holds_the_app_and_nothing_else(fab: Path) -> None:
    entries = _entries(fab)
    assert fab_problems(entries, fab.stat().st_size) == []
    tops = {name.split("/", 1)[0] for name, _ in entries}
    assert tops == ALLOWED_TOP_LEVEL, tops


def test_fab_carries_every_module_of_the_app_packages(fab: Path) -> None:
    """fab-include takes whole package folders: a module moved into a subpackage goes too."""
    names = {name for name, _ in _entries(fab)}
    on_disk = {
        path.relative_to(ROOT).as_posix()
        for package in APP_PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "__pycache__" not in path.parts
        and not path.name.startswith("test_")
        and not path.name.endswith("_test.py")  # flwr's built-in FAB exclusions
    }
    assert on_disk, "no modules found on disk"
    assert on_disk <= names, sorted(on_disk - names)


def test_fab_pyproject_declares_hub_format(fab: Path) -> None:
    with zipfile.ZipFile(fab) as archive:
        config = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
        license_text = archive.read("LICENSE").decode("utf-8")
    app = config["tool"]["flwr"]["app"]
    assert app["fab-format-version"] == 1
    assert app["flwr-version-target"]
    assert config["project"]["license"] == {"file": "LICENSE"}
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    # The run config (and so the strategy) travels with the FAB for Hub's Run button.
    assert app["config"]["strategy"]


def test_wheel_and_fab_ship_the_same_packages() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert set(config["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]) == set(
        APP_PACKAGES
    )


def test_flwr_run_accepts_the_config() -> None:
    """What `flwr run .` validates before it builds the FAB (flwr/cli/run/run.py)."""
    from flwr.cli.config_utils import load_and_validate

    config, _warnings = load_and_validate(ROOT / "pyproject.toml", check_module=True)
    assert config["tool"]["flwr"]["app"]["components"]["serverapp"] == "server_app.app:app"


def test_publish_upload_within_hub_limits() -> None:
    """`flwr app publish` uploads the source files (not the FAB) and checks these limits.

    It picks files by .gitignore and flwr's publish patterns only (fab-include does not apply),
    so bench/, tests/ and docker/ are uploaded too; they must still fit.
    """
    from flwr.cli.utils import filter_paths_for_publish

    # flwr's collect_files(ROOT), minus .venv (excluded by flwr's publish patterns anyway,
    # and tens of thousands of files to walk).
    files = {}
    for dirpath, dirnames, filenames in os.walk(ROOT, followlinks=False):
        if Path(dirpath) == ROOT and ".venv" in dirnames:
            dirnames.remove(".venv")
        for filename in filenames:
            path = Path(dirpath) / filename
            if not path.is_symlink():
                files[path.relative_to(ROOT).as_posix()] = path
    upload = filter_paths_for_publish(files)
    sizes = {name: Path(path).stat().st_size for name, path in upload.items()}
    assert len(sizes) <= HUB_MAX_FILE_COUNT, len(sizes)
    too_big = {name: size for name, size in sizes.items() if size > HUB_MAX_FILE_BYTES}
    assert not too_big, too_big
    assert sum(sizes.values()) <= HUB_MAX_TOTAL_BYTES, sum(sizes.values())


# The check itself must be able to fail.

GOOD = [
    ("pyproject.toml", 3_000),
    ("README.md", 20_000),
    ("LICENSE", 11_362),
    ("llm_pruning/__init__.py", 100),
    ("llm_pruning/pruners/sparsegpt.py", 9_000),
    ("fedspallm_strategy/__init__.py", 100),
    ("fedspallm_strategy/sub/strategy.py", 9_000),
    ("client_app/__init__.py", 100),
    ("server_app/__init__.py", 100),
    (".info/CONTENT", 5_000),
]


def test_check_passes_a_good_listing() -> None:
    assert fab_problems(GOOD, archive_bytes=50_000) == []


@pytest.mark.parametrize(
    "intruder",
    [
        "bench/results/engine_speed.json",
        "bench/scale.py",
        "tests/hostile_node/sitecustomize.py",
        "tests/conftest.py",
        "docker/make_certs.py",
        "docs/index.md",
        "runs/run-0/report.json",
        ".ci/run.py",
        "CHANGELOG.md",
        "fedspallm_report.json",
        "llm_pruning/__pycache__/models.cpython-311.pyc",
    ],
)
def test_check_catches_files_that_are_not_the_app(intruder: str) -> None:
    problems = fab_problems([*GOOD, (intruder, 100)])
    assert len(problems) == 1 and problems[0].startswith(intruder), problems


def test_check_catches_missing_parts() -> None:
    listing = [entry for entry in GOOD if entry[0] not in ("LICENSE", "server_app/__init__.py")]
    problems = fab_problems(listing)
    assert any("LICENSE" in p for p in problems), problems
    assert any("server_app" in p for p in problems), problems


def test_check_catches_hub_limits() -> None:
    assert fab_problems([*GOOD, ("llm_pruning/big.py", HUB_MAX_FILE_BYTES + 1)])
    many = [(f"llm_pruning/m{i}.py", 10) for i in range(HUB_MAX_FILE_COUNT)]
    assert any("files >" in p for p in fab_problems([*GOOD, *many]))
    heavy = [(f"llm_pruning/h{i}.py", HUB_MAX_FILE_BYTES) for i in range(11)]
    assert any("unpacked" in p for p in fab_problems([*GOOD, *heavy]))
    assert any(".fab is" in p for p in fab_problems(GOOD, archive_bytes=HUB_MAX_TOTAL_BYTES + 1))


def test_check_reads_a_real_zip(tmp_path: Path) -> None:
    """_entries sees what a zip holds: a bench file zipped in is caught."""
    fake = tmp_path / "fake.fab"
    with zipfile.ZipFile(fake, "w") as archive:
        for name, size in [*GOOD, ("bench/results/x.json", 10)]:
            archive.writestr(name, b"x" * size)
    problems = fab_problems(_entries(fake), fake.stat().st_size)
    assert [p for p in problems if p.startswith("bench/results/x.json")], problems
