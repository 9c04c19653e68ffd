"""grade.py: grade student copies with the instructor's tests, in a clean copy of the reference.

A student copy (make_assignment.py) holds the blank bodies between their markers. To grade one,
this script copies the reference repository (this one) into a temporary directory, replaces the
lines between each assignment's markers with the lines between the same markers in the
submission, and runs assignments/grading/ there: the student's code, the instructor's tests. Nothing
else of the submission is used, so editing a test, a helper outside the markers or pytest.ini
changes nothing. A body that does not compile, or markers that were removed or added, cost that
assignment its points and no other's. Each grading test is one graded property worth its points
(`@pytest.mark.points`, default 1): partial credit. One pytest process per submission, one thread
each; about 7.5 s a submission on 2 quiet CPU cores.

Run:
    python grade.py ../course                       # one copy: a table per assignment, grades.json
    python grade.py submissions/                     # every copy in a folder, two at a time
    python grade.py ../course --only rope maxsim     # only these assignments
    python grade.py ../course --harder               # the harder variant (auto-detected too)
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cli
from make_assignment import COURSE, HARDER, Region, find_regions, harder_texts, repository_files

ROOT = Path(__file__).resolve().parent
GRADING = "assignments/grading"
ORDER = [a.name for a in COURSE]


# ----------------------------------------------------------------------------------------------
# Splicing a submission into the reference

def is_submission(path: Path) -> bool:
    return (path / "train.py").is_file() and (path / "llama.py").is_file()


def find_submissions(paths: list[Path]) -> list[Path]:
    """Each path is a student copy, or a folder whose subfolders are."""
    found = []
    for path in paths:
        if is_submission(path):
            found.append(path)
            continue
        inner = sorted(p for p in path.iterdir() if p.is_dir() and is_submission(p)) if path.is_dir() else []
        if not inner:
            raise ValueError(f"{path}: neither a student copy (train.py, llama.py, ...) nor a folder of them")
        found += inner
    return found


def regions_of(root: Path, rel: str, names: list[str], texts: dict[str, str] | None = None) -> dict[str, list[Region]]:
    """{name: its regions in file `rel`, in order} for the names given (a submission's file is read
    leniently: one body that does not tokenize must not hide the others)."""
    out = {name: [] for name in names}
    for r in find_regions(root, [rel], texts, lenient=root != ROOT):
        if r.name in out:
            out[r.name].append(r)
    return out


def wants_harder(submission: Path, names: list[str]) -> list[str]:
    """The HARDER assignments whose extra bodies the submission has marked (a --harder copy)."""
    out = []
    for name in names:
        for rel in {rel for rel, _, _ in HARDER.get(name, ())}:
            try:
                theirs = regions_of(submission, rel, [name])[name] if (submission / rel).is_file() else []
            except ValueError:
                continue
            if len(theirs) > len(regions_of(ROOT, rel, [name])[name]):
                out.append(name)
    return sorted(set(out))


def splice_file(ref_text: str, ref: dict[str, list[Region]], sub_lines: list[str], sub: dict[str, list[Region]],
                take: set[str], problems: dict[str, str]) -> str:
    """ref_text with the regions of the names in `take` holding the submission's lines, and those of
    the names in `problems` a raise that says what went wrong."""
    lines = ref_text.splitlines(keepends=True)
    edits = []
    for name, regions in ref.items():
        for i, r in enumerate(regions):
            if name in problems:
                edits.append((r, [f"{r.indent}raise NotImplementedError({json.dumps(f'{name}: {problems[name]}')})\n"]))
            elif name in take:
                s = sub[name][i]
                edits.append((r, sub_lines[s.start:s.end - 1]))
    for r, body in sorted(edits, key=lambda e: e[0].start, reverse=True):
        lines[r.start:r.end - 1] = body
    return "".join(lines)


def splice(submission: Path, work: Path, names: list[str], harder: list[str]) -> dict[str, str]:
    """Write the reference into `work` with the named assignments' bodies taken from `submission`.
    -> {name: why its code could not be used}; such an assignment's bodies raise that message."""
    sources = harder_texts(ROOT, harder)
    for rel in repository_files(ROOT):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / rel, work / rel)
    problems = {}
    ref_files = sorted({r.path for r in find_regions(ROOT, None, sources) if r.name in names})
    for rel in ref_files:
        ref_text = sources.get(rel) or (ROOT / rel).read_text()
        ref = regions_of(ROOT, rel, names, sources)
        ref = {name: regions for name, regions in ref.items() if regions}
        sub, sub_lines = {}, []
        try:
            sub_lines = (submission / rel).read_text().splitlines(keepends=True)
            sub = regions_of(submission, rel, list(ref))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            problems.update({name: f"{rel}: cannot read its markers ({e}); keep the markers as they came" for name in ref})
        for name, regions in ref.items():
            if name not in problems and len(sub.get(name, [])) != len(regions):
                problems[name] = (f"{rel}: {len(sub.get(name, []))} marked bodies of {name}, the reference has "
                                  f"{len(regions)}: keep the markers as they came")
        take = {name for name in ref if name not in problems}
        for name in sorted(take):                               # a body that does not compile costs only its own
            for s in sub[name]:
                try:
                    compile(f"def body():\n{s.indent}pass\n" + "".join(sub_lines[s.start:s.end - 1]), rel, "exec")
                except SyntaxError as e:
                    problems[name] = f"{rel}:{s.start + (e.lineno or 2) - 2}: the code does not compile ({e.msg})"
                    break
        take -= set(problems)
        (work / rel).write_text(splice_file(ref_text, ref, sub_lines, sub, take,
                                            {n: p for n, p in problems.items() if n in ref}))
    return problems


# ----------------------------------------------------------------------------------------------
# Running the grading tests and scoring

def run_grading(work: Path, names: list[str], harder: list[str], timeout: int) -> tuple[list[dict], str]:
    """pytest on the grading tests of `names` in `work` -> (its JSON-lines report, its output's tail)."""
    report = work / "grade_report.jsonl"
    select = f"({' or '.join(names)}) and (not harder{''.join(f' or {n}' for n in harder)})"
    env = {**os.environ, "GRADE_REPORT": str(report), "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", select, GRADING]
    try:
        run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        tail = (run.stdout + run.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        tail = f"the grading run passed its {timeout} s limit and was stopped"
    lines = report.read_text().splitlines() if report.is_file() else []
    return [json.loads(line) for line in lines], tail


def score(report: list[dict], names: list[str], problems: dict[str, str], tail: str) -> dict:
    """{assignment: {points, max, passed, tests, failures: [{test, message}]}} from the report."""
    tests = {e["collected"]: e for e in report if "collected" in e}
    outcomes = {}
    for e in report:
        if "outcome" in e:
            outcomes.setdefault(e["nodeid"], []).append(e)
    names = sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
    out = {name: {"points": 0, "max": 0, "passed": 0, "tests": 0, "failures": []} for name in names}
    for nodeid, t in tests.items():
        a = out.get(t["assignment"])
        if a is None:
            continue
        a["max"] += t["points"]
        a["tests"] += 1
        runs = outcomes.get(nodeid, [])
        if runs and all(e["outcome"] == "passed" for e in runs):
            a["points"] += t["points"]
            a["passed"] += 1
        else:
            failed = [e for e in runs if e["outcome"] != "passed"]
            message = failed[0]["message"] if failed else f"did not run: {tail.strip().splitlines()[-1] if tail.strip() else '?'}"
            a["failures"].append({"test": t["test"], "message": message})
    for name, a in out.items():
        a["points"], a["max"] = round(a["points"], 2), round(a["max"], 2)
        if a["tests"] == 0:
            a["failures"].append({"test": "-", "message": f"no grading test ran: {tail.strip()[-300:]}"})
        if name in problems:
            a["problem"] = problems[name]
    return out


def grade(submission: Path, names: list[str], harder: list[str] | None = None, timeout: int = 600) -> dict:
    """Grade one student copy -> {"submission", "harder", "seconds", "points", "max", "assignments"}."""
    start = time.time()
    harder = wants_harder(submission, names) if harder is None else harder
    with tempfile.TemporaryDirectory(prefix="grade-") as tmp:
        work = Path(tmp)
        problems = splice(submission, work, names, harder)
        report, tail = run_grading(work, names, harder, timeout)
    scores = score(report, names, problems, tail)
    return {"submission": str(submission), "harder": harder, "seconds": round(time.time() - start, 1),
            "points": round(sum(a["points"] for a in scores.values()), 2),
            "max": round(sum(a["max"] for a in scores.values()), 2),
            "assignments": scores}


def table(result: dict, width: int = 110) -> str:
    """A Markdown table of one submission's grades, one row per assignment, in ORDER."""
    rows = [f"{result['submission']}: {result['points']:g}/{result['max']:g} points ({result['seconds']:.0f} s)",
            "| assignment | tests passed | points | what broke |", "|---|---|---|---|"]
    for name, a in result["assignments"].items():
        broke = [a["problem"]] if "problem" in a else [f"{f['test']}: {f['message']}" for f in a["failures"]]
        cell = broke[0][:width] + (f" (+{len(broke) - 1} more)" if len(broke) > 1 else "") if broke else ""
        rows.append(f"| {name} | {a['passed']}/{a['tests']} | {a['points']:g}/{a['max']:g} | {cell.replace('|', '/')} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="Grade student copies with the instructor's tests.",
                                epilog="Example: python grade.py submissions/ --json grades.json")
    p.add_argument("paths", nargs="+", type=Path, help="student copies, or folders of them")
    p.add_argument("--only", nargs="+", metavar="NAME", help="grade only these assignments (default: all)")
    p.add_argument("--harder", action="store_true", help="the --harder variant (default: detected per copy)")
    p.add_argument("--json", type=Path, default=Path("grades.json"), help="where the grades go (default grades.json)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="copies graded at once")
    p.add_argument("--timeout", type=int, default=600, help="seconds for one copy's grading run")
    args = p.parse_args(argv)
    known = sorted({r.name for r in find_regions(ROOT)}, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
    unknown = [n for n in args.only or [] if n not in known]
    if unknown:
        p.error(f"unknown assignment(s) {', '.join(unknown)}; known: {', '.join(known)}")
    names = [n for n in known if args.only is None or n in args.only]
    subs = find_submissions(args.paths)
    harder = [n for n in names if n in HARDER] if args.harder else None
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda s: grade(s, names, harder, args.timeout), subs))
    for result in results:
        print(table(result) + "\n")
    args.json.write_text(json.dumps(results, indent=1))
    print(f"{len(results)} submission{'s' if len(results) != 1 else ''} graded; grades in {args.json}")
    return 0


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
