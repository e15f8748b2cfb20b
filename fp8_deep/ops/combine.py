"""``moe_combine``: weighted sum of each token's expert rows (the MoE's last step), float32, fixed order."""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..kernels.combine import moe_combine_kernel
from ..numerics import HIGH_PRECISION_DTYPES, cdiv, use_triton
from ._checks import check_out, check_outputs_disjoint, check_tensor
from ._launch import FP_FUSION, on_input_device, pdl

__all__ = ["moe_combine"]


@on_input_device
def moe_combine(expert_out: torch.Tensor, inv_perm: torch.Tensor, topk_weights: torch.Tensor, *,
                out: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``out[t] = sum_j topk_weights[t, j] * expert_out[inv_perm[t, j]]`` accumulated in float32, j ascending.

    Args:
        expert_out: ``(num_rows, H)`` bfloat16/float16/float32, any strides (the second GEMM's output).
        inv_perm: int32 ``(T, top_k)`` (the plan's): row of each choice, -1 = dropped (skipped, adds nothing).
        topk_weights: ``(T, top_k)`` float32 / bfloat16 / float16 (upcast to float32), any strides.
        out: optional caller-owned ``(T, H)`` output of ``out_dtype`` (any strides).
        out_dtype: default ``expert_out.dtype``.

    Returns:
        ``(T, H)`` in ``out_dtype``; a token whose choices are all dropped gets zeros. One launch, deterministic.
    """
    check_tensor(expert_out, "expert_out", dtypes=HIGH_PRECISION_DTYPES, dims=(2,))
    dev = expert_out.device
    check_tensor(inv_perm, "inv_perm", dtypes=(torch.int32,), dims=(2,), device=dev)
    check_tensor(topk_weights, "topk_weights", dtypes=HIGH_PRECISION_DTYPES, dims=(2,), device=dev)
    if tuple(topk_weights.shape) != tuple(inv_perm.shape):
        raise ValueError(f"topk_weights must have the shape of inv_perm {tuple(inv_perm.shape)}, "
                         f"got {tuple(topk_weights.shape)}")
    T, k = inv_perm.shape
    H = expert_out.shape[1]
    out_dtype = out_dtype or expert_out.dtype
    if out is not None:
        check_out(out, "out", (T, H), out_dtype, dev)
        check_outputs_disjoint([("expert_out", expert_out), ("inv_perm", inv_perm), ("topk_weights", topk_weights)],
                               [("out", out)])
    else:
        out = torch.empty((T, H), dtype=out_dtype, device=dev)
    if T == 0 or H == 0:
        return out
    if k == 0:
        return out.zero_()
    if not use_triton(expert_out):
        out.copy_(reference.moe_combine(expert_out, inv_perm, topk_weights, out_dtype))
        return out
    block_h = min(1024, max(16, 1 << (H - 1).bit_length()))
    moe_combine_kernel[(T, cdiv(H, block_h))](
        expert_out, inv_perm, topk_weights, out,
        H,
        expert_out.stride(0), expert_out.stride(1), inv_perm.stride(0), inv_perm.stride(1),
        topk_weights.stride(0), topk_weights.stride(1), out.stride(0), out.stride(1),
        TOP_K=k, BLOCK_H=block_h, OUT_BF16=out.dtype == torch.bfloat16, num_warps=4, **FP_FUSION, **pdl(expert_out),
    )
    return out
