"""The grading tests' plumbing: the Triton interpreter, a seed, a time limit per test, and a report.

Each test grades one graded property of one assignment: it carries the assignment's marker
(pytest.ini registers them) and is worth `@pytest.mark.points(n)` points (1 without it; shared by its parametrized cases); a test
marked `harder` grades the harder variant only (make_assignment.py --harder). With GRADE_REPORT=path
one JSON line per collected test (its assignment and points), then one per outcome (with the first
line of a failure) are appended there as they happen, so a crash keeps what ran (grade.py reads it);
with GRADE_TRACE=1 the report also lists which assignments' marked lines each test executed
(tests/test_assignments.py checks that a test runs its own assignment's code and no other's).
"""

import json
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")   # before any @triton.jit runs: kernels on CPU tensors

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TEST_SECONDS = int(os.environ.get("GRADE_TEST_SECONDS", "120"))   # a student's endless loop stops here
REPORT = os.environ.get("GRADE_REPORT")


def record(entry: dict):
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(json.dumps(entry) + "\n")


def pytest_configure(config):
    config.addinivalue_line("markers", "points(n): the test is worth n points (default 1)")
    config.addinivalue_line("markers", "harder: for the harder variant only (make_assignment.py --harder)")


def assignment_of(item) -> str | None:
    """The one assignment marker on a test: the marker names whose description starts with "grades"."""
    names = {line.partition(":")[0].strip() for line in item.config.getini("markers")
             if line.partition(":")[2].strip().startswith("grades")}
    found = [m.name for m in item.iter_markers() if m.name in names]
    return found[0] if found else None


def pytest_collection_finish(session):
    """A test function's points are shared by its parametrized cases: a property counts once."""
    cases = {}
    for item in session.items:
        cases[item.path, item.originalname] = cases.get((item.path, item.originalname), 0) + 1
    for item in session.items:
        mark = item.get_closest_marker("points")
        record({"collected": item.nodeid, "test": item.name, "assignment": assignment_of(item),
                "points": (mark.args[0] if mark else 1) / cases[item.path, item.originalname]})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _timed_out(signum, frame):
    raise TimeoutError(f"the test ran longer than {TEST_SECONDS} s (an endless loop?)")


class LineTracer:
    """sys.settrace hook: the names of the assignment regions whose lines run."""

    def __init__(self):
        from make_assignment import find_regions
        self.regions = {}
        for r in find_regions(ROOT):
            self.regions.setdefault(str(ROOT / r.path), []).append(r)
        self.hit = set()

    def __call__(self, frame, event, arg):
        regions = self.regions.get(frame.f_code.co_filename)
        if not regions:
            return None

        def local(frame, event, arg):
            if event == "line":
                self.hit.update(r.name for r in regions if r.start < frame.f_lineno < r.end)
            return local
        return local


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    tracer = LineTracer() if os.environ.get("GRADE_TRACE") else None
    old = signal.signal(signal.SIGALRM, _timed_out)
    signal.alarm(TEST_SECONDS)
    if tracer:
        sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(None)
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        if tracer:
            item.user_properties.append(("ran", sorted(tracer.hit)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" or report.failed:
        message = ""
        if call.excinfo is not None:
            text = str(call.excinfo.value).strip().splitlines()
            message = f"{call.excinfo.typename}: {text[0] if text else ''}"[:300]
        record({"outcome": report.outcome, "nodeid": item.nodeid, "when": report.when, "message": message,
                **dict(item.user_properties)})
