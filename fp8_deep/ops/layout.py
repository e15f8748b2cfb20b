"""Scale layouts, in one place: every launcher and adapter allocates and checks scales through these.

``"row_major"``: ``(..., G)`` contiguous. ``"tma_aligned"``: DeepGEMM's MN-major LHS layout, ``(M, G)`` with strides
``(1, align(M, 4))`` or ``(B, M, G)`` with ``(align(M, 4) * G, 1, align(M, 4))``; the padding rows are never read.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from ..numerics import align

__all__ = ["tma_aligned_scale_strides", "scale_strides", "alloc_scales"]


def tma_aligned_scale_strides(shape: Sequence[int]) -> Tuple[int, ...]:
    """Strides of DeepGEMM's MN-major, TMA-aligned LHS scale layout for ``(M, G)`` or ``(B, M, G)`` scales."""
    if len(shape) == 2:
        M, _ = shape
        return (1, align(M, 4))
    if len(shape) == 3:
        _, M, G = shape
        return (align(M, 4) * G, 1, align(M, 4))
    raise ValueError(f"TMA-aligned scales are 2-D (M, G) or 3-D (B, M, G), got shape {tuple(shape)}")


def scale_strides(shape: Sequence[int], layout: str) -> Tuple[int, ...]:
    if layout == "tma_aligned":
        return tma_aligned_scale_strides(shape)
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def alloc_scales(shape: Sequence[int], layout: str, device) -> torch.Tensor:
    """Uninitialised float32 scales of ``shape`` in ``layout``."""
    shape = tuple(shape)
    return torch.empty_strided(shape, scale_strides(shape, layout), dtype=torch.float32, device=device)
