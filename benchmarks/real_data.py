"""Real-data settings for train.py and eval.py, written from ../shared/data as a corpus, a training
file and a test file, each question's gold document known (its `gold_doc`):

    python benchmarks/real_data.py medmcqa-exp ../shared/data/medmcqa runs/medmcqa-exp
    python benchmarks/real_data.py pubmedqa ../shared/data/pubmedqa runs/pubmedqa-data [--test-n 150]
    python benchmarks/real_data.py pubmedqa-sections ../shared/data/pubmedqa runs/pubmedqa-sections

medmcqa-exp: the MedMCQA dev questions that have an explanation (2,194 of 4,183); the corpus is
their explanations, each question's gold document its own, with the leading answer letter cut
("Ans: C. Epinephrine ..." -> "Epinephrine ..."): a document states a finding, never which letter
of this question it is, so the LLM must match option text to document text. A seeded split puts
--test-n questions in the test file, the rest in the training file. all-MiniLM-L6-v2 ranks a
question's own explanation first for 44% of the questions (measured before the cut; README, "A
real-data setting with retrieval headroom").
pubmedqa: the 1,000 PQA-L abstracts as documents; training = the 500 questions outside the
official test split, test = the first --test-n official test questions (in pmid order).
pubmedqa-sections: the same questions; every labelled section of an abstract and its conclusion
(LONG_ANSWER) are separate passages, the gold document being the conclusion.
"""

import argparse
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qa_data import read_pubmedqa_json, read_qa  # noqa: E402

# "Ans: a", "Answer- C.", "Ans. is 'b' i.e.,", "Option D": the letter that opens most MedMCQA explanations
ANSWER_PREFIX = re.compile(r"""^\W*(?:ans(?:wer)?s?|option|correct\s+(?:answer|option)|the\s+answer)
    \s*(?:is|:|-|\.|,|\s)*\s*(?:option\s*)?['"(\[]?\s*[a-d]\s*['")\]]?(?![a-z])\s*(?:[:\-.,)]|\s)*
    \s*(?:i\.?\s*e\.?\s*[,:\-]?|ie\b[,:\-]?)?\s*""", re.I | re.X)


def medmcqa_exp(data: Path, test_n: int, seed: int):
    """-> corpus [(id, text)], training and test records {id, question, options, answer, gold_doc}."""
    path = data / "dev.jsonl"
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = {r.id: r for r in read_qa(path)}                      # validated: options, answer letter
    corpus, doc_of_text, questions = [], {}, []
    for rec in raw:
        text = ANSWER_PREFIX.sub("", (rec.get("exp") or "").strip(), count=1).strip()
        if len(text) < 20:                                         # no explanation, or only "Ans: a"
            continue
        if text not in doc_of_text:                                # a shared explanation is one document
            doc_of_text[text] = f"exp-{len(corpus)}"
            corpus.append((doc_of_text[text], text))
        r = records[rec["id"]]
        questions.append({"id": r.id, "question": r.question, "options": r.options, "answer": r.answer,
                          "gold_doc": doc_of_text[text]})
    random.Random(seed).shuffle(questions)
    return corpus, questions[test_n:], questions[:test_n]


def pubmedqa(data: Path, test_n: int, sections: bool):
    records = read_pubmedqa_json(data / "ori_pqal.json")
    test_ids = sorted(json.loads((data / "test_ground_truth.json").read_text()))
    corpus = []
    for pmid, rec in records.items():
        if not sections:
            corpus.append((pmid, " ".join(rec["CONTEXTS"])))
            continue
        for i, (label, text) in enumerate(zip(rec["LABELS"], rec["CONTEXTS"])):
            corpus.append((f"{pmid}-{i}", f"{label.title()}: {text}"))
        corpus.append((f"{pmid}-conclusion", f"Conclusions: {rec['LONG_ANSWER']}"))
    gold = (lambda pmid: f"{pmid}-conclusion") if sections else (lambda pmid: pmid)
    as_record = lambda pmid: {"id": pmid, "question": records[pmid]["QUESTION"],  # noqa: E731
                              "options": {"A": "yes", "B": "no", "C": "maybe"},
                              "answer": records[pmid]["final_decision"], "gold_doc": gold(pmid)}
    train = [as_record(p) for p in records if p not in set(test_ids)]
    return corpus, train, [as_record(p) for p in test_ids[:test_n]]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("setting", choices=("medmcqa-exp", "pubmedqa", "pubmedqa-sections"))
    p.add_argument("data_dir"), p.add_argument("out_dir")
    p.add_argument("--test-n", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="medmcqa-exp: the split's seed")
    args = p.parse_args()
    data, out = Path(args.data_dir), Path(args.out_dir)
    if args.setting == "medmcqa-exp":
        corpus, train, test = medmcqa_exp(data, args.test_n, args.seed)
    else:
        corpus, train, test = pubmedqa(data, args.test_n, args.setting == "pubmedqa-sections")
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "corpus.jsonl").write_text("".join(json.dumps({"id": i, "content": t}) + "\n" for i, t in corpus))
    print(f"{out}: {len(train):,} training and {len(test):,} test questions, {len(corpus):,} documents")


if __name__ == "__main__":
    main()
