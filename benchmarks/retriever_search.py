"""Benchmark: exact ColBERT search on CPU, colbert_index.py's streamed `Index.search` against padded MaxSim.

Requirement: on an index of >= 50,000 documents of 40-180 tokens, for 1 query and for 16, ours
scores >= 2x the documents/s of a padded-tensor MaxSim and is within 2x of the machine's limit.

Shapes: N documents, Ntok stored tokens, d = 128, Nq queries of Lq = 32 tokens, top k = 10.

How it measures:
  1. A synthetic index in colbert_index.py's format (random unit fp16 token embeddings, lengths uniform
     in [40, 180], seed 0), written to --dir once and reused while its parameters match.
  2. Baseline = ColBERT's `colbert_score`: documents padded to 180 tokens in one fp16 (N, 180, d)
     tensor in RAM; per chunk: to fp32 (as ours; CPUs lack fast fp16 matmul), matmul with all query
     tokens, padding -> -inf, max over document tokens, sum over query tokens. Chunks hold 2^28 bytes
     of fp32 scores, as ours do (unchunked: 18 GB for 50k documents x 16 queries).
  3. Speed: same process, queries and threads; a warm-up each (it also fills the page cache) must
     give the same top-k; then ours, padded, limit probe, ... --reps times; medians. Limit =
     max(2*Ntok*d*Nq*Lq FLOPs at the best fp32 rate of (T, d) @ (d, Nq*Lq) matmuls, T = 2^12 or
     2^17, index bytes at the rate an fp16 -> fp32 copy reads fp16).
  4. Memory: each method alone in a fresh process (`--only`), its peak RSS (VmHWM) reset just before
     the search: Python, torch, the padded tensor (baseline), plus the search's own peak (ours:
     mapped shard pages, fp32 chunks, scores).

Record figures on an otherwise idle machine (the load average is printed): on 2 busy cores every
parallel op waits for a descheduled thread, and times swing by 10x.
Run (a few minutes for 50k documents on 2 cores, plus a minute to write the index the first time):
    python benchmarks/retriever_search.py [--docs 50000] [--reps 3] [--threads N] [--dir DIR]
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # colbert_index.py sits one level up
from llama import open_safetensors  # noqa: E402
from colbert_index import Index, shard_path  # noqa: E402

L_MIN, L_MAX, DIM, LQ, SHARD_DOCS, K = 40, 180, 128, 32, 10_000, 10


def write_index(index_dir: Path, docs: int, seed: int = 0):
    """A synthetic index in colbert_index.py's format, unless the directory already holds this one."""
    params = {"docs": docs, "min_len": L_MIN, "max_len": L_MAX, "dim": DIM, "seed": seed, "shard": SHARD_DOCS}
    manifest_path = index_dir / "manifest.json"
    if manifest_path.is_file():
        if json.loads(manifest_path.read_text()).get("synthetic") == params:
            return
        raise ValueError(f"{index_dir} holds another index; pass another --dir or delete this one")
    index_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(L_MIN, L_MAX + 1, (docs,), generator=g)            # (N,) tokens per document
    for s, a in enumerate(range(0, docs, SHARD_DOCS)):
        n_tok = lengths[a:a + SHARD_DOCS]
        E = F.normalize(torch.randn(int(n_tok.sum()), DIM, generator=g), dim=-1).half()   # (Ntok, d)
        tensors = {"embeddings": E, "offsets": F.pad(n_tok.cumsum(0), (1, 0)),
                   "byte_offsets": torch.zeros(len(n_tok), dtype=torch.int64)}     # no corpus file
        ids = [f"doc{a + i}" for i in range(len(n_tok))]
        save_file(tensors, shard_path(index_dir, s), metadata={"ids": json.dumps(ids)})
    manifest = {"format": 1, "encoder": "synthetic", "synthetic": params, "num_docs": docs,
                "shard_size": SHARD_DOCS, "num_shards": s + 1, "complete": True}
    manifest_path.write_text(json.dumps(manifest, indent=2))                   # last: the index is done


def load_padded(index: Index) -> tuple[torch.Tensor, torch.Tensor]:
    """colbert_score's inputs: every document padded to L_MAX, D (N, L_MAX, d) fp16, mask (N, L_MAX)."""
    N = len(index.ids)
    D, mask = torch.zeros(N, L_MAX, DIM, dtype=torch.float16), torch.zeros(N, L_MAX, dtype=torch.bool)
    first = 0
    for path in index.shards:
        with open_safetensors(path) as f:
            offsets, E = f.get_tensor("offsets"), f.get_tensor("embeddings")  # (n + 1,), (Ntok, d)
        n = offsets.numel() - 1
        mask[first:first + n] = torch.arange(L_MAX) < offsets.diff()[:, None]  # (n, L_MAX)
        D[first:first + n][mask[first:first + n]] = E                          # row-major: tokens in order
        first += n
    return D, mask


def padded_search(D: torch.Tensor, mask: torch.Tensor, Q: torch.Tensor, k: int,
                  chunk_bytes: int = 1 << 28) -> tuple[torch.Tensor, torch.Tensor]:
    """colbert_score per chunk of documents, then one top-k: Q (Nq, Lq, d) -> (Nq, k) scores, ids."""
    N, Ld, d = D.shape
    Nq, Lq, _ = Q.shape
    Qt = Q.reshape(Nq * Lq, d).T.float()                                       # (d, Nq*Lq)
    c = max(1, chunk_bytes // (4 * Ld * max(d, Nq * Lq)))                      # docs per chunk
    scores = torch.empty(N, Nq)
    for a in range(0, N, c):
        sim = D[a:a + c].float() @ Qt                                          # (c, Ld, Nq*Lq)
        sim.masked_fill_(~mask[a:a + c, :, None], float("-inf"))               # padding never wins the max
        scores[a:a + c] = sim.amax(dim=1).view(-1, Nq, Lq).sum(-1)             # (c, Nq)
    return scores.T.topk(k, dim=1)


def search(name: str, index: Index, padded, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "ours":
        return index.search(Q, torch.ones(Q.shape[:2], dtype=torch.bool), K)  # every query token scored
    return padded_search(*padded, Q, K)


def make_queries(nq: int) -> torch.Tensor:
    return F.normalize(torch.randn(nq, LQ, DIM, generator=torch.Generator().manual_seed(1)), dim=-1)


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_seconds(fn, reps: int = 3) -> float:
    fn()                                                                        # warm-up
    return statistics.median(seconds(fn) for _ in range(reps))


def limit_seconds(n_tok: int, nq: int) -> tuple[float, float, float, float]:
    """-> (limit s, fp32 FLOP/s of (T, d) @ (d, Nq*Lq) for T = 2^17 and for T = 2^12 (cache-resident
    blocks), fp16 bytes/s read by an fp16 -> fp32 copy). The limit takes the faster matmul rate."""
    n = nq * LQ
    A, B, C = torch.randn(1 << 17, DIM), torch.randn(DIM, n), torch.empty(1 << 17, n)
    rates = [2 * A.numel() * n / median_seconds(fn) for fn in (
        lambda: torch.mm(A, B, out=C),                                          # 2^17 rows at once
        lambda: [torch.mm(A[:4096], B, out=C[:4096]) for _ in range(32)])]      # the same FLOPs in blocks
    x16, x32 = torch.ones(1 << 28, dtype=torch.float16), torch.empty(1 << 28)   # 512 MiB of fp16
    bytes_per_s = x16.nbytes / median_seconds(lambda: x32.copy_(x16))
    return max(2 * n_tok * DIM * n / max(rates), 2 * n_tok * DIM / bytes_per_s), *rates, bytes_per_s


def peak_rss_alone(args, name: str, nq: int) -> float:
    """Run `--only name` in a fresh process; its peak RSS over the search, in MiB."""
    cmd = [sys.executable, __file__, "--only", name, "--nq", str(nq), "--dir", args.dir,
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{out.stderr}")
    return float(out.stdout.split()[-1])


def run_alone(args):
    index, Q = Index(args.dir), make_queries(args.nq)
    padded = load_padded(index) if args.only == "padded" else None
    Path("/proc/self/clear_refs").write_text("5")                               # VmHWM := VmRSS now
    search(args.only, index, padded, Q)
    hwm = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    print(int(hwm.split()[1]) / 1024)                                           # kB -> MiB


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=50_000)
    p.add_argument("--reps", type=int, default=3, help="timed searches per method and batch size")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--dir", help="index directory (default: one per --docs in the temp dir)")
    p.add_argument("--only", choices=["ours", "padded"], help="internal: one method alone, for peak RSS")
    p.add_argument("--nq", type=int, help="internal: queries for --only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.dir = args.dir or str(Path(tempfile.gettempdir()) / f"retriever_search_{args.docs}")
    if args.only:
        return run_alone(args)

    write_index(Path(args.dir), args.docs)
    index = Index(args.dir)
    padded = load_padded(index)
    n_docs, n_tok = len(index.ids), int(padded[1].sum())
    cpu = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")), "unknown")
    print(f"command: {shlex.join(['python', *sys.argv])}")
    print(f"torch {torch.__version__}, {args.threads} threads, CPU {cpu} ({os.cpu_count()} cores), "
          f"load average {os.getloadavg()[0]:.2f} (other work on the cores skews every figure)")
    print(f"index: {n_docs:,} docs, {n_tok:,} tokens, {2 * n_tok * DIM / 2**20:,.0f} MiB fp16 in {args.dir}; "
          f"padded {padded[0].nbytes / 2**20:,.0f} MiB")
    rows = []
    for nq in (1, 16):
        Q = make_queries(nq)
        # 1. warm up, and check that both find the same top-k
        (s_ours, i_ours), (s_pad, i_pad) = (search(m, index, padded, Q) for m in ("ours", "padded"))
        assert torch.equal(i_ours, i_pad), f"Nq={nq}: top-{K} documents differ:\n{i_ours}\n{i_pad}"
        assert torch.allclose(s_ours, s_pad, atol=1e-4), f"Nq={nq}: scores differ: {s_ours} vs {s_pad}"
        # 2. timed searches and the machine's limit, interleaved so that load drift hits all three
        times, limits = {"ours": [], "padded": []}, []
        for _ in range(args.reps):
            for name in times:
                times[name].append(seconds(lambda: search(name, index, padded, Q)))
            limits.append(limit_seconds(n_tok, nq))
        med = {name: statistics.median(t) for name, t in times.items()}
        limit, big, blocks, bytes_per_s = (statistics.median(x) for x in zip(*limits))
        print(f"Nq={nq}: fp32 matmul {big / 1e9:.1f} GFLOP/s (2^17 rows), {blocks / 1e9:.1f} GFLOP/s "
              f"(2^12-row blocks); fp16->fp32 copy {bytes_per_s / 1e9:.1f} GB/s")
        for name in ("ours", "padded"):   # 3. peak memory, each alone in a fresh process
            rows.append((name, nq, med[name], f"{peak_rss_alone(args, name, nq):,.0f}", med[name] / limit))
        rows.append(("limit", nq, limit, "-", 1.0))

    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    print("| method | Nq | median s | docs/s | peak RSS MiB | speed vs padded | time / limit |")
    print("|---|---|---|---|---|---|---|")
    for name, nq, s, mib, vs_limit in rows:
        padded_s = next(r[2] for r in rows if r[:2] == ("padded", nq))
        print(f"| {name} | {nq} | {s:.3f} | {n_docs / s:,.0f} | {mib} | {padded_s / s:.2f}x | {vs_limit:.2f} |")


if __name__ == "__main__":
    main()
