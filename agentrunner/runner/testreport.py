"""Test results as data: counts and failing tests from JUnit XML or a recognised summary line.

Both inputs come from code nobody reviewed, so parsing is bounded: the XML file is read up to a
size limit (Python's expat refuses entity-expansion bombs), at most ``MAX_FAILURES`` failures
are kept, and every message is cut to ``MAX_MESSAGE`` characters.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

MAX_XML_BYTES = 20 * 1024 * 1024
MAX_FAILURES = 50
MAX_MESSAGE = 2000


@dataclass
class Failure:
    test: str
    message: str
    kind: str = "failed"  # failed | errored


@dataclass
class TestReport:
    passed: int = 0
    failed: int = 0
    errored: int = 0
    skipped: int = 0
    source: str = ""  # junit | pytest | unittest | jest | go | cargo
    failures: list[Failure] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.errored + self.skipped

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}

    def headline(self) -> str:
        parts = [f"{n} {label}" for n, label in ((self.failed, "failed"), (self.errored, "errored"),
                 (self.passed, "passed"), (self.skipped, "skipped")) if n]  # fmt: skip
        return ", ".join(parts) or "no tests ran"

    def feedback(self, limit: int = 6000) -> str:
        """The failing tests' messages first, for the agent's next round: as many as fit in
        ``limit`` characters, then how many more there are."""
        text = f"Test results ({self.source}): {self.headline()}."
        shown = 0
        for failure in self.failures:
            entry = f"\n\n{failure.kind.upper()}: {failure.test}\n{failure.message.strip()}".rstrip()
            room = limit - len(text) - 80  # keep room for the closing line
            if room <= 200:
                break
            text += entry if len(entry) <= room else entry[: room - 1] + "…"
            shown += 1
        if shown < self.failed + self.errored:
            text += f"\n\n… and {self.failed + self.errored - shown} more failing test(s)."
        return text


def _cut(text: str | None) -> str:
    text = (text or "").strip()
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


# --- JUnit XML -------------------------------------------------------------------------------------
def from_junit(path: Path) -> TestReport | None:
    """Parse a JUnit XML report (pytest, Jest, gotestsum, Maven, cargo2junit …); None when the
    file is missing, empty, too large or not JUnit XML."""
    try:
        if not path.is_file() or path.is_symlink() or not 0 < path.stat().st_size <= MAX_XML_BYTES:
            return None
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError, ValueError):
        return None
    if root.tag not in ("testsuites", "testsuite"):
        return None
    report = TestReport(source="junit")
    for case in root.iter("testcase"):
        name = case.get("name", "?")
        classname = case.get("classname") or case.get("class") or ""
        test_id = f"{classname}::{name}" if classname else name
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errored"
                if len(report.failures) < MAX_FAILURES:
                    message = child.get("message") or ""
                    detail = child.text or ""
                    report.failures.append(
                        Failure(test_id, _cut(f"{message}\n{detail}" if detail else message), outcome)
                    )
                break
            if child.tag == "skipped":
                outcome = "skipped"
        setattr(report, outcome, getattr(report, outcome) + 1)
    return report


# --- summary lines ---------------------------------------------------------------------------------
_PYTEST_SUMMARY = re.compile(
    r"^=*\s*((?:\d+ (?:passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)(?:, )?)+)"
    r"(?: in [\d.]+s.*)?\s*=*\s*$",
    re.M,
)
_PYTEST_FAILED_LINE = re.compile(r"^(FAILED|ERROR) (\S+)(?: - (.*))?$", re.M)
_UNITTEST_RAN = re.compile(r"^Ran (\d+) tests? in [\d.]+s$", re.M)
_UNITTEST_RESULT = re.compile(r"^(OK|FAILED)(?: \(([^)]*)\))?\s*$", re.M)
_UNITTEST_FAIL = re.compile(r"^(FAIL|ERROR): (\S+) \(([^)]+)\)", re.M)
_JEST = re.compile(r"^Tests:\s+(.*?)(\d+) total\s*$", re.M)
_JEST_FAIL = re.compile(r"^\s+● (.+?)\s*$", re.M)
_GO_FAIL = re.compile(r"^\s*--- FAIL: (\S+)", re.M)
_GO_PASS = re.compile(r"^\s*--- PASS: (\S+)", re.M)
_GO_SKIP = re.compile(r"^\s*--- SKIP: (\S+)", re.M)
_GO_PKG = re.compile(r"^(ok|FAIL)\s+\S+\s", re.M)
_CARGO = re.compile(
    r"^test result: (?:ok|FAILED)\. (\d+) passed; (\d+) failed; (\d+) ignored; \d+ measured; \d+ filtered out", re.M
)
_CARGO_FAIL = re.compile(r"^test (\S+) \.\.\. FAILED$", re.M)
_CARGO_FAILURES_BLOCK = re.compile(r"(?<=\n)    (\S+)$(?=(?:\n    \S+$)*\n\ntest result:)", re.M)


def _counts(text: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for number, word in re.findall(r"(\d+) (\w+)", text):
        found[word] = found.get(word, 0) + int(number)
    return found


def from_output(output: str) -> TestReport | None:
    """Counts from the last recognised summary line of pytest, unittest, Jest, go test or cargo."""
    for parse in (_pytest, _unittest, _jest, _cargo, _go):
        report = parse(output)
        if report is not None:
            return report
    return None


def _pytest(output: str) -> TestReport | None:
    matches = list(_PYTEST_SUMMARY.finditer(output))
    if not matches:
        return None
    counts = _counts(matches[-1].group(1))
    report = TestReport(
        passed=counts.get("passed", 0) + counts.get("xpassed", 0),
        failed=counts.get("failed", 0),
        errored=counts.get("error", 0) + counts.get("errors", 0),
        skipped=counts.get("skipped", 0) + counts.get("xfailed", 0),
        source="pytest",
    )
    for kind, test, message in _PYTEST_FAILED_LINE.findall(output)[:MAX_FAILURES]:
        report.failures.append(Failure(test, _cut(message), "failed" if kind == "FAILED" else "errored"))
    return report


def _unittest(output: str) -> TestReport | None:
    ran, result = list(_UNITTEST_RAN.finditer(output)), list(_UNITTEST_RESULT.finditer(output))
    if not ran or not result:
        return None
    total = int(ran[-1].group(1))
    pairs = dict(re.findall(r"(\w+)=(\d+)", result[-1].group(2) or ""))  # failures=2, errors=1
    failed, errored, skipped = (int(pairs.get(k, 0)) for k in ("failures", "errors", "skipped"))
    report = TestReport(
        passed=max(0, total - failed - errored - skipped), failed=failed, errored=errored, skipped=skipped,
        source="unittest",
    )  # fmt: skip
    for kind, name, where in _UNITTEST_FAIL.findall(output)[:MAX_FAILURES]:
        # Python 3.11+ prints the whole id in the parentheses; older ones the class alone.
        test_id = where if where.endswith(f".{name}") else f"{where}.{name}"
        report.failures.append(Failure(test_id, "", "failed" if kind == "FAIL" else "errored"))
    return report


def _jest(output: str) -> TestReport | None:
    matches = list(_JEST.finditer(output))
    if not matches:
        return None
    counts = _counts(matches[-1].group(1))
    report = TestReport(
        passed=counts.get("passed", 0), failed=counts.get("failed", 0),
        skipped=counts.get("skipped", 0) + counts.get("todo", 0), source="jest",
    )  # fmt: skip
    for name in _JEST_FAIL.findall(output)[:MAX_FAILURES]:
        report.failures.append(Failure(name, ""))
    return report


def _cargo(output: str) -> TestReport | None:
    matches = _CARGO.findall(output)
    if not matches:
        return None
    report = TestReport(source="cargo")
    for passed, failed, ignored in matches:  # one line per test binary
        report.passed += int(passed)
        report.failed += int(failed)
        report.skipped += int(ignored)
    # "test x ... FAILED" lines, or (with --quiet) the indented names under "failures:".
    names = _CARGO_FAIL.findall(output) or _CARGO_FAILURES_BLOCK.findall(output)
    for name in dict.fromkeys(names).keys():
        if len(report.failures) < MAX_FAILURES:
            report.failures.append(Failure(name, ""))
    return report


def _go(output: str) -> TestReport | None:
    if not _GO_PKG.search(output):
        return None
    failed = _GO_FAIL.findall(output)
    report = TestReport(
        passed=len(_GO_PASS.findall(output)), failed=len(failed), skipped=len(_GO_SKIP.findall(output)), source="go"
    )
    report.failures = [Failure(name, "") for name in failed[:MAX_FAILURES]]
    return report


def parse(*, junit_path: Path | None, output: str) -> TestReport | None:
    """JUnit XML when the command wrote it, else the output's summary line, else None."""
    if junit_path is not None:
        report = from_junit(junit_path)
        if report is not None:
            return report
    return from_output(output)
