"""benchmarks/paired.py: the tables of a none / RAG / JMLR comparison (benchmarks/real_data_compare.sh).

Reads, for every seed S and row X in OUT: seedS-X.eval.json (eval.py --out on the test questions),
seedS-X.helpful.json (eval.py --helpfulness, trained and initial retriever) and seedS-X/X/log.jsonl
(train.py's log), and prints Markdown:
  - accuracy per row and seed with its 95% interval, for each scoring rule;
  - paired differences (JMLR - RAG, RAG - none, JMLR - none) on the same questions, per seed and
    pooled over the seeds; the pooled interval is a bootstrap over questions (each resampled
    question keeps all its seeds, since one question's answers under three seeds are not independent);
  - recall@1 of the gold document and helpfulness agreement, initial retriever against trained;
  - whether the trained LLM reads: how often the gold document is the one that lowers its loss most;
  - what the rank loss saw during training (per-document loss spread, rank agreement) and the
    training time of each row, so the JMLR / RAG step-time ratio.

Run:
    python benchmarks/paired.py runs/cmp            # after benchmarks/real_data_compare.sh
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np

ROWS = ("none", "rag", "jmlr")
PAIRS = (("jmlr", "rag"), ("rag", "none"), ("jmlr", "none"))


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def paired_interval(diffs: np.ndarray, resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """diffs (questions, seeds) of correct(a) - correct(b) -> mean and a 95% percentile interval
    from a bootstrap over questions (rows), every seed of a drawn question kept together."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(diffs), size=(resamples, len(diffs)))
    means = diffs.mean(1)[draws].mean(1)
    return float(diffs.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def read_json(path: Path) -> dict:
    # eval.py writes NaN and Infinity as Python's json does; json.loads reads them back
    return json.loads(path.read_text())


def correct_by_question(evaluation: dict, rule: str) -> dict[str, bool]:
    return {q["id"]: bool(q["correct"]) for q in evaluation["questions"] if q.get("score") == rule}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="the comparison's directory (OUT of real_data_compare.sh)")
    p.add_argument("--rules", nargs="+", default=["mean", "sum", "letter"], help="eval.py scoring rules to tabulate")
    args = p.parse_args()
    seeds = sorted({int(f.name[4:].split("-")[0]) for f in args.out.glob("seed*-*.eval.json")})
    if not seeds:
        raise SystemExit(f"paired.py: {args.out}: no seedS-ROW.eval.json files; run benchmarks/real_data_compare.sh first")
    evals = {(s, r): read_json(args.out / f"seed{s}-{r}.eval.json") for s in seeds for r in ROWS
             if (args.out / f"seed{s}-{r}.eval.json").is_file()}
    print(f"seeds {seeds}; rows {sorted({r for _, r in evals})}\n")
    # RAG's retriever is the initial one, frozen and the same in every seed: where a seed has no RAG row,
    # its retrieval figures "before" come from another seed's
    frozen = next((e for (_, r), e in sorted(evals.items()) if r == "rag"), None)
    helpful = {(s, r): read_json(args.out / f"seed{s}-{r}.helpful.json") for s in seeds for r in ("rag", "jmlr")
               if (args.out / f"seed{s}-{r}.helpful.json").is_file()}
    print("answers given (first rule):", "; ".join(f"{r} seed {s} {e['results'][0].get('predicted')}"
                                                   for (s, r), e in sorted(evals.items())))
    if frozen is not None:
        found = [q["gold_rank"] != math.inf for q in frozen["questions"] if q.get("score") == frozen["results"][0]["score"]]
        print(f"gold document among the candidates (the initial retriever's lists): {np.mean(found):.3f}\n")

    for rule in args.rules:
        print(f"### accuracy (%), rule `{rule}`, 95% Wilson intervals\n")
        print("| row | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |\n|---" * 1 + "|---" * (len(seeds) + 1) + "|")
        table = {}
        for r in ROWS:
            cells, accs = [], []
            for s in seeds:
                if (s, r) not in evals:
                    cells.append("-")
                    continue
                c = correct_by_question(evals[s, r], rule)
                table[s, r] = c
                k, n = sum(c.values()), len(c)
                lo, hi = wilson(k, n)
                accs.append(k / n)
                cells.append(f"{100 * k / n:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] (n={n})")
            print(f"| {r} | " + " | ".join(cells) + (f" | {100 * np.mean(accs):.1f} |" if accs else " | - |"))
        print(f"\n### paired differences (points), rule `{rule}`: per seed, and pooled with a bootstrap over questions\n")
        print("| difference | " + " | ".join(f"seed {s}" for s in seeds) + " | pooled [95% interval] |\n"
              + "|---" * (len(seeds) + 2) + "|")
        for a, b in PAIRS:
            common = [s for s in seeds if (s, a) in table and (s, b) in table]
            if not common:
                continue
            ids = sorted(set.intersection(*(set(table[s, a]) & set(table[s, b]) for s in common)))
            diffs = np.array([[table[s, a][i] - table[s, b][i] for s in common] for i in ids], dtype=float)
            per_seed = [f"{100 * diffs[:, common.index(s)].mean():+.1f}" if s in common else "-" for s in seeds]
            mean, lo, hi = paired_interval(diffs)
            print(f"| {a} - {b} | " + " | ".join(per_seed) + f" | {100 * mean:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] |")
        print()

    print("### retrieval on the test questions: trained retriever (initial in brackets; recall@1 on all of them,\n"
          "helpfulness on the first n)\n")
    print("| row | seed | recall@1 | helpful agreement | helpful@1 | n helpfulness |\n|---|---|---|---|---|---|")
    for s in seeds:
        for r in ("rag", "jmlr"):
            if (s, r) not in helpful:
                continue
            rows = {row["retriever"]: row for row in helpful[s, r]["results"]}
            trained = rows.get("trained", {})
            initial = next((v for k, v in rows.items() if k != "trained"), {})
            # recall@1 on all test questions: the row's own retriever, and the initial one (RAG's, frozen)
            recall = {x: e["results"][0].get("recall@1", math.nan) if e else math.nan
                      for x, e in ((r, evals.get((s, r))), ("rag", frozen))}
            cell = lambda key: f"{trained.get(key, math.nan):.3f} ({initial.get(key, math.nan):.3f})"  # noqa: E731
            print(f"| {r} | {s} | {recall[r]:.3f} ({recall['rag']:.3f}) | {cell('helpful_agreement')} | "
                  f"{cell('helpful@1')} | {trained.get('n', '-')} |")

    agree = {}     # seed -> {question: trained agreement - initial agreement}
    for s in seeds:
        if (s, "jmlr") in helpful:
            by = {}
            for h in helpful[s, "jmlr"]["helpfulness"]:
                by.setdefault(h["id"], {})["trained" if h["retriever"] == "trained" else "initial"] = h["agreement"]
            agree[s] = {q: a["trained"] - a["initial"] for q, a in by.items()
                        if len(a) == 2 and not math.isnan(a["trained"] - a["initial"])}
    if agree:
        ids = sorted(set.intersection(*(set(a) for a in agree.values())))
        mean, lo, hi = paired_interval(np.array([[agree[s][q] for s in agree] for q in ids]))
        print(f"\nhelpfulness agreement, JMLR's trained retriever - the initial one, pooled over seeds {sorted(agree)} "
              f"({len(ids)} questions, bootstrap over questions): {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]")

    print("\n### does the LLM read? its loss given the gold document, the other candidates, no document (trained "
          "JMLR LLM, helpfulness questions whose gold document is a candidate)\n")
    print("| seed | n | gold most helpful | chance | loss: gold | others (mean) | none |\n|---|---|---|---|---|---|---|")
    for s in seeds:
        reports = [h for h in helpful.get((s, "jmlr"), {}).get("helpfulness", []) if h["retriever"] == "trained" and h.get("gold")
                   and any(d["id"] == h["gold"] for d in h["documents"])]
        if not reports:
            continue
        gold = [next(d["loss"] for d in h["documents"] if d["id"] == h["gold"]) for h in reports]
        others = [np.mean([d["loss"] for d in h["documents"] if d["id"] != h["gold"]]) for h in reports]
        print(f"| {s} | {len(reports)} | {np.mean([h['most_helpful'] == h['gold'] for h in reports]):.3f} | "
              f"{np.mean([1 / len(h['documents']) for h in reports]):.3f} | {np.mean(gold):.3f} | {np.mean(others):.3f} | "
              f"{np.mean([h['no_document'] for h in reports]):.3f} |")

    hits = {}      # (seed, row) -> {question: gold document ranked first}
    for (s, r), e in evals.items():
        hits[s, r] = {q["id"]: q.get("gold_rank") == 1 for q in e["questions"] if q.get("score") == args.rules[0]}
    if frozen is not None:
        before = {q["id"]: q.get("gold_rank") == 1 for q in frozen["questions"] if q.get("score") == args.rules[0]}
        hits.update({(s, "rag"): before for s in seeds})
    common = [s for s in seeds if (s, "jmlr") in hits and (s, "rag") in hits]
    if common:
        ids = sorted(set.intersection(*(set(hits[s, "jmlr"]) for s in common)))
        diffs = np.array([[hits[s, "jmlr"][i] - hits[s, "rag"][i] for s in common] for i in ids], dtype=float)
        mean, lo, hi = paired_interval(diffs)
        print(f"\nrecall@1, JMLR's trained retriever - the initial one, pooled over seeds {common} "
              f"(bootstrap over questions): {100 * mean:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]")
    print("\n### training: what the rank loss saw (first -> last logged step) and time per row\n")
    print("| row | seed | loss_gen | loss_spread | rank_agreement | recall_at_k | seconds |\n|---|---|---|---|---|---|---|")
    for s in seeds:
        for r in ROWS:
            log = args.out / f"seed{s}-{r}" / r / "log.jsonl"
            if not log.is_file():
                continue
            lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
            steps = [x for x in lines if "loss_gen" in x]
            span = lambda key: (f"{steps[0][key]:.3f} -> {steps[-1][key]:.3f}"  # noqa: E731
                                if steps and key in steps[0] else "-")
            results = args.out / f"seed{s}-{r}" / "results.json"
            seconds = read_json(results)[r]["seconds"] if results.is_file() else "-"
            print(f"| {r} | {s} | {span('loss_gen')} | {span('loss_spread')} | {span('rank_agreement')} | "
                  f"{span('recall_at_k')} | {seconds} |")


if __name__ == "__main__":
    main()
