"""Grades maxsim (retriever.maxsim) against a loop written here, with similarities of both signs:
masking by multiplying with the mask (or zeroing masked embeddings) turns a masked token's score
into 0, which beats every negative similarity. Also candidate lists, a fully masked document, the
gradient, and fp32 scores from bf16 embeddings."""

import math

import pytest
import torch
import torch.nn.functional as F

from retriever import maxsim

pytestmark = pytest.mark.maxsim


def loop_maxsim(Q, q_mask, D, d_mask) -> torch.Tensor:
    """All pairs (Nq, Nd) in float64, with loops; -inf for a document with no unmasked token."""
    scores = torch.zeros(Q.size(0), D.size(0), dtype=torch.float64)
    for a in range(Q.size(0)):
        for b in range(D.size(0)):
            for i in range(Q.size(1)):
                if q_mask[a, i]:
                    sims = [Q[a, i].double() @ D[b, j].double() for j in range(D.size(1)) if d_mask[b, j]]
                    scores[a, b] += max(sims) if sims else -math.inf
    return scores


def random_case(Nq=3, Lq=5, Nd=4, Ld=7, d=8):
    Q, D = F.normalize(torch.randn(Nq, Lq, d), dim=-1), F.normalize(torch.randn(Nd, Ld, d), dim=-1)
    q_mask, d_mask = torch.rand(Nq, Lq) > 0.3, torch.rand(Nd, Ld) > 0.4
    q_mask[:, 0] = d_mask[:, 0] = True
    return Q, q_mask, D, d_mask


def test_negative_similarity_beats_a_masked_token():
    """Q = [1, 0], D = [[-0.6, 0.8], padding]: the only unmasked token scores -0.6, the padding
    (whatever its embedding, here 0 and then [1, 0]) never counts."""
    Q, q_mask = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[True]])
    d_mask = torch.tensor([[True, False]])
    for pad in ([0.0, 0.0], [1.0, 0.0]):
        D = torch.tensor([[[-0.6, 0.8], pad]])
        score = maxsim(Q, q_mask, D, d_mask)
        assert score.shape == (1, 1), f"1 query and 1 document give (1, 1), got {tuple(score.shape)}"
        assert score.item() == pytest.approx(-0.6), f"padding embedding {pad}: maxsim = {score.item():.4f}, " \
            "expected -0.6: a masked token must never win the max, not even over a negative similarity"


def test_all_pairs_against_a_loop():
    Q, q_mask, D, d_mask = random_case()
    scores = maxsim(Q, q_mask, D, d_mask)
    want = loop_maxsim(Q, q_mask, D, d_mask)
    assert scores.shape == (3, 4), f"all pairs: maxsim must be (Nq, Nd) = (3, 4), got {tuple(scores.shape)}"
    assert (scores.double() - want).abs().max() <= 1e-5, f"all pairs differ from a loop by " \
        f"{(scores.double() - want).abs().max():.2e} (random unit vectors: similarities of both signs)"


def test_candidate_lists_against_a_loop():
    Q, q_mask, D, d_mask = random_case()
    cands = torch.tensor([[0, 2], [3, 1], [1, 1]])                           # (Nq, Nc)
    scores = maxsim(Q, q_mask, D[cands], d_mask[cands])
    want = loop_maxsim(Q, q_mask, D, d_mask).gather(1, cands)
    assert scores.shape == (3, 2), f"candidate lists: maxsim must be (Nq, Nc) = (3, 2), got {tuple(scores.shape)}"
    assert (scores.double() - want).abs().max() <= 1e-5, "candidate lists (D of shape (Nq, Nc, Ld, d)): each " \
        "query must be scored against its own list"


def test_masked_query_tokens_add_nothing_and_an_empty_document_is_never_picked():
    Q, q_mask, D, d_mask = random_case()
    q_mask[1] = False                                                       # a query with no token counted
    d_mask[2] = False                                                       # a document with no token scored
    scores = maxsim(Q, q_mask, D, d_mask)
    assert not scores.isnan().any(), f"maxsim gave NaN: {scores.tolist()}"
    assert torch.equal(scores[1], torch.zeros(4, dtype=scores.dtype)), f"a query with every token masked adds " \
        f"nothing: expected zeros, got {scores[1].tolist()}"
    others = scores[[0, 2]][:, [0, 1, 3]]
    assert (scores[[0, 2], 2] < others.min() - 1e3).all(), f"a fully masked document must score -inf (below " \
        f"every real document): got {scores[:, 2].tolist()}"


def test_gradient_reaches_the_best_tokens_only():
    Q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]], requires_grad=True)
    q_mask = torch.tensor([[True, True, False]])
    D = torch.tensor([[[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]], requires_grad=True)
    d_mask = torch.tensor([[True, True, False]])
    maxsim(Q, q_mask, D, d_mask).sum().backward()
    want_q = torch.tensor([[0.8, 0.6], [0.0, 1.0], [0.0, 0.0]])      # the best unmasked document token
    want_d = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])      # the query tokens it was best for
    assert torch.allclose(Q.grad[0], want_q), f"gradient for Q {Q.grad[0].tolist()}, expected {want_q.tolist()}"
    assert torch.allclose(D.grad[0], want_d), f"gradient for D {D.grad[0].tolist()}, expected {want_d.tolist()}"


def test_scores_are_fp32_from_bf16_embeddings():
    """Summed in fp32: a bf16 sum of 32 similarities near 1 rounds to steps of 0.125."""
    Q, q_mask, D, d_mask = random_case(Lq=32, d=16)
    scores = maxsim(Q.bfloat16(), q_mask, D.bfloat16(), d_mask)
    assert scores.dtype == torch.float32, f"the scores must be fp32 whatever the embeddings' dtype, got {scores.dtype}"
    want = loop_maxsim(Q.bfloat16(), q_mask, D.bfloat16(), d_mask)
    bound = 32 * 2**-9           # 32 maxima, each a bf16 similarity in [-1, 1] off by at most half a step
    assert (scores.double() - want).abs().max() <= bound, f"bf16 embeddings: off by {(scores.double() - want).abs().max():.3f}"
