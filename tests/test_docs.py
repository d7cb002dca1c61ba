"""The documents point at things that exist: every test that `docs/status.md` names as checking a feature."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATUS = ROOT / "docs" / "status.md"
TEST_REF = re.compile(r"tests/(\w+\.py)(?:::(\w+))?")


def status_rows() -> list[list[str]]:
    """The feature table's body rows, as cells (header and separator rows left out)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in STATUS.read_text().splitlines() if line.startswith("| ")]
    return [r for r in rows[1:] if not set(r[0]) <= set("-: ")]


def functions_in(path: Path) -> set[str]:
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    return {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, functions)}


def missing_tests(rows: list[list[str]]) -> list[str]:
    """What the table names that does not exist, and the rows that name no test at all."""
    wrong = []
    for row in rows:
        refs = TEST_REF.findall(row[-1].replace("\\|", "|"))
        if not refs:
            wrong.append(f"row '{row[0]}' names no test")
        for file, name in refs:
            path = ROOT / "tests" / file
            if not path.is_file():
                wrong.append(f"row '{row[0]}': no file tests/{file}")
            elif name and name not in functions_in(path):
                wrong.append(f"row '{row[0]}': no test {name} in tests/{file}")
    return wrong


def test_every_test_named_in_status_exists():
    rows = status_rows()
    assert len(rows) >= 20, f"docs/status.md's table has {len(rows)} rows: was it reformatted?"
    wrong = missing_tests(rows)
    assert not wrong, "docs/status.md names tests that do not exist:\n" + "\n".join(wrong)


def test_the_walker_sees_a_renamed_test_and_a_row_without_one():
    rows = [["feature a", "works", "`tests/test_docs.py::test_no_such_test`"], ["feature b", "works", "a number"],
            ["feature c", "works", "`tests/test_nope.py`"], ["feature d", "works", "`tests/test_docs.py::status_rows`"]]
    assert missing_tests(rows) == ["row 'feature a': no test test_no_such_test in tests/test_docs.py",
                                   "row 'feature b' names no test", "row 'feature c': no file tests/test_nope.py"]
