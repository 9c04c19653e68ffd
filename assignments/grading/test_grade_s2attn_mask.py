"""Grades s2attn_mask (s2attn_kernel.s2_mask) against groups written out by hand and a loop over
DESIGN.md's words; tests marked `harder` grade the helpers shifted_heads and group_ids, blank only
in the harder variant (make_assignment.py --harder)."""

import pytest
import torch

from s2attn_kernel import group_ids, s2_mask, shifted_heads

pytestmark = pytest.mark.s2attn_mask


def group_of(i: int, G: int, shifted: bool) -> int:
    return (i + G // 2) // G if shifted else i // G


def loop_mask(T: int, G: int, H: int) -> torch.Tensor:
    """(H, T, T): the last H//2 heads shifted by G/2 (unless G >= T), causal within groups."""
    shifted = [h >= H - H // 2 and G < T for h in range(H)]
    return torch.tensor([[[j <= i and group_of(j, G, s) == group_of(i, G, s) for j in range(T)] for i in range(T)]
                         for s in shifted])


def hand_mask(T: int, groups: list[range]) -> torch.Tensor:
    out = torch.zeros(T, T, dtype=torch.bool)
    for g in groups:
        for i in g:
            for j in g:
                out[i, j] = j <= i
    return out


def test_shape_and_dtype():
    mask = s2_mask(8, 4, 2)
    assert mask.shape == (2, 8, 8) and mask.dtype == torch.bool, f"s2_mask must be (H, T, T) bool, got " \
        f"{tuple(mask.shape)} {mask.dtype}"


def test_unshifted_head_by_hand():
    got = s2_mask(8, 4, 2)[0]
    assert torch.equal(got, hand_mask(8, [range(0, 4), range(4, 8)])), f"head 0 (unshifted), T=8, G=4: groups " \
        f"{{0..3}} {{4..7}}, causal; got\n{got.int()}"


def test_shifted_head_by_hand():
    got = s2_mask(8, 4, 2)[1]
    assert torch.equal(got, hand_mask(8, [range(0, 2), range(2, 6), range(6, 8)])), f"head 1 (shifted by G/2), " \
        f"T=8, G=4: groups {{0,1}} {{2..5}} {{6,7}}, causal, no wrap-around; got\n{got.int()}"


@pytest.mark.parametrize("T, G, H", [(10, 4, 3), (13, 6, 4), (7, 2, 5)])
def test_ragged_lengths_and_odd_head_counts(T, G, H):
    got, want = s2_mask(T, G, H), loop_mask(T, G, H)
    for h in range(H):
        assert torch.equal(got[h], want[h]), f"T={T}, G={G}, H={H}: head {h} ({'shifted' if h >= H - H // 2 else 'not shifted'}) " \
            f"differs (rows: queries, columns: keys)\n{got[h].int()}\nexpected\n{want[h].int()}"


@pytest.mark.parametrize("T, G, H", [(12, 12, 2), (9, 16, 2), (6, 4, 1)])
def test_one_group_or_one_head_is_plain_causal_within_groups(T, G, H):
    got, want = s2_mask(T, G, H), loop_mask(T, G, H)
    assert torch.equal(got, want), f"T={T}, G={G}, H={H}: G >= T is one group (full causal, nothing shifted), " \
        f"and a single head is never shifted; got\n{got.int()}"


@pytest.mark.harder
def test_group_ids_by_hand():
    assert group_ids(8, 4, False).tolist() == [0, 0, 0, 0, 1, 1, 1, 1], "unshifted: i // G"
    assert group_ids(8, 4, True).tolist() == [0, 0, 1, 1, 1, 1, 2, 2], "shifted: (i + G/2) // G"
    assert group_ids(6, 8, True).tolist() == [0] * 6, "G >= T: one group, nothing to shift"


@pytest.mark.harder
def test_shifted_heads_are_the_last_half():
    for H, want in ((1, [False]), (2, [False, True]), (3, [False, False, True]), (4, [False, False, True, True])):
        got = shifted_heads(H)
        assert got.dtype == torch.bool and got.tolist() == want, f"H={H}: {got.tolist()}, expected {want} (the " \
            "last H//2 heads)"
