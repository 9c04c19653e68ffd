"""Benchmark: one CPU training step (forward + backward + AdamW) of llama.py against transformers.

Target: at the SmolLM2-135M shape (V=49152, C=576, F=1536, 30 layers, H=9, Hkv=3, D=64, tied
embeddings), B=4 x T=256 tokens, fp32, same threads: at least 1.2x the tokens/s of transformers'
LlamaForCausalLM, and no more peak memory.

  1. Weights: random, made once by transformers (seed 0), saved to a temp dir, loaded by all.
  2. Speed: both models in this process, same tokens, same AdamW (lr 1e-4, default foreach), same
     threads; steps alternate ABBA (ours hf, hf ours, ...) so drift hits both; reported: median
     over --steps after --warmup, and the median of per-round ratios (two back-to-back steps).
     Other processes on the cores distort every number: the load average is printed with them.
  3. Memory: each implementation alone in a fresh subprocess (`--only ours|hf`), so one side's
     allocations cannot hide the other's: peak RSS (ru_maxrss), and peak minus RSS after the
     imports (weights, grads, AdamW state, activations; leaves out the ~180 MiB that
     `import transformers` adds). The memory target is judged on the latter.
Each side uses its own training loss (ours: Llama.sequence_loss; HF: labels=), both the mean NLL
over all B*(T-1) next tokens (labels = tokens). HF gets use_cache=False, as in training. transformers
is a test-only dependency: imported here, never by llama.py.

Run (a quiet 2-core CPU takes about 5 minutes):
    python benchmarks/llama_train_step.py [--threads N] [--steps 5] [--warmup 2]
"""

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # llama.py sits one level up
from llama import Llama  # noqa: E402

SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
             rope_theta=1e5, rms_norm_eps=1e-5, max_position_embeddings=8192)


def rss_mib() -> float:
    """Resident memory of this process now (VmRSS in /proc/self/status), in MiB."""
    line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def load(name: str, ckpt: str) -> torch.nn.Module:
    if name == "ours":
        return Llama.from_pretrained(ckpt).train()
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").train()


def make_step(name: str, model: torch.nn.Module, tokens: torch.Tensor, target_tokens: int = 0):
    """A closure running one training step on tokens (B, T), labels = tokens -> (seconds, loss).
    Each side uses its own training-loss path: ours `Llama.sequence_loss` (the output head only
    where labels are set), transformers' `labels=` loss. Both are the mean NLL of the labelled
    next tokens (equal lengths: the mean of sequence means is the token mean). With target_tokens,
    only the last target_tokens positions are labelled, as in JMLR's prompts."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    labels = tokens.clone()
    if target_tokens:   # JMLR's shape: only the answer after the prompt is labelled
        labels[:, :-target_tokens] = -100

    def step() -> tuple[float, float]:
        t0 = time.perf_counter()
        if name == "ours":
            loss = model.sequence_loss(tokens, labels).mean()
        else:
            loss = model(input_ids=tokens, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, loss.item()
    return step


def make_tokens(args) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, SHAPE["vocab_size"], (args.batch, args.seq), generator=g)   # (B, T)


def run_alone(args):
    """--only NAME: one implementation in this fresh process; prints one JSON line."""
    if args.only == "hf":
        import transformers  # noqa: F401  (library code: in the baseline, not in the model's memory)
    # The baseline is taken before loading: both loaders memory-map the safetensors file, so the
    # weights become resident only when first touched, and RSS right after loading undercounts them.
    rss_imports = rss_mib()
    step = make_step(args.only, load(args.only, args.ckpt), make_tokens(args), args.target_tokens)
    times = [step()[0] for _ in range(args.warmup + args.steps)][args.warmup:]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024            # KiB on Linux -> MiB
    print(json.dumps({"median_s": statistics.median(times), "peak_mib": peak, "above_mib": peak - rss_imports}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--steps", type=int, default=5, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--target-tokens", type=int, default=0,
                   help="label only the last N tokens of each sequence (JMLR's shape); 0: all")
    p.add_argument("--only", choices=["ours", "hf"], help="internal: one implementation, for peak RSS")
    p.add_argument("--ckpt", help="internal: the weights directory written by the parent run")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.only:
        return run_alone(args)

    import transformers
    with tempfile.TemporaryDirectory() as ckpt:
        # 1. one set of random weights, in the HF layout, for every model below
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).save_pretrained(ckpt)

        # 2. memory: each implementation alone in a fresh process, one after the other
        alone = {}
        for name in ("ours", "hf"):
            cmd = [sys.executable, __file__, "--only", name, "--ckpt", ckpt] + [
                f"--{k.replace('_', '-')}={getattr(args, k)}"
                for k in ("threads", "steps", "warmup", "batch", "seq", "target_tokens")]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"{shlex.join(cmd)} failed:\n{out.stderr}")
            alone[name] = json.loads(out.stdout.strip().splitlines()[-1])

        # 3. speed: both in this process, same tokens, steps interleaved
        tokens = make_tokens(args)
        steps = {name: make_step(name, load(name, ckpt), tokens, args.target_tokens) for name in ("ours", "hf")}
        times = {name: [] for name in steps}
        load_before = Path("/proc/loadavg").read_text().split()[0]
        for i in range(args.warmup + args.steps):
            losses = {}
            for name in ("ours", "hf") if i % 2 == 0 else ("hf", "ours"):   # ABBA: neither always goes first
                dt, losses[name] = steps[name]()
                if i >= args.warmup:
                    times[name].append(dt)
            # same weights, data and optimizer: the two losses must track each other
            if abs(losses["ours"] - losses["hf"]) > 1e-3 * abs(losses["hf"]):
                raise RuntimeError(f"step {i}: loss ours {losses['ours']:.6f} != hf {losses['hf']:.6f}")
        load_after = Path("/proc/loadavg").read_text().split()[0]

    # 4. report
    n_tok = args.batch * args.seq
    tps = {name: n_tok / statistics.median(t) for name, t in times.items()}
    cpu = next((s.split(":", 1)[1].strip() for s in Path("/proc/cpuinfo").read_text().splitlines()
                if s.startswith("model name")), "unknown")
    print(f"command: {shlex.join(['python', *sys.argv])}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {args.threads}, CPU {cpu} "
          f"({os.cpu_count()} cores); B={args.batch} T={args.seq} fp32; {args.warmup} warm-up + {args.steps} "
          f"timed steps each; final loss ours {losses['ours']:.4f} hf {losses['hf']:.4f}")
    print(f"load average before / after the interleaved run: {load_before} / {load_after}; step s: "
          + "; ".join(f"{n} " + " ".join(f"{t:.2f}" for t in ts) for n, ts in times.items()) + "\n")
    print("| implementation | median step s | tokens/s | tokens/s alone | peak RSS MiB | peak above imports MiB "
          "| tokens/s ratio vs hf |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, label in (("ours", "llama.py"), ("hf", f"transformers {transformers.__version__}")):
        a = alone[name]
        print(f"| {label} | {n_tok / tps[name]:.3f} | {tps[name]:,.0f} | {n_tok / a['median_s']:,.0f} "
              f"| {a['peak_mib']:,.0f} | {a['above_mib']:,.0f} | {tps[name] / tps['hf']:.2f}x |")
    speed, mem = tps["ours"] / tps["hf"], alone["ours"]["above_mib"] / alone["hf"]["above_mib"]
    paired = statistics.median(h / o for o, h in zip(times["ours"], times["hf"]))   # per round: ours/hf tokens/s
    verdict = {True: "met", False: "NOT met"}
    print(f"\nours / transformers: tokens/s {speed:.2f}x (target >= 1.2x: {verdict[speed >= 1.2]}; per-round "
          f"median {paired:.2f}x); peak above imports {mem:.2f}x (target <= 1.0x: {verdict[mem <= 1.0]}); "
          f"whole-process peak RSS {alone['ours']['peak_mib'] / alone['hf']['peak_mib']:.2f}x")
    spread = max(max(t) / min(t) for t in times.values())
    if spread > 1.25:   # on a quiet machine the timed steps of one implementation agree within a few %
        print(f"WARNING: step times of one implementation differ by {spread:.1f}x: other processes were using "
              "the cores, so these timings are not reliable; rerun on a quiet machine")


if __name__ == "__main__":
    main()
