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
