"""Launchers for FP8 quantization: 128x128 weight blocks and 1x128 activation groups.

Scale convention: dequantization scales, ``x ~= q.float() * s``. Math: ``fp8_deep.reference`` (bit-exact spec).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from .. import reference
from ..kernels.routing import align_quant_kernel
from ..kernels.quant import (quant_act_flat_kernel, quant_act_group_kernel, quant_permute_kernel,
                             quant_weight_block_kernel, quant_weight_stack_kernel, quant_weight_table_kernel)
from ..numerics import (ACT_EPS, BLOCK, FP8_DTYPE, FP8_MAX, HIGH_PRECISION_DTYPES, SCALE_FMTS, SCALE_LAYOUTS,
                        WEIGHT_AMAX_EPS, cdiv, interpreter_active, is_pow2, use_triton)
from . import _registry
from ._launch import FP_FUSION, PLANS_ENABLED, PlanCache, bind_compiled, on_input_device, pdl
from ._config import TileConfig
from ._tuned import TUNED_ENV, tuned_config
from ._checks import (any_overlap, byte_span, check_choice, check_eps, check_int, check_out,
                      check_outputs_disjoint, check_tensor, is_int_pair)
from .layout import alloc_scales, tma_aligned_scale_strides
from .plan import check_plan
from .routing import _alloc_plan, _check_ids, _finish, _next_pow2, align_routing, permute_rows

__all__ = ["quantize_weight_blockwise", "quantize_weights_grouped", "GroupedWeightQuant", "quantize_activation",
           "quantize_permute", "align_quantize_permute", "to_tma_aligned_scales", "dequantize_blockwise", "WeightQuantConfig", "ActQuantConfig"]


def _check_high_precision(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in HIGH_PRECISION_DTYPES:
        raise TypeError(f"{name} must be bfloat16, float16 or float32 (got {x.dtype}); FP8 or integer tensors are "
                        f"already quantized or not weights/activations")


@on_input_device
def quantize_weight_blockwise(w: torch.Tensor, *, block_size: Tuple[int, int] = (BLOCK, BLOCK),
                              scale_fmt: str = "fp32", with_transpose: bool = False, out=None):
    """Quantize weights to FP8 E4M3 with one dequantization scale per ``block_size`` block, in one fused pass.

    Args:
        w: ``(N, K)`` or ``(E, N, K)`` (stacked experts), bfloat16 / float16 / float32, any strides.
        block_size: ``(bn, bk)`` ints, powers of two in [16, 1024] with ``bn * bk <= 65536``, default
            ``(128, 128)`` (DeepSeek-V3, DeepGEMM, vLLM).
        scale_fmt: ``"fp32"`` or ``"ue8m0"`` (scales rounded up to powers of two, stored as float32).
        with_transpose: also return the transposed copy (W^T, K-major for the backward dgrad GEMM), written by
            the same kernel from one HBM read of ``w`` (each block's column slices are re-read while L2 holds the
            block); needs square blocks.
        out: caller-owned ``(q, scale)`` (``(q, scale, q_t, scale_t)`` with ``with_transpose``) written in place,
            e.g. a rollout engine's existing FP8 parameters; shapes and dtypes must match, any strides; the buffers
            must not overlap ``w`` or each other (address ranges are compared).

    Returns:
        ``(q, scale)`` or ``(q, scale, q_t, scale_t)``: ``q`` float8_e4m3fn, shape of ``w``, row-major contiguous;
        ``scale`` float32 ``(..., ceil(N/bn), ceil(K/bk))`` contiguous (DeepGEMM's SM90 RHS layout, vLLM's
        ``weight_scale_inv``); ``q_t`` ``(..., K, N)`` and ``scale_t`` ``(..., ceil(K/bk), ceil(N/bn))``, contiguous.
        ``w ~= q.float() * scale`` broadcast per block. Blocks never straddle experts; edge blocks cover only real
        elements. A block holding NaN/Inf gets scale NaN and all-NaN ``q``.

    On CUDA a call whose signature (input, options, ``out`` buffers' layouts) was seen before replays a launch plan
    (``fp8_deep.ops._launch``): same checks passed, same kernel, same bytes, without the host work (~80 us per call
    through the full path on an H100's host, more than the kernel of a 4096x7168 matrix; ~37 us with the plan).
    """
    plan_key = _weight_plan_key(w, block_size, scale_fmt, with_transpose, out)
    if plan_key is not None:
        plan = _WEIGHT_PLANS.get(plan_key)
        if plan is not None:
            res = plan(w, out)
            if res is not None:  # None: out buffers that overlap w or each other, which the full path rejects
                return res
    _check_high_precision(w, "w")
    if w.dim() not in (2, 3):
        raise ValueError(f"w must be (N, K) or (E, N, K), got shape {tuple(w.shape)}")
    check_choice(scale_fmt, "scale_fmt", SCALE_FMTS)
    if not is_int_pair(block_size):
        raise TypeError(f"block_size must be a tuple of two ints (bn, bk), got {block_size!r}")
    bn, bk = block_size
    if not (is_pow2(bn) and is_pow2(bk) and 16 <= bn <= MAX_BLOCK_EDGE and 16 <= bk <= MAX_BLOCK_EDGE
            and bn * bk <= MAX_BLOCK_ELEMS):
        raise ValueError(f"block_size must be two powers of two in [16, {MAX_BLOCK_EDGE}] with bn * bk <= "
                         f"{MAX_BLOCK_ELEMS} (a block is one program's tile), got {block_size}")
    if with_transpose and bn != bk:
        raise ValueError(f"with_transpose needs square blocks (the transposed copy reuses each block's scale), "
                         f"got block_size={block_size}")
    *lead, N, K = w.shape
    nb, kb = cdiv(N, bn), cdiv(K, bk)
    if nb > MAX_GRID_YZ or (lead and lead[0] > MAX_GRID_YZ):
        raise ValueError(f"w of shape {tuple(w.shape)}: at most {MAX_GRID_YZ} experts and {MAX_GRID_YZ} block rows "
                         f"(N / bn) per call (CUDA grid limit); quantize it in slices")
    shapes = [(*lead, N, K), (*lead, nb, kb), (*lead, K, N), (*lead, kb, nb)]
    dtypes = [FP8_DTYPE, torch.float32, FP8_DTYPE, torch.float32]
    names = ["out[0] (q)", "out[1] (scale)", "out[2] (q_t)", "out[3] (scale_t)"]
    n_out = 4 if with_transpose else 2
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != n_out:
            raise ValueError(f"out must be a tuple of {n_out} tensors (q, scale{', q_t, scale_t' if with_transpose else ''})")
        for buf, name, shape, dt in zip(out, names, shapes, dtypes):
            check_out(buf, name, shape, dt, w.device)
        check_outputs_disjoint([("w", w)], list(zip(names, out)))
        outs = list(out)
    else:
        outs = [torch.empty(s, dtype=d, device=w.device) for s, d in zip(shapes[:n_out], dtypes[:n_out])]
    if w.numel() == 0:
        return tuple(outs)

    if not use_triton(w):
        res = reference.quantize_weight_blockwise(w, block_size, scale_fmt)
        for buf, val in zip(outs, res):
            buf.copy_(val)
        if with_transpose:
            outs[2].copy_(res[0].transpose(-1, -2))
            outs[3].copy_(res[1].transpose(-1, -2))
        return tuple(outs)

    w3 = w if w.dim() == 3 else w.unsqueeze(0)
    o3 = [o if o.dim() == 3 else o.unsqueeze(0) for o in outs]
    q3, s3 = o3[0], o3[1]
    qt3, st3 = (o3[2], o3[3]) if with_transpose else (q3, s3)  # unused when WITH_TRANSPOSE is False
    E = w3.shape[0]
    fast = gpu_fast_paths(w)
    numerics = dict(FP8_MAX=FP8_MAX, AMAX_EPS=WEIGHT_AMAX_EPS, UE8M0=scale_fmt == "ue8m0", NAN_MAX=fast["NAN_MAX"],
                    NAN_SELECT=fast["NAN_SELECT"])
    tuned = _tuned_weight_config(w, E, N, K, block_size, with_transpose)
    if (tuned is None or tuned.STACK) and _stack_kernel_applies(w3, q3, s3, block_size, with_transpose):
        kernel, grid, n_dynamic = quant_weight_stack_kernel, (E * nb * kb,), 3
        args = (w3, q3, s3)
        kwargs = dict(K=K, KB=kb, **numerics, BLOCK=bn, num_warps=32, num_stages=1)
    else:
        if tuned is not None and not tuned.STACK:
            tchunk, warps, blocks_k = tuned.TCHUNK, tuned.num_warps, tuned.BLOCKS_K
            hints = dict(zip(("LOAD_EVICT", "STORE_EVICT", "RELOAD_EVICT"), _WEIGHT_HINTS[_HINT_NAMES[tuned.HINTS]]))
        else:
            tchunk, warps, blocks_k = _weight_config(bn, bk, with_transpose, E * nb * kb)
            hints = _weight_hints(with_transpose)
        kernel, grid, n_dynamic = quant_weight_block_kernel, (cdiv(kb, blocks_k), nb, E), 5
        args = (w3, q3, s3, qt3, st3, N, K, E, nb, kb,
                *w3.stride(), *q3.stride(), *s3.stride(), *qt3.stride(), *st3.stride())
        kwargs = dict(**numerics, WITH_TRANSPOSE=with_transpose, **hints,
                      BLOCK_N=bn, BLOCK_K=bk, TCHUNK=min(tchunk, bk), BLOCKS_K=blocks_k, num_warps=warps)
    compiled = kernel[grid](*args, **kwargs, **FP_FUSION)
    if plan_key is not None and not interpreter_active():
        # the 3-D views share the tensors' data pointers: the plan launches on w and the outputs themselves
        launch = bind_compiled(kernel, compiled, grid, args, kwargs, n_dynamic=n_dynamic)
        if launch is not None:
            spans = (byte_span(w), *(byte_span(o) for o in outs)) if out is not None else None
            _WEIGHT_PLANS.put(plan_key, _weight_plan(launch, n_dynamic, shapes[:n_out], dtypes[:n_out], w.device,
                                                     spans))
    return tuple(outs)


_WEIGHT_PLANS = PlanCache()


def _tensor_signature(t: torch.Tensor):
    """What the checks and Triton's specialization read from a tensor argument."""
    return t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0


def _weight_plan_key(w, block_size, scale_fmt, with_transpose, out):
    """The launch-plan key of a ``quantize_weight_blockwise`` call, or None when the call takes the full path (plans
    off, not a plain CUDA tensor, arguments of unexpected types: those get the full checks and their messages)."""
    # plain tensors and parameters only: other subclasses (fake, functional, distributed) have no plain data pointer;
    # options of exactly the types the checks accept (a float block size hashes like an int but must raise)
    if not (PLANS_ENABLED and type(w) in (torch.Tensor, torch.nn.Parameter) and w.is_cuda
            and is_int_pair(block_size)
            and type(scale_fmt) is str and type(with_transpose) is bool):
        return None
    if out is None:
        out_sig = None
    elif type(out) in (tuple, list) and all(type(o) in (torch.Tensor, torch.nn.Parameter) for o in out):
        out_sig = tuple(_tensor_signature(o) for o in out)
    else:
        return None
    return (_tensor_signature(w), torch.cuda.current_device(), tuple(block_size), scale_fmt, with_transpose, out_sig,
            os.environ.get(PLAIN_ENV), os.environ.get(WEIGHT_CONFIG_ENV), os.environ.get(WEIGHT_HINTS_ENV),
            os.environ.get(TUNED_ENV), SMALL_WEIGHT_BLOCKS, STACK_WEIGHT_BLOCKS, interpreter_active())


def _weight_plan(launch, n_dynamic, shapes, dtypes, device, spans):
    """A validated ``quantize_weight_blockwise`` call replayed: the caller's ``out`` buffers or fresh contiguous
    outputs (as the full path allocates them), the same kernel. Without the transposed copy the kernel's (q_t,
    scale_t) arguments are (q, scale) again, as in the full path. ``spans``: the byte extents of ``w`` and the
    ``out`` buffers (fixed by their layouts, which the key holds); a replay whose buffers overlap returns None.
    ``n_dynamic``: how many tensors the bound kernel takes."""
    def run(w, out):
        if out is not None and any_overlap((t.data_ptr(), t.data_ptr() + n) for t, n in zip((w, *out), spans)):
            return None
        outs = tuple(out) if out is not None else tuple(torch.empty(s, dtype=d, device=device)
                                                        for s, d in zip(shapes, dtypes))
        # the tile kernel takes (w, q, s, q_t, s_t), with (q, s) again for one layout; the stack kernel (w, q, s)
        launch(*((w, *outs, *outs) if len(outs) == 2 else (w, *outs))[:n_dynamic])
        return outs

    return run


@on_input_device
def quantize_activation(x: torch.Tensor, *, group_size: int = BLOCK, scale_fmt: str = "fp32",
                        scale_layout: str = "row_major", eps: float = ACT_EPS, out_q: Optional[torch.Tensor] = None,
                        out_scale: Optional[torch.Tensor] = None, backend: str = "auto"):
    """Quantize activations to FP8 E4M3 in 1 x ``group_size`` groups (vLLM ``per_token_group_quant_fp8``).

    Args:
        x: ``(..., K)`` with ``x.stride(-1) == 1``; bfloat16 / float16 / float32. ``K`` need not divide by
            ``group_size``: the last group covers what is left (``backend="vllm"`` then raises: vLLM requires it).
        scale_fmt: ``"fp32"`` or ``"ue8m0"`` (power-of-two scales).
        scale_layout: ``"row_major"`` -> ``(..., G)`` contiguous; ``"tma_aligned"`` -> DeepGEMM's LHS layout,
            ``(M, G)`` with strides ``(1, align(M, 4))`` or ``(B, M, G)`` with ``(align(M,4)*G, 1, align(M,4))``,
            written directly by the kernel. Only 2-D/3-D ``x`` for ``"tma_aligned"``.
        eps: amax floor (vLLM's default 1e-10), in [448 * 2^-126, float32 max] so that eps / 448 is a normal
            float32 (a GPU division flushes smaller scales to zero).
        out_q: caller-owned FP8 output ``(..., K)``; out_scale: caller-owned float32 ``(..., G)`` of any strides
            (like vLLM's op, the layout is taken from the buffer's strides; ``scale_layout`` is then ignored).
            Neither may overlap ``x`` or the other.
        backend: ``"auto"`` (vLLM's op when vllm is importable, ``x`` is on CUDA and ``K % group_size == 0``, else
            ours), ``"vllm"``, ``"triton"``. The same bytes for finite input. Non-finite input follows each op's
            policy: ours below; vLLM's max drops NaN (a NaN element becomes -448 in a group with a finite scale) and
            a group holding Inf gets scale Inf.

    Returns:
        ``(q, scale)``: ``q`` float8_e4m3fn, shape of ``x``; ``scale`` float32 ``(..., ceil(K/group_size))``
        dequantization scales (``x ~= q * scale`` per group). A group holding NaN/Inf gets scale NaN, all-NaN ``q``.
        UE8M0 scales are ``max(amax / 448, 1e-10)`` rounded up to a power of two (vLLM's CUDA op's floor).

    On CUDA a call whose signature was seen before replays a launch plan (``fp8_deep.ops._launch``): same checks
    passed, same kernel, same bytes, without the host work (the kernel at M=4096 is shorter than that work).
    """
    plan_key = None
    # options of exactly the types the checks accept (128.0 hashes like 128 but must raise; unhashables must reach
    # the checks)
    if (PLANS_ENABLED and out_q is None and out_scale is None and type(x) is torch.Tensor and x.is_cuda
            and type(group_size) is int and type(eps) in (float, int) and type(scale_fmt) is str
            and type(scale_layout) is str and type(backend) is str):
        # everything the checks, the kernel choice and Triton's specialization below depend on
        plan_key = (_tensor_signature(x), torch.cuda.current_device(), group_size, scale_fmt, scale_layout, eps,
                    backend, os.environ.get(PLAIN_ENV), os.environ.get(ACT_CONFIG_ENV),
                    os.environ.get(ACT_SCALE_EVICT_ENV), os.environ.get(TUNED_ENV), interpreter_active())
        plan = _ACT_PLANS.get(plan_key)
        if plan is not None:
            return plan(x)
    _check_high_precision(x, "x")
    check_choice(scale_fmt, "scale_fmt", SCALE_FMTS)
    check_choice(scale_layout, "scale_layout", SCALE_LAYOUTS)
    check_choice(backend, "backend", ("auto", "vllm", "triton"))
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., K)")
    check_int(group_size, "group_size")
    if not is_pow2(group_size) or not 16 <= group_size <= MAX_GROUP:
        raise ValueError(f"group_size must be a power of two in [16, {MAX_GROUP}], got {group_size}")
    check_eps(eps)
    check_tensor(x, "x", last_stride_one=True)
    if scale_layout == "tma_aligned" and out_scale is None and x.dim() not in (2, 3):
        raise ValueError(f"scale_layout='tma_aligned' needs a 2-D (M, K) or 3-D (B, M, K) x, got shape {tuple(x.shape)}")
    K = x.shape[-1]
    G = cdiv(K, group_size)
    scale_shape = (*x.shape[:-1], G)
    if out_q is not None:
        check_out(out_q, "out_q", tuple(x.shape), FP8_DTYPE, x.device)
        check_tensor(out_q, "out_q", last_stride_one=True)
    if out_scale is not None:
        check_out(out_scale, "out_scale", scale_shape, torch.float32, x.device)
    given = [(n, t) for n, t in (("out_q", out_q), ("out_scale", out_scale)) if t is not None]
    if given:
        check_outputs_disjoint([("x", x)], given)

    # vLLM requires K % group_size == 0: "auto" keeps such shapes (tensor-parallel shards, K=192) on ours
    if backend == "vllm" or (backend == "auto" and x.is_cuda and K % group_size == 0
                             and _registry.available("activation_quant", "vllm")):
        fn = _registry.load("activation_quant", "vllm")
        return fn(x, group_size=group_size, scale_fmt=scale_fmt, scale_layout=scale_layout, eps=eps,
                  out_q=out_q, out_scale=out_scale)

    q = out_q if out_q is not None else torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    if out_scale is not None:
        s = out_scale
    elif scale_layout == "tma_aligned":
        s = alloc_scales(scale_shape, "tma_aligned", x.device)
    else:
        s = torch.empty(scale_shape, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return q, s

    if not use_triton(x):
        rq, rs = reference.quantize_activation(x, group_size, scale_fmt, eps)
        q.copy_(rq)
        s.copy_(rs)
        return q, s

    # view as (B, M, K) without copying: 1-D/2-D -> B=1, 3-D as is, deeper -> leading dims folded into M
    def as3(t):
        if t.dim() <= 3:
            return t.view(*([1] * (3 - t.dim())), *t.shape)
        try:
            return t.view(1, -1, t.shape[-1])
        except RuntimeError:  # leading dims not foldable without a copy
            return None

    x3, q3, s3 = as3(x), as3(q), as3(s)
    if x3 is None or q3 is None or s3 is None:
        rq, rs = quantize_activation(x.contiguous(), group_size=group_size, scale_fmt=scale_fmt, eps=eps,
                                     backend="triton")
        q.copy_(rq)
        s.copy_(rs)
        return q, s
    B, M = x3.shape[0], x3.shape[1]
    numerics = dict(FP8_MAX=FP8_MAX, EPS=eps, UE8M0=scale_fmt == "ue8m0", **gpu_fast_paths(x))
    # flat: int32 group indices, with room for the last program's BLOCK_G lanes past NG
    flat_ok = K % group_size == 0 and B * M * G < 2 ** 31 - 2 ** 16 and q3.stride(2) == 1
    cfg = _tuned_act_config(x, B * M, K, group_size, s3, flat_ok)
    if cfg is not None and cfg[0] == "tile" and max(cdiv(G, cfg[2]), B) > MAX_GRID_YZ:
        cfg = None  # a table's tile choice past the grid limit: the built-in choice (flat where it applies)
    cfg = cfg or _act_config(M, flat_ok=flat_ok)
    if cfg[0] == "flat":
        _, block_g, warps = cfg
        kernel, grid = quant_act_flat_kernel, (cdiv(B * M * G, block_g),)
        args = (x3, q3, s3, B * M * G, M, G,
                x3.stride(0), x3.stride(1), q3.stride(0), q3.stride(1), *s3.stride())
        meta = dict(GROUP=group_size, BLOCK_G=block_g, S_EVICT=_act_scale_evict(), num_warps=warps)
    else:
        _, block_m, groups_per_prog, warps = cfg
        kernel, grid = quant_act_group_kernel, (cdiv(M, block_m), cdiv(G, groups_per_prog), B)
        if max(grid[1:]) > MAX_GRID_YZ:
            raise ValueError(f"x of shape {tuple(x.shape)} with group_size={group_size}: at most {MAX_GRID_YZ} "
                             f"batches and {MAX_GRID_YZ * groups_per_prog} groups per row here (CUDA grid limit); "
                             f"split the call")
        args = (x3, q3, s3, M, K, *x3.stride(), *q3.stride(), *s3.stride())
        meta = dict(GROUP=group_size, GROUPS_PER_PROG=groups_per_prog, BLOCK_M=block_m, num_warps=warps)
    kwargs = dict(numerics, **meta)
    compiled = kernel[grid](*args, **kwargs, **FP_FUSION)
    if plan_key is not None and not interpreter_active():
        # x3, q3, s3 are views of x, q, s (same data pointers): the plan launches on the tensors themselves
        launch = bind_compiled(kernel, compiled, grid, args, kwargs, n_dynamic=3)
        if launch is not None:
            _ACT_PLANS.put(plan_key, _act_plan(launch, tuple(q.shape), tuple(s.shape), s.stride(), x.device))
    return q, s



@on_input_device
def quantize_permute(x: torch.Tensor, plan, *, scale_fmt: str = "fp32", scale_layout: str = "tma_aligned",
                     eps: float = ACT_EPS):
    """``permute_rows(*quantize_activation(x), plan)`` in one launch: each of the plan's rows quantized from its
    token's row of ``x`` (1x128 groups), written in the plan's expert segments. The same bytes as the two calls.

    Args:
        x: ``(T, K)`` bfloat16 / float16 / float32, ``x.stride(-1) == 1``; plan: ``RoutingPlan`` of the same T.
        scale_fmt, scale_layout, eps: as ``quantize_activation`` / ``permute_rows``.

    Returns:
        ``(q_perm, scale_perm)``: float8_e4m3fn ``(num_rows, K)`` contiguous and float32 ``(num_rows, G)`` in
        ``scale_layout``; padding rows zero in both. A token routed to k experts is read k times (from L2 when
        ``x`` fits): worth it while launches, not bytes, bound the MoE (small T); ``fp8_deep.moe`` decides."""
    check_plan(plan)
    _check_high_precision(x, "x")
    check_choice(scale_fmt, "scale_fmt", SCALE_FMTS)
    check_choice(scale_layout, "scale_layout", SCALE_LAYOUTS)
    check_eps(eps)
    check_tensor(x, "x", dims=(2,), device=plan.sorted_token_ids.device, last_stride_one=True)
    T, K = x.shape
    if T != plan.num_tokens:
        raise ValueError(f"x has {T} rows but the plan was built for {plan.num_tokens} tokens")
    if not use_triton(x) or K == 0:
        return permute_rows(*quantize_activation(x, scale_fmt=scale_fmt, eps=eps, backend="triton"), plan,
                            scale_layout=scale_layout)
    rows, G = plan.num_rows, cdiv(K, BLOCK)
    q = torch.empty((rows, K), dtype=FP8_DTYPE, device=x.device)
    s = alloc_scales((rows, G), scale_layout, x.device)
    if rows == 0:
        return q, s
    _, block_m, groups_per_prog, warps = _act_config(rows, flat_ok=False)
    grid = (cdiv(rows, block_m), cdiv(G, groups_per_prog))
    if grid[1] > MAX_GRID_YZ:
        raise ValueError(f"x of shape {tuple(x.shape)}: at most {MAX_GRID_YZ * groups_per_prog} groups per row "
                         f"(CUDA grid limit)")
    quant_permute_kernel[grid](
        x, plan.sorted_token_ids, q, s, plan.num_tokens * plan.top_k, plan.top_k, rows, K,
        x.stride(0), x.stride(1), q.stride(0), q.stride(1), s.stride(0), s.stride(1),
        FP8_MAX=FP8_MAX, EPS=eps, UE8M0=scale_fmt == "ue8m0", **gpu_fast_paths(x),
        GROUP=BLOCK, GROUPS_PER_PROG=groups_per_prog, BLOCK_M=block_m, num_warps=warps, **FP_FUSION, **pdl(x))
    return q, s


# choices x segment alignment up to which one launch plans the routing and quantizes (every program holds a
# [block_size, choices] tile of the placement); past it, align_routing + quantize_permute
ALIGN_QUANT_MAX_TILE = 8192


def align_quantize_permute_fits(num_choices: int, block_size: int) -> bool:
    """Whether ``align_quantize_permute`` takes its one-launch path for this many (token, choice) pairs."""
    return 0 < num_choices and block_size * max(16, 1 << (num_choices - 1).bit_length()) <= ALIGN_QUANT_MAX_TILE


@on_input_device
def align_quantize_permute(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, *,
                           expert_map: Optional[torch.Tensor] = None, block_size: int = 128,
                           scale_fmt: str = "fp32", scale_layout: str = "tma_aligned", eps: float = ACT_EPS):
    """``align_routing`` then ``quantize_permute``: the routing plan and the first GEMM's FP8 operand in one launch
    where the choices are few (decode: ``align_quantize_permute_fits``), else the two calls. The same plan and the
    same bytes either way.

    Args:
        x: ``(T, K)`` bfloat16 / float16 / float32, ``x.stride(-1) == 1``; topk_ids, num_experts, expert_map,
            block_size: as ``align_routing`` (triton backend); scale_fmt, scale_layout, eps: as ``quantize_permute``.

    Returns:
        ``(plan, q_perm, scale_perm)``: ``RoutingPlan``, float8_e4m3fn ``(plan.num_rows, K)`` contiguous, float32
        ``(plan.num_rows, G)`` in ``scale_layout``; padding rows zero in both."""
    _check_high_precision(x, "x")
    check_choice(scale_fmt, "scale_fmt", SCALE_FMTS)
    check_choice(scale_layout, "scale_layout", SCALE_LAYOUTS)
    check_eps(eps)
    check_tensor(x, "x", dims=(2,), device=topk_ids.device, last_stride_one=True)
    _check_ids(topk_ids, num_experts, expert_map)
    T, K = x.shape
    if topk_ids.shape[0] != T:
        raise ValueError(f"x has {T} rows but topk_ids has {topk_ids.shape[0]}: one row of choices per token")
    if block_size < 16 or not is_pow2(block_size):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    k = topk_ids.shape[1]
    if not (use_triton(x) and K and align_quantize_permute_fits(T * k, block_size)):
        plan = align_routing(topk_ids, num_experts, expert_map=expert_map, block_size=block_size, backend="triton")
        return (plan, *quantize_permute(x, plan, scale_fmt=scale_fmt, scale_layout=scale_layout, eps=eps))
    bufs = _alloc_plan(topk_ids, num_experts, block_size)
    rows, G = bufs["sorted_token_ids"].numel(), cdiv(K, BLOCK)
    q = torch.empty((rows, K), dtype=FP8_DTYPE, device=x.device)
    s = alloc_scales((rows, G), scale_layout, x.device)
    has_map = expert_map is not None
    # one [block_size, 4 groups] tile per program at a 16-row alignment (64 rows x 1 group at 64)
    gpp = max(1, min(64 // block_size, _next_pow2(G)))
    align_quant_kernel[(rows // block_size, cdiv(G, gpp))](
        topk_ids, expert_map if has_map else topk_ids, x,
        bufs["sorted_token_ids"], bufs["expert_ids"], bufs["num_tokens_post_padded"], bufs["m_indices"],
        bufs["inv_perm"], bufs["expert_offsets"], bufs["expert_counts"], q, s,
        T * k, k, num_experts, expert_map.numel() if has_map else num_experts, rows, K,
        topk_ids.stride(0), topk_ids.stride(1), x.stride(0), x.stride(1), q.stride(0), q.stride(1),
        s.stride(0), s.stride(1),
        FP8_MAX=FP8_MAX, EPS=eps, UE8M0=scale_fmt == "ue8m0", **gpu_fast_paths(x),
        HAS_MAP=has_map, BLOCK_SIZE=block_size, E_POW2=_next_pow2(num_experts + 1),
        CHOICES=max(16, _next_pow2(T * k)), GROUP=BLOCK, GROUPS_PER_PROG=gpp, num_warps=4, **FP_FUSION, **pdl(x),
    )
    return _finish(bufs, T, k, num_experts, block_size), q, s


_ACT_PLANS = PlanCache()


def _act_plan(launch, q_shape, s_shape, s_strides, device):
    """A validated ``quantize_activation`` call replayed: fresh outputs in the same layout, the same kernel."""
    def run(x):
        q = torch.empty(q_shape, dtype=FP8_DTYPE, device=device)
        s = torch.empty_strided(s_shape, s_strides, dtype=torch.float32, device=device)
        launch(x, q, s)
        return q, s

    return run


WEIGHT_CONFIG_ENV = "FP8_DEEP_WEIGHT_QUANT_CONFIG"
# one program holds one (two) scale block(s) in registers: a larger tile spills or exceeds Triton's tensor limit
MAX_BLOCK_EDGE = 1024
MAX_BLOCK_ELEMS = 256 * 256
MAX_GROUP = 1024
MAX_GRID_YZ = 65535  # CUDA's limit on grid dimensions y and z
# one-layout weight tensors with fewer scale blocks than this run one block per program (_weight_config); the
# crossover lies between 14336 blocks (8x4096x7168: one per program faster) and 28672 (32x7168x2048: two)
SMALL_WEIGHT_BLOCKS = 16384
ACT_CONFIG_ENV = "FP8_DEEP_ACT_QUANT_CONFIG"
# A/B switch for the flat activation kernel's scale-store L2 policy: "evict_last" (default), "evict_first", "none"
ACT_SCALE_EVICT_ENV = "FP8_DEEP_ACT_SCALE_EVICT"
_ACT_SCALE_EVICTS = {"evict_last": "evict_last", "evict_first": "evict_first", "none": ""}
# A/B switch for the GPU-only instruction choices below: a comma list of the ones to turn off, e.g. "div,nan_select"
PLAIN_ENV = "FP8_DEEP_QUANT_PLAIN"
_FAST_PATHS = ("div", "nan_max", "nan_select")


def gpu_fast_paths(t: torch.Tensor) -> dict:
    """The quantizers' GPU-only instruction choices (bit-identical to the plain ones, which the interpreter runs):
    ``FMA_DIV``, reciprocal + FMA-corrected division (the interpreter's fma rounds twice); ``NAN_MAX``, one
    NaN-propagating max per element (the interpreter runs that custom reduction as a Python loop); ``NAN_SELECT``
    off, no per-element NaN select in a non-finite group (the GPU's NaN scale already makes every q the canonical
    positive NaN; the interpreter keeps a -NaN input's sign). ``FP8_DEEP_QUANT_PLAIN="div,nan_max,nan_select"``
    (any subset) turns them off for A/B runs. One environment read: this runs on every launch."""
    gpu = t.is_cuda and not interpreter_active()
    plain = os.environ.get(PLAIN_ENV)
    off = set(filter(None, plain.split(","))) if plain else set()
    if off - set(_FAST_PATHS):
        raise ValueError(f"{PLAIN_ENV}: unknown entries {sorted(off - set(_FAST_PATHS))}; known: {list(_FAST_PATHS)}")
    return dict(FMA_DIV=gpu and "div" not in off, NAN_MAX=gpu and "nan_max" not in off,
                NAN_SELECT=not gpu or "nan_select" in off)


WEIGHT_HINTS_ENV = "FP8_DEEP_WEIGHT_QUANT_HINTS"
# L2 eviction policies of the weight kernel, (LOAD_EVICT, STORE_EVICT, RELOAD_EVICT) by name
_WEIGHT_HINTS = {
    "none": ("", "", ""),
    "el": ("evict_last", "", ""),
    "el_sf": ("evict_last", "evict_first", ""),
    "el_rf": ("evict_last", "", "evict_first"),
}


def _weight_hints(with_transpose: bool) -> dict:
    """L2 policies of the weight kernel (H100 measurements, docs/performance-log.md run 64d43b9 and run c3d4751).

    The block is loaded ``evict_last``, torch.compile's (inductor's) own policy for this reduction. One layout: the
    call runs level with torch.compile (0.999-1.007x) instead of 0.991-0.995x. With the transposed copy (``el_rf``)
    the copy's column slices find the block in L2 and re-read it ``evict_first``: 1.35x torch.compile instead of
    1.32-1.33x.

    The cost lands on the next kernel, and torch.compile's kernel leaves the same (bench/diag_l2_after.py,
    32x4096x7168): a 32 MB buffer re-read around the call takes 39.6 us with ``el``, 39.4 us after torch.compile's
    kernel, 33.2 us with no hint. A 4096^3 matmul after it: 169.6 / 174.1 / 170.2 us. Neither re-reading the lines
    ``evict_first`` (all blocks, or only the last 64 MB, whole blocks or one element per line), nor ``evict_first``
    loads for the last 64 MB, nor ``applypriority`` (16-20% slower) gave that back. ``FP8_DEEP_WEIGHT_QUANT_HINTS``
    names a preset (``none`` for no hint). These are the tile kernel's (quant_weight_block_kernel); the stack kernel
    has torch.compile's two policies built in."""
    policies = _env_preset(WEIGHT_HINTS_ENV, _WEIGHT_HINTS, "el_rf" if with_transpose else "el")
    return dict(zip(("LOAD_EVICT", "STORE_EVICT", "RELOAD_EVICT"), policies))


def _env_preset(env: str, presets: dict, default: str):
    """``presets[name]`` for the preset ``env`` names (``default`` when unset): the L2-policy A/B switches."""
    val = os.environ.get(env) or default
    if val not in presets:
        raise ValueError(f"{env}={val!r}: expected one of {sorted(presets)}")
    return presets[val]


def _pinned(env: str, n: int):
    """A tuning sweep's pinned configuration: ``n`` (or more, the rest default) comma-separated integers."""
    val = os.environ.get(env)
    if not val:
        return None
    parts = [int(v) for v in val.split(",")]
    if len(parts) < n:
        raise ValueError(f"{env}={val!r}: expected at least {n} comma-separated integers")
    return parts


# ---------------------------------------------------------------------------------------------- separate tensors
def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


class GroupedWeightQuant:
    """One-launch 128x128 block quantization of ``n`` separate weights of one shape and layout (per-expert
    parameters, same-shape linears of many layers), prepared once and run as often as the weights change.

    Args:
        ws: sequence of ``n >= 1`` tensors ``(N, K)``, bfloat16 / float16 / float32, one dtype, one device and the
            same strides (each its own allocation or any views; they may overlap each other).
        out: optional ``(qs, scales)``: two sequences of ``n`` caller-owned outputs, ``qs[i]`` float8_e4m3fn
            ``(N, K)`` and ``scales[i]`` float32 ``(ceil(N/128), ceil(K/128))``, each sequence with one layout (e.g.
            a rollout engine's FP8 parameters, written in place). Default: a contiguous stack of each, ``n`` views.
        scale_fmt: ``"fp32"`` or ``"ue8m0"``.

    ``run()`` (or calling the object) quantizes every ``ws[i]`` into ``qs[i]``, ``scales[i]``, byte for byte what
    ``quantize_weight_blockwise(ws[i])`` gives, and returns ``(qs, scales)``. The kernel reads the tensors through a
    device table of their addresses, built here: the tensors must stay alive and where they are (an optimizer's
    in-place update keeps them; ``.data =`` reassignment or a reallocation does not: build a new one). On CUDA
    a run is one launch (a bound launch from the second run on) and never synchronizes with the host.
    Scale convention: ``w ~= q.float() * scale`` per block; edge blocks cover only real elements."""

    def __init__(self, ws: Sequence[torch.Tensor], *, out=None, scale_fmt: str = "fp32", _fresh_out: bool = False):
        # _fresh_out (fp8_deep.export only): ``out`` are views of a buffer the caller just allocated for them, in the
        # right shapes, dtypes and layouts (disjoint from every input by construction): their checks are skipped
        check_choice(scale_fmt, "scale_fmt", SCALE_FMTS)
        if isinstance(ws, torch.Tensor) or not isinstance(ws, (list, tuple)) or not ws:
            raise TypeError("ws must be a non-empty list or tuple of 2-D weight tensors (for one stacked (E, N, K) "
                            "tensor use quantize_weight_blockwise)")
        w0 = ws[0]
        _check_high_precision(w0, "ws[0]")
        if w0.dim() != 2:
            raise ValueError(f"ws[0] must be 2-D (N, K), got shape {tuple(w0.shape)}")
        for i, w in enumerate(ws):
            _check_high_precision(w, f"ws[{i}]")
            if (w.shape, w.dtype, w.device, w.stride()) != (w0.shape, w0.dtype, w0.device, w0.stride()):
                raise ValueError(f"ws[{i}] is {tuple(w.shape)} {w.dtype} on {w.device} with strides {w.stride()}, "
                                 f"ws[0] {tuple(w0.shape)} {w0.dtype} on {w0.device} with strides {w0.stride()}: "
                                 f"one group takes tensors of one shape, dtype, device and layout (group them by "
                                 f"these first, or .contiguous() the odd ones)")
        n = len(ws)
        N, K = w0.shape
        nb, kb = cdiv(N, BLOCK), cdiv(K, BLOCK)
        if nb > MAX_GRID_YZ:
            raise ValueError(f"ws[0] of shape {tuple(w0.shape)}: at most {MAX_GRID_YZ} block rows (N / 128) per "
                             f"tensor (CUDA grid limit)")
        dev = w0.device
        if out is None:
            q3 = torch.empty((n, N, K), dtype=FP8_DTYPE, device=dev)
            s3 = torch.empty((n, nb, kb), dtype=torch.float32, device=dev)
            qs, ss = list(q3.unbind(0)), list(s3.unbind(0))
        else:
            if not isinstance(out, (tuple, list)) or len(out) != 2 or any(
                    not isinstance(o, (tuple, list)) or len(o) != n for o in out):
                raise ValueError(f"out must be (qs, scales): two lists of {n} tensors, one per entry of ws")
            qs, ss = list(out[0]), list(out[1])
            for lst, what, shape, dt in ((qs, "out[0]", (N, K), FP8_DTYPE), (ss, "out[1]", (nb, kb), torch.float32)):
                for i, o in enumerate(lst[:1] if _fresh_out else lst):
                    check_out(o, f"{what}[{i}]", shape, dt, dev, strides=lst[0].stride())
            if not _fresh_out:
                check_outputs_disjoint([(f"ws[{i}]", w) for i, w in enumerate(ws)],
                                       [(f"out[0][{i}]", q) for i, q in enumerate(qs)]
                                       + [(f"out[1][{i}]", s) for i, s in enumerate(ss)])
        self.ws, self.qs, self.scales, self.scale_fmt = list(ws), qs, ss, scale_fmt
        self._launches = []
        self._empty = w0.numel() == 0
        self._triton = use_triton(w0) and not self._empty
        self._stream = None
        if self._triton:
            ptrs = [[t.data_ptr() for t in lst] for lst in (self.ws, qs, ss)]
            self._align16 = all(p % 16 == 0 for row in ptrs for p in row)
            for lo in range(0, n, MAX_GRID_YZ):  # grid z: at most MAX_GRID_YZ tensors per launch
                cols = [row[lo: lo + MAX_GRID_YZ] for row in ptrs]
                table = torch.tensor(cols, dtype=torch.int64)
                if dev.type == "cuda":  # pinned + non_blocking: no host synchronization (the allocator keeps it alive)
                    table = table.pin_memory().to(dev, non_blocking=True)
                self._launches.append([table, len(cols[0]), None])
            if dev.type == "cuda":
                self._stream = torch.cuda.current_stream(dev)  # the tables' copies are ordered on this stream

    def run(self):
        """Quantize every weight of the group into its outputs; returns ``(qs, scales)``."""
        if self._empty:
            return self.qs, self.scales
        if not self._triton:
            for w, q, s in zip(self.ws, self.qs, self.scales):
                rq, rs = reference.quantize_weight_blockwise(w, (BLOCK, BLOCK), self.scale_fmt)
                q.copy_(rq)
                s.copy_(rs)
            return self.qs, self.scales
        with torch.cuda.device(self.ws[0].device) if self.ws[0].is_cuda else contextlib.nullcontext():
            if self._stream is not None:
                self._follow_stream()
            for entry in self._launches:
                table, n, bound = entry
                if bound is not None:
                    bound(table)
                else:
                    entry[2] = self._launch(table, n)
        return self.qs, self.scales

    __call__ = run

    def _follow_stream(self):
        """A run on another stream than the tables were copied on waits for those copies once, and the tables are
        kept alive for it (``record_stream``). Not while capturing a CUDA graph: ``torch.cuda.graph`` orders the
        capture after the work queued before it."""
        cur = torch.cuda.current_stream(self.ws[0].device)
        if cur != self._stream and not torch.cuda.is_current_stream_capturing():
            cur.wait_stream(self._stream)
            for table, _, _ in self._launches:
                table.record_stream(cur)
            self._stream = cur

    def _launch(self, table, n):
        w0, q0, s0 = self.ws[0], self.qs[0], self.scales[0]
        N, K = w0.shape
        kb = cdiv(K, BLOCK)
        _, warps, blocks_k = _weight_config(BLOCK, BLOCK, False, n * cdiv(N, BLOCK) * kb)
        fast = gpu_fast_paths(w0)
        hints = _weight_hints(False)
        grid = (cdiv(kb, blocks_k), cdiv(N, BLOCK), n)
        args = (table, n, N, K, kb, *w0.stride(), *q0.stride(), *s0.stride())
        kwargs = dict(FP8_MAX=FP8_MAX, AMAX_EPS=WEIGHT_AMAX_EPS, UE8M0=self.scale_fmt == "ue8m0",
                      NAN_MAX=fast["NAN_MAX"], NAN_SELECT=fast["NAN_SELECT"], LOAD_EVICT=hints["LOAD_EVICT"],
                      STORE_EVICT=hints["STORE_EVICT"], W_DTYPE=_tl_dtype(w0.dtype), ALIGN16=self._align16,
                      BLOCK_N=BLOCK, BLOCK_K=BLOCK,
                      BLOCKS_K=blocks_k, num_warps=warps)
        compiled = quant_weight_table_kernel[grid](*args, **kwargs, **FP_FUSION)
        if not PLANS_ENABLED or interpreter_active():
            return None
        return bind_compiled(quant_weight_table_kernel, compiled, grid, args, kwargs, n_dynamic=1)


def quantize_weights_grouped(ws: Sequence[torch.Tensor], *, scale_fmt: str = "fp32", out=None):
    """``quantize_weight_blockwise`` of each of ``n`` separate same-shape weights, in one launch (see
    ``GroupedWeightQuant``, which also keeps the prepared launch for the next step). Returns ``(qs, scales)``,
    lists of ``n`` tensors: views of one contiguous ``(n, N, K)`` / ``(n, ceil(N/128), ceil(K/128))`` stack each
    unless ``out`` gives them."""
    return GroupedWeightQuant(ws, out=out, scale_fmt=scale_fmt).run()



# ---------------------------------------------------------------------------------------------- per-card tables
# bench/tune_quant.py measures these per card (fp8_deep/configs/<op>/<card>.json, looked up by fp8_deep.ops._tuned);
# without a table, or with a pinned configuration (the environment variables above), the built-in choices decide
_HINT_NAMES = ("none", "el", "el_sf", "el_rf")  # WeightQuantConfig.HINTS indexes these _WEIGHT_HINTS presets
BUILTIN = "built-in"  # a table entry where the launcher's own choice measured fastest


@dataclass(frozen=True)
class WeightQuantConfig(TileConfig):
    """A weight-quantizer table entry: the stack kernel, or the tile kernel's ``TCHUNK`` (transposed-copy column
    slice), ``num_warps``, ``BLOCKS_K`` (scale blocks per program along K, one layout only) and L2 policy preset
    ``HINTS`` (index into none, el, el_sf, el_rf). Every choice writes the same bytes."""
    _WHAT = "weight quantizer config"
    STACK: bool = False
    TCHUNK: int = 32
    num_warps: int = 8
    BLOCKS_K: int = 1
    HINTS: int = 1

    def __post_init__(self):
        self._check_pow2(("TCHUNK",), 16, 1024)
        self._check_pow2(("BLOCKS_K",), 1, 8)
        self._check_warps(16)
        if not 0 <= self.HINTS < len(_HINT_NAMES):
            raise ValueError(f"WeightQuantConfig.HINTS must index {_HINT_NAMES}, got {self.HINTS}")

    def check_layouts(self, with_transpose: bool) -> None:
        """The stack kernel and several scale blocks per program write one layout only."""
        if with_transpose and (self.STACK or self.BLOCKS_K != 1):
            raise ValueError("STACK=1 and BLOCKS_K > 1 apply to the one-layout kernel only (with_transpose=False)")


@dataclass(frozen=True)
class ActQuantConfig(TileConfig):
    """An activation-quantizer table entry: the flat kernel (``BLOCK_G`` groups per program) where it applies,
    else the tile kernel (``BLOCK_M`` rows x ``GROUPS_PER_PROG`` groups); ``num_warps``. The same bytes either way."""
    _WHAT = "activation quantizer config"
    FLAT: bool = True
    BLOCK_G: int = 16
    BLOCK_M: int = 32
    GROUPS_PER_PROG: int = 2
    num_warps: int = 4

    def __post_init__(self):
        self._check_pow2(("BLOCK_G", "BLOCK_M", "GROUPS_PER_PROG"), 1, 1024)
        self._check_warps(16)

    def as_choice(self, flat_ok: bool):
        """``_act_config``'s form: ``("flat", BLOCK_G, num_warps)`` or ``("tile", BLOCK_M, GROUPS_PER_PROG, ...)``."""
        if self.FLAT and flat_ok:
            return "flat", self.BLOCK_G, self.num_warps
        return "tile", self.BLOCK_M, self.GROUPS_PER_PROG, self.num_warps


def weight_quant_op(with_transpose: bool) -> str:
    """The table (``fp8_deep/configs/<op>/``) of the weight quantizer with one layout or both."""
    return "weight_quant_t" if with_transpose else "weight_quant"


def act_quant_op(tma_aligned: bool) -> str:
    """The table of the activation quantizer, by scale layout (column-major TMA-aligned or row-major)."""
    return "act_quant_tma" if tma_aligned else "act_quant_row"


def _tuned_weight_config(w, E, N, K, block_size, with_transpose) -> Optional[WeightQuantConfig]:
    """This card's measured choice for a ``(E, N, K)`` weight (key: ``(N, K)``, nearest ``E``), or None: no table,
    another block size, or a configuration pinned in the environment."""
    if tuple(block_size) != (BLOCK, BLOCK) or os.environ.get(WEIGHT_CONFIG_ENV) or os.environ.get(WEIGHT_HINTS_ENV):
        return None
    spec = tuned_config(weight_quant_op(with_transpose), w.device, E=E, N=N, K=K, rows=E)
    if spec is None or spec == BUILTIN:
        return None
    cfg = WeightQuantConfig.parse(spec)
    try:
        cfg.check_layouts(with_transpose)
    except ValueError as exc:
        raise ValueError(f"the weight quantizer's table (fp8_deep/configs/weight_quant_t/) holds {spec!r} for both "
                         f"layouts: {exc}; regenerate it (bench/tune_quant.py)") from None
    return cfg


def _tuned_act_config(x, M: int, K: int, group_size: int, s3, flat_ok: bool):
    """This card's measured choice for ``M`` rows of ``K`` (key: ``K``, nearest ``M``) in ``_act_config``'s form, or
    None: no table, not 128-wide groups, or a configuration pinned in the environment."""
    if group_size != BLOCK or os.environ.get(ACT_CONFIG_ENV):
        return None
    tma = s3.shape[2] > 1 and s3.stride(2) != 1  # groups not adjacent: column-major (TMA-aligned) scales
    spec = tuned_config(act_quant_op(tma), x.device, E=1, N=1, K=K, rows=M)
    return ActQuantConfig.parse(spec).as_choice(flat_ok) if spec not in (None, BUILTIN) else None

# one-layout 128x128 quantization of contiguous stacks of at least this many scale blocks (and fewer than 2**31
# elements, whole blocks only) runs quant_weight_stack_kernel, everything else quant_weight_block_kernel
STACK_WEIGHT_BLOCKS = SMALL_WEIGHT_BLOCKS
_INT32_ELEMS = 2 ** 31


def _stack_kernel_applies(w3, q3, s3, block_size, with_transpose: bool) -> bool:
    """Whether ``quant_weight_stack_kernel`` runs: one layout, 128x128 blocks, ``w``, ``q`` and ``scale``
    contiguous, ``N`` and ``K`` multiples of 128, at least STACK_WEIGHT_BLOCKS blocks and fewer than 2**31 elements
    (its offsets are int32), and no pinned tile configuration (``FP8_DEEP_WEIGHT_QUANT_CONFIG`` selects the tile
    kernel, for A/B runs).

    H100, x torch.compile, do_bench, paired over interleaved rounds (docs/performance-log.md, run 2d7c020):
    32x4096x7168 / 32x7168x2048 0.9998 / 0.9999 (compile against itself 0.9997 / 1.0001), the tile kernel in the
    same run 0.9992 / 0.9990; on smaller tensors (7168x18432, 4096x7168, 8x4096x7168) the tile kernel leads
    torch.compile by 1-3% and keeps them. Each K compiles its own kernel (K and K / 128 are constexpr)."""
    _, N, K = w3.shape
    return (not with_transpose and tuple(block_size) == (BLOCK, BLOCK) and N % BLOCK == 0 and K % BLOCK == 0
            and w3.numel() // (BLOCK * BLOCK) >= STACK_WEIGHT_BLOCKS and w3.numel() < _INT32_ELEMS
            and not os.environ.get(WEIGHT_CONFIG_ENV)
            and w3.is_contiguous() and q3.is_contiguous() and s3.is_contiguous())


def _weight_config(bn: int, bk: int, with_transpose: bool, n_blocks: int):
    """(TCHUNK, num_warps, BLOCKS_K) of the weight kernel: the column slice of the transposed copy, warps per
    program, scale blocks per program along K (one layout only), for a tensor of ``n_blocks`` scale blocks.

    (Contiguous one-layout stacks of whole 128x128 blocks take quant_weight_stack_kernel instead from
    STACK_WEIGHT_BLOCKS on, unless a configuration is pinned: _stack_kernel_applies.)
    One layout: two blocks per program and 8 warps (172 registers, one program per SM) from SMALL_WEIGHT_BLOCKS
    blocks on; below, one block per program and 16 warps (58 registers, two per SM): measured faster on tensors of
    few waves, not explained by the last wave alone (bench/diag_weight_tail.py). H100, CUDA-graph replays on cold
    inputs, x torch.compile (run f9ad68d, docs/performance-log.md):
    4096x7168 1.037 vs 0.972, 7168x18432 1.009 vs 0.999, 8x4096x7168 1.006 vs 1.004; 32x7168x2048 0.999 vs 1.000,
    32x4096x7168 0.998 vs 1.000. (4 warps measured 27% slower; 16 warps with two blocks the same as 8.)
    With the transposed copy: 64-column slices and 16 warps (H200: 1.28-1.31x torch.compile vs 1.19-1.25x with
    32 / 8; H100: 1.30-1.33x). ``FP8_DEEP_WEIGHT_QUANT_CONFIG="TCHUNK,num_warps[,BLOCKS_K]"`` pins them.
    (Streaming ``.cs`` FP8 stores measured no gain, run 8055eb4.)"""
    pinned = _pinned(WEIGHT_CONFIG_ENV, 2)
    if pinned:
        if len(pinned) > 3:
            raise ValueError(f"{WEIGHT_CONFIG_ENV}: expected 'TCHUNK,num_warps[,BLOCKS_K]'")
        tchunk, warps, blocks_k = (pinned + [1])[:3]
        try:  # the table entries' checks
            WeightQuantConfig(TCHUNK=tchunk, num_warps=warps, BLOCKS_K=blocks_k).check_layouts(with_transpose)
        except ValueError as exc:
            raise ValueError(f"{WEIGHT_CONFIG_ENV}: {exc}") from None
        return tchunk, warps, blocks_k
    if bn * bk < 128 * 128:
        return 32, 4, 1
    if bn * bk > 128 * 128:  # one larger block per program, spread over more threads
        return 32, 16, 1
    if with_transpose:
        return 64, 16, 1
    return (32, 8, 2) if n_blocks >= SMALL_WEIGHT_BLOCKS else (32, 16, 1)


def _act_config(M: int, flat_ok: bool):
    """``("flat", BLOCK_G, num_warps)`` or ``("tile", BLOCK_M, GROUPS_PER_PROG, num_warps)``.

    flat: BLOCK_G consecutive groups per program, one contiguous run of a contiguous ``x`` (needs whole groups:
    ``K % group_size == 0``); tile: a (BLOCK_M, GROUPS_PER_PROG * group_size) tile, any K, and contiguous stores of
    column-major (TMA-aligned) scales. ~16 KB of input per program keeps enough bytes in flight per SM; small M
    shrinks the tile so that a decode-size batch still spreads over the SMs. ``FP8_DEEP_ACT_QUANT_CONFIG`` pins
    one: ``"BLOCK_M,GROUPS_PER_PROG,num_warps"`` (tile) or ``"flat,BLOCK_G,num_warps"`` (falls back to the tile
    default where flat does not apply)."""
    val = os.environ.get(ACT_CONFIG_ENV)
    if val and val.startswith("flat"):
        parts = [int(v) for v in val.split(",")[1:]]
        if len(parts) != 2 or not is_pow2(parts[0]) or parts[1] not in (1, 2, 4, 8, 16):
            raise ValueError(f"{ACT_CONFIG_ENV}={val!r}: expected 'flat,BLOCK_G,num_warps' with BLOCK_G a power of "
                             f"two and num_warps in 1, 2, 4, 8, 16")
        if flat_ok:
            return ("flat", *parts)
    elif val:
        bm, gp, nw = _pinned(ACT_CONFIG_ENV, 3)[:3]
        if not (is_pow2(bm) and is_pow2(gp)):
            raise ValueError(f"{ACT_CONFIG_ENV}: BLOCK_M and GROUPS_PER_PROG must be powers of two")
        return "tile", bm, gp, nw
    if flat_ok:
        # H100: 16 groups / 4 warps 1.00-1.02x torch.compile at M = 4096-32768 (row-major scales), the 32x256
        # tile 0.86-0.95x; 0.98-1.01x vs 0.96-0.97x with TMA-aligned scales (docs/performance-log.md)
        return "flat", 16, 4
    if M >= 1024:
        return "tile", 32, 2, 4
    if M >= 128:
        return "tile", 16, 2, 4
    return "tile", 8, 1, 2


def _act_scale_evict() -> str:
    """The flat activation kernel's scale-store L2 policy: ``evict_last`` unless ``FP8_DEEP_ACT_SCALE_EVICT``
    names another (``evict_first``, ``none``) for an A/B run. With TMA-aligned scales at M = 4096 / 8192 it took
    the kernel from 81.8 / 88.8% of the copy rate to 84.0 / 91.6% (H100, run 055c4f4; the prototype,
    bench/proto_act_tma.py, is in commit 88f231e)."""
    return _env_preset(ACT_SCALE_EVICT_ENV, _ACT_SCALE_EVICTS, "evict_last")


def to_tma_aligned_scales(scale: torch.Tensor) -> torch.Tensor:
    """Row-major (or any) ``(M, G)`` / ``(B, M, G)`` float32 scales -> DeepGEMM's MN-major TMA-aligned layout.

    Returns ``scale`` itself when it already has that layout (no copy)."""
    check_tensor(scale, "scale", dtypes=(torch.float32,), dims=(2, 3))
    if scale.numel() == 0 or tuple(scale.stride()) == tma_aligned_scale_strides(scale.shape):
        return scale
    out = alloc_scales(scale.shape, "tma_aligned", scale.device)
    out.copy_(scale)
    return out


def dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor, block_size: Tuple[int, int] = (BLOCK, BLOCK),
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q.float() * scale`` with each scale broadcast over its block; ``block_size=(1, 128)`` for activations.

    q: FP8 ``(..., N, K)``; scale: float32 ``(..., ceil(N/bn), ceil(K/bk))``. Returns ``dtype``, shape of ``q``."""
    check_tensor(q, "q", dtypes=(FP8_DTYPE,))
    check_tensor(scale, "scale", dtypes=(torch.float32,), device=q.device)
    if not (is_int_pair(block_size) and min(block_size) >= 1):
        raise ValueError(f"block_size must be two positive ints (bn, bk), got {block_size!r}")
    bn, bk = block_size
    if q.dim() < 2:
        raise ValueError(f"q must be at least 2-D (..., N, K), got shape {tuple(q.shape)}")
    expect = (*q.shape[:-2], cdiv(q.shape[-2], bn), cdiv(q.shape[-1], bk))
    if tuple(scale.shape) != expect:
        raise ValueError(f"scale must have shape {expect} for q {tuple(q.shape)} and block_size {block_size}, "
                         f"got {tuple(scale.shape)}")
    return reference.dequantize_blockwise(q, scale, block_size).to(dtype)
