"""SwiGLU with FP8 outputs (numerics in ``fp8_deep.kernels.swiglu``).

``silu_mul_quantize``: SwiGLU of the first grouped GEMM's output fused with the 1 x 128 FP8 re-quantization that feeds
the second grouped GEMM; with ``save_input=True`` the same launch also writes the FP8 cache of its input that training
keeps for the backward (DeepSeek-V3: "we cache the inputs of the SwiGLU operator and recompute its output in the
backward pass ... stored in FP8").

``silu_mul_backward_quantize``: the backward from that cache, SwiGLU recomputed, writing the FP8 operands of the three
backward GEMMs (dgrad of GEMM1, wgrad of w13 and of w2) and the router-weight gradient in one pass.
"""
from __future__ import annotations

import os

from typing import Optional, Tuple

import torch

from .. import reference
from ..kernels.swiglu import row_sum_kernel, silu_mul_bwd_quant_kernel, silu_mul_quant_kernel
from ..numerics import (ACT_EPS, BLOCK, FP8_DTYPE, FP8_MAX, SCALE_FMTS, SCALE_LAYOUTS, cdiv, interpreter_active,
                        is_pow2, use_triton)
from ._checks import check_choice, check_eps, check_out, check_outputs_disjoint, check_tensor
from ._launch import FP_FUSION, on_input_device, pdl
from .layout import alloc_scales, scale_strides
from .quant import gpu_fast_paths

__all__ = ["silu_mul_quantize", "silu_mul_quantize_ref", "silu_mul_backward_quantize",
           "silu_mul_backward_quantize_ref"]


# the spec lives in fp8_deep.reference (re-exported under its old name for the tests)
silu_mul_quantize_ref = reference.silu_mul_quantize


def _gate_up_split(t: torch.Tensor, name: str, group_size: int):
    """``(M, I, G)`` of a ``(M, 2I)`` ``[gate | up]`` tensor: rows, the intermediate size and the 1x``group_size``
    groups of each half (a group never straddles the two)."""
    M, two_i = t.shape
    if two_i % 2:
        raise ValueError(f"{name} must be (M, 2I) = [gate | up], got an odd last dimension: shape {tuple(t.shape)}")
    return M, two_i // 2, cdiv(two_i // 2, group_size)


@on_input_device
def silu_mul_quantize(h: torch.Tensor, *, m_indices: Optional[torch.Tensor] = None, group_size: int = BLOCK,
                      scale_fmt: str = "fp32", scale_layout: str = "tma_aligned", eps: float = ACT_EPS,
                      out: Optional[Tuple[torch.Tensor, ...]] = None, save_input: bool = False):
    """``y = silu(gate).to(h.dtype) * up`` quantized to FP8 in 1 x ``group_size`` groups, in one pass.

    Args:
        h: bfloat16/float16 ``(M, 2I)`` = ``[gate | up]`` (gate = first I columns), any strides. ``I`` need not be
            a multiple of ``group_size`` (the last group covers what is left).
        m_indices: optional int32 ``(M,)`` (the plan's): rows with ``m_indices < 0`` are padding and get ``q = 0``,
            scale 0, without reading ``h``.
        group_size: a power of two >= 16; scale_fmt: ``"fp32"`` or ``"ue8m0"``; eps: amax floor.
        scale_layout: ``"tma_aligned"`` (DeepGEMM's MN-major LHS layout, strides ``(1, align(M, 4))``) or
            ``"row_major"``.
        out: optional caller-owned ``(q, scale)`` (``(q, scale, q_h, s_h)`` with ``save_input``) with exactly the
            shapes/strides below.
        save_input: also return the FP8 cache of ``h`` for the backward (``silu_mul_backward_quantize``), written by
            the same launch from the same read of ``h``.

    Returns:
        ``(q, scale)``: float8_e4m3fn ``(M, I)`` contiguous and float32 ``(M, ceil(I/group_size))`` dequantization
        scales (``y ~= q * scale``) in ``scale_layout``; a group holding NaN/Inf gets scale NaN and all-NaN ``q``.
        With ``save_input``: ``(q, scale, q_h, s_h)``, ``(q_h, s_h)`` bit for bit ``reference.quantize_gate_up(h,
        group_size, scale_fmt, eps)``: float8_e4m3fn ``(M, 2I)`` contiguous and float32 ``(M, 2G)`` row-major,
        ``G = ceil(I/group_size)``, the gate's groups in columns ``[0, G)``, the up projection's in ``[G, 2G)`` (a
        group never straddles the two); padding rows get ``q_h = 0``, ``s_h = 0``. One launch.
    """
    check_tensor(h, "h", dtypes=(torch.bfloat16, torch.float16), dims=(2,))
    check_choice(scale_fmt, "scale_fmt", SCALE_FMTS)
    check_choice(scale_layout, "scale_layout", SCALE_LAYOUTS)
    if group_size < 16 or not is_pow2(group_size):
        raise ValueError(f"group_size must be a power of two >= 16, got {group_size}")
    check_eps(eps)
    M, I, G = _gate_up_split(h, "h", group_size)
    two_i = 2 * I
    if m_indices is not None:
        check_tensor(m_indices, "m_indices", dtypes=(torch.int32,), dims=(1,), device=h.device)
        if m_indices.shape[0] != M:
            raise ValueError(f"m_indices must have {M} entries (rows of h), got {m_indices.shape[0]}")
    if type(save_input) is not bool:
        raise TypeError(f"save_input must be a bool, got {save_input!r}")
    n_out = 4 if save_input else 2
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != n_out:
            raise ValueError(f"out must be a tuple of {n_out} tensors (q, scale{', q_h, s_h' if save_input else ''})")
        q, s = out[0], out[1]
        check_out(q, "out[0]", (M, I), FP8_DTYPE, h.device, strides=(I, 1))
        check_out(s, "out[1]", (M, G), torch.float32, h.device, strides=scale_strides((M, G), scale_layout))
        outs = [("out[0]", q), ("out[1]", s)]
        if save_input:
            qh, sh = out[2], out[3]
            check_out(qh, "out[2]", (M, two_i), FP8_DTYPE, h.device, strides=(two_i, 1))
            check_out(sh, "out[3]", (M, 2 * G), torch.float32, h.device, strides=(2 * G, 1))
            outs += [("out[2]", qh), ("out[3]", sh)]
        check_outputs_disjoint([("h", h)] + ([("m_indices", m_indices)] if m_indices is not None else []), outs)
    else:
        q = torch.empty((M, I), dtype=FP8_DTYPE, device=h.device)
        s = alloc_scales((M, G), scale_layout, h.device)
        if save_input:
            qh = torch.empty((M, two_i), dtype=FP8_DTYPE, device=h.device)
            sh = torch.empty((M, 2 * G), dtype=torch.float32, device=h.device)
    res = (q, s, qh, sh) if save_input else (q, s)
    if M == 0 or I == 0:
        return res

    if not use_triton(h):
        rq, rs = silu_mul_quantize_ref(h, group_size, scale_fmt, eps)
        if m_indices is not None:
            pad = (m_indices < 0)[:, None]
            rq = torch.where(pad, torch.zeros_like(rq.view(torch.uint8)), rq.view(torch.uint8)).view(FP8_DTYPE)
            rs = torch.where(pad, torch.zeros_like(rs), rs)
        q.copy_(rq)
        s.copy_(rs)
        if save_input:
            rqh, rsh = reference.quantize_gate_up(h, group_size, scale_fmt, eps)
            if m_indices is not None:
                rqh = _zero_rows(rqh, pad)
                rsh = _zero_rows(rsh, pad)
            qh.copy_(rqh)
            sh.copy_(rsh)
        return res

    gp2 = max(16, 1 << (group_size - 1).bit_length())
    groups_per_prog = min(4, 1 << max(0, (G - 1).bit_length()))
    block_m = 4 if M >= 1024 else 2
    grid = (cdiv(M, block_m), cdiv(G, groups_per_prog))
    silu_mul_quant_kernel[grid](
        h, m_indices if m_indices is not None else h, q, s, qh if save_input else q, sh if save_input else s,
        M, I, G,
        h.stride(0), h.stride(1), q.stride(0), q.stride(1), s.stride(0), s.stride(1),
        *(qh.stride() + sh.stride() if save_input else (0, 0, 0, 0)),
        EPS=eps, FP8_MAX=FP8_MAX, UE8M0=scale_fmt == "ue8m0", ACCURATE_EXP=h.is_cuda and not interpreter_active(),
        IS_BF16=h.dtype == torch.bfloat16, **gpu_fast_paths(h),
        HAS_M=m_indices is not None, SAVE_INPUT=save_input, GROUP=group_size, GROUP_POW2=gp2,
        GROUPS_PER_PROG=groups_per_prog,
        BLOCK_M=block_m, num_warps=4, **FP_FUSION, **pdl(h),
    )
    return res


def _zero_rows(t: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """``t`` with the rows where ``pad`` ((M, 1) bool) holds set to zero bytes (FP8 through its uint8 view)."""
    if t.dtype == FP8_DTYPE:
        u = t.view(torch.uint8)
        return torch.where(pad, torch.zeros_like(u), u).view(FP8_DTYPE)
    return torch.where(pad, torch.zeros_like(t), t)


# --------------------------------------------------------------------------------------------------------- backward
BWD_CONFIG_ENV = "FP8_DEEP_SWIGLU_BWD_CONFIG"
# a program's block is group_size rows x group_size columns; expert segments start at multiples of 128
MAX_BWD_GROUP = 128


def silu_mul_backward_quantize_ref(q_h: torch.Tensor, s_h: torch.Tensor, grad_a: torch.Tensor,
                                   row_weights: torch.Tensor, m_indices: Optional[torch.Tensor] = None,
                                   group_size: int = BLOCK, scale_fmt: str = "fp32", eps: float = ACT_EPS):
    """The spec of ``silu_mul_backward_quantize``, composed of ``fp8_deep.reference`` functions (float32 math):
    ``h_c = dequantize_gate_up(q_h, s_h)``, ``g = grad_a.float()``, ``(dh, a) = silu_mul_backward(h_c, w * g)``,
    then ``quantize_activation(dh)``, ``quantize_activation_t(dh)``, ``quantize_activation_t(w * a)`` and
    ``sum(g * a, -1)``. Padding rows (``m_indices < 0``) count as ``h_c = g = w = 0`` (their inputs are never
    used). Same outputs and order as the op; every scale row-major."""
    h_c = reference.dequantize_gate_up(q_h, s_h, group_size)
    g = grad_a.float()
    w = row_weights.float()
    if m_indices is not None:
        live = m_indices >= 0
        h_c = torch.where(live[:, None], h_c, torch.zeros_like(h_c))
        g = torch.where(live[:, None], g, torch.zeros_like(g))
        w = torch.where(live, w, torch.zeros_like(w))
    dh, a = reference.silu_mul_backward(h_c, w[:, None] * g)
    q_dh, s_dh = reference.quantize_activation(dh, group_size, scale_fmt, eps)
    q_dh_t, s_dh_t = reference.quantize_activation_t(dh, None, group_size, scale_fmt, eps)
    q_wa_t, s_wa_t = reference.quantize_activation_t(w[:, None] * a, None, group_size, scale_fmt, eps)
    return q_dh, s_dh, q_dh_t, s_dh_t, q_wa_t, s_wa_t, (g * a).sum(-1)


def _bwd_config(group_size: int):
    """(SUB, num_warps): the column tile a program walks its 128 x 128 block in, and its warps. A 128 x 32 tile with
    8 warps holds ~16 values of each of gate, up, g, dgate, dup, a per thread (a full 128 x 128 tile would spill).
    Not tuned on a GPU yet: ``FP8_DEEP_SWIGLU_BWD_CONFIG="SUB,num_warps"`` pins one for a sweep."""
    val = os.environ.get(BWD_CONFIG_ENV)
    if val:
        parts = [int(v) for v in val.split(",")]
        if len(parts) != 2 or not is_pow2(parts[0]) or parts[1] not in (1, 2, 4, 8, 16):
            raise ValueError(f"{BWD_CONFIG_ENV}={val!r}: expected 'SUB,num_warps' with SUB a power of two and "
                             f"num_warps in 1, 2, 4, 8, 16")
        return min(parts[0], group_size), parts[1]
    return min(32, group_size), 8


@on_input_device
def silu_mul_backward_quantize(q_h: torch.Tensor, s_h: torch.Tensor, grad_a: torch.Tensor,
                               row_weights: torch.Tensor, *, m_indices: Optional[torch.Tensor] = None,
                               group_size: int = BLOCK, scale_fmt: str = "fp32", eps: float = ACT_EPS,
                               dh_scale_layout: str = "tma_aligned", t_scale_layout: str = "tma_aligned",
                               out: Optional[Tuple[torch.Tensor, ...]] = None):
    """Backward of ``a = silu(gate) * up`` from the FP8 cache of ``h``, SwiGLU recomputed, with the FP8 operands of
    the three backward GEMMs written by one pass (two launches: the pass and a fixed-order row sum).

    Args:
        q_h, s_h: the cache, as ``silu_mul_quantize(..., save_input=True)`` returns it: float8_e4m3fn ``(M, 2I)``
            and float32 ``(M, 2G)``, ``G = ceil(I/group_size)`` (gate's groups, then up's), any strides.
        grad_a: bfloat16/float16 ``(M, I)``, any strides: the gradient w.r.t. ``a`` on *unweighted* rows (the dgrad
            GEMM of GEMM2's output).
        row_weights: float32 ``(M,)``: each row's router weight (0 on padding rows).
        m_indices: optional int32 ``(M,)``: rows with ``m_indices < 0`` are padding; nothing of theirs is read and
            they count as ``dh = 0``, ``a = 0``.
        group_size: a power of two in [16, 128] (1 x group_size row groups, group_size x 1 column groups: the column
            groups must not straddle expert segments, which start at multiples of 128).
        scale_fmt: ``"fp32"`` or ``"ue8m0"``; eps: amax floor (all outputs).
        dh_scale_layout: layout of ``s_dh``, t_scale_layout: of ``s_dh_t`` and ``s_wa_t``: ``"tma_aligned"``
            (DeepGEMM's MN-major layout, strides ``(1, align(rows, 4))``) or ``"row_major"``.
        out: optional caller-owned 7-tuple with exactly the shapes, dtypes and strides below.

    With ``h_c = dequantize_gate_up(q_h, s_h)``, ``g = grad_a.float()``, ``w = row_weights[:, None]`` and
    ``(dh, a) = reference.silu_mul_backward(h_c, w * g)`` (float32; ``dh`` carries the router weight), returns
    ``(q_dh, s_dh, q_dh_t, s_dh_t, q_wa_t, s_wa_t, grad_row_weights)``:

    * ``q_dh`` float8_e4m3fn ``(M, 2I)`` contiguous, ``s_dh`` float32 ``(M, ceil(2I/group_size))`` in
      ``dh_scale_layout``: ``quantize_activation(dh)``, 1 x group_size groups along the full 2I row (they straddle
      gate and up when I % group_size != 0): the A operand of GEMM1's dgrad.
    * ``q_dh_t`` ``(2I, M)`` contiguous, ``s_dh_t`` ``(2I, ceil(M/group_size))`` in ``t_scale_layout``:
      ``reference.quantize_activation_t(dh)`` (group_size x 1 tiles, stored transposed): w13's wgrad operand.
    * ``q_wa_t`` ``(I, M)``, ``s_wa_t`` ``(I, ceil(M/group_size))``: ``quantize_activation_t(w * a)``: w2's.
    * ``grad_row_weights`` float32 ``(M,)``: ``sum_i g * a`` per row (0 on padding rows), summed per 128-column
      chunk and then over the chunks, both in a fixed order: the same bits on every run.

    Scales are dequantization scales; an all-zero group gets the eps rule's scale, a group holding NaN/Inf scale NaN
    and all-NaN q. The quantization steps are the quantizer's, bit for bit, given the same float32 values; those can
    differ from ``silu_mul_backward_quantize_ref`` on the CPU in the exp of the sigmoid (the GPU uses libdevice
    ``expf`` like torch's CUDA sigmoid, the interpreter numpy's exp, torch's CPU its own), i.e. in the last bit of
    rare elements, which can move a q by one FP8 step or a scale by an ulp. ``grad_row_weights`` is summed in another
    order than ``torch.sum``: float rounding differences.
    """
    check_tensor(q_h, "q_h", dtypes=(FP8_DTYPE,), dims=(2,))
    dev = q_h.device
    check_tensor(s_h, "s_h", dtypes=(torch.float32,), dims=(2,), device=dev)
    check_tensor(grad_a, "grad_a", dtypes=(torch.bfloat16, torch.float16), dims=(2,), device=dev)
    check_tensor(row_weights, "row_weights", dtypes=(torch.float32,), dims=(1,), device=dev)
    check_choice(scale_fmt, "scale_fmt", SCALE_FMTS)
    check_choice(dh_scale_layout, "dh_scale_layout", SCALE_LAYOUTS)
    check_choice(t_scale_layout, "t_scale_layout", SCALE_LAYOUTS)
    if type(group_size) is not int or not is_pow2(group_size) or not 16 <= group_size <= MAX_BWD_GROUP:
        raise ValueError(f"group_size must be a power of two in [16, {MAX_BWD_GROUP}], got {group_size!r}")
    check_eps(eps)
    M, I, G = _gate_up_split(q_h, "q_h", group_size)
    two_i = 2 * I
    if tuple(s_h.shape) != (M, 2 * G):
        raise ValueError(f"s_h must have shape {(M, 2 * G)} (gate's then up's groups of q_h {tuple(q_h.shape)}), "
                         f"got {tuple(s_h.shape)}")
    if tuple(grad_a.shape) != (M, I):
        raise ValueError(f"grad_a must have shape {(M, I)} (rows of q_h, I = q_h.shape[1] // 2), "
                         f"got {tuple(grad_a.shape)}")
    if row_weights.shape[0] != M:
        raise ValueError(f"row_weights must have {M} entries (rows of q_h), got {row_weights.shape[0]}")
    if m_indices is not None:
        check_tensor(m_indices, "m_indices", dtypes=(torch.int32,), dims=(1,), device=dev)
        if m_indices.shape[0] != M:
            raise ValueError(f"m_indices must have {M} entries (rows of q_h), got {m_indices.shape[0]}")
    G2, GM = cdiv(two_i, group_size), cdiv(M, group_size)
    specs = [("out[0] (q_dh)", (M, two_i), FP8_DTYPE, (two_i, 1)),
             ("out[1] (s_dh)", (M, G2), torch.float32, scale_strides((M, G2), dh_scale_layout)),
             ("out[2] (q_dh_t)", (two_i, M), FP8_DTYPE, (M, 1)),
             ("out[3] (s_dh_t)", (two_i, GM), torch.float32, scale_strides((two_i, GM), t_scale_layout)),
             ("out[4] (q_wa_t)", (I, M), FP8_DTYPE, (M, 1)),
             ("out[5] (s_wa_t)", (I, GM), torch.float32, scale_strides((I, GM), t_scale_layout)),
             ("out[6] (grad_row_weights)", (M,), torch.float32, (1,))]
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != len(specs):
            raise ValueError("out must be a tuple of 7 tensors (q_dh, s_dh, q_dh_t, s_dh_t, q_wa_t, s_wa_t, "
                             "grad_row_weights)")
        for buf, (name, shape, dt, st) in zip(out, specs):
            check_out(buf, name, shape, dt, dev, strides=st)
        ins = [("q_h", q_h), ("s_h", s_h), ("grad_a", grad_a), ("row_weights", row_weights)]
        if m_indices is not None:
            ins.append(("m_indices", m_indices))
        check_outputs_disjoint(ins, [(name, buf) for buf, (name, *_rest) in zip(out, specs)])
        outs = tuple(out)
    else:
        outs = tuple(torch.empty_strided(shape, st, dtype=dt, device=dev) for _n, shape, dt, st in specs)
    if M == 0 or I == 0:
        if M and I == 0:
            outs[6].zero_()
        return outs

    if not use_triton(q_h):
        res = silu_mul_backward_quantize_ref(q_h, s_h, grad_a, row_weights, m_indices, group_size, scale_fmt, eps)
        for buf, val in zip(outs, res):
            buf.copy_(val)
        return outs

    q_dh, s_dh, q_dh_t, s_dh_t, q_wa_t, s_wa_t, grw = outs
    NP = cdiv(I, group_size)
    part = torch.empty((M, NP), dtype=torch.float32, device=dev)
    sub, warps = _bwd_config(group_size)
    mi = m_indices if m_indices is not None else row_weights
    silu_mul_bwd_quant_kernel[(NP, cdiv(M, group_size))](
        q_h, s_h, grad_a, row_weights, mi,
        q_dh, s_dh, q_dh_t, s_dh_t, q_wa_t, s_wa_t, part,
        M, I, G, NP,
        *q_h.stride(), *s_h.stride(), *grad_a.stride(), row_weights.stride(0), mi.stride(0),
        *q_dh.stride(), *s_dh.stride(), *q_dh_t.stride(), *s_dh_t.stride(), *q_wa_t.stride(), *s_wa_t.stride(),
        *part.stride(),
        EPS=eps, FP8_MAX=FP8_MAX, UE8M0=scale_fmt == "ue8m0", ACCURATE_EXP=q_h.is_cuda and not interpreter_active(),
        **gpu_fast_paths(q_h),
        HAS_M=m_indices is not None, RAGGED=I % group_size != 0, GROUP=group_size, SUB=sub, BLOCK_M=group_size,
        num_warps=warps,
        # torch's eager ops round every product and sum: no FMA contraction of 1 + gate * (1 - sig)
        enable_fp_fusion=False,
    )
    block_r = 32
    row_sum_kernel[(cdiv(M, block_r),)](part, grw, M, NP, *part.stride(), grw.stride(0), BLOCK_R=block_r,
                                        N_POW2=max(2, 1 << (NP - 1).bit_length()), num_warps=4,
                                        **FP_FUSION)
    return outs
