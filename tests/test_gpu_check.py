"""benchmarks/gpu_check.py's CPU parts: FlexAttention's S2-Attn mask against s2attn_kernel.s2_mask,
eager FlexAttention against the reference, the pair count behind its TFLOP/s, the helpers that read
pytest's and train.py's outputs, the per-section guard and time budget, and a --cpu-only run that
writes its JSON and Markdown reports with the GPU sections listed as skipped. Seconds in all."""

import json
import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from s2attn_kernel import s2_mask

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check as gc  # noqa: E402


@pytest.mark.parametrize("T, G, H", gc.MASK_CASES + [(8, 4, 2), (33, 2, 4), (200, 64, 8), (16, 100, 3)])
def test_flex_mask_mod_is_the_s2_mask_by_elements_and_blocks(T, G, H):
    result = gc.mask_checks(T, G, H)
    assert result["elements_equal"], f"T={T} G={G} H={H}: the mask_mod evaluated on the index grid != s2_mask"
    assert result["blocks_equal"], f"T={T} G={G} H={H}: create_block_mask skips or keeps the wrong blocks"
    assert result["pairs_equal"], f"T={T} G={G} H={H}: s2_pairs {gc.s2_pairs(T, G, H)} != {int(s2_mask(T, G, H).sum())}"


def test_s2_pairs_by_hand():
    # T=8, G=4: unshifted groups {0..3} {4..7}: 10 + 10 pairs; shifted {0,1} {2..5} {6,7}: 3 + 10 + 3
    assert gc.s2_pairs(8, 4, 2) == 20 + 16
    assert gc.s2_pairs(8, 8, 2) == gc.s2_pairs(8, 100, 2) == 2 * 36, "G >= T: full causal on every head, no shift"
    assert gc.s2_pairs(8, 4, 1) == 20, "a single head is never shifted"


def test_flex_eager_on_cpu_matches_the_reference():
    for case in ((1, 4, 2, 96, 32, 24), (2, 6, 3, 70, 16, 32), (1, 2, 2, 40, 16, 64)):   # GQA, ragged, G >= T
        result = gc.flex_cpu_check(*case)
        assert result["ok"] and result["max_err"] < 1e-4, result


def test_cuda_tests_are_found_by_their_skip_or_their_name(tmp_path):
    (tmp_path / "test_a.py").write_text(
        "import pytest, torch\n"
        "@pytest.mark.skipif(not torch.cuda.is_available(), reason='gpu')\ndef test_on_gpu(): pass\n"
        "def test_compiles_for_sm90(): pass\n"
        "def test_plain(): pass\n")
    assert gc.cuda_test_ids(tmp_path) == ["tests/test_a.py::test_on_gpu", "tests/test_a.py::test_compiles_for_sm90"]
    ids = gc.cuda_test_ids()
    assert "tests/test_s2attn.py::test_cuda_kernels_match_reference" in ids, ids
    assert not any("test_gpu_check" in i for i in ids)


def test_junit_outcomes(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="tests.test_x" name="test_a" time="1.5"/>'
                   '<testcase classname="tests.test_x" name="test_b" time="0.1"><failure message="boom"/></testcase>'
                   '<testcase classname="tests.test_x" name="test_c"><skipped message="needs a GPU"/></testcase>'
                   '</testsuite></testsuites>')
    rows = gc.junit_outcomes(xml)
    assert [(r["test"], r["outcome"]) for r in rows] == [
        ("tests.test_x::test_a", "passed"), ("tests.test_x::test_b", "failed"), ("tests.test_x::test_c", "skipped")]
    assert rows[0]["seconds"] == 1.5 and rows[1]["message"] == "boom"


def test_train_logs_are_read_and_losses_compared(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
                   '{"step": 2, "split": "validation", "accuracy": 0.5}\n')
    assert [r["loss"] for r in gc.read_log(log)] == [2.0, 1.5]
    assert gc.read_log(tmp_path / "missing.jsonl") == []
    assert gc.losses_agree([2.0, 1.5], [2.0 + 0.02, 1.5 - 0.01])            # within 1e-3 + 2^-6 |a|
    assert not gc.losses_agree([2.0, 1.5], [2.0, 1.6])
    assert not gc.losses_agree([2.0, 1.5], [2.0]), "a run that stopped early does not agree"
    assert not gc.losses_agree([], []), "no steps at all is not agreement"


def test_a_failing_section_keeps_its_rows_and_says_why(tmp_path, monkeypatch):
    def broken(budget, rec, args):
        rec.row(T=1, ok=True)
        raise RuntimeError("CUDA error: an illegal memory access")
    monkeypatch.setitem(gc.RUNNERS, "broken", broken)
    gc.run_one("broken", Namespace(out=str(tmp_path), budget=5))
    rec = json.loads((tmp_path / "parts" / "broken.json").read_text())
    assert rec["status"] == "error" and "illegal memory access" in rec["error"]
    assert rec["rows"] == [{"T": 1, "ok": True}], "what the section measured before failing is kept"


def test_a_failing_implementation_is_recorded_and_the_others_still_timed(tmp_path, monkeypatch):
    def broken_flex(T, G, H, device):
        def fn(q, k, v):
            raise RuntimeError("inductor: compile failed")
        return fn
    monkeypatch.setattr(gc, "flex_s2", broken_flex)
    rec = gc.Record("kernel", tmp_path / "kernel.json")
    gc.section_kernel(gc.Budget(60), rec, Namespace(T="64,128", head_dims="16", heads=2, kv_heads=1, group_size=0))
    rows = rec.data["rows"]
    errors = [r for r in rows if "error" in r]
    assert errors and all(r["impl"] == "flex_s2" and "compile failed" in r["error"] for r in errors), errors
    assert {(r["T"], r["impl"]) for r in rows if "fwd_ms" in r} == {
        (64, "s2attn"), (64, "sdpa_causal"), (128, "s2attn"), (128, "sdpa_causal")}
    assert [r["ok"] for r in rows if r.get("impl") == "s2attn" and "check" in r] == [True], \
        "ours is still checked against fp64 at the first T"


def test_the_time_budget_stops_a_section_and_a_process_group(tmp_path):
    rec = gc.Record("kernel", tmp_path / "kernel.json")
    args = Namespace(T="2048", head_dims="128", heads=4, kv_heads=2, group_size=0)
    gc.section_kernel(gc.Budget(0), rec, args)
    assert rec.data["rows"] == [] and any("time budget" in n for n in rec.data["notes"])
    t0 = time.monotonic()
    rc = gc.run_proc([sys.executable, "-c", "import subprocess; subprocess.run(['sleep', '30'])"], 1,
                     tmp_path / "sleep.txt")
    assert rc == 124 and time.monotonic() - t0 < 10


def test_cpu_only_run_writes_json_and_markdown_with_the_skipped_sections(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-only", f"--out={tmp_path}"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = {s["section"]: s for s in report["sections"]}
    assert list(sections) == list(gc.SECTIONS)
    assert sections["cpu"]["status"] == "ok" and sections["cpu"]["rows"]
    assert all(r["ok"] for r in sections["cpu"]["rows"])
    for name in ("tests", "kernel", "jmlr", "torchrun"):
        assert sections[name]["status"] == "skipped" and "skipped" in sections[name]["notes"][0]
    md = (tmp_path / "gpu_check.md").read_text()
    for name in ("tests", "kernel", "jmlr", "torchrun"):
        assert f"| {name} | skipped |" in md
    assert "| mask | 100 | 24 | 4 | True | True | True | True |" in md
    assert torch.__version__ in md
