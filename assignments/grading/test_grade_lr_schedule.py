"""Grades lr_schedule (train.lr_factor) by hand values: linear warmup, cosine decay from 1 to
min_lr_ratio at cfg.steps, the floor held after the last step, and the edge cases."""

import itertools
import math

import pytest

import train

pytestmark = pytest.mark.lr_schedule
CFG = train.TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)


def test_warmup_is_linear_to_the_peak():
    f = [train.lr_factor(step, CFG) for step in range(10)]
    assert f == pytest.approx([(s + 1) / 10 for s in range(10)]), f"warmup steps 0..9 of 10 must give " \
        f"(step + 1) / 10: got {[round(x, 3) for x in f]}"


def test_cosine_from_the_peak():
    f = {s: train.lr_factor(s, CFG) for s in (10, 35, 60, 85)}
    want = {s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 100)) for s in f}
    assert f == pytest.approx(want), f"decay over steps 10..110: got {f}, expected {want} (step 10 is the peak, " \
        "1.0; step 60 half-way, 0.55)"


def test_the_last_step_and_after_stay_at_the_floor():
    f = [train.lr_factor(s, CFG) for s in (109, 110, 111, 500)]
    assert f[0] > 0.1 and f[1:] == pytest.approx([0.1] * 3), f"steps 109, 110, 111, 500: got {f}; the factor " \
        "reaches min_lr_ratio at cfg.steps and stays there (no rise back up the cosine)"


def test_never_rises_after_warmup():
    f = [train.lr_factor(s, CFG) for s in range(10, 130)]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(f)), "after warmup the factor must never rise"


def test_no_warmup_and_warmup_to_the_last_step():
    assert train.lr_factor(0, train.TrainConfig(steps=5, warmup_steps=0, min_lr_ratio=0.0)) == pytest.approx(1.0), \
        "without warmup the first step is at the peak"
    got = train.lr_factor(3, train.TrainConfig(steps=3, warmup_steps=3, min_lr_ratio=0.1))
    assert got in (pytest.approx(1.0), pytest.approx(0.1)), f"warmup_steps == steps: step 3 gave {got}, " \
        "expected the peak or the floor (and no ZeroDivisionError)"
