"""docs/reliability.md's fault table points at tests: every test it names exists (so each row is backed by a test
that CI runs), and every table row names at least one."""

from __future__ import annotations

import ast
import re

from tests.conftest import REPO

DOC = REPO / "docs" / "reliability.md"
TEST_REF = re.compile(r"tests/(test_\w+\.py)::(test_\w+)")


def defined_tests(module: str) -> set[str]:
    tree = ast.parse((REPO / "tests" / module).read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_test_the_reliability_table_names_exists():
    refs = TEST_REF.findall(DOC.read_text(encoding="utf-8"))
    assert len(refs) >= 20
    missing = [
        f"tests/{m}::{t}" for m, t in refs if not (REPO / "tests" / m).is_file() or t not in defined_tests(m)
    ]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"


def test_every_fault_row_names_a_test():
    rows = [
        line
        for line in DOC.read_text(encoding="utf-8").splitlines()
        if line.startswith("|")
        and not re.match(r"^\|\s*(-+|:?-+:?)\s*\|", line)
        and line.split("|")[-2].strip().lower() != "test"
    ]
    assert rows
    untested = [r[:80] for r in rows if not TEST_REF.search(r)]
    assert not untested, f"fault rows without a test: {untested}"
