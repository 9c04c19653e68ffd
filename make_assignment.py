"""make_assignment.py: the student copy of this repository, with the functions a course assigns left blank.

The bodies that students write are marked in the source with two comments of their own: a line
`# assignment: NAME: HINT` before the body's first statement (after the docstring, so the student
keeps the specification) and a line `# end assignment: NAME` after its last. In the copy, every line
between the two becomes one, at the body's indentation:

    raise NotImplementedError("NAME: HINT")

The markers stay, to show where the answer goes: grade.py takes exactly the lines between them from
a submission. The copy imports, and runs up to the first call of a missing function, which names
itself and gives its hint. (In a @triton.jit function that holds under TRITON_INTERPRET=1; the GPU
compiler refuses the `raise` and shows its line.) One assignment may mark several bodies (`rope`:
the tables and the rotation); `--harder` also blanks the helpers listed in HARDER (markers added in
the copy). The copy leaves out what would give an answer away or grade it: this script, grade.py,
assignments/ (the grading tests), the project's tests (loop references, transformers parity),
benchmarks/ and .ci/. It adds ASSIGNMENTS.md (the assignments by difficulty, with times and the
details the hints leave open), tests/test_public.py (a few checks per assignment: `pytest -m NAME`)
and final_check.py. tests/test_assignments.py checks all of this.

Run:
    python make_assignment.py --list                              # assignments by difficulty, locations
    python make_assignment.py --out ../course                     # every assignment blank
    python make_assignment.py --out ../course --only rope maxsim  # only these
    python make_assignment.py --out ../course --harder            # s2attn_mask with its helpers blank too
    python grade.py ../course                                     # the instructor grades a copy
"""

import argparse
import ast
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

import cli

START = re.compile(r"# assignment: (?P<name>[a-z][a-z0-9_]*): (?P<hint>\S.*?)\s*$")
END = re.compile(r"# end assignment: (?P<name>[a-z][a-z0-9_]*)\s*$")
LOOKS_LIKE_A_MARKER = re.compile(r"#\s*(end\s+)?assignment\s*:")   # must then parse as START or END
# Without git (a copy of a copy): every file except these directories and compiled Python.
SKIP_DIRS = {".git", "runs", "checkpoints", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}
# Kept from students: the kit (it holds the grading tests and the answers' checks), the project's
# tests (loop references, transformers parity, exact expected numbers) and benchmarks/ (near-copies
# of some bodies). conftest.py and convert_gguf.py stay in tests/, for the public tests and the README.
INSTRUCTOR_ONLY = re.compile(r"(make_assignment\.py|grade\.py|assignments/.*|benchmarks/.*|\.ci/.*|tests/test_.*)$")
# Kit files that the copy does get, at these paths.
STUDENT_FILES = {"assignments/public/test_public.py": "tests/test_public.py",
                 "assignments/final_check.py": "final_check.py"}


@dataclass(frozen=True)
class Assignment:
    """One assignment as ASSIGNMENTS.md presents it. `minutes`: what students took (strong to weak)."""
    name: str
    minutes: str
    what: str
    details: tuple[str, ...]   # what the docstring and the hint leave open; the grading tests check each


# By difficulty: the times three students (strong, average, weak) took, measured; doc_losses estimated.
COURSE = (
    Assignment("rmsnorm", "5-25", "`llama.RMSNorm.forward`", (
        "`eps` goes inside the square root: a row of zeros gives zeros, not NaN.",
        "bf16 in, bf16 out: normalize in fp32 and round once, then multiply by the weight.")),
    Assignment("s2attn_mask", "5-25", "`s2attn_kernel.s2_mask` (`--harder`: also `shifted_heads` and `group_ids`)", (
        "The mask is bool, (H, T, T); with G >= T there is one group and nothing is shifted.",)),
    Assignment("lr_schedule", "5-25", "`train.lr_factor`", (
        "The factor reaches `min_lr_ratio` at step `cfg.steps` and stays there for any later step.",
        "`warmup_steps = 0` starts at the peak; `warmup_steps == steps` must not divide by zero.")),
    Assignment("rope", "10-45", "`llama.rope_cos_sin` and `llama.apply_rope`", (
        "The tables are fp32 (T, D); `apply_rope` returns x's dtype (a bf16 model's attention refuses fp32 q, k).",)),
    Assignment("sampling", "10-45", "`jmlr.sample_documents`", (
        "Min-max scaling is per row (one question's candidates), and the scaled scores are divided by tau too.",
        "Any correct sampler passes (Gumbel-top-k, one draw at a time, inverse CDF), graded by its distribution; "
        "it must not underflow at a small tau.")),
    Assignment("masks", "10-45", "`retriever.ColBERTTokenizer.queries` and `.docs`", (
        "Every mask is bool.",
        "Queries are padded to `query_maxlen`; documents to the longest row of the batch, not to `doc_maxlen`.")),
    Assignment("doc_losses", "10-30 (estimated)", "`jmlr.JMLR.document_losses`", (
        "Row b * m + j is question b with its candidate `picked[b, j]` alone; `llm_losses` runs them (eval "
        "mode, the token budget).",)),
    Assignment("maxsim", "15-60", "`retriever.maxsim`", (
        "Similarities can be negative: a masked document token must never win the max (multiplying by the "
        "mask makes it 0, which would).",
        "A document with every token masked scores -inf; a masked query token adds nothing.",
        "The scores are fp32 whatever the embeddings' dtype.")),
    Assignment("rank_loss", "15-60", "`jmlr.rank_loss`", (
        "When every pair ties the loss is 0 and still part of the graph (`scores.sum() * 0.0`).",
        "The mean is over every untied pair of the whole batch, not per question.")),
    Assignment("online_softmax", "20-120+", "`s2attn_kernel._online_softmax_update` (Triton)", (
        "p goes into `tl.dot` rounded to DTYPE with `_round_to`, as tensor cores read it; `l_i` sums p in fp32.",
        "Run it on a CPU with `TRITON_INTERPRET=1` (the tests set it).")),
)
# --harder: more bodies blank for an assignment, (file, function, hint); markers added in the copy.
HARDER = {"s2attn_mask": (
    ("s2attn_kernel.py", "shifted_heads", "a bool (H,) tensor, True for the last H // 2 heads"),
    ("s2attn_kernel.py", "group_ids", "i // G, or (i + G/2) // G when shifted and G < T, for i < T"))}


@dataclass(frozen=True)
class Region:
    """One marked body of `path` (relative to the repository root): the lines strictly between the
    start marker on line `start` and the end marker on line `end` (1-based)."""
    name: str
    hint: str
    path: str
    start: int
    end: int
    indent: str     # the markers' indentation, which the `raise` takes

    @property
    def message(self) -> str:
        return f"{self.name}: {self.hint}"


# ----------------------------------------------------------------------------------------------
# Finding the files and the markers

def repository_files(root: Path) -> list[str]:
    """The repository's files, relative and sorted: in a git checkout, the tracked ones plus new
    ones that .gitignore does not exclude (runs/, checkpoints/, caches, venvs); elsewhere, every file
    outside SKIP_DIRS and virtual environments."""
    if (root / ".git").exists():
        git = ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
        listed = subprocess.run(git, capture_output=True, text=True, check=True).stdout
        return sorted({f for f in listed.split("\0") if f and (root / f).is_file()})   # not deleted ones
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith((".venv", "venv"))]
        files += [(Path(dirpath) / f).relative_to(root).as_posix() for f in filenames if not f.endswith(".pyc")]
    return sorted(files)


def marker_comments(source: bytes, rel: str, lenient: bool = False) -> list[tuple[int, str, str]]:
    """(line, indentation, text) of each comment in a Python file that looks like a marker. Comments
    only (the tokenizer's), so a docstring or a string that shows the format is not a marker.
    lenient (grade.py, a student's file): a file the tokenizer refuses (an unclosed bracket) is read
    line by line, so that the bodies of the other assignments in it can still be graded."""
    found = []
    try:
        for tok in tokenize.tokenize(io.BytesIO(source).readline):
            if tok.type == tokenize.COMMENT and LOOKS_LIKE_A_MARKER.match(tok.string):
                before = tok.line[:tok.start[1]]
                if before.strip():
                    raise ValueError(f"{rel}:{tok.start[0]}: a marker must be a line of its own, not follow code")
                found.append((tok.start[0], before, tok.string))
    except (tokenize.TokenError, SyntaxError) as e:
        if not lenient:
            raise ValueError(f"{rel}: cannot tokenize ({e})") from None
        lines = source.decode("utf-8", errors="replace").splitlines()
        return [(n, line[:len(line) - len(line.lstrip())], line.strip()) for n, line in enumerate(lines, 1)
                if LOOKS_LIKE_A_MARKER.match(line.strip())]
    return found


def find_regions(root: Path, files: list[str] | None = None, texts: dict[str, str] | None = None,
                 lenient: bool = False) -> list[Region]:
    """Every marked body in the .py files among `files` (default: repository_files(root)), in file
    and line order; a file in `texts` is read from there instead of from the disk (lenient: see
    marker_comments). Markers must pair up: a ValueError says file:line of the first one that does
    not (malformed, a start inside another region, an end without its start or with another name
    or indentation, a start never closed, nothing between the two)."""
    regions = []
    for rel in files if files is not None else repository_files(root):
        if not rel.endswith(".py"):
            continue
        opened = None                                                    # (line, indent, start match)
        source = texts[rel].encode("utf-8") if texts and rel in texts else (root / rel).read_bytes()
        for line, indent, text in marker_comments(source, rel, lenient):
            start, end, where = START.match(text), END.match(text), f"{rel}:{line}"
            if not (start or end):
                raise ValueError(f"{where}: malformed marker {text!r}: write '# assignment: NAME: hint' before "
                                 "the body and '# end assignment: NAME' after it (NAME in lowercase)")
            if start and opened:
                raise ValueError(f"{where}: assignment {start['name']!r} starts inside {opened[2]['name']!r} "
                                 f"(opened on line {opened[0]}): regions do not nest; close that one first")
            if start:
                opened = (line, indent, start)
                continue
            if not opened:
                raise ValueError(f"{where}: '# end assignment: {end['name']}' has no start marker before it")
            first, first_indent, first_match = opened
            if end["name"] != first_match["name"]:
                raise ValueError(f"{where}: '# end assignment: {end['name']}' closes assignment "
                                 f"{first_match['name']!r} (opened on line {first}): the names must match")
            if indent != first_indent:
                raise ValueError(f"{where}: the end marker of {end['name']!r} is not indented like its start "
                                 f"(line {first}): both go at the body's indentation")
            if line == first + 1:
                raise ValueError(f"{where}: assignment {end['name']!r} marks no lines")
            regions.append(Region(end["name"], first_match["hint"], rel, first, line, indent))
            opened = None
        if opened:
            raise ValueError(f"{rel}:{opened[0]}: assignment {opened[2]['name']!r} has no "
                             f"'# end assignment: {opened[2]['name']}' after it")
    return regions


def add_harder_markers(source: str, rel: str, functions: list[tuple[str, str, str]]) -> str:
    """source with markers `# assignment: NAME: hint` / `# end assignment: NAME` around the bodies of
    the (NAME, function, hint) given (after a docstring, as everywhere), for --harder."""
    lines = io.StringIO(source, newline="\n").readlines()
    defs = {f.name: f for f in ast.walk(ast.parse(source)) if isinstance(f, ast.FunctionDef)}
    inserts = []                                                       # (line index, text)
    for name, function, hint in functions:
        f = defs.get(function)
        if f is None:
            raise ValueError(f"{rel}: HARDER names {function}() for {name!r}, but the file has no such function")
        body = f.body[1:] if ast.get_docstring(f) is not None else f.body
        if not body:
            raise ValueError(f"{rel}:{f.lineno}: {function}() has nothing after its docstring to blank")
        indent = " " * body[0].col_offset
        inserts += [(body[0].lineno - 1, f"{indent}# assignment: {name}: {hint}\n"),
                    (f.end_lineno, f"{indent}# end assignment: {name}\n")]
    for at, text in sorted(inserts, reverse=True):                     # bottom up: line numbers stay valid
        lines.insert(at, text)
    return "".join(lines)


def harder_texts(root: Path, names: list[str]) -> dict[str, str]:
    """{file: its text with HARDER's markers added} for the assignments in `names` that have any."""
    by_file = {}
    for name in names:
        for rel, function, hint in HARDER.get(name, ()):
            by_file.setdefault(rel, []).append((name, function, hint))
    return {rel: add_harder_markers((root / rel).read_text(), rel, fs) for rel, fs in by_file.items()}


# ----------------------------------------------------------------------------------------------
# Writing the copy

def blank(source: str, regions: list[Region]) -> str:
    """source with the lines between each region's markers replaced by one `raise`; the rest,
    line endings included, unchanged."""
    lines = io.StringIO(source, newline="\n").readlines()           # split at "\n" only, as the tokenizer
    for r in sorted(regions, key=lambda r: r.start, reverse=True):   # bottom up: line numbers stay valid
        marker = lines[r.start - 1]
        newline = marker[len(marker.rstrip("\r\n")):] or "\n"
        literal = json.dumps(r.message, ensure_ascii=False)               # a double-quoted Python string
        lines[r.start:r.end - 1] = [f"{r.indent}raise NotImplementedError({literal}){newline}"]
    return "".join(lines)


def check_out_dir(root: Path, out: Path):
    """A student copy goes into a new or empty directory outside the repository: it never
    overwrites a student's work, and never becomes part of the repository it copies."""
    root, target = root.resolve(), out.resolve()
    if target == root or root in target.parents:
        raise ValueError(f"--out {out} is inside the repository: choose a directory outside it (e.g. ../course)")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"--out {out} exists and is not empty: give a new directory, or remove that one first "
                         f"(rm -r {out}); a copy is never written over files, which could be a student's work")


def student_files(root: Path) -> list[str]:
    """The repository's files that a student copy holds (INSTRUCTOR_ONLY left out)."""
    return [rel for rel in repository_files(root) if not INSTRUCTOR_ONLY.match(rel)]


def assignment_sheet(regions: list[Region], harder: bool) -> str:
    """ASSIGNMENTS.md for the copy: the blank assignments by difficulty, where they are, their hints,
    the details the hints leave open, how to check each one, the final check and what is graded."""
    names = {r.name for r in regions}
    known = [a for a in COURSE if a.name in names] + [Assignment(n, "?", f"`{n}`", ()) for n in sorted(names)
                                                       if n not in {a.name for a in COURSE}]
    out = ["# Assignments", "",
           "Each blank function body lies between `# assignment: NAME: HINT` and `# end assignment: NAME`; the",
           "function's docstring above it is the specification. Write the body between the two markers and keep",
           "the markers: only the lines between them are graded (a helper you need goes inside the function),",
           "by tests of the instructor's that check more than the public ones here. Ordered by difficulty;",
           "times are what three students (strong to weak) took.", "",
           "| # | assignment | what | minutes |", "|---|---|---|---|"]
    out += [f"| {i} | `{a.name}` | {a.what} | {a.minutes} |" for i, a in enumerate(known, 1)]
    for i, a in enumerate(known, 1):
        out += ["", f"## {i}. `{a.name}`{' (harder variant)' if harder and a.name in HARDER else ''}", ""]
        out += [f"- `{r.path}:{r.start}`: {r.hint}" for r in regions if r.name == a.name]
        out += [f"- {d}" for d in a.details]
        out += [f"- Check: `python -m pytest -m {a.name}` (shapes and a value or two; the grading checks more)."]
    out += ["", "## When every assignment passes", "",
            "`python final_check.py` runs every public test, then the built-in demo (about 4 minutes on 2 CPU",
            "cores): the LLM and the retriever trained with a frozen retriever (RAG) and with JMLR. It passes when",
            "JMLR beats RAG on the held-out questions, which needs every assignment working together.", ""]
    return "\n".join(out)


def make_copy(root: Path, out: Path, only: list[str] | None = None, harder: bool = False) -> list[Region]:
    """Write the student copy of the repository at `root` into `out`, with the assignments named in
    `only` blank (None: all of them), with HARDER's helpers too if `harder` -> the blanked regions.
    Everything is checked (markers, names, the blanked files compile, `out`) before the first file
    is written."""
    files = student_files(root)
    where = {}
    for r in find_regions(root, files):
        where.setdefault(r.name, f"{r.path}:{r.start}")
    unknown = [name for name in only or [] if name not in where]
    if unknown:
        known = ", ".join(f"{name} ({loc})" for name, loc in sorted(where.items()))
        raise ValueError(f"unknown assignment(s) {', '.join(map(repr, unknown))} in --only; known: {known}")
    names = sorted(where) if only is None else list(only)
    sources = harder_texts(root, names) if harder else {}
    regions = find_regions(root, files, sources)
    chosen = [r for r in regions if r.name in names]
    check_out_dir(root, out)
    texts = {}
    for rel in sorted({r.path for r in chosen}):
        source = sources[rel] if rel in sources else (root / rel).read_bytes().decode("utf-8")
        texts[rel] = blank(source, [r for r in chosen if r.path == rel])
        try:
            compile(texts[rel], rel, "exec")
        except SyntaxError as e:
            raise ValueError(f"{rel}:{e.lineno}: the blanked file does not compile ({e.msg}): is a marker pair "
                             "around whole statements, at the body's indentation?") from None
    copies = {rel: rel for rel in files} | {dst: src for src, dst in STUDENT_FILES.items() if (root / src).is_file()}
    for dst, src in sorted(copies.items()):
        dest = out / dst
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dst in texts:
            dest.write_bytes(texts[dst].encode("utf-8"))
        else:
            shutil.copyfile(root / src, dest)
        shutil.copymode(root / src, dest)                  # scripts stay executable
    (out / "ASSIGNMENTS.md").write_text(assignment_sheet(chosen, harder))
    return chosen


def main(argv: list[str]):
    p = argparse.ArgumentParser(description="Write a student copy of this repository with assignments blank.",
                                epilog="Example: python make_assignment.py --out ../course --only rope maxsim")
    p.add_argument("--out", type=Path, help="a new or empty directory, outside the repository")
    p.add_argument("--only", nargs="+", metavar="NAME", help="blank only these assignments (default: all)")
    p.add_argument("--harder", action="store_true", help=f"also blank the helpers of {', '.join(HARDER)}")
    p.add_argument("--list", action="store_true", help="print the assignments by difficulty, then exit")
    args = p.parse_args(argv)
    root = Path(__file__).resolve().parent
    if args.list:
        regions = find_regions(root)
        order = [a.name for a in COURSE] + sorted({r.name for r in regions} - {a.name for a in COURSE})
        minutes = {a.name: a.minutes for a in COURSE}
        for r in sorted(regions, key=lambda r: order.index(r.name)):
            print(f"{r.name:<15} {minutes.get(r.name, '?') + ' min':<22} {f'{r.path}:{r.start}':<22} {r.hint}")
        return
    if args.out is None:
        p.error("--out DIR is required (or --list)")
    chosen = make_copy(root, args.out, args.only, args.harder)      # a refusal: one line, exit 2 (cli.run)
    names = sorted({r.name for r in chosen})
    print(f"{args.out}: {len(chosen)} function bod{'y' if len(chosen) == 1 else 'ies'} blank, assignments {', '.join(names)}")
    print(f"students start with {args.out}/ASSIGNMENTS.md; grade a copy with: python grade.py {args.out}"
          + (" --harder" if args.harder else ""))


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
