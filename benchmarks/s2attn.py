"""Benchmark: the S2-Attn Triton kernel (s2attn_kernel.py) against full causal attention and LongLoRA's recipe.

Requirement, on an H100, bf16, B=1, H=32, D=128, G=T/4, T in {2k, 4k, 8k, 16k, 32k}:
  - throughput on useful FLOPs at least 0.9x that of PyTorch SDPA's full causal attention (flash);
  - at least 3x faster than full causal attention at T=16k (S2-Attn does 4x fewer useful FLOPs);
  - faster than the LongLoRA recipe (shift half the heads, reshape into groups, SDPA per group) at
    every T.
The script prints these verdicts; it asserts nothing.

How it measures:
  1. Correctness first, on the GPU's own kernels (the tests run them in the interpreter): at T=1024,
     GQA and plain heads, the kernel's and PyTorch's bf16 errors against an fp64 reference, with the
     test suite's criterion (kernel error <= 2x PyTorch's on out, dq, dk, dv).
  2. Same inputs for all three implementations: q, k, v (B, H, T, D) ~ N(0, 1) and one upstream
     gradient. SDPA runs under sdpa_kernel(FLASH_ATTENTION), also inside the LongLoRA recipe.
  3. Time: CUDA events around the forward alone, and around forward + backward; the three
     implementations alternate inside each repetition so that clock drift hits all of them; the
     median over --reps after --warmup repetitions is reported.
  4. Useful FLOPs: 4 * D per (query, key) pair that the mask allows (two matmuls of 2 FLOPs per
     multiply-add), times B * H; the backward does 5 matmuls to the forward's 2, so forward +
     backward counts 3.5x. Full causal: T(T+1)/2 pairs; S2-Attn: g(g+1)/2 per group of size g.
     Masked-out pairs that a kernel computes anyway do not count.
  5. Peak memory: torch.cuda.max_memory_allocated during one forward + backward, minus what was
     allocated before it (the inputs).

Run (on a GPU; a few minutes):
    python benchmarks/s2attn.py [--T 2048,4096,8192,16384,32768] [--heads 32] [--head-dim 128] [--reps 20]
Correctness only (tests/test_s2attn.py runs this when CUDA is present):
    python benchmarks/s2attn.py --check
Check the script itself on a CPU, through the Triton interpreter (tiny sizes, the numbers mean nothing):
    TRITON_INTERPRET=1 python benchmarks/s2attn.py --smoke
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # s2attn_kernel.py sits one level up
from s2attn_kernel import INTERPRET, s2_attention, s2_attention_reference  # noqa: E402


def sdpa_causal(q, k, v, group_size=None):
    """Full causal attention, PyTorch's fused kernel (flash on CUDA)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.size(1) != q.size(1))


def longlora_attention(q, k, v, group_size):
    """LongLoRA's recipe (Chen et al. 2023, llama_attn_replace.py) in the (B, H, T, D) layout: roll the
    second half of the heads by -G/2, reshape into T/G groups, causal SDPA per group, roll back.
    Its torch.roll wraps the last G/2 tokens in front of the first ones: it leaks, and is here for
    its speed only. Needs T % G == 0 and H == Hkv."""
    B, H, T, D = q.shape
    G = group_size

    def to_groups(x):   # (B, H, T, D) -> (B * T/G, H, G, D)
        x = torch.cat([x[:, :H // 2], x[:, H // 2:].roll(-G // 2, dims=2)], dim=1)
        return x.view(B, H, T // G, G, D).transpose(1, 2).reshape(B * T // G, H, G, D)

    out = F.scaled_dot_product_attention(to_groups(q), to_groups(k), to_groups(v), is_causal=True)
    out = out.view(B, T // G, H, G, D).transpose(1, 2).reshape(B, H, T, D)   # (B, H, T, D)
    return torch.cat([out[:, :H // 2], out[:, H // 2:].roll(G // 2, dims=2)], dim=1)


def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def s2_pairs(T: int, G: int, H: int) -> int:
    """(query, key) pairs S2-Attn's mask allows, summed over heads: g(g+1)/2 per group of size g."""
    total = 0
    for shifted in [False] * (H - H // 2) + [True] * (H // 2):     # the last H//2 heads are shifted
        first = G // 2 if shifted and G < T else G                  # end of the first group (G >= T: no shift)
        bounds = [0] + list(range(first, T, G)) + [T]
        total += sum(causal_pairs(b - a) for a, b in zip(bounds, bounds[1:]))
    return total


class Timer:
    """Milliseconds of fn(), CUDA events on a GPU, wall clock on a CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)


def check_correctness(device: str, D: int, T: int) -> bool:
    """The test suite's criterion on this machine's kernels: bf16 error <= 2x PyTorch's bf16 error."""
    ok = True
    for H, Hkv in ((4, 4), (4, 2)):
        G = T // 4
        q = torch.randn(1, H, T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, Hkv, T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, Hkv, T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(1, H, T, D, device=device, dtype=torch.bfloat16)
        results = []
        for fn, inputs, g in ((s2_attention, (q, k, v), grad),
                              (s2_attention_reference, (q, k, v), grad),
                              (s2_attention_reference, [x.detach().double().requires_grad_() for x in (q, k, v)],
                               grad.double())):
            out = fn(*inputs, G)
            results.append((out, *torch.autograd.grad(out, inputs, g)))
        kernel, torch_bf16, exact = results
        for name, a, b, e in zip(("out", "dq", "dk", "dv"), kernel, torch_bf16, exact):
            err_a, err_b = (a.double() - e).abs().max().item(), (b.double() - e).abs().max().item()
            good = err_a <= 2 * err_b and torch.isfinite(a).all().item()
            ok &= good
            print(f"  check H={H} Hkv={Hkv} T={T} {name}: kernel err {err_a:.2e}, PyTorch bf16 err {err_b:.2e}"
                  f"{'' if good else '  <-- FAIL'}")
    return ok


def measure(impls: dict, B: int, H: int, T: int, D: int, G: int, device: str, dtype, reps: int, warmup: int):
    """{name: (forward ms, forward+backward ms, peak MiB)} for the same inputs."""
    make = lambda: torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True)   # noqa: E731
    q, k, v = make(), make(), make()
    grad = torch.randn(B, H, T, D, device=device, dtype=dtype)
    timer = Timer(device)
    times = {name: ([], []) for name in impls}                      # name -> (fwd ms list, fwd+bwd ms list)
    for rep in range(warmup + reps):
        for name, fn in impls.items():                              # alternate implementations
            with torch.no_grad():                                   # 1. forward alone, nothing saved
                t_fwd = timer(lambda: fn(q, k, v, G))
            q.grad = k.grad = v.grad = None                         # no gradient accumulation in the timing
            t_all = timer(lambda: fn(q, k, v, G).backward(grad))    # 2. forward + backward
            if rep >= warmup:
                times[name][0].append(t_fwd)
                times[name][1].append(t_all)
    result = {}
    for name, fn in impls.items():                                  # 3. peak memory, one run each, alone
        peak = float("nan")
        if device == "cuda":
            q.grad = k.grad = v.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn(q, k, v, G).backward(grad)
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
        result[name] = (statistics.median(times[name][0]), statistics.median(times[name][1]), peak)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", default="2048,4096,8192,16384,32768", help="comma-separated sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (needs TRITON_INTERPRET=1)")
    p.add_argument("--check", action="store_true", help="the correctness check only; exit status 1 if it fails")
    args = p.parse_args()
    if args.smoke:
        if not INTERPRET:
            sys.exit("--smoke runs the kernels on the CPU: set TRITON_INTERPRET=1")
        device, Ts, H, D, reps, warmup = "cpu", [256, 512], 2, 64, 1, 0
    else:
        if not torch.cuda.is_available():
            sys.exit("this benchmark needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1 to check the script)")
        device, Ts, H, D, reps, warmup = "cuda", [int(t) for t in args.T.split(",")], args.heads, args.head_dim, \
            args.reps, args.warmup
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    B, dtype = args.batch, torch.bfloat16

    print("correctness (kernels as launched on this device):")
    correct = check_correctness(device, D, 256 if args.smoke else 1024)
    if args.check:
        sys.exit(0 if correct else 1)

    impls = {"s2attn": s2_attention, "sdpa_causal": sdpa_causal, "longlora": longlora_attention}
    print(f"\nB={B} H={H} D={D} bf16, G=T/4; median of {reps} reps; TFLOP/s on useful FLOPs; peak = fwd+bwd MiB")
    print(f"{'T':>6} {'impl':<12} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd TF/s':>9} {'f+b TF/s':>9} {'peak MiB':>9}")
    verdicts = []
    for T in Ts:
        G = T // 4
        # useful (query, key) pairs per implementation; LongLoRA's groups are all full-size
        pairs = {"s2attn": s2_pairs(T, G, H), "sdpa_causal": H * causal_pairs(T),
                 "longlora": H * (T // G) * causal_pairs(G)}
        backend = SDPBackend.FLASH_ATTENTION if device == "cuda" else SDPBackend.MATH   # no flash on CPU
        with sdpa_kernel(backend):
            res = measure(impls, B, H, T, D, G, device, dtype, reps, warmup)
        tflops = {}                                                 # name -> (fwd, fwd+bwd) TFLOP/s
        for name, (fwd, both, peak) in res.items():
            flops = 4 * D * B * pairs[name]
            tflops[name] = (flops / fwd / 1e9, 3.5 * flops / both / 1e9)
            print(f"{T:>6} {name:<12} {fwd:>9.3f} {both:>11.3f} {tflops[name][0]:>9.1f} {tflops[name][1]:>9.1f} "
                  f"{peak:>9.0f}")
        ours, sdpa, ll = res["s2attn"], res["sdpa_causal"], res["longlora"]
        eff = tflops["s2attn"][1] / tflops["sdpa_causal"][1]
        print(f"{'':>6} ratios: useful TFLOP/s vs SDPA fwd {tflops['s2attn'][0] / tflops['sdpa_causal'][0]:.2f}x, "
              f"fwd+bwd {eff:.2f}x; speed-up over SDPA {sdpa[1] / ours[1]:.2f}x; over LongLoRA {ll[1] / ours[1]:.2f}x")
        verdicts.append((f"T={T}: useful-FLOP throughput (fwd+bwd) >= 0.9x SDPA", eff >= 0.9))
        verdicts.append((f"T={T}: faster than LongLoRA (fwd and fwd+bwd)", ours[0] < ll[0] and ours[1] < ll[1]))
        if T == 16384:
            verdicts.append(("T=16k: >= 3x faster than full causal attention (fwd+bwd)", sdpa[1] / ours[1] >= 3))
    print("\nverdicts" + (" (smoke run on CPU: meaningless)" if args.smoke else "") + ":")
    print(f"  {'PASS' if correct else 'FAIL'}  kernel errors within 2x PyTorch's bf16 errors")
    for text, ok in verdicts:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")


if __name__ == "__main__":
    main()
