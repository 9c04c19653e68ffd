"""make_assignment.py and the autograder (pytest -m NAME).

The markers in the code pair up and match the assignment markers pytest.ini registers, and every
assignment has grading tests. For each assignment, a student copy with only that assignment blank
fails every one of its grading tests, each for the missing function (its hint in the message),
passes the grading tests of every other assignment, and still runs its entry point (train.py's demo,
or s2attn_kernel.py's) up to the first call of the missing function, which shows its hint. Generating
twice gives the same bytes, and bad markers, unknown names and a non-empty --out are refused.

The ten copies are graded by subprocesses, a few at a time (one per CPU, at most four), each
single-threaded: about a minute on 2 cores.
"""

import ast
import hashlib
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from make_assignment import find_regions, make_copy

ROOT = Path(__file__).resolve().parents[1]
REGIONS = find_regions(ROOT)                     # a bad marker fails collection, with its file:line
NAMES = sorted({r.name for r in REGIONS})
MESSAGES = {name: [r.message for r in REGIONS if r.name == name] for name in NAMES}
# Entry points that reach each assignment's code, run in the copy. train.py: the demo, small, straight
# to JMLR (no curriculum: sampling, doc_losses and rank_loss run in the first step), 2 steps should it
# not stop. s2attn_kernel.py: its demo prints the masks, then runs the kernel (interpreted).
TRAIN = ["train.py", "--demo_diseases=100", "--compare=('jmlr',)", "--curriculum=0.0", "--steps=2",
         "--batch_size=8", "--micro_batch_size=2", "--out_dir=runs/demo"]
ENTRY = {name: ["s2attn_kernel.py"] if name in ("s2attn_mask", "online_softmax") else TRAIN for name in NAMES}


def tagged_tests() -> dict[tuple[str, str], set[str]]:
    """{(test module, test function): the assignment markers on it}, read from the decorators in
    tests/*.py (`@pytest.mark.NAME` on a module-level test function; the only form used for them)."""
    tags = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                marks = {d.attr for d in node.decorator_list
                         if isinstance(d, ast.Attribute) and ast.unparse(d.value) == "pytest.mark"}
                if marks & set(NAMES):
                    tags[path.stem, node.name] = marks & set(NAMES)
    return tags


TAGGED = tagged_tests()


def tags(module: str, test_id: str) -> set[str]:
    """The assignments that a test (id as pytest reports it, parameters included) grades."""
    return TAGGED.get((module, test_id.split("[")[0]), set())


# ----------------------------------------------------------------------------------------------
# The markers, pytest.ini and the tests agree

def test_markers_are_registered_and_every_assignment_has_grading_tests(pytestconfig):
    registered = {}
    for line in pytestconfig.getini("markers"):
        name, _, description = line.partition(":")
        registered[name.strip()] = description.strip()
    assignments = {name for name, description in registered.items() if description.startswith("grades")}
    assert assignments == set(NAMES), (f"pytest.ini registers {sorted(assignments - set(NAMES))} that no "
                                       "'# assignment:' marker uses, and the code marks "
                                       f"{sorted(set(NAMES) - assignments)} that pytest.ini does not register")
    graded = {name for marks in TAGGED.values() for name in marks}
    assert graded == set(NAMES), f"assignments without a grading test: {sorted(set(NAMES) - graded)}"
    assert len(NAMES) >= 10 and len(REGIONS) >= len(NAMES)


def test_regions_lie_in_functions_after_their_docstrings():
    """Every region sits inside a function, after its docstring, so the student keeps the spec."""
    for r in REGIONS:
        tree = ast.parse((ROOT / r.path).read_text())
        owner = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.lineno < r.start <= f.end_lineno]
        assert owner, f"{r.path}:{r.start}: assignment {r.name!r} is not inside a function"
        body = owner[-1].body
        if ast.get_docstring(owner[-1]) is not None:
            assert body[0].end_lineno < r.start, f"{r.path}:{r.start}: the docstring must stay outside the region"


# ----------------------------------------------------------------------------------------------
# The generator

def file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_generating_twice_gives_identical_bytes_and_changes_only_marked_lines(tmp_path):
    make_copy(ROOT, tmp_path / "a")
    make_copy(ROOT, tmp_path / "b")
    a, b = file_hashes(tmp_path / "a"), file_hashes(tmp_path / "b")
    assert a == b, f"two generations differ in {sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))}"
    blanked = {r.path for r in REGIONS}
    for rel, digest in a.items():
        if rel not in blanked:
            assert digest == hashlib.sha256((ROOT / rel).read_bytes()).hexdigest(), f"{rel} changed in the copy"
    assert {"train.py", "tests/conftest.py", "pytest.ini", "make_assignment.py"} <= a.keys()
    assert not any(rel.startswith(("runs/", "checkpoints/", ".git/")) or "__pycache__" in rel for rel in a)
    for r in REGIONS:                                 # the markers stay, one raise between them
        lines = (tmp_path / "a" / r.path).read_text().splitlines()
        start = lines.index(f"{r.indent}# assignment: {r.name}: {r.hint}")
        assert lines[start + 1] == f'{r.indent}raise NotImplementedError("{r.message}")', lines[start + 1]
        assert lines[start + 2] == f"{r.indent}# end assignment: {r.name}", lines[start + 2]


def write_module(root: Path, lines: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "m.py").write_text("\n".join(lines) + "\n")
    return root


GOOD = ["def f(x):", '    """Doubles x."""', "    # assignment: a: return twice x", "    return 2 * x",
        "    # end assignment: a"]


@pytest.mark.parametrize("lines, message", [
    (GOOD[:4], r"m.py:3: assignment 'a' has no '# end assignment: a' after it"),
    (GOOD[:2] + GOOD[3:], r"m.py:4: '# end assignment: a' has no start marker before it"),
    (GOOD[:3] + ["    # assignment: b: nested", "    return 2 * x", "    # end assignment: b", GOOD[4]],
     r"m.py:4: assignment 'b' starts inside 'a' \(opened on line 3\)"),
    (GOOD[:4] + ["    # end assignment: b"],
     r"m.py:5: '# end assignment: b' closes assignment 'a' \(opened on line 3\)"),
    (GOOD[:2] + ["    # assignment: a", GOOD[3], GOOD[4]], r"m.py:3: malformed marker '# assignment: a'"),
    (GOOD[:4] + ["# end assignment: a"], r"m.py:5: the end marker of 'a' is not indented like its start"),
    (GOOD[:3] + GOOD[4:], r"m.py:4: assignment 'a' marks no lines"),
    (GOOD[:3] + ["    return 2 * x  # end assignment: a"], r"m.py:4: a marker must be a line of its own"),
])
def test_bad_markers_are_refused_with_file_and_line(tmp_path, lines, message):
    src = write_module(tmp_path / "src", lines)
    with pytest.raises(ValueError, match=message):
        find_regions(src)
    with pytest.raises(ValueError, match=message):
        make_copy(src, tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing may be written when the markers are bad"


def test_unknown_names_and_a_non_empty_out_are_refused(tmp_path):
    src = write_module(tmp_path / "src", GOOD)
    (src / "notes.txt").write_text("# assignment: not code, copied as it is\n")
    with pytest.raises(ValueError, match=r"unknown assignment\(s\) 'b' in --only; known: a \(m.py:3\)"):
        make_copy(src, tmp_path / "out", ["a", "b"])
    assert [r.name for r in make_copy(src, tmp_path / "out", ["a"])] == ["a"]
    blank = (tmp_path / "out" / "m.py").read_text().splitlines()
    assert blank[2:5] == [GOOD[2], '    raise NotImplementedError("a: return twice x")', GOOD[4]], blank
    assert (tmp_path / "out" / "notes.txt").read_bytes() == (src / "notes.txt").read_bytes()
    (tmp_path / "out" / "m.py").write_text("a student's work\n")
    with pytest.raises(ValueError, match="exists and is not empty: give a new directory, or remove that one first"):
        make_copy(src, tmp_path / "out")
    assert (tmp_path / "out" / "m.py").read_text() == "a student's work\n"
    with pytest.raises(ValueError, match="inside the repository"):
        make_copy(src, src / "student")
    cli = subprocess.run([sys.executable, str(ROOT / "make_assignment.py"), "--out", str(tmp_path / "cli"),
                          "--only", "nosuch"], capture_output=True, text=True, check=False)
    assert cli.returncode != 0 and "unknown assignment(s) 'nosuch'" in cli.stderr and "llama.py:" in cli.stderr
    assert not (tmp_path / "cli").exists()


def test_blanking_keeps_line_endings_and_quotes_the_hint(tmp_path):
    lines = GOOD[:2] + ['    # assignment: a: say "twice" \\ 2', GOOD[3], "    # end assignment: a", "f(1)"]
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.py").write_bytes("\r\n".join(lines).encode() + b"\r\n")
    make_copy(src, tmp_path / "out")
    blank = (tmp_path / "out" / "m.py").read_bytes()
    assert blank.count(b"\r\n") == len(lines) and b"\n" not in blank.replace(b"\r\n", b""), blank
    run = subprocess.run([sys.executable, "m.py"], cwd=tmp_path / "out", capture_output=True, text=True, check=False)
    assert 'NotImplementedError: a: say "twice" \\ 2' in run.stderr, run.stderr


# ----------------------------------------------------------------------------------------------
# Student copies: one per assignment, graded by the autograder

def grade_copy(name: str, tmp: Path) -> dict:
    """Generate the copy with `name` blank (the command line), run every assignment's grading tests
    in it (one pytest, junit report), then its entry point. Single-threaded subprocesses."""
    out = tmp / name
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    make = subprocess.run([sys.executable, str(ROOT / "make_assignment.py"), "--out", str(out), "--only", name],
                          capture_output=True, text=True, timeout=60, check=False)
    assert make.returncode == 0, make.stderr
    files = sorted({f"tests/{module}.py" for module, _ in TAGGED})
    junit = tmp / f"{name}.xml"
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", " or ".join(NAMES),
                            f"--junitxml={junit}", *files], cwd=out, env=env, capture_output=True, text=True,
                           timeout=600, check=False)
    cases = {}                                        # (test module, test id) -> (outcome, failure text)
    if junit.is_file():
        for case in ET.parse(junit).iter("testcase"):
            problems = [el for el in case if el.tag in ("failure", "error", "skipped")]
            outcome = problems[0].tag if problems else "passed"
            text = "".join(el.get("message", "") + "".join(el.itertext()) for el in problems)
            cases[case.get("classname").split(".")[-1], case.get("name")] = outcome, text
    entry = subprocess.run([sys.executable, *ENTRY[name]], cwd=out, env=env, capture_output=True, text=True,
                           timeout=300, check=False)
    return {"tests": tests, "cases": cases, "entry": entry}


@pytest.fixture(scope="module")
def graded(request, tmp_path_factory) -> dict:
    """{name: future of grade_copy(name)} for the assignments whose test below is selected, all
    started at once so that the copies are graded in parallel."""
    wanted = [item.callspec.params["name"] for item in request.session.items
              if item.originalname == "test_student_copy_fails_only_its_own_assignment"]
    tmp = tmp_path_factory.mktemp("copies")
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
    futures = {name: pool.submit(grade_copy, name, tmp) for name in wanted}
    yield futures
    pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("name", NAMES)
def test_student_copy_fails_only_its_own_assignment(graded, name):
    result = graded[name].result()
    cases, messages = result["cases"], MESSAGES[name]
    run = result["tests"]
    assert cases, f"no junit report from the grading run:\n{run.stdout[-3000:]}{run.stderr[-3000:]}"
    own = {key: value for key, value in cases.items() if name in tags(*key)}
    assert own, f"the copy ran none of {name!r}'s grading tests"
    for (module, test), (outcome, text) in own.items():
        assert outcome in ("failure", "error"), f"{module}::{test} {outcome} with {name!r} blank: it does not grade it"
        assert "NotImplementedError" in text and any(m in text for m in messages), \
            f"{module}::{test} failed, but not for the missing {name!r} (it needs something else):\n{text[-1500:]}"
    others = {key: value for key, value in cases.items() if key not in own}
    assert {n for key in others for n in tags(*key)} == set(NAMES) - {name}, \
        "the copy did not run every other assignment's grading tests"
    for (module, test), (outcome, text) in others.items():
        assert outcome == "passed", f"{module}::{test} ({outcome}) needs {name!r}, but grades another " \
                                    f"assignment: it should not be tagged so, or not depend on it\n{text[-1500:]}"
    entry, script = result["entry"], ENTRY[name][0]
    assert entry.returncode != 0, f"python {script} ran to the end with {name!r} blank"
    assert any(f"NotImplementedError: {m}" in entry.stderr for m in messages), \
        f"python {script} did not stop at the missing {name!r} with its hint:\n{entry.stderr[-3000:]}"
    if script == "train.py":
        assert "config:" in entry.stdout, f"train.py stopped before training started:\n{entry.stderr[-3000:]}"
