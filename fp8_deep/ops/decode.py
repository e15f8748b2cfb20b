"""Launchers of the decode-sized MoE forward (``fp8_deep.kernels.decode``): two GEMMs that find their own rows.

``moe_decode_gemm1(x, topk_ids, w13, w13_scale)`` -> ``(h, inv)`` and ``moe_decode_gemm2(h, topk_ids, w2, w2_scale)``
-> ``o``; ``ops.moe_combine(o, inv, topk_weights)`` then gives the MoE output, or GEMM2 sums the tokens in its tail
(``combine=``). Rows are the flat choices ``p = t * top_k + j`` (no routing plan, no permuted copies, no padding).
Past the bound, ``moe_routed_gemm1`` / ``moe_routed_gemm2`` take the routing plan's rows and form their operands the
same way (GEMM1 gathers and quantizes each row's token, GEMM2 forms SwiGLU). For finite inputs the bytes are those of the regular
chain (``align_routing`` -> ``quantize_permute`` -> ``grouped_gemm_fp8`` -> ``silu_mul_quantize`` ->
``grouped_gemm_fp8``), whose GEMM tiles use the same swap-AB arithmetic; ``tests/test_decode.py`` holds both to it.

Bounds: ``P = T * top_k <= DECODE_MAX_CHOICES`` (each program compares every pair of choices to find its expert's
rows) and H, I multiples of 128 (the in-loop quantization of a K block is one whole group).
"""
from __future__ import annotations

import os
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from .. import reference
from ..kernels.decode import moe_decode_gemm_kernel, moe_routed_gemm_kernel
from ..numerics import (ACT_EPS, BLOCK, FP8_DTYPE, FP8_MAX, HIGH_PRECISION_DTYPES, SCALE_FMTS, cdiv,
                        interpreter_active, sm_count, use_triton)
from ._checks import check_choice, check_eps, check_out, check_outputs_disjoint, check_tensor
from ._config import TileConfig
from ._launch import FP_FUSION, on_input_device, pdl
from ._tuned import tuned_config
from .grouped_gemm import _tma_problem
from .plan import check_plan
from .routing import _next_pow2
from .quant import gpu_fast_paths

__all__ = ["DecodeConfig", "DECODE_MAX_CHOICES", "DECODE_CONFIG_ENV", "decode_fits", "decode_config",
           "decode_counters", "moe_decode_gemm1", "moe_decode_gemm2", "moe_routed_gemm1", "moe_routed_gemm2"]

# every program holds a P_POW2 x P_POW2 comparison of the choices (16K entries at 128): the bound keeps it in registers
DECODE_MAX_CHOICES = 128
DECODE_CONFIG_ENV = "FP8_DEEP_DECODE_CONFIG"
# tokens the fused combine sums per step: a (16, BLOCK_N) tile, its rows' loads in flight together (one token per
# step would chain T round trips to L2 in the tile's last program)
COMBINE_TOKENS = 16


@dataclass(frozen=True)
class DecodeConfig(TileConfig):
    """Tile of the decode GEMMs: BLOCK_M choices (the MMA's narrow side) by BLOCK_N weight rows (its M side: 64 or
    128, one wgmma of 64 rows per warpgroup on Hopper). ``TMA_B``: weight tiles through a tensor descriptor."""
    _WHAT = "decode config"
    BLOCK_M: int = 16
    BLOCK_N: int = 128
    TMA_B: bool = False
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        self._check_pow2(("BLOCK_M",), 16, 64)
        if self.BLOCK_N not in (64, 128):
            raise ValueError(f"DecodeConfig.BLOCK_N must be 64 or 128 (a tile lies in one 128-row weight scale "
                             f"block), got {self.BLOCK_N}")
        if self.num_warps not in (4, 8):  # fewer than one warpgroup: mma.sync on Hopper, other bytes than wgmma
            raise ValueError(f"DecodeConfig.num_warps must be 4 or 8 (a warpgroup per wgmma; fewer warps compile to "
                             f"mma.sync on Hopper, whose accumulation gives other bytes), got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"DecodeConfig.num_stages must be >= 1, got {self.num_stages}")


def decode_fits(num_choices: int, hidden: int, inter: int) -> bool:
    """Whether the decode GEMMs take a call of ``num_choices = T * top_k`` choices with these sizes."""
    return 0 < num_choices <= DECODE_MAX_CHOICES and hidden % BLOCK == 0 and inter % BLOCK == 0 and hidden > 0 \
        and inter > 0


def decode_config(E: int, N: int, K: int, choices: int, device) -> DecodeConfig:
    """The tile of one decode GEMM (``E`` experts of ``(N, K)`` weights, ``choices = T * top_k``):
    ``FP8_DEEP_DECODE_CONFIG`` when set; else this card's measured table (``fp8_deep/configs/decode/<card>.json``,
    written by ``bench/tune_decode.py``; the entry of the same ``(N, K)`` nearest in choices, then E); else the
    heuristic: 128-row weight tiles when the grid of ``min(choices, E)`` experts fills the SMs with them, 64-row
    tiles when not (the weight bytes are the whole cost: every SM should stream some)."""
    env = os.environ.get(DECODE_CONFIG_ENV)
    if env:
        return DecodeConfig.parse(env)
    spec = tuned_config("decode", torch.device(device), E=E, N=N, K=K, rows=choices)
    if spec is not None:
        try:
            return DecodeConfig.parse(spec)
        except ValueError as exc:
            raise ValueError(f"a tuned decode table (fp8_deep/configs/decode/) holds an invalid config {spec!r}: "
                             f"{exc}; regenerate it with bench/tune_decode.py, or FP8_DEEP_TUNED=0") from None
    fill = _slots(choices, E) * cdiv(N, 128) >= sm_count(device)
    return DecodeConfig(BLOCK_N=128 if fill else 64)


def decode_counters(hidden: int, device) -> torch.Tensor:
    """The fused combine's per-call counter buffer (``moe_decode_gemm1`` zeroes it; no launch here)."""
    return torch.empty(cdiv(hidden, 64), dtype=torch.int32, device=device)


def _slots(num_choices: int, num_experts: int) -> int:
    """Programs along the expert axis: at most one per distinct expert (those past the call's last exit at once)."""
    return min(num_choices, num_experts)


def _check_common(x, x_name, topk_ids, w, w_scale, w_name, expert_map, scale_fmt, eps, k_dim):
    check_choice(scale_fmt, "scale_fmt", SCALE_FMTS)
    check_eps(eps)
    dev = x.device
    check_tensor(topk_ids, "topk_ids", dtypes=(torch.int32, torch.int64), dims=(2,), device=dev)
    E, N, K = _check_weights(w, w_scale, w_name, k_dim, x_name, x, dev)
    P = topk_ids.numel()
    if P > DECODE_MAX_CHOICES:
        raise ValueError(f"topk_ids has {P} choices; the decode GEMMs take at most {DECODE_MAX_CHOICES} (use the "
                         f"regular forward)")
    if expert_map is not None:
        check_tensor(expert_map, "expert_map", dtypes=(torch.int32,), dims=(1,), device=dev)
        if expert_map.numel() < 1 or (expert_map.numel() > 1 and expert_map.stride(0) != 1):
            raise ValueError("expert_map must be a non-empty contiguous int32 tensor (global id -> local id or -1)")
    return E, N, K, P


def _check_weights(w, w_scale, w_name, k_dim, x_name, x, dev):
    """FP8 ``(E, N, K)`` weights with their 128x128 scales, K = ``k_dim`` (``x``'s) a positive multiple of 128."""
    check_tensor(w, w_name, dtypes=(FP8_DTYPE,), dims=(3,), device=dev, last_stride_one=True)
    E, N, K = w.shape
    check_tensor(w_scale, f"{w_name}_scale", dtypes=(torch.float32,), dims=(3,), device=dev)
    if tuple(w_scale.shape) != (E, cdiv(N, BLOCK), cdiv(K, BLOCK)):
        raise ValueError(f"{w_name}_scale must have shape {(E, cdiv(N, BLOCK), cdiv(K, BLOCK))} (128x128 blocks of "
                         f"{w_name} {tuple(w.shape)}), got {tuple(w_scale.shape)}")
    if K != k_dim:
        raise ValueError(f"{w_name} must be (E, N, {k_dim}) to match {x_name} {tuple(x.shape)}, got {tuple(w.shape)}")
    if K % BLOCK or K == 0:
        raise ValueError(f"the on-load GEMMs need K = {K} to be a positive multiple of {BLOCK} (whole 1x128 groups); "
                         f"use the regular forward (FP8_DEEP_DECODE=0, FP8_DEEP_ROUTED=0)")
    return E, N, K


def _ids_args(topk_ids, expert_map):
    if expert_map is None:
        return topk_ids, topk_ids, 1, False  # map_ptr unused: any pointer
    return topk_ids, expert_map, expert_map.numel(), True


@on_input_device
def moe_decode_gemm1(x: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, *,
                     expert_map: Optional[torch.Tensor] = None, scale_fmt: str = "fp32", eps: float = ACT_EPS,
                     config: Optional[DecodeConfig] = None, counters: Optional[torch.Tensor] = None):
    """First GEMM of the decode forward, with the activation quantization folded into its loads.

    Args:
        x: ``(T, H)`` bfloat16 / float16 / float32 tokens, ``x.stride(-1) == 1``, H a multiple of 128.
        topk_ids: int32/int64 ``(T, top_k)`` (global ids when ``expert_map`` is given), any strides; T * top_k <=
            ``DECODE_MAX_CHOICES``.
        w13: float8_e4m3fn ``(E, N, H)`` (N = 2I, [gate | up] rows), unit stride along H; w13_scale: float32
            ``(E, cdiv(N, 128), H / 128)`` dequantization scales of its 128x128 blocks, any strides.
        expert_map: int32 ``(global_E,)`` contiguous, global -> local expert or -1 (choices of -1 are dropped).
        scale_fmt, eps: the activation quantization's, as ``quantize_activation``.
        counters: optional int32 1-D buffer this launch zeroes (``moe_decode_gemm2``'s fused combine counts on it).

    Returns:
        ``(h, inv)``: bfloat16 ``(T * top_k, N)``, row ``t * top_k + j`` the product for that choice (rows of dropped
        choices are left unwritten), and int32 ``(T, top_k)``: that row, or -1 for a dropped choice.
    """
    check_tensor(x, "x", dtypes=HIGH_PRECISION_DTYPES, dims=(2,), last_stride_one=True)
    T, H = x.shape
    E, N, K, P = _check_common(x, "x", topk_ids, w13, w13_scale, "w13", expert_map, scale_fmt, eps, H)
    if topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids must have T = {T} rows (x's), got {tuple(topk_ids.shape)}")
    if counters is not None:
        check_tensor(counters, "counters", dtypes=(torch.int32,), dims=(1,), device=x.device)
        if counters.numel() > 1 and counters.stride(0) != 1:
            raise ValueError("counters must be contiguous")
    if not use_triton(x):
        if counters is not None:
            counters.zero_()
        return reference.moe_decode_gemm1(x, topk_ids, w13, w13_scale, expert_map=expert_map, scale_fmt=scale_fmt,
                                          eps=eps)
    h = torch.empty((P, N), dtype=torch.bfloat16, device=x.device)
    inv = torch.empty(topk_ids.shape, dtype=torch.int32, device=x.device)
    if P == 0 or E == 0:  # no launch (an empty grid): every choice dropped, the counters zeroed here
        inv.fill_(-1)
        if counters is not None:
            counters.zero_()
        return h, inv
    _launch_decode(x, topk_ids, expert_map, w13, w13_scale, h, inv, counters, None, None, False, scale_fmt, eps,
                   config)
    return h, inv


@on_input_device
def moe_decode_gemm2(h: torch.Tensor, topk_ids: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, *,
                     expert_map: Optional[torch.Tensor] = None, scale_fmt: str = "fp32", eps: float = ACT_EPS,
                     config: Optional[DecodeConfig] = None, combine: Optional[tuple] = None,
                     out: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Second GEMM of the decode forward, with SwiGLU and the 1x128 requantization folded into its loads, and
    optionally the combine in its tail.

    Args:
        h: bfloat16 / float16 ``(T * top_k, 2I)`` (``moe_decode_gemm1``'s), unit stride along 2I, I a multiple of
            128; only the rows of kept choices are read.
        topk_ids, expert_map: as for ``moe_decode_gemm1``.
        w2: float8_e4m3fn ``(E, H, I)``, unit stride along I; w2_scale: float32 ``(E, cdiv(H, 128), I / 128)``.
        scale_fmt, eps: the requantization's, as ``silu_mul_quantize``.
        combine: ``(topk_weights, inv, counters)`` to sum each token's rows in this launch (``ops.moe_combine``'s
            math and order; the last program of each column tile does it): weights ``(T, top_k)`` float32 / bf16 /
            fp16, any strides; ``inv`` and ``counters`` from ``moe_decode_gemm1`` (``counters`` zeroed by it, at least
            ``cdiv(H, 64)`` entries; each launch leaves them zero again). Not for concurrent launches sharing
            ``counters``.
        out, out_dtype: with ``combine``, the ``(T, H)`` output buffer (any strides) or its dtype (bfloat16).

    Returns:
        bfloat16 ``(T * top_k, H)``: row ``p`` the expert output of choice ``p`` (rows of dropped choices unwritten);
        with ``combine``, the MoE output ``(T, H)``.
    """
    check_tensor(h, "h", dtypes=(torch.bfloat16, torch.float16), dims=(2,), last_stride_one=True)
    P_h, two_i = h.shape
    if two_i % 2:
        raise ValueError(f"h must be (T * top_k, 2I) ([gate | up]), got an odd width {two_i}")
    E, N, K, P = _check_common(h, "h", topk_ids, w2, w2_scale, "w2", expert_map, scale_fmt, eps, two_i // 2)
    if P_h != P:
        raise ValueError(f"h must have one row per choice, T * top_k = {P}, got {P_h}")
    T, top_k = topk_ids.shape
    tw = inv = counters = None
    if combine is not None:
        tw, inv, counters = _check_combine(combine, T, top_k, N, h.device)
        if out is not None:
            check_out(out, "out", (T, N), out_dtype or out.dtype, h.device)
            check_outputs_disjoint([("h", h), ("topk_ids", topk_ids), ("topk_weights", tw), ("inv", inv),
                                    ("counters", counters)], [("out", out)])
        else:
            out = torch.empty((T, N), dtype=out_dtype or torch.bfloat16, device=h.device)
    elif out is not None or out_dtype is not None:
        raise ValueError("out= and out_dtype are for the fused combine: pass combine=(topk_weights, inv, counters)")
    if not use_triton(h):
        o = reference.moe_decode_gemm2(h, topk_ids, w2, w2_scale, expert_map=expert_map, scale_fmt=scale_fmt, eps=eps)
        if combine is None:
            return o
        out.copy_(reference.moe_combine(o, inv, tw, out.dtype))
        return out
    o = torch.empty((P, N), dtype=torch.bfloat16, device=h.device)
    if P == 0 or E == 0:  # no launch (an empty grid): no kept choice, so the combined output is zero
        return o if combine is None else out.zero_()
    _launch_decode(h, topk_ids, expert_map, w2, w2_scale, o, inv, counters, tw, out, True, scale_fmt, eps, config)
    return o if combine is None else out


def _launch_decode(a, topk_ids, expert_map, w, w_scale, c, inv, counters, tw, out, swiglu, scale_fmt, eps, config):
    """One decode GEMM launch (validated by its launcher): GEMM1 (``swiglu`` False: writes ``inv`` and zeroes
    ``counters``) or GEMM2 (the combine in its tail when ``out`` is given, with ``tw``, ``inv``, ``counters``)."""
    E, N, K = w.shape
    P, top_k = topk_ids.numel(), topk_ids.shape[1]
    cfg = config or decode_config(E, N, K, P, a.device)
    fuse = out is not None
    if fuse and counters.numel() < cdiv(N, cfg.BLOCK_N):
        raise ValueError(f"counters has {counters.numel()} entries; this launch needs {cdiv(N, cfg.BLOCK_N)} "
                         f"(allocate cdiv(H, 64))")
    ids, map_arg, num_global, has_map = _ids_args(topk_ids, expert_map)
    b_arg, tma_b = _weight_arg(w, cfg)
    inv_arg = inv if inv is not None else c  # unused pointers: any tensor
    cnt_arg = counters if counters is not None else inv_arg
    moe_decode_gemm_kernel[(_slots(P, E) * cdiv(N, cfg.BLOCK_N),)](
        a, ids, map_arg, b_arg, w_scale, c, inv_arg, cnt_arg, tw if fuse else c, out if fuse else c,
        P, top_k, N, K, E, num_global, counters.numel() if counters is not None and not swiglu else 0,
        a.stride(0), a.stride(1), topk_ids.stride(0), topk_ids.stride(1), w.stride(0), w.stride(1),
        w_scale.stride(0), w_scale.stride(1), w_scale.stride(2), c.stride(0), c.stride(1),
        tw.stride(0) if fuse else 0, tw.stride(1) if fuse else 0, out.stride(0) if fuse else 0,
        out.stride(1) if fuse else 0,
        FP8_MAX=FP8_MAX, EPS=eps, UE8M0=scale_fmt == "ue8m0", **gpu_fast_paths(a), SWIGLU=swiglu,
        ACCURATE_EXP=a.is_cuda and not interpreter_active(), IS_BF16=a.dtype == torch.bfloat16,
        HAS_MAP=has_map, P_POW2=_p_pow2(P), BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=BLOCK, ACC_K=0,
        UPCAST=False, TMA_B=tma_b, FUSE_COMBINE=fuse, TOP_K=top_k,
        OUT_BF16=fuse and out.dtype == torch.bfloat16, COMBINE_T=COMBINE_TOKENS,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **FP_FUSION, **pdl(a))


def _check_combine(combine, T: int, top_k: int, N: int, device):
    if not (isinstance(combine, (tuple, list)) and len(combine) == 3):
        raise TypeError("combine must be (topk_weights, inv, counters): the weights, moe_decode_gemm1's inv and the "
                        "counters it zeroed")
    tw, inv, counters = combine
    check_tensor(tw, "topk_weights", dtypes=HIGH_PRECISION_DTYPES, dims=(2,), device=device)
    check_tensor(inv, "inv", dtypes=(torch.int32,), dims=(2,), device=device)
    check_tensor(counters, "counters", dtypes=(torch.int32,), dims=(1,), device=device)
    if tuple(tw.shape) != (T, top_k) or tuple(inv.shape) != (T, top_k):
        raise ValueError(f"topk_weights and inv must be (T, top_k) = {(T, top_k)}, got {tuple(tw.shape)} and "
                         f"{tuple(inv.shape)}")
    if not inv.is_contiguous() or (counters.numel() > 1 and counters.stride(0) != 1):
        raise ValueError("inv and counters must be contiguous (as moe_decode_gemm1 allocates them)")
    return tw, inv, counters


def _p_pow2(P: int) -> int:
    return max(16, _next_pow2(P))


def _weight_arg(w: torch.Tensor, cfg: DecodeConfig):
    """The weight operand: a TMA descriptor over ``w`` as ``(E * N, K)`` when asked for and the grouped GEMM's
    TMA rule allows it (``_tma_problem``), else the tensor (pointer loads, same bytes)."""
    E, N, K = w.shape
    if not cfg.TMA_B or _tma_problem(w, w, N, what="TMA_B=1") is not None:
        return w, False
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor(w, [E * N, K], [w.stride(1), 1], [cfg.BLOCK_N, BLOCK]), True


# ---------------------------------------------------------------------------------------------------------------------
# The routed path: the routing plan's rows, the operands formed on load
def _check_plan(plan, what: str):
    check_plan(plan)
    if plan.block_size % 16:
        raise ValueError(f"{what} needs the plan's block_size to be a multiple of 16 (its 16-row tiles lie in one "
                         f"expert's segment), got {plan.block_size}")


def _launch_routed(a, plan, w, w_scale, c, N, K, E, up_off, gather, scale_fmt, eps, config):
    cfg = config or decode_config(E, N, K, plan.num_tokens * plan.top_k, a.device)
    if plan.block_size % cfg.BLOCK_M:
        cfg = dataclasses.replace(cfg, BLOCK_M=16)
    M = plan.num_rows
    grid = ((M // cfg.BLOCK_M) * cdiv(N, cfg.BLOCK_N),)
    if grid[0] == 0:
        return
    b_arg, tma_b = _weight_arg(w, cfg)
    moe_routed_gemm_kernel[grid](
        a, plan.sorted_token_ids, plan.expert_ids, plan.m_indices, b_arg, w_scale, c,
        M, N, K, E, plan.num_tokens * plan.top_k, max(1, plan.top_k), up_off,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w_scale.stride(0), w_scale.stride(1),
        w_scale.stride(2), c.stride(0), c.stride(1),
        FP8_MAX=FP8_MAX, EPS=eps, UE8M0=scale_fmt == "ue8m0", **gpu_fast_paths(a), SWIGLU=not gather,
        ACCURATE_EXP=a.is_cuda and not interpreter_active(), IS_BF16=a.dtype == torch.bfloat16, GATHER=gather,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=BLOCK, GROUP_M=1, MAP_BLOCK=plan.block_size, ACC_K=0,
        UPCAST=False, TMA_B=tma_b, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **FP_FUSION, **pdl(a))


@on_input_device
def moe_routed_gemm1(x: torch.Tensor, plan, w13: torch.Tensor, w13_scale: torch.Tensor, *,
                     scale_fmt: str = "fp32", eps: float = ACT_EPS,
                     config: Optional[DecodeConfig] = None) -> torch.Tensor:
    """``grouped_gemm_fp8(quantize_permute(x, plan), w13)`` in one launch: each row of the plan reads its token's
    row of ``x`` and quantizes it in 1x128 groups as it loads each K block (neither the quantized tokens nor their
    permuted copy are written).

    Args:
        x: ``(T, H)`` bfloat16 / float16 / float32, ``x.stride(-1) == 1``, H a multiple of 128; plan: the
            ``RoutingPlan`` of the call (``align_routing``, block_size a multiple of 16).
        w13, w13_scale: float8_e4m3fn ``(E, N, H)`` (unit stride along H) and float32 ``(E, cdiv(N, 128), H / 128)``.
        scale_fmt, eps: the activation quantization's.

    Returns:
        bfloat16 ``(plan.num_rows, N)`` in the plan's rows: the bytes ``grouped_gemm_fp8`` writes for the real rows
        (padding rows and unused blocks are left unwritten).
    """
    _check_plan(plan, "moe_routed_gemm1")
    check_tensor(x, "x", dtypes=HIGH_PRECISION_DTYPES, dims=(2,), device=plan.sorted_token_ids.device,
                 last_stride_one=True)
    check_choice(scale_fmt, "scale_fmt", SCALE_FMTS)
    check_eps(eps)
    T, H = x.shape
    if T != plan.num_tokens:
        raise ValueError(f"x has {T} rows but the plan was built for {plan.num_tokens} tokens")
    E, N, K = _check_weights(w13, w13_scale, "w13", H, "x", x, x.device)
    if E != plan.num_experts:
        raise ValueError(f"w13 has {E} experts, the plan {plan.num_experts}")
    h = torch.empty((plan.num_rows, N), dtype=torch.bfloat16, device=x.device)
    if not use_triton(x):
        qx, sx = reference.quantize_activation(x, scale_fmt=scale_fmt, eps=eps)
        a, sa = reference.permute_rows(qx, sx, plan.sorted_token_ids, plan.top_k)
        h.copy_(reference.grouped_gemm_fp8(a, sa, w13, w13_scale, plan.m_indices))
        return h
    _launch_routed(x, plan, w13, w13_scale, h, N, K, E, 0, True, scale_fmt, eps, config)
    return h


@on_input_device
def moe_routed_gemm2(h: torch.Tensor, plan, w2: torch.Tensor, w2_scale: torch.Tensor, *,
                     scale_fmt: str = "fp32", eps: float = ACT_EPS,
                     config: Optional[DecodeConfig] = None) -> torch.Tensor:
    """``grouped_gemm_fp8(silu_mul_quantize(h), w2)`` in one launch: each row's SwiGLU and 1x128 requantization are
    formed as its K blocks are loaded (the quantized intermediate is never written).

    Args:
        h: bfloat16 / float16 ``(plan.num_rows, 2I)`` (``moe_routed_gemm1``'s), unit stride along 2I, I a multiple
            of 128; only the plan's real rows are read.
        plan: the ``RoutingPlan`` ``h`` was computed with; w2, w2_scale: float8 ``(E, H, I)`` and float32
            ``(E, cdiv(H, 128), I / 128)``.

    Returns:
        bfloat16 ``(plan.num_rows, H)`` in the plan's rows (padding rows unwritten): ``moe_combine(o,
        plan.inv_perm, topk_weights)`` gives the MoE output.
    """
    _check_plan(plan, "moe_routed_gemm2")
    check_tensor(h, "h", dtypes=(torch.bfloat16, torch.float16), dims=(2,), device=plan.sorted_token_ids.device,
                 last_stride_one=True)
    check_choice(scale_fmt, "scale_fmt", SCALE_FMTS)
    check_eps(eps)
    M, two_i = h.shape
    if M != plan.num_rows or two_i % 2:
        raise ValueError(f"h must be (plan.num_rows, 2I) = ({plan.num_rows}, even), got {tuple(h.shape)}")
    E, N, K = _check_weights(w2, w2_scale, "w2", two_i // 2, "h", h, h.device)
    if E != plan.num_experts:
        raise ValueError(f"w2 has {E} experts, the plan {plan.num_experts}")
    o = torch.empty((M, N), dtype=torch.bfloat16, device=h.device)
    if not use_triton(h):
        a, sa = reference.silu_mul_quantize(h, scale_fmt=scale_fmt, eps=eps)
        o.copy_(reference.grouped_gemm_fp8(a, sa, w2, w2_scale, plan.m_indices))
        return o
    _launch_routed(h, plan, w2, w2_scale, o, N, K, E, K, False, scale_fmt, eps, config)
    return o
