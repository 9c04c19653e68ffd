"""Grades rope (llama.rope_cos_sin and llama.apply_rope) against float64 formulas written here:
the tables (plain and llama3-scaled frequencies), the half-split rotation, the relative-position
property, and that the rotation keeps the input's dtype (an fp32 result crashes a bf16 model)."""

import math

import pytest
import torch

from llama import LlamaConfig, apply_rope, rope_cos_sin, rope_inv_freq

pytestmark = pytest.mark.rope
LLAMA3 = dict(rope_theta=5e5, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                high_freq_factor=4.0, original_max_position_embeddings=64))


def tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 cos, sin (T, D): angle[t, i] = positions[t] * inv_freq[i mod D/2]."""
    angles = positions.double()[:, None] * inv_freq.double().repeat(2)[None, :]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """float64 half-split rotation: pair (x_i, x_{i+D/2}) turned by the angle of dimension i."""
    x = x.double()
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[..., :half], sin[..., :half]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def test_tables_hand_computed():
    cos, sin = rope_cos_sin(torch.tensor([0, 3]), torch.tensor([1.0, 0.5]))
    want_cos = torch.tensor([[1.0] * 4, [math.cos(3), math.cos(1.5), math.cos(3), math.cos(1.5)]])
    want_sin = torch.tensor([[0.0] * 4, [math.sin(3), math.sin(1.5), math.sin(3), math.sin(1.5)]])
    assert cos.shape == sin.shape == (2, 4), f"cos, sin must be (T, D) = (2, 4), got {tuple(cos.shape)}"
    assert torch.allclose(cos, want_cos, atol=1e-6), f"cos for positions 0, 3 and inv_freq [1, 0.5]: " \
        f"{cos.tolist()} != {want_cos.tolist()} (D/2 angles, repeated for the second half)"
    assert torch.allclose(sin, want_sin, atol=1e-6), f"sin table: {sin.tolist()} != {want_sin.tolist()}"


@pytest.mark.parametrize("scaling", ["plain", "llama3"])
def test_tables_fp32_for_long_positions(scaling):
    cfg = LlamaConfig(num_attention_heads=4, hidden_size=64, **(LLAMA3 if scaling == "llama3" else {}))
    positions = torch.arange(300)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg))
    assert cos.dtype == sin.dtype == torch.float32, f"the tables must be fp32 (integer positions in), got {cos.dtype}"
    want_cos, want_sin = tables(positions, rope_inv_freq(cfg))
    for name, a, b in (("cos", cos, want_cos), ("sin", sin, want_sin)):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        assert (a - b).abs().max() <= 1e-4, f"{scaling}: the {name} table at positions up to 299 is off by " \
            f"{(a - b).abs().max():.2e}"


def test_rotation_hand_computed():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)      # pairs (1, 3) and (2, 4)
    cos, sin = tables(torch.tensor([1]), torch.tensor([math.pi / 2, math.pi]))
    out = apply_rope(x, cos.float(), sin.float())
    want = torch.tensor([-3.0, -2.0, 1.0, -4.0])                   # (1, 3) turned by 90°, (2, 4) by 180°
    assert out.shape == x.shape, f"apply_rope changed the shape (1, 1, 1, 4) to {tuple(out.shape)}"
    assert torch.allclose(out.flatten(), want, atol=1e-6), f"apply_rope([1, 2, 3, 4]) turning the pair " \
        f"(1, 3) by 90° and (2, 4) by 180° = {out.flatten().tolist()}, expected {want.tolist()}"


def test_rotation_of_a_batch_against_float64():
    B, H, T, D = 2, 3, 50, 16
    cos, sin = tables(torch.arange(T), 1.0 / 1e4 ** (torch.arange(0, D, 2) / D))
    x = torch.randn(B, H, T, D)
    out = apply_rope(x, cos.float(), sin.float())
    want = rotate(x, cos, sin)
    assert out.shape == x.shape, f"apply_rope changed the shape {tuple(x.shape)} to {tuple(out.shape)}"
    assert (out - want).abs().max() <= 1e-5, f"(B, H, T, D) = {tuple(x.shape)}: off by {(out - want).abs().max():.2e}"


def test_scores_depend_on_relative_position_only():
    D = 8
    inv_freq = 1.0 / 1e4 ** (torch.arange(0, D, 2) / D)
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def score(i, j):
        ci, si = rope_cos_sin(torch.tensor([i]), inv_freq)
        cj, sj = rope_cos_sin(torch.tensor([j]), inv_freq)
        return (apply_rope(q, ci, si) * apply_rope(k, cj, sj)).sum().item()

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-4), "q.k at positions (5, 2) and (13, 10) differ"
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3), "the score must depend on the distance"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotation_keeps_the_input_dtype(dtype):
    """The tables are fp32; a bf16 model's q and k must stay bf16 (SDPA refuses mixed dtypes)."""
    T, D = 10, 8
    cos, sin = rope_cos_sin(torch.arange(T), 1.0 / 1e4 ** (torch.arange(0, D, 2) / D))
    x = torch.randn(1, 2, T, D).to(dtype)
    out = apply_rope(x, cos, sin)
    assert out.dtype == dtype, f"apply_rope returned {out.dtype} for {dtype} input: cast the tables to x's dtype"
    want = rotate(x, cos.double(), sin.double())
    assert (out.double() - want).abs().max() <= 0.05, f"{dtype}: off by {(out.double() - want).abs().max():.2e}"
