"""Grades sampling (jmlr.sample_documents) by the distribution it must draw from, with bounds that
follow from it: n draws of an outcome of probability p give a frequency within 5 standard errors,
5 sqrt(p (1 - p) / n), of p but for a chance below 6e-7 per outcome, whatever the seed and whatever
correct sampler (Gumbel-top-k, one draw at a time, inverse CDF). Then per-row scaling, tau in both
branches, no underflow at a small tau, and the generator's device."""

import itertools
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from jmlr import sample_documents

pytestmark = pytest.mark.sampling
N_DRAWS = 20_000


def draw(scores: list[float], m: int, tau: float, minmax_scale: bool = False, seed: int = 0) -> torch.Tensor:
    """N_DRAWS draws of m documents for one row of scores, (N_DRAWS, m)."""
    s = torch.tensor([scores]).expand(N_DRAWS, len(scores))
    return sample_documents(s, m, tau, minmax_scale, generator=torch.Generator().manual_seed(seed))


def check_frequencies(counts: dict, probs: dict, n: int, what: str):
    for outcome, p in probs.items():
        freq, bound = counts.get(outcome, 0) / n, 5 * math.sqrt(p * (1 - p) / n)
        assert abs(freq - p) <= bound, f"{what}: {outcome} drawn {freq:.4f} of the time, expected {p:.4f} " \
            f"(+- {bound:.4f}, 5 standard errors of {n:,} draws)"


def without_replacement(p: list[float], m: int) -> dict:
    """P(the draws in order are exactly this tuple) for one at a time, renormalized over the rest."""
    out = {}
    for picks in itertools.permutations(range(len(p)), m):
        prob, left = 1.0, 1.0
        for i in picks:
            prob, left = prob * p[i] / left, left - p[i]
        out[picks] = prob
    return out


def minmax(s: list[float]) -> list[float]:
    lo, hi = min(s), max(s)
    return [2 * (x - lo) / (hi - lo) - 1 for x in s]


def test_shape_distinct_seeded_and_without_gradient():
    scores = torch.randn(6, 9)
    picked = sample_documents(scores, 4, 1.0, generator=torch.Generator().manual_seed(3))
    assert picked.shape == (6, 4) and picked.dtype == torch.long, f"(B, m) = (6, 4) indices, got " \
        f"{tuple(picked.shape)} {picked.dtype}"
    assert all(len(set(row)) == 4 for row in picked.tolist()), f"a document was drawn twice: {picked.tolist()}"
    again = sample_documents(scores, 4, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(picked, again), "the same generator seed must draw the same documents (pass `generator` on)"
    s = scores.clone().requires_grad_()
    assert not sample_documents(s, 4, 1.0).requires_grad, "the draw takes no gradient"


def test_draws_in_order_follow_softmax_without_replacement():
    scores, tau = [1.0, 0.0, -1.0, 0.5], 0.5
    p = torch.softmax(torch.tensor(scores) / tau, 0).tolist()
    picks = draw(scores, 2, tau)
    counts = {}
    for pair in map(tuple, picks.tolist()):
        counts[pair] = counts.get(pair, 0) + 1
    check_frequencies(counts, without_replacement(p, 2), N_DRAWS, f"(first, second) draws, p = softmax(s / {tau})")


def test_each_row_follows_its_own_scores():
    rows = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    s = rows.repeat(N_DRAWS // 3, 1)                                         # rows interleaved
    first = sample_documents(s, 1, 1.0, generator=torch.Generator().manual_seed(1))[:, 0].view(-1, 3)
    for r in range(3):
        p = torch.softmax(rows[r], 0).tolist()
        counts = dict(enumerate(torch.bincount(first[:, r], minlength=4).tolist()))
        check_frequencies(counts, dict(enumerate(p)), first.size(0), f"row {r} = {rows[r].tolist()}, first draws")


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_minmax_scaling_per_row_then_tau(tau):
    """[30, 10, 0] and [3, 1, 0] both scale to [1, -1/3, -1] (per row); then p = softmax(scaled / tau).
    At tau = 1 the least likely document has p = 0.0967: the official scaling makes draws nearly uniform."""
    rows = torch.tensor([[30.0, 10.0, 0.0], [3.0, 1.0, 0.0]])
    s = rows.repeat(N_DRAWS // 2, 1)
    first = sample_documents(s, 1, tau, minmax_scale=True, generator=torch.Generator().manual_seed(2))[:, 0].view(-1, 2)
    p = torch.softmax(torch.tensor(minmax([30.0, 10.0, 0.0])) / tau, 0).tolist()
    for r in range(2):
        counts = dict(enumerate(torch.bincount(first[:, r], minlength=3).tolist()))
        check_frequencies(counts, dict(enumerate(p)), first.size(0), f"minmax_scale, tau = {tau}, row "
                          f"{rows[r].tolist()} (scaled per row to [-1, 1], then divided by tau)")


def test_small_tau_never_underflows():
    """softmax(s / 0.05) is 0 in fp32 beyond the second best; the draw must still follow the order."""
    scores = torch.tensor([[20.0, 25.0, 15.0, 14.0, 13.0, 12.0, 11.0, 10.0]])
    g = torch.Generator().manual_seed(0)
    draws = {tuple(sample_documents(scores, 4, tau=0.05, generator=g)[0].tolist()) for _ in range(100)}
    assert draws == {(1, 0, 2, 3)}, f"tau = 0.05 must draw the four best in order, got {sorted(draws)[:5]}"


def test_noise_is_drawn_on_the_generators_device():
    """Scores on another device (meta here, CUDA on a GPU) with a CPU generator: no op may get a
    generator from another device than its tensors' (ATen's rule on CUDA, enforced here)."""

    class GeneratorDeviceCheck(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            gen, out = kwargs.get("generator"), func(*args, **(kwargs or {}))
            devices = {a.device for a in (*args, out) if isinstance(a, torch.Tensor)}
            assert gen is None or devices == {gen.device}, f"{getattr(func, '__name__', func)}: generator on " \
                f"{gen.device}, tensors on {devices}: draw the noise on generator.device, then move it"
            return out

    with GeneratorDeviceCheck():
        picked = sample_documents(torch.randn(3, 8, device="meta"), 4, 1.0, generator=torch.Generator().manual_seed(0))
    assert picked.shape == (3, 4) and picked.device.type == "meta", f"got {tuple(picked.shape)} on {picked.device}"
