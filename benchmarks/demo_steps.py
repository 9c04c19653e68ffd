"""Benchmark: the built-in demo's training steps in fp32 against bf16 autocast, side by side.

Trains each row (none, RAG, JMLR; no curriculum, so every JMLR step has its per-document passes)
for --steps steps on the demo's data, fp32 and bf16 alternated in one process, --repeats times,
and prints seconds per row. BENCHMARKS.md ("The built-in demo") has the figures.

    python benchmarks/demo_steps.py                 # torch's default threads (2 on the 2-core machine)
    python benchmarks/demo_steps.py --threads 1
"""

import argparse
import contextlib
import dataclasses
import io
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="0: torch's default")
    p.add_argument("--out", default="runs/demo-steps", help="scratch directory (demo data and runs)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = train.parse_args([f"--out_dir={args.out}/run", "--compare=()", "--curriculum=0.0", f"--steps={args.steps}",
                             "--log_every=100000", "--eval_helpfulness=0"])
    train_set = train.prepare(base, 0)[0]
    print(f"{args.steps} steps of {base.batch_size} questions, {torch.get_num_threads()} thread(s); seconds")
    print("| repeat | row | fp32 | bf16 |\n|---|---|---|---|")
    for rep in range(args.repeats):
        for objective in ("none", "rag", "jmlr"):
            seconds = {}
            for autocast in ("off", "bf16"):
                cfg = dataclasses.replace(base, autocast=autocast, out_dir=f"{args.out}/{rep}-{objective}-{autocast}",
                                          jmlr=dataclasses.replace(base.jmlr, objective=objective))
                t = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):       # the runs' own log lines
                    train.train(cfg, (train_set, [], []))
                seconds[autocast] = time.perf_counter() - t
            print(f"| {rep} | {objective} | {seconds['off']:.2f} | {seconds['bf16']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
