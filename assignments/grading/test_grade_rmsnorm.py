"""Grades rmsnorm (llama.RMSNorm.forward) against a float64 formula written here: values, gradients,
bf16 in fp32 with one rounding, and eps inside the square root (a zero row gives 0, not NaN)."""

import math

import pytest
import torch

from llama import RMSNorm

pytestmark = pytest.mark.rmsnorm


def exact(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight in float64."""
    x = x.double()
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight.double()


def norm_with(weight: list[float], eps: float) -> RMSNorm:
    norm = RMSNorm(len(weight), eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor(weight))
    return norm


def test_hand_computed_value():
    norm = norm_with([1.0, 2.0, 0.5, -1.0], eps=1e-5)
    out = norm(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))                # mean of squares 30 / 4 = 7.5
    want = torch.tensor([[1.0, 4.0, 1.5, -4.0]]) / math.sqrt(7.5 + 1e-5)
    assert out.shape == (1, 4), f"RMSNorm changed the shape (1, 4) to {tuple(out.shape)}"
    assert torch.allclose(out, want, atol=1e-6), f"RMSNorm([1, 2, 3, 4]) = {out.tolist()}, expected {want.tolist()}"


def test_batch_values_and_gradients_against_float64():
    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = (3 * torch.randn(2, 5, 64)).requires_grad_()
    grad_out = torch.randn(2, 5, 64)
    out = norm(x)
    assert out.shape == x.shape and out.dtype == torch.float32, f"got {tuple(out.shape)} {out.dtype}"
    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    want = exact(x64, w64, 1e-6)
    assert (out - want).abs().max() <= 1e-5, f"a (2, 5, 64) batch differs from the formula by {(out - want).abs().max():.2e}"
    got = torch.autograd.grad(out, (x, norm.weight), grad_out)
    ref = torch.autograd.grad(want, (x64, w64), grad_out.double())
    for name, a, b in zip(("input", "weight"), got, ref):
        assert (a - b).abs().max() <= 1e-4, f"the gradient for the {name} differs from the formula's"


def test_eps_goes_inside_the_square_root():
    norm = norm_with([1.0] * 4, eps=1e-2)
    x = torch.tensor([[0.1, -0.1, 0.1, -0.1], [0.0, 0.0, 0.0, 0.0]])   # mean of squares 0.01, then 0
    out = norm(x)
    assert not out.isnan().any(), f"a zero row gave {out[1].tolist()}: eps keeps the denominator above 0"
    assert torch.equal(out[1], torch.zeros(4)), f"a zero row must give zeros, got {out[1].tolist()}"
    want = x[0] / math.sqrt(0.01 + 0.01)
    assert torch.allclose(out[0], want, atol=1e-6), f"x = +-0.1, eps = 0.01: got {out[0].tolist()}, expected " \
        f"x / sqrt(0.01 + 0.01) = {want.tolist()} (eps inside the square root, not added after it)"


def test_bf16_in_bf16_out_computed_in_fp32():
    """Computed in fp32 and rounded once, (nearly) every output is the exact value rounded to bf16;
    computed in bf16, 20-55% of them are not."""
    x16 = 3 * torch.randn(4, 512).bfloat16()
    out16 = RMSNorm(512, eps=1e-6).bfloat16()(x16)
    assert out16.dtype == torch.bfloat16, f"RMSNorm must return its input's dtype: got {out16.dtype} for bfloat16"
    want = exact(x16, torch.ones(512), 1e-6).bfloat16()
    wrong = (out16 != want).float().mean().item()
    assert wrong <= 0.01, f"in bf16, {wrong:.0%} of the outputs are not the exact value rounded: compute in fp32"

