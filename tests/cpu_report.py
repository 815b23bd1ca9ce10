"""Where the suite's CPU goes: an opt-in report per test and per file.

``LRVIZ_TEST_CPU=DIR`` (tests/conftest.py registers this plugin then): every test's own CPU (user +
system, of the pytest process: its setup, call and teardown) and that of its children reaped meanwhile
(``RUSAGE_CHILDREN``: a child's own reaped children count too, so a torchrun agent brings its ranks) is
written, one JSON line per test, to ``DIR/<pid>.jsonl`` by each process (each xdist worker); what a
process spends outside its tests (start, imports, collection; a worker's session fixtures' children
ended at its end) is written as ``(outside tests)`` (an xdist controller's own CPU only: its children
are the workers, counted by themselves). At the
end of a session the totals over every file in DIR (both runs of .ci/test share it) are printed, sorted
by file and by test. ``python tests/cpu_report.py DIR [N]`` prints them again (the N largest of each).

A child still running when its test ends (a session's warm worker) is counted when it is reaped, in the
test running then; a thread's CPU counts in whichever test it runs under.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from collections import defaultdict
from pathlib import Path

import pytest

OUTSIDE = "(outside tests)"


def _cpu() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


class CpuReport:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.out = open(folder / f"{os.getpid()}.jsonl", "a")  # noqa: SIM115  (open for the session)
        self.in_tests = [0.0, 0.0]

    def _write(self, nodeid: str, own: float, children: float) -> None:
        self.out.write(json.dumps({"test": nodeid, "own": round(own, 3), "children": round(children, 3)}) + "\n")
        self.out.flush()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem):  # noqa: ANN001, ANN201
        own0, kids0 = _cpu()
        try:
            return (yield)
        finally:
            own1, kids1 = _cpu()
            self.in_tests[0] += own1 - own0
            self.in_tests[1] += kids1 - kids0
            self._write(item.nodeid, own1 - own0, kids1 - kids0)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        own, kids = _cpu()
        # an xdist controller's children are its workers, which write their own CPU: not counted twice
        controller = session.config.pluginmanager.getplugin("dsession") is not None
        self._write(OUTSIDE, own - self.in_tests[0], 0.0 if controller else kids - self.in_tests[1])
        self.out.close()

    def pytest_terminal_summary(self, terminalreporter) -> None:  # noqa: ANN001
        terminalreporter.write_sep("=", f"CPU per file and per test (LRVIZ_TEST_CPU={self.folder})")
        terminalreporter.write_line(summary(self.folder))


def totals(folder: Path) -> dict[str, list[float]]:
    """{test id: [own, children]} summed over every process's file in ``folder``."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out[row["test"]][0] += row["own"]
            out[row["test"]][1] += row["children"]
    return out


def summary(folder: Path, top: int = 30) -> str:
    tests = totals(folder)
    files: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for test, (own, kids) in tests.items():
        f = files[test.split("::")[0]]
        f[0] += own
        f[1] += kids
        f[2] += 1 if test != OUTSIDE else 0

    def table(rows: dict, width: int) -> list[str]:
        ranked = sorted(rows.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))[:top]
        return [f"{o + c:8.1f} {o:8.1f} {c:8.1f}  {name[:width]}" for name, (o, c, *_) in ranked]

    everything = sum(o + c for o, c in tests.values())
    lines = [f"total CPU {everything:.1f} s over {len(tests) - (OUTSIDE in tests)} tests "
             f"(own {sum(o for o, _ in tests.values()):.1f} s, children {sum(c for _, c in tests.values()):.1f} s)",
             "   total      own children  file", *table(files, 100),
             "   total      own children  test", *table(tests, 140)]
    return "\n".join(lines)


def plugin_from_env(config: pytest.Config) -> None:
    """Register the report when LRVIZ_TEST_CPU names a folder (called from tests/conftest.py)."""
    folder = os.environ.get("LRVIZ_TEST_CPU")
    if folder and not config.pluginmanager.has_plugin("lrviz-cpu-report"):
        config.pluginmanager.register(CpuReport(Path(folder).resolve()), "lrviz-cpu-report")


if __name__ == "__main__":
    print(summary(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 30))
