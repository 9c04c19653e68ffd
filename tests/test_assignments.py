"""The course kit: make_assignment.py (the student copy), grade.py and assignments/grading/.

The markers, pytest.ini and make_assignment.COURSE agree, and every assignment has grading tests.
The student copy holds the blank bodies, ASSIGNMENTS.md, the public tests and final_check.py, and
none of the kit, the project's tests or benchmarks/; generating twice gives the same bytes; bad
markers, unknown names and a non-empty --out are refused; --harder blanks s2attn_mask's helpers.
Grading: the reference gets every point, and each grading test runs its own assignment's marked
code and no other's (traced); a blank copy gets none, each test failing at its own hint; every wrong
solution of assignments/solutions.py loses points and every alternative correct one gets them all;
a body that does not compile or removed markers cost only their own assignment; code outside the
markers is ignored; the command line prints the table and writes JSON.

The grading runs are subprocesses, two at a time, each single-threaded: about a minute on 2 cores.
"""

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import grade
from make_assignment import COURSE, HARDER, INSTRUCTOR_ONLY, STUDENT_FILES, find_regions, make_copy, student_files

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "assignments"))
import final_check  # noqa: E402
from solutions import CORRECT, HARDER_CORRECT, HARDER_WRONG, WRONG  # noqa: E402

REGIONS = find_regions(ROOT)                     # a bad marker fails collection, with its file:line
NAMES = sorted({r.name for r in REGIONS})
REGION_FILES = sorted({r.path for r in REGIONS})
ENV = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def grading_marks() -> dict[str, set[str]]:
    """{grading test file: the assignment markers of its tests}, read from each file's pytestmark."""
    out = {}
    for path in sorted((ROOT / grade.GRADING).glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "pytestmark":
                out[path.name] = {ast.unparse(node.value).removeprefix("pytest.mark.")}
    return out


# ----------------------------------------------------------------------------------------------
# The markers, pytest.ini, COURSE and the grading tests agree

def test_markers_are_registered_and_every_assignment_has_grading_tests(pytestconfig):
    registered = {}
    for line in pytestconfig.getini("markers"):
        name, _, description = line.partition(":")
        registered[name.strip()] = description.strip()
    assignments = {name for name, description in registered.items() if description.startswith("grades")}
    assert assignments == set(NAMES), (f"pytest.ini registers {sorted(assignments - set(NAMES))} that no "
                                       "'# assignment:' marker uses, and the code marks "
                                       f"{sorted(set(NAMES) - assignments)} that pytest.ini does not register")
    assert [a.name for a in COURSE] and {a.name for a in COURSE} == set(NAMES), "COURSE must list every assignment once"
    assert len(COURSE) == len(NAMES)
    graded = set().union(*grading_marks().values())
    assert graded == set(NAMES), f"assignments without grading tests: {sorted(set(NAMES) - graded)}"
    assert set(WRONG) == set(NAMES) and all(len(w) >= 4 for w in WRONG.values()), "each assignment needs wrong solutions"


def test_regions_lie_in_functions_after_their_docstrings():
    """Every region sits inside a function, after its docstring, so the student keeps the spec."""
    for r in REGIONS:
        tree = ast.parse((ROOT / r.path).read_text())
        owner = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.lineno < r.start <= f.end_lineno]
        assert owner, f"{r.path}:{r.start}: assignment {r.name!r} is not inside a function"
        if ast.get_docstring(owner[-1]) is not None:
            assert owner[-1].body[0].end_lineno < r.start, f"{r.path}:{r.start}: the docstring must stay outside"


# ----------------------------------------------------------------------------------------------
# The student copy

def file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_student_copy_holds_the_blanks_and_nothing_that_grades_or_answers(tmp_path):
    make_copy(ROOT, tmp_path / "a")
    make_copy(ROOT, tmp_path / "b")
    a, b = file_hashes(tmp_path / "a"), file_hashes(tmp_path / "b")
    assert a == b, f"two generations differ in {sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))}"
    added = {"ASSIGNMENTS.md", *STUDENT_FILES.values()}
    assert set(a) == set(student_files(ROOT)) | added, f"unexpected files: {sorted(set(a) ^ (set(student_files(ROOT)) | added))}"
    for rel in ("make_assignment.py", "grade.py", "tests/test_assignments.py", "tests/test_retriever.py",
                "assignments/grading/conftest.py", "assignments/solutions.py", "benchmarks/s2attn.py"):
        assert INSTRUCTOR_ONLY.match(rel) and rel not in a, f"{rel} must stay with the instructor"
    assert {"train.py", "tests/conftest.py", "tests/test_public.py", "pytest.ini", "final_check.py"} <= a.keys()
    assert not any(rel.startswith(("runs/", "checkpoints/", ".git/")) or "__pycache__" in rel for rel in a)
    for rel, digest in a.items():
        if rel not in added and rel not in REGION_FILES:
            assert digest == hashlib.sha256((ROOT / rel).read_bytes()).hexdigest(), f"{rel} changed in the copy"
    for r in REGIONS:                                 # the markers stay, one raise between them
        lines = (tmp_path / "a" / r.path).read_text().splitlines()
        start = lines.index(f"{r.indent}# assignment: {r.name}: {r.hint}")
        assert lines[start + 1] == f'{r.indent}raise NotImplementedError("{r.message}")', lines[start + 1]
        assert lines[start + 2] == f"{r.indent}# end assignment: {r.name}", lines[start + 2]
    sheet = (tmp_path / "a" / "ASSIGNMENTS.md").read_text()
    places = [sheet.index(f"| `{c.name}` |") for c in COURSE]
    assert places == sorted(places), "ASSIGNMENTS.md lists the assignments by difficulty, COURSE's order"
    for c in COURSE:
        assert f"{c.minutes} |" in sheet and all(d in sheet for d in c.details), f"{c.name}: times and details"
    assert "python final_check.py" in sheet


def test_harder_variant_blanks_the_helpers_too(tmp_path):
    regions = make_copy(ROOT, tmp_path / "hard", ["s2attn_mask"], harder=True)
    assert len(regions) == 1 + len(HARDER["s2attn_mask"]), [f"{r.path}:{r.start}" for r in regions]
    text = (tmp_path / "hard" / "s2attn_kernel.py").read_text()
    for _, function, hint in HARDER["s2attn_mask"]:
        body = text[text.index(f"def {function}("):].split("\n\n\n")[0]
        assert f"# assignment: s2attn_mask: {hint}" in body and 'raise NotImplementedError("s2attn_mask: ' in body
    compile(text, "s2attn_kernel.py", "exec")
    assert make_copy(ROOT, tmp_path / "easy", ["s2attn_mask"]) and \
        "def shifted_heads" in (tmp_path / "easy" / "s2attn_kernel.py").read_text()
    easy = (tmp_path / "easy" / "s2attn_kernel.py").read_text()
    assert easy.count("# assignment: s2attn_mask") == 1, "without --harder the helpers are given"


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


def test_final_check_verdict():
    row = lambda acc, r1: {"test": {"accuracy": acc, "recall@1": r1}}        # noqa: E731
    passed, lines = final_check.verdict({"rag": row(0.477, 0.34), "jmlr": row(0.998, 1.0)})
    assert passed and "+52.1 points" in lines[0], lines
    assert not final_check.verdict({"rag": row(0.477, 0.34), "jmlr": row(0.55, 0.5)})[0], "7 points is not enough"
    assert not final_check.verdict({"rag": row(0.3, 0.34), "jmlr": row(0.9, 0.3)})[0], "recall@1 must rise too"
    assert not final_check.verdict({"rag": row(0.3, 0.34)})[0]


# ----------------------------------------------------------------------------------------------
# Grading: submissions built from the reference with bodies replaced, graded two at a time

def submission(tmp: Path, bodies: dict[str, list[str | None]], harder: tuple[str, ...] = ()) -> Path:
    """A student copy's region files: the reference's, with each named assignment's regions holding
    the given bodies (None: the reference's, "blank": the raise)."""
    tmp.mkdir(parents=True)
    texts = {rel: (ROOT / rel).read_text() for rel in REGION_FILES}
    from make_assignment import harder_texts
    texts.update(harder_texts(ROOT, list(harder)))
    for rel, text in texts.items():
        lines = text.splitlines(keepends=True)
        regions = [r for r in find_regions(ROOT, [rel], texts) if r.name in bodies]
        for r in reversed(regions):
            body = bodies[r.name][[q for q in regions if q.name == r.name].index(r)]
            if body == "blank":
                lines[r.start:r.end - 1] = [f'{r.indent}raise NotImplementedError("{r.message}")\n']
            elif body is not None:
                lines[r.start:r.end - 1] = [f"{r.indent}{line}\n" if line else "\n" for line in body.splitlines()]
        (tmp / rel).write_text("".join(lines))
    return tmp


def batches() -> list[dict]:
    """The catalogue in as few grading runs as possible: run k holds each assignment's k-th variant."""
    variants = {n: [("wrong", k, v) for k, v in WRONG[n].items()] + [("correct", k, v) for k, v in CORRECT.get(n, {}).items()]
                for n in NAMES}
    return [{n: vs[k] for n, vs in variants.items() if k < len(vs)} for k in range(max(map(len, variants.values())))]


@pytest.fixture(scope="module")
def graded(tmp_path_factory) -> dict:
    """Every grading run of this module, started at once, two at a time."""
    tmp = tmp_path_factory.mktemp("grading")
    pool = ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)))
    jobs = {"reference": lambda: traced_reference(tmp / "reference"),
            "blank": lambda: grade.grade(submission(tmp / "blank", {n: ["blank"] * 4 for n in NAMES}), NAMES)}
    for k, batch in enumerate(batches()):
        sub = lambda k=k, batch=batch: submission(tmp / f"batch{k}", {n: v for n, (_, _, v) in batch.items()})  # noqa: E731
        jobs[f"batch{k}"] = lambda sub=sub, batch=batch: grade.grade(sub(), list(batch))
    for k, (label, bodies) in enumerate([*HARDER_WRONG.items(), *HARDER_CORRECT.items()]):
        path = tmp / f"harder{k}"
        jobs[f"harder:{label}"] = lambda path=path, bodies=bodies: grade.grade(
            submission(path, {"s2attn_mask": bodies}, ("s2attn_mask",)), ["s2attn_mask"])
    futures = {name: pool.submit(job) for name, job in jobs.items()}
    yield futures
    pool.shutdown(cancel_futures=True)


def traced_reference(work: Path) -> list[dict]:
    """The grading tests on the reference, tracing which assignments' marked lines each test runs."""
    work.mkdir(parents=True)
    grade.splice(ROOT, work, NAMES, [])
    env = {**ENV, "GRADE_TRACE": "1", "GRADE_REPORT": str(work / "report.jsonl")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not harder",
                          grade.GRADING], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert (work / "report.jsonl").is_file(), run.stdout[-3000:] + run.stderr[-3000:]
    return [json.loads(line) for line in (work / "report.jsonl").read_text().splitlines()]


def test_reference_gets_every_point_and_each_test_runs_only_its_own_assignment(graded):
    report = graded["reference"].result()
    collected = {e["collected"]: e["assignment"] for e in report if "collected" in e}
    assert {a for a in collected.values()} == set(NAMES) and None not in collected.values()
    for e in (e for e in report if "outcome" in e):
        own = collected[e["nodeid"]]
        assert e["outcome"] == "passed", f"{e['nodeid']} fails on the reference: {e['message']}"
        assert own in e["ran"], f"{e['nodeid']} grades {own!r} but never runs its marked code"
        assert set(e["ran"]) <= {own}, f"{e['nodeid']} grades {own!r} but also runs {sorted(set(e['ran']) - {own})}'s"
    assert len([e for e in report if "outcome" in e]) == len(collected), "every collected test reported once"


def test_blank_copy_gets_no_points_and_each_test_fails_at_its_own_hint(graded):
    result = graded["blank"].result()
    assert result["points"] == 0 and result["max"] > 0 and list(result["assignments"]) == grade.ORDER
    for name, a in result["assignments"].items():
        assert a["tests"] >= 4 and a["passed"] == 0, f"{name}: {a['passed']} of {a['tests']} pass with the body blank"
        hints = [r.message for r in REGIONS if r.name == name]
        for f in a["failures"]:
            assert "NotImplementedError" in f["message"] and any(h[:60] in f["message"] for h in hints), \
                f"{name}: {f['test']} failed, but not at {name!r}'s blank: {f['message']}"


@pytest.mark.parametrize("k", range(len(batches())))
def test_wrong_solutions_lose_points_and_correct_ones_get_all(graded, k):
    result = graded[f"batch{k}"].result()
    for name, (kind, label, _) in batches()[k].items():
        a = result["assignments"][name]
        assert a["max"] > 0 and a["tests"] >= 4, f"{name}: no grading tests ran: {a['failures']}"
        if kind == "wrong":
            assert a["points"] < a["max"], f"{name}: the wrong solution {label!r} gets every point"
        else:
            assert a["points"] == a["max"], f"{name}: the correct solution {label!r} loses points: {a['failures']}"


def test_harder_variant_is_graded_with_the_helpers(graded):
    easy = graded["blank"].result()["assignments"]["s2attn_mask"]
    for label in HARDER_WRONG:
        a = graded[f"harder:{label}"].result()["assignments"]["s2attn_mask"]
        assert a["points"] < a["max"], f"harder s2attn_mask: {label!r} gets every point"
    for label in HARDER_CORRECT:
        a = graded[f"harder:{label}"].result()["assignments"]["s2attn_mask"]
        assert a["points"] == a["max"] and a["tests"] > easy["tests"], \
            f"harder s2attn_mask: {label!r} loses points, or the helpers' tests did not run: {a}"


def test_broken_bodies_cost_only_their_own_and_code_outside_markers_is_ignored(tmp_path):
    sub = submission(tmp_path / "sub", {"rope": ["return (", None], "lr_schedule": [None]})
    train_text = (sub / "train.py").read_text()
    start = train_text.index("    # assignment: lr_schedule")
    (sub / "train.py").write_text(train_text[:start] + train_text[start:].replace("    # end assignment: lr_schedule\n", "", 1)
                                  + "\ndef lr_factor(step, cfg):\n    return 1.0\n")
    (sub / "jmlr.py").write_text((sub / "jmlr.py").read_text() + "\ndef rank_loss(*args, **kwargs):\n    return 0\n")
    cli = subprocess.run([sys.executable, str(ROOT / "grade.py"), str(sub), "--only", "rope", "lr_schedule", "rank_loss",
                          "--json", str(tmp_path / "g.json")], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    result = json.loads((tmp_path / "g.json").read_text())[0]["assignments"]
    assert list(result) == ["lr_schedule", "rope", "rank_loss"], list(result)
    assert result["rope"]["points"] == 0 and "llama.py:" in result["rope"]["problem"] and "compile" in result["rope"]["problem"]
    assert result["lr_schedule"]["points"] == 0 and "keep the markers" in result["lr_schedule"]["problem"]
    assert result["rank_loss"]["points"] == result["rank_loss"]["max"] > 0, "code outside the markers is not graded"
    assert "| rope | 0/" in cli.stdout and "does not compile" in cli.stdout and "| rank_loss |" in cli.stdout, cli.stdout


def test_public_tests_pass_on_the_reference_and_fail_each_at_its_own_blank(tmp_path):
    make_copy(ROOT, tmp_path / "blank")
    make_copy(ROOT, tmp_path / "solved", [])
    runs = {}
    for copy in ("blank", "solved"):
        report = tmp_path / f"{copy}.xml"
        runs[copy] = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                                     f"--junitxml={report}", "tests/test_public.py"], cwd=tmp_path / copy, env=ENV,
                                    capture_output=True, text=True, timeout=300)
    assert runs["solved"].returncode == 0, runs["solved"].stdout[-3000:]
    import xml.etree.ElementTree as ET
    cases = list(ET.parse(tmp_path / "blank.xml").iter("testcase"))
    marked = {node.name: [d.attr for d in node.decorator_list if isinstance(d, ast.Attribute)][0]
              for node in ast.parse((ROOT / "assignments/public/test_public.py").read_text()).body
              if isinstance(node, ast.FunctionDef)}
    assert set(marked.values()) == set(NAMES), "one public test per assignment, or more"
    for case in cases:
        text = "".join(el.get("message", "") + "".join(el.itertext()) for el in case)
        assert f"{marked[case.get('name')]}: " in text and "NotImplementedError" in text, \
            f"public {case.get('name')} did not fail at its own blank:\n{text[-1500:]}"
    entry = subprocess.run([sys.executable, "train.py", "--demo_diseases=100", "--compare=('jmlr',)", "--curriculum=0.0",
                            "--steps=2", "--batch_size=8", "--micro_batch_size=2", "--out_dir=runs/demo"],
                           cwd=tmp_path / "blank", env=ENV, capture_output=True, text=True, timeout=300)
    assert entry.returncode != 0 and "config:" in entry.stdout, entry.stderr[-3000:]
    assert "NotImplementedError: " in entry.stderr and any(r.message in entry.stderr for r in REGIONS), entry.stderr[-3000:]
