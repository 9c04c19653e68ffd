"""Prepare the real-weights JMLR run on PubMedQA (../shared/data/pubmedqa): a corpus of the 1,000
abstracts (each question's gold document is its own abstract), a training file of the 500 questions
outside the official test split, and a test file of the 500 official test questions (both in
PubMedQA's own JSON format, read by qa_data.read_qa).

    python benchmarks/pubmedqa_split.py ../shared/data/pubmedqa runs/pubmedqa-data [--test-n 150]

--test-n keeps the first n test questions (in pmid order) so that a CPU run fits in an hour.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qa_data import pubmedqa_corpus  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir"), p.add_argument("out_dir")
    p.add_argument("--test-n", type=int, default=500)
    args = p.parse_args()
    data, out = Path(args.data_dir), Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = json.loads((data / "ori_pqal.json").read_text())
    test_ids = sorted(json.loads((data / "test_ground_truth.json").read_text()))
    train = {k: v for k, v in records.items() if k not in set(test_ids)}
    test = {k: records[k] for k in test_ids[:args.test_n]}
    (out / "train.json").write_text(json.dumps(train))
    (out / "test.json").write_text(json.dumps(test))
    with open(out / "corpus.jsonl", "w") as f:
        for pmid, text in pubmedqa_corpus(data / "ori_pqal.json"):
            f.write(json.dumps({"id": pmid, "content": text}) + "\n")
    print(f"{out}: {len(train)} training and {len(test)} test questions, 1,000 abstracts")


if __name__ == "__main__":
    main()
