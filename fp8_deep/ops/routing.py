"""Routing launchers: ``align_routing`` (topk ids -> ``RoutingPlan``), ``permute_rows`` (gather the quantized hidden
states into the plan's expert segments) and ``check_topk_ids``.

Nothing here synchronizes with the host on CUDA: every buffer is sized by the host-known worst case
(``max_padded_rows``) and the kernels read the real counts on the device, so the MoE stays CUDA-graph capturable.
The plan is deterministic: rows inside an expert segment keep ascending flat choice index (vLLM's op orders them by
atomics; its rows are the same set, so a MoE built on either plan gives bitwise the same output).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from .. import reference
from ..kernels.routing import (align_count_kernel, align_from_sorted_kernel, align_fused_kernel, align_place_kernel,
                               align_scan_kernel, permute_rows_kernel)
from ..numerics import FP8_DTYPE, SCALE_LAYOUTS, cdiv, is_pow2, use_triton
from . import _registry
from .layout import alloc_scales, scale_strides
from ._checks import check_choice, check_out, check_outputs_disjoint, check_tensor
from ._launch import FP_FUSION, on_input_device, pdl
from .plan import RoutingPlan, check_plan, max_padded_rows

__all__ = ["align_routing", "permute_rows", "check_topk_ids", "ROUTING_CHECK_ENV"]

ROUTING_CHECK_ENV = "FP8_DEEP_CHECK_ROUTING"
_FUSED_MAX = 4096  # choices up to which one launch (every program re-histograms all choices) beats three
_CHUNK = 256  # choices ranked per program: a [256, _SUB] equality tile per step
_SUB = 32
_FUSED_TILE = 1024


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _check_ids(topk_ids, num_experts, expert_map):
    check_tensor(topk_ids, "topk_ids", dtypes=(torch.int32, torch.int64), dims=(2,))
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int (local experts), got {num_experts!r}")
    if expert_map is not None:
        check_tensor(expert_map, "expert_map", dtypes=(torch.int32,), dims=(1,), device=topk_ids.device)
        if expert_map.numel() < 1:
            raise ValueError("expert_map must map at least one global expert, got an empty tensor")
        if expert_map.stride(0) != 1 and expert_map.numel() > 1:
            raise ValueError(f"expert_map must be contiguous (stride {expert_map.stride()}); pass expert_map.contiguous()")


def check_topk_ids(topk_ids: torch.Tensor, num_experts: int, expert_map: Optional[torch.Tensor] = None) -> None:
    """Range check of the router's choices; raises ValueError naming the first bad entry.

    It reads values, so on CUDA it synchronizes with the host: the MoE calls it on CPU tensors always and on CUDA
    only when ``FP8_DEEP_CHECK_ROUTING=1`` (``ROUTING_CHECK_ENV``). The kernels never read out of bounds either way:
    an out-of-range id is dropped like a remote expert's.
    """
    _check_ids(topk_ids, num_experts, expert_map)
    ids = topk_ids.long()
    limit = expert_map.numel() if expert_map is not None else num_experts
    what = "global experts (expert_map.numel())" if expert_map is not None else "num_experts"
    bad = (ids < 0) | (ids >= limit)
    if bool(bad.any()):
        t, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"topk_ids[{t}, {j}] = {int(ids[t, j])} is out of range [0, {limit}) of {what}; "
                         f"the router produced an invalid expert id")
    if expert_map is not None:
        m = expert_map.long()
        bad_map = (m < -1) | (m >= num_experts)
        if bool(bad_map.any()):
            g = int(bad_map.nonzero()[0, 0])
            raise ValueError(f"expert_map[{g}] = {int(m[g])} must be -1 (remote) or a local id in [0, {num_experts})")


def _alloc_plan(topk_ids, num_experts, block_size):
    T, k = topk_ids.shape
    dev = topk_ids.device
    rows = max_padded_rows(T, k, num_experts, block_size)
    i32 = dict(dtype=torch.int32, device=dev)
    return dict(
        sorted_token_ids=torch.empty(rows, **i32),
        expert_ids=torch.empty(rows // block_size, **i32),
        num_tokens_post_padded=torch.empty(1, **i32),
        m_indices=torch.empty(rows, **i32),
        inv_perm=torch.empty((T, k), **i32),
        expert_offsets=torch.empty(num_experts, **i32),
        expert_counts=torch.empty(num_experts, **i32),
    )


def _finish(bufs, T, k, num_experts, block_size) -> RoutingPlan:
    return RoutingPlan(num_tokens=T, top_k=k, num_experts=num_experts, block_size=block_size, **bufs)


@on_input_device
def align_routing(topk_ids: torch.Tensor, num_experts: int, *, expert_map: Optional[torch.Tensor] = None,
                  block_size: int = 128, backend: str = "auto") -> RoutingPlan:
    """Lay the router's choices out in expert segments for the contiguous grouped GEMMs.

    Args:
        topk_ids: int32/int64 ``(T, top_k)``, any strides: global expert ids when ``expert_map`` is given, else
            local ids in ``[0, num_experts)``.
        num_experts: local experts (``E`` of the weights).
        expert_map: int32 ``(global_E,)`` contiguous, global id -> local id or -1; choices of -1 experts (and
            out-of-range ids) are dropped: no row, ``inv_perm`` -1.
        block_size: segment alignment, a power of two (128: DeepGEMM's contiguous layout).
        backend: ``"triton"`` (ours: 1 launch up to 4096 choices, else 3), ``"vllm"`` (vLLM's
            ``moe_align_block_size`` for the rows + 1 launch of ours for the rest), ``"auto"`` (vllm when registered,
            importable and the ids are on CUDA without ``expert_map``, else triton).

    Returns:
        ``RoutingPlan`` (fields in ``fp8_deep.ops.plan``) with ``num_rows = max_padded_rows(T, top_k, num_experts,
        block_size)``; the first three fields equal ``reference.moe_align_block_size`` on the valid rows.
        No host synchronization.
    """
    check_choice(backend, "backend", ("auto", "vllm", "triton"))
    _check_ids(topk_ids, num_experts, expert_map)
    if block_size < 16 or not is_pow2(block_size):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    T, k = topk_ids.shape
    bufs = _alloc_plan(topk_ids, num_experts, block_size)
    if T * k == 0:
        bufs["sorted_token_ids"].fill_(0)
        bufs["expert_ids"].fill_(-1)
        bufs["num_tokens_post_padded"].zero_()
        bufs["m_indices"].fill_(-1)
        bufs["expert_offsets"].zero_()
        bufs["expert_counts"].zero_()
        return _finish(bufs, T, k, num_experts, block_size)

    use_vllm = backend == "vllm" or (backend == "auto" and topk_ids.is_cuda and expert_map is None
                                     and _registry.available("moe_align", "vllm"))
    if use_vllm:
        _align_vllm(topk_ids, num_experts, expert_map, block_size, bufs)
    elif use_triton(topk_ids):
        _align_triton(topk_ids, num_experts, expert_map, block_size, bufs)
    else:
        _align_torch(topk_ids, num_experts, expert_map, block_size, bufs)
    return _finish(bufs, T, k, num_experts, block_size)


def _align_torch(topk_ids, num_experts, expert_map, block_size, bufs):
    """CPU path without the interpreter: the reference, then the derived fields."""
    T, k = topk_ids.shape
    numel = T * k
    rows = bufs["sorted_token_ids"].numel()
    s, eids, ntpp = reference.moe_align_block_size(topk_ids, block_size, num_experts, expert_map)
    # the reference sizes its buffers for num_experts segments; the valid rows always fit the plan's
    n = min(rows, s.numel())
    bufs["sorted_token_ids"].fill_(numel)
    bufs["sorted_token_ids"][:n] = s[:n]
    bufs["expert_ids"].fill_(-1)
    nb = min(rows // block_size, eids.numel())
    bufs["expert_ids"][:nb] = eids[:nb]
    bufs["num_tokens_post_padded"].copy_(ntpp)
    sorted_ids = bufs["sorted_token_ids"].long()
    real = sorted_ids < numel
    row_expert = bufs["expert_ids"].long().repeat_interleave(block_size)
    bufs["m_indices"].copy_(torch.where(real, row_expert, -1))
    inv = torch.full((numel,), -1, dtype=torch.int32)
    rows_idx = torch.arange(rows, dtype=torch.int32)
    inv[sorted_ids[real]] = rows_idx[real]
    bufs["inv_perm"].copy_(inv.view(T, k))
    local = reference.kept_local_ids(topk_ids, num_experts, expert_map).flatten()
    counts = torch.bincount(local[local >= 0], minlength=num_experts)[:num_experts]
    padded = (counts + block_size - 1) // block_size * block_size
    bufs["expert_counts"].copy_(counts)
    bufs["expert_offsets"].copy_(torch.cumsum(padded, 0) - padded)


def _align_triton(topk_ids, num_experts, expert_map, block_size, bufs):
    T, k = topk_ids.shape
    numel = T * k
    rows = bufs["sorted_token_ids"].numel()
    n_blocks = rows // block_size
    has_map = expert_map is not None
    map_arg = expert_map if has_map else topk_ids
    num_global = expert_map.numel() if has_map else num_experts
    e_pow2 = _next_pow2(num_experts + 1)
    outs = (bufs["sorted_token_ids"], bufs["expert_ids"], bufs["num_tokens_post_padded"], bufs["m_indices"],
            bufs["inv_perm"], bufs["expert_offsets"], bufs["expert_counts"])
    if numel <= _FUSED_MAX:
        chunk = min(_CHUNK, max(16, _next_pow2(numel)))
        tile = min(_FUSED_TILE, max(16, _next_pow2(numel)))
        grid = (max(n_blocks, cdiv(numel, chunk)),)
        align_fused_kernel[grid](
            topk_ids, map_arg, *outs,
            numel, k, num_experts, num_global, rows,
            topk_ids.stride(0), topk_ids.stride(1),
            HAS_MAP=has_map, BLOCK_SIZE=block_size, E_POW2=e_pow2, TILE=tile, CHUNK=chunk, SUB=min(_SUB, chunk),
            num_warps=4, **FP_FUSION, **pdl(topk_ids),
        )
        return
    chunk = _CHUNK
    n_chunks = cdiv(numel, chunk)
    dev = topk_ids.device
    keys = torch.empty(n_chunks * chunk, dtype=torch.int32, device=dev)
    chunk_counts = torch.empty((n_chunks, e_pow2), dtype=torch.int32, device=dev)
    chunk_before = torch.empty((n_chunks, e_pow2), dtype=torch.int32, device=dev)
    totals = torch.empty(e_pow2, dtype=torch.int32, device=dev)
    align_count_kernel[(n_chunks,)](
        topk_ids, map_arg, keys, chunk_counts,
        numel, k, num_experts, num_global,
        topk_ids.stride(0), topk_ids.stride(1),
        HAS_MAP=has_map, E_POW2=e_pow2, CHUNK=chunk, SUB=_SUB, num_warps=4, **FP_FUSION,
    )
    per_prog = min(32, e_pow2)
    align_scan_kernel[(e_pow2 // per_prog,)](
        chunk_counts, chunk_before, totals, n_chunks,
        E_POW2=e_pow2, EXPERTS_PER_PROG=per_prog, CHUNK_TILE=32, num_warps=4, **FP_FUSION,
    )
    align_place_kernel[(max(n_blocks, n_chunks),)](
        keys, chunk_before, totals, *outs,
        numel, num_experts, rows, n_chunks,
        BLOCK_SIZE=block_size, E_POW2=e_pow2, CHUNK=chunk, num_warps=4, **FP_FUSION,
    )


def _align_vllm(topk_ids, num_experts, expert_map, block_size, bufs):
    fn = _registry.load("moe_align", "vllm")
    v_sorted, v_eids, v_ntpp = fn(topk_ids, block_size, num_experts, expert_map)
    T, k = topk_ids.shape
    numel = T * k
    rows = bufs["sorted_token_ids"].numel()
    n_blocks = rows // block_size
    has_map = expert_map is not None
    chunk = 1024
    max_blocks = max(v_eids.numel(), n_blocks)
    grid = (max(n_blocks, cdiv(numel, chunk), num_experts),)
    align_from_sorted_kernel[grid](
        topk_ids, expert_map if has_map else topk_ids, v_sorted, v_eids, v_ntpp,
        bufs["sorted_token_ids"], bufs["expert_ids"], bufs["num_tokens_post_padded"], bufs["m_indices"],
        bufs["inv_perm"], bufs["expert_offsets"], bufs["expert_counts"],
        numel, k, num_experts, expert_map.numel() if has_map else num_experts, rows, v_sorted.numel(), v_eids.numel(),
        topk_ids.stride(0), topk_ids.stride(1),
        HAS_MAP=has_map, BLOCK_SIZE=block_size, CHUNK=chunk, MAX_BLOCKS_POW2=_next_pow2(max_blocks),
        num_warps=4, **FP_FUSION,
    )


@on_input_device
def permute_rows(q: torch.Tensor, scale: torch.Tensor, plan: RoutingPlan, *, scale_layout: str = "tma_aligned",
                 out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """Gather the quantized hidden states into the plan's rows (the A operand of the first grouped GEMM).

    Args:
        q: float8_e4m3fn ``(T, K)``, any strides; scale: float32 ``(T, G)``, any strides (dequant scales).
        plan: from ``align_routing`` for the same T.
        scale_layout: ``"tma_aligned"`` (DeepGEMM's MN-major LHS layout, strides ``(1, align(num_rows, 4))``) or
            ``"row_major"``.
        out: optional caller-owned ``(q_perm, scale_perm)`` with exactly the shapes/strides described below.

    Returns:
        ``(q_perm, scale_perm)``: float8_e4m3fn ``(num_rows, K)`` contiguous with row ``r = q[sorted_token_ids[r] //
        top_k]``, and float32 ``(num_rows, G)`` in ``scale_layout``. Padding rows (every row that holds no choice,
        the tail past ``num_tokens_post_padded`` included) are zero in both. One launch.
    """
    check_choice(scale_layout, "scale_layout", SCALE_LAYOUTS)
    check_plan(plan)
    dev = plan.sorted_token_ids.device
    check_tensor(q, "q", dtypes=(FP8_DTYPE,), dims=(2,), device=dev)
    check_tensor(scale, "scale", dtypes=(torch.float32,), dims=(2,), device=dev)
    T, K = q.shape
    G = scale.shape[1]
    if T != plan.num_tokens:
        raise ValueError(f"q has {T} rows but the plan was built for {plan.num_tokens} tokens")
    if scale.shape[0] != T:
        raise ValueError(f"scale must have {T} rows like q, got shape {tuple(scale.shape)}")
    if G < 1 and K > 0:
        raise ValueError(f"scale must have at least one group column, got shape {tuple(scale.shape)}")
    rows = plan.num_rows
    if out is not None:
        q_out, s_out = out
        check_out(q_out, "out[0]", (rows, K), FP8_DTYPE, dev, strides=(K, 1))
        check_out(s_out, "out[1]", (rows, G), torch.float32, dev, strides=scale_strides((rows, G), scale_layout))
        check_outputs_disjoint([("q", q), ("scale", scale)], [("out[0]", q_out), ("out[1]", s_out)])
    else:
        q_out = torch.empty((rows, K), dtype=FP8_DTYPE, device=dev)
        s_out = alloc_scales((rows, G), scale_layout, dev)
    if rows == 0:
        return q_out, s_out
    if not use_triton(q):
        sorted_ids = plan.sorted_token_ids.long()
        numel = plan.num_tokens * plan.top_k
        real = sorted_ids < numel
        tok = torch.where(real, sorted_ids, 0) // max(plan.top_k, 1)
        q_out.view(torch.uint8).copy_(torch.where(real[:, None], q.view(torch.uint8)[tok], 0))
        s_out.copy_(torch.where(real[:, None], scale[tok], 0.0))
        return q_out, s_out
    block_m, block_k, warps = _permute_config(K)
    permute_rows_kernel[(cdiv(rows, block_m),)](
        q, scale, plan.sorted_token_ids, q_out, s_out,
        plan.num_tokens * plan.top_k, plan.top_k, rows, K, G,
        q.stride(0), q.stride(1), scale.stride(0), scale.stride(1),
        q_out.stride(0), q_out.stride(1), s_out.stride(0), s_out.stride(1),
        BLOCK_M=block_m, BLOCK_K=block_k, G_POW2=max(1, _next_pow2(G)), num_warps=warps, **FP_FUSION, **pdl(q),
    )
    return q_out, s_out


PERMUTE_CONFIG_ENV = "FP8_DEEP_PERMUTE_CONFIG"


def _permute_config(K: int) -> Tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_K, num_warps)`` of ``permute_rows_kernel``: rows per program and the K step, about 8 KB
    moved per step (BLOCK_K up to 2048 bytes of a row), 4 warps. ``FP8_DEEP_PERMUTE_CONFIG="BLOCK_M,BLOCK_K[,
    num_warps]"`` pins one (A/B runs; every tile writes the same bytes). H100, 2026-12-08 at ``ee14246`` (peer_vllm
    ``--ab``, the whole forward at T=2048, where the chain permutes 16K rows): 16 x 512-byte steps took 0.967-0.977x
    the time of these, inside the 0.975-1.003x that the same run's no-op switches gave there: no default change."""
    val = os.environ.get(PERMUTE_CONFIG_ENV)
    if val:
        try:
            parts = [int(v) for v in val.split(",")]
        except ValueError:
            parts = []
        if len(parts) not in (2, 3) or not all(is_pow2(v) for v in parts) or (len(parts) == 3 and parts[2] > 16):
            raise ValueError(f"{PERMUTE_CONFIG_ENV}={val!r}: expected 'BLOCK_M,BLOCK_K[,num_warps]', powers of two "
                             f"(num_warps <= 16)")
        return parts[0], parts[1], parts[2] if len(parts) == 3 else 4
    block_k = min(2048, max(16, _next_pow2(K)))
    return max(1, min(16, 8192 // block_k)), block_k, 4


def routing_check_enabled() -> bool:
    """Whether ``FP8_DEEP_CHECK_ROUTING`` asks for ``check_topk_ids`` on CUDA (it synchronizes)."""
    return os.environ.get(ROUTING_CHECK_ENV, "0").lower() in ("1", "true", "on", "yes")
