"""contamination.py: evaluation questions that appear in a corpus or a training file (eval.py --contamination).

Word n-grams (lowercased, punctuation dropped, stopwords kept) of each question followed by its
options are looked up in every source text; a question is flagged when one source text holds at
least `threshold` of its n-grams. A share, not a single shared n-gram: MedQA's closing sentences
("which of the following is the most likely diagnosis") are shared by thousands of honest texts.
The options count because short stems ("Osteoclasts", "Which of the following is true?") are
only told apart by them; a text shorter than n words is one n-gram, found only whole. The
questions' n-grams are held in memory and the sources streamed: a corpus of any size can be checked.
Under torchrun the ranks split the texts and merge their findings, rather than each scanning them
all: a corpus of millions of texts takes a rank many minutes, and the merged list is exact.

    python eval.py medqa_test.jsonl --contamination corpus.jsonl train.jsonl --llm ...
"""

import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

import colbert_index as ci
from qa_data import QARecord, read_qa

WORD = re.compile(r"[a-z0-9]+")


def ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def source_texts(path: str) -> Iterator[tuple[str, str]]:
    """(id, text) of every document of a corpus file (id + contents/content, or .tsv), streamed, or
    of every question of a QA file (question, options and rationale: a training file can leak all three)."""
    p = Path(path)
    with open(p, encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    if p.suffix == ".tsv" or (p.suffix == ".jsonl" and re.search(r'"(contents?)"\s*:', first)):
        yield from ((doc_id, text) for doc_id, text, _ in ci.read_corpus(p))
    else:
        yield from ((r.id, " ".join([r.question, *r.options.values(), r.rationale or ""])) for r in read_qa(p))


def contamination(records: list[QARecord], sources: list[str], n: int = 8, threshold: float = 0.5,
                  rank: int = 0, world: int = 1) -> list[dict]:
    """-> one entry per flagged question: its id, the source file and text id holding the largest
    share of its n-grams (the first such text), that share, and the start of the question. Shared
    by `world` ranks (colbert_index.check_ranks): rank r scores texts r, r + W, ... of all the sources in
    order, and the best of every rank is merged, so every rank returns one process's list."""
    ci.check_ranks(rank, world)
    words = [WORD.findall(" ".join([r.question, *r.options.values()]).lower()) for r in records]
    grams = [ngrams(w, min(n, len(w))) for w in words]           # a question under n words: itself, whole
    sizes = {min(n, len(w)) for w in words if w}                 # the n-gram lengths to look for
    owners = defaultdict(list)                                   # n-gram -> questions that contain it
    for qi, g in enumerate(grams):
        for gram in g:
            owners[gram].append(qi)
    best = {}                                                    # question -> (share, -text number, file, text id)
    texts = ((path, *t) for path in sources for t in source_texts(path))
    for number, (path, text_id, text) in enumerate(texts):
        if number % world != rank:
            continue                                             # another rank's
        text_words = WORD.findall(text.lower())
        found = set().union(*(ngrams(text_words, m) for m in sizes)) & owners.keys()
        hits = Counter(qi for gram in found for qi in owners[gram])
        for qi, h in hits.items():
            share = h / len(grams[qi])
            if share >= threshold and share > best.get(qi, (0,))[0]:
                best[qi] = (share, -number, path, text_id)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, best)
        best = {}
        for part in parts:
            for qi, entry in part.items():
                best[qi] = max(best.get(qi, entry), entry)       # the largest share, then the first text
    return [{"id": records[qi].id, "source": path, "source_id": text_id, "overlap": round(share, 3),
             "question": records[qi].question[:100]} for qi, (share, _, path, text_id) in sorted(best.items())]


def contamination_report(flagged: dict[str, list[dict]], sizes: dict[str, int], ngram: int, overlap: float) -> str:
    """contamination()'s flags of each benchmark (of sizes[name] questions), one line each."""
    out = []
    for name, flags in flagged.items():
        out.append(f"\ncontamination of {name} ({ngram}-grams, flagged at {overlap:.0%}): {len(flags)} of "
                   f"{sizes[name]:,} questions")
        out += [f"  {f['id']}: {f['overlap']:.0%} in {f['source']} {f['source_id']}: {f['question']}" for f in flags]
    return "\n".join(out)
