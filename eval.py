"""eval.py: medical QA accuracy with and without retrieval, side by side, for any checkpoint.

For every benchmark x LLM checkpoint x retriever x answer mode (x scoring rule), one row: accuracy
with a Wilson 95% interval, per subject where the data has subjects, retrieval recall@k and MRR where
the gold documents are known (PubMedQA, the built-in demo), and, on request, rationale overlap
scores and the documents' helpfulness. The prompt is jmlr.py's (`format_context`,
`tokenize_example`), the one training uses. Tables: eval_tables.py; the contamination check: contamination.py.

Benchmarks (qa_data.read_qa): MedQA / Amboss jsonl, MedMCQA jsonl, MMLU CSV (a directory of
them: the subsets one by one and their mean), PubMedQA json, train.py's generic jsonl.

Answer modes:
  likelihood  the option with the lowest loss after the prompt by each scoring rule of --score (a row
              each, all from one pass: `option_scores`). Never fails to parse. `letter`: the NLL of
              ' X' alone, as lm-evaluation-harness scores MMLU; `sum`: the NLL of the target ' X.
              option text' + EOS; `mean`: that per token (jmlr.JMLR.option_losses, train.py's
              validation rule; the default, so that figures stay comparable). Their biases, seen with
              SmolLM2-135M on MMLU-Medical --limit 25 (150 questions): mean favours long options (it
              picks the longest 42% of the time, the longest is right 32%), sum short ones (23%),
              letter the letter the model prefers (A, 149 times: a row's "predicted" shows it).
  generate    greedy generation after the prompt, then the answer letter is read from the text
              (`extract_letter`); the share of answers it cannot read is reported as `unparsed`.

Retrievers: `none`; `trained` (the retriever saved in a train.py checkpoint); `minilm`; or any
BERT/ColBERT directory. Documents come from a full index of --corpus built with that retriever (and
cached), from a built --index, or, with --candidates, from re-scoring each question's candidate
list as training does (which reproduces train.py's test numbers exactly).

Also: rationale scores (a term-level F1, a stand-in for the paper's UMLS-F; optionally an LLM
judge), --helpfulness (the LLM's loss given each retrieved document alone: which help, and does the
retriever rank them first), a contamination check, and --ask for one question of your own. --out:
the rows, and a record per question and row, to compare two runs question by question.

Run:
    python eval.py ../shared/data/mmlu_medical --llm checkpoints/smollm2-135m --score letter sum mean
    python eval.py ../shared/data/pubmedqa/ori_pqal.json --llm checkpoints/smollm2-135m \\
        --retriever none minilm --corpus ../shared/data/pubmedqa/ori_pqal.json --sweep
    python eval.py test.jsonl --llm runs/demo/jmlr --retriever none trained --corpus corpus.jsonl --out r.json \\
        --helpfulness --depth 16     # which documents help the LLM; per-question records in r.json
    python eval.py medqa_test.jsonl --contamination corpus.jsonl train.jsonl --llm ...   # leak check
    python eval.py --ask "Which vitamin deficiency causes scurvy?" --llm ... --retriever minilm --corpus ...
    torchrun --nproc_per_node=8 eval.py ...            # index build, contamination and questions shared, gathered

Shape legend: B questions in a batch, N candidates per question, n options, P prompt tokens,
A answer tokens, C LLM width, V vocabulary.
"""

import argparse
import json
import math
import os
import re
import string
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file

import cli
import colbert_index as ci
import retriever as rt
from contamination import contamination, contamination_report
from eval_tables import help_reports, results_table, subject_table, sweep_table
from jmlr import JMLR, Example, JMLRConfig, OptionHead, format_target, gold_index, gold_ranks, helpfulness, tokenize_example
from llama import Llama, Tokenizer, atomic_write
from qa_data import QA_FORMATS, QARecord, pubmedqa_corpus, read_qa
from colbert_index import read_candidates
from train import resolve_retriever

Z95 = 1.959964   # the standard normal's 97.5% quantile
SCORES = ("letter", "sum", "mean")                                        # likelihood's scoring rules (docstring)
ROW_KEYS = ("benchmark", "checkpoint", "retriever", "mode", "score", "k")   # a row's system; its records carry them


# ----------------------------------------------------------------------------------------------
# Benchmarks

@dataclass
class Benchmark:
    name: str
    records: list[QARecord]


def read_benchmark(path: str, fmt: str | None = None, limit: int | None = None) -> Benchmark:
    """A QA file, or a directory of them (MMLU's per-subject CSVs: each file is a subject).
    `limit` keeps the first questions of each file, so every subject stays represented."""
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.suffix in (".csv", ".jsonl", ".json")) if p.is_dir() else [p]
    if not files:
        raise ValueError(f"{p}: a directory without .csv, .jsonl or .json QA files")
    records = [r for f in files for r in read_qa(f, fmt)[:limit]]
    return Benchmark(p.stem if p.is_file() else p.name, records)


# ----------------------------------------------------------------------------------------------
# Statistics

def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion: unlike p +- z sqrt(p(1-p)/n), it stays in
    [0, 1] and keeps a width at p = 0 or 1, which small benchmark subsets do reach."""
    if n == 0:
        return (0.0, 1.0)
    p, z2 = correct / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (max(0.0, center - half), min(1.0, center + half))


def accuracy_summary(correct: list[bool]) -> dict:
    n, c = len(correct), sum(correct)
    return {"n": n, "accuracy": c / n if n else math.nan, "ci95": list(wilson_interval(c, n))}


# ----------------------------------------------------------------------------------------------
# Reading answers and rationales out of generated text

def extract_letter(text: str, options: dict[str, str]) -> str | None:
    """The answer letter in generated text, or None when it cannot be read. In order: a letter of
    the options at the start ('B', 'B.', '(B)', 'B)', 'B: ...'; not 'A 45-year-old'), 'answer is
    (B)' anywhere, an option's text at the start (PubMedQA's ' yes')."""
    letters = "".join(options)
    for pattern in (rf"^\s*\(?([{letters}])(?:[.:)]|\s*$|\s*\n)", rf"[Aa]nswer(?: is)?:?\s*\(?([{letters}])\b"):
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    start = text.strip().lower()
    hits = [x for x, opt in options.items() if opt.strip() and start.startswith(opt.strip().lower())]
    return max(hits, key=lambda x: len(options[x])) if hits else None    # the longest: 'no' vs 'none'


def rationale_of(text: str) -> str:
    """The explanation in generated text: after 'Explanation:' (training's target format, see
    jmlr.format_target), else whatever follows the answer line."""
    if "Explanation:" in text:
        return text.split("Explanation:", 1)[1].strip()
    return text.split("\n", 1)[1].strip() if "\n" in text else ""


# ----------------------------------------------------------------------------------------------
# Rationale overlap: a term-level F1, a stand-in for the paper's UMLS-F
#
# The paper scores rationales by the F1 of the UMLS medical concepts they share with the reference
# explanation (UMLS-F). UMLS is licensed, so here a "term" is a lowercased word (letters, digits,
# inner hyphens) that is not a stopword: F1 is computed over the multisets of terms as in SQuAD.
# It rewards naming the same entities and numbers; it does not know synonyms or negation.

STOPWORDS = frozenset("""a an the and or but if of to in on at by for with from as is are was were be been
being this that these those it its which who whom what when where why how not no nor so than then there
their they them he she his her we our you your i me my do does did done can could should would may might
must will shall has have had having into onto over under about above below between also such very more
most other some any each all both only same too just because while during after before again further
s t one""".split())

TERM = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def terms(text: str) -> list[str]:
    return [w for w in TERM.findall(text.lower()) if w not in STOPWORDS]


def term_f1(prediction: str, reference: str) -> float:
    """F1 of the term multisets: 2 P R / (P + R), P = shared / |prediction|, R = shared / |reference|."""
    pred, ref = Counter(terms(prediction)), Counter(terms(reference))
    shared = sum((pred & ref).values())
    if shared == 0:
        return 0.0
    p, r = shared / sum(pred.values()), shared / sum(ref.values())
    return 2 * p * r / (p + r)


def term_support(prediction: str, docs: list[str]) -> float:
    """The share of the rationale's distinct terms that occur in the documents it was given: how much
    of what it says the retrieved evidence contains (a precision; recall would punish brevity)."""
    pred, found = set(terms(prediction)), set(terms(" ".join(docs)))
    return len(pred & found) / len(pred) if pred else 0.0


JUDGE_PROMPT = ("You grade medical explanations. Rate from 0 to 10 how factually consistent the candidate "
                "explanation is with the reference explanation: 10 if every medical claim in the candidate is "
                "supported by the reference, 0 if it contradicts the reference or is unrelated. Reply with the number only.")


def judge_score(url: str, model: str, question: str, reference: str, candidate: str) -> float | None:
    """An LLM judge's 0-10 grade / 10, from an OpenAI-compatible /chat/completions endpoint of the
    user's choice (key from OPENAI_API_KEY); None when the reply holds no grade. Optional: it needs
    a network service, and its grades are only as reproducible as the judge model is."""
    body = {"model": model, "temperature": 0, "max_tokens": 8, "messages": [
        {"role": "system", "content": JUDGE_PROMPT},
        {"role": "user", "content": f"Question: {question}\nReference explanation: {reference}\n"
                                    f"Candidate explanation: {candidate}"}]}
    request = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', '')}"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            reply = json.loads(response.read())["choices"][0]["message"]["content"]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise RuntimeError(f"--judge {url}: no usable answer from the endpoint ({e!r})") from None
    m = re.search(r"\b(10|[0-9])\b", reply)
    return int(m.group(1)) / 10 if m else None


# ----------------------------------------------------------------------------------------------
# Loading: an LLM checkpoint (any HF Llama directory, or a train.py checkpoint) and a retriever

def resolve_checkpoint(path: str) -> tuple[Path, Path | None, Path | None, dict]:
    """-> (LLM directory, saved retriever or None, option head file or None, training config or {}).
    Accepts an HF-format Llama directory, a train.py checkpoint (step_N/ with llm/), or a train.py
    run directory (its checkpoints/latest)."""
    p = Path(path)
    if (p / "checkpoints" / "latest").is_file():
        p = p / "checkpoints" / (p / "checkpoints" / "latest").read_text().strip()
    if (p / "llm" / "config.json").is_file():
        state = json.loads((p / "state.json").read_text()) if (p / "state.json").is_file() else {}
        head = p / "option_head.safetensors"
        return (p / "llm", p / "retriever" if (p / "retriever").is_dir() else None,
                head if head.is_file() else None, state.get("config", {}))
    if (p / "config.json").is_file():
        return p, None, None, {}
    raise FileNotFoundError(f"{p}: neither an HF-format Llama directory (config.json + safetensors) nor a "
                            "train.py checkpoint or run directory (llm/ or checkpoints/latest)")


def load_llm(path: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, Tokenizer, dict]:
    """-> (the LLM, wrapped in its option head when the checkpoint has one; tokenizer; training config)."""
    llm_dir, _, head_file, train_cfg = resolve_checkpoint(path)
    llm, tok = Llama.from_pretrained(llm_dir, dtype=dtype, device=device).eval(), Tokenizer(llm_dir)
    if head_file is not None:     # as train.build_model made it: its letters as the tokens they point at
        letters = train_cfg.get("option_letters", "ABCDE")
        llm = OptionHead(llm, [tok.encode(x, bos=False)[0] for x in letters]).to(device=device, dtype=dtype)
        state = load_file(head_file)
        with torch.no_grad():
            for name in ("query", "key"):
                if f"llm.{name}.weight" not in state:
                    raise ValueError(f"{head_file}: missing tensor 'llm.{name}.weight'")
                getattr(llm, name).weight.copy_(state[f"llm.{name}.weight"])
        llm.eval()
    return llm, tok, train_cfg


def load_retriever(spec: str, llm_path: str, device: torch.device) -> rt.ColBERT:
    """'trained' (the checkpoint's own retriever/), 'minilm', or a BERT/ColBERT directory."""
    if spec == "trained":
        saved = resolve_checkpoint(llm_path)[1]
        if saved is None:
            raise ValueError(f"--retriever trained: {llm_path} is not a train.py checkpoint with a retriever/; "
                             "give a retriever directory or 'minilm'")
        spec = str(saved)
    return rt.ColBERT.from_pretrained(resolve_retriever(spec), device=device).eval()


def corpus_file(path: str, cache: Path, rank: int = 0) -> Path:
    """The corpus as colbert_index.read_corpus reads it; a PubMedQA .json becomes one {id, contents} line per
    abstract (rank 0 writes it, the others wait)."""
    p = Path(path)
    if p.suffix != ".json":
        return p
    out = cache / f"pubmedqa-corpus-{ci.file_sha256(p)[:12]}.jsonl"
    if rank == 0 and not out.is_file():
        lines = [json.dumps({"id": pmid, "contents": text}) for pmid, text in pubmedqa_corpus(p)]
        atomic_write(out, lambda f: Path(f).write_text("\n".join(lines) + "\n"))
    if dist.is_initialized():
        dist.barrier()
    return out


def open_index(model: rt.ColBERT, corpus: Path | None, cache: Path, rank: int, world: int,
               index: str | None = None) -> ci.Index:
    """`index` when given (built by `colbert_index.py build` with this very retriever, which is checked),
    else an index of the corpus built with this retriever, cached by encoder and corpus fingerprint
    (every rank encodes its share of the shards: retriever.build_index)."""
    if index:
        found = ci.Index(index)
        found.check_encoder(model)
        return found
    index_dir = cache / f"index-{model.fingerprint()[:16]}-{ci.file_sha256(corpus)[:12]}"
    ci.build_index(model, corpus, index_dir, rank=rank, world=world)
    return ci.Index(index_dir)


# ----------------------------------------------------------------------------------------------
# Answering one question

@torch.no_grad()
def option_scores(model: JMLR, ex: Example, docs: list[str]) -> dict[str, torch.Tensor]:
    """Each scoring rule's (n,) losses of the n options from one pass: the prompt run once, its KV
    cache shared by the targets ' X. option text' + EOS (mean: jmlr.JMLR.option_losses's values). The
    letter ' X' is the prompt's continuation as tokenize_example encodes it; its tokens start the
    target with most tokenizers (SmolLM2's byte-level BPE: 'ĠA' '.'), whose NLLs are then read off,
    else (' A.' one token) the n letters alone join the pass. An option head has one loss per option."""
    if not isinstance(model.llm, Llama):
        return dict.fromkeys(SCORES, model.option_losses([ex], [docs])[0])
    llm, n, device = model.llm, len(ex.options), model.llm.embed_tokens.weight.device
    tokenize = lambda target: tokenize_example(model.tok, docs, ex.question, ex.options, target,  # noqa: E731
                                               model.cfg.max_doc_tokens)
    rows = [tokenize(format_target(x, text)) for x, text in ex.options.items()] + [tokenize(f" {x}") for x in ex.options]
    P = rows[0][1].count(-100)                                          # the prompt: unlabelled
    if any(labels.count(-100) != P for _, labels in rows):
        raise ValueError("the tokenizer merges the prompt's end with a target's start: no prompt shared by the options")
    answers, letters = [t[P:] for t, _ in rows[:n]], [t[P:-1] for t, _ in rows[n:]]   # with EOS; letters without
    own = all(a[:len(lt)] == lt for a, lt in zip(answers, letters))    # the letter's tokens start its target
    seqs = answers + ([] if own else letters)                           # R = n or 2n rows
    R, A = len(seqs), max(len(a) for a in seqs)
    cache = llm.new_cache(1, P + A)
    h_prompt = llm.hidden_states(torch.tensor([rows[0][0][:P]], device=device), cache, 0)[:, -1:]   # (1, 1, C)
    cache = [(k.expand(R, -1, -1, -1).clone(), v.expand(R, -1, -1, -1).clone()) for k, v in cache]
    tokens = torch.tensor([a + [model.pad_id] * (A - len(a)) for a in seqs], device=device)       # (R, A)
    h = llm.hidden_states(tokens[:, :-1], cache, P) if A > 1 else tokens.new_zeros(R, 0, h_prompt.size(-1))
    h = torch.cat([h_prompt.expand(R, 1, -1), h], dim=1)               # (R, A, C): position j predicts token j
    nll = F.cross_entropy(llm.lm_head(h).float().flatten(0, 1), tokens.flatten(), reduction="none").view(R, A)
    upto = lambda lengths: torch.arange(A, device=device)[None] < torch.tensor(lengths, device=device)[:, None]  # noqa: E731
    total = (nll[:n] * upto([len(a) for a in answers])).sum(1)         # (n,)
    letter = (nll[:n] if own else nll[n:]) * upto([len(lt) for lt in letters])   # (n, A): the letters alone
    return {"letter": letter.sum(1), "sum": total, "mean": total / torch.tensor([len(a) for a in answers], device=device)}


def prompt_tokens(model: JMLR, ex: Example, docs: list[str]) -> list[int]:
    """The prompt alone: what tokenize_example leaves unlabelled."""
    tokens, labels = tokenize_example(model.tok, docs, ex.question, ex.options, "", model.cfg.max_doc_tokens)
    return tokens[:labels.count(-100)]


@torch.no_grad()
def generate_answer(model: JMLR, ex: Example, docs: list[str], max_new_tokens: int, stop_at_newline: bool) -> str:
    """Greedy continuation of the prompt, as text."""
    if isinstance(model.llm, OptionHead):
        raise ValueError("this checkpoint answers with an option head (train.py option_head=True): its LM head "
                         "was never trained to write; use --mode likelihood")
    stops = model.tok.eos_ids
    newline = model.tok.encode("\n", bos=False)
    if stop_at_newline and len(newline) == 1:
        stops = stops + tuple(newline)
    prompt = torch.tensor([prompt_tokens(model, ex, docs)], device=model.llm.embed_tokens.weight.device)
    new = model.llm.generate(prompt, max_new_tokens, stop_ids=stops)[0].tolist()
    ends = [i for i, t in enumerate(new) if t in stops]
    return model.tok.decode(new[:ends[0]] if ends else new)          # without the stop token


# ----------------------------------------------------------------------------------------------
# Evaluating one system (LLM, retriever, mode) on one benchmark

@dataclass
class Settings:
    mode: str = "likelihood"        # likelihood | generate
    ks: tuple[int, ...] = (7,)      # documents in the prompt; several for the sweep
    depth: int = 100                # documents retrieved per question (recall and MRR are @ this depth)
    batch_size: int = 8
    scores: tuple[str, ...] = ("mean",)   # likelihood: the scoring rules (SCORES), each its own row
    rationale: bool = False
    max_new_tokens: int = 0         # 0: 16 for an answer, 192 with a rationale
    judge: str | None = None        # an OpenAI-compatible base URL: rationales graded by an LLM too
    judge_model: str = ""
    helpfulness: bool = False       # the LLM's loss given each retrieved document alone (document_help)


def retrieve(model: JMLR, records: list[QARecord], index: ci.Index | None, candidates: dict | None,
             corpus: dict | None, depth: int) -> tuple[list[Example], torch.Tensor | None, list[list[str]] | None]:
    """Examples with `depth` documents each and the gold document's position among them (None when
    absent), the retriever's scores of those documents (B, depth) and their ids; no retriever: no
    documents, None and None. From the index (documents best first), or by re-scoring each
    question's candidate list with the retriever (documents in the list's order), as training does
    (JMLR.score_candidates, without gradients: at most --max-tokens document tokens per pass)."""
    examples = [Example(r.question, r.options, "", [], None, r.answer) for r in records]
    if model.retriever is None:
        return examples, None, None
    if candidates is not None:
        ids = []
        for r, ex in zip(records, examples):
            if r.id not in candidates:
                raise ValueError(f"question {r.id!r} has no candidate list; build them for this benchmark")
            ids.append(candidates[r.id][:depth])
            missing = [d for d in ids[-1] if d not in corpus]
            if missing:
                raise ValueError(f"question {r.id!r}: candidate {missing[0]!r} is not in --corpus; give the corpus "
                                 "the candidate lists were built from")
            ex.candidates, ex.gold = [corpus[d] for d in ids[-1]], gold_index(ids[-1], r.gold_doc)
        return examples, model.score_candidates(examples), ids                      # (B, N), no gradients
    Q, q_mask = model.retriever.encode_queries([r.question for r in records])
    scores, docs = index.search(Q, q_mask, depth)                                  # (B, depth) each
    ids = [[index.ids[d] for d in dd] for dd in docs.tolist()]
    for ex, r, dd, di in zip(examples, records, docs.tolist(), ids):
        ex.candidates, ex.gold = [index.text(d) for d in dd], gold_index(di, r.gold_doc)
    return examples, scores, ids


@torch.no_grad()
def document_help(model: JMLR, records: list[QARecord], examples: list[Example], scores: torch.Tensor,
                  ids: list[list[str]]) -> list[dict]:
    """--helpfulness, per question: the LLM's loss of the gold answer given each retrieved document
    alone (JMLR.candidate_losses, training's step 3: the mean NLL of ' X. text', or of the letter
    alone with doc_loss="letter") and given none; the gold document's id (None if unknown); the documents
    best first (scores, losses, first 100 characters); the most helpful (lowest loss, first of ties);
    and jmlr.helpfulness's agreement (nan: no losses differ) and rank of the most helpful document."""
    golds = [replace(ex, target=format_target(r.answer, r.options[r.answer])) for r, ex in zip(records, examples)]
    losses = model.candidate_losses(golds)                                           # (B, N)
    alone = model.llm_losses([tokenize_example(model.tok, [], ex.question, ex.options, ex.target, model.cfg.max_doc_tokens,
                                               model.cfg.doc_loss == "letter") for ex in golds])   # (B,) no document
    agreement, best = helpfulness(scores, losses)                                    # (B,) each
    out = []
    for b, ex in enumerate(golds):
        docs = [{"id": ids[b][j], "score": round(float(scores[b, j]), 4), "loss": round(float(losses[b, j]), 4),
                 "text": ex.candidates[j][:100]} for j in scores[b].argsort(descending=True, stable=True).tolist()]
        out.append({"question": ex.question, "gold": records[b].gold_doc, "no_document": round(float(alone[b]), 4),
                    "documents": docs, "most_helpful": ids[b][int(losses[b].argmin())], "agreement": float(agreement[b]),
                    "best_rank": int(best[b])})
    return out


def answer_batch(model: JMLR, records: list[QARecord], examples: list[Example], scores: torch.Tensor | None,
                 ids: list[list[str]] | None, settings: Settings) -> list[dict]:
    """One result per question: its id, subject, answer, the gold document's rank, and under
    "answers", for every k and scoring rule (None in generate mode) the entry of its question
    record (`question_records`): the prediction, whether it is right, the option losses or the
    generated text, and the documents in the prompt [[id, score], ...] best first."""
    ks = settings.ks if scores is not None else (0,)
    ranks = gold_ranks(scores, examples) if scores is not None else [None] * len(examples)
    top = {k: model.top_documents(examples, scores, k) for k in ks if k}            # (docs best last, (B, k))
    helped = document_help(model, records, examples, scores, ids) if settings.helpfulness and ids else None
    out = []
    for i, (r, ex) in enumerate(zip(records, examples)):
        res = {"id": r.id, "subject": r.subject, "answer": r.answer, "rank": ranks[i], "answers": {},
               "longest": max(ex.options, key=lambda x: len(ex.options[x]))}        # the length bias, in summarize
        res |= {"help": helped[i]} if helped else {}
        for k in ks:
            docs = top[k][0][i] if k else []
            shown = [[ids[i][j], round(float(scores[i, j]), 4)] for j in top[k][1][i].tolist()] if k else []
            if settings.mode == "likelihood":
                losses = option_scores(model, ex, docs)                              # rule -> (n,)
                for rule in settings.scores:
                    pred = list(ex.options)[int(losses[rule].argmin())]
                    res["answers"][k, rule] = {"pred": pred, "correct": pred == ex.answer, "docs": shown,
                                               "losses": dict(zip(ex.options, (round(v, 4) for v in losses[rule].tolist())))}
            else:
                budget = settings.max_new_tokens or (192 if settings.rationale else 16)
                text = generate_answer(model, ex, docs, budget, stop_at_newline=not settings.rationale)
                pred = extract_letter(text, ex.options)
                a = res["answers"][k, None] = {"pred": pred, "correct": pred == ex.answer, "docs": shown,
                                               "parsed": pred is not None, "text": text}
                if settings.rationale:
                    why = rationale_of(text)
                    a["support"] = term_support(why, docs) if docs else None
                    a["f1"] = term_f1(why, r.rationale) if r.rationale else None
                    if settings.judge and r.rationale:
                        a["judge"] = judge_score(settings.judge, settings.judge_model, r.question, r.rationale, why)
        out.append(res)
    return out


def evaluate(model: JMLR, bench: Benchmark, settings: Settings, index: ci.Index | None = None,
             candidates: dict | None = None, corpus: dict | None = None) -> list[dict]:
    """Per-question results in benchmark order. Under torchrun, rank r takes batches r, r + W, ...
    of one fixed split into batches, so every question meets the same computation as in a single
    process; the results, every field, are gathered to every rank in benchmark order."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    recs, bs = bench.records, settings.batch_size
    mine, t0, shown = [], time.time(), time.time()
    for a in range(rank * bs, len(recs), world * bs):
        batch = recs[a:a + bs]
        with torch.no_grad():
            examples, scores, ids = retrieve(model, batch, index, candidates, corpus, settings.depth)
        mine += [(a + i, res) for i, res in enumerate(answer_batch(model, batch, examples, scores, ids, settings))]
        if rank == 0 and time.time() - shown > 60:                       # a line a minute on long runs
            shown, done = time.time(), min(a + bs, len(recs))            # about as far as every rank
            print(f"  {bench.name}: {done:,}/{len(recs):,} questions, ETA {(shown - t0) / done * (len(recs) - done):,.0f} s",
                  file=sys.stderr, flush=True)
    return ci.gather_in_order(mine, world)


def summarize(results: list[dict], k: int, rule: str | None) -> dict:
    """Accuracy (Wilson 95% interval), by subject with their mean, unparsed share (generate mode:
    rule None), rationale scores, retrieval metrics and helpfulness (as train.py's validation has it)
    for the results at k documents under one scoring rule."""
    at_k = [res["answers"][k, rule] for res in results]
    out = accuracy_summary([a["correct"] for a in at_k])
    out["predicted"] = dict(sorted(Counter(str(a["pred"]) for a in at_k).items()))   # a constant answerer shows here
    out["longest_picked"] = sum(a["pred"] == res["longest"] for res, a in zip(results, at_k)) / len(at_k)
    out["longest_right"] = sum(res["answer"] == res["longest"] for res in results) / len(results)
    subjects = defaultdict(list)
    for res, a in zip(results, at_k):
        if res["subject"]:
            subjects[res["subject"]].append(a["correct"])
    if subjects:
        out["by_subject"] = {s: accuracy_summary(c) for s, c in sorted(subjects.items())}
        out["subject_mean"] = sum(v["accuracy"] for v in out["by_subject"].values()) / len(subjects)
    if rule is None:
        out["unparsed"] = sum(not a["parsed"] for a in at_k) / len(at_k)
    for key in ("f1", "support", "judge"):
        values = [a[key] for a in at_k if a.get(key) is not None]
        if values:
            out[f"rationale_{key}"] = sum(values) / len(values)
    gold = [res["rank"] for res in results if res["rank"] is not None]   # a known gold document; inf: missed
    if gold and k > 0:
        out.update({"recall@1": sum(r == 1 for r in gold) / len(gold), f"recall@{k}": sum(r <= k for r in gold) / len(gold),
                    "mrr": sum(1 / r for r in gold) / len(gold)})
    helped = [res["help"] for res in results if "help" in res]
    if helped:
        agree = [h["agreement"] for h in helped if not math.isnan(h["agreement"])]
        out["helpful_agreement"] = sum(agree) / len(agree) if agree else math.nan
        out.update({f"helpful@{n}": sum(h["best_rank"] <= n for h in helped) / len(helped) for n in {1, k} if n})
    return out


def question_records(row: dict, results: list[dict]) -> list[dict]:
    """--out's "questions" of one row, one per question: the row's keys and the id (to join two runs
    on), the gold answer, the prediction, whether it is right, the option losses under the row's rule
    or the generated text, the documents in the prompt [[id, score], ...] best first, and the gold
    document's rank among the --depth retrieved (null: none known; Infinity: not among them)."""
    keys = {key: row[key] for key in ROW_KEYS}
    return [{**keys, "id": res["id"], "answer": res["answer"], "gold_rank": res["rank"], **res["answers"][row["k"], row["score"]]}
            for res in results]


# ----------------------------------------------------------------------------------------------
# Command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Medical QA accuracy, with and without retrieval, side by side.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("benchmarks", nargs="*", help="QA files, or directories of them (MMLU's per-subject CSVs)")
    p.add_argument("--format", choices=QA_FORMATS, default=None, help="QA format of every file (default: detected)")
    p.add_argument("--llm", nargs="+", required=True,
                   help="one or more HF-format Llama directories, train.py checkpoints (step_N/) or run directories")
    p.add_argument("--retriever", nargs="+", default=["none"],
                   help="none, trained (the checkpoint's own), minilm, or a BERT/ColBERT directory; several side by side")
    p.add_argument("--corpus", default=None, help="documents: jsonl {id, contents|content}, .tsv, or a PubMedQA .json")
    p.add_argument("--index", default=None, help="a built index (colbert_index.py build) to search instead of indexing --corpus; "
                   "it must have been built with the retriever evaluated")
    p.add_argument("--candidates", default=None,
                   help="re-score these candidate lists (colbert_index.py candidates) instead of searching the whole corpus")
    p.add_argument("--mode", nargs="+", choices=("likelihood", "generate"), default=["likelihood"])
    p.add_argument("--score", nargs="+", choices=SCORES, default=["mean"],
                   help="likelihood's scoring rules, a row each: letter (NLL of ' X', as lm-evaluation-harness scores "
                        "MMLU; favours the model's preferred letters), sum (of ' X. option text' + EOS; favours short "
                        "options), mean (per token; favours long ones; default: train.py's rule, figures stay comparable)")
    p.add_argument("--k", type=int, default=None, help="documents in the prompt (default: the checkpoint's top_k, else 7)")
    p.add_argument("--sweep", action="store_true", help="every k from 0 to 10, printed as a curve")
    p.add_argument("--depth", type=int, default=None, help="documents retrieved per question, recall and MRR are at this "
                   "depth (default: with --candidates the checkpoint's num_candidates, else 100)")
    p.add_argument("--max-doc-tokens", type=int, default=None,
                   help="LLM tokens per document in the prompt (default: the checkpoint's, else 180)")
    p.add_argument("--rationale", action="store_true",
                   help="generate mode: write an explanation too, and score it (term F1 vs the reference, support by the documents)")
    p.add_argument("--helpfulness", action="store_true", help="the LLM's loss given each of the --depth documents "
                   "alone (depth passes a question): agreement, helpful@1/k on the first --mode's rows; reports in --out")
    p.add_argument("--max-new-tokens", type=int, default=0, help="generation budget (0: 16 for an answer, 192 with a rationale)")
    p.add_argument("--limit", type=int, default=None, help="the first N questions of each file")
    p.add_argument("--batch-size", type=int, default=8, help="questions per retrieval batch and per shard unit")
    p.add_argument("--max-tokens", type=int, default=32768,
                   help="tokens per forward pass, which bounds memory: retriever documents when re-scoring --candidates, "
                        "and an option-head LLM's passes; a plain LLM runs one question at a time (its prompt once, "
                        "then its options) whatever this is. The results are the same for any value, up to float rounding")
    p.add_argument("--contamination", nargs="+", default=[], metavar="FILE",
                   help="check the questions against these corpus or training files for leaked text")
    p.add_argument("--ngram", type=int, default=8, help="contamination: words per n-gram")
    p.add_argument("--judge", default=None, metavar="URL",
                   help="--rationale: also grade rationales with an LLM at this OpenAI-compatible base URL "
                        "(e.g. https://api.openai.com/v1; key from OPENAI_API_KEY)")
    p.add_argument("--judge-model", default="gpt-4o-mini", help="the judge's model name")
    p.add_argument("--overlap", type=float, default=0.5, help="contamination: flag at this share of a question's n-grams")
    p.add_argument("--out", default=None, help="write the rows, per-question records of each row, --helpfulness's "
                   "per-question reports and the contamination flags to this JSON file")
    p.add_argument("--cache", default="runs/eval-cache", help="where corpus indexes are built and kept")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="LLM weights: auto is bf16 on CUDA compute capability 8.0+, else fp32")
    p.add_argument("--ask", default=None, help="one question of your own: the top documents, then answer and rationale")
    p.add_argument("--options", nargs="+", default=[], help="--ask: answer options, lettered A, B, ... in order")
    p.add_argument("--dist-timeout-minutes", type=int, default=60,
                   help="torchrun: how long a rank waits for the others at a collective (NCCL's default is 10)")
    args = p.parse_args(argv)
    if not args.benchmarks and not args.ask:
        p.error("give one or more benchmark files, or --ask")
    if args.helpfulness and all(s == "none" for s in args.retriever):
        p.error("--helpfulness scores retrieved documents: give a --retriever other than none")
    if any(s != "none" for s in args.retriever) and not (args.corpus or args.index and not args.candidates):
        p.error("a retriever needs --corpus (the documents to retrieve from; --index instead also works without "
                "--candidates)")
    return args


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, name)


def build(args, loaded: tuple, llm_path: str, spec: str, device: torch.device) -> tuple[JMLR, int, int]:
    """The JMLR module for one system (the loaded LLM, and its retriever or None), its k and its
    retrieval depth: as given, else as the checkpoint was trained (candidate lists as in training)."""
    llm, tok, train_cfg = loaded                                         # load_llm(llm_path, ...)
    saved = train_cfg.get("jmlr", {})
    ret = None if spec == "none" else load_retriever(spec, llm_path, device)
    given = lambda value, default: default if value is None else value   # noqa: E731 (an explicit --k 0 counts)
    cfg = JMLRConfig(max_doc_tokens=given(args.max_doc_tokens, saved.get("max_doc_tokens", 180)),
                     max_pass_tokens=args.max_tokens, doc_loss=saved.get("doc_loss", "target"))   # as trained
    depth = given(args.depth, (args.candidates and train_cfg.get("num_candidates")) or 100)
    return JMLR(llm, ret, tok, cfg, pad_id=0).eval(), given(args.k, saved.get("top_k", 7)), depth


def ask(args, device: torch.device, dtype: torch.dtype, cache: Path, rank: int, world: int):
    """--ask: the top documents with their scores, then the answer (and option likelihoods)."""
    loaded = load_llm(args.llm[0], device, dtype)
    model, k, _ = build(args, loaded, args.llm[0], args.retriever[0], device)
    options = dict(zip(string.ascii_uppercase, args.options))
    ex, docs = Example(args.ask, options, "", [], None, ""), []
    if model.retriever is not None:
        index = open_index(model.retriever, args.corpus and corpus_file(args.corpus, cache, rank), cache, rank, world,
                           args.index)
        with torch.no_grad():
            scores, found = index.search(*model.retriever.encode_queries([args.ask]), k)
        for i, (s, d) in enumerate(zip(scores[0].tolist(), found[0].tolist()), start=1):
            docs.append(index.text(d))
            print(f"{i:2d}. {s:7.3f}  {index.ids[d]}  {docs[-1][:300]}")
    docs = docs[::-1]                                                    # best last, as in training
    for rule, losses in (option_scores(model, ex, docs) if options else {}).items():   # every rule, side by side
        print(f"option losses ({rule}): " + ", ".join(f"{x} {v:.3f}" for x, v in zip(options, losses.tolist())))
        print(f"answer by likelihood ({rule}): {list(options)[int(losses.argmin())]}")
    if not isinstance(model.llm, OptionHead):
        print(f"generated: {generate_answer(model, ex, docs, args.max_new_tokens or 192, stop_at_newline=False).strip()}")


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    rank, world, device = ci.setup_distributed(args.dist_timeout_minutes)
    dtype, cache = pick_dtype(args.dtype, device), Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if args.ask:
        return ask(args, device, dtype, cache, rank, world)
    t_start = time.time()
    benches = [read_benchmark(b, args.format, args.limit) for b in args.benchmarks]
    out_dir = Path(args.out).resolve().parent if args.out else None
    if out_dir is not None and not (out_dir.is_dir() and os.access(out_dir, os.W_OK)):   # before hours of work
        raise PermissionError(f"--out {args.out}: cannot write into {out_dir}; give a writable path")
    for llm_path in args.llm:              # every checkpoint checked before hours of evaluation start
        if resolve_checkpoint(llm_path)[1] is None and "trained" in args.retriever:
            raise ValueError(f"--retriever trained: {llm_path} has no retriever/ (a train.py checkpoint of a "
                             "retrieval objective has one); evaluate it in a separate run without 'trained'")
    flagged = {b.name: contamination(b.records, args.contamination, args.ngram, args.overlap, rank, world)
               for b in benches} if args.contamination else {}   # every rank: their share, merged
    corpus = corpus_file(args.corpus, cache, rank) if args.corpus else None
    candidates = read_candidates(args.candidates) if args.candidates else None
    wanted = {d for b in benches for r in b.records for d in candidates.get(r.id, ())} if candidates else set()
    texts = {i: t for i, t, _ in ci.read_corpus(corpus) if i in wanted} if candidates else None   # not all the corpus
    rows, questions, helped = [], [], []
    for llm_path in args.llm:
        loaded = load_llm(llm_path, device, dtype)                       # once for all its retrievers
        for spec in args.retriever:
            model, k, depth = build(args, loaded, llm_path, spec, device)
            index = (open_index(model.retriever, corpus, cache, rank, world, args.index)
                     if model.retriever and not candidates else None)
            ks = tuple(range(11)) if args.sweep else (k,)
            for mode in args.mode:                                       # helpfulness: with the first mode only
                settings = Settings(mode, ks, max(depth, max(ks)), args.batch_size, tuple(args.score), args.rationale,
                                    args.max_new_tokens, args.judge, args.judge_model, args.helpfulness and mode == args.mode[0])
                for bench in benches:
                    t0 = time.time()
                    results = evaluate(model, bench, settings, index, candidates, texts)
                    seconds = round(time.time() - t0, 1)
                    for rule in (args.score if mode == "likelihood" else (None,)):
                        for kk in (ks if model.retriever else (0,)):
                            rows.append({"benchmark": bench.name, "checkpoint": llm_path, "retriever": spec, "mode": mode,
                                         "score": rule, "k": kk, **summarize(results, kk, rule), "seconds": seconds}
                                        | ({"swept": True} if model.retriever and kk != k else {}))
                            questions += question_records(rows[-1], results)
                    helped += [{"benchmark": bench.name, "checkpoint": llm_path, "retriever": spec, "id": res["id"],
                                **res["help"]} for res in results if "help" in res]
                    if rank == 0:
                        print(f"{Path(llm_path).name} / {spec} / {mode} on {bench.name}: {len(results):,} questions "
                              f"in {seconds:,.0f} s", file=sys.stderr, flush=True)
            del model
        del loaded                                                       # before the next LLM loads
    if rank == 0:
        print(results_table(rows) + subject_table(rows) + sweep_table(rows) + help_reports(helped)
              + contamination_report(flagged, {b.name: len(b.records) for b in benches}, args.ngram, args.overlap))
        if args.out:
            report = {"results": rows, "questions": questions, "helpfulness": helped, "contamination": flagged,
                      "argv": sys.argv[1:], "seconds": round(time.time() - t_start, 1)}
            atomic_write(Path(args.out), lambda p: Path(p).write_text(json.dumps(report, indent=1)))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    cli.run(main)
