"""compressed_index.py: ColBERTv2's residual codec, the compressed index's build, resume and search.

The codec against hand-computed values (quantiles, packed bytes) and its round-trip error; the
index against colbert_index.Index built from the same corpus and encoder: with every centroid
probed, search is exact MaxSim over the decompressed embeddings; at a small nprobe it scores a
minority of the documents and still finds the exact top 10. Resume writes the same bytes, and
another encoder, corpus or build is refused naming the file. Embeddings come from a synthetic
encoder (clustered, seeded per document), so that the expected rankings are known; one test
builds with a real (tiny, random) BERT.
"""

import json

import pytest
import torch
import torch.nn.functional as F

import compressed_index
from conftest import fork_ranks
from colbert_index import Index, build_index, read_candidates, write_candidates
from compressed_index import (CodecConfig, CompressedIndex, bucket_cutoffs_and_weights, build_compressed_index,
                              compress, decompress, fit_codec, map_tensors, pack_bits, unpack_bits)
from retriever import BertConfig, ColBERT, ColBERTConfig, load_wordpiece, maxsim


class SyntheticEncoder:
    """Stands in for retriever.ColBERT when building an index: the text "doc J" gets 6-14 token
    embeddings drawn from seed J, each near one of 2 of the `topics` shared unit centers, so they
    cluster as ColBERT's do."""

    def __init__(self, dim: int = 32, topics: int = 12, seed: int = 0, noise: float = 0.1):
        self.cfg, self.seed, self.noise = ColBERTConfig(dim=dim), seed, noise
        self.centers = F.normalize(torch.randn(topics, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)

    def fingerprint(self) -> str:
        return f"synthetic-{self.seed}-{self.cfg.dim}"

    def doc(self, j: int) -> torch.Tensor:
        """Document j's token embeddings (L, d)."""
        g = torch.Generator().manual_seed(1000 * self.seed + j)
        L = int(torch.randint(6, 15, (1,), generator=g))
        topic = torch.randint(0, self.centers.size(0), (2,), generator=g)[torch.randint(0, 2, (L,), generator=g)]
        return F.normalize(self.centers[topic] + self.noise * torch.randn(L, self.cfg.dim, generator=g), dim=-1)

    def encode_docs(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embs = [self.doc(int(t.split()[-1])) for t in texts]
        L = max(e.size(0) for e in embs)
        D = torch.stack([F.pad(e, (0, 0, 0, L - e.size(0))) for e in embs])        # (B, L, d)
        return D, torch.arange(L) < torch.tensor([e.size(0) for e in embs])[:, None]   # mask (B, L)

    def encode_queries(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.queries([int(t.split()[-1]) for t in texts])

    def queries(self, docs: list[int], Lq: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """One query per document: Lq of its tokens, perturbed -> Q (Nq, Lq, d), mask (Nq, Lq)."""
        g = torch.Generator().manual_seed(99)
        Q = torch.stack([self.doc(j)[torch.randint(0, self.doc(j).size(0), (Lq,), generator=g)] for j in docs])
        Q = F.normalize(Q + 0.1 * torch.randn(Q.shape, generator=g), dim=-1)
        return Q, torch.ones(Q.shape[:2], dtype=torch.bool)


def write_corpus(path, n: int):
    path.write_text("".join(json.dumps({"id": f"doc{j}", "contents": f"doc {j}"}) + "\n" for j in range(n)))
    return path


def clustered(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    enc = SyntheticEncoder(dim=dim, seed=seed)
    return torch.cat([enc.doc(j) for j in range(n)])


@pytest.fixture
def built(tmp_path):
    """A synthetic corpus of 80 documents in shards of 16, indexed exactly and compressed at 4 bits."""
    enc, corpus = SyntheticEncoder(), write_corpus(tmp_path / "corpus.jsonl", 80)
    build_index(enc, corpus, tmp_path / "exact", shard_size=16, batch_size=8)
    cfg = CodecConfig(bits=4, centroids=24)
    build_compressed_index(enc, corpus, tmp_path / "c4", cfg, shard_size=16, batch_size=8)
    return enc, corpus, tmp_path


# ----------------------------------------------------------------------------------------------
# The codec

def test_bucket_cutoffs_and_weights_are_the_hand_computed_quantiles():
    r = torch.tensor([[-4.0, -2.0], [0.0, 2.0], [4.0, 6.0], [8.0, 10.0]])   # 8 values, steps of 2
    cutoffs, weights = bucket_cutoffs_and_weights(r, bits=1)            # quantile 1/2; 1/4 and 3/4
    assert cutoffs.tolist() == [3.0] and weights.tolist() == [-0.5, 6.5]
    cutoffs, weights = bucket_cutoffs_and_weights(r, bits=2)            # 1/4, 2/4, 3/4; 1/8, 3/8, 5/8, 7/8
    assert cutoffs.tolist() == [-0.5, 3.0, 6.5] and weights.tolist() == [-2.25, 1.25, 4.75, 8.25]
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    cutoffs, weights = bucket_cutoffs_and_weights(x, bits=4)            # against torch.quantile
    assert torch.allclose(cutoffs, x.quantile(torch.arange(1, 16) / 16), atol=1e-6)
    assert torch.allclose(weights, x.quantile((torch.arange(16) + 0.5) / 16), atol=1e-6)


def test_bit_packing_is_exact_and_puts_the_first_value_high():
    assert pack_bits(torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.uint8), 1).tolist() == [[0b10000001]]
    assert pack_bits(torch.tensor([[3, 0, 1, 2]], dtype=torch.uint8), 2).tolist() == [[0b11000110]]
    assert pack_bits(torch.tensor([[15, 1, 0, 9]], dtype=torch.uint8), 4).tolist() == [[0xF1, 0x09]]
    g = torch.Generator().manual_seed(0)
    for bits in (1, 2, 4):
        x = torch.randint(0, 2 ** bits, (33, 16), generator=g, dtype=torch.uint8)
        packed = pack_bits(x, bits)
        assert packed.shape == (33, 16 * bits // 8) and packed.dtype == torch.uint8
        assert torch.equal(unpack_bits(packed, bits), x.long())


def test_round_trip_error_is_bounded_and_falls_with_bits():
    E = clustered(300, 32)                                              # (about 3,000, 32)
    errors = {}
    for bits in (1, 2, 4):
        codec = fit_codec(E, bits, k=24, iters=4, seed=0)
        codes, packed = compress(codec, E)
        D = decompress(codec, codes, packed)
        assert torch.allclose(D.norm(dim=1), torch.ones(len(D)), atol=1e-5)
        errors[bits] = (1 - (D * E).sum(1)).mean().item()               # mean cosine distance
    centroid_only = (1 - (codec.centroids[codes.long()] * E).sum(1)).mean().item()
    assert centroid_only > errors[1] > errors[2] > errors[4], (centroid_only, errors)
    assert errors[1] < 0.3 and errors[2] < 0.12 and errors[4] < 0.02, errors   # measured 0.175, 0.066, 0.010


def test_bytes_per_token_at_2_bits_and_dim_128():
    """A 4-byte int32 centroid id plus 128 dimensions x 2 bits = 32 bytes: 36 bytes, at most 40."""
    E = clustered(100, 128)
    codes, packed = compress(fit_codec(E, 2, k=16), E)
    assert codes.dtype == torch.int32 and packed.dtype == torch.uint8
    per_token = codes.element_size() + packed.shape[1] * packed.element_size()
    assert per_token == 4 + 32 <= 40


def test_bad_codec_settings_are_refused():
    E = clustered(20, 12)
    with pytest.raises(ValueError, match="bits=3: use 1, 2 or 4"):
        fit_codec(E, 3, k=4)
    with pytest.raises(ValueError, match="dim=12: bits=1 packs 8 dimensions per byte"):
        fit_codec(E, 1, k=4)
    with pytest.raises(ValueError, match="k=100000 centroids"):
        fit_codec(E, 2, k=100_000)


# ----------------------------------------------------------------------------------------------
# Search

def test_every_centroid_probed_is_exact_maxsim_over_the_decompressed_embeddings(built):
    enc, _, root = built
    index, exact = CompressedIndex(root / "c4"), Index(root / "exact")
    assert index.ids == exact.ids == [f"doc{j}" for j in range(80)] and index.text(5) == "doc 5"
    Q, qm = enc.queries(list(range(0, 80, 7)))
    s, i = index.search(Q, qm, k=10, nprobe=index.codec.centroids.size(0))
    E = torch.cat([enc.doc(j).half() for j in range(80)]).float()                            # as the index stores
    D = decompress(index.codec, *compress(index.codec, E))                                     # (Ntok, d)
    token_error = (D - E).norm(dim=1).max()
    D = torch.nn.utils.rnn.pad_sequence(D.split([enc.doc(j).size(0) for j in range(80)]), batch_first=True)
    brute = maxsim(Q, qm, D, D.norm(dim=-1) > 0)                                               # (Nq, 80)
    top_s, top_i = brute.topk(10, dim=1)
    assert torch.equal(i, top_i) and torch.allclose(s, top_s, atol=1e-4)
    exact_s, exact_i = exact.search(Q, qm, k=10)
    assert torch.equal(i[:, 0], exact_i[:, 0]) and torch.equal(i[:, 0], torch.arange(0, 80, 7))
    # |q.e - q.e'| <= |e - e'| per query token, and the k-th best moves no more than every score does
    assert (s - exact_s).abs().max() <= Q.size(1) * token_error + 1e-4


def test_small_nprobe_scores_few_documents_and_keeps_recall_at_10(built):
    enc, _, root = built
    index, exact = CompressedIndex(root / "c4"), Index(root / "exact")
    Q, qm = enc.queries(list(range(80)))
    nprobe, C = 1, index.codec.centroids
    probed = (Q @ C.T).topk(nprobe, dim=-1).indices.flatten(1)          # (Nq, Lq*P), from the codes, not the lists
    shards = [map_tensors(p) for p in index.shards]
    doc_codes = [set(t["codes"][a:b].tolist()) for t in shards for a, b in zip(t["offsets"][:-1], t["offsets"][1:])]
    candidates = [{d for d, cs in enumerate(doc_codes) if cs & set(row.tolist())} for row in probed]
    assert sum(map(len, candidates)) / (80 * 80) < 0.35, "nprobe=1 should leave most documents unscored"   # 0.28
    s, i = index.search(Q, qm, k=10, nprobe=nprobe)
    for row, cand, score in zip(i.tolist(), candidates, s.tolist()):
        assert {d for d in row if d >= 0} <= cand, "a result that is not on a probed inverted list"
        assert all((d < 0) == (x == float("-inf")) for d, x in zip(row, score))
    _, exact_i = exact.search(Q, qm, k=10)
    recall = sum(len(set(a) & set(b)) for a, b in zip(i.tolist(), exact_i.tolist())) / exact_i.numel()
    assert recall >= 0.9, f"recall@10 vs exact {recall:.3f} at nprobe={nprobe}"
    s1, i1 = index.search(Q[:1], qm[:1], k=80, nprobe=1)                 # fewer candidates than k: -inf and -1
    assert s1.shape == (1, 80) and i1[0, -1] == -1 and s1[0, -1] == float("-inf")
    s0, i0 = index.search(Q[:2], torch.tensor([[True] * 8, [False] * 8]), k=5, nprobe=1)   # no token: no candidate
    assert (i0[1] == -1).all() and (s0[1] == float("-inf")).all() and (i0[0] >= 0).all()
    assert (index.search(Q[:1], torch.zeros(1, 8, dtype=torch.bool), k=5, nprobe=1)[1] == -1).all()   # no shard has any


def test_candidate_lists_from_a_compressed_index(built):
    """write_candidates takes either index; a list the probes cannot fill is refused, not padded with -1."""
    enc, _, root = built
    qa = root / "qa.jsonl"
    qa.write_text("".join(json.dumps({"id": f"q{j}", "question": f"doc {j}", "options": ["yes", "no"], "answer": "A"})
                          + "\n" for j in (3, 40, 77)))
    index = CompressedIndex(root / "c4")
    write_candidates(enc, index, qa, root / "cands.jsonl", n=5)
    lists = read_candidates(root / "cands.jsonl")
    _, i = index.search(*enc.queries([3, 40, 77]), k=5)
    assert lists == {f"q{j}": [f"doc{d}" for d in row] for j, row in zip((3, 40, 77), i.tolist())}
    assert [docs[0] for docs in lists.values()] == ["doc3", "doc40", "doc77"]
    with pytest.raises(ValueError, match="qa.jsonl: the compressed index found fewer than n=80 candidates"):
        write_candidates(enc, index, qa, root / "cands.jsonl", n=80)


# ----------------------------------------------------------------------------------------------
# Build: resume, refusals

def same_files(a, b):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs"


def test_killed_or_damaged_build_resumes_to_identical_bytes(built, monkeypatch):
    enc, corpus, root = built
    cfg, calls, real = CodecConfig(bits=4, centroids=24), [], compressed_index.encode_shard

    def dies_on_third_call(*args):                                      # 1: the codec sample, 2: shard 0, ...
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*args)

    monkeypatch.setattr(compressed_index, "encode_shard", dies_on_third_call)
    with pytest.raises(KeyboardInterrupt):
        build_compressed_index(enc, corpus, root / "resumed", cfg, shard_size=16, batch_size=8)
    with pytest.raises(ValueError, match="did not finish"):
        CompressedIndex(root / "resumed")
    calls.clear()
    monkeypatch.setattr(compressed_index, "encode_shard", lambda *a: (calls.append(1), real(*a))[1])
    build_compressed_index(enc, corpus, root / "resumed", cfg, shard_size=16, batch_size=8)
    assert len(calls) == 4, "the resumed build re-encoded complete shards or fitted the codec again"
    same_files(root / "c4", root / "resumed")
    (root / "resumed" / "shard_00004.safetensors").unlink()             # the last shard, and the completion mark
    manifest = json.loads((root / "resumed" / "manifest.json").read_text())
    (root / "resumed" / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    calls.clear()
    build_compressed_index(enc, corpus, root / "resumed", cfg, shard_size=16, batch_size=8)
    assert len(calls) == 1
    same_files(root / "c4", root / "resumed")


def test_another_encoder_corpus_or_build_is_refused(built):
    enc, corpus, root = built
    cfg, other = CodecConfig(bits=4, centroids=24), SyntheticEncoder(seed=1)
    with pytest.raises(ValueError, match="different encoder"):
        build_compressed_index(other, corpus, root / "c4", cfg, shard_size=16)
    with pytest.raises(ValueError, match="different codec"):
        build_compressed_index(enc, corpus, root / "c4", CodecConfig(bits=2, centroids=24), shard_size=16)
    with pytest.raises(ValueError, match="was built with encoder"):
        CompressedIndex(root / "c4").check_encoder(other)
    with pytest.raises(ValueError, match="exact index.*colbert_index.Index"):
        CompressedIndex(root / "exact")
    with pytest.raises(ValueError, match="not an exact one.*CompressedIndex"):
        Index(root / "c4")
    build_compressed_index(enc, corpus, root / "c2", CodecConfig(bits=2, centroids=24), shard_size=16, batch_size=8)
    planted = root / "c4" / "shard_00001.safetensors"                   # a shard of the 2-bit build
    original = planted.read_bytes()
    planted.write_bytes((root / "c2" / planted.name).read_bytes())
    with pytest.raises(ValueError, match="shard_00001.safetensors: written by another build"):
        CompressedIndex(root / "c4")
    planted.write_bytes(original)
    (root / "c4" / "codec.safetensors").write_bytes((root / "c2" / "codec.safetensors").read_bytes())
    with pytest.raises(ValueError, match="codec.safetensors: missing, or not the codec"):
        CompressedIndex(root / "c4")
    (root / "fresh").mkdir()                                            # a codec file left by another build
    (root / "fresh" / "codec.safetensors").write_bytes((root / "c2" / "codec.safetensors").read_bytes())
    with pytest.raises(ValueError, match="fresh/codec.safetensors: written by another build"):
        build_compressed_index(enc, corpus, root / "fresh", cfg, shard_size=16)
    write_corpus(corpus, 81)                                            # the corpus edited in place
    with pytest.raises(ValueError, match="corpus.jsonl: changed since"):
        CompressedIndex(root / "c2")
    with pytest.raises(ValueError, match="different corpus_sha256"):
        build_compressed_index(enc, corpus, root / "c2", CodecConfig(bits=2, centroids=24), shard_size=16)


def build_as_rank(rank: int, world: int, corpus, index_dir):
    build_compressed_index(SyntheticEncoder(), corpus, index_dir, CodecConfig(bits=4, centroids=24), shard_size=16,
                           batch_size=8, rank=rank, world=world)


def test_two_ranks_build_the_bytes_of_one_process(built):
    """Rank 0 fits the codec, each rank compresses its shards (s % 2): the same files as one process.
    The ranks are forked (conftest.fork_ranks: no re-import, so this takes about a second)."""
    _, corpus, root = built
    assert fork_ranks(build_as_rank, 2, root / "init", corpus, root / "two") == [0, 0]
    same_files(root / "c4", root / "two")


def test_build_with_a_real_bert_finds_each_document_from_its_own_text(tmp_path):
    words = "the of and a in to is was for with patients disease treatment drug heart lung blood cancer".split()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]",
                                                   "[MASK]", ".", *words]) + "\n")
    bert = BertConfig(vocab_size=8 + len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64)
    model = ColBERT(bert, ColBERTConfig(dim=16, doc_maxlen=12), load_wordpiece(tmp_path)).eval()   # random weights
    g = torch.Generator().manual_seed(0)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{j}", "contents": " ".join(words[i] for i in torch.randint(
        0, len(words), (3 + j % 8,), generator=g))}) + "\n" for j in range(30)))
    build_index(model, corpus, tmp_path / "exact", shard_size=8, batch_size=4)
    m = build_compressed_index(model, corpus, tmp_path / "c", CodecConfig(bits=4), shard_size=8, batch_size=4)
    assert m["complete"] and m["num_centroids"] >= 2
    index, exact = CompressedIndex(tmp_path / "c"), Index(tmp_path / "exact")
    t = map_tensors(index.shards[0])
    assert t["codes"].dtype == torch.int32 and t["residuals"].shape == (t["codes"].numel(), 16 * 4 // 8)
    assert t["lists"].dtype == torch.int16 and t["list_offsets"].numel() == m["num_centroids"] + 1
    texts = [index.text(j) for j in range(30)]
    with torch.no_grad():
        Q, qm = model.encode_queries(texts[:10])
    _, i = index.search(Q, qm, k=5, nprobe=index.codec.centroids.size(0))
    _, exact_i = exact.search(Q, qm, k=5)
    assert (i[:, 0] == exact_i[:, 0]).float().mean() >= 0.9

