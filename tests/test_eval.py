"""eval.py: answers under each scoring rule, per-question records, the documents' helpfulness,
intervals, retrieval metrics, contamination and sharding, checked against hand computations. The
model is a hand-built bigram Llama: its blocks add nothing (zero output projections), embeddings are
one-hot, so the logits after a token depend on that token alone and every option's loss can be
computed by hand (and no document changes it: where documents must matter, random weights)."""

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import colbert_index as ci
import eval as ev
from contamination import contamination
import retriever as rt
from demo import make_demo_models
from jmlr import JMLR, Example, JMLRConfig
from llama import Llama
from qa_data import QARecord

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
BOOST = 10.0    # the bigram logit of the favoured next token; every other logit is 0

QUESTIONS = [   # (question, {letter: option}, answer, subject, gold document)
    ("Which drug treats zorbitis ?", ["kelamab", "dufopril", "vomicillin", "rotazole"], "B", "pharm", "d1"),
    ("Which drug treats pelumia ?", ["dufopril", "kelamab", "rotazole", "vomicillin"], "B", "pharm", "d2"),
    ("Which drug treats gastralgia ?", ["rotazole", "vomicillin", "kelamab", "dufopril"], "A", "pharm", "d3"),
    ("Which germ causes morbitoma ?", ["lurubacter", "fenococcus", "tarimyces", "bodovirus"], "B", "micro", "d4"),
    ("Which germ causes sinopathy ?", ["fenococcus", "tarimyces", "lurubacter", "bodovirus"], "C", "micro", "d5"),
    ("Which germ causes kavitis ?", ["bodovirus", "lurubacter", "fenococcus", "tarimyces"], "D", "micro", "d6"),
]
DOCS = {"d1": "zorbitis responds to dufopril", "d2": "pelumia responds to kelamab", "d3": "gastralgia responds to rotazole",
        "d4": "morbitoma follows fenococcus infection", "d5": "sinopathy follows lurubacter infection",
        "d6": "kavitis follows tarimyces infection", "d7": "dufopril and kelamab are drugs",
        "d8": "fenococcus is a microbe", "d9": "rotazole cures infection"}
WORDS = sorted({w for q, opts, *_ in QUESTIONS for w in q.split() + opts} | {w for d in DOCS.values() for w in d.split()}
               | {"Document", "Question", "Answer", "Explanation", ":", ".", "A", "B", "C", "D"})


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The bigram LLM, a word-matching demo retriever, a generic QA file and a corpus."""
    d = tmp_path_factory.mktemp("eval")
    make_demo_models(d / "llm", d / "retriever", WORDS, seed=0)
    llm = Llama.from_pretrained(d / "llm")
    vocab = json.loads((d / "llm" / "tokenizer.json").read_text())["model"]["vocab"]
    V, C = llm.cfg.vocab_size, llm.cfg.hidden_size
    assert V <= C, "the one-hot embeddings need hidden_size >= vocabulary"
    nxt = torch.zeros(V, V)                                   # nxt[i, j]: logit of token j right after token i
    nxt[vocab[":"], vocab["B"]] = nxt[vocab["B"], vocab["."]] = nxt[vocab["."], vocab["</s>"]] = BOOST
    with torch.no_grad():
        for block in llm.layers:                              # residual branches add zero
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        llm.embed_tokens.weight.copy_(torch.eye(V, C))        # RMSNorm turns e_i into e_i / sqrt(1/C + eps)
        llm.lm_head.weight.copy_(torch.cat([nxt.T, torch.zeros(V, C - V)], 1) * math.sqrt(1 / C + llm.cfg.rms_norm_eps))
    llm.save_pretrained(d / "llm")
    qa = [{"id": f"q{i}", "question": q, "options": dict(zip("ABCD", opts)), "answer": a, "subject": s, "gold_doc": g}
          for i, (q, opts, a, s, g) in enumerate(QUESTIONS)]
    (d / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    (d / "corpus.jsonl").write_text("".join(json.dumps({"id": k, "contents": v}) + "\n" for k, v in DOCS.items()))
    return {"dir": d, "llm": d / "llm", "retriever": d / "retriever", "qa": d / "qa.jsonl", "corpus": d / "corpus.jsonl",
            "V": V}


def run_eval(files, *extra: str) -> dict:
    out = files["dir"] / f"out-{abs(hash(extra))}.json"
    ev.main([str(files["qa"]), "--llm", str(files["llm"]), "--corpus", str(files["corpus"]), "--cache",
             str(files["dir"] / "cache"), "--batch-size", "2", "--out", str(out), *extra])
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------------------------
# Answers by likelihood and by generation

def test_likelihood_equals_the_hand_computed_bigram_loss(files):
    """Target ' X. text' + EOS is 4 tokens: X after ':', '.' after X, the word after '.', EOS after
    the word. The bigram favours B after ':', '.' after B and EOS after '.': option B's loss is
    lowest, and every loss is a sum of log-softmax terms of BOOST and zeros."""
    llm, tok, _ = ev.load_llm(str(files["llm"]), torch.device("cpu"), torch.float32)
    model = JMLR(llm, None, tok, JMLRConfig()).eval()
    q, opts, *_ = QUESTIONS[0]
    ex = Example(q, dict(zip("ABCD", opts)), "", [], None, "B")
    V = files["V"]
    hit, miss = -BOOST + math.log(math.exp(BOOST) + V - 1), math.log(math.exp(BOOST) + V - 1)   # favoured / not
    uniform = math.log(V)                                                                     # a row of zeros
    expected = [(miss + uniform + miss + uniform) / 4] * 4
    expected[1] = (hit + hit + miss + uniform) / 4       # B: ':'->B and B->'.' favoured, '.'->word not, word->EOS uniform
    losses = ev.option_scores(model, ex, [])["mean"]
    assert torch.allclose(losses, torch.tensor(expected), atol=1e-4), f"option losses {losses} != by hand {expected}"
    assert int(losses.argmin()) == 1, "likelihood scoring must pick the option the model is certain of (B)"
    reference = model.option_losses([ex], [[DOCS["d1"], DOCS["d7"]]])[0]   # jmlr.py's, one full pass per option
    shared = ev.option_scores(model, ex, [DOCS["d1"], DOCS["d7"]])["mean"]
    assert torch.allclose(shared, reference, atol=1e-5), "the shared-prefix KV cache changed the option losses"


def test_shared_prefix_cache_equals_full_passes_with_real_attention(files):
    """The bigram model's attention adds nothing, so it cannot catch a cache or position bug: here
    random weights, documents in the prompt, and 4- and 5-option questions in one batch."""
    llm, tok, _ = ev.load_llm(str(files["llm"]), torch.device("cpu"), torch.float32)
    llm.reset_parameters()                                   # random attention and MLP weights
    model = JMLR(llm, None, tok, JMLRConfig()).eval()
    (q0, o0, *_), (q1, o1, *_) = QUESTIONS[:2]
    batch = [Example(q0, dict(zip("ABCD", o0)), "", [], None, "B"), Example(q1, dict(zip("ABCDE", o1 + ["kavitis"])), "", [], None, "B")]
    docs = [[DOCS["d7"], DOCS["d1"]], [DOCS["d2"]]]
    full = model.option_losses(batch, docs)                  # jmlr.py: one pass per option, padded to 5
    assert full.shape == (2, 5) and full[0, 4] == math.inf, "a 4-option question is padded with +inf"
    for b, (ex, d) in enumerate(zip(batch, docs)):
        shared = ev.option_scores(model, ex, d)["mean"]
        assert torch.allclose(shared, full[b, :len(ex.options)], atol=1e-5), f"KV-cache losses {shared} != {full[b]}"


def bigram_terms(V: int) -> tuple[float, float, float]:
    """The NLL of a favoured token (a row with one BOOST), of any other token of that row, and of
    any token after a row of zeros."""
    return -BOOST + math.log(math.exp(BOOST) + V - 1), math.log(math.exp(BOOST) + V - 1), math.log(V)


def test_scoring_rules_by_hand_and_a_question_on_which_they_disagree(files):
    """Per token: ':'->X, X->'.', '.'->word, ..., last->EOS. letter: the first alone; sum: all of
    them; mean: sum / count. On question 0 option B wins every rule. The second question is built
    so that each rule picks another option: A 'kelamab' is short (sum's choice), B holds the
    favoured letter (letter's choice) and a long text of misses, C a long text whose last two
    tokens are favoured ('B' '.', then EOS after '.'), which lowers its mean below A's."""
    llm, tok, _ = ev.load_llm(str(files["llm"]), torch.device("cpu"), torch.float32)
    model = JMLR(llm, None, tok, JMLRConfig()).eval()
    h, m, u = bigram_terms(files["V"])
    q, opts, *_ = QUESTIONS[0]
    tokens = [[m, u, m, u], [h, h, m, u], [m, u, m, u], [m, u, m, u]]    # options A, B, C, D
    got = ev.option_scores(model, Example(q, dict(zip("ABCD", opts)), "", [], None, "B"), [DOCS["d1"]])
    expected = {"letter": [t[0] for t in tokens], "sum": [sum(t) for t in tokens], "mean": [sum(t) / 4 for t in tokens]}
    for rule, values in expected.items():
        assert torch.allclose(got[rule], torch.tensor(values), atol=1e-4), f"{rule}: {got[rule]} != by hand {values}"
    ex = Example("Which drug treats kavitis ?", {"A": "kelamab", "B": "kelamab . kelamab . kelamab",
                                                 "C": "kelamab kelamab B ."}, "", [], None, "A")
    tokens = [[m, u, m, u], [h, h, m, u, m, u, m, u], [m, u, m, u, u, h, h]]   # sums ~28, ~42, ~32; means ~7, ~5.3, ~4.6
    got = ev.option_scores(model, ex, [])
    for rule, pick in {"letter": "B", "sum": "A", "mean": "C"}.items():
        assert "ABC"[int(got[rule].argmin())] == pick, f"{rule} must pick {pick}: {got[rule]}"
    assert torch.allclose(got["letter"], torch.tensor([m, h, m]), atol=1e-4)
    assert torch.allclose(got["sum"], torch.tensor([sum(t) for t in tokens]), atol=1e-4)
    assert torch.allclose(got["mean"], torch.tensor([sum(t) / len(t) for t in tokens]), atol=1e-4)
    assert torch.allclose(got["mean"], model.option_losses([ex], [[]])[0], atol=1e-5), "mean: jmlr.py's option losses"


class MergedLetterTokenizer:
    """The word-level tokenizer, except that 'A' '.' becomes one token (the id of 'Explanation'), as
    a BPE whose vocabulary holds ' A.' would encode it: the letter ' A' alone is not the start of
    the target ' A. kelamab'."""

    def __init__(self, tok, vocab: dict[str, int]):
        self.tok, self.eos_ids, self.pair, self.merged = tok, tok.eos_ids, (vocab["A"], vocab["."]), vocab["Explanation"]

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        out = []
        for t in self.tok.encode(text, bos, eos):
            if out and (out[-1], t) == self.pair:
                out[-1] = self.merged
            else:
                out.append(t)
        return out

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def test_the_letter_is_scored_alone_when_the_tokenizer_merges_it(files):
    """With 'A.' one token, favoured after ':' as much as 'B' here, the first target token of
    option A is not its letter: the letter rule must score ' A' alone (log(2 e^BOOST + V - 2), a
    miss), not the merged token (that minus BOOST). The other rules stay jmlr.py's full passes."""
    llm, tok, _ = ev.load_llm(str(files["llm"]), torch.device("cpu"), torch.float32)
    vocab = json.loads((files["llm"] / "tokenizer.json").read_text())["model"]["vocab"]
    merged = MergedLetterTokenizer(tok, vocab)
    with torch.no_grad():                                     # the logit of the merged token after ':' is BOOST too
        llm.lm_head.weight[merged.merged] = llm.lm_head.weight[vocab["B"]]
    model = JMLR(llm, None, merged, JMLRConfig()).eval()
    q, opts, *_ = QUESTIONS[0]
    ex = Example(q, dict(zip("ABCD", opts)), "", [], None, "B")
    got = ev.option_scores(model, ex, [])
    assert merged.encode(" A. kelamab", bos=False)[0] == merged.merged, "the tokenizer must merge 'A.'"
    V = files["V"]
    miss = math.log(2 * math.exp(BOOST) + V - 2)
    assert torch.allclose(got["letter"], torch.tensor([miss, miss - BOOST, miss, miss]), atol=1e-4), got["letter"]
    assert torch.allclose(got["mean"], model.option_losses([ex], [[]])[0], atol=1e-5), "mean: jmlr.py's option losses"


def test_accuracy_subjects_and_intervals_by_hand(files):
    """The model always answers B: questions 0, 1 (pharm) and 3 (micro) are right."""
    record = run_eval(files)["results"][0]
    assert (record["n"], record["accuracy"]) == (6, 3 / 6), f"accuracy {record['accuracy']} of {record['n']}"
    assert record["ci95"] == pytest.approx(ev.wilson_interval(3, 6))
    assert record["by_subject"]["pharm"]["accuracy"] == pytest.approx(2 / 3), "per-subject accuracy (pharm)"
    assert record["by_subject"]["micro"]["accuracy"] == pytest.approx(1 / 3), "per-subject accuracy (micro)"
    assert record["subject_mean"] == pytest.approx(0.5), "the mean of the subjects' accuracies"
    assert record["predicted"] == {"B": 6}, "the bigram model answers B to everything"


def test_question_records_say_what_the_rows_say(files):
    """--out's per-question records, one per question and row: accuracy, answer counts, recall@1
    and MRR recomputed from them equal the row's; each likelihood record holds its own rule's
    option losses (sum = 4 x mean here: every target is 4 tokens), each generate record the text;
    the documents in the prompt are k [id, score] pairs, the gold one first (gold_rank 1)."""
    out = run_eval(files, "--retriever", "none", str(files["retriever"]), "--mode", "likelihood", "generate",
                   "--score", "letter", "sum", "mean", "--k", "2")
    rows, records = out["results"], out["questions"]
    assert [(r["retriever"] != "none", r["mode"], r["score"]) for r in rows] == [
        (ret, mode, rule) for ret in (False, True) for mode, rule in
        [("likelihood", "letter"), ("likelihood", "sum"), ("likelihood", "mean"), ("generate", None)]]
    assert len(records) == len(rows) * len(QUESTIONS), "one record per question and row"
    h, m, _ = bigram_terms(files["V"])
    for row in rows:
        mine = [q for q in records if all(q[key] == row[key] for key in ev.ROW_KEYS)]
        assert [q["id"] for q in mine] == [f"q{i}" for i in range(len(QUESTIONS))], "every question once, in order"
        assert [q["answer"] for q in mine] == [a for _, _, a, *_ in QUESTIONS], "the gold answers"
        assert all(q["correct"] == (q["pred"] == q["answer"]) for q in mine)
        assert sum(q["correct"] for q in mine) / len(mine) == row["accuracy"], f"accuracy of {ev.ROW_KEYS} {row}"
        assert Counter(str(q["pred"]) for q in mine) == row["predicted"], "answer counts"
        longest = ["ABCD"[max(range(4), key=lambda j: len(opts[j]))] for _, opts, *_ in QUESTIONS]   # first of ties
        assert row["longest_picked"] == sum(q["pred"] == x for q, x in zip(mine, longest)) / len(mine)
        assert row["longest_right"] == sum(a == x for (_, _, a, *_), x in zip(QUESTIONS, longest)) / len(mine)
        if row["mode"] == "likelihood":
            assert all(q["pred"] == min(q["losses"], key=q["losses"].get) for q in mine), "the prediction: the argmin"
        else:
            assert all(q["text"].startswith("B.") for q in mine), "generation writes 'B.'"
        if row["retriever"] == "none":
            assert all(q["docs"] == [] and q["gold_rank"] is None for q in mine), "no retriever: no documents"
            continue
        assert all(len(q["docs"]) == 2 and q["docs"][0][0] == g and q["docs"][0][1] >= q["docs"][1][1]
                   for q, (*_, g) in zip(mine, QUESTIONS)), "the k = 2 documents in the prompt, gold first"
        ranks = [q["gold_rank"] for q in mine]
        assert (sum(r == 1 for r in ranks) / 6, sum(1 / r for r in ranks) / 6) == (row["recall@1"], row["mrr"])
    by = {(q["retriever"], q["score"], q["id"]): q for q in records}
    assert by["none", "letter", "q0"]["losses"] == pytest.approx({"A": m, "B": h, "C": m, "D": m}, abs=1e-3)
    for i in range(len(QUESTIONS)):
        total, mean = by["none", "sum", f"q{i}"]["losses"], by["none", "mean", f"q{i}"]["losses"]
        assert total == pytest.approx({x: 4 * v for x, v in mean.items()}, abs=1e-3), "each row's own rule"


def test_wilson_interval_matches_published_values():
    """Newcombe (1998), Table I, method 3 (Wilson score): 0/10, 1/29, 81/263; and the textbook 7/10."""
    for (c, n), (lo, hi) in {(0, 10): (0.0, 0.2775), (1, 29): (0.0061, 0.1718), (81, 263): (0.2553, 0.3662),
                             (7, 10): (0.3968, 0.8922)}.items():
        assert ev.wilson_interval(c, n) == pytest.approx((lo, hi), abs=1e-4), f"Wilson interval of {c}/{n}"


def test_generation_reads_the_answer_letter(files):
    """Greedy generation writes 'B.' then EOS: every answer parses, and the accuracy is the same."""
    record = run_eval(files, "--mode", "generate")["results"][0]
    assert record["unparsed"] == 0.0, "'B.' must parse as the letter B"
    assert record["accuracy"] == 3 / 6, "generation answers B, right on 3 of 6"


@pytest.mark.parametrize("text, options, letter", [
    (" B. dufopril", "ABCD", "B"), ("(C) because", "ABCD", "C"), ("D", "ABCD", "D"), (" A\nExplanation: x", "AB", "A"),
    ("The answer is (B).", "ABCD", "B"), ("Answer: C", "ABCD", "C"), (" A 45-year-old man", "ABCD", None),
    (" E. ten", "ABCD", None), (" yes, because", {"A": "yes", "B": "no", "C": "maybe"}, "A"),
    (" none of these", {"A": "no", "B": "none of these"}, "B"), ("I cannot tell", "ABCD", None)])
def test_extract_letter(text, options, letter):
    options = options if isinstance(options, dict) else {x: f"option {x}" for x in options}
    assert ev.extract_letter(text, options) == letter, f"extract_letter({text!r})"


def test_unparsed_share_and_rationale_scores_are_averaged_by_hand():
    results = [{"subject": None, "rank": None, "answer": "A", "longest": "B",
                "answers": {(0, None): {"correct": c, "pred": x, "parsed": x is not None, "f1": f}}}
               for c, x, f in [(True, "A", 0.5), (False, None, None), (False, "B", 0.1), (True, "A", 0.3)]]
    s = ev.summarize(results, 0, None)
    assert s["unparsed"] == 1 / 4 and s["accuracy"] == 2 / 4, "unparsed share / accuracy"
    assert (s["longest_picked"], s["longest_right"]) == (1 / 4, 0.0), "the length bias: B is the longest"
    assert s["predicted"] == {"A": 2, "B": 1, "None": 1}, "how often each answer was given"
    assert s["rationale_f1"] == pytest.approx(0.3), "mean F1 over the questions that have a reference"


def test_term_f1_and_support_by_hand():
    # terms: [vitamin, c, deficiency, causes, scurvy] vs [scurvy, caused, vitamin, c, deficiency]: 4 shared
    assert ev.term_f1("Vitamin C deficiency causes scurvy.", "Scurvy is caused by vitamin C deficiency") == \
        pytest.approx(0.8), "term F1: P = R = 4/5"
    assert ev.term_f1("the of and", "scurvy") == 0.0, "stopwords only: no terms, F1 0"
    # distinct terms {scurvy, lack, vitamin, c}; the document holds 3 of them
    assert ev.term_support("Scurvy: lack of vitamin C", ["Vitamin C prevents scurvy."]) == pytest.approx(3 / 4)


# ----------------------------------------------------------------------------------------------
# Retrieval

def test_retrieval_metrics_and_sweep(files):
    """The demo retriever matches words: each question's gold document shares its rare disease word,
    no other does, so it ranks first (recall@1 = MRR = 1). k = 0 is no retrieval."""
    rows = run_eval(files, "--retriever", "none", str(files["retriever"]), "--sweep")["results"]
    none, swept = rows[0], rows[1:]
    assert [r["k"] for r in swept] == list(range(11)), "the sweep covers k = 0..10"
    assert swept[0]["accuracy"] == none["accuracy"] and "mrr" not in swept[0], "k = 0 is the no-retrieval row"
    assert swept[7]["recall@1"] == 1.0 and swept[7]["mrr"] == 1.0, f"gold documents not ranked first: {swept[7]}"
    assert swept[7]["recall@7"] == 1.0


def test_a_built_index_can_be_given_instead_of_the_corpus(files, tmp_path):
    model = rt.ColBERT.from_pretrained(files["retriever"]).eval()
    ci.build_index(model, files["corpus"], tmp_path / "index")
    out = tmp_path / "out.json"
    ev.main([str(files["qa"]), "--llm", str(files["llm"]), "--retriever", str(files["retriever"]), "--index",
             str(tmp_path / "index"), "--cache", str(tmp_path), "--out", str(out)])
    row = json.loads(out.read_text())["results"][0]
    assert (row["recall@1"], row["mrr"]) == (1.0, 1.0), f"search of the given index: {row}"


def test_an_explicit_k_of_zero_is_kept(files):
    row = run_eval(files, "--retriever", str(files["retriever"]), "--k", "0")["results"][0]
    assert row["k"] == 0 and "mrr" not in row, f"--k 0 must mean no documents in the prompt, not the default: {row}"


def test_candidate_lists_are_rescored_by_the_retriever(files):
    """--candidates: each list holds the gold document last; re-scored as in training, it comes first."""
    path = files["dir"] / "candidates.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "doc_ids": [d for d in DOCS if d != g] + [g]}) + "\n"
                            for i, (*_, g) in enumerate(QUESTIONS)))
    row = run_eval(files, "--retriever", str(files["retriever"]), "--candidates", str(path), "--k", "2")["results"][0]
    assert (row["recall@1"], row["mrr"]) == (1.0, 1.0), f"the gold documents were not re-ranked first: {row}"


def test_a_token_budget_gives_the_scores_of_one_pass(files):
    """Without gradients jmlr.JMLR.score_candidates re-scores candidate lists cfg.max_pass_tokens
    document tokens at a time (eval.retrieve goes through it): the scores of the one pass over all
    B x N documents that training computes with gradients; and eval.py with --max-tokens 1 (one
    document per pass) gives the records of the default budget."""
    model = JMLR(None, rt.ColBERT.from_pretrained(files["retriever"]).eval(), None, JMLRConfig()).eval()
    records = ev.read_benchmark(str(files["qa"])).records[:4]
    candidates = {r.id: list(DOCS)[i:] + list(DOCS)[:i] for i, r in enumerate(records)}   # 9 each, rotated
    with torch.no_grad():
        examples, _, _ = ev.retrieve(model, records, None, candidates, DOCS, 9)
    one_pass = model.score_candidates(examples).detach()                                 # (4, 9), with gradients
    L = model.retriever.tokenizer.docs(list(DOCS.values()))[0].size(1)                   # tokens per document
    for max_tokens in (1, 4 * L, 10 ** 6):             # 1 document per pass, 4 (straddling two lists), all
        model.cfg.max_pass_tokens = max_tokens
        with torch.no_grad():
            scores = ev.retrieve(model, records, None, candidates, DOCS, 9)[1]
        assert torch.allclose(scores, one_pass, atol=1e-5), f"max_tokens={max_tokens}: {scores} != {one_pass}"
    path = files["dir"] / "candidates-budget.jsonl"
    path.write_text("".join(json.dumps({"id": r.id, "doc_ids": ids}) + "\n" for r, ids in zip(records, candidates.values())))
    rows = [run_eval(files, "--limit", "4", "--retriever", str(files["retriever"]), "--candidates", str(path),
                     "--k", "2", *budget)["results"] for budget in ([], ["--max-tokens", "1"])]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]   # noqa: E731
    assert strip(rows[0]) == strip(rows[1]), "--max-tokens must not change the results"


def test_a_gold_document_missing_from_the_candidates_counts_as_a_miss(files):
    """Question 0's list lacks its gold document (each list cut to 8 by --depth, the others' gold
    first): recall@1 = MRR = 5/6 (train.py's validation counts it the same way, through
    jmlr.gold_index / gold_ranks)."""
    path = files["dir"] / "candidates-miss.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "doc_ids": ([g] if i else []) + [d for d in DOCS if d != g]})
                            + "\n" for i, (*_, g) in enumerate(QUESTIONS)))
    row = run_eval(files, "--retriever", str(files["retriever"]), "--candidates", str(path), "--k", "2",
                   "--depth", "8")["results"][0]
    assert (row["recall@1"], row["mrr"]) == (pytest.approx(5 / 6), pytest.approx(5 / 6)), f"a miss must count: {row}"


def test_helpfulness_with_the_bigram_model_by_hand(files, capsys):
    """The bigram model ignores the documents: given any of them, or none, the loss of the gold
    answer's target is the hand-computed one (4 tokens: q0, q1, q3 answer B, ':'->B and B->'.'
    favoured; the others not). So no pair of documents differs (agreement nan) and the most
    helpful one is the first of the ties, the retriever's top one; the report says so."""
    out = run_eval(files, "--retriever", str(files["retriever"]), "--helpfulness", "--k", "2", "--depth", "4")
    h, m, u = bigram_terms(files["V"])
    entries = out["helpfulness"]
    assert [e["id"] for e in entries] == [f"q{i}" for i in range(len(QUESTIONS))]
    for e, (q, _, answer, _, gold) in zip(entries, QUESTIONS):
        loss = (h + h + m + u) / 4 if answer == "B" else (m + u + m + u) / 4
        assert e["question"] == q and e["no_document"] == pytest.approx(loss, abs=1e-4), "the loss with no document"
        assert [d["loss"] for d in e["documents"]] == pytest.approx([loss] * 4, abs=1e-4), f"{e['id']}: {e['documents']}"
        assert e["documents"][0]["id"] == gold and e["most_helpful"] == gold and e["best_rank"] == 1
        assert math.isnan(e["agreement"]), "no two documents differ in loss"
        assert [d["score"] for d in e["documents"]] == sorted((d["score"] for d in e["documents"]), reverse=True)
    row = out["results"][0]
    assert math.isnan(row["helpful_agreement"]) and (row["helpful@1"], row["helpful@2"]) == (1.0, 1.0), row
    printed = capsys.readouterr().out
    assert printed.count("every document gives the same loss") == 3, "the report of the first 3 questions"


def test_helpfulness_losses_are_the_option_losses_given_one_document(files):
    """With random weights the documents change the loss. Each document's loss is the mean loss
    of the gold option given that document alone, computed independently by option_scores (the
    shared-prefix KV cache); the agreement and the rank of the most helpful document as counted
    by hand over the pairs."""
    llm, tok, _ = ev.load_llm(str(files["llm"]), torch.device("cpu"), torch.float32)
    llm.reset_parameters()
    model = JMLR(llm, rt.ColBERT.from_pretrained(files["retriever"]).eval(), tok, JMLRConfig()).eval()
    records = ev.read_benchmark(str(files["qa"])).records[:2]
    with torch.no_grad():
        examples, scores, ids = ev.retrieve(model, records, None, {r.id: list(DOCS) for r in records}, DOCS, 9)
    for r, ex, e in zip(records, examples, ev.document_help(model, records, examples, scores, ids)):
        gold = list(r.options).index(r.answer)
        loss = {d: float(ev.option_scores(model, ex, [DOCS[d]])["mean"][gold]) for d in DOCS}
        score = {d["id"]: d["score"] for d in e["documents"]}
        assert {d["id"]: d["loss"] for d in e["documents"]} == pytest.approx(loss, abs=1e-4), "loss given each document"
        assert e["no_document"] == pytest.approx(float(ev.option_scores(model, ex, [])["mean"][gold]), abs=1e-4)
        assert max(loss.values()) - min(loss.values()) > 1e-3, "random weights: the documents must matter"
        pairs = [(a, b) for a in DOCS for b in DOCS if loss[a] < loss[b]]          # a helps more than b
        assert e["agreement"] == pytest.approx(sum(score[a] > score[b] for a, b in pairs) / len(pairs), abs=1e-6)
        best = min(loss, key=loss.get)
        assert e["most_helpful"] == best and e["best_rank"] == sum(s >= score[best] for s in score.values())
        assert e["gold"] == r.gold_doc
    # doc_loss="letter" (training's step 3 on the answer letter): every loss, the one with no document too,
    # is the letter rule's NLL of ' X'
    model.cfg = JMLRConfig(doc_loss="letter")
    for ex, e in zip(examples, ev.document_help(model, records, examples, scores, ids)):
        gold = list(ex.options).index(ex.answer)
        letter = {d: float(ev.option_scores(model, ex, [DOCS[d]])["letter"][gold]) for d in DOCS}
        assert {d["id"]: d["loss"] for d in e["documents"]} == pytest.approx(letter, abs=1e-4)
        assert e["no_document"] == pytest.approx(float(ev.option_scores(model, ex, [])["letter"][gold]), abs=1e-4)


def test_ask_prints_the_gold_document_first_and_the_answer(files, capsys):
    q, opts, *_ = QUESTIONS[3]
    ev.main(["--ask", q, "--options", *opts, "--llm", str(files["llm"]), "--retriever", str(files["retriever"]),
             "--corpus", str(files["corpus"]), "--cache", str(files["dir"] / "cache"), "--k", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[2] == "d4", f"the top document must be the gold one: {lines[0]}"
    assert "answer by likelihood (mean): B" in lines, "the bigram model answers B"
    assert any(line.startswith("generated: B.") for line in lines), "generation writes 'B.'"


# ----------------------------------------------------------------------------------------------
# Contamination

def test_contamination_flags_a_planted_duplicate_and_nothing_clean(tmp_path):
    records = [QARecord("q1", "A 34-year-old woman presents with fever, joint pain and a malar rash after "
                           "sun exposure. Which of the following is the most likely diagnosis?", {"A": "x", "B": "y"}, "A"),
               QARecord("q2", "A 60-year-old man has crushing chest pain radiating to the left arm for two hours. "
                           "Which of the following is the most likely diagnosis?", {"A": "x", "B": "y"}, "A")]
    clean = tmp_path / "clean.jsonl"   # shares the closing sentence and some words, not the questions
    clean.write_text(json.dumps({"id": "c1", "contents": "Which of the following is the most likely diagnosis? "
                                 "Lupus presents with a malar rash and joint pain in a young woman."}) + "\n")
    assert contamination(records, [str(clean)]) == [], "a clean corpus must flag nothing"
    leaked = tmp_path / "leaked.jsonl"  # a GPT-4-style explanation that restates question 2
    leaked.write_text(clean.read_text() + json.dumps({"id": "gpt4-17", "contents": "Explanation: a 60 year old man has "
                      "crushing chest pain radiating to the left arm for two hours; which of the following is the most "
                      "likely diagnosis? Myocardial infarction."}) + "\n")
    flags = contamination(records, [str(leaked)])
    assert [(f["id"], f["source_id"]) for f in flags] == [("q2", "gpt4-17")], f"flags: {flags}"
    # 21 8-grams of stem + options "x y"; the text lacks the options, so the last 2 are missing
    assert flags[0]["overlap"] == round(19 / 21, 3), "the share of the question's 8-grams in the leaked text"
    short = [QARecord("q3", "Drug of choice for scurvy?", {"A": "vitamin C", "B": "iron"}, "A")]   # 7 words
    assert contamination(short, [str(clean)]) == [], "a short question absent from the text"
    (tmp_path / "train.jsonl").write_text(json.dumps({"id": "t9", "question": "drug of choice for SCURVY",
                                                      "options": ["vitamin C", "iron"], "answer": "A"}) + "\n")
    assert [f["source_id"] for f in contamination(short, [str(tmp_path / "train.jsonl")])] == ["t9"], \
        "a short question found whole in a training file"


# ----------------------------------------------------------------------------------------------
# Checkpoints, bad input, formats

def test_checkpoint_resolution_and_option_head(files, tmp_path):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_000010"
    step.mkdir(parents=True)
    (step / "llm").symlink_to(files["llm"], target_is_directory=True)
    (step / "retriever").symlink_to(files["retriever"], target_is_directory=True)
    (run / "checkpoints" / "latest").write_text("step_000010\n")
    (step / "state.json").write_text(json.dumps({"config": {"jmlr": {"top_k": 3, "max_doc_tokens": 32}}}))
    C = 64
    head = {"llm.query.weight": torch.randn(C, C), "llm.key.weight": torch.randn(C, C)}
    save_file(head, step / "option_head.safetensors")
    llm_dir, ret_dir, head_file, cfg = ev.resolve_checkpoint(str(run))
    assert (llm_dir, ret_dir, head_file) == (step / "llm", step / "retriever", step / "option_head.safetensors")
    assert cfg["jmlr"]["top_k"] == 3, "the training config comes with the checkpoint (eval's default k)"
    llm, _, _ = ev.load_llm(str(run), torch.device("cpu"), torch.float32)
    assert torch.equal(llm.query.weight, head["llm.query.weight"]), "the option head's query weights were not loaded"
    assert ev.resolve_checkpoint(str(files["llm"]))[1:3] == (None, None), "a plain HF directory has no extras"
    with pytest.raises(FileNotFoundError, match="neither an HF-format Llama directory"):
        ev.resolve_checkpoint(str(tmp_path))


@pytest.mark.parametrize("content, message", [
    ('{"question": "q?", "options": {"A": "x", "B": "y"}, "answer": "A"}\n{"question": "q2?"\n', r"bad\.jsonl:2: not valid JSON"),
    ('{"question": "q?", "options": {}, "answer": "A"}\n', r"bad\.jsonl:1: missing or empty 'options'"),
    ('{"question": "q?", "options": {"A": "x", "B": "y"}, "answer": "E"}\n', r"bad\.jsonl:1: answer letter 'E' is not"),
    ("\n\n", r"bad\.jsonl: no questions")])
def test_bad_input_names_the_file_and_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        ev.main([str(tmp_path / "bad.jsonl"), "--llm", str(tmp_path), "--format", "generic", "--cache", str(tmp_path)])


def test_formats_fixtures_and_a_directory_of_subjects(tmp_path):
    (tmp_path / "mmlu").mkdir()
    for subject in ("anatomy", "virology"):
        (tmp_path / "mmlu" / f"{subject}_test.csv").write_text("q1,a,b,c,d,B\nq2,a,b,c,d,D\nq3,a,b,c,d,A\n")
    bench = ev.read_benchmark(str(tmp_path / "mmlu"), limit=2)
    assert bench.name == "mmlu" and len(bench.records) == 4, "a directory: every file, the first 2 of each"
    assert [r.subject for r in bench.records] == ["anatomy", "anatomy", "virology", "virology"]
    amboss = tmp_path / "amboss.jsonl"   # MedQA's shape with five options
    amboss.write_text(json.dumps({"question": "q?", "options": dict(zip("ABCDE", "vwxyz")), "answer": "z",
                                  "answer_idx": "E", "meta_info": "step1"}) + "\n")
    assert ev.read_benchmark(str(amboss)).records[0].answer == "E"


@pytest.mark.skipif(not DATA.is_dir(), reason=f"no {DATA}")
def test_real_benchmarks_parse_with_their_counts():
    counts = {"mmlu_medical": 1089, "medmcqa/dev.jsonl": 4183, "pubmedqa/ori_pqal.json": 1000}
    for path, n in counts.items():
        bench = ev.read_benchmark(str(DATA / path))
        assert len(bench.records) == n, f"{path}: {len(bench.records)} questions, expected {n}"
    assert len({r.subject for r in ev.read_benchmark(str(DATA / "mmlu_medical")).records}) == 6


# ----------------------------------------------------------------------------------------------
# torchrun

def test_two_processes_equal_one(files, tmp_path):
    """Questions sharded by batch across 2 gloo ranks, results gathered: the same rows, and the
    same per-question records (two scoring rules, helpfulness) in the same order. The
    contamination scan split between the ranks finds one process's flags: every question in both
    QA files, each reported in the first, although in the second one rank holds it, the other rank
    the first file's (the second starts with an extra question, which shifts its texts by one)."""
    leak = tmp_path / "leak.jsonl"
    leak.write_text(json.dumps({"id": "x", "question": "Which germ causes nothing ?", "options": ["a", "b"],
                                "answer": "A"}) + "\n" + files["qa"].read_text())
    common = [str(files["qa"]), "--llm", str(files["llm"]), "--retriever", "none", str(files["retriever"]),
              "--corpus", str(files["corpus"]), "--cache", str(tmp_path / "cache"), "--batch-size", "2", "--k", "2",
              "--contamination", str(files["qa"]), str(leak), "--score", "letter", "mean", "--helpfulness"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "eval.py", *common, "--out", str(tmp_path / "one.json")], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "eval.py", *common, "--out", str(tmp_path / "two.json")], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=False)
    errors = [line for line in two.stderr.splitlines() if "Error" in line or "error" in line]
    assert two.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + two.stderr[-3000:]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert strip(one["results"]) == strip(two["results"]), "2 ranks must give exactly the records of 1 process"
    for key in ("questions", "helpfulness"):                 # as text: NaN != NaN
        assert len(one[key]) > 0 and json.dumps(one[key]) == json.dumps(two[key]), f"2 ranks: other {key} records"
    flags = two["contamination"]["qa"]
    assert [(f["id"], f["source"], f["overlap"]) for f in flags] == [(f"q{i}", str(files["qa"]), 1.0) for i in range(6)]
    assert one["contamination"] == two["contamination"], "the split contamination scan must find one process's flags"


def test_llm_judge_through_an_openai_compatible_endpoint():
    """A local stand-in endpoint: the request carries the reference and the candidate, the grade
    '7' of the reply becomes 0.7, a reply without a grade None."""
    import http.server
    import threading

    seen, replies = [], iter(["7", "I cannot grade this"])

    class Endpoint(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            body = json.dumps({"choices": [{"message": {"content": next(replies)}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1"
    try:
        assert ev.judge_score(url, "judge-1", "Why scurvy?", "lack of vitamin C", "vitamin C deficiency") == 0.7
        assert ev.judge_score(url, "judge-1", "q", "r", "c") is None, "a reply without a grade is no grade"
    finally:
        server.shutdown()
    path, body = seen[0]
    assert path == "/v1/chat/completions" and body["model"] == "judge-1", f"request to {path}: {body}"
    assert "lack of vitamin C" in body["messages"][1]["content"] and "vitamin C deficiency" in body["messages"][1]["content"]
