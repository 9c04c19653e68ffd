"""cli.py: how the command lines of this repository meet their user: help, errors, exit statuses.

Every command line (train.py, eval.py, colbert_index.py, retriever.py, llama.py, qa_data.py, costs.py,
demo.py, s2attn_kernel.py, make_assignment.py, grade.py) answers -h and --help with its usage and
settings (exit 0), and ends with `run(main)`, which turns what went wrong into what a user needs:

    a mistake in the input    one line on stderr, `program: what is wrong; what to do`, exit 2 (as
                              argparse's own errors): the message the code raised, which names the
                              setting or file:line and what to change
    Ctrl-C                    one line, `program: interrupted` (train.py adds the step and where
                              --resume=True continues), exit 130 (128 + SIGINT, as a shell reports it)
    a bug of ours             the traceback, as Python prints it, exit 1

`settings_help` lists a config dataclass's fields with their defaults and the `# comments` written
beside them in the source (train.py's and costs.py's --help), so the help cannot drift from the code.

Only the standard library: grade.py and make_assignment.py import this without importing torch.
"""

import inspect
import io
import itertools
import json
import linecache
import sys
import textwrap
import tokenize
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
# a file that is missing, unreadable or not text / not JSON: the user's, wherever it was opened
FILE_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
               UnicodeDecodeError, json.JSONDecodeError)


def is_user_error(e: BaseException) -> bool:
    """Whether e reports bad input rather than a bug: a file error (FILE_ERRORS), or a ValueError (the
    project's own DuplicateKeyError is one) raised by a `raise` statement in this repository's code,
    whose messages are written for the user. A ValueError raised inside torch or another library,
    or by Python itself in our code (`a, b = [1, 2, 3]`), is a bug and keeps its traceback."""
    if isinstance(e, FILE_ERRORS):
        return True
    if not isinstance(e, ValueError) or e.__traceback__ is None:
        return False
    tb = e.__traceback__
    while tb.tb_next is not None:                        # the innermost frame: where it was raised
        tb = tb.tb_next
    path = tb.tb_frame.f_code.co_filename
    line = linecache.getline(path, tb.tb_lineno).lstrip()   # a multi-line raise reports its first line
    return Path(path).resolve().parent == HERE and line.startswith(("raise ", "raise("))


def run(main: Callable, *args) -> None:
    """Call main(*args) and exit: with main's return value (0 for None), 2 after one line on stderr for
    a user's error (is_user_error), 130 after one line for Ctrl-C. Anything else propagates with
    its traceback. Under torchrun every rank prints its own line."""
    program = Path(sys.argv[0]).name
    try:
        status = main(*args)
    except KeyboardInterrupt as e:                       # its message, if any, says where the run stopped
        sys.stdout.flush()
        print(f"{program}: {str(e) or 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if not is_user_error(e):
            raise
        sys.stdout.flush()                               # what was printed before, then the error
        what = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)   # not "[Errno 2]"
        print(f"{program}: {what}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status or 0)


def field_comments(cls: type) -> tuple[dict[str, str], dict[str, str]]:
    """From a dataclass's source: ({field: the comment at the end of its line}, {field: the comment
    lines of their own just above it, a heading}). Read with tokenize, so a '#' inside a string is
    not a comment."""
    names = {f.name for f in fields(cls)}
    source = textwrap.dedent(inspect.getsource(cls))     # the class at column 0, its body at column 4
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    comments, headings, current, heading = {}, {}, None, ""
    for tok, after in itertools.pairwise(tokens):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names and after.string == ":":
            current = tok.string                          # a field's line begins
            if heading:
                headings[current], heading = heading, ""
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if current:
                comments[current] = text                  # after the field, on its line
            elif tok.start[1] == 4:
                heading = f"{heading} {text}".strip()     # a line of its own, above the next field
        elif tok.type == tokenize.NEWLINE:
            current = None
    return comments, headings


def show(value) -> str:
    """A value as it is typed after `--key=`: bare words for plain strings, Python literals otherwise."""
    if isinstance(value, str) and value and value.strip() == value and " " not in value:
        return value
    return '""' if value == "" else repr(value)


def settings_help(default, chosen=None, label: str = "", prefix: str = "") -> list[str]:
    """One line per field of the dataclass instance `default`: `--name=value` and its comment from
    the source; a nested dataclass's fields as `--outer.name=value` under a heading of their own.
    Where `chosen` (the same config with a preset applied) differs, the line ends `[label: value]`."""
    comments, headings = field_comments(type(default))
    lines = []
    for f in fields(default):
        value = getattr(default, f.name)
        other = getattr(chosen, f.name) if chosen is not None else value
        heading = headings.get(f.name)
        if is_dataclass(value):
            cls = type(value)
            heading = f"{prefix}{f.name}.*: {cls.__name__} ({Path(inspect.getfile(cls)).name})"
        if heading:
            lines += [heading] if not lines or lines[-1] == "" else ["", heading]
        if is_dataclass(value):
            lines += settings_help(value, other, label, f"{prefix}{f.name}.") + [""]
            continue
        line = f"  --{prefix}{f.name}={show(value)}"
        line = f"{line:<34} {comments.get(f.name, '')}".rstrip()
        if other != value:
            line += f" [{label}: {show(other)}]"
        lines.append(line)
    return lines
