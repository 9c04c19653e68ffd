"""eval_tables.py: what eval.py prints, as Markdown: the results table (one line per row of eval.py's
--out), accuracy by subject, accuracy against k, the "which documents helped" report of
--helpfulness. (The contamination flags: contamination.py.) Pure functions of what eval.py computes.

A row (eval.main) holds its system (benchmark, checkpoint, retriever, mode, score, k) and the
summary of eval.summarize: n, accuracy, ci95, and optionally by_subject, subject_mean, unparsed,
recall@1, recall@k, mrr, rationale_*, helpful_agreement, helpful@1, helpful@k.
"""

import math
from collections import Counter, defaultdict
from pathlib import Path


def pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def results_table(rows: list[dict]) -> str:
    """One line per row, in the order evaluated: systems side by side for each benchmark. The
    helpfulness columns appear when some row has them (eval.py --helpfulness)."""
    helped = any("helpful@1" in r for r in rows)
    header = ("| benchmark | checkpoint | retriever | mode | score | k | n | accuracy % (95% CI) | subject mean "
              "| unparsed % | recall@1 | recall@k | MRR | rationale F1 | support | judge |")
    header += " agreement % | helpful@1 | helpful@k |" if helped else ""
    lines = [header, "|" + "---|" * header.count(" |")]
    for r in rows:
        acc = f"{pct(r['accuracy'])} ({pct(r['ci95'][0])}-{pct(r['ci95'][1])})"
        cells = [r["benchmark"], r["checkpoint"], r["retriever"], r["mode"], r["score"] or "-", r["k"], f"{r['n']:,}",
                 acc, pct(r.get("subject_mean")), pct(r.get("unparsed")), pct(r.get("recall@1")),
                 pct(r.get(f"recall@{r['k']}")), pct(r.get("mrr")), pct(r.get("rationale_f1")),
                 pct(r.get("rationale_support")), pct(r.get("rationale_judge"))]
        if helped:
            cells += [pct(r.get("helpful_agreement")), pct(r.get("helpful@1")), pct(r.get(f"helpful@{r['k']}"))]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def system(r: dict) -> str:
    """'checkpoint / retriever / mode (score) / k=7', the column name of a row in the tables below."""
    mode = f"{r['mode']} ({r['score']})" if r["score"] else r["mode"]
    return f"{Path(r['checkpoint']).name} / {Path(r['retriever']).name} / {mode}" + (f" / k={r['k']}" if r["k"] else "")


def subject_table(rows: list[dict]) -> str:
    """Per benchmark with subjects: subjects down, systems across (accuracy %, n per subject)."""
    out = []
    for bench in dict.fromkeys(r["benchmark"] for r in rows if "by_subject" in r):
        mine = [r for r in rows if r["benchmark"] == bench and "by_subject" in r and not r.get("swept")]
        if not mine:                                     # only swept rows (a --k outside the sweep)
            continue
        subjects = list(mine[0]["by_subject"])
        if len(subjects) > 30:
            continue                                     # too many to print; the JSON file has them
        out += [f"\n{bench}, by subject (accuracy %)", "| subject | n | " + " | ".join(system(r) for r in mine) + " |",
                "|" + "---|" * (len(mine) + 2)]
        for s in subjects:
            n = mine[0]["by_subject"][s]["n"]
            out.append(f"| {s} | {n:,} | " + " | ".join(pct(r["by_subject"][s]["accuracy"]) for r in mine) + " |")
        out.append("| mean of subjects | | " + " | ".join(pct(r["subject_mean"]) for r in mine) + " |")
    return "\n".join(out)


def sweep_table(rows: list[dict]) -> str:
    """Accuracy against k, one column per swept system, with a bar for the first."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["benchmark"], r["checkpoint"], r["retriever"], r["mode"], r["score"])].append(r)
    swept = {key: g for key, g in groups.items() if len(g) > 1}
    out = []
    for bench in dict.fromkeys(key[0] for key in swept):
        cols = [g for key, g in swept.items() if key[0] == bench]
        names = [system({**g[0], "k": 0}) for g in cols]
        out += [f"\n{bench}: accuracy % against k, the number of documents in the prompt",
                "| k | " + " | ".join(names) + " | |", "|" + "---|" * (len(cols) + 2)]
        for i, r in enumerate(cols[0]):
            bar = "#" * round(40 * r["accuracy"])
            out.append(f"| {r['k']} | " + " | ".join(pct(g[i]["accuracy"]) for g in cols) + f" | `{bar}` |")
    return "\n".join(out)


def help_report(entry: dict, shown: int = 10) -> str:
    """One question of --helpfulness (an entry of eval.py's --out "helpfulness" list): the LLM's
    loss of the gold answer with no document, then the retriever's top `shown` documents, best
    first, with their scores and the loss given each alone, the most helpful one marked."""
    docs = entry["documents"]
    spread = max(d["loss"] for d in docs) - min(d["loss"] for d in docs) if docs else 0.0
    out = [(f"\n{entry['benchmark']} / {Path(entry['checkpoint']).name} / {Path(entry['retriever']).name}, "
            f"question {entry['id']}: {entry['question'][:120]}"),
           f"  loss of the answer with no document {entry['no_document']:.3f}; pairs the retriever orders as the "
           f"losses: {pct(entry['agreement'])} %; the most helpful document is the retriever's #{entry['best_rank']}"
           + ("" if spread > 0 else " (every document gives the same loss: none helps more than another)"),
           "  | # | score | loss | document |", "  |---|---|---|---|"]
    for i, d in enumerate(docs[:shown], start=1):
        mark = " **most helpful**" if d["id"] == entry["most_helpful"] else ""
        out.append(f"  | {i} | {d['score']:.3f} | {d['loss']:.3f} | {d['id']}: {d['text'][:100]}{mark} |")
    return "\n".join(out)


def help_reports(entries: list[dict], first: int = 3) -> str:
    """help_report of the first `first` questions of each system (benchmark, checkpoint, retriever)."""
    seen, out = Counter(), []
    for e in entries:
        seen[e["benchmark"], e["checkpoint"], e["retriever"]] += 1
        if seen[e["benchmark"], e["checkpoint"], e["retriever"]] <= first:
            out.append(help_report(e))
    return "\n".join(out)
