"""The routing plan: how routed (token, choice) pairs are laid out in expert segments for the grouped GEMMs."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..numerics import align


class RoutingPlan(NamedTuple):
    """Produced by ``fp8_deep.ops.align_routing``; every tensor lives on the routing tensors' device.

    Rows of the permuted buffers (``num_rows`` of them, a host-side worst case so nothing syncs) are grouped by local
    expert; each expert's segment starts at a multiple of ``block_size`` (128: DeepGEMM's contiguous layout).

    sorted_token_ids      int32 ``(num_rows,)``: flat choice index ``t * top_k + j`` of each row; padding rows hold
                          the sentinel ``num_tokens * top_k`` (vLLM ``moe_align_block_size``).
    expert_ids            int32 ``(num_rows // block_size,)``: local expert of each 128-row block, -1 past the used ones.
    num_tokens_post_padded int32 ``(1,)``: rows in use (sum of the padded segment lengths).
    m_indices             int32 ``(num_rows,)``: local expert of each row, -1 on padding (DeepGEMM's ``m_indices``).
    inv_perm              int32 ``(num_tokens, top_k)``: row holding choice ``(t, j)``, -1 when the choice is dropped
                          (its expert is not on this rank).
    expert_offsets        int32 ``(num_experts,)``: first row of each expert's segment (a multiple of block_size).
    expert_counts         int32 ``(num_experts,)``: real rows of each expert (the segment holds
                          ``align(count, block_size)`` rows).
    """
    sorted_token_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_tokens_post_padded: torch.Tensor
    m_indices: torch.Tensor
    inv_perm: torch.Tensor
    expert_offsets: torch.Tensor
    expert_counts: torch.Tensor
    num_tokens: int
    top_k: int
    num_experts: int
    block_size: int

    @property
    def num_rows(self) -> int:
        return self.sorted_token_ids.shape[0]


def check_plan(plan) -> None:
    """``plan`` must be a ``RoutingPlan`` (from ``align_routing``): the launchers that take one say so the same way."""
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a RoutingPlan (from align_routing), got {type(plan).__name__}")


def max_padded_rows(num_tokens: int, top_k: int, num_experts: int, block_size: int = 128) -> int:
    """Worst-case rows of the permuted buffers: every non-empty expert wastes at most ``block_size - 1`` rows,
    and at most ``min(num_experts, num_tokens * top_k)`` experts are non-empty."""
    numel = num_tokens * top_k
    return align(numel + min(num_experts, numel) * (block_size - 1), block_size)
