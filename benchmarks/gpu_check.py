"""benchmarks/gpu_check.py: what a CPU cannot check, in one command on one CUDA GPU, in under 8 minutes.

Sections (each runs in its own process, so a crash, a sticky CUDA error or a hang is recorded and
the others still run; each stops at its time budget, and time one leaves unused goes to the next):
  0. cpu      FlexAttention's S2-Attn mask (`s2_mask_mod`, written from DESIGN.md) equals
              s2attn_kernel.s2_mask element by element and block by block (ragged T, G >= T);
              eager FlexAttention on the CPU matches s2_attention_reference (forward only:
              FlexAttention has no CPU backward). Runs on every machine.
  1. tests    the tests that skip without CUDA (a skipif naming cuda) and those that compile the
              kernels (name contains "compile"), by pytest with TRITON_INTERPRET=0 (conftest.py only
              setdefaults it to 1), so that they run compiled; outcomes from a JUnit XML file.
  2. kernel   s2attn_kernel.s2_attention compiled, bf16, B=1, H=32, Hkv=8 (GQA), D = 128 and 64,
              T = 2k .. 32k, G = T/4 (LongLoRA's; --group-size fixes it). Correctness at the first
              T (if <= 4k): each implementation's error against an fp64 reference <= 2x that of the
              bf16 PyTorch reference (the tests' criterion); at longer T, ours against FlexAttention
              running the same mask. Timings (triton.testing.do_bench medians), forward and forward +
              backward: ours, FlexAttention-S2 (torch.compile) and SDPA flash full causal attention.
              TFLOP/s on useful FLOPs: 4 D per (query, key) pair the mask allows, per head, forward;
              the backward counts 2.5x that (FlashAttention's convention: 5 matmuls to 2), so
              forward + backward 3.5x. Masked-out pairs a kernel computes anyway do not count.
  3. jmlr     jmlr.JMLR training steps (re-score N candidates, sample m, per-document losses, rank
              and generation losses, backward, AdamW) under bf16 autocast: a SmolLM2-135M-shaped
              Llama and a MiniLM-shaped ColBERT with random weights, written by llama.py and
              retriever.py to a temp dir and loaded back; synthetic questions with random-word
              documents; train.py's llama2 preset settings (N=30, m=10, k=7, 180-token documents,
              micro-batch 4, G=512). S2-Attn + activation checkpointing beside full causal attention
              with and without it: tokens/s, MFU (train.mfu: 2N FLOPs per LLM token forward + 4N per
              trained token, N = LLM parameters; attention left out), peak memory.
  4. torchrun train.py's built-in demo, 3 steps, as a plain process and as one-process torchrun
              (NCCL) under DDP and under FSDP2: per-step losses (out_dir/log.jsonl) must agree with
              the plain run's within bf16 tolerance (|a - b| <= 1e-3 + 2^-6 |a|).
Peak GPU memory: torch.cuda.max_memory_allocated of each section's process (section 4: the most
that train.py logged; section 1: not measured, pytest runs its own processes).
Anchors printed beside section 2 (published, not measured here): FlashAttention-2 on an H100,
head dim 128, causal, forward: about 190-335 TFLOP/s; FlexAttention: about 85% of FlashAttention-3.
Shapes: B batch, H query heads, Hkv key/value heads, T tokens, D head dim, G S2-Attn group size.

Run (from the repository root; random weights only, no downloads):
    python benchmarks/gpu_check.py [--out runs/gpu_check] [--T 2048,4096] [--head-dims 128] [--group-size 2048]
    python benchmarks/gpu_check.py --cpu-only     # section 0 only (the default without CUDA), the rest skipped
    python benchmarks/gpu_check.py --smoke        # every section at toy sizes on the CPU: checks this script only
Writes OUT/gpu_check.md and OUT/gpu_check.json (the same numbers), OUT/parts/ and OUT/logs/.
"""

import argparse
import ast
import contextlib
import importlib.util
import json
import math
import re
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                  # the repository's modules sit one level up
from s2attn_kernel import s2_attention, s2_attention_reference, s2_mask  # noqa: E402

SECTIONS = {"cpu": 10, "tests": 80, "kernel": 170, "jmlr": 60, "torchrun": 120}   # nominal seconds, 440 in all
ANCHORS = "FlashAttention-2, H100, D=128, causal, forward: ~190-335 TFLOP/s; FlexAttention: ~85% of FlashAttention-3"
SMALL = ["--demo_diseases=100", "--compare=()", "--curriculum=0.0", "--batch_size=8", "--micro_batch_size=2",
         "--warmup_steps=2", "--log_every=1", "--jmlr.num_sampled=4"]    # tests/test_train.py's small demo


# ----------------------------------------------------------------------------------------------
# Bookkeeping: budgets, records that survive a kill, subprocesses that can be stopped

def clean(x):
    """JSON-safe: nan and inf become null, other objects their str."""
    return json.loads(json.dumps(x, default=str), parse_constant=lambda _: None)


class Budget:
    """Seconds left to a section; it checks before each expensive step and stops cleanly."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


class Record:
    """One section's rows (dicts; `ok` False marks a failure) and notes, written to `path` after each
    addition, so that a section killed past its budget still leaves what it measured."""

    def __init__(self, name: str, path: Path):
        self.path = path
        self.data = dict(section=name, status="running", seconds=0.0, peak_gpu_mib=None, rows=[], notes=[])

    def row(self, **fields):
        self.data["rows"].append(fields)
        self.save()

    def note(self, text: str):
        self.data["notes"].append(text)
        self.save()

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(clean(self.data), indent=1))


def run_proc(cmd: list[str], timeout: float, log: Path | None = None, env: dict | None = None) -> int:
    """cmd from the repository root in a session of its own, output to `log` (None: this console);
    past `timeout` its whole process group (pytest's, torchrun's workers too) is killed -> 124."""
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") if log else contextlib.nullcontext() as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT if f else None,
                             start_new_session=True)
        try:
            return p.wait(timeout=max(1.0, timeout))
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as e:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            if isinstance(e, KeyboardInterrupt):
                raise
            return 124


def error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"[:300]


# ----------------------------------------------------------------------------------------------
# 0. FlexAttention's S2-Attn mask, checked on the CPU

def s2_mask_mod(T: int, G: int, H: int):
    """FlexAttention mask_mod for DESIGN.md's S2-Attn: causal, within groups of G; the last H//2
    heads use groups shifted by G/2 (token i in group (i + G/2) // G); G >= T: one group, no shift."""
    half = G // 2 if G < T else 0
    first_shifted = H - H // 2                     # heads first_shifted .. H-1 are the shifted ones

    def mask_mod(b, h, q_idx, kv_idx):             # index tensors, broadcast by FlexAttention
        shift = (h >= first_shifted) * half
        return (kv_idx <= q_idx) & ((q_idx + shift) // G == (kv_idx + shift) // G)
    return mask_mod


def s2_block_mask(T: int, G: int, H: int, device: str, block: int = 128):
    """create_block_mask for the S2 mask; torch.compile'd on CUDA, as its docs advise for long T
    (eagerly it evaluates the mask on the whole (H, T, T) grid: 32 GiB at H=32, T=32k)."""
    args = (s2_mask_mod(T, G, H), None, H, T, T)
    if device == "cuda":
        try:
            return torch.compile(create_block_mask)(*args, device=device, BLOCK_SIZE=block)
        except Exception:
            if H * T * T > 2**31:                  # too big to build eagerly: say why flex is missing
                raise
    return create_block_mask(*args, device=device, BLOCK_SIZE=block)


def s2_pairs(T: int, G: int, H: int) -> int:
    """(query, key) pairs the S2 mask allows, summed over heads: g(g+1)/2 per group of g tokens."""
    def per_head(first: int) -> int:               # first: where the head's second group starts
        bounds = [0, *range(first, T, G), T]
        return sum((b - a) * (b - a + 1) // 2 for a, b in zip(bounds, bounds[1:]))
    return (H - H // 2) * per_head(G) + H // 2 * per_head(G // 2 if G < T else G)


MASK_CASES = [(64, 16, 4), (100, 24, 4), (37, 8, 3), (50, 64, 4), (48, 48, 2), (96, 32, 1), (130, 40, 5)]


def mask_checks(T: int, G: int, H: int, block: int = 16) -> dict:
    """Our mask_mod against s2_mask: evaluated on the index grid (create_mask), as the block mask
    FlexAttention skips blocks by (to_dense: (H, T/bs, T/bs), 1 where a block holds an allowed
    pair), and the pair count behind the TFLOP/s figures."""
    ref = s2_mask(T, G, H)                                                 # (H, T, T)
    dense = create_mask(s2_mask_mod(T, G, H), 1, H, T, T, device="cpu")[0]    # (H, T, T)
    n = -(-T // block)                                                     # blocks per side
    pooled = F.pad(ref, (0, n * block - T, 0, n * block - T)).view(H, n, block, n, block).any(4).any(2)   # (H, n, n)
    blocks = s2_block_mask(T, G, H, "cpu", block).to_dense()[0, :, :n, :n].bool()    # (H, n, n)
    checks = dict(elements_equal=torch.equal(dense, ref), blocks_equal=torch.equal(blocks, pooled),
                  pairs_equal=s2_pairs(T, G, H) == int(ref.sum()))
    return dict(check="mask", T=T, G=G, H=H, **checks, ok=all(checks.values()))


def flex_cpu_check(B: int, H: int, Hkv: int, T: int, D: int, G: int) -> dict:
    """Eager FlexAttention on CPU tensors (it materializes the scores; no backward on the CPU)."""
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    with warnings.catch_warnings():                # "called without torch.compile": eager on purpose
        warnings.simplefilter("ignore", UserWarning)
        out = flex_attention(q, k, v, block_mask=s2_block_mask(T, G, H, "cpu", 32), enable_gqa=Hkv != H)
    err = (out - s2_attention_reference(q, k, v, G)).abs().max().item()
    return dict(check="flex eager forward vs reference, fp32", T=T, G=G, H=H, Hkv=Hkv, D=D, max_err=err, ok=err < 1e-4)


def section_cpu(budget: Budget, rec: Record, args):
    rec.note(f"torch {torch.__version__}: create_mask, create_block_mask(...).to_dense() and eager flex_attention "
             "on CPU tensors, against s2attn_kernel.s2_mask and s2_attention_reference")
    for T, G, H in MASK_CASES:                     # ragged T, G >= T, G == T, odd H, a single head
        rec.row(**mask_checks(T, G, H))
    for case in ((1, 4, 2, 96, 32, 24), (2, 6, 3, 70, 16, 32)):   # (B, H, Hkv, T, D, G): GQA, ragged
        rec.row(**flex_cpu_check(*case))


# ----------------------------------------------------------------------------------------------
# 1. The tests that mean something on CUDA

def cuda_test_ids(tests_dir: Path = ROOT / "tests", compile_tests: bool = True) -> list[str]:
    """Module-level tests with a decorator naming cuda (skipif(not torch.cuda.is_available()))
    and, with compile_tests, those with "compile" in their name (kernels built by that machine's Triton)."""
    ids = []
    for path in sorted(tests_dir.glob("test_*.py")):
        if path.name == "test_gpu_check.py":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                decorators = " ".join(ast.unparse(d) for d in node.decorator_list)
                if "cuda" in decorators or (compile_tests and "compile" in node.name):
                    ids.append(f"tests/{path.name}::{node.name}")
    return ids


def junit_outcomes(xml_path: Path) -> list[dict]:
    """One dict per test case of a pytest JUnit XML file: test, outcome, seconds, message."""
    rows = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        bad = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        outcome = "passed" if bad is None else {"failure": "failed", "error": "error", "skipped": "skipped"}[bad.tag]
        rows.append(dict(test=f"{case.get('classname')}::{case.get('name')}", outcome=outcome,
                         seconds=float(case.get("time", 0)),
                         message="" if bad is None else bad.get("message", "")[:200]))
    return rows


WITHOUT_PYTEST = [["benchmarks/s2attn.py", "--check"], ["s2attn_kernel.py", "--compile"]]   # what those tests run


def section_tests(budget: Budget, rec: Record, args):
    ids, logs = cuda_test_ids(compile_tests=not args.smoke), Path(args.out) / "logs"   # compiling on a CPU: minutes
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # conftest.py only setdefaults it: the kernels run compiled
    if importlib.util.find_spec("pytest") is None:
        rec.note("pytest is not installed here: the commands the CUDA and compile tests run, by exit status")
        for script in WITHOUT_PYTEST:
            t0, log = time.monotonic(), logs / f"{Path(script[0]).stem}.txt"
            rc = run_proc([sys.executable, *script], budget.left(), log, env)
            rec.row(test=" ".join(script), outcome="passed" if rc == 0 else f"exit status {rc}",
                    seconds=time.monotonic() - t0, message=f"output: logs/{log.name}", ok=rc == 0)
        return
    xml = logs / "cuda_tests.xml"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *ids]
    rec.note("TRITON_INTERPRET=0 python -m pytest " + " ".join(ids) + "  (output: logs/cuda_tests.txt)")
    rc = run_proc(cmd, budget.left(), logs / "cuda_tests.txt", env)
    if not xml.is_file():
        raise RuntimeError(f"pytest exit status {rc} (124: past the time budget), no JUnit file: logs/cuda_tests.txt")
    rows = junit_outcomes(xml)
    for r in rows:   # on a GPU machine a CUDA test that skips is a failure of this check
        rec.row(**r, ok=r["outcome"] == "passed" or (r["outcome"] == "skipped" and not torch.cuda.is_available()))
    counts = {o: sum(r["outcome"] == o for r in rows) for o in ("passed", "failed", "error", "skipped")}
    rec.note(", ".join(f"{n} {o}" for o, n in counts.items()) + f"; pytest exit status {rc}")


# ----------------------------------------------------------------------------------------------
# 2. The compiled S2-Attn kernel beside FlexAttention-S2 and SDPA full causal attention

def sdpa_causal(q, k, v, gqa: bool = True):
    """Full causal attention by PyTorch's fused kernel, flash on CUDA; gqa=False repeats k and v."""
    if not gqa:
        k, v = (x.repeat_interleave(q.size(1) // x.size(1), 1) for x in (k, v))   # (B, H, T, D)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if q.is_cuda else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.size(1) != q.size(1))


def flex_s2(T: int, G: int, H: int, device: str):
    """FlexAttention with the S2 block mask, torch.compile'd on CUDA as its docs say (eager, it
    materializes the scores). A fresh compile per shape: torch.compiler.reset() keeps the recompile
    limit (8) from sending later shapes to the eager path, which at T=32k would need 128 GiB."""
    bm = s2_block_mask(T, G, H, device)
    fn = flex_attention
    if device == "cuda":
        torch.compiler.reset()
        fn = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: fn(q, k, v, block_mask=bm, enable_gqa=k.size(1) != q.size(1))


def median_ms(fn, grads_of: list) -> float:
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA (it flushes L2 between runs)."""
    for x in grads_of:
        x.grad = None
    if torch.cuda.is_available():
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grads_of, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def outputs(fn, q, k, v, grad) -> list[torch.Tensor]:
    """[out, dq, dk, dv] of fn(q, k, v) and the upstream gradient; [out] when q needs no grad."""
    out = fn(q, k, v)
    return [out, *torch.autograd.grad(out, (q, k, v), grad)] if q.requires_grad else [out]


NAMES = ("out", "dq", "dk", "dv")


def try_outputs(impls: dict, name: str, q, k, v, grad, rec: Record, where: dict) -> list | None:
    """outputs() of impls[name]; on an error (a compile failing, say), a row saying so, and the
    implementation leaves `impls`, so that it is not timed."""
    try:
        return outputs(impls[name], q, k, v, grad)
    except Exception as e:
        rec.row(**where, impl=name, error=error_text(e), ok=False)
        impls.pop(name)


def check_vs_fp64(impls: dict, q, k, v, grad, rec: Record, where: dict):
    """Each implementation's max error against an fp64 reference must be at most 2x that of the bf16
    PyTorch reference (the tests' criterion), on the output and on each gradient."""
    ref = lambda *x: s2_attention_reference(*x, where["G"])            # noqa: E731
    exact = outputs(ref, *[x.detach().double().requires_grad_(q.requires_grad) for x in (q, k, v)], grad.double())
    err = lambda xs: [(a.double() - e).abs().max().item() for a, e in zip(xs, exact)]   # noqa: E731
    yard = err(outputs(ref, q, k, v, grad))
    rec.row(**where, check="error vs fp64 (the yardstick)", impl="torch bf16 reference", **dict(zip(NAMES, yard)),
            ok=None)
    for name in list(impls):
        if (res := try_outputs(impls, name, q, k, v, grad, rec, where)) is not None:
            e = err(res)
            rec.row(**where, check="error vs fp64 <= 2x the yardstick", impl=name, **dict(zip(NAMES, e)),
                    ok=all(a <= 2 * b for a, b in zip(e, yard)))


def check_vs_flex(impls: dict, q, k, v, grad, rec: Record, where: dict):
    """Long T, where fp64 is too big: ours against FlexAttention, max |a - b| / max |b| < 2e-2 each."""
    ours, flex = (try_outputs(impls, n, q, k, v, grad, rec, where) for n in ("s2attn", "flex_s2"))
    if ours is not None and flex is not None:
        rel = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, flex)]
        rec.row(**where, check="ours vs flex: max diff / max < 2e-2", impl="s2attn", **dict(zip(NAMES, rel)),
                ok=all(r < 2e-2 for r in rel))


def time_shape(impls: dict, q, k, v, grad, rec: Record, where: dict) -> dict:
    """{name: (forward ms, forward + backward ms)}, the same inputs for every implementation; the
    forward runs with inputs that require grad, as in training (one compiled graph for flex)."""
    times = {}
    for name, fn in impls.items():
        try:
            fwd = median_ms(lambda: fn(q, k, v), [])
            both = median_ms(lambda: fn(q, k, v).backward(grad), [q, k, v]) if q.requires_grad else math.nan
            times[name] = (fwd, both)
        except Exception as e:                     # recorded; the others are still timed
            rec.row(**where, impl=name, error=error_text(e), ok=False)
    return times


def section_kernel(budget: Budget, rec: Record, args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backward = device == "cuda"                    # FlexAttention has no backward on the CPU
    Ts, B, H, Hkv = [int(t) for t in args.T.split(",")], 1, args.heads, args.kv_heads
    rec.note(f"B={B} H={H} Hkv={Hkv} bf16, G = {args.group_size or 'T/4'}; do_bench medians; useful FLOPs: 4*D per "
             "allowed (query, key) pair and head forward, 3.5x that forward + backward (FlashAttention's convention)")
    rec.note(f"anchors (published, not measured here): {ANCHORS}")
    for D in [int(d) for d in args.head_dims.split(",")]:
        last = 20.0                                # seconds the previous shape took, compiles included
        for T in Ts:
            if budget.left() < max(25.0, 1.5 * last):
                rec.note(f"time budget: D={D} T={T} and the shapes after it not run")
                return
            t0 = time.monotonic()
            G = args.group_size or T // 4
            where = dict(D=D, T=T, G=G)
            q = torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16, requires_grad=backward)   # (B, H, T, D)
            k, v = (torch.randn(B, Hkv, T, D, device=device, dtype=torch.bfloat16, requires_grad=backward)
                    for _ in range(2))                                     # (B, Hkv, T, D)
            grad = torch.randn_like(q)
            impls = {"s2attn": lambda q, k, v: s2_attention(q, k, v, G)}
            try:
                impls["flex_s2"] = flex_s2(T, G, H, device)
            except Exception as e:                 # recorded; ours and SDPA still run
                rec.row(**where, impl="flex_s2", error=error_text(e), ok=False)
            try:                                   # 1. correctness (this compiles the kernels)
                if T == Ts[0] and T <= 4096:       # fp64 scores: 8 H T^2 bytes, 4 GiB at T=4k
                    check_vs_fp64(impls, q, k, v, grad, rec, where)
                elif "flex_s2" in impls:
                    check_vs_flex(impls, q, k, v, grad, rec, where)
            except Exception as e:                 # the reference itself (memory, say)
                rec.row(**where, check="correctness", error=error_text(e), ok=False)
            try:                                   # does flash take GQA as it is, in this torch?
                sdpa_causal(q, k, v)
                impls["sdpa_causal"] = sdpa_causal
            except RuntimeError:
                impls["sdpa_causal (k, v repeated)"] = lambda q, k, v: sdpa_causal(q, k, v, gqa=False)
            times = time_shape(impls, q, k, v, grad, rec, where)             # 2. timings
            pairs = {n: s2_pairs(T, G, H) if n in ("s2attn", "flex_s2") else H * T * (T + 1) // 2 for n in impls}
            base = next((t for n, t in times.items() if n.startswith("sdpa")), (math.nan, math.nan))
            for name, (fwd, both) in times.items():
                flops = 4 * D * B * pairs[name]                            # useful forward FLOPs
                rec.row(**where, impl=name, fwd_ms=fwd, fwd_bwd_ms=both, fwd_tflops=flops / fwd / 1e9,
                        fwd_bwd_tflops=3.5 * flops / both / 1e9, fwd_speedup_vs_sdpa=base[0] / fwd,
                        fwd_bwd_speedup_vs_sdpa=base[1] / both)
            print(f"  D={D} T={T} G={G} (fwd / fwd+bwd ms): "
                  + ", ".join(f"{n} {f:.2f} / {b:.2f}" for n, (f, b) in times.items()), flush=True)
            del q, k, v, grad, impls
            if device == "cuda":
                torch.cuda.empty_cache()
            last = time.monotonic() - t0


# ----------------------------------------------------------------------------------------------
# 3. JMLR training steps at the SmolLM2-135M / MiniLM shapes, random weights

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, tie_word_embeddings=True, rope_theta=1e5,
               max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
LLAMA2_STEP = dict(N=30, m=10, k=7, doc_tokens=180, batch=4, group=512, doc_words=200)   # train.py's llama2 preset
TOY_LLM = dict(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
TOY_BERT = dict(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
TOY_STEP = dict(N=4, m=3, k=2, doc_tokens=24, batch=2, group=16, doc_words=30)


def write_random_models(tmp: Path, llm_shape: dict, bert_shape: dict, doc_tokens: int) -> list[str]:
    """tmp/llm (config, safetensors, word-level tokenizer.json) and tmp/retriever (ColBERT), random
    weights, as demo.make_demo_models writes them. -> the words w0, w1, ... both vocabularies hold."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    import retriever as rt
    from llama import Llama, LlamaConfig
    words = [f"w{i}" for i in range(bert_shape["vocab_size"] - 7)]
    vocab = ["<pad>", "<s>", "</s>", "<unk>", "Document", "Question", "Answer", ":", ".", "A", "B", "C", "D"] + words
    vocab += [f"x{i}" for i in range(llm_shape["vocab_size"] - len(vocab))]   # unused rows up to the model's V
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece(prefix="##")
    Llama(LlamaConfig(**llm_shape)).save_pretrained(tmp / "llm")
    tok.save(str(tmp / "llm" / "tokenizer.json"))
    (tmp / "llm" / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    bert_vocab = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    wp = HFTokenizer(models.WordPiece({w: i for i, w in enumerate(bert_vocab)}, unk_token="[UNK]"))
    wp.normalizer, wp.pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    rt.ColBERT(rt.BertConfig(**bert_shape), rt.ColBERTConfig(dim=128, doc_maxlen=doc_tokens), wp).save_pretrained(
        tmp / "retriever")
    return words


def synthetic_examples(words: list[str], n: int, N: int, doc_words: int, seed: int) -> list:
    """n jmlr.Examples of random words: a 24-word question, 4 options of 3, N documents of doc_words."""
    from jmlr import Example, format_target
    rng = random.Random(seed)
    text = lambda k: " ".join(rng.choices(words, k=k))                     # noqa: E731
    out = []
    for _ in range(n):
        options = {x: text(3) for x in "ABCD"}
        answer = rng.choice("ABCD")
        out.append(Example(text(24), options, format_target(answer, options[answer]),
                           [text(doc_words) for _ in range(N)], answer=answer))
    return out


def section_jmlr(budget: Budget, rec: Record, args):
    import retriever as rt
    from jmlr import JMLR, JMLRConfig
    from llama import Llama, Tokenizer
    from s2attn_kernel import S2Attention
    from train import mfu
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    llm_shape, bert_shape, s = (TOY_LLM, TOY_BERT, TOY_STEP) if args.smoke else (SMOLLM2, MINILM, LLAMA2_STEP)
    bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    with tempfile.TemporaryDirectory() as tmp:     # 1. random weights, written and read back by the repository's code
        words = write_random_models(Path(tmp), llm_shape, bert_shape, s["doc_tokens"])
        llm = Llama.from_pretrained(Path(tmp) / "llm", device=device)
        model = JMLR(llm, rt.ColBERT.from_pretrained(Path(tmp) / "retriever", device=device),
                     Tokenizer(Path(tmp) / "llm"),
                     JMLRConfig(num_sampled=s["m"], top_k=s["k"], max_doc_tokens=s["doc_tokens"]), pad_id=0).train()
    n_llm, n_ret = sum(p.numel() for p in llm.parameters()), sum(p.numel() for p in model.retriever.parameters())
    rec.note(f"LLM {n_llm / 1e6:.1f}M parameters, retriever {n_ret / 1e6:.1f}M; B={s['batch']} questions x "
             f"N={s['N']} candidates, m={s['m']} sampled, k={s['k']} in the prompt, documents of {s['doc_tokens']} "
             f"tokens; bf16 autocast: {bf16}; median of {args.steps} steps after 2 warm-up steps")
    batches = [synthetic_examples(words, s["batch"], s["N"], s["doc_words"], seed=i) for i in range(2 + args.steps)]
    variants = [("S2-Attn + checkpointing", S2Attention(s["group"]), True),
                ("full causal + checkpointing", None, True), ("full causal, no checkpointing", None, False)]
    for name, attn, ckpt in variants:
        if budget.left() < 15:
            rec.note(f"time budget: '{name}' not run")
            break
        llm.train_attn_fn, llm.gradient_checkpointing = attn, ckpt         # 2. the variant
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times, seen, trained = [], [], []
        for i, batch in enumerate(batches):                                 # 3. steps; the first 2 untimed
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, seen0, trained0 = time.perf_counter(), model.tokens_seen, model.tokens_trained
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, _ = model(batch, generator=torch.Generator().manual_seed(i))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
                seen.append(model.tokens_seen - seen0)
                trained.append(model.tokens_trained - trained0)
        step_s, n_seen, n_trained = statistics.median(times), statistics.median(seen), statistics.median(trained)
        util = mfu((2 * n_llm * n_seen + 4 * n_llm * n_trained) / step_s, device)   # train.py's convention
        rec.row(variant=name, G=s["group"] if attn else None, step_s=step_s, llm_tokens=n_seen,
                trained_tokens=n_trained, gen_T=n_trained // s["batch"], tokens_per_s=n_seen / step_s,
                mfu_pct=None if util is None else 100 * util,
                peak_mib=torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
                loss=loss.item(), ok=math.isfinite(loss.item()))
        print(f"  {name}: {step_s:.3f} s/step, {n_seen / step_s:,.0f} LLM tokens/s", flush=True)
        del opt


# ----------------------------------------------------------------------------------------------
# 4. train.py under torchrun (NCCL on CUDA), DDP and FSDP2, against a plain process

def read_log(log: Path) -> list[dict]:
    """The training lines of a train.py log.jsonl (validation and test lines left out)."""
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []
    return [r for r in lines if "loss" in r and "split" not in r]


def losses_agree(ref: list[float], other: list[float], rtol: float = 2**-6, atol: float = 1e-3) -> bool:
    """Same number of steps, and each loss within atol + rtol |ref| (bf16 keeps 8 significant bits)."""
    return len(ref) == len(other) > 0 and all(abs(a - b) <= atol + rtol * abs(a) for a, b in zip(ref, other))


def section_torchrun(budget: Budget, rec: Record, args):
    out = Path(args.out) / "train"                 # the runs share out/train/demo-data-seed0
    flags = SMALL + [f"--steps={args.train_steps}", "--autocast=bf16"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    rec.note("train.py " + " ".join(flags) + " [--fsdp=True]; torchrun: python -m torch.distributed.run --standalone "
             "--nproc_per_node=1; losses agree: |a - b| <= 1e-3 + 2^-6 |a| at every step")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plain = None
    for name, launcher, extra in (("plain", [sys.executable], []), ("ddp", torchrun, []),
                                  ("fsdp", torchrun, ["--fsdp=True"])):
        if budget.left() < 10:
            rec.note(f"time budget: {name} not run")
            break
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)   # log.jsonl appends: start clean
        t0 = time.monotonic()
        cmd = launcher + [str(ROOT / "train.py"), *flags, *extra, f"--out_dir={run_dir}"]
        log = Path(args.out) / "logs" / f"train_{name}.txt"
        rc = run_proc(cmd, budget.left(), log, env)
        wrapped = {"plain": "not wrapped", "ddp": "DDP", "fsdp": "FSDP2"}[name]   # train.py's "model: ..." line
        said = re.search(r"^model: ([^,]+),", log.read_text(errors="replace"), re.M) if log.is_file() else None
        lines = read_log(run_dir / "log.jsonl")
        losses = [r["loss"] for r in lines]
        plain = losses if name == "plain" else plain
        rec.row(run=name, exit_status=rc, seconds=time.monotonic() - t0, losses=" ".join(f"{x:.4f}" for x in losses),
                max_diff_vs_plain=max((abs(a - b) for a, b in zip(plain, losses)), default=None),
                peak_mib=max((r.get("mem_gb", 0) * 1024 for r in lines), default=None) if torch.cuda.is_available()
                else None,
                wrapped=said and said.group(1), ok=rc == 0 and losses_agree(plain, losses) and bool(said)
                and said.group(1) == wrapped)


# ----------------------------------------------------------------------------------------------
# Running the sections, each in a process of its own, and the report

RUNNERS = {"cpu": section_cpu, "tests": section_tests, "kernel": section_kernel, "jmlr": section_jmlr,
           "torchrun": section_torchrun}


def run_one(name: str, args):
    """The process of one section: run it, then write its status, seconds and peak memory."""
    rec = Record(name, Path(args.out) / "parts" / f"{name}.json")
    t0 = time.monotonic()
    try:
        RUNNERS[name](Budget(args.budget), rec, args)
        rec.data["status"] = "failed" if any(r.get("ok") is False for r in rec.data["rows"]) else "ok"
    except Exception as e:
        rec.data.update(status="error", error=error_text(e), traceback=traceback.format_exc()[-4000:])
        print(rec.data["traceback"], file=sys.stderr)
    rec.data["seconds"] = time.monotonic() - t0
    peaks = [r["peak_mib"] for r in rec.data["rows"] if r.get("peak_mib")]
    if torch.cuda.is_available() and name != "tests":   # pytest's processes are not this one
        peaks.append(torch.cuda.max_memory_allocated() / 2**20)
    rec.data["peak_gpu_mib"] = max(peaks, default=None)
    rec.save()


def fmt(v) -> str:
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 1 \
            else f"{v:.3g}"
    return "-" if v is None else f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def markdown(report: dict) -> str:
    """A summary table of the sections, then each section's notes and rows."""
    lines = ["# GPU check", "", "; ".join(f"{k} {v}" for k, v in report["environment"].items())
             + f"; `{report['command']}`", "", "| section | status | seconds | peak GPU MiB | first note or error |",
             "|---|---|---:|---:|---|"]
    for s in report["sections"]:
        note = (s.get("error") or (s["notes"][0] if s["notes"] else "")).replace("|", "/")
        lines.append(f"| {s['section']} | {s['status']} | {fmt(s['seconds'])} | {fmt(s['peak_gpu_mib'])} | "
                     f"{note[:150]} |")
    for s in report["sections"]:
        lines += ["", f"## {s['section']}: {s['status']}", ""] + [f"- {n}" for n in s["notes"]]
        lines += [f"- error: {s['error']}"] if s.get("error") else []
        for cols in dict.fromkeys(tuple(r) for r in s["rows"]):   # one table per kind of row
            lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(fmt(r[c]).replace("|", "/") for c in cols) + " |"
                      for r in s["rows"] if tuple(r) == cols]
    return "\n".join(lines) + "\n"


def environment() -> dict:
    env = {"torch": torch.__version__}
    for name in ("triton", "transformers"):        # transformers is optional: nothing here needs it
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = "absent"
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())),
                   cuda=torch.version.cuda)
    else:
        env["gpu"] = "none"
    return env


def skip_reason(name: str, args) -> str | None:
    if name not in args.sections.split(","):
        return "not asked for (--sections)"
    if name == "cpu" or args.smoke or (torch.cuda.is_available() and not args.cpu_only):
        return None
    return "skipped: --cpu-only" if args.cpu_only else "skipped: no CUDA GPU on this machine"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("--cpu-only", action="store_true", help="section 0 only; the GPU sections are listed as skipped")
    p.add_argument("--smoke", action="store_true", help="every section at toy sizes here: the numbers mean nothing")
    p.add_argument("--sections", default=",".join(SECTIONS), help="a comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--total", type=float, default=440, help="seconds for all sections (+ startup: < 8 minutes)")
    p.add_argument("--T", default="2048,4096,8192,16384,32768", help="section 2: sequence lengths")
    p.add_argument("--head-dims", default="128,64", help="section 2: head dims, in this order")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--group-size", type=int, default=0, help="section 2: a fixed G; 0: G = T/4")
    p.add_argument("--steps", type=int, default=5, help="section 3: timed steps per variant")
    p.add_argument("--train-steps", type=int, default=3, help="section 4: train.py steps per run")
    p.add_argument("--only", help="internal: run this one section in this process")
    p.add_argument("--budget", type=float, default=60, help="internal: the --only section's seconds")
    args = p.parse_args()
    args.out = str(Path(args.out).resolve())       # subprocesses run from the repository root
    if args.smoke:
        args.T, args.head_dims, args.heads, args.kv_heads, args.steps, args.train_steps = "256,512", "64", 4, 2, 2, 2
    if args.only:
        return run_one(args.only, args)

    out, start = Path(args.out), time.monotonic()
    skips = {name: skip_reason(name, args) for name in SECTIONS}
    runs = [name for name in SECTIONS if skips[name] is None]
    report = {"environment": environment(), "command": " ".join(["python", *sys.argv]), "sections": []}
    print(f"gpu_check: {report['environment']}", flush=True)
    for name in SECTIONS:
        later = sum(SECTIONS[n] for n in runs[runs.index(name) + 1:]) if name in runs else 0
        budget = args.total - (time.monotonic() - start) - later    # all but what the later sections need
        short = budget < SECTIONS[name] / 2                         # not even half its nominal time left
        skip = skips[name] or (f"skipped: {budget:.0f} s left of --total={args.total:.0f}" if short else None)
        if skip:
            report["sections"].append(dict(section=name, status="skipped", seconds=0.0, peak_gpu_mib=None, rows=[],
                                           notes=[skip]))
            continue
        print(f"[{name}] budget {budget:.0f} s", flush=True)
        part = out / "parts" / f"{name}.json"
        part.unlink(missing_ok=True)
        t0 = time.monotonic()
        cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], f"--out={out}", f"--only={name}",
               f"--budget={budget:.0f}"]
        rc = run_proc(cmd, budget + 15)            # output live on this console; killed 15 s past its budget
        rec = json.loads(part.read_text()) if part.is_file() else dict(section=name, rows=[], notes=[])
        if rec.get("status") in (None, "running"):   # it died or was killed: keep what it recorded
            rec.update(status="error", seconds=time.monotonic() - t0, peak_gpu_mib=rec.get("peak_gpu_mib"),
                       error=f"the section's process ended with exit status {rc} (124: killed past its budget)")
        report["sections"].append(rec)
        print(f"[{name}] {rec['status']} in {rec['seconds']:.0f} s" + (f": {rec['error']}" if rec.get("error") else ""),
              flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(clean(report), indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    print("\n" + markdown(report))
    print(f"wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'} in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
