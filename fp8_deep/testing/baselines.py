"""BF16 MoE baseline on ``torch._grouped_mm`` (CUDA, SM90): what fp8_deep's speed-ups are measured against."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_mul_bf16(h: torch.Tensor) -> torch.Tensor:
    # F.silu on bf16 computes in float32 and rounds once: the same as silu(gate.float()).to(bf16) (vLLM's rounding)
    inter = h.shape[-1] // 2
    return F.silu(h[:, :inter]) * h[:, inter:]


def route_sorted(topk_ids: torch.Tensor, num_experts: int):
    """Sort the T*k choices by expert: (order, token of each row, cumulative end offsets int32). No host sync."""
    flat = topk_ids.reshape(-1)
    sorted_e, order = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts, device=flat.device, dtype=sorted_e.dtype)
    offs = torch.searchsorted(sorted_e, bounds, right=True).to(torch.int32)
    return order, order // topk_ids.shape[1], offs


def bf16_moe_grouped_mm(x, w13, w2, topk_weights, topk_ids, silu_mul=silu_mul_bf16):
    """Complete BF16 MoE: routing sort, gather, two grouped GEMMs + SwiGLU, float32 ``index_add_`` combine.

    x ``(T, H)`` bf16; w13 ``(E, 2I, H)``, w2 ``(E, H, I)`` bf16 (vLLM layout; transposed views are what
    ``_grouped_mm`` wants); returns ``(T, H)`` bf16."""
    T, H = x.shape
    order, tok, offs = route_sorted(topk_ids, w13.shape[0])
    xs = x.index_select(0, tok)
    h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    o = torch._grouped_mm(silu_mul(h), w2.transpose(1, 2), offs=offs)
    contrib = o * topk_weights.reshape(-1)[order].unsqueeze(1)  # bf16 * f32 -> f32 in one kernel
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    out.index_add_(0, tok, contrib)
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------------ training (autograd)
# ``bf16_moe_grouped_mm`` is differentiable as it stands: ``index_select``, ``torch._grouped_mm`` (its backward is two
# more grouped GEMMs: dgrad 2d x 3d, wgrad 2d x 2d grouped along the tokens), the SwiGLU slices and the float32
# ``index_add_`` combine all have autograd formulas; routing (sort, searchsorted) carries no gradient. The helpers
# below give the training baselines the same function where ``_grouped_mm`` is not there, and with float32 masters.


def grouped_mm_available(device) -> bool:
    """Whether the BF16 baseline runs on ``torch._grouped_mm`` on ``device``: CUDA, SM90 or newer (the kernel the
    baselines in ANCHORS.md were measured with; other devices use ``bf16_moe_loop``, the same function)."""
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(torch, "_grouped_mm"):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def bf16_moe_loop(x, w13, w2, topk_weights, topk_ids, silu_mul=silu_mul_bf16):
    """``bf16_moe_grouped_mm`` with a per-expert loop of matmuls instead of ``torch._grouped_mm``: the same routing
    order, rounding points (``h``, SwiGLU and ``o`` in ``x.dtype``) and float32 ``index_add_`` combine; differentiable.
    Reads the expert segment sizes on the host (one sync): a fallback for CPUs and GPUs without the grouped GEMM."""
    T, H = x.shape
    order, tok, offs = route_sorted(topk_ids, w13.shape[0])
    xs = x.index_select(0, tok)
    bounds = [0] + offs.tolist()
    outs = []
    for e in range(w13.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            outs.append(silu_mul(xs[lo:hi] @ w13[e].t()) @ w2[e].t())
    o = torch.cat(outs) if outs else xs.new_zeros((0, H))
    contrib = o * topk_weights.reshape(-1)[order].unsqueeze(1)
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    out.index_add_(0, tok, contrib)
    return out.to(x.dtype)


def bf16_moe_train(x, w13, w2, topk_weights, topk_ids, *, grouped_mm=None):
    """Differentiable BF16 MoE for training baselines: ``x (T, H)`` bf16; ``w13 (E, 2I, H)``, ``w2 (E, H, I)`` master
    weights of any float dtype, cast to ``x.dtype`` inside the graph (their gradients come back in their own dtype,
    as autocast does for a linear's weight); ``topk_weights (T, k)`` float32, ``topk_ids (T, k)`` int.

    ``grouped_mm``: ``None`` picks ``torch._grouped_mm`` where ``grouped_mm_available`` says so, else the loop."""
    if grouped_mm is None:
        grouped_mm = grouped_mm_available(x.device)
    w13, w2 = w13.to(x.dtype), w2.to(x.dtype)
    fn = bf16_moe_grouped_mm if grouped_mm else bf16_moe_loop
    return fn(x, w13, w2, topk_weights, topk_ids)
