"""s2attn_kernel.py: S2-Attn (shifted sparse attention, LongLoRA) as a Triton kernel, forward and backward.

LongLoRA (Chen et al. 2023, arXiv 2309.12307) trains on long inputs with attention restricted to
groups of G tokens, so the cost grows with T*G instead of T^2. The semantics (../shared/DESIGN.md):
  - every head attends causally, and only within its own group;
  - the first H - H//2 heads use groups [0, G), [G, 2G), ...: token i is in group i // G;
  - the last H//2 heads (LongLoRA shifts the second half) use groups shifted by G/2: token i is in
    group (i + G/2) // G, so the first and the last shifted groups are half-size (the last one may
    be cut shorter still when T is not a multiple of G);
  - with G >= T there is a single group and no shift: every head is full causal attention;
  - no token ever sees a later token. LongLoRA's `torch.roll` version rolls the first G/2 tokens
    to the end, into one group after the last G/2 tokens, which they then see; here the first
    shifted group simply holds G/2 tokens.
`s2_attention_reference` states this with an explicit boolean mask; the Triton kernels below must
match it (tests/test_s2attn.py). They follow FlashAttention-2 (Dao 2023): blocks of queries, an
online softmax with fp32 accumulators, the log-sum-exp saved for the backward pass, and a backward
pass that recomputes the probabilities. The one S2-Attn-specific idea: each query block visits only
the key blocks of its own group(s), so work is proportional to T*G, and only key blocks that cross a
group border or the diagonal pay for a per-element mask.

Shape legend:
    B  batch        H  query heads      Hkv  key/value heads (GQA: H % Hkv == 0, N_REP = H // Hkv)
    T  tokens       D  head dim         G    group size (even; the shifted heads move by G/2)
    BM queries per block (BLOCK_M)      BN   keys per block (BLOCK_N)

Run:
    python s2attn_kernel.py                        # the masks, then kernel vs reference (seconds)
    TRITON_INTERPRET=1 python s2attn_kernel.py     # the same, running the Triton code on the CPU
    python s2attn_kernel.py --compile              # compile for sm_80/sm_90: registers, spills, smem
    python benchmarks/s2attn.py                    # on a GPU: against SDPA and the LongLoRA recipe
"""

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

import cli

# Decided once, at import, because @triton.jit decides then too: under the interpreter the kernels
# run on CPU tensors with numpy, which needs help with bf16 (see `_round_to`).
INTERPRET = bool(triton.knobs.runtime.interpret)   # TRITON_INTERPRET=1 (or true, on, ...)
LOG2E = 1.4426950408889634   # the kernels use exp2: e^x = 2^(x * log2 e)
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int     # BM: queries per block
    block_n: int     # BN: keys per block
    num_warps: int
    num_stages: int  # software-pipelining depth of the loads inside the inner loop


# What the wrapper launches, in one place: head_dim -> kernel -> config, for fp16 and bf16. Each
# entry compiles for sm_80 and sm_90 without register spills and within shared memory (checked by
# tests/test_s2attn.py for D = 64 and 128; `python s2attn_kernel.py --compile` prints the figures).
# fp32 inputs use FP32_CONFIG for every kernel and head dim: exact fp32 dots run on CUDA cores, not
# tensor cores (slow: meant for checking), and small blocks keep them free of spills up to D = 128.
LAUNCH_CONFIGS = {D: dict(forward=LaunchConfig(128, 64, 8, 3), dq=LaunchConfig(128, 64, 8, 3),
                          dkdv=LaunchConfig(32, 128, 8, 3)) for D in (16, 32, 64)}
LAUNCH_CONFIGS[128] = dict(forward=LaunchConfig(128, 64, 8, 3), dq=LaunchConfig(128, 32, 8, 2),
                           dkdv=LaunchConfig(32, 64, 8, 2))
FP32_CONFIG = LaunchConfig(16, 16, 4, 3)
DELTA_BLOCK = 32   # rows per program of the small delta = rowsum(dO * O) kernel


def launch_config(kernel: str, head_dim: int, dtype: torch.dtype,
                  block_sizes: tuple[int, int] | None = None) -> LaunchConfig:
    """The table's entry; `block_sizes` = (BM, BN) overrides the blocks (tests use small ones)."""
    cfg = FP32_CONFIG if dtype == torch.float32 else LAUNCH_CONFIGS[head_dim][kernel]
    if block_sizes is not None:
        bm, bn = block_sizes
        if bm not in (16, 32, 64, 128) or bn not in (16, 32, 64, 128):
            raise ValueError(f"block_sizes={block_sizes}: each must be 16, 32, 64 or 128 (tl.dot needs >= 16)")
        cfg = LaunchConfig(bm, bn, cfg.num_warps, cfg.num_stages)
    return cfg


# ----------------------------------------------------------------------------------------------
# The semantics: an explicit mask and a PyTorch reference

def shifted_heads(num_heads: int) -> torch.Tensor:
    """(H,) bool: which heads use groups shifted by G/2. The last H//2 (LongLoRA shifts the second
    half); with odd H the extra head is unshifted, and a single head is never shifted."""
    return torch.arange(num_heads) >= num_heads - num_heads // 2


def group_ids(T: int, group_size: int, shifted: bool, device=None) -> torch.Tensor:
    """(T,) group index of each token: i // G, or (i + G/2) // G for shifted heads. With G >= T
    there is one group and nothing to shift: S2-Attn is then exactly full causal attention."""
    shift = group_size // 2 if shifted and group_size < T else 0
    return (torch.arange(T, device=device) + shift) // group_size


def s2_mask(T: int, group_size: int, num_heads: int, device=None) -> torch.Tensor:
    """(H, T, T) bool, True where query i may attend to key j: j <= i and same group."""
    # assignment: s2attn_mask: causal and in the same group_ids group; shifted groups for the shifted_heads
    i = torch.arange(T, device=device)
    causal = i[None, :] <= i[:, None]                                        # (T, T)
    masks = []
    for shifted in (False, True):
        g = group_ids(T, group_size, shifted, device)
        masks.append(causal & (g[:, None] == g[None, :]))                    # (T, T)
    return torch.where(shifted_heads(num_heads).to(causal.device)[:, None, None], masks[1], masks[0])
    # end assignment: s2attn_mask


def s2_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int) -> torch.Tensor:
    """q (B, H, T, D), k and v (B, Hkv, T, D) -> (B, H, T, D). Materializes (B, H, T, T) scores.

    Products in the input dtype (as an eager PyTorch model computes them), softmax in fp32 (fp64
    inputs stay fp64), scale 1/sqrt(D).
    """
    B, H, T, D = q.shape
    k = k.repeat_interleave(H // k.size(1), dim=1)                            # (B, H, T, D)
    v = v.repeat_interleave(H // v.size(1), dim=1)                            # (B, H, T, D)
    scores = (q @ k.transpose(-1, -2)) * D ** -0.5                           # (B, H, T, T)
    scores = scores.masked_fill(~s2_mask(T, group_size, H, q.device), float("-inf"))
    probs = torch.softmax(scores.to(torch.promote_types(q.dtype, torch.float32)), dim=-1)
    return probs.to(q.dtype) @ v                                             # (B, H, T, D)


# ----------------------------------------------------------------------------------------------
# Triton: small helpers shared by the kernels

@triton.jit
def _group_of(i, G, shift):
    """Group index of token(s) i; shift is 0 or G // 2."""
    return (i + shift) // G


@triton.jit
def _group_start(i, G, shift):
    """First token of token i's group (clamped at 0: the first shifted group is half-size)."""
    return tl.maximum((i + shift) // G * G - shift, 0)


@triton.jit
def _group_end(i, G, shift, T):
    """One past the last token of token i's group (cut at T)."""
    return tl.minimum((i + shift) // G * G - shift + G, T)


@triton.jit
def _key_ranges(m0, T, G, shift, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys for the query block m0 .. m0 + BM: all lie in [lo, hi) = [start of the first query's
    group (rounded down to BN), last query]. Key blocks in [full_lo, full_hi) need no mask: they start
    at or after the group's start and end at or before the first query, which needs every query of
    the block in one group. [lo, full_lo) and [full_hi, hi) (the group's first partial block, the
    diagonal, or everything when the block straddles a group border) are masked per element."""
    q_last = tl.minimum(m0 + BLOCK_M, T) - 1
    lo = _group_start(m0, G, shift) // BLOCK_N * BLOCK_N
    hi = q_last + 1
    one_group = _group_of(m0, G, shift) == _group_of(q_last, G, shift)
    full_lo = tl.where(one_group, tl.minimum(tl.cdiv(_group_start(m0, G, shift), BLOCK_N) * BLOCK_N, hi), hi)
    full_hi = tl.where(one_group, tl.maximum((m0 + 1) // BLOCK_N * BLOCK_N, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_ranges(n0, T, G, shift, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Queries that see the key block n0 .. n0 + BN: [lo, hi) = [first key (rounded down to BM), end
    of the last key's group). Query blocks in [full_lo, full_hi) need no mask: they start at or after
    the block's last key and end inside the keys' group, which needs every key in one group."""
    n_last = tl.minimum(n0 + BLOCK_N, T) - 1
    lo = n0 // BLOCK_M * BLOCK_M
    hi = _group_end(n_last, G, shift, T)
    one_group = _group_of(n0, G, shift) == _group_of(n_last, G, shift)
    full_lo = tl.where(one_group, tl.minimum(tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M, hi), hi)
    full_hi = tl.where(one_group, tl.maximum(_group_end(n0, G, shift, T) // BLOCK_M * BLOCK_M, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _round_to(x, DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
    """x rounded to DTYPE (the tensor-core input type, or the output type) to nearest even, as a GPU
    casts. The interpreter needs help: numpy has no bf16 matmul, and it casts fp32 to bf16 by
    truncation. So there the value is rounded on its bits and kept in fp32: tl.dot and the stores
    then see the numbers a GPU would."""
    if INTERPRETED:
        x = x.to(tl.float32)
        if DTYPE == tl.bfloat16:   # keep the top 16 bits, rounding half to even
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
            x = bits.to(tl.float32, bitcast=True)
        else:
            x = x.to(DTYPE).to(tl.float32)
    else:
        x = x.to(DTYPE)
    return x


@triton.jit
def _load_rows(base, rows, stride, T, HEAD_DIM: tl.constexpr, INTERPRETED: tl.constexpr, MASKED: tl.constexpr):
    """Rows `rows` of the (T, D) matrix at `base` (row stride `stride`) as a dot operand, (len(rows), D).
    MASKED: rows at or past T read as 0. The offsets are rebuilt from scalars at every call: tiles of
    64-bit pointers kept alive across a loop cost registers (and spills)."""
    ptrs = base + rows[:, None] * stride + tl.arange(0, HEAD_DIM)[None, :]
    if MASKED:
        x = tl.load(ptrs, mask=rows[:, None] < T, other=0.0)
    else:
        x = tl.load(ptrs)
    return _round_to(x, base.dtype.element_ty, INTERPRETED)


@triton.jit
def _store_rows(base, rows, stride, T, x, HEAD_DIM: tl.constexpr, INTERPRETED: tl.constexpr):
    """x (len(rows), D), fp32, rounded to the matrix's dtype into rows `rows` < T of the matrix at `base`."""
    DTYPE: tl.constexpr = base.dtype.element_ty
    ptrs = base + rows[:, None] * stride + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(ptrs, _round_to(x, DTYPE, INTERPRETED).to(DTYPE), mask=rows[:, None] < T)


# ----------------------------------------------------------------------------------------------
# Forward kernel: one program per (query block, batch * head)

@triton.jit
def _online_softmax_update(acc, m_i, l_i, s, v, DTYPE: tl.constexpr, INTERPRETED: tl.constexpr,
                           PRECISION: tl.constexpr):
    """One key block of the online softmax (FlashAttention-2, Alg. 1) -> the new (acc, m_i, l_i).

    s (BM, BN): this block's scores in log2 units, -inf where masked; v (BN, D): its values.
    m_i (BM,): running max of the scores so far; l_i (BM,): running sum of 2^(s - m_i);
    acc (BM, D) fp32: running sum of 2^(s - m_i) @ v. Whatever was summed against an older max is
    rescaled by 2^(m_old - m_new), so that at the end acc / l_i = softmax(s) @ v over all blocks.
    p goes into tl.dot rounded to DTYPE (the tensor-core input type), as a GPU computes it."""
    # assignment: online_softmax: rescale l_i and acc to the new running max, then add this block's 2^(s - max)
    m_new = tl.maximum(m_i, tl.max(s, 1))                                # (BM,) running max
    alpha = tl.exp2(m_i - m_new)                                         # rescales what came before
    p = tl.exp2(s - m_new[:, None])                                      # (BM, BN)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(_round_to(p, DTYPE, INTERPRETED), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i
    # end assignment: online_softmax


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, K_head, V_head, start, end, offs_m, T, G, shift, stride_kt, stride_vt,
               scale_log2, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               INTERPRETED: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over key blocks n0 = start, start + BN, ... < end (FlashAttention-2, Alg. 1).
    A MASKED block gets the per-element S2-Attn mask; an unmasked one lies wholly inside the group of
    every query of the block and before all of them. K_head, V_head: this (batch, head)'s first row."""
    DTYPE: tl.constexpr = K_head.dtype.element_ty
    q_group = _group_of(offs_m, G, shift)                                    # (BM,)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)                                  # (BN,)
        k = _load_rows(K_head, offs_n, stride_kt, T, HEAD_DIM, INTERPRETED, MASKED)   # (BN, D)
        v = _load_rows(V_head, offs_n, stride_vt, T, HEAD_DIM, INTERPRETED, MASKED)   # (BN, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # (BM, BN), log2 units
        if MASKED:   # key <= query, and the same group (keys past T fail the first test)
            keep = (offs_n[None, :] <= offs_m[:, None]) & (_group_of(offs_n, G, shift)[None, :] == q_group[:, None])
            s = tl.where(keep, s, float("-inf"))
        acc, m_i, l_i = _online_softmax_update(acc, m_i, l_i, s, v, DTYPE, INTERPRETED, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _s2_fwd_kernel(Q, K, V, O, LSE,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                   H, T, G, scale_log2,
                   N_REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   INTERPRETED: tl.constexpr, PRECISION: tl.constexpr):
    # 1. This program's queries: block m0 .. m0 + BM of head h in batch b (K/V head h // N_REP).
    m0 = tl.program_id(0) * BLOCK_M
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    shift = tl.where((h >= H - H // 2) & (G < T), G // 2, 0)                             # last H//2 heads: shifted
    offs_m = m0 + tl.arange(0, BLOCK_M)                                      # (BM,)
    q = _load_rows(Q + b.to(tl.int64) * stride_qb + h * stride_qh, offs_m, stride_qt, T, HEAD_DIM, INTERPRETED,
                   True)                                                     # (BM, D)
    K_head = K + b.to(tl.int64) * stride_kb + (h // N_REP) * stride_kh       # GQA: no repeated K/V
    V_head = V + b.to(tl.int64) * stride_vb + (h // N_REP) * stride_vh

    # 2. Which keys: [lo, hi), of which [full_lo, full_hi) need no mask (see _key_ranges).
    lo, full_lo, full_hi, hi = _key_ranges(m0, T, G, shift, BLOCK_M, BLOCK_N)

    # 3. Online softmax over the three ranges. m_i starts finite: a row may meet a block with all of
    #    its keys masked before it meets its own group, and -inf - -inf would be NaN.
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1e30                      # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                              # running sum of 2^(s - m)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)                    # running sum of p @ v
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K_head, V_head, lo, full_lo, offs_m, T, G, shift,
                               stride_kt, stride_vt, scale_log2, True, BLOCK_N, HEAD_DIM, INTERPRETED, PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K_head, V_head, full_lo, full_hi, offs_m, T, G, shift,
                               stride_kt, stride_vt, scale_log2, False, BLOCK_N, HEAD_DIM, INTERPRETED, PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K_head, V_head, full_hi, hi, offs_m, T, G, shift,
                               stride_kt, stride_vt, scale_log2, True, BLOCK_N, HEAD_DIM, INTERPRETED, PRECISION)

    # 4. Normalize; save the log2-sum-exp2 of the scaled scores, from which backward rebuilds p.
    #    Every real row saw itself, so l_i >= 1; rows past T saw nothing and are not stored.
    l_i = tl.where(offs_m < T, l_i, 1.0)
    _store_rows(O + b.to(tl.int64) * stride_ob + h * stride_oh, offs_m, stride_ot, T, acc / l_i[:, None], HEAD_DIM,
                INTERPRETED)
    tl.store(LSE + tl.program_id(1).to(tl.int64) * T + offs_m, m_i + tl.log2(l_i), mask=offs_m < T)


# ----------------------------------------------------------------------------------------------
# Backward kernels. With P = softmax(scale * Q K^T) (masked), O = P V and dO given:
#   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta) with delta = rowsum(dO * O),
#   dQ = scale * dS K,  dK = scale * dS^T Q.
# delta first (one small kernel), then dQ (one program per query block, the forward's key ranges)
# and dK, dV (one program per key block and K/V head, summing over the N_REP heads that share it):
# each program owns its output rows, so no atomics.

@triton.jit
def _s2_bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_db, stride_dh, stride_dt,
                         H, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)              # (BM,)
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    o = _load_rows(O + b.to(tl.int64) * stride_ob + h * stride_oh, offs_m, stride_ot, T, HEAD_DIM, False, True)
    do = _load_rows(DO + b.to(tl.int64) * stride_db + h * stride_dh, offs_m, stride_dt, T, HEAD_DIM, False, True)
    o, do = o.to(tl.float32), do.to(tl.float32)                              # (BM, D) each
    tl.store(DELTA + tl.program_id(1).to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K_head, V_head, start, end, offs_m, T, G, shift, stride_kt, stride_vt,
              scale_log2, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
              INTERPRETED: tl.constexpr, PRECISION: tl.constexpr):
    """dQ += dS K over key blocks start .. end (the forward's ranges and masks)."""
    DTYPE: tl.constexpr = K_head.dtype.element_ty
    q_group = _group_of(offs_m, G, shift)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(K_head, offs_n, stride_kt, T, HEAD_DIM, INTERPRETED, MASKED)   # (BN, D)
        v = _load_rows(V_head, offs_n, stride_vt, T, HEAD_DIM, INTERPRETED, MASKED)   # (BN, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # (BM, BN)
        if MASKED:
            keep = (offs_n[None, :] <= offs_m[:, None]) & (_group_of(offs_n, G, shift)[None, :] == q_group[:, None])
            s = tl.where(keep, s, float("-inf"))
        p = tl.exp2(s - lse[:, None])                                        # (BM, BN), rebuilt P
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)              # (BM, BN)
        ds = p * (dp - delta[:, None])                                       # (BM, BN)
        dq = tl.dot(_round_to(ds, DTYPE, INTERPRETED), k, dq, input_precision=PRECISION)   # (BM, D)
    return dq


@triton.jit
def _s2_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,
                      stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                      stride_vb, stride_vh, stride_vt, stride_db, stride_dh, stride_dt,
                      stride_dqb, stride_dqh, stride_dqt,
                      H, T, G, scale_log2, sm_scale,
                      N_REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      INTERPRETED: tl.constexpr, PRECISION: tl.constexpr):
    # 1. Queries, as in the forward kernel, plus dO, the saved log-sum-exp and delta.
    m0 = tl.program_id(0) * BLOCK_M
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    shift = tl.where((h >= H - H // 2) & (G < T), G // 2, 0)
    offs_m = m0 + tl.arange(0, BLOCK_M)                                      # (BM,)
    q = _load_rows(Q + b.to(tl.int64) * stride_qb + h * stride_qh, offs_m, stride_qt, T, HEAD_DIM, INTERPRETED,
                   True)                                                     # (BM, D)
    do = _load_rows(DO + b.to(tl.int64) * stride_db + h * stride_dh, offs_m, stride_dt, T, HEAD_DIM, INTERPRETED,
                    True)                                                    # (BM, D)
    lse = tl.load(LSE + tl.program_id(1).to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)      # (BM,)
    delta = tl.load(DELTA + tl.program_id(1).to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)  # (BM,)
    K_head = K + b.to(tl.int64) * stride_kb + (h // N_REP) * stride_kh
    V_head = V + b.to(tl.int64) * stride_vb + (h // N_REP) * stride_vh

    # 2. Accumulate dS K over the forward kernel's key ranges in fp32, then scale once.
    lo, full_lo, full_hi, hi = _key_ranges(m0, T, G, shift, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, K_head, V_head, lo, full_lo, offs_m, T, G, shift, stride_kt, stride_vt,
                   scale_log2, True, BLOCK_N, HEAD_DIM, INTERPRETED, PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, K_head, V_head, full_lo, full_hi, offs_m, T, G, shift, stride_kt,
                   stride_vt, scale_log2, False, BLOCK_N, HEAD_DIM, INTERPRETED, PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, K_head, V_head, full_hi, hi, offs_m, T, G, shift, stride_kt, stride_vt,
                   scale_log2, True, BLOCK_N, HEAD_DIM, INTERPRETED, PRECISION)
    _store_rows(DQ + b.to(tl.int64) * stride_dqb + h * stride_dqh, offs_m, stride_dqt, T, dq * sm_scale, HEAD_DIM,
                INTERPRETED)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q_head, DO_head, LSE_head, DELTA_head, start, end, offs_n, T, G, shift,
                stride_qt, stride_dt, scale_log2, MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
                HEAD_DIM: tl.constexpr, INTERPRETED: tl.constexpr, PRECISION: tl.constexpr):
    """dV += P^T dO and dK += dS^T Q over query blocks start .. end, for one query head.
    Everything is computed transposed, (BN, BM), so that the key block stays the row block."""
    DTYPE: tl.constexpr = Q_head.dtype.element_ty
    k_group = _group_of(offs_n, G, shift)                                    # (BN,)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)                                  # (BM,)
        q = _load_rows(Q_head, offs_m, stride_qt, T, HEAD_DIM, INTERPRETED, MASKED)     # (BM, D)
        do = _load_rows(DO_head, offs_m, stride_dt, T, HEAD_DIM, INTERPRETED, MASKED)   # (BM, D)
        if MASKED:   # the last query block may run past T
            lse = tl.load(LSE_head + offs_m, mask=offs_m < T, other=0.0)     # (BM,)
            delta = tl.load(DELTA_head + offs_m, mask=offs_m < T, other=0.0)
        else:
            lse = tl.load(LSE_head + offs_m)
            delta = tl.load(DELTA_head + offs_m)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2  # (BN, BM) = S^T
        if MASKED:   # key <= query < T, and the same group
            keep = ((offs_n[:, None] <= offs_m[None, :]) & (offs_m[None, :] < T)
                    & (k_group[:, None] == _group_of(offs_m, G, shift)[None, :]))
            s_t = tl.where(keep, s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])                                    # (BN, BM) = P^T
        dv = tl.dot(_round_to(p_t, DTYPE, INTERPRETED), do, dv, input_precision=PRECISION)   # (BN, D)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)            # (BN, BM) = dP^T
        ds_t = p_t * (dp_t - delta[None, :])                                 # (BN, BM) = dS^T
        dk = tl.dot(_round_to(ds_t, DTYPE, INTERPRETED), q, dk, input_precision=PRECISION)   # (BN, D)
    return dk, dv


@triton.jit
def _s2_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,
                        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                        stride_vb, stride_vh, stride_vt, stride_db, stride_dh, stride_dt,
                        stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                        H, T, G, scale_log2, sm_scale,
                        N_REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        INTERPRETED: tl.constexpr, PRECISION: tl.constexpr):
    # 1. This program's keys: block n0 .. n0 + BN of K/V head kv_h in batch b.
    n0 = tl.program_id(0) * BLOCK_N
    Hkv = H // N_REP
    b, kv_h = tl.program_id(1) // Hkv, tl.program_id(1) % Hkv
    offs_n = n0 + tl.arange(0, BLOCK_N)                                      # (BN,)
    k = _load_rows(K + b.to(tl.int64) * stride_kb + kv_h * stride_kh, offs_n, stride_kt, T, HEAD_DIM, INTERPRETED,
                   True)                                                     # (BN, D)
    v = _load_rows(V + b.to(tl.int64) * stride_vb + kv_h * stride_vh, offs_n, stride_vt, T, HEAD_DIM, INTERPRETED,
                   True)                                                     # (BN, D)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # 2. GQA: every query head h that reads this K/V head adds its share; heads differ in shift.
    for r in range(N_REP):
        h = kv_h * N_REP + r
        shift = tl.where((h >= H - H // 2) & (G < T), G // 2, 0)
        Q_head = Q + b.to(tl.int64) * stride_qb + h * stride_qh
        DO_head = DO + b.to(tl.int64) * stride_db + h * stride_dh
        row = (b * H + h).to(tl.int64) * T                                   # LSE, DELTA: (B*H, T)
        lo, full_lo, full_hi, hi = _query_ranges(n0, T, G, shift, BLOCK_M, BLOCK_N)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_head, DO_head, LSE + row, DELTA + row, lo, full_lo, offs_n, T, G,
                             shift, stride_qt, stride_dt, scale_log2, True, BLOCK_M, HEAD_DIM, INTERPRETED, PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_head, DO_head, LSE + row, DELTA + row, full_lo, full_hi, offs_n, T,
                             G, shift, stride_qt, stride_dt, scale_log2, False, BLOCK_M, HEAD_DIM, INTERPRETED,
                             PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_head, DO_head, LSE + row, DELTA + row, full_hi, hi, offs_n, T, G,
                             shift, stride_qt, stride_dt, scale_log2, True, BLOCK_M, HEAD_DIM, INTERPRETED, PRECISION)

    _store_rows(DK + b.to(tl.int64) * stride_dkb + kv_h * stride_dkh, offs_n, stride_dkt, T, dk * sm_scale,
                HEAD_DIM, INTERPRETED)
    _store_rows(DV + b.to(tl.int64) * stride_dvb + kv_h * stride_dvh, offs_n, stride_dvt, T, dv, HEAD_DIM, INTERPRETED)


# ----------------------------------------------------------------------------------------------
# Launches, described before they run, so that `compile_for_gpu` compiles exactly what runs

@dataclass
class Launch:
    kernel: object        # a @triton.jit function
    grid: tuple
    args: dict            # argument name -> tensor, int or float
    constexprs: dict      # argument name -> compile-time constant
    config: LaunchConfig

    def __call__(self):
        # Triton launches on the current CUDA device: make it the tensors' one
        device = self.args[self.kernel.arg_names[0]].device
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.config.num_warps,
                                   num_stages=self.config.num_stages)


def _strides(name: str, x: torch.Tensor) -> dict:
    """Batch, head and token strides of a (B, heads, T, D) tensor whose last dim is contiguous."""
    return {f"stride_{name}b": x.stride(0), f"stride_{name}h": x.stride(1), f"stride_{name}t": x.stride(2)}


def _constexprs(q: torch.Tensor, k: torch.Tensor, cfg: LaunchConfig) -> dict:
    # fp32 inputs: exact fp32 products ("ieee"), as PyTorch's default; fp16/bf16 ignore PRECISION
    return dict(N_REP=q.size(1) // k.size(1), HEAD_DIM=q.size(3), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                INTERPRETED=INTERPRET, PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _forward_launch(q, k, v, o, lse, group_size: int, block_sizes=None) -> Launch:
    B, H, T, D = q.shape
    cfg = launch_config("forward", D, q.dtype, block_sizes)
    args = dict(Q=q, K=k, V=v, O=o, LSE=lse, **_strides("q", q), **_strides("k", k), **_strides("v", v),
                **_strides("o", o), H=H, T=T, G=group_size, scale_log2=D ** -0.5 * LOG2E)
    return Launch(_s2_fwd_kernel, (triton.cdiv(T, cfg.block_m), B * H), args, _constexprs(q, k, cfg), cfg)


def _backward_launches(q, k, v, o, lse, do, delta, dq, dk, dv, group_size: int, block_sizes=None) -> list[Launch]:
    """delta = rowsum(dO * O), then dQ, then dK and dV (the last two are independent)."""
    B, H, T, D = q.shape
    Hkv = k.size(1)
    delta_cfg = LaunchConfig(DELTA_BLOCK, DELTA_BLOCK, 4, 1)
    delta_args = dict(O=o, DO=do, DELTA=delta, **_strides("o", o), **_strides("d", do), H=H, T=T)
    scales = dict(H=H, T=T, G=group_size, scale_log2=D ** -0.5 * LOG2E, sm_scale=D ** -0.5)
    dq_cfg = launch_config("dq", D, q.dtype, block_sizes)
    dq_args = dict(Q=q, K=k, V=v, DO=do, DQ=dq, LSE=lse, DELTA=delta, **_strides("q", q), **_strides("k", k),
                   **_strides("v", v), **_strides("d", do), **_strides("dq", dq), **scales)
    dkdv_cfg = launch_config("dkdv", D, q.dtype, block_sizes)
    dkdv_args = dict(Q=q, K=k, V=v, DO=do, DK=dk, DV=dv, LSE=lse, DELTA=delta, **_strides("q", q),
                     **_strides("k", k), **_strides("v", v), **_strides("d", do), **_strides("dk", dk),
                     **_strides("dv", dv), **scales)
    return [
        Launch(_s2_bwd_delta_kernel, (triton.cdiv(T, DELTA_BLOCK), B * H), delta_args,
               dict(HEAD_DIM=D, BLOCK_M=DELTA_BLOCK), delta_cfg),
        Launch(_s2_bwd_dq_kernel, (triton.cdiv(T, dq_cfg.block_m), B * H), dq_args,
               _constexprs(q, k, dq_cfg), dq_cfg),
        Launch(_s2_bwd_dkdv_kernel, (triton.cdiv(T, dkdv_cfg.block_n), B * Hkv), dkdv_args,
               _constexprs(q, k, dkdv_cfg), dkdv_cfg),
    ]


class S2AttnFunction(torch.autograd.Function):
    """Forward saves q, k, v, the output and the log-sum-exp (B, H, T) fp32; backward recomputes P."""

    @staticmethod
    def forward(ctx, q, k, v, group_size, block_sizes):
        B, H, T, D = q.shape
        o = torch.empty_like(q)                                              # keeps q's memory layout
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
        _forward_launch(q, k, v, o, lse, group_size, block_sizes)()
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.group_size, ctx.block_sizes = group_size, block_sizes
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = do if do.stride(-1) == 1 else do.contiguous()
        delta, dq, dk, dv = torch.empty_like(lse), torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for launch in _backward_launches(q, k, v, o, lse, do, delta, dq, dk, dv, ctx.group_size, ctx.block_sizes):
            launch()
        return dq, dk, dv, None, None


# ----------------------------------------------------------------------------------------------
# Public functions

def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int):
    """Raise a ValueError that says what to change when the kernel cannot take these inputs."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q must be (B, H, T, D) and k, v (B, Hkv, T, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, T, D = q.shape
    if k.shape != v.shape or k.size(0) != B or k.size(2) != T or k.size(3) != D:
        raise ValueError(f"k and v must both be (B={B}, Hkv, T={T}, D={D}) to match q {tuple(q.shape)}; got "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}. S2-Attn is for training (as many keys as "
                         "queries); decode with full causal attention and a KV cache")
    if H % k.size(1):
        raise ValueError(f"H={H} query heads must be a multiple of Hkv={k.size(1)} key/value heads (GQA)")
    if D not in HEAD_DIMS:
        raise ValueError(f"head_dim={D} is not supported by the kernel, which takes {HEAD_DIMS} (tl.arange "
                         "needs a power of two, tl.dot at least 16); use s2_attention_reference for this model")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among float16, bfloat16, float32; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}: cast them (e.g. .to(torch.bfloat16)) or run under torch.autocast")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size={group_size!r} must be an even int >= 2 (shifted heads move by "
                         "group_size // 2)")


_said: set[str] = set()


def _say_once(message: str):
    if message not in _said:
        _said.add(message)
        print(message, file=sys.stderr)


def s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int,
                 block_sizes: tuple[int, int] | None = None) -> torch.Tensor:
    """S2-Attn: q (B, H, T, D), k and v (B, Hkv, T, D) -> (B, H, T, D), differentiable.

    Triton on CUDA tensors (or on any tensors under TRITON_INTERPRET=1); otherwise the PyTorch
    reference, with a one-time message. `block_sizes` = (BM, BN) overrides LAUNCH_CONFIGS' blocks.
    """
    check_inputs(q, k, v, group_size)
    if not (q.is_cuda or INTERPRET):
        _say_once(f"s2_attention: tensors on {q.device.type}, not CUDA: using the PyTorch reference "
                  "(T x T memory); set TRITON_INTERPRET=1 to run the Triton kernels on the CPU")
        return s2_attention_reference(q, k, v, group_size)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return S2AttnFunction.apply(q, k, v, group_size, block_sizes)


class S2Attention:
    """S2-Attn with a fixed group size G, for llama.py: `model.train_attn_fn = S2Attention(1024)`.

    Llama calls it only in training mode with gradients on and without a KV cache; inference and
    every pass without gradients keep full causal attention. G is a setting, never derived from the
    length of a padded batch: with G = T / 4, one (document, question) would see other groups, and
    so get another loss, depending on which rows share its batch. A sequence shorter than G is one
    group: full causal attention. The last H//2 heads are the shifted ones.
    """

    def __init__(self, group_size: int, block_sizes: tuple[int, int] | None = None):
        if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
            raise ValueError(f"group_size={group_size!r} must be an even int >= 2 (shifted heads move by G / 2)")
        self.group_size, self.block_sizes = group_size, block_sizes

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if k.size(2) != q.size(2):
            raise ValueError(f"S2Attention got {q.size(2)} queries but {k.size(2)} keys: it is for training "
                             "without a KV cache; llama.py uses it only in model.train() mode")
        return s2_attention(q, k, v, self.group_size, self.block_sizes)

    def __repr__(self):
        return f"S2Attention(group_size={self.group_size})"


# ----------------------------------------------------------------------------------------------
# Compiling for real GPUs without one: registers, spills and shared memory of what the wrapper launches

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}   # bytes one block may use (opt-in maximum per block)


def _compile(launch: Launch, capability: int):
    """triton.compile with the signature, constants and alignment the JIT would derive at launch."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    target = GPUTarget("cuda", capability, 32)
    backend = triton.compiler.make_backend(target)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(launch.kernel.arg_names):
        if name in launch.constexprs:
            signature[name], constexprs[name] = "constexpr", launch.constexprs[name]
            continue
        ty, spec = native_specialize_impl(backend, launch.args[name], False, True, True)
        signature[name] = ty
        if ty == "constexpr":             # an int equal to 1 is baked in, as the JIT does
            constexprs[name] = spec
        elif isinstance(spec, str):       # "D": pointer or int divisible by 16
            attrs[(i,)] = backend.parse_attr(spec)
    source = triton.compiler.ASTSource(launch.kernel, signature, constexprs, attrs)
    options = dict(num_warps=launch.config.num_warps, num_stages=launch.config.num_stages)
    return triton.compile(source, target=target, options=options)


def _ptxas_report(ptx: str, capability: int) -> dict:
    """Registers and spill bytes from `ptxas -v`, run with the flags Triton itself uses."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(capability)}", src, "-o", os.path.join(tmp, "kernel.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    number = lambda pattern: int(re.search(pattern, log).group(1))     # noqa: E731
    return dict(registers=number(r"Used (\d+) registers"), spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"))


def compile_for_gpu(capability: int, head_dim: int, dtype: torch.dtype = torch.bfloat16,
                    T: int = 4096, H: int = 32, Hkv: int = 8) -> list[dict]:
    """Compile the four kernels as the wrapper launches them for sm_<capability>, no GPU needed.
    One dict per kernel: config, registers, spill bytes, shared memory (bytes) and its limit."""
    if INTERPRET:
        raise RuntimeError("compile_for_gpu needs the real compiler: unset TRITON_INTERPRET before importing "
                           "s2attn_kernel (the kernels are interpreted functions now)")
    meta = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, device="meta")   # noqa: E731
    q, o, do, dq = (meta(1, H, T, head_dim) for _ in range(4))
    k, v, dk, dv = (meta(1, Hkv, T, head_dim) for _ in range(4))
    lse, delta = meta(1, H, T, dt=torch.float32), meta(1, H, T, dt=torch.float32)
    launches = [_forward_launch(q, k, v, o, lse, T // 4)]
    launches += _backward_launches(q, k, v, o, lse, do, delta, dq, dk, dv, T // 4)
    rows = []
    for launch in launches:
        compiled = _compile(launch, capability)
        rows.append(dict(kernel=launch.kernel.__name__, arch=f"sm_{capability}", head_dim=head_dim,
                         dtype=str(dtype).removeprefix("torch."), **vars(launch.config),
                         **_ptxas_report(compiled.asm["ptx"], capability),
                         shared=compiled.metadata.shared, shared_limit=SMEM_LIMIT[capability]))
    return rows


# ----------------------------------------------------------------------------------------------
# Demo

def show_masks(T: int = 16, group_size: int = 8):
    """Print who sees whom for an unshifted and a shifted head ('#': query row attends to key column)."""
    mask = s2_mask(T, group_size, 2)                                         # (2, T, T)
    for h, name in ((0, "unshifted head"), (1, f"shifted head (groups move by G/2 = {group_size // 2})")):
        print(f"{name}, T={T}, G={group_size}:")
        for row in mask[h]:
            print("  " + "".join("#" if m else "." for m in row.tolist()))


def main():
    p = argparse.ArgumentParser(description="S2-Attn Triton kernel: demo, or compile for sm_80/sm_90")
    p.add_argument("--compile", action="store_true",
                   help="compile for sm_80 and sm_90 (bf16) and print registers, spills and shared memory")
    p.add_argument("--head-dims", default="64,128", help="with --compile: comma-separated head dims (default %(default)s)")
    args = p.parse_args()
    if args.compile:   # bf16, as launched for B=1, H=32, Hkv=8, T=4096, G=1024
        print(f"{'kernel':<21} {'arch':<5} {'D':>3} {'BM':>4} {'BN':>4} {'warps':>5} {'stages':>6} {'regs':>5} "
              f"{'spill st/ld':>11} {'smem KiB':>8} {'limit':>5}")
        for cap in (80, 90):
            for r in (r for D in map(int, args.head_dims.split(",")) for r in compile_for_gpu(cap, D)):
                spills = f"{r['spill_stores']}/{r['spill_loads']}"
                print(f"{r['kernel']:<21} {r['arch']:<5} {r['head_dim']:>3} {r['block_m']:>4} {r['block_n']:>4} "
                      f"{r['num_warps']:>5} {r['num_stages']:>6} {r['registers']:>5} {spills:>11} "
                      f"{r['shared'] / 1024:>8.1f} {r['shared_limit'] // 1024:>5}")
        return
    show_masks()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    B, H, Hkv, T, D, G = 2, 4, 2, 96, 32, 24
    q = torch.randn(B, H, T, D, device=device, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, device=device, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, device=device, requires_grad=True)
    runs = "Triton (interpreter)" if INTERPRET else "Triton" if device == "cuda" else "the PyTorch reference"
    print(f"\ns2_attention on {device} runs {runs}; B={B} H={H} Hkv={Hkv} T={T} D={D} G={G}, fp32")
    grad_out = torch.randn(B, H, T, D, device=device)
    out = s2_attention(q, k, v, G, block_sizes=(32, 16))
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = s2_attention_reference(q, k, v, G)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        print(f"  {name}: max |kernel - reference| = {(a - b).abs().max().item():.2e}")


if __name__ == "__main__":
    cli.run(main)
