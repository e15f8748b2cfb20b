"""Launcher of the 128x1 re-tiling quantizer (the wgrad operand of the MoE backward).

DeepSeek-V3 caches activations in FP8 with 1x128 tiles and re-tiles them to 128x1 for the weight-gradient GEMM
(its reduction runs over tokens): ``x`` (M, C) becomes ``q_t`` (C, M), K-major along M, with one dequantization
scale per 128 consecutive rows of each column. Math: ``fp8_deep.reference.quantize_activation_t`` (bit-exact spec).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from .. import reference
from ..kernels.transpose_quant import quant_act_t_kernel
from ..numerics import (ACT_EPS, BLOCK, FP8_DTYPE, FP8_MAX, HIGH_PRECISION_DTYPES, SCALE_FMTS, SCALE_LAYOUTS, cdiv,
                        is_pow2, use_triton)
from ._checks import check_choice, check_eps, check_int, check_out, check_outputs_disjoint, check_tensor
from ._launch import FP_FUSION, on_input_device
from .layout import alloc_scales
from .quant import gpu_fast_paths

__all__ = ["quantize_activation_t"]

# A/B switch for a tuning sweep: "BLOCK_C,num_warps" pins the tile's column count and the warps per program
RETILE_CONFIG_ENV = "FP8_DEEP_RETILE_CONFIG"
MAX_GROUP = 1024
# one program holds a (group_size, BLOCK_C) float32 tile in registers: at most this many elements by default
TILE_ELEMS = 128 * 128
_INT32 = 2 ** 31


@on_input_device
def quantize_activation_t(x: torch.Tensor, x_scale: Optional[torch.Tensor] = None, *, group_size: int = BLOCK,
                          scale_fmt: str = "fp32", eps: float = ACT_EPS, scale_layout: str = "tma_aligned",
                          out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """Quantize ``x`` to FP8 E4M3 in ``group_size`` x 1 tiles and return it transposed (the wgrad GEMM's operand).

    Args:
        x: ``(M, C)``, any strides: bfloat16 / float16 / float32, or float8_e4m3fn (a cached FP8 activation) with
            ``x_scale``.
        x_scale: FP8 ``x`` only: its float32 1 x ``group_size`` row scales ``(M, ceil(C/group_size))`` (the forward
            quantizer's output, e.g. ``ops.quantize_activation``'s), any strides (row-major or TMA-aligned). ``x`` is
            dequantized first, ``q.float() * s`` (one float32 multiply), as the reference does. The input tiles are
            ``group_size`` wide along C, the reference's convention: 1x128 in, 128x1 out by default.
        group_size: rows per output group (and the input scales' group width), a power of two in [16, 1024].
        scale_fmt: ``"fp32"`` or ``"ue8m0"`` (scales rounded up to powers of two, DeepSeek-V3's choice for the
            activations that get re-tiled).
        eps: amax floor, in [448 * 2^-126, float32 max] (``quantize_activation``'s rule).
        scale_layout: layout of the returned ``s_t``: ``"tma_aligned"`` (default) -> ``(C, G)`` with strides
            ``(1, align(C, 4))``, MN-major, which the wgrad GEMM reads coalesced; ``"row_major"`` -> contiguous.
        out: caller-owned ``(q_t, s_t)`` written in place: FP8 ``(C, M)`` and float32 ``(C, G)``, any strides
            (``scale_layout`` is then ignored); they must not overlap ``x``, ``x_scale`` or each other.

    Returns:
        ``(q_t, s_t)``: ``q_t`` float8_e4m3fn ``(C, M)`` contiguous (``x``'s transpose); ``s_t`` float32
        ``(C, ceil(M/group_size))`` dequantization scales, ``x.T ~= q_t.float() * s_t`` broadcast over each run of
        ``group_size`` columns of ``q_t``. Per group: ``amax = max(max|x|, eps)``, ``s = amax / 448`` (UE8M0:
        ``max(s, 1e-10)`` rounded up to a power of two), ``q = fp8(x / s)``; the last group covers the rows left.
        A group holding NaN/Inf (after dequantization) gets scale NaN and all-NaN ``q``.

    No host synchronisation: one kernel launch on the current stream of ``x``'s device.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (*HIGH_PRECISION_DTYPES, FP8_DTYPE):
        raise TypeError(f"x must be bfloat16, float16, float32 or float8_e4m3fn (with x_scale), got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, C), got shape {tuple(x.shape)}; flatten the leading dimensions into M")
    check_int(group_size, "group_size")
    if not is_pow2(group_size) or not 16 <= group_size <= MAX_GROUP:
        raise ValueError(f"group_size must be a power of two in [16, {MAX_GROUP}], got {group_size}")
    check_choice(scale_fmt, "scale_fmt", SCALE_FMTS)
    check_choice(scale_layout, "scale_layout", SCALE_LAYOUTS)
    check_eps(eps)
    M, C = x.shape
    dequant = x.dtype == FP8_DTYPE
    if dequant:
        if x_scale is None:
            raise ValueError(f"x is float8_e4m3fn: pass its float32 1x{group_size} row scales as x_scale, shape "
                             f"{(M, cdiv(C, group_size))}")
        check_tensor(x_scale, "x_scale", dtypes=(torch.float32,), dims=(2,), device=x.device)
        want = (M, cdiv(C, group_size))
        if tuple(x_scale.shape) != want:
            raise ValueError(f"x_scale must have shape {want} (one scale per 1x{group_size} group of x "
                             f"{tuple(x.shape)}), got {tuple(x_scale.shape)}")
    elif x_scale is not None:
        raise ValueError(f"x_scale applies to a float8_e4m3fn x only, got x of dtype {x.dtype}; drop x_scale, or pass "
                         f"the FP8 tensor it belongs to")
    G = cdiv(M, group_size)
    inputs = [("x", x)] + ([("x_scale", x_scale)] if dequant else [])
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ValueError("out must be a tuple of 2 tensors (q_t, s_t): FP8 (C, M) and float32 (C, G)")
        check_out(out[0], "out[0] (q_t)", (C, M), FP8_DTYPE, x.device)
        check_out(out[1], "out[1] (s_t)", (C, G), torch.float32, x.device)
        check_outputs_disjoint(inputs, [("out[0] (q_t)", out[0]), ("out[1] (s_t)", out[1])])
        q_t, s_t = out
    else:
        q_t = torch.empty((C, M), dtype=FP8_DTYPE, device=x.device)
        s_t = alloc_scales((C, G), scale_layout, x.device)
    if x.numel() == 0:
        return q_t, s_t

    if not use_triton(x):
        rq, rs = reference.quantize_activation_t(x, x_scale if dequant else None, group_size, scale_fmt, eps)
        q_t.copy_(rq)
        s_t.copy_(rs)
        return q_t, s_t

    block_c, warps = _retile_config(group_size, x.element_size(), dequant)
    n_c = cdiv(C, block_c)
    n_prog = n_c * G
    if n_prog >= _INT32:
        raise ValueError(f"x of shape {tuple(x.shape)}: {n_prog} programs of {group_size}x{block_c} exceed the grid "
                         f"limit (2**31 - 1); split the call along M")
    xs = x_scale if dequant else s_t  # an unused pointer when not dequantizing (DEQUANT is a constexpr)
    quant_act_t_kernel[(n_prog,)](
        x, xs, q_t, s_t, M, C, n_c,
        x.stride(0), x.stride(1), xs.stride(0), xs.stride(1), q_t.stride(0), q_t.stride(1),
        s_t.stride(0), s_t.stride(1),
        FP8_MAX=FP8_MAX, EPS=eps, UE8M0=scale_fmt == "ue8m0", **gpu_fast_paths(x), DEQUANT=dequant,
        GROUP=group_size, IN_GROUP=group_size, BLOCK_C=block_c, num_warps=warps, **FP_FUSION)
    return q_t, s_t


def _retile_config(group_size: int, in_bytes: int, dequant: bool) -> Tuple[int, int]:
    """``(BLOCK_C, num_warps)``: the tile's columns and the warps of a program, whose tile is ``group_size`` rows.

    Default: 64 columns for 1- and 2-byte input, 32 for float32, 4 warps (8 from 8192 tile elements on; larger
    groups get fewer columns, at least 16, and tiles of at most TILE_ELEMS elements). Compiled for sm_90 with
    Triton 3.9 (not measured): the 128x64 FP8 tile takes 118 registers at 4 warps, 8 KB of shared memory for the
    transpose, no spills, so ~4 programs per SM keep ~32 KB of loads in flight; the 128x128 tile at 8 warps also
    takes 118 registers, i.e. 2 programs per SM. An FP8 input's tile never spans two input scale groups (BLOCK_C <=
    group_size). ``FP8_DEEP_RETILE_CONFIG="BLOCK_C,num_warps"`` pins one for a sweep (``bench/bench_retile.py``'s
    variants)."""
    val = os.environ.get(RETILE_CONFIG_ENV)
    if val:
        try:
            block_c, warps = (int(v) for v in val.split(","))
        except ValueError:
            raise ValueError(f"{RETILE_CONFIG_ENV}={val!r}: expected 'BLOCK_C,num_warps' (two ints)") from None
        if not is_pow2(block_c) or block_c < 16 or warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"{RETILE_CONFIG_ENV}={val!r}: BLOCK_C must be a power of two >= 16, num_warps one of "
                             f"1, 2, 4, 8, 16")
        if dequant and block_c > group_size:
            raise ValueError(f"{RETILE_CONFIG_ENV}={val!r}: with FP8 input BLOCK_C must be <= group_size "
                             f"({group_size}): a tile must not span two input scale groups")
        return block_c, warps
    block_c = max(16, min(64 if in_bytes <= 2 else 32, TILE_ELEMS // group_size))
    if dequant:
        block_c = min(block_c, group_size)
    return block_c, 8 if block_c * group_size > 8192 else 4
