"""The command lines as a user meets them (cli.py): -h/--help answers with the settings and exit 0; a
mistake in the input is one line `program: message` on stderr and exit 2, without a traceback;
Ctrl-C is one line and 130. Every case fails before a model loads or any work starts, so each
subprocess costs an import (seconds at most)."""

import ast
import fractions
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cli
import qa_data

ROOT = Path(__file__).resolve().parents[1]


@functools.cache                      # train.py --help is read by two tests: run once
def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def config_fields(path: str, cls: str) -> list[str]:
    """The field names of a dataclass, read from the source (no import: train.py would load torch)."""
    tree = ast.parse((ROOT / path).read_text())
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    return [n.target.id for n in body if isinstance(n, ast.AnnAssign)]


@pytest.mark.parametrize("args, expected", [
    (["train.py", "--help"], ["--preset=NAME", "llama2-13b", "--jmlr.top_k=7", "--lora.rank=8",
                              "N: candidates per question", "[demo: 0.4]"]),
    (["train.py", "-h", "--preset=llama2-7b"], ["[llama2-7b: 128]", "r: A is (r, in), B is (out, r)"]),
    (["costs.py", "-h"], ["--mfu=0.4", "model FLOPs utilization", "python train.py --help"]),
    (["eval.py", "--help"], ["--llm", "--retriever", "--corpus", "--k"]),
    (["colbert_index.py", "--help"], ["build", "search", "candidates"]),
    (["colbert_index.py", "build", "-h"], ["--shard-size", "default 10000", "--model"]),
    (["retriever.py", "--help"], ["query", "docs", "--model"]),
    (["llama.py", "-h"], ["ckpt_dir", "--prompt", "--temperature", "default 0.0"]),
    (["qa_data.py", "--help"], ["path", "--format", "pubmedqa"]),
    (["make_assignment.py", "--help"], ["--out", "--only", "--list"]),
    (["grade.py", "-h"], ["paths", "--only", "--json"]),
    (["demo.py", "--help"], ["out", "--seed", "--diseases", "default 2000"]),
    (["s2attn_kernel.py", "-h"], ["--compile", "--head-dims"]),
    (["compressed_index.py", "build", "-h"], ["--bits", "--centroids"]),
    (["index_updates.py", "--help"], ["add", "remove"]),
])
def test_help_exits_0_and_names_the_settings(args, expected):
    proc = run_cli(*args)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr[-3000:]
    missing = [word for word in expected if word not in proc.stdout]
    assert not missing, f"{args}: --help does not mention {missing}:\n{proc.stdout}"


def test_train_help_lists_every_field_with_its_default():
    out = run_cli("train.py", "--help").stdout
    for path, cls, prefix in [("train_config.py", "TrainConfig", ""), ("jmlr.py", "JMLRConfig", "jmlr."),
                              ("llama.py", "LoraConfig", "lora.")]:
        for name in config_fields(path, cls):
            if name not in ("jmlr", "lora"):
                assert f"  --{prefix}{name}=" in out, f"--{prefix}{name} missing from train.py --help"
    assert '  --llm=""' in out and "no rank loss [demo: 0.4]" in out and "--jmlr.tau=1.0" in out


@pytest.mark.parametrize("args, message", [
    (["train.py", "--no_such=1"], "train.py: unknown setting 'no_such'; known: llm, "),
    (["train.py", "--steps=1.5"], "train.py: steps=1.5: expected int, got float"),
    (["train.py", "steps=3"], "train.py: argument 'steps=3': use --key=value (python train.py --help"),
    (["train.py", "--help", "--preset=nope"], "train.py: unknown preset 'nope'; choose one of demo, "),
    (["costs.py", "--gpu=X100"], "costs.py: gpu='X100': choose one of H100"),
    (["eval.py", "missing.jsonl", "--llm", "x"], "eval.py: missing.jsonl: No such file or directory"),
    (["colbert_index.py", "search", "missing_index", "a query"], "colbert_index.py: missing_index/manifest.json: no index"),
    (["retriever.py", "q", "d", "--model", "missing_dir"], "retriever.py: missing_dir/config.json: no config.json"),
    (["llama.py", "missing_dir"], "llama.py: missing_dir/config.json: no config.json"),
    (["qa_data.py", "missing.jsonl"], "qa_data.py: missing.jsonl: No such file or directory"),
    (["qa_data.py", "tests"], "qa_data.py: tests: Is a directory"),
    (["qa_data.py", "README.md", "--format", "generic"], "qa_data.py: README.md:1: not valid JSON"),
    (["compressed_index.py", "search", "missing_index", "a query"], "compressed_index.py: missing_index"),
    (["index_updates.py", "remove", "missing_index", "d1"], "index_updates.py: missing_index"),
    (["grade.py", "missing_dir"], "grade.py: missing_dir: neither a student copy"),
    (["demo.py", "README.md/data"], "demo.py: README.md/data: Not a directory"),
])
def test_a_bad_input_is_one_line_and_exit_2(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith(message), proc.stderr


def test_make_assignment_refusal_is_one_line_and_writes_nothing(tmp_path):
    proc = run_cli("make_assignment.py", "--out", str(tmp_path / "copy"), "--only", "nosuch")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("make_assignment.py: unknown assignment(s) 'nosuch' in --only; known: ")
    assert not (tmp_path / "copy").exists()


def test_argparse_errors_keep_argparse_form_and_exit_2():
    proc = run_cli("qa_data.py")                                     # a required argument missing
    assert proc.returncode == 2 and proc.stderr.startswith("usage: qa_data.py")
    assert proc.stderr.strip().splitlines()[-1].startswith("qa_data.py: error: ")


def test_ctrl_c_is_one_line_and_130():
    script = ("import sys; sys.argv = ['prog.py']; import cli\n"
              "def main(): raise KeyboardInterrupt('interrupted in step 3 of 9')\n"
              "cli.run(main)")
    proc = run_cli("-c", script)
    assert (proc.returncode, proc.stderr) == (130, "prog.py: interrupted in step 3 of 9\n")
    proc = run_cli("-c", script.replace("KeyboardInterrupt('interrupted in step 3 of 9')", "KeyboardInterrupt"))
    assert (proc.returncode, proc.stderr) == (130, "prog.py: interrupted\n")


def test_a_bug_keeps_its_traceback():
    proc = run_cli("-c", "import sys; sys.argv = ['prog.py']; import cli\n"
                         "def main():\n    a, b = [1, 2, 3]\ncli.run(main)")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ValueError: too many values" in proc.stderr


def caught(f) -> BaseException:
    try:
        f()
    except Exception as e:
        return e
    raise AssertionError("nothing raised")


def test_user_errors_are_ours_or_about_files():
    assert cli.is_user_error(caught(lambda: qa_data.qa_text(5, "question", "x.jsonl:3")))     # our raise
    assert cli.is_user_error(caught(lambda: json.loads("{", object_pairs_hook=qa_data.unique_keys)))
    assert cli.is_user_error(caught(lambda: json.loads('{"a": 1, "a": 2}', object_pairs_hook=qa_data.unique_keys)))
    assert cli.is_user_error(caught(lambda: open(ROOT / "no such file")))
    assert cli.is_user_error(caught(lambda: b"\xff".decode("utf-8")))
    assert not cli.is_user_error(caught(lambda: fractions.Fraction("x")))     # a library's ValueError: a bug
    assert not cli.is_user_error(caught(lambda: [].pop()))                   # not a ValueError


def test_only_a_raise_statement_of_ours_makes_a_value_error_the_users(monkeypatch):
    def ours():
        raise ValueError("x.jsonl:3: missing field 'question'")

    def unpacking():
        a, b = [1, 2, 3]                                                  # noqa: F841
    monkeypatch.setattr(cli, "HERE", Path(__file__).resolve().parent)     # this file's functions count as ours
    assert cli.is_user_error(caught(ours))
    assert not cli.is_user_error(caught(unpacking))                        # Python's ValueError in our code
    assert not cli.is_user_error(caught(lambda: int("x")))
    monkeypatch.setattr(cli, "HERE", ROOT)
    assert not cli.is_user_error(caught(ours))                             # a raise outside the repository's code


def test_field_comments_come_from_the_source():
    comments, headings = cli.field_comments(qa_data.QARecord)
    assert comments["answer"] == "the correct letter, a key of options" and "id" not in comments and not headings


def test_train_says_where_a_resume_continues(tmp_path):
    import train                                                      # torch: an import of a second or two
    cfg = train.parse_args([f"--out_dir={tmp_path}", "--compare=()", "--steps=90"])
    assert train.stopped_at({"cfg": cfg, "step": None}) == (
        f"interrupted before the first training step (jmlr in {tmp_path}); no checkpoint yet: a rerun starts from step 0")
    root = tmp_path / "checkpoints"
    (root / "step_000030").mkdir(parents=True)
    (root / "step_000030" / "state.json").write_text("{}")
    (root / "step_000060.tmp").mkdir()                                # a save that Ctrl-C cut short
    (root / "latest").write_text("step_000030")
    assert train.stopped_at({"cfg": cfg, "step": 61}) == (
        f"interrupted in step 62 of 90 (jmlr in {tmp_path}); rerun with --resume=True to continue from "
        f"{root / 'step_000030'}")


def test_eval_refuses_an_unwritable_out_before_any_work(tmp_path):
    """--out into a directory that cannot be written fails before a model loads (it used to fail
    after the whole evaluation had run)."""
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"id": "q0", "question": "Which vitamin?", "options": {"A": "C", "B": "D"}, "answer": "A"}\n')
    proc = run_cli("eval.py", str(qa), "--llm", str(tmp_path / "no_model"), "--out", "/proc/no_such/out.json")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.startswith("eval.py: --out /proc/no_such/out.json: cannot write into /proc/no_such"), proc.stderr
