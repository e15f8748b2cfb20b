"""SwiGLU + 1 x GROUP FP8 re-quantization of the first grouped GEMM's output, fused (one read of h, one write of q).

Numerics, each step as the reference composes them (``reference.quantize_activation(reference.silu_mul(h))``):

* ``y = (silu(gate_f32) rounded to h.dtype) * up`` rounded to h.dtype: vLLM's rounding. ``silu(x) = x / (1 +
  exp(-x))`` with an IEEE division (``div_rn``; Triton's ``/`` is approximate on the GPU) and, on the GPU, libdevice's
  ``expf`` (what torch's CUDA silu calls) instead of Triton's ``ex2.approx``-based ``tl.exp``; under the CPU
  interpreter ``tl.exp`` is numpy's. torch's CPU silu uses its own vectorized exp, so y can differ from the reference
  by one ulp of h.dtype where the exps differ in the last bit.
* then the activation quantizer's group math (``fp8_deep.kernels.quant._quant_groups``, bit-identical to
  vLLM's ``per_token_group_quant_fp8``): ``amax = max(max|y|, eps)``, ``s = amax / 448``, optional UE8M0 round-up,
  ``q = fp8(clamp(y / s, -448, 448))`` with a correctly rounded division.
* A group holding NaN/Inf gets scale NaN and all-NaN q; padding rows (``m_indices < 0``) get q = 0 and scale 0
  without h being read.
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .quant import _quant_groups


@triton.jit
def _round_to(x, IS_BF16: tl.constexpr):
    """float32 -> nearest-even value of the hidden dtype, kept in float32.

    bfloat16 by bit arithmetic (exact on every backend; the CPU interpreter's own float32 -> bfloat16 cast truncates),
    float16 by the cast (correct everywhere)."""
    if IS_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))
    else:
        return x.to(tl.float16).to(tl.float32)


@triton.jit
def silu_mul_quant_kernel(
    # pointers
    h_ptr, m_ptr, q_ptr, s_ptr,
    # sizes
    M, I, G,
    # strides
    stride_hm, stride_hk, stride_qm, stride_qk, stride_sm, stride_sg,
    # numerics
    EPS: tl.constexpr, FP8_MAX: tl.constexpr, UE8M0: tl.constexpr, ACCURATE_EXP: tl.constexpr,
    IS_BF16: tl.constexpr, FMA_DIV: tl.constexpr, NAN_MAX: tl.constexpr, NAN_SELECT: tl.constexpr,
    # meta
    HAS_M: tl.constexpr, GROUP: tl.constexpr, GROUP_POW2: tl.constexpr, GROUPS_PER_PROG: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Grid: (cdiv(M, BLOCK_M), cdiv(G, GROUPS_PER_PROG)). Tile [BLOCK_M, GROUPS_PER_PROG, GROUP_POW2]."""
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    groups = pid_g * GROUPS_PER_PROG + tl.arange(0, GROUPS_PER_PROG)
    lanes = tl.arange(0, GROUP_POW2)
    rmask = rows < M
    if HAS_M:
        live = rmask & (tl.load(m_ptr + rows, mask=rmask, other=-1) >= 0)
    else:
        live = rmask
    cols = groups[:, None] * GROUP + lanes[None, :]                       # [GPP, GP2]
    cmask = (groups[:, None] < G) & (lanes[None, :] < GROUP) & (cols < I)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    st_mask = rmask[:, None, None] & cmask[None, :, :]
    q_ptrs = q_ptr + rows64[:, None, None] * stride_qm + cols64[None, :, :] * stride_qk
    s_ptrs = s_ptr + rows64[:, None] * stride_sm + groups[None, :].to(tl.int64) * stride_sg
    s_mask = rmask[:, None] & (groups[None, :] < G)
    if tl.max(live.to(tl.int32), axis=0) == 0:
        # every row of the tile is padding (most of a small batch's 16-row segments): zeros, no loads, no math
        tl.store(q_ptrs, tl.zeros((BLOCK_M, GROUPS_PER_PROG, GROUP_POW2), tl.float32).to(q_ptr.dtype.element_ty),
                 mask=st_mask)
        tl.store(s_ptrs, tl.zeros((BLOCK_M, GROUPS_PER_PROG), tl.float32), mask=s_mask)
    else:
        ld_mask = live[:, None, None] & cmask[None, :, :]
        h_row = h_ptr + rows64[:, None, None] * stride_hm
        gate = tl.load(h_row + cols64[None, :, :] * stride_hk, mask=ld_mask, other=0.0)
        up = tl.load(h_row + (cols64[None, :, :] + I) * stride_hk, mask=ld_mask, other=0.0)

        g32 = gate.to(tl.float32)
        if ACCURATE_EXP:
            e = libdevice.exp(-g32)
        else:
            e = tl.exp(-g32)
        silu = _round_to(tl.math.div_rn(g32, 1.0 + e), IS_BF16)
        y = _round_to(silu * up.to(tl.float32), IS_BF16)  # silu(gate).to(h.dtype) * up, rounded to h.dtype as torch

        # the activation quantizer's group math (same bytes as quantize_activation(y)); padding rows get zeros
        qf, s = _quant_groups(y, 2, FP8_MAX, EPS, UE8M0, FMA_DIV, NAN_MAX, NAN_SELECT)
        qf = tl.where(live[:, None, None], qf, 0.0)
        s = tl.where(live[:, None], s, 0.0)

        tl.store(q_ptrs, qf.to(q_ptr.dtype.element_ty), mask=st_mask)
        tl.store(s_ptrs, s, mask=s_mask)
