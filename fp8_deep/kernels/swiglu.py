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
* ``SAVE_INPUT`` (training): the same launch also writes the FP8 cache of h itself, ``reference.quantize_gate_up``
  (gate and up quantized in 1 x GROUP groups each, from the values just loaded: one read of h). Its inputs are h's
  own values, so its bytes are the reference's exactly on every backend.

The backward, ``silu_mul_bwd_quant_kernel``, recomputes SwiGLU from that cache (DeepSeek-V3, section 3.3) and writes
the three FP8 operands of the backward GEMMs. Per element, float32 and in the reference's order of operations
(``reference.silu_mul_backward``): ``gate = q * s``, ``up = q * s`` (the cache dequantized), ``sig = 1 / (1 +
exp(-gate))`` (``div_rn``; libdevice ``expf`` on the GPU, as torch's CUDA sigmoid; numpy's exp under the
interpreter), ``wg = w * g``, ``dgate = (wg * up) * (sig * (1 + gate * (1 - sig)))``, ``dup = wg * (gate * sig)``,
``a = (gate * sig) * up``. The launch turns off FMA contraction (``enable_fp_fusion=False``): ``1 + gate * (1 -
sig)`` contracted to one FMA rounds once where torch's eager ops round twice. Only the exp can differ from torch's
CPU sigmoid (its own vectorized exp): in the last bit, rarely.
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .quant import _amax_nan, _group_q, _group_scale, _max_nan, _quant_groups
from .pdl import pdl_prologue


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
def _silu_mul(g32, up32, ACCURATE_EXP: tl.constexpr, IS_BF16: tl.constexpr):
    """``silu(gate).to(h.dtype) * up`` rounded to h.dtype (float32 in and out, values of h.dtype): the module
    docstring's first step, shared by every kernel that forms SwiGLU so that their bytes agree."""
    if ACCURATE_EXP:
        e = libdevice.exp(-g32)
    else:
        e = tl.exp(-g32)
    silu = _round_to(tl.math.div_rn(g32, 1.0 + e), IS_BF16)
    return _round_to(silu * up32, IS_BF16)


@triton.jit
def silu_mul_quant_kernel(
    # pointers
    h_ptr, m_ptr, q_ptr, s_ptr, qh_ptr, sh_ptr,
    # sizes
    M, I, G,
    # strides (qh, sh: the FP8 cache of h, (M, 2I) and (M, 2G); unused unless SAVE_INPUT)
    stride_hm, stride_hk, stride_qm, stride_qk, stride_sm, stride_sg, stride_qhm, stride_qhk, stride_shm, stride_shg,
    # numerics
    EPS: tl.constexpr, FP8_MAX: tl.constexpr, UE8M0: tl.constexpr, ACCURATE_EXP: tl.constexpr,
    IS_BF16: tl.constexpr, FMA_DIV: tl.constexpr, NAN_MAX: tl.constexpr, NAN_SELECT: tl.constexpr,
    # meta
    HAS_M: tl.constexpr, SAVE_INPUT: tl.constexpr, GROUP: tl.constexpr, GROUP_POW2: tl.constexpr,
    GROUPS_PER_PROG: tl.constexpr, BLOCK_M: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # wait for / release the neighbouring launches (kernels/pdl.py)
):
    """Grid: (cdiv(M, BLOCK_M), cdiv(G, GROUPS_PER_PROG)). Tile [BLOCK_M, GROUPS_PER_PROG, GROUP_POW2]."""
    pdl_prologue(USE_PDL)
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
    if SAVE_INPUT:
        # the cache: gate at columns cols, up at I + cols; gate's scales at groups, up's at G + groups
        qh_ptrs = qh_ptr + rows64[:, None, None] * stride_qhm + cols64[None, :, :] * stride_qhk
        sh_ptrs = sh_ptr + rows64[:, None] * stride_shm + groups[None, :].to(tl.int64) * stride_shg
    if tl.max(live.to(tl.int32), axis=0) == 0:
        # every row of the tile is padding (most of a small batch's 16-row segments): zeros, no loads, no math
        zq = tl.zeros((BLOCK_M, GROUPS_PER_PROG, GROUP_POW2), tl.float32).to(q_ptr.dtype.element_ty)
        zs = tl.zeros((BLOCK_M, GROUPS_PER_PROG), tl.float32)
        tl.store(q_ptrs, zq, mask=st_mask)
        tl.store(s_ptrs, zs, mask=s_mask)
        if SAVE_INPUT:
            tl.store(qh_ptrs, zq, mask=st_mask)
            tl.store(qh_ptrs + I * stride_qhk, zq, mask=st_mask)
            tl.store(sh_ptrs, zs, mask=s_mask)
            tl.store(sh_ptrs + G * stride_shg, zs, mask=s_mask)
    else:
        ld_mask = live[:, None, None] & cmask[None, :, :]
        h_row = h_ptr + rows64[:, None, None] * stride_hm
        gate = tl.load(h_row + cols64[None, :, :] * stride_hk, mask=ld_mask, other=0.0)
        up = tl.load(h_row + (cols64[None, :, :] + I) * stride_hk, mask=ld_mask, other=0.0)

        g32 = gate.to(tl.float32)
        y = _silu_mul(g32, up.to(tl.float32), ACCURATE_EXP, IS_BF16)

        # the activation quantizer's group math (same bytes as quantize_activation(y)); padding rows get zeros
        qf, s = _quant_groups(y, 2, FP8_MAX, EPS, UE8M0, FMA_DIV, NAN_MAX, NAN_SELECT)
        qf = tl.where(live[:, None, None], qf, 0.0)
        s = tl.where(live[:, None], s, 0.0)

        tl.store(q_ptrs, qf.to(q_ptr.dtype.element_ty), mask=st_mask)
        tl.store(s_ptrs, s, mask=s_mask)

        if SAVE_INPUT:
            # quantize_gate_up(h): each half's groups from the values loaded above (lanes past I hold 0, which never
            # raises an amax: the last group of a ragged I covers only its real columns)
            for half in tl.static_range(2):
                if half == 0:
                    hq, hs = _quant_groups(g32, 2, FP8_MAX, EPS, UE8M0, FMA_DIV, NAN_MAX, NAN_SELECT)
                else:
                    hq, hs = _quant_groups(up.to(tl.float32), 2, FP8_MAX, EPS, UE8M0, FMA_DIV, NAN_MAX, NAN_SELECT)
                hq = tl.where(live[:, None, None], hq, 0.0)
                hs = tl.where(live[:, None], hs, 0.0)
                tl.store(qh_ptrs + (half * I) * stride_qhk, hq.to(qh_ptr.dtype.element_ty), mask=st_mask)
                tl.store(sh_ptrs + (half * G) * stride_shg, hs, mask=s_mask)


# ------------------------------------------------------------------------------------------------ backward
@triton.jit
def _amax_combine(acc, x, AXIS: tl.constexpr, NAN_MAX: tl.constexpr):
    """``acc`` and the ``_amax_nan`` of ``x`` along AXIS, merged without losing a NaN (the interpreter's path has
    already folded NaN into +Inf, where a plain max keeps it)."""
    part = _amax_nan(x, AXIS, NAN_MAX)
    if NAN_MAX:
        return _max_nan(acc, part)
    else:
        return tl.maximum(acc, part)


@triton.jit
def _swiglu_bwd_tile(qh_ptr, ga_ptr, rows64, j, ld_mask, s_gate, s_up, w, I,
                     stride_qhm, stride_qhk, stride_gam, stride_gak, ACCURATE_EXP: tl.constexpr):
    """(dgate, dup, a, g) float32 of columns ``j`` of the rows: the cache dequantized with the scales ``s_gate``,
    ``s_up`` (broadcast), the gradient ``g`` and the row weights ``w`` ([BLOCK_M, 1]). Masked-off elements read 0
    and give 0 in all four. The order of operations is ``reference.silu_mul_backward``'s (module docstring)."""
    j64 = j.to(tl.int64)
    qrow = qh_ptr + rows64[:, None] * stride_qhm
    gate = tl.load(qrow + j64[None, :] * stride_qhk, mask=ld_mask, other=0.0).to(tl.float32) * s_gate
    up = tl.load(qrow + (j64[None, :] + I) * stride_qhk, mask=ld_mask, other=0.0).to(tl.float32) * s_up
    g = tl.load(ga_ptr + rows64[:, None] * stride_gam + j64[None, :] * stride_gak, mask=ld_mask,
                other=0.0).to(tl.float32)
    if ACCURATE_EXP:
        e = libdevice.exp(-gate)
    else:
        e = tl.exp(-gate)
    sig = tl.math.div_rn(1.0, 1.0 + e)
    silu = gate * sig
    wg = w * g
    dgate = (wg * up) * (sig * (1.0 + gate * (1.0 - sig)))
    dup = wg * silu
    a = silu * up
    return dgate, dup, a, g


@triton.jit
def _dh_window(qh_ptr, sh_ptr, ga_ptr, rows64, live, w, c, I, G,
               stride_qhm, stride_qhk, stride_shm, stride_shg, stride_gam, stride_gak, ACCURATE_EXP: tl.constexpr,
               GROUP: tl.constexpr):
    """dh = [dgate | dup] at columns ``c`` of the full 2I row, whichever half each column falls in (a ragged I's
    group straddles gate and up). Each element's cache scales are gathered (groups of the half it belongs to)."""
    cmask = c < 2 * I
    is_gate = c < I
    j = tl.where(is_gate, c, c - I)
    jg = (j // GROUP).to(tl.int64)
    ld_mask = live[:, None] & cmask[None, :]
    srow = sh_ptr + rows64[:, None] * stride_shm
    s_gate = tl.load(srow + jg[None, :] * stride_shg, mask=ld_mask, other=0.0)
    s_up = tl.load(srow + (jg[None, :] + G) * stride_shg, mask=ld_mask, other=0.0)
    dgate, dup, _a, _g = _swiglu_bwd_tile(qh_ptr, ga_ptr, rows64, j, ld_mask, s_gate, s_up, w, I,
                                          stride_qhm, stride_qhk, stride_gam, stride_gak, ACCURATE_EXP)
    return tl.where(is_gate[None, :], dgate, dup)


@triton.jit
def _store_t(x, j, rows64, rmask, jmask, q_ptr, s_ptr, pid_m, stride_qc, stride_qm, stride_sc, stride_sg,
             FP8_MAX: tl.constexpr, EPS: tl.constexpr, UE8M0: tl.constexpr, FMA_DIV: tl.constexpr,
             NAN_MAX: tl.constexpr, NAN_SELECT: tl.constexpr):
    """A (BLOCK_M rows, columns j) tile quantized in BLOCK_M x 1 groups (one per column: the tile's rows are one
    group) and stored transposed: q_t[j, rows] (coalesced along M), s_t[j, pid_m]."""
    q, s = _quant_groups(x, 0, FP8_MAX, EPS, UE8M0, FMA_DIV, NAN_MAX, NAN_SELECT)
    j64 = j.to(tl.int64)
    tl.store(q_ptr + j64[None, :] * stride_qc + rows64[:, None] * stride_qm, q.to(q_ptr.dtype.element_ty),
             mask=rmask[:, None] & jmask[None, :])
    tl.store(s_ptr + j64 * stride_sc + pid_m.to(tl.int64) * stride_sg, s, mask=jmask)


@triton.jit
def silu_mul_bwd_quant_kernel(
    # pointers: inputs (q_h, s_h the FP8 cache of h; grad_a; row weights; m_indices), then the outputs and the
    # per-column-chunk partial sums of the row-weight gradient
    qh_ptr, sh_ptr, ga_ptr, rw_ptr, m_ptr,
    qd_ptr, sd_ptr, qdt_ptr, sdt_ptr, qwt_ptr, swt_ptr, part_ptr,
    # sizes: I columns of a / gate / up, G = ceil(I / GROUP) cache groups per half, NP column programs
    M, I, G, NP,
    # strides (elements)
    stride_qhm, stride_qhk, stride_shm, stride_shg, stride_gam, stride_gak, stride_rw, stride_mi,
    stride_qdm, stride_qdk, stride_sdm, stride_sdg,
    stride_qdtc, stride_qdtm, stride_sdtc, stride_sdtg,
    stride_qwtc, stride_qwtm, stride_swtc, stride_swtg,
    stride_pm, stride_pp,
    # numerics
    EPS: tl.constexpr, FP8_MAX: tl.constexpr, UE8M0: tl.constexpr, ACCURATE_EXP: tl.constexpr,
    FMA_DIV: tl.constexpr, NAN_MAX: tl.constexpr, NAN_SELECT: tl.constexpr,
    # meta: a program owns BLOCK_M (= GROUP) rows x the GROUP columns [p * GROUP, (p + 1) * GROUP) of I, walked in
    # SUB-column tiles; RAGGED: I % GROUP != 0 (dh's 1 x GROUP groups along 2I straddle gate and up)
    HAS_M: tl.constexpr, RAGGED: tl.constexpr, GROUP: tl.constexpr, SUB: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Grid (NP, cdiv(M, BLOCK_M)), NP = ceil(I / GROUP). Two passes over the program's SUB-column tiles, both
    computing the tile from the cache (the second recomputes instead of holding a 128 x 128 tile of each output in
    registers):

    1. every column's BLOCK_M x 1 groups are complete in one tile: dh's gate and up columns and ``w * a`` are
       quantized and stored transposed right away; the row sums of ``g * a`` and (I % GROUP == 0) the row amax of
       dh's two 1 x GROUP groups (gate columns p, up columns G + p) accumulate across tiles;
    2. dh's row groups quantized with those scales. With a ragged I the row groups are dh's 2I-column groups p and
       NP + p, each walked twice (amax, then cast) with ``_dh_window``.
    """
    pid_p = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    if HAS_M:
        live = rmask & (tl.load(m_ptr + rows64 * stride_mi, mask=rmask, other=-1) >= 0)
    else:
        live = rmask
    w = tl.load(rw_ptr + rows64 * stride_rw, mask=live, other=0.0)[:, None]
    srow = sh_ptr + rows64 * stride_shm
    s_gate = tl.load(srow + pid_p.to(tl.int64) * stride_shg, mask=live, other=0.0)[:, None]
    s_up = tl.load(srow + (pid_p + G).to(tl.int64) * stride_shg, mask=live, other=0.0)[:, None]
    lanes = tl.arange(0, SUB)

    # pass 1: transposed outputs, row sums, row amax
    grw = tl.zeros((BLOCK_M,), tl.float32)
    amax_gate = tl.zeros((BLOCK_M,), tl.float32)
    amax_up = tl.zeros((BLOCK_M,), tl.float32)
    for k in range(GROUP // SUB):
        j = pid_p * GROUP + k * SUB + lanes
        jmask = j < I
        dgate, dup, a, g = _swiglu_bwd_tile(qh_ptr, ga_ptr, rows64, j, live[:, None] & jmask[None, :], s_gate,
                                            s_up, w, I, stride_qhm, stride_qhk, stride_gam, stride_gak, ACCURATE_EXP)
        grw += tl.sum(g * a, axis=1)
        _store_t(dgate, j, rows64, rmask, jmask, qdt_ptr, sdt_ptr, pid_m, stride_qdtc, stride_qdtm, stride_sdtc,
                 stride_sdtg, FP8_MAX, EPS, UE8M0, FMA_DIV, NAN_MAX, NAN_SELECT)
        _store_t(dup, j + I, rows64, rmask, jmask, qdt_ptr, sdt_ptr, pid_m, stride_qdtc, stride_qdtm, stride_sdtc,
                 stride_sdtg, FP8_MAX, EPS, UE8M0, FMA_DIV, NAN_MAX, NAN_SELECT)
        _store_t(w * a, j, rows64, rmask, jmask, qwt_ptr, swt_ptr, pid_m, stride_qwtc, stride_qwtm, stride_swtc,
                 stride_swtg, FP8_MAX, EPS, UE8M0, FMA_DIV, NAN_MAX, NAN_SELECT)
        if not RAGGED:
            amax_gate = _amax_combine(amax_gate, dgate, 1, NAN_MAX)
            amax_up = _amax_combine(amax_up, dup, 1, NAN_MAX)
    tl.store(part_ptr + rows64 * stride_pm + pid_p.to(tl.int64) * stride_pp, grw, mask=rmask)

    # pass 2: dh's 1 x GROUP row groups
    if not RAGGED:
        sc_gate, bad_gate = _group_scale(amax_gate, FP8_MAX, EPS, UE8M0)
        sc_up, bad_up = _group_scale(amax_up, FP8_MAX, EPS, UE8M0)
        for k in range(GROUP // SUB):
            j = pid_p * GROUP + k * SUB + lanes
            jmask = j < I
            dgate, dup, a, g = _swiglu_bwd_tile(qh_ptr, ga_ptr, rows64, j, live[:, None] & jmask[None, :], s_gate,
                                                s_up, w, I, stride_qhm, stride_qhk, stride_gam, stride_gak,
                                                ACCURATE_EXP)
            st_mask = rmask[:, None] & jmask[None, :]
            qd_ptrs = qd_ptr + rows64[:, None] * stride_qdm + j.to(tl.int64)[None, :] * stride_qdk
            tl.store(qd_ptrs, _group_q(dgate, sc_gate[:, None], bad_gate[:, None], FMA_DIV,
                                       NAN_SELECT).to(qd_ptr.dtype.element_ty), mask=st_mask)
            tl.store(qd_ptrs + I * stride_qdk, _group_q(dup, sc_up[:, None], bad_up[:, None], FMA_DIV,
                                                        NAN_SELECT).to(qd_ptr.dtype.element_ty), mask=st_mask)
        sd_row = sd_ptr + rows64 * stride_sdm
        tl.store(sd_row + pid_p.to(tl.int64) * stride_sdg, sc_gate, mask=rmask)
        tl.store(sd_row + (pid_p + G).to(tl.int64) * stride_sdg, sc_up, mask=rmask)
    else:
        n_dh = (2 * I + GROUP - 1) // GROUP
        for half in tl.static_range(2):
            grp = pid_p + half * NP
            if grp < n_dh:
                amax = tl.zeros((BLOCK_M,), tl.float32)
                for k in range(GROUP // SUB):
                    c = grp * GROUP + k * SUB + lanes
                    dh = _dh_window(qh_ptr, sh_ptr, ga_ptr, rows64, live, w, c, I, G, stride_qhm, stride_qhk,
                                    stride_shm, stride_shg, stride_gam, stride_gak, ACCURATE_EXP, GROUP)
                    amax = _amax_combine(amax, dh, 1, NAN_MAX)
                sc, bad = _group_scale(amax, FP8_MAX, EPS, UE8M0)
                for k in range(GROUP // SUB):
                    c = grp * GROUP + k * SUB + lanes
                    dh = _dh_window(qh_ptr, sh_ptr, ga_ptr, rows64, live, w, c, I, G, stride_qhm, stride_qhk,
                                    stride_shm, stride_shg, stride_gam, stride_gak, ACCURATE_EXP, GROUP)
                    tl.store(qd_ptr + rows64[:, None] * stride_qdm + c.to(tl.int64)[None, :] * stride_qdk,
                             _group_q(dh, sc[:, None], bad[:, None], FMA_DIV, NAN_SELECT).to(qd_ptr.dtype.element_ty),
                             mask=rmask[:, None] & (c < 2 * I)[None, :])
                tl.store(sd_ptr + rows64 * stride_sdm + grp.to(tl.int64) * stride_sdg, sc, mask=rmask)


@triton.jit
def row_sum_kernel(
    # pointers: x (M, N) float32 -> out (M,) float32
    x_ptr, out_ptr,
    # sizes
    M, N,
    # strides
    stride_xm, stride_xn, stride_o,
    # meta: BLOCK_R rows per program, N_POW2 >= N columns in one tile
    BLOCK_R: tl.constexpr, N_POW2: tl.constexpr,
):
    """Row sums in a fixed order (one tile, ``tl.sum``'s reduction tree): the same bits on every run."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, N_POW2)
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xn,
                mask=(rows[:, None] < M) & (cols[None, :] < N), other=0.0)
    tl.store(out_ptr + rows64 * stride_o, tl.sum(x, axis=1), mask=rows < M)
