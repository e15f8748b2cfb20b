"""The FP8 MoE forward: quantize -> align/permute -> grouped GEMM 1 -> SwiGLU + requantize -> grouped GEMM 2 -> combine.

Everything between the routing tensors and the output stays on the device: buffers are sized for the worst case on
the host (``max_padded_rows``), kernels read the real counts, so the call never synchronizes and can be captured in
a CUDA graph. The grouped-GEMM backend is handed in by the public API (``fp8_deep.api``), so this module never
imports an optional dependency.
"""
from __future__ import annotations

import os

import torch

from ..numerics import FP8_DTYPE, HIGH_PRECISION_DTYPES, SCALE_FMTS, cdiv
from ..ops import _registry, align_quantize_permute, quantize_activation, quantize_permute, quantize_weight_blockwise
from ..ops.quant import align_quantize_permute_fits
from ..ops._checks import check_choice, check_tensor
from ..ops._tuned import tuned_config
from ..ops.combine import moe_combine
from ..ops.decode import (decode_counters, decode_fits, moe_decode_gemm1, moe_decode_gemm2, moe_routed_gemm1,
                          moe_routed_gemm2)
from ..ops.grouped_gemm import (CONFIG_ENV as GEMM_CONFIG_ENV, GemmConfig, TritonGroupedGemm, _fused_swiglu_mode,
                                gather_config, gather_gemm2_config, grouped_gemm_fp8_gather)
from ..ops.routing import align_routing, check_topk_ids, permute_rows, routing_check_enabled
from ..ops.swiglu import silu_mul_quantize
from .autograd import MoEWeightsFP8, check_moe_weights_fp8, moe_forward_train, needs_grad, quantize_moe_weights

__all__ = ["moe_forward_impl", "validate_moe_inputs", "quantize_expert_weights", "forward_path"]


def _routing_checks_enabled(t: torch.Tensor) -> bool:
    """Range-checking ``topk_ids`` needs their values on the host. CPU tensors: always. CUDA tensors: only with
    ``FP8_DEEP_CHECK_ROUTING=1`` and outside CUDA-graph capture, because the sync it costs exposes the whole
    launch overhead of the forward (measured on an H100 at T=128: 5.62 ms with the check, 4.35 ms without).
    Unchecked out-of-range ids are dropped by the alignment kernel like a remote expert's (no out-of-bounds
    access; that choice contributes nothing)."""
    if not t.is_cuda:
        return True
    return routing_check_enabled() and not torch.cuda.is_current_stream_capturing()


def validate_moe_inputs(hidden_states, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, expert_map):
    check_tensor(hidden_states, "hidden_states", dtypes=(torch.bfloat16, torch.float16), dims=(2,),
                 last_stride_one=True)
    dev = hidden_states.device
    T, H = hidden_states.shape
    # K-major weights (unit last stride): what both GEMM backends stream
    check_tensor(w13, "w13", dtypes=HIGH_PRECISION_DTYPES + (FP8_DTYPE,), dims=(3,), device=dev, last_stride_one=True)
    check_tensor(w2, "w2", dtypes=HIGH_PRECISION_DTYPES + (FP8_DTYPE,), dims=(3,), device=dev, last_stride_one=True)
    E, two_i, h13 = w13.shape
    if h13 != H:
        raise ValueError(f"w13 must be (E, 2I, H) with H = hidden_states.shape[1] = {H}, got {tuple(w13.shape)}")
    if two_i % 2:
        raise ValueError(f"w13 must be (E, 2I, H) with gate rows [0, I) and up rows [I, 2I); 2I = {two_i} is odd")
    inter = two_i // 2
    if tuple(w2.shape) != (E, H, inter):
        raise ValueError(f"w2 must be (E, H, I) = {(E, H, inter)} to match w13 {tuple(w13.shape)}, got {tuple(w2.shape)}")
    fp8 = w13.dtype == FP8_DTYPE
    if (w2.dtype == FP8_DTYPE) != fp8:
        raise TypeError(f"w13 and w2 must both be FP8 (with scales) or both high precision, got {w13.dtype} and {w2.dtype}")
    if fp8:
        for name, s, shape in (("w13_scale", w13_scale, (E, cdiv(two_i, 128), cdiv(H, 128))),
                               ("w2_scale", w2_scale, (E, cdiv(H, 128), cdiv(inter, 128)))):
            if s is None:
                raise ValueError(f"FP8 weights need {name} (float32 {shape}, 128x128 block dequantization scales, "
                                 f"the checkpoint's weight_scale_inv)")
            check_tensor(s, name, dtypes=(torch.float32,), device=dev)
            if tuple(s.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(s.shape)}")
    elif w13_scale is not None or w2_scale is not None:
        raise ValueError("w13_scale/w2_scale are only for FP8 weights; high-precision weights are quantized here")
    check_tensor(topk_weights, "topk_weights", dtypes=(torch.float32, torch.bfloat16, torch.float16), dims=(2,),
                 device=dev)
    check_tensor(topk_ids, "topk_ids", dtypes=(torch.int32, torch.int64), dims=(2,), device=dev)
    if topk_ids.shape[0] != T or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_ids and topk_weights must both be (T, top_k) with T = {T}, got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    if expert_map is not None:
        check_tensor(expert_map, "expert_map", dtypes=(torch.int32, torch.int64), dims=(1,), device=dev)
    if T and _routing_checks_enabled(topk_ids):
        check_topk_ids(topk_ids, E, expert_map)
    return E, H, inter, fp8


def _empty_output(hidden_states, w13, w2, topk_weights):
    """``(0, H)`` output of a call with no tokens, connected to every input that requires grad (their gradients
    come back as zeros, not None)."""
    H = hidden_states.shape[1]
    zero = sum((t.reshape(-1)[:0].sum() for t in (hidden_states, w13, w2, topk_weights) if t.requires_grad),
               hidden_states.new_zeros(()))
    return hidden_states.new_zeros((0, H)) + zero.to(hidden_states.dtype)


FUSED_QUANT_PERMUTE_ENV = "FP8_DEEP_FUSED_QUANT_PERMUTE"
# routed rows up to which the forward quantizes straight into the expert segments (ops.quantize_permute: one launch
# instead of two; each token read top_k times): decode-sized calls, where launches rather than bytes bound the MoE.
# Same bytes either way. Measured on an H100 (2026-12-07 at bec78b1, Qwen3-30B-A3B-sized, each launch alone as a
# graph, bench/diag/diag_moe_host.py): 2.0 us fused against 1.4 + 1.8 us at T=1, 4.0 against 1.6 + 2.9 us at T=16;
# the threshold itself (where the top_k re-reads of each token outweigh the saved launch) is not measured
FUSED_QUANT_PERMUTE_MAX_ROWS = 1024


def _fuse_quantize_permute(routed_rows: int, x: torch.Tensor) -> bool:
    """Whether the forward fuses the activation quantization into the permutation: ``FP8_DEEP_FUSED_QUANT_PERMUTE``
    ``1`` always, ``0`` never, unset up to ``FUSED_QUANT_PERMUTE_MAX_ROWS`` routed rows, unless vLLM's activation
    quantizer would run (installed, CUDA input, whole 128-groups): vLLM's ops are used when vLLM is installed (the
    same bytes for finite input; its non-finite policy differs, and a token's output must not depend on T)."""
    env = os.environ.get(FUSED_QUANT_PERMUTE_ENV)
    if env in ("0", "1"):
        return env == "1"
    if env:
        raise ValueError(f"{FUSED_QUANT_PERMUTE_ENV}={env!r}: expected 0 or 1 (unset: by size)")
    if x.is_cuda and x.shape[-1] % 128 == 0 and _registry.available("activation_quant", "vllm"):
        return False
    return routed_rows <= FUSED_QUANT_PERMUTE_MAX_ROWS


FUSED_ALIGN_ENV = "FP8_DEEP_FUSED_ALIGN_QUANT"


def _fuse_align(routed_rows: int, block_size: int, x: torch.Tensor, expert_map) -> bool:
    """Whether the routing plan comes out of the quantize-permute launch too (``ops.align_quantize_permute``: one
    launch instead of two, the same plan and bytes): where the forward fuses the quantization into the permutation,
    the choices fit its one-launch tile and our alignment kernel is the one that would run (vLLM's, when installed,
    is preferred for CUDA ids without an expert map). Opt-in, ``FP8_DEEP_FUSED_ALIGN_QUANT=1``: bitwise the two
    launches on an H100 (tests/test_align_quant.py, 2026-12-07), but not faster there (Qwen3-30B-A3B T=1 +2%, the
    DeepSeek-V3 TP8 shard T=16 -8%: every program counts all choices; docs/performance.md)."""
    env = os.environ.get(FUSED_ALIGN_ENV)
    if env not in (None, "", "0", "1"):
        raise ValueError(f"{FUSED_ALIGN_ENV}={env!r}: expected 0 or 1 (unset: off)")
    if env != "1" or not align_quantize_permute_fits(routed_rows, block_size):
        return False
    return not (x.is_cuda and expert_map is None and _registry.available("moe_align", "vllm"))


DECODE_ENV = "FP8_DEEP_DECODE"


def _use_decode(num_choices: int, hidden: int, inter: int, x: torch.Tensor, gemm, return_stages: bool,
                num_experts: int = 0) -> bool:
    """Whether the forward takes the decode path (``ops.decode``: two GEMMs that find their own rows, quantizing on
    load, and the combine; two launches (the combine in GEMM2's tail, ``_decode_fused_combine``) or three instead
    of six, the same bytes for finite input). ``FP8_DEEP_DECODE=1`` always, ``0`` never; unset, where this card's
    measured table says it is faster than the regular chain (``fp8_deep/configs/moe_decode/<card>.json``, written by
    ``bench/tune_decode.py``; no table or no entry near these choices: the regular chain). Only for our Triton
    backend, within ``decode_fits`` (T * top_k <= 128 choices, H and I multiples of 128), and not where vLLM's
    activation quantizer would run (see ``_fuse_quantize_permute``)."""
    return _take_path("decode", DECODE_ENV, decode_fits(num_choices, hidden, inter), num_choices, hidden, inter, x,
                      gemm, return_stages, num_experts)


def _take_path(path: str, env_name: str, fits: bool, num_choices: int, hidden: int, inter: int, x, gemm,
               return_stages: bool, num_experts: int, quantizes_in_kernel: bool = True) -> bool:
    """The rule the decode, routed and gather paths share: ``env_name`` 1 / 0 / unset (the card's ``moe_decode``
    table names ``path`` at the nearest choices), within what the path can take (``fits``, our Triton backend, no
    stages asked for, the chain not pinned: ``_chain_pinned``) and, for a path that quantizes the tokens inside its
    GEMM (``quantizes_in_kernel``), not where vLLM's activation quantizer would run."""
    env = os.environ.get(env_name)
    if env not in (None, "", "0", "1"):
        raise ValueError(f"{env_name}={env!r}: expected 0 or 1 (unset: the card's measured table)")
    if env == "0" or return_stages or gemm.name != "triton" or not fits or _chain_pinned(gemm):
        return False
    if quantizes_in_kernel and x.is_cuda and _registry.available("activation_quant", "vllm"):
        return False
    if env == "1":
        return True
    return tuned_config("moe_decode", x.device, E=max(1, num_experts), N=2 * inter, K=hidden,
                        rows=max(1, num_choices)) == path


def _chain_pinned(gemm) -> bool:
    """Whether the caller pinned how the regular chain's GEMMs run, in ways the other paths do not follow: a backend
    built with its own config, a pinned ``FP8_DEEP_GEMM_CONFIG`` that changes the numerics (``ACC_K`` / ``UPCAST``),
    or the fused GEMM1 + SwiGLU (``FP8_DEEP_FUSED_SWIGLU``). Then every call takes the chain, so that a token's output
    never depends on which path its batch size picked."""
    if getattr(gemm, "config", None) is not None or _fused_swiglu_mode() is not None:
        return True
    pinned = os.environ.get(GEMM_CONFIG_ENV)
    if not pinned:
        return False
    cfg = GemmConfig.parse(pinned)
    return bool(cfg.ACC_K or cfg.UPCAST)


ROUTED_ENV = "FP8_DEEP_ROUTED"


def _use_routed(hidden: int, inter: int, x: torch.Tensor, gemm, return_stages: bool, num_choices: int = 0,
                num_experts: int = 0) -> bool:
    """Whether the forward takes the routed path where the decode path does not apply: the routing plan as usual,
    then ``ops.moe_routed_gemm1`` (each row's token quantized as GEMM1 loads it: no quantize and no permute launch)
    and ``ops.moe_routed_gemm2`` (SwiGLU + requantization as GEMM2 loads h: no SwiGLU launch), then the combine:
    four launches instead of six or seven, the same bytes. ``FP8_DEEP_ROUTED=1`` always, ``0`` never; unset, where
    this card's measured table names it (``moe_decode``, as for ``_use_decode``; none yet: off). Its tiles are the
    small-M swap-AB ones, meant for up to some tens of rows per expert. Same conditions as the decode path (our
    Triton backend, H and I multiples of 128, not where vLLM's activation quantizer would run)."""
    return _take_path("routed", ROUTED_ENV, hidden % 128 == 0 and inter % 128 == 0, num_choices, hidden, inter, x,
                      gemm, return_stages, num_experts)


GATHER_ENV = "FP8_DEEP_GATHER"


def _use_gather(hidden: int, inter: int, x: torch.Tensor, gemm, return_stages: bool, num_choices: int,
                num_experts: int) -> bool:
    """Whether the forward's GEMM1 reads the quantized tokens through the routing plan (``ops.grouped_gemm_fp8_gather``)
    instead of a permuted copy of them: no permute launch, and the copy (``top_k`` times the tokens' FP8 bytes,
    written then read back from DRAM) is never made; the rest is the regular chain (SwiGLU, GEMM2 by the backend's
    pick, combine), the same bytes. ``FP8_DEEP_GATHER=1`` always, ``0`` never; unset, where this card's
    ``moe_decode`` table names it (``bench/tune_decode.py``; none yet: off). For our Triton backend; the tokens are
    quantized by ``quantize_activation`` (vLLM's op where installed, as the chain)."""
    return _take_path("gather", GATHER_ENV, True, num_choices, hidden, inter, x, gemm, return_stages, num_experts,
                      quantizes_in_kernel=False)


def forward_path(num_choices: int, num_experts: int, hidden: int, inter: int, x: torch.Tensor, gemm,
                 return_stages: bool = False) -> str:
    """How ``moe_forward_impl`` computes an inference call of ``num_choices = T * top_k`` routed choices with the
    grouped-GEMM backend ``gemm``: ``"decode"`` (``_use_decode``), ``"routed"``, ``"gather"`` or ``"chain"`` (the
    regular one), checked in that order. Benchmarks report it next to their timings."""
    if _use_decode(num_choices, hidden, inter, x, gemm, return_stages, num_experts):
        return "decode"
    if _use_routed(hidden, inter, x, gemm, return_stages, num_choices, num_experts):
        return "routed"
    if _use_gather(hidden, inter, x, gemm, return_stages, num_choices, num_experts):
        return "gather"
    return "chain"


DECODE_COMBINE_ENV = "FP8_DEEP_DECODE_COMBINE"


def _decode_fused_combine() -> bool:
    """The decode path sums each token's rows in GEMM2's tail (two launches in all) unless
    ``FP8_DEEP_DECODE_COMBINE=0`` (then the combine kernel runs after it: three launches, for A/B runs)."""
    env = os.environ.get(DECODE_COMBINE_ENV)
    if env not in (None, "", "0", "1"):
        raise ValueError(f"{DECODE_COMBINE_ENV}={env!r}: expected 0 or 1 (unset: 1)")
    return env != "0"


def quantize_expert_weights(w13, w2, scale_fmt):
    """High-precision ``w13 (E, 2I, H)``, ``w2 (E, H, I)`` -> FP8 + 128x128 scales (one fused pass each)."""
    q13, s13 = quantize_weight_blockwise(w13, scale_fmt=scale_fmt)
    q2, s2 = quantize_weight_blockwise(w2, scale_fmt=scale_fmt)
    return q13, s13, q2, s2


def moe_forward_impl(hidden_states, w13, w2, topk_weights, topk_ids, *, select_gemm, w13_scale=None,
                     w2_scale=None, activation="silu", expert_map=None, scale_fmt="fp32", out=None,
                     return_stages=False, fp8_weights=None):
    """See ``fp8_deep.moe_forward``. ``select_gemm(device=, rows_per_expert=, hidden=, inter=, num_experts=)`` returns
    the grouped-GEMM backend object for the validated shapes (``name``, ``a_scale_layout``, ``row_alignment`` (segment
    alignment it needs), ``gemm(a, a_scale, b, b_scale, plan, out=None)``); the public API and ``FP8MoE`` pass
    ``ops.backend.select_grouped_gemm`` bound to their backend choice. ``return_stages`` also returns the intermediates (tests).

    With grad mode on and any of ``hidden_states``, ``w13``, ``w2``, ``topk_weights`` requiring grad, the call goes
    through the autograd Function of ``fp8_deep.moe.autograd`` (``out=`` and ``return_stages`` are then refused).
    ``fp8_weights`` (``MoEWeightsFP8``) supplies the high-precision weights' FP8 forms, already quantized."""
    if activation != "silu":
        raise ValueError(f"activation must be 'silu' (SwiGLU: silu(gate) * up), got {activation!r}")
    check_choice(scale_fmt, "scale_fmt", SCALE_FMTS)
    E, H, inter, fp8 = validate_moe_inputs(hidden_states, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale,
                                           expert_map)
    T = hidden_states.shape[0]
    gemm = select_gemm(device=hidden_states.device, rows_per_expert=T * topk_ids.shape[1] / E, hidden=H,
                       inter=inter, num_experts=E)
    if out is not None:
        check_tensor(out, "out", dtypes=(hidden_states.dtype,), dims=(2,), device=hidden_states.device)
        if tuple(out.shape) != (T, H):
            raise ValueError(f"out must have shape {(T, H)}, got {tuple(out.shape)}")
    if fp8_weights is not None:
        if fp8:
            raise ValueError("fp8_weights is for high-precision master weights w13/w2; FP8 w13/w2 carry their scales "
                             "in w13_scale/w2_scale")
        check_moe_weights_fp8(fp8_weights, E, H, inter, hidden_states.device)
    if needs_grad(hidden_states, w13, w2, topk_weights):
        for name, w in (("w13", w13), ("w2", w2)):
            if fp8 and w.requires_grad:
                raise TypeError(f"{name} is FP8 and requires grad: FP8 weights cannot be trained; pass the "
                                f"high-precision master weights (bf16/fp16/fp32) or freeze {name} "
                                f"(requires_grad_(False))")
        if out is not None or return_stages:
            raise ValueError("out= and return_stages are for inference calls; with autograd the output is a new "
                             "tensor (run under torch.no_grad() to use them)")
        if fp8:  # frozen FP8 experts: the transposed copies are exact transposes of the blocks
            fw = MoEWeightsFP8(w13, w13_scale, w2, w2_scale, w13.transpose(1, 2).contiguous(),
                               w13_scale.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous(),
                               w2_scale.transpose(1, 2).contiguous())
        elif fp8_weights is not None:
            fw = fp8_weights  # moe_forward_train refuses a set without the transposed copies
        else:
            fw = quantize_moe_weights(w13, w2, scale_fmt=scale_fmt, with_transpose=True)
        if T == 0:  # no tokens: zero gradients through a graph that still connects every input
            return _empty_output(hidden_states, w13, w2, topk_weights)
        return moe_forward_train(hidden_states, w13, w2, topk_weights, topk_ids, fw=fw, gemm=gemm,
                                 expert_map=expert_map, scale_fmt=scale_fmt)
    if T == 0:
        return out if out is not None else hidden_states.new_empty((0, H))
    if fp8_weights is not None:
        q13, s13, q2, s2 = fp8_weights.w13, fp8_weights.w13_scale, fp8_weights.w2, fp8_weights.w2_scale
    elif fp8:
        q13, s13, q2, s2 = w13, w13_scale, w2, w2_scale
    else:
        q13, s13, q2, s2 = quantize_expert_weights(w13, w2, scale_fmt)

    path = forward_path(T * topk_ids.shape[1], E, H, inter, hidden_states, gemm, return_stages)
    if path == "decode":
        fused = _decode_fused_combine()
        counters = decode_counters(H, hidden_states.device) if fused else None
        h, inv = moe_decode_gemm1(hidden_states, topk_ids, q13, s13, expert_map=expert_map, scale_fmt=scale_fmt,
                                  counters=counters)
        if fused:
            return moe_decode_gemm2(h, topk_ids, q2, s2, expert_map=expert_map, scale_fmt=scale_fmt,
                                    combine=(topk_weights, inv, counters), out=out, out_dtype=hidden_states.dtype)
        o = moe_decode_gemm2(h, topk_ids, q2, s2, expert_map=expert_map, scale_fmt=scale_fmt)
        return moe_combine(o, inv, topk_weights, out=out, out_dtype=hidden_states.dtype)
    if path == "routed":
        plan = align_routing(topk_ids, E, expert_map=expert_map, block_size=gemm.row_alignment)
        h = moe_routed_gemm1(hidden_states, plan, q13, s13, scale_fmt=scale_fmt)
        o = moe_routed_gemm2(h, plan, q2, s2, scale_fmt=scale_fmt)
        return moe_combine(o, plan.inv_perm, topk_weights, out=out, out_dtype=hidden_states.dtype)
    layout = gemm.a_scale_layout
    if path == "gather":
        P, dev = T * topk_ids.shape[1], hidden_states.device
        cfg = gather_config(E, q13.shape[1], H, P, dev)
        # GEMM2's tile: the card's gather table where it measured one on this plan, else the backend's own pick
        cfg2 = gather_gemm2_config(E, H, inter, P, dev)
        align = max(gemm.row_alignment, cfg.BLOCK_M, cfg2.BLOCK_M if cfg2 is not None and cfg2.BLOCK_MAP else 1)
        plan = align_routing(topk_ids, E, expert_map=expert_map, block_size=align)
        qx, sx = quantize_activation(hidden_states, scale_fmt=scale_fmt)  # row-major: a row's scales read together
        h = grouped_gemm_fp8_gather(qx, sx, q13, s13, plan, config=cfg)
        a2, sa2 = silu_mul_quantize(h, m_indices=plan.m_indices, scale_fmt=scale_fmt, scale_layout=layout)
        o = (gemm if cfg2 is None else TritonGroupedGemm(cfg2)).gemm(a2, sa2, q2, s2, plan)
        return moe_combine(o, plan.inv_perm, topk_weights, out=out, out_dtype=hidden_states.dtype)
    fuse_qp = _fuse_quantize_permute(T * topk_ids.shape[1], hidden_states)
    if fuse_qp and _fuse_align(T * topk_ids.shape[1], gemm.row_alignment, hidden_states, expert_map):
        plan, a1, sa1 = align_quantize_permute(hidden_states, topk_ids, E, expert_map=expert_map,
                                               block_size=gemm.row_alignment, scale_fmt=scale_fmt, scale_layout=layout)
    else:
        plan = align_routing(topk_ids, E, expert_map=expert_map, block_size=gemm.row_alignment)
        if fuse_qp:
            a1, sa1 = quantize_permute(hidden_states, plan, scale_fmt=scale_fmt, scale_layout=layout)
        else:
            qx, sx = quantize_activation(hidden_states, scale_fmt=scale_fmt)
            a1, sa1 = permute_rows(qx, sx, plan, scale_layout=layout)
    if hasattr(gemm, "gemm_swiglu") and not return_stages:
        # GEMM1 with SwiGLU + requantization in its epilogue where the backend can (same bytes, one launch less)
        h = None
        a2, sa2 = gemm.gemm_swiglu(a1, sa1, q13, s13, plan, scale_fmt=scale_fmt, scale_layout=layout)
    else:
        h = gemm.gemm(a1, sa1, q13, s13, plan)
        a2, sa2 = silu_mul_quantize(h, m_indices=plan.m_indices, scale_fmt=scale_fmt, scale_layout=layout)
    o = gemm.gemm(a2, sa2, q2, s2, plan)
    res = moe_combine(o, plan.inv_perm, topk_weights, out=out, out_dtype=hidden_states.dtype)
    if return_stages:
        return res, dict(plan=plan, a1=a1, sa1=sa1, h=h, a2=a2, sa2=sa2, o=o)
    return res
