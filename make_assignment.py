"""make_assignment.py: a student copy of this repository, with the functions a course assigns left blank.

The bodies that students write are marked in the source with two comments of their own: a line
`# assignment: NAME: HINT` before the body's first statement (after the docstring, so the student
keeps the specification) and a line `# end assignment: NAME` after its last. In the copy, every line
between the two becomes one, at the body's indentation:

    raise NotImplementedError("NAME: HINT")

The markers stay, to show where the answer goes, and every other byte of every file is unchanged:
the copy imports, and runs up to the first call of a missing function, which names itself and
gives its hint. (In a @triton.jit function that holds under TRITON_INTERPRET=1, as in the tests;
the GPU compiler refuses the `raise` as an unsupported construct, and shows its line.) One
assignment may mark several bodies (`rope`: the cos/sin tables and the rotation). NAME is also a
pytest marker (pytest.ini registers each one): `pytest -m NAME` runs the tests that grade it, and
none of them needs another assignment, so they pass as soon as that one assignment is right,
whatever else is still blank. tests/test_assignments.py checks all of this.

Run:
    python make_assignment.py --list                              # assignments, hints, locations
    python make_assignment.py --out ../course                     # every assignment blank
    python make_assignment.py --out ../course --only rope maxsim  # only these
    cd ../course && python -m pytest -m "rope or maxsim"          # the autograder
"""

import argparse
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

START = re.compile(r"# assignment: (?P<name>[a-z][a-z0-9_]*): (?P<hint>\S.*?)\s*$")
END = re.compile(r"# end assignment: (?P<name>[a-z][a-z0-9_]*)\s*$")
LOOKS_LIKE_A_MARKER = re.compile(r"#\s*(end\s+)?assignment\s*:")   # must then parse as START or END
# Without git (a copy of a copy): every file except these directories and compiled Python.
SKIP_DIRS = {".git", "runs", "checkpoints", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}


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


def marker_comments(path: Path, rel: str) -> list[tuple[int, str, str]]:
    """(line, indentation, text) of each comment in a Python file that looks like a marker. Comments
    only (the tokenizer's), so a docstring or a string that shows the format is not a marker."""
    source = path.read_bytes()
    found = []
    try:
        for tok in tokenize.tokenize(io.BytesIO(source).readline):
            if tok.type == tokenize.COMMENT and LOOKS_LIKE_A_MARKER.match(tok.string):
                before = tok.line[:tok.start[1]]
                if before.strip():
                    raise ValueError(f"{rel}:{tok.start[0]}: a marker must be a line of its own, not follow code")
                found.append((tok.start[0], before, tok.string))
    except (tokenize.TokenError, SyntaxError) as e:
        raise ValueError(f"{rel}: cannot tokenize ({e})") from None
    return found


def find_regions(root: Path, files: list[str] | None = None) -> list[Region]:
    """Every marked body in the .py files among `files` (default: repository_files(root)), in file
    and line order. Markers must pair up: a ValueError says file:line of the first one that does
    not (malformed, a start inside another region, an end without its start or with another name
    or indentation, a start never closed, nothing between the two)."""
    regions = []
    for rel in files if files is not None else repository_files(root):
        if not rel.endswith(".py"):
            continue
        opened = None                                                    # (line, indent, start match)
        for line, indent, text in marker_comments(root / rel, rel):
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


def make_copy(root: Path, out: Path, only: list[str] | None = None) -> list[Region]:
    """Write the student copy of the repository at `root` into `out`, with the assignments named in
    `only` blank (None: all of them) -> the blanked regions. Everything is checked (markers, names,
    the blanked files compile, `out`) before the first file is written."""
    files = repository_files(root)
    regions = find_regions(root, files)
    where = {}
    for r in regions:
        where.setdefault(r.name, f"{r.path}:{r.start}")
    unknown = [name for name in only or [] if name not in where]
    if unknown:
        known = ", ".join(f"{name} ({loc})" for name, loc in sorted(where.items()))
        raise ValueError(f"unknown assignment(s) {', '.join(map(repr, unknown))} in --only; known: {known}")
    chosen = [r for r in regions if only is None or r.name in only]
    check_out_dir(root, out)
    texts = {}
    for rel in sorted({r.path for r in chosen}):
        texts[rel] = blank((root / rel).read_bytes().decode("utf-8"), [r for r in chosen if r.path == rel])
        try:
            compile(texts[rel], rel, "exec")
        except SyntaxError as e:
            raise ValueError(f"{rel}:{e.lineno}: the blanked file does not compile ({e.msg}): is a marker pair "
                             "around whole statements, at the body's indentation?") from None
    for rel in files:
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if rel in texts:
            dest.write_bytes(texts[rel].encode("utf-8"))
        else:
            shutil.copyfile(root / rel, dest)
        shutil.copymode(root / rel, dest)                  # scripts stay executable
    return chosen


def main(argv: list[str]):
    p = argparse.ArgumentParser(description="Write a student copy of this repository with assignments blank.",
                                epilog="Example: python make_assignment.py --out ../course --only rope maxsim")
    p.add_argument("--out", type=Path, help="a new or empty directory, outside the repository")
    p.add_argument("--only", nargs="+", metavar="NAME", help="blank only these assignments (default: all)")
    p.add_argument("--list", action="store_true", help="print every marked body with its hint, then exit")
    args = p.parse_args(argv)
    root = Path(__file__).resolve().parent
    try:
        if args.list:
            for r in find_regions(root):
                print(f"{r.name:<15} {f'{r.path}:{r.start}':<22} {r.hint}")
            return
        if args.out is None:
            p.error("--out DIR is required (or --list)")
        chosen = make_copy(root, args.out, args.only)
    except ValueError as e:
        sys.exit(f"make_assignment.py: {e}")
    names = sorted({r.name for r in chosen})
    print(f"{args.out}: {len(chosen)} function bod{'y' if len(chosen) == 1 else 'ies'} blank, assignments {', '.join(names)}")
    print(f"grade them with: cd {args.out} && python -m pytest -m \"{' or '.join(names)}\"")


if __name__ == "__main__":
    main(sys.argv[1:])
