"""A pytest plugin for test runs with a time limit (`make gpu-test`): a wall-clock budget, and a JSON record
of the outcomes written as the run goes.

  python -m pytest -p bench.testrun --run-budget-s 420 --run-json results/gpu-tests.json tests

--run-budget-s: a test that would start after the budget is spent is skipped (reason "time budget ..."), so
the run ends on its own, with its summary and its JSON, instead of being killed. Under pytest-xdist every
worker keeps the controller's deadline.
--run-json: {"budget_s", "started", "complete", "exitstatus", "counts": {outcome: tests}, "tests": [{"id",
"outcome", "duration_s", "reason"?}]}, written atomically after a test (at most every WRITE_EVERY_S seconds,
and after every failure) and at the end; "complete" is false until the session has finished.
"""

from __future__ import annotations

import collections
import datetime
import json
import time
from pathlib import Path

import pytest

BUDGET = "time budget"  # how the reason of a test the budget skipped begins
WRITE_EVERY_S = 2.0


def pytest_addoption(parser):
    group = parser.getgroup("testrun", "time-limited runs (bench.testrun)")
    group.addoption("--run-budget-s", type=float, help="skip the tests that would start after this many seconds")
    group.addoption("--run-json", type=Path, help="write the outcomes to this JSON file as the run goes")


def pytest_configure(config):
    budget = config.getoption("run_budget_s")
    if budget is not None and not budget >= 0:
        raise pytest.UsageError(f"--run-budget-s: expected seconds >= 0, got {budget}")
    worker = getattr(config, "workerinput", None)
    if worker is not None:  # an xdist worker: the controller's deadline, and the controller writes the JSON
        plugin = TestRun(worker.get("run_deadline"), budget, None)
    else:
        deadline = None if budget is None else time.time() + budget
        plugin = TestRun(deadline, budget, config.getoption("run_json"))
    config.pluginmanager.register(plugin, "bench-testrun")


class TestRun:
    __test__ = False  # not a test class

    def __init__(self, deadline: float | None, budget: float | None, path: Path | None):
        self.deadline, self.budget, self.path = deadline, budget, path
        self.started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.tests: dict[str, dict] = {}
        self.written = 0.0

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node):
        """xdist controller: hand the deadline to each worker."""
        node.workerinput["run_deadline"] = self.deadline

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        if self.deadline is not None and time.time() >= self.deadline:
            pytest.skip(f"{BUDGET} of {self.budget:.0f} s spent before this test started")

    def pytest_runtest_logreport(self, report):
        if self.path is None:
            return
        outcome = report.outcome if report.when == "call" else "error" if report.failed else report.outcome
        if report.when != "call" and outcome == "passed":
            return  # a passing setup or teardown adds nothing to the call's record
        entry = self.tests.setdefault(report.nodeid, {"id": report.nodeid})  # a failed teardown: "error"
        entry.update(outcome=outcome, duration_s=round(report.duration, 3))
        if report.skipped and isinstance(report.longrepr, (tuple, list)):  # (path, line, reason); a list via xdist
            entry["reason"] = report.longrepr[2].removeprefix("Skipped: ")
        if report.failed or time.monotonic() - self.written >= WRITE_EVERY_S:
            self.write(complete=False)

    def pytest_sessionfinish(self, session, exitstatus):
        if self.path is not None:
            self.write(complete=True, exitstatus=int(exitstatus))

    def write(self, complete: bool, exitstatus: int | None = None) -> None:
        from sae.atomic import atomic_write  # here, not at import: tests/conftest.py must import kernels first

        tests = list(self.tests.values())
        doc = {"budget_s": self.budget, "started": self.started, "complete": complete, "exitstatus": exitstatus,
               "counts": dict(collections.Counter(t["outcome"] for t in tests)), "tests": tests}  # fmt: skip
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1) + "\n"))
        self.written = time.monotonic()
