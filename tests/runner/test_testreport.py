"""Test results as data, from the real output of real test runners (and, for runners this machine
does not have, their output as they print it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agentrunner.runner import testreport
from tests.conftest import require_service, write_files

PROJECT = {
    "calc.py": "def add(a, b):\n    return a - b\n",
    "test_calc.py": (
        "import unittest\n\nfrom calc import add\n\n\n"
        "class CalcTest(unittest.TestCase):\n"
        "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n\n"
        "    def test_zero(self):\n        self.assertEqual(add(0, 0), 0)\n\n"
        "    @unittest.skip('later')\n    def test_later(self):\n        pass\n\n"
        "    def test_error(self):\n        raise RuntimeError('boom')\n"
    ),
}


@pytest.fixture
def project(tmp_path) -> Path:
    write_files(tmp_path, PROJECT)
    return tmp_path


def _run(cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "DJANGO"))}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120)
    return proc.stdout + proc.stderr


def test_pytest_summary_line_and_failing_ids(project):
    report = testreport.from_output(
        _run(project, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-p", "no:django")
    )
    assert (report.source, report.passed, report.failed, report.skipped) == ("pytest", 1, 2, 1)
    assert {f.test for f in report.failures} == {
        "test_calc.py::CalcTest::test_add",
        "test_calc.py::CalcTest::test_error",
    }
    assert any("AssertionError" in f.message for f in report.failures)


def test_junit_xml_from_pytest_wins_over_text(project):
    xml = project / "report.xml"
    output = _run(project, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:django", f"--junitxml={xml}")
    report = testreport.parse(junit_path=xml, output=output)
    assert (report.source, report.passed, report.failed, report.skipped) == ("junit", 1, 2, 1)
    assert "test_calc.CalcTest::test_add" in {f.test for f in report.failures}
    failure = next(f for f in report.failures if f.test.endswith("test_add"))
    assert "-1 != 5" in failure.message
    assert "FAILED: test_calc.CalcTest::test_add" in report.feedback()


def test_unittest_summary(project):
    report = testreport.from_output(_run(project, "-m", "unittest", "-v"))
    assert (report.source, report.passed, report.failed, report.errored, report.skipped) == ("unittest", 1, 1, 1, 1)
    assert {f.test for f in report.failures} == {"test_calc.CalcTest.test_add", "test_calc.CalcTest.test_error"}


@pytest.mark.slow
def test_cargo_test_summary(tmp_path):
    require_service("cargo", shutil.which("cargo") is not None, "install Rust's cargo to test its output")
    write_files(
        tmp_path,
        {
            "Cargo.toml": '[package]\nname = "calc"\nversion = "0.1.0"\nedition = "2021"\n',
            "src/lib.rs": (
                "pub fn add(a: i32, b: i32) -> i32 { a - b }\n"
                "#[cfg(test)]\nmod tests {\n  use super::*;\n"
                "  #[test] fn adds() { assert_eq!(add(2, 3), 5); }\n"
                "  #[test] fn zero() { assert_eq!(add(0, 0), 0); }\n"
                "  #[test] #[ignore] fn later() {}\n}\n"
            ),
        },
    )
    env = {**os.environ, "CARGO_TARGET_DIR": str(tmp_path / "target"), "CARGO_NET_OFFLINE": "true"}
    proc = subprocess.run(["cargo", "test", "--quiet"], cwd=tmp_path, capture_output=True, text=True, env=env)
    report = testreport.from_output(proc.stdout + proc.stderr)
    assert (report.source, report.passed, report.failed, report.skipped) == ("cargo", 1, 1, 1)
    assert [f.test for f in report.failures] == ["tests::adds"]


JEST_OUTPUT = """\
 FAIL  src/calc.test.js
  ● add › adds two numbers

    expect(received).toBe(expected) // Object.is equality

Test Suites: 1 failed, 1 total
Tests:       1 failed, 1 skipped, 3 passed, 5 total
Snapshots:   0 total
Time:        0.512 s
"""

GO_OUTPUT = """\
=== RUN   TestAdd
--- FAIL: TestAdd (0.00s)
    calc_test.go:6: add(2, 3) = -1, want 5
=== RUN   TestZero
--- PASS: TestZero (0.00s)
=== RUN   TestLater
--- SKIP: TestLater (0.00s)
FAIL
FAIL	example.com/calc	0.002s
"""


def test_jest_and_go_test_summaries():
    jest = testreport.from_output(JEST_OUTPUT)
    assert (jest.source, jest.passed, jest.failed, jest.skipped) == ("jest", 3, 1, 1)
    assert [f.test for f in jest.failures] == ["add › adds two numbers"]
    go = testreport.from_output(GO_OUTPUT)
    assert (go.source, go.passed, go.failed, go.skipped, [f.test for f in go.failures]) == (
        "go", 1, 1, 1, ["TestAdd"]
    )  # fmt: skip


def test_hostile_reports_are_bounded(tmp_path):
    bomb = tmp_path / "bomb.xml"
    entities = "".join(f'<!ENTITY e{i} "{f"&e{i - 1};" * 10}">' for i in range(1, 12))
    bomb.write_text(f'<?xml version="1.0"?><!DOCTYPE t [<!ENTITY e0 "x">{entities}]><testsuite>&e11;</testsuite>')
    assert testreport.from_junit(bomb) is None  # expat refuses entity expansion bombs
    many = tmp_path / "many.xml"
    cases = "".join(f'<testcase name="t{i}"><failure message="{"m" * 5000}"/></testcase>' for i in range(500))
    many.write_text(f"<testsuite>{cases}</testsuite>")
    report = testreport.from_junit(many)
    assert report.failed == 500 and len(report.failures) == testreport.MAX_FAILURES
    assert max(len(f.message) for f in report.failures) <= testreport.MAX_MESSAGE
    feedback = report.feedback(limit=6000)
    assert len(feedback) <= 6000 and feedback.endswith("more failing test(s).")
    assert feedback.startswith("Test results (junit): 500 failed.")
    link = tmp_path / "link.xml"
    link.symlink_to(many)
    assert testreport.from_junit(link) is None
    assert testreport.from_output("no summary here") is None
