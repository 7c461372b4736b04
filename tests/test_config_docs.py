"""docs/config.md is generated from the config's fields; these tests fail when the two disagree."""

import re
import tomllib
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from fedspallm_strategy.config import ConfigError, NodeConfig, RunConfig
from fedspallm_strategy.config.reference import (
    COMMAND,
    PAGE,
    UndocumentedField,
    allowed_values,
    main,
    render,
    rows,
    toml_literal,
)
from fedspallm_strategy.config.values import coerce

ROOT = Path(__file__).parents[1]


def _keys(cls) -> list[str]:
    return [f.name.replace("_", "-") for f in fields(cls)]


def _table_rows(page: str, heading: str) -> dict[str, list[list[str]]]:
    """key -> the cells of each row with that key, in the table under ``## heading``."""
    section = page.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    found: dict[str, list[list[str]]] = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
            found.setdefault(cells[0].strip("`"), []).append(cells)
    return found


def test_committed_page_is_current():
    assert PAGE == ROOT / "docs" / "config.md"
    assert PAGE.read_text(encoding="utf-8") == render(), f"docs/config.md is stale: run {COMMAND}"


@pytest.mark.parametrize(
    ("cls", "heading"), [(RunConfig, "Run config"), (NodeConfig, "Node config")]
)
def test_every_key_is_exactly_one_row(cls, heading):
    table = _table_rows(PAGE.read_text(encoding="utf-8"), heading)
    counts = Counter({key: len(found) for key, found in table.items()})
    wrong = {key: counts[key] for key in _keys(cls) if counts[key] != 1}
    assert not wrong, f"{heading} keys not listed exactly once (key: rows): {wrong}"
    assert set(table) == set(_keys(cls)), f"rows for no field: {set(table) - set(_keys(cls))}"


@dataclass(frozen=True)
class _Throwaway:
    # a comment-only line right above a field belongs to it
    documented: int = 1  # and so does the trailing one
    bare: str = "x"


def test_field_without_comment_raises_naming_it():
    with pytest.raises(UndocumentedField, match=r"_Throwaway\.bare") as error:
        rows(_Throwaway, {})
    assert "documented" not in str(error.value)


def test_rows_read_comments_defaults_and_allowed_values():
    @dataclass
    class Documented:
        kind: str = "a"  # which kind
        # leading note
        items: tuple[str, ...] = ("a", "b")  # several | values
        limit: float | None = None  # unset unless given

    table = {row.key: row for row in rows(Documented, {"kind": ("a", "b")})}
    assert table["kind"].allowed == "`a`, `b`" and table["kind"].default == '`"a"`'
    assert table["items"].description == "leading note several | values"
    assert (
        table["items"].default == '`"a,b"`' and table["items"].allowed == "comma-separated strings"
    )
    assert table["limit"].default == "unset" and table["limit"].allowed == "number"


def test_constant_backed_keys_list_every_allowed_value():
    """Ask the validator itself which string keys take one of a fixed set of values (its error
    lists them), independently of how reference.py finds them; each must be on the page."""
    table = _table_rows(PAGE.read_text(encoding="utf-8"), "Run config")
    discovered = {}
    for field in fields(RunConfig):
        if field.type != "str":
            continue
        key = field.name.replace("_", "-")
        try:
            RunConfig.from_mapping({key: "not-an-allowed-value"})
        except ConfigError as error:
            prefix = f"{key} must be one of "
            if str(error).startswith(prefix):
                discovered[key] = str(error)[len(prefix) :].split("; got ")[0].split(", ")
    assert discovered, "no key's validator lists its allowed values: the test looks wrong"
    assert set(discovered) == set(allowed_values(RunConfig))
    missing = {
        key: [value for value in values if f"`{value}`" not in table[key][0][3]]
        for key, values in discovered.items()
    }
    missing = {key: values for key, values in missing.items() if values}
    assert not missing, f"allowed values missing from docs/config.md (key: values): {missing}"


def test_pyproject_defaults_equal_runconfig_defaults():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    declared = pyproject["tool"]["flwr"]["app"]["config"]
    wrong = [
        f"{key}: not a RunConfig field" for key in sorted(set(declared) - set(_keys(RunConfig)))
    ]
    for field in fields(RunConfig):
        key = field.name.replace("_", "-")
        if key not in declared:
            wrong.append(f"{key}: missing from pyproject.toml")
            continue
        if coerce(key, declared[key], field.type) != field.default:
            wrong.append(f"{key}: pyproject.toml {declared[key]!r}, RunConfig {field.default!r}")
        # The page's literal is what pyproject.toml holds (a list: one comma-separated string).
        elif tomllib.loads(f"v = {toml_literal(field.default)}")["v"] != declared[key]:
            wrong.append(f"{key}: page {toml_literal(field.default)}, pyproject {declared[key]!r}")
    assert not wrong, "pyproject.toml and RunConfig disagree:\n" + "\n".join(wrong)


def test_check_flags_a_stale_page_and_writing_fixes_it(tmp_path, capsys):
    out = tmp_path / "config.md"
    assert main(["--check", "--out", str(out)]) == 1  # missing
    out.write_text(render() + "\nedited by hand\n", encoding="utf-8")
    assert main(["--check", "--out", str(out)]) == 1
    assert COMMAND in capsys.readouterr().err
    assert main(["--out", str(out)]) == 0
    assert main(["--check", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render()
