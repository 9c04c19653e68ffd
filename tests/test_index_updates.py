"""index_updates.py and search shared by ranks: documents added to a built index, documents removed.

An exact index of 48 documents with 32 added equals, bit for bit, one built from all 80 at once
(same ids, same scores), and each document's text comes from its own file; a compressed index with
the same addition, every centroid probed, is exact MaxSim over the 80 documents compressed with the
codec fitted on the first 48. A killed add is left out of the search and resumes to the bytes of
an uninterrupted one; another encoder, an id already in the index, or a second corpus while one is
unfinished is refused naming the file. A removed document is never returned, neither by search
(the ranking of an index built without it) nor in candidate lists, for either index; removing and
adding an id replaces the document. Two forked gloo ranks, each searching its own shards, return
one process's top-k and write one process's candidate file. Embeddings: test_compressed_index's
synthetic encoder ("doc J" -> seeded token embeddings), so each document is its own query's best.
"""

import json
import os
import time

import pytest
import torch

import colbert_index
import compressed_index
from colbert_index import Index, best_first, build_index, file_sha256, read_candidates, write_candidates
from compressed_index import CodecConfig, CompressedIndex, build_compressed_index, compress, decompress
from conftest import fork_ranks
from index_updates import add_documents, main, remove_documents
from retriever import BertConfig, ColBERT, ColBERTConfig, load_wordpiece, maxsim
from test_compressed_index import SyntheticEncoder, same_files

SIZE, CFG = 16, CodecConfig(bits=4, centroids=24)


def write_docs(path, docs):
    """A corpus of the documents numbered `docs`: id "docJ", text "doc J"."""
    path.write_text("".join(json.dumps({"id": f"doc{j}", "contents": f"doc {j}"}) + "\n" for j in docs))
    return path


def write_qa(path, docs):
    path.write_text("".join(json.dumps({"id": f"q{j}", "question": f"doc {j}", "options": ["yes", "no"],
                                        "answer": "A"}) + "\n" for j in docs))
    return path


@pytest.fixture
def grown(tmp_path):
    """base.jsonl (48 documents, shards 0-2) built, exact and compressed, then new.jsonl (32, shards
    3 and 4) added to each; both.jsonl (all 80) built exactly at once."""
    enc = SyntheticEncoder()
    base, new = write_docs(tmp_path / "base.jsonl", range(48)), write_docs(tmp_path / "new.jsonl", range(48, 80))
    build_index(enc, base, tmp_path / "exact", SIZE, 8)
    add_documents(enc, tmp_path / "exact", new, 8)
    build_compressed_index(enc, base, tmp_path / "c", CFG, SIZE, 8)
    add_documents(enc, tmp_path / "c", new, 8)
    build_index(enc, write_docs(tmp_path / "both.jsonl", range(80)), tmp_path / "both", SIZE, 8)
    return enc, tmp_path


def decompressed_maxsim(index: CompressedIndex, enc: SyntheticEncoder, Q, qm, docs) -> torch.Tensor:
    """MaxSim (Nq, len(docs)) over the documents compressed and decompressed with the index's codec."""
    E = torch.cat([enc.doc(j).half() for j in docs]).float()            # as the index stores them
    D = decompress(index.codec, *compress(index.codec, E)).split([enc.doc(j).size(0) for j in docs])
    D = torch.nn.utils.rnn.pad_sequence(D, batch_first=True)            # (N, L, d)
    return maxsim(Q, qm, D, D.norm(dim=-1) > 0)


# ----------------------------------------------------------------------------------------------
# add

def test_an_added_corpus_is_searched_as_if_built_with_the_others(grown):
    enc, root = grown
    index, both = Index(root / "exact"), Index(root / "both")
    assert index.ids == both.ids == [f"doc{j}" for j in range(80)] and len(index.shards) == 5
    Q, qm = enc.queries(list(range(0, 80, 3)))
    s, i = index.search(Q, qm, k=10)
    s_both, i_both = both.search(Q, qm, k=10)
    assert torch.equal(i, i_both) and torch.equal(s, s_both)
    _, top = index.search(*enc.queries([60, 79]), k=1)                  # a new document, from its own query
    assert [index.ids[d] for d in top[:, 0].tolist()] == ["doc60", "doc79"]
    assert index.text(60) == "doc 60" and index.text(5) == "doc 5"      # each from its own file
    added = index.manifest["added"]
    assert [(a["corpus"], a["corpus_sha256"], a["first_shard"], a["complete"]) for a in added] == \
        [(str((root / "new.jsonl").resolve()), file_sha256(root / "new.jsonl"), 3, True)]

    c = CompressedIndex(root / "c")                                     # compressed with the built codec
    assert c.ids == index.ids and c.text(70) == "doc 70"
    s, i = c.search(Q, qm, k=10, nprobe=c.codec.centroids.size(0))
    top_s, top_i = decompressed_maxsim(c, enc, Q, qm, range(80)).topk(10, dim=1)
    assert torch.equal(i, top_i) and torch.allclose(s, top_s, atol=1e-4)

    files = {p.name: p.read_bytes() for p in (root / "exact").iterdir()}
    add_documents(enc, root / "exact", root / "new.jsonl", 8)           # the same add again: nothing to do
    assert {p.name: p.read_bytes() for p in (root / "exact").iterdir()} == files
    os.utime(root / "new.jsonl", ns=(time.time_ns() + 10**9,) * 2)     # touched, not changed: noted
    add_documents(enc, root / "exact", root / "new.jsonl", 8)
    assert Index(root / "exact").manifest["added"][0]["corpus_mtime_ns"] == (root / "new.jsonl").stat().st_mtime_ns
    write_docs(root / "new.jsonl", range(48, 81))                       # an added corpus edited in place
    with pytest.raises(ValueError, match=r"new.jsonl: changed since .*exact had it added"):
        Index(root / "exact")


@pytest.mark.parametrize("kind", ["exact", "c"])
def test_a_killed_add_is_left_out_and_resumes_to_the_same_bytes(grown, kind, monkeypatch, capsys):
    enc, root = grown
    module, open_index = (colbert_index, Index) if kind == "exact" else (compressed_index, CompressedIndex)
    if kind == "exact":
        build_index(enc, root / "base.jsonl", root / "killed", SIZE, 8)
    else:
        build_compressed_index(enc, root / "base.jsonl", root / "killed", CFG, SIZE, 8)
    calls, real = [], module.encode_shard

    def dies_on_second_shard(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args)

    monkeypatch.setattr(module, "encode_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        add_documents(enc, root / "killed", root / "new.jsonl", 8)
    assert (root / "killed" / "shard_00003.safetensors").is_file()
    assert not (root / "killed" / "shard_00004.safetensors").exists()
    index = open_index(root / "killed")                                 # the unfinished addition left out
    assert len(index.ids) == 48 and "new.jsonl are left out, adding them did not finish" in capsys.readouterr().err
    _, i = index.search(*enc.queries([50, 60]), k=48)
    assert (i < 48).all()
    calls.clear()
    monkeypatch.setattr(module, "encode_shard", lambda *a: (calls.append(1), real(*a))[1])
    add_documents(enc, root / "killed", root / "new.jsonl", 8)
    assert len(calls) == 1, "the resumed add encoded a shard already on disk"
    same_files(root / kind, root / "killed")
    assert open_index(root / "killed").ids[60] == "doc60"


def test_a_bad_add_is_refused_naming_the_file(grown):
    enc, root = grown
    files = {p.name: p.read_bytes() for p in (root / "exact").iterdir()}
    more = write_docs(root / "more.jsonl", range(80, 90))
    with pytest.raises(ValueError, match=r"more.jsonl: not added to .*exact, built with encoder synthetic-0-32, "
                                         r"not with this one \(synthetic-1-32\)"):
        add_documents(SyntheticEncoder(seed=1), root / "exact", more)
    for docs, dup in (([85, 86, 7], 7), ([90, 55], 55)):                # a built document, an added one
        with pytest.raises(ValueError, match=fr"dup.jsonl: document 'doc{dup}' is in .*exact already "
                                             fr"\(document {dup}\); give it another id, or remove the old one"):
            add_documents(enc, root / "exact", write_docs(root / "dup.jsonl", docs))
    with pytest.raises(ValueError, match=r"twice.jsonl:2: duplicate id 'doc91' \(first on line 1\)"):
        add_documents(enc, root / "exact", write_docs(root / "twice.jsonl", [91, 91]))
    with pytest.raises(ValueError, match="compressed.jsonl: no documents"):
        add_documents(enc, root / "c", write_docs(root / "compressed.jsonl", []))
    assert {p.name: p.read_bytes() for p in (root / "exact").iterdir()} == files, "a refused add wrote something"
    manifest = json.loads(files["manifest.json"])                       # as an add killed mid-way leaves it
    manifest["added"][0]["complete"] = False
    (root / "exact" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"more.jsonl: not added to .*exact: adding .*new.jsonl did not finish; "
                                         "run that add again first"):
        add_documents(enc, root / "exact", more)


# ----------------------------------------------------------------------------------------------
# remove

def test_a_removed_document_is_never_returned(grown):
    enc, root = grown
    Q, qm = enc.queries([7, 60, 8])                                     # 7 and 60: one built, one added
    assert Index(root / "both").search(Q, qm, k=1)[1][:2, 0].tolist() == [7, 60], "each its own query's best"
    remove_documents(root / "exact", ["doc7", "doc60"])
    (root / "ids.txt").write_text("doc60\n\n")
    main(["remove", str(root / "c"), "doc7", "--ids-file", str(root / "ids.txt")])   # the command line, a file of ids
    exact, c = Index(root / "exact"), CompressedIndex(root / "c")
    assert exact.num_live == c.num_live == 78 and exact.ids[7] == "doc7" and exact.text(60) == "doc 60"
    for index, settings in ((exact, {}), (c, {"nprobe": c.codec.centroids.size(0)}), (c, {"nprobe": 1})):
        s, i = index.search(Q, qm, k=100, **settings)
        assert i.shape == (3, 78) and not {7, 60} & set(i.flatten().tolist()), settings
    rest = [j for j in range(80) if j not in (7, 60)]                   # as if never indexed
    build_index(enc, write_docs(root / "rest.jsonl", rest), root / "rest", SIZE, 8)
    s, i = exact.search(Q, qm, k=10)
    s_rest, i_rest = Index(root / "rest").search(Q, qm, k=10)
    as_ids = [[f"doc{rest[d]}" for d in row] for row in i_rest.tolist()]
    assert [[exact.ids[d] for d in row] for row in i.tolist()] == as_ids
    assert torch.equal(s, s_rest)
    top_s, top_i = decompressed_maxsim(c, enc, Q, qm, rest).topk(10, dim=1)
    s, i = c.search(Q, qm, k=10, nprobe=c.codec.centroids.size(0))
    assert [[c.ids[d] for d in row] for row in i.tolist()] == [[f"doc{rest[d]}" for d in row] for row in top_i.tolist()]
    qa = write_qa(root / "qa.jsonl", [7, 60, 8])
    for index, n in ((exact, 78), (c, 10)):
        write_candidates(enc, index, qa, root / "cands.jsonl", n=n)
        lists = read_candidates(root / "cands.jsonl")
        assert all(len(docs) == n and not {"doc7", "doc60"} & set(docs) for docs in lists.values())

    with pytest.raises(ValueError, match=r"'doc7': removed from .*exact already; nothing removed"):
        remove_documents(root / "exact", ["doc8", "doc7"])
    with pytest.raises(ValueError, match=r"'nope': not a document of .*exact; nothing removed"):
        remove_documents(root / "exact", ["nope"])
    assert Index(root / "exact").num_live == 78, "a refused remove removed doc8"
    add_documents(enc, root / "exact", write_docs(root / "doc7.jsonl", [7]), 8)   # removed, then added: replaced
    index = Index(root / "exact")
    _, i = index.search(*enc.queries([7]), k=1)
    assert int(i[0, 0]) == 80 and index.ids[80] == "doc7" and index.text(80) == "doc 7"


# ----------------------------------------------------------------------------------------------
# torchrun: each rank searches its own shards

def test_best_first_breaks_ties_by_document_number_whatever_the_split():
    """The merge's total order: higher score, then lower document number, so the k best of each
    part's k best are the k best of all (topk would order ties as it likes)."""
    s, d = best_first(torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0]]), torch.tensor([[9, 7, 3, 5, 8]]), k=2)
    assert s.tolist() == [[2.0, 2.0]] and d.tolist() == [[3, 7]]
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (3, 60), generator=g).float()          # (Nq, N): ties everywhere
    docs = torch.arange(60).expand(3, -1)
    whole = best_first(scores, docs, 10)
    for _ in range(5):                                                  # split as ranks and shards would
        cuts = sorted(torch.randperm(59, generator=g)[:4].add(1).tolist())
        parts = [best_first(scores[:, a:b], docs[:, a:b], 10) for a, b in zip([0, *cuts], [*cuts, 60])]
        merged = best_first(torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1), 10)
        assert torch.equal(merged[0], whole[0]) and torch.equal(merged[1], whole[1]), cuts


def add_as_rank(rank: int, world: int, root):
    add_documents(SyntheticEncoder(), root / "two ranks", root / "new.jsonl", 8, rank, world)


def searches(root, rank: int = 0, world: int = 1) -> dict:
    """Both indexes (5 shards: rank 0 of 2 searches 3, rank 1 2), at k beyond a rank's documents and
    beyond all the documents left, and at an nprobe that leaves places empty."""
    enc = SyntheticEncoder()
    Q, qm = enc.queries(list(range(0, 80, 5)))
    exact, c = Index(root / "exact"), CompressedIndex(root / "c")
    return {"exact k=40": exact.search(Q, qm, k=40, rank=rank, world=world),
            "exact k=100": exact.search(Q, qm, k=100, chunk_bytes=4096, rank=rank, world=world),
            "compressed k=40": c.search(Q, qm, k=40, nprobe=2, rank=rank, world=world),
            "compressed k=100": c.search(Q, qm, k=100, nprobe=1, rank=rank, world=world)}


def search_as_rank(rank: int, world: int, root):
    torch.save(searches(root, rank, world), root / f"rank{rank}.pt")
    write_candidates(SyntheticEncoder(), Index(root / "exact"), root / "qa.jsonl", root / "two.jsonl", n=20,
                     batch_size=2, rank=rank, world=world)


def test_two_ranks_add_and_search_as_one_process(grown):
    """An addition of 2 shards shared by 2 ranks: one process's files. Then searches at several k and
    nprobe, and a candidate file, from 2 ranks equal one process's, on both ranks."""
    enc, root = grown
    build_index(enc, root / "base.jsonl", root / "two ranks", SIZE, 8)
    assert fork_ranks(add_as_rank, 2, root / "init add", root) == [0, 0]
    same_files(root / "exact", root / "two ranks")
    remove_documents(root / "exact", ["doc3", "doc70"])
    remove_documents(root / "c", ["doc3", "doc70"])
    qa = write_qa(root / "qa.jsonl", [1, 33, 50, 64, 79])              # 3 batches of 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # as the ranks run (conftest._as_rank): scores bit for bit, whatever CI sets
    try:
        one = searches(root)
        write_candidates(enc, Index(root / "exact"), qa, root / "one.jsonl", n=20, batch_size=2)
    finally:
        torch.set_num_threads(threads)
    assert fork_ranks(search_as_rank, 2, root / "init", root) == [0, 0]
    for rank in (0, 1):
        two = torch.load(root / f"rank{rank}.pt")
        for name, (s, i) in one.items():
            assert torch.equal(two[name][0], s) and torch.equal(two[name][1], i), f"rank {rank}: {name}"
    assert one["exact k=100"][1].shape == (16, 78) and (one["compressed k=100"][1] == -1).any()
    assert (root / "two.jsonl").read_bytes() == (root / "one.jsonl").read_bytes()


def test_the_add_command_with_a_real_bert(tmp_path):
    """`python index_updates.py add` (main, in process) loads the index's encoder from its manifest
    (a random tiny BERT): the texts come from both files, and searches for the added texts equal a
    build of both corpora at once, up to rounding (the documents share batches with others there)."""
    words = "the of and a in to is was for with patients disease treatment drug heart lung blood cancer".split()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]",
                                                   "[MASK]", ".", *words]) + "\n")
    bert = BertConfig(vocab_size=8 + len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64)
    ColBERT(bert, ColBERTConfig(dim=16, doc_maxlen=12), load_wordpiece(tmp_path)).save_pretrained(tmp_path / "bert")
    model = ColBERT.from_pretrained(tmp_path / "bert").eval()           # random weights, as main() loads them
    g = torch.Generator().manual_seed(0)
    lines = [json.dumps({"id": f"d{j}", "contents": " ".join(words[i] for i in torch.randint(
        0, len(words), (3 + j % 6,), generator=g))}) + "\n" for j in range(20)]
    (tmp_path / "base.jsonl").write_text("".join(lines[:12]))
    (tmp_path / "new.jsonl").write_text("".join(lines[12:]))
    (tmp_path / "both.jsonl").write_text("".join(lines))
    build_index(model, tmp_path / "base.jsonl", tmp_path / "index", 8, 4, model_path=str(tmp_path / "bert"))
    main(["add", str(tmp_path / "index"), str(tmp_path / "new.jsonl"), "--batch-size", "4"])
    build_index(model, tmp_path / "both.jsonl", tmp_path / "both", 8, 4)
    index, both = Index(tmp_path / "index"), Index(tmp_path / "both")
    texts = [index.text(j) for j in range(20)]
    assert texts == [json.loads(x)["contents"] for x in lines]
    with torch.no_grad():
        Q, qm = model.encode_queries(texts[12:])
    s, i = index.search(Q, qm, k=5)
    s_both, i_both = both.search(Q, qm, k=5)
    assert torch.equal(i, i_both) and (i >= 12).any()
    assert torch.allclose(s, s_both, atol=1e-5)     # not bitwise: a batch's padding moves BERT's last bits
