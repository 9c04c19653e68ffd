"""Benchmark: where the time of one JMLR training step goes, and what the cheaper settings buy.

One step of jmlr.JMLR.forward, split into its phases and timed one by one on the same batch:
  score    step 1: the retriever re-encodes the question and its N candidates, MaxSim, with gradients
  gen      step 5: the generation pass of the LLM (top-k documents in the prompt), with gradients
  docs     steps 2-3: m sampled documents, one no-gradient LLM pass each (as one padded batch)
  bwd_llm  backward of L_gen (reaches only the LLM)
  bwd_ret  backward of L_rank (reaches only the retriever)
  adamw    the optimizer step of both models
and the same for a RAG step (frozen retriever: scoring without gradients, no docs / bwd_ret), so
that the JMLR / RAG step-time ratio is measured, not guessed. Variants: bf16 autocast or fp32, the
retriever's documents at their own length (180 WordPiece tokens) or cut to what the prompt keeps.

Reads the smollm2-medmcqa preset's data (benchmarks/real_data.py medmcqa-exp) and a candidates
file; the first --batch training questions are the batch. Median of --repeats after one warm-up.

Run (a quiet 2-core CPU, one thread: about 10 minutes):
    OMP_NUM_THREADS=1 python benchmarks/jmlr_step_profile.py --candidates runs/cmp/candidates.jsonl
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from jmlr import RETRIEVER_LOSSES, sample_documents, tokenize_example  # noqa: E402

PHASES = ("score", "gen", "docs", "bwd_llm", "bwd_ret", "adamw")


def step_phases(model, optimizer, batch, cfg, objective: str) -> dict[str, float]:
    """Seconds per phase of one training step of `objective` ("jmlr" or "rag") on `batch`."""
    times, c, device = {}, cfg.jmlr, torch.device("cpu")
    t = time.perf_counter()

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        times[name] = now - t
        t = now
    with train.autocast(cfg, device):
        with torch.set_grad_enabled(objective == "jmlr"):
            scores = model.score_candidates(batch)                                   # (B, N)
        lap("score")
        docs, _ = model.top_documents(batch, scores)
        rows = [tokenize_example(model.tok, d, ex.question, ex.options, ex.target, c.max_doc_tokens)
                for ex, d in zip(batch, docs)]
        loss_gen = model.llm_losses(rows).mean()
        lap("gen")
        if objective == "jmlr":
            gen = torch.Generator().manual_seed(0)
            picked = sample_documents(scores, min(c.num_sampled, scores.size(1)), c.tau, c.minmax_scale, gen)
            losses = model.document_losses(batch, picked)                            # (B, m), no gradient
            loss_ret = RETRIEVER_LOSSES["jmlr"](scores.gather(1, picked), losses, c)
            lap("docs")
    loss_gen.backward()
    lap("bwd_llm")
    if objective == "jmlr":
        (c.rank_weight * loss_ret).backward()
        lap("bwd_ret")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lap("adamw")
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--candidates", required=True, help="a candidates file of the preset's questions")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="timed steps after the warm-up one (at least 1)")
    args = p.parse_args()
    if args.repeats < 1 or args.batch < 1:
        raise SystemExit("jmlr_step_profile.py: --repeats and --batch must be at least 1")
    print(f"threads {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), "
          f"load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}")
    print("| objective | autocast | retriever doc tokens | " + " | ".join(PHASES) + " | step (s) |\n"
          + "|---" * (len(PHASES) + 4) + "|")
    for autocast in ("bf16", "off"):
        for doc_maxlen in (0, 80):
            cfg = train.parse_args(["--preset=smollm2-medmcqa", f"--candidates={args.candidates}",
                                    f"--autocast={autocast}", f"--doc_maxlen={doc_maxlen}", "--out_dir=runs/profile"])
            batch = train.prepare(cfg, 0)[0][:args.batch]
            for objective in ("rag", "jmlr"):
                cfg.jmlr.objective = objective
                model = train.build_model(cfg, torch.device("cpu")).train()
                optimizer = train.make_optimizer(model, cfg)
                runs = [step_phases(model, optimizer, batch, cfg, objective) for _ in range(args.repeats + 1)][1:]
                median = {ph: statistics.median(r.get(ph, 0.0) for r in runs) for ph in PHASES}
                cells = " | ".join(f"{median[ph]:.2f}" if median[ph] else "-" for ph in PHASES)
                print(f"| {objective} | {autocast} | {doc_maxlen or 180} | {cells} | {sum(median.values()):.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
