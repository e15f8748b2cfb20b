"""Training: the FP8 MoE as a ``torch.autograd.Function``, by DeepSeek-V3's recipe (technical report, section 3.3).

Forward (as the inference forward, plus what the backward needs): ``x`` quantized 1x128 and permuted into 128-row
aligned expert segments (``a1``, cached in FP8 with its scales); GEMM1; SwiGLU + requantization, which also caches
the SwiGLU input ``h`` in FP8 (each half in 1x128 groups: ``reference.quantize_gate_up``); GEMM2; weighted combine.
Nothing in BF16 is kept: per routed row the cache is ``H + 2I`` FP8 bytes plus scales.

Backward, all six GEMMs' inputs in FP8 E4M3 with FP32 promotion every 128 of K:

1. ``dy`` quantized 1x128 per token and permuted like ``x`` (the router weights are *not* applied here).
2. dgrad of GEMM2 on those unweighted rows: ``g = dy[rows] @ W2`` with ``W2^T``'s 128x128 blocks (the transposed
   FP8 copy the weight quantizer writes in the same pass as ``W2``).
3. SwiGLU recomputed from the FP8 cache, in one kernel: the router-weight gradient of each row, ``sum_i g * a``
   (so the GEMM2 output ``o`` never has to be saved: ``<dy, o> = <dy @ W2, a>``); ``dh`` of the weighted rows
   quantized 1x128 (dgrad of GEMM1) and 128x1 (wgrad of W13); ``w * a`` quantized 128x1 (wgrad of W2).
4. dgrad of GEMM1, ``dh @ W13`` with ``W13^T``'s blocks, and the sum over each token's choices (``moe_combine``
   with unit weights: fixed order, float32).
5. wgrad, grouped along K = the expert's rows: ``dW13[e] = dh^T a1`` and ``dW2[e] = dy^T (w a)``, with ``a1`` and
   the permuted ``dy`` re-tiled 1x128 -> 128x1 from their FP8 form; one float32 reduction over all of an expert's
   rows, stored once in the parameter's dtype (or added into a float32 ``main_grad``, Megatron's convention).

``fp8_deep.reference.moe_backward`` is the step-by-step spec. No host synchronization, no atomics: deterministic and
CUDA-graph capturable.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..numerics import BLOCK, FP8_DTYPE, HIGH_PRECISION_DTYPES, SCALE_FMTS, cdiv
from ..ops import quantize_activation, quantize_weight_blockwise
from ..ops._checks import check_choice, check_tensor
from ..ops.combine import moe_combine
from ..ops.routing import align_routing, permute_rows
from ..ops.swiglu import silu_mul_backward_quantize, silu_mul_quantize
from ..ops.transpose_quant import quantize_activation_t
from ..ops.wgrad import k_grouped_gemm_fp8

__all__ = ["MoEWeightsFP8", "quantize_moe_weights", "check_moe_weights_fp8", "moe_forward_train", "needs_grad"]


class MoEWeightsFP8(NamedTuple):
    """The FP8 forms of one MoE layer's expert weights (128x128 blocks, dequantization scales).

    ``w13`` ``(E, 2I, H)`` / ``w13_scale`` ``(E, ceil(2I/128), ceil(H/128))`` and ``w2`` ``(E, H, I)`` / ``w2_scale``
    feed the forward GEMMs; ``w13_t`` ``(E, H, 2I)``, ``w2_t`` ``(E, I, H)`` and their scales (the transposes, K-major
    for the backward's dgrad GEMMs) are ``None`` for an inference-only set."""
    w13: torch.Tensor
    w13_scale: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    w13_t: Optional[torch.Tensor] = None
    w13_t_scale: Optional[torch.Tensor] = None
    w2_t: Optional[torch.Tensor] = None
    w2_t_scale: Optional[torch.Tensor] = None

    @property
    def has_transpose(self) -> bool:
        return self.w13_t is not None and self.w2_t is not None


def quantize_moe_weights(w13: torch.Tensor, w2: torch.Tensor, *, scale_fmt: str = "fp32",
                         with_transpose: bool = True) -> MoEWeightsFP8:
    """Quantize a layer's master weights once (e.g. once per optimizer step, reused by every micro-batch).

    ``w13`` ``(E, 2I, H)``, ``w2`` ``(E, H, I)`` bf16/fp16/fp32. ``with_transpose`` (training) also writes the
    transposed FP8 copies from the same read of each weight (``quantize_weight_blockwise(..., with_transpose=True)``:
    with 128x128 blocks the transpose of a quantized block is the quantized transpose, same scale)."""
    check_choice(scale_fmt, "scale_fmt", SCALE_FMTS)
    for name, w in (("w13", w13), ("w2", w2)):
        check_tensor(w, name, dtypes=HIGH_PRECISION_DTYPES, dims=(3,))
    with torch.no_grad():
        if with_transpose:
            q13, s13, q13t, s13t = quantize_weight_blockwise(w13.detach(), scale_fmt=scale_fmt, with_transpose=True)
            q2, s2, q2t, s2t = quantize_weight_blockwise(w2.detach(), scale_fmt=scale_fmt, with_transpose=True)
            return MoEWeightsFP8(q13, s13, q2, s2, q13t, s13t, q2t, s2t)
        q13, s13 = quantize_weight_blockwise(w13.detach(), scale_fmt=scale_fmt)
        q2, s2 = quantize_weight_blockwise(w2.detach(), scale_fmt=scale_fmt)
        return MoEWeightsFP8(q13, s13, q2, s2)


def check_moe_weights_fp8(fw, E: int, H: int, inter: int, device) -> MoEWeightsFP8:
    """Validate a caller's ``fp8_weights`` against the layer's shapes (ValueError / TypeError naming the field)."""
    if not isinstance(fw, MoEWeightsFP8):
        raise TypeError(f"fp8_weights must be an fp8_deep.MoEWeightsFP8 (from fp8_deep.quantize_moe_weights), got "
                        f"{type(fw).__name__}")
    two_i = 2 * inter
    want = {"w13": (E, two_i, H), "w13_scale": (E, cdiv(two_i, BLOCK), cdiv(H, BLOCK)),
            "w2": (E, H, inter), "w2_scale": (E, cdiv(H, BLOCK), cdiv(inter, BLOCK)),
            "w13_t": (E, H, two_i), "w13_t_scale": (E, cdiv(H, BLOCK), cdiv(two_i, BLOCK)),
            "w2_t": (E, inter, H), "w2_t_scale": (E, cdiv(inter, BLOCK), cdiv(H, BLOCK))}
    for name, shape in want.items():
        t = getattr(fw, name)
        if t is None:
            continue
        check_tensor(t, f"fp8_weights.{name}", dtypes=(torch.float32,) if name.endswith("scale") else (FP8_DTYPE,),
                     device=device)
        if tuple(t.shape) != shape:
            raise ValueError(f"fp8_weights.{name} must have shape {shape} for this layer, got {tuple(t.shape)}; "
                             f"requantize with fp8_deep.quantize_moe_weights(w13, w2)")
    return fw


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _main_grad(w: torch.Tensor):
    """The float32 ``main_grad`` buffer of a parameter (Megatron's convention), validated, or None."""
    mg = getattr(w, "main_grad", None)
    if mg is None:
        return None
    if not isinstance(mg, torch.Tensor) or mg.dtype != torch.float32 or tuple(mg.shape) != tuple(w.shape) \
            or mg.device != w.device:
        raise TypeError(f"a parameter's main_grad must be a float32 tensor of its shape {tuple(w.shape)} on "
                        f"{w.device}, got {getattr(mg, 'dtype', type(mg).__name__)} "
                        f"{tuple(getattr(mg, 'shape', ()))}")
    return mg


def _row_gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values.flatten()[index]`` with any index past the end (a padding sentinel) or negative reading 0."""
    flat = torch.cat([values.reshape(-1).float(), values.new_zeros(1, dtype=torch.float32)])
    idx = index.long()
    n = flat.numel() - 1
    return flat[torch.where((idx < 0) | (idx > n), n, idx)]


class _FP8MoEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, w13, w2, topk_weights, topk_ids, expert_map, fw, gemm, scale_fmt):
        E, H = fw.w13.shape[0], hidden.shape[1]
        layout = gemm.a_scale_layout
        # 128-row aligned segments: the wgrad's 128x1 groups along the rows never straddle two experts
        plan = align_routing(topk_ids, E, expert_map=expert_map, block_size=max(BLOCK, gemm.row_alignment))
        qx, sx = quantize_activation(hidden, scale_fmt=scale_fmt)
        a1, sa1 = permute_rows(qx, sx, plan, scale_layout=layout)
        del qx, sx
        h = gemm.gemm(a1, sa1, fw.w13, fw.w13_scale, plan)
        a2, sa2, qh, sh = silu_mul_quantize(h, m_indices=plan.m_indices, scale_fmt=scale_fmt, scale_layout=layout,
                                            save_input=True)
        del h
        o = gemm.gemm(a2, sa2, fw.w2, fw.w2_scale, plan)
        del a2, sa2
        out = moe_combine(o, plan.inv_perm, topk_weights, out_dtype=hidden.dtype)
        ctx.save_for_backward(topk_weights)
        # intermediates this function owns (never seen or modified by the caller): kept on ctx
        ctx.plan, ctx.fw, ctx.gemm, ctx.scale_fmt = plan, fw, gemm, scale_fmt
        ctx.cache = (a1, sa1, qh, sh)
        ctx.hidden_dtype = hidden.dtype
        ctx.w13, ctx.w2 = (w13 if isinstance(w13, torch.Tensor) and w13.requires_grad else None,
                           w2 if isinstance(w2, torch.Tensor) and w2.requires_grad else None)
        ctx.dims = (E, H)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (topk_weights,) = ctx.saved_tensors
        plan, fw, gemm, scale_fmt = ctx.plan, ctx.fw, ctx.gemm, ctx.scale_fmt
        a1, sa1, qh, sh = ctx.cache
        # the locals are then the only references: each buffer is freed (del) as soon as its last reader has run
        ctx.cache = ctx.fw = ctx.plan = None
        need_x, need_w13, need_w2, need_tw = ctx.needs_input_grad[:4]
        layout = gemm.a_scale_layout
        T, k = plan.inv_perm.shape
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()

        # 1-2. the unweighted gradient rows, dgrad of GEMM2
        qdy, sdy = quantize_activation(grad_out, scale_fmt=scale_fmt)
        ady, sady = permute_rows(qdy, sdy, plan, scale_layout=layout)
        del qdy, sdy
        g = gemm.gemm(ady, sady, fw.w2_t, fw.w2_t_scale, plan)
        # 3. SwiGLU recomputed: router-weight gradient per row, dh both ways, w * a for the wgrad of W2
        row_w = _row_gather(topk_weights.detach(), plan.sorted_token_ids)
        q_dh, s_dh, q_dh_t, s_dh_t, q_wa_t, s_wa_t, g_row = silu_mul_backward_quantize(
            qh, sh, g, row_w, m_indices=plan.m_indices, scale_fmt=scale_fmt, dh_scale_layout=layout)
        del g, qh, sh, row_w
        grad_tw = _row_gather(g_row, plan.inv_perm).view(T, k).to(topk_weights.dtype) if need_tw else None
        del g_row
        # 4. dgrad of GEMM1 and the sum over each token's choices
        grad_x = None
        if need_x:
            da1 = gemm.gemm(q_dh, s_dh, fw.w13_t, fw.w13_t_scale, plan)
            ones = torch.ones((T, k), dtype=torch.float32, device=grad_out.device)
            grad_x = moe_combine(da1, plan.inv_perm, ones, out_dtype=ctx.hidden_dtype)
            del da1
        del q_dh, s_dh
        # 5. wgrad, one float32 reduction per expert over its rows; W13's first, so that its operands are gone before
        # W2's are made (the gradients themselves are the largest allocations of the step)
        grad_w13 = grad_w2 = None
        if need_w13:
            a1_t, sa1_t = quantize_activation_t(a1, sa1, scale_fmt=scale_fmt)
            del a1, sa1
            grad_w13 = _wgrad(ctx.w13, q_dh_t, s_dh_t, a1_t, sa1_t, plan)
            del a1_t, sa1_t
        else:
            del a1, sa1
        del q_dh_t, s_dh_t
        if need_w2:
            dy_t, sdy_t = quantize_activation_t(ady, sady, scale_fmt=scale_fmt)
            del ady, sady
            grad_w2 = _wgrad(ctx.w2, dy_t, sdy_t, q_wa_t, s_wa_t, plan)
        return grad_x, grad_w13, grad_w2, grad_tw, None, None, None, None, None


def _wgrad(w, a_t, a_t_scale, b_t, b_t_scale, plan):
    """``dW[e] = a_t[:, seg_e] @ b_t[:, seg_e].T`` into ``w.main_grad`` (float32, added; returns None, as Megatron's
    fused accumulation does) or a new gradient in ``w.dtype``."""
    mg = _main_grad(w)
    if mg is not None:
        k_grouped_gemm_fp8(a_t, a_t_scale, b_t, b_t_scale, plan.expert_offsets, plan.expert_counts, out=mg,
                           accumulate=True)
        if hasattr(w, "grad_added_to_main_grad"):
            w.grad_added_to_main_grad = True
        return None
    return k_grouped_gemm_fp8(a_t, a_t_scale, b_t, b_t_scale, plan.expert_offsets, plan.expert_counts,
                              out_dtype=w.dtype)


def moe_forward_train(hidden, w13, w2, topk_weights, topk_ids, *, fw: MoEWeightsFP8, gemm, expert_map=None,
                      scale_fmt="fp32"):
    """The differentiable FP8 MoE forward (inputs validated by the caller, ``fw`` holding the transposed copies).

    Gradients flow to ``hidden`` (its dtype), ``w13`` / ``w2`` (high-precision master weights, in their dtype, or
    added into their float32 ``main_grad``) and ``topk_weights`` (its dtype); ``topk_ids`` and ``expert_map`` are
    integer routing data."""
    if not fw.has_transpose:
        raise ValueError("the backward needs the weights' transposed FP8 copies: fp8_weights must come from "
                         "fp8_deep.quantize_moe_weights(w13, w2, with_transpose=True)")
    for w in (w13, w2):
        if w.requires_grad:
            _main_grad(w)  # a malformed main_grad fails here, not in the backward
    if topk_weights.requires_grad and topk_weights.dtype not in HIGH_PRECISION_DTYPES:
        raise TypeError(f"topk_weights must be a floating tensor to take a gradient, got {topk_weights.dtype}")
    return _FP8MoEFunction.apply(hidden, w13, w2, topk_weights, topk_ids, expert_map, fw, gemm, scale_fmt)
