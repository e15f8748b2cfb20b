"""``silu_mul_quantize``: SwiGLU of the first grouped GEMM's output fused with the 1 x 128 FP8 re-quantization that
feeds the second grouped GEMM (numerics in ``fp8_deep.kernels.swiglu``)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import reference
from ..kernels.swiglu import silu_mul_quant_kernel
from ..numerics import (ACT_EPS, BLOCK, FP8_DTYPE, FP8_MAX, SCALE_FMTS, SCALE_LAYOUTS, cdiv, interpreter_active,
                        is_pow2, use_triton)
from ._checks import check_choice, check_eps, check_out, check_outputs_disjoint, check_tensor
from ._launch import on_input_device
from .layout import alloc_scales, scale_strides
from .quant import gpu_fast_paths

__all__ = ["silu_mul_quantize", "silu_mul_quantize_ref"]


# the spec lives in fp8_deep.reference (re-exported under its old name for the tests)
silu_mul_quantize_ref = reference.silu_mul_quantize


@on_input_device
def silu_mul_quantize(h: torch.Tensor, *, m_indices: Optional[torch.Tensor] = None, group_size: int = BLOCK,
                      scale_fmt: str = "fp32", scale_layout: str = "tma_aligned", eps: float = ACT_EPS,
                      out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """``y = silu(gate).to(h.dtype) * up`` quantized to FP8 in 1 x ``group_size`` groups, in one pass.

    Args:
        h: bfloat16/float16 ``(M, 2I)`` = ``[gate | up]`` (gate = first I columns), any strides. ``I`` need not be
            a multiple of ``group_size`` (the last group covers what is left).
        m_indices: optional int32 ``(M,)`` (the plan's): rows with ``m_indices < 0`` are padding and get ``q = 0``,
            scale 0, without reading ``h``.
        group_size: a power of two >= 16; scale_fmt: ``"fp32"`` or ``"ue8m0"``; eps: amax floor.
        scale_layout: ``"tma_aligned"`` (DeepGEMM's MN-major LHS layout, strides ``(1, align(M, 4))``) or
            ``"row_major"``.
        out: optional caller-owned ``(q, scale)`` with exactly the shapes/strides below.

    Returns:
        ``(q, scale)``: float8_e4m3fn ``(M, I)`` contiguous and float32 ``(M, ceil(I/group_size))`` dequantization
        scales (``y ~= q * scale``) in ``scale_layout``; a group holding NaN/Inf gets scale NaN and all-NaN ``q``.
        One launch.
    """
    check_tensor(h, "h", dtypes=(torch.bfloat16, torch.float16), dims=(2,))
    check_choice(scale_fmt, "scale_fmt", SCALE_FMTS)
    check_choice(scale_layout, "scale_layout", SCALE_LAYOUTS)
    if group_size < 16 or not is_pow2(group_size):
        raise ValueError(f"group_size must be a power of two >= 16, got {group_size}")
    check_eps(eps)
    M, two_i = h.shape
    if two_i % 2:
        raise ValueError(f"h must be (M, 2I) = [gate | up], got an odd last dimension: shape {tuple(h.shape)}")
    I = two_i // 2
    G = cdiv(I, group_size)
    if m_indices is not None:
        check_tensor(m_indices, "m_indices", dtypes=(torch.int32,), dims=(1,), device=h.device)
        if m_indices.shape[0] != M:
            raise ValueError(f"m_indices must have {M} entries (rows of h), got {m_indices.shape[0]}")
    if out is not None:
        q, s = out
        check_out(q, "out[0]", (M, I), FP8_DTYPE, h.device, strides=(I, 1))
        check_out(s, "out[1]", (M, G), torch.float32, h.device, strides=scale_strides((M, G), scale_layout))
        check_outputs_disjoint([("h", h)] + ([("m_indices", m_indices)] if m_indices is not None else []),
                               [("out[0]", q), ("out[1]", s)])
    else:
        q = torch.empty((M, I), dtype=FP8_DTYPE, device=h.device)
        s = alloc_scales((M, G), scale_layout, h.device)
    if M == 0 or I == 0:
        return q, s

    if not use_triton(h):
        rq, rs = silu_mul_quantize_ref(h, group_size, scale_fmt, eps)
        if m_indices is not None:
            pad = (m_indices < 0)[:, None]
            rq = torch.where(pad, torch.zeros_like(rq.view(torch.uint8)), rq.view(torch.uint8)).view(FP8_DTYPE)
            rs = torch.where(pad, torch.zeros_like(rs), rs)
        q.copy_(rq)
        s.copy_(rs)
        return q, s

    gp2 = max(16, 1 << (group_size - 1).bit_length())
    groups_per_prog = min(4, 1 << max(0, (G - 1).bit_length()))
    block_m = 4 if M >= 1024 else 2
    grid = (cdiv(M, block_m), cdiv(G, groups_per_prog))
    silu_mul_quant_kernel[grid](
        h, m_indices if m_indices is not None else h, q, s,
        M, I, G,
        h.stride(0), h.stride(1), q.stride(0), q.stride(1), s.stride(0), s.stride(1),
        EPS=eps, FP8_MAX=FP8_MAX, UE8M0=scale_fmt == "ue8m0", ACCURATE_EXP=h.is_cuda and not interpreter_active(),
        IS_BF16=h.dtype == torch.bfloat16, **gpu_fast_paths(h),
        HAS_M=m_indices is not None, GROUP=group_size, GROUP_POW2=gp2, GROUPS_PER_PROG=groups_per_prog,
        BLOCK_M=block_m, num_warps=4,
    )
    return q, s
