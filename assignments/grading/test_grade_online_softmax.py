"""Grades online_softmax (s2attn_kernel._online_softmax_update, the Triton forward kernel's update)
through the interpreter: the output against one dense softmax over the keys each query may see
(blocks of 16 and groups of 16, shifted by 8 in the second head: rows meet
several key blocks, some wholly masked), the saved log-sum-exp (through the
backward kernels' gradients), and p rounded to the input dtype before tl.dot."""

import pytest
import torch

from s2attn_kernel import s2_attention

pytestmark = pytest.mark.online_softmax
B, H, Hkv, T, D, G = 1, 2, 1, 48, 16, 16


def allowed(T: int, G: int, H: int) -> torch.Tensor:
    """(H, T, T): causal within groups of G, the last H//2 heads shifted by G/2."""
    i = torch.arange(T)
    out = []
    for h in range(H):
        g = (i + G // 2) // G if h >= H - H // 2 else i // G
        out.append((i[None, :] <= i[:, None]) & (g[None, :] == g[:, None]))
    return torch.stack(out)


def dense(q, k, v):
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)   # (B, H, T, D)
    scores = (q @ k.transpose(-1, -2) * D ** -0.5).masked_fill(~allowed(T, G, H), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def case():
    q, k, v = (torch.randn(B, n, T, D, requires_grad=True) for n in (H, Hkv, Hkv))
    grad_out = torch.randn(B, H, T, D)
    return q, k, v, grad_out, s2_attention(q, k, v, G, block_sizes=(16, 16))


def test_output_matches_a_dense_softmax():
    q, k, v, _, out = case()
    assert out.shape == q.shape, f"the kernel's output must be (B, H, T, D) = {tuple(q.shape)}, got {tuple(out.shape)}"
    diff = (out - dense(q, k, v)).abs().max().item()
    assert diff <= 3e-5, f"the output differs from a dense softmax by {diff:.2e}: rescale l_i and acc by " \
        "2^(m_old - m_new) whenever the running max grows"


def test_saved_log_sum_exp_gives_the_gradients():
    q, k, v, grad_out, out = case()
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = torch.autograd.grad(dense(q, k, v), (q, k, v), grad_out)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        diff = (a - b).abs().max().item()
        assert diff <= 5e-5, f"{name} differs by {diff:.2e}: the backward kernels rebuild p from the saved " \
            "m_i + log2(l_i), so the returned m_i and l_i must be the running max and sum"


@pytest.mark.parametrize("dtype, below_one", [(torch.bfloat16, 2**-8), (torch.float16, 2**-11)])
def test_p_is_rounded_to_the_input_dtype_before_the_dot(dtype, below_one):
    """Query 1 sees keys 0 and 1 with values +1 and -1; the scores differ so little that p_1 =
    2^(s_1 - s_0) rounds to p_0 = 1 in the input dtype. As a GPU computes it (p rounded, then
    tl.dot), the output is exactly 0; with p left in fp32 it is (1 - p_1) / (1 + p_1) > 0."""
    q, k, v = (torch.zeros(1, 1, 16, 16, dtype=dtype) for _ in range(3))
    q[0, 0, 1, 0] = 1.0
    k[0, 0, 0, 0], k[0, 0, 1, 0] = 1.0, 1.0 - below_one                      # s_0 - s_1 = below_one / 4
    v[0, 0, 0, 0], v[0, 0, 1, 0] = 1.0, -1.0
    out = s2_attention(q, k, v, 16, block_sizes=(16, 16))
    assert out.dtype == dtype
    assert out[0, 0, 1, 0].item() == 0.0, f"{dtype}: got {out[0, 0, 1, 0].item():.3e}, expected 0: round p to " \
        "DTYPE (_round_to) before tl.dot, as the tensor cores read it"
