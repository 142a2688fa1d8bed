"""Run the reliability cases and print one table: ``| case | expected | observed | pass |``.

The cases are the tests marked ``reliability``: the kill-point matrix
(``tests/test_killpoints.py``), the download faults, the hostile and corrupt
releases, the journal's edges. Each row is a test that fails when its defence is
removed. Run with ``make reliability-report``; extra arguments go to pytest.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path


def humane(name: str) -> tuple[str, str]:
    """``test_digest_mismatch_deletes_the_file[x]`` -> (``digest mismatch ...``, ``x``)."""
    base, _, param = name.partition("[")
    return base.removeprefix("test_").replace("_", " "), param.removesuffix("]")


def cell(text: str, width: int = 90) -> str:
    flat = " ".join(text.split()).replace("|", "/")
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def rows(junit: Path) -> list[tuple[str, str, str, str]]:
    """(case, expected, observed, pass) per test: pass is ``yes``, ``NO`` or ``skipped``."""
    found: list[tuple[str, str, str, str]] = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        skipped = case.find("skipped")
        props = {p.get("name"): p.get("value", "") for p in case.iter("property")}
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        passed = failure is None
        module = (case.get("classname") or "").rpartition(".")[2].removeprefix("test_")
        what, param = humane(case.get("name", ""))
        name = f"{module}: {param or what}"
        expected = props.get("expected") or props.get("doc") or what
        if skipped is not None:  # shown, never counted as a pass
            reason = (skipped.get("message") or "").splitlines()
            found.append((name, expected, "not run: " + (reason[0] if reason else ""), "skipped"))
            continue
        if passed:
            observed = props.get("observed") or "passed (the test's assertions held)"
        else:
            assert failure is not None
            observed = "FAILED: " + ((failure.get("message") or "").splitlines() or [""])[0]
        found.append((name, expected, observed, "yes" if passed else "NO"))
    return found


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        junit = Path(scratch) / "reliability.xml"
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "reliability",
            f"--junitxml={junit}",
            "-o",
            "junit_logging=no",
            "tests",
            *argv,
        ]
        run = subprocess.run(command, capture_output=True, text=True)
        if not junit.exists():
            print(run.stdout[-3000:], run.stderr[-3000:], sep="\n", file=sys.stderr)
            return 2
        table = rows(junit)
    print("| case | expected | observed | pass |")
    print("|---|---|---|---|")
    for name, expected, observed, verdict in table:
        print(f"| {cell(name, 70)} | {cell(expected, 160)} | {cell(observed, 200)} | {verdict} |")
    failed = sum(1 for row in table if row[3] == "NO")
    skipped = sum(1 for row in table if row[3] == "skipped")
    passed = len(table) - failed - skipped
    print(f"\n{len(table)} cases: {passed} passed, {failed} failed, {skipped} not run here")
    return 0 if failed == 0 and passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
