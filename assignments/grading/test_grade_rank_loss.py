"""Grades rank_loss (jmlr.rank_loss) against a loop over pairs written here: hand values, ties
left out, the mean over every pair of the batch, tau_rank, tie_margin, the gradient's sign, and a
0 that keeps the graph when every pair ties."""

import math

import pytest
import torch

from jmlr import rank_loss

pytestmark = pytest.mark.rank_loss


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def loop_rank_loss(s: torch.Tensor, l: torch.Tensor, tau_rank: float = 1.0, tie_margin: float = 0.0) -> float:
    """Mean over the untied pairs a < b of all questions of BCE(sigmoid((s_a - s_b) / tau), 1[l_a < l_b])."""
    terms = []
    for b in range(s.size(0)):
        for i in range(s.size(1)):
            for j in range(i + 1, s.size(1)):
                if abs(l[b, i] - l[b, j]) > tie_margin:
                    p = sig((s[b, i] - s[b, j]).item() / tau_rank)
                    terms.append(-math.log(p) if l[b, i] < l[b, j] else -math.log(1 - p))
    return sum(terms) / len(terms) if terms else 0.0


def test_hand_computed_with_a_tie():
    s, l = torch.tensor([[2.0, 1.0, 0.5]]), torch.tensor([[0.3, 0.1, 0.3]])   # doc 1 best; 0 and 2 tie
    want = (-math.log(1 - sig(1.0)) - math.log(sig(0.5))) / 2                 # pairs (0, 1) and (1, 2)
    loss = rank_loss(s, l)
    assert loss.dim() == 0, f"rank_loss must be a scalar, got shape {tuple(loss.shape)}"
    assert loss.item() == pytest.approx(want, abs=1e-6), f"rank_loss = {loss.item():.6f}, expected {want:.6f} " \
        "(BCE of pairs (0, 1) and (1, 2), averaged; the tie (0, 2) does not count)"


def test_batch_mean_is_over_every_pair_against_a_loop():
    s_b = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    l_b = torch.tensor([[0.2, 0.5, 0.5], [0.1, 0.2, 0.3]])      # 2 untied pairs, then 3
    want = loop_rank_loss(s_b, l_b)
    assert rank_loss(s_b, l_b).item() == pytest.approx(want, abs=1e-6), f"the mean is over the 5 pairs that " \
        f"exist in the batch ({want:.6f}), not per question"
    s, l = torch.randn(4, 6), torch.randint(0, 4, (4, 6)).float()          # many ties
    got, want = rank_loss(s, l).item(), loop_rank_loss(s, l)
    assert got == pytest.approx(want, abs=1e-5), f"random (4, 6) case with ties: {got:.6f} != {want:.6f}"


def test_tau_rank_divides_the_differences():
    s, l = torch.randn(3, 5), torch.rand(3, 5)
    for tau in (2.0, 0.5):
        got, want = rank_loss(s, l, tau_rank=tau).item(), loop_rank_loss(s, l, tau)
        assert got == pytest.approx(want, abs=1e-5), f"tau_rank = {tau}: {got:.6f} != {want:.6f} " \
            "(sigmoid((s_a - s_b) / tau_rank))"


def test_tie_margin_turns_near_ties_into_ties():
    s, l = torch.tensor([[2.0, 1.0, 0.5]]), torch.tensor([[0.3, 0.1, 0.3]])   # pairs differ by 0.2 nats
    assert rank_loss(s, l, tie_margin=0.25).item() == 0.0, "pairs within tie_margin are ties and do not count"
    assert rank_loss(s, l, tie_margin=0.15).item() == pytest.approx(rank_loss(s, l).item()), \
        "pairs that differ by more than tie_margin count as without a margin"
    s, l = torch.randn(3, 6), torch.rand(3, 6)
    assert rank_loss(s, l, tie_margin=0.3).item() == pytest.approx(loop_rank_loss(s, l, 1.0, 0.3), abs=1e-5)


def test_gradient_pushes_the_best_document_up_and_ignores_ties():
    l = torch.tensor([[0.3, 0.1, 0.3]])
    s = torch.tensor([[2.0, 1.0, 0.5]], requires_grad=True)
    rank_loss(s, l).backward()
    assert s.grad[0, 1] < 0 < s.grad[0, 0], f"gradient {s.grad.tolist()}: the document with the lowest LLM " \
        "loss must be pushed up, the worse one down"
    s2 = torch.tensor([[2.0, 1.0, 0.7]], requires_grad=True)   # moving doc 0's tie partner alone
    rank_loss(s2, l).backward()
    assert torch.allclose(s.grad[0, 0], s2.grad[0, 0]), "a tie must not contribute to the gradient"
    losses = torch.rand(2, 4, requires_grad=True)
    rank_loss(torch.randn(2, 4, requires_grad=True), losses).backward()
    assert losses.grad is None or not losses.grad.any(), "the LLM's losses are targets: no gradient reaches them"


def test_only_ties_give_a_zero_that_keeps_the_graph():
    s = torch.zeros(2, 3, requires_grad=True)
    loss = rank_loss(s, torch.ones(2, 3))
    assert loss.dim() == 0 and loss.item() == 0.0, f"with every pair tied the loss is 0, got {loss}"
    assert loss.requires_grad, "with every pair tied the 0 must keep the graph (backward() is called on it)"
    loss.backward()
    assert torch.equal(s.grad, torch.zeros(2, 3)), "ties give no gradient"
