"""Choosing the grouped-GEMM backend: ours (Triton, always there) or DeepGEMM (registered by fp8_deep.integrations).

A backend object has ``name``, ``a_scale_layout`` (the LHS scale layout it reads without a conversion pass),
``row_alignment`` (the expert-segment alignment it needs: 128 for DeepGEMM, 16 for ours) and
``gemm(a, a_scale, b, b_scale, plan, out=None)`` (contiguous grouped layout, see ``RoutingPlan``).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from . import _registry
from ._checks import check_choice
from ._tuned import tuned_config
from .grouped_gemm import TritonGroupedGemm

log = logging.getLogger("fp8_deep")

BACKENDS = ("auto", "triton", "deep_gemm")
# "auto" picks DeepGEMM where it measured faster than ours, side by side in one run (bench/moe_sweep.py, H100,
# E=256, top-8, H=7168, I=2048, whole MoE forward, bench/NOTES.md): T=2048 (64 rows/expert) ours 4.99 ms, DeepGEMM
# 6.73; T=4096 (128 rows) ours 6.77 (warp-specialized TMA tiles), DeepGEMM 7.84; T=16384 (512 rows) DeepGEMM 15.2,
# ours 19.7. Below that its 128-row padding and our weight-streaming tiles win; from 256 rows on its GEMMs are faster.
# A card's measured table (bench/tune_backend.py) takes precedence where it has the layer's shape.
AUTO_DEEP_GEMM_MIN_ROWS_PER_EXPERT = 256

_TRITON = TritonGroupedGemm()


def deep_gemm_shape_ok(hidden: int, inter: int) -> bool:
    # DeepGEMM's TMA descriptors need K % 16 == 0 and N % 8 == 0 for both GEMMs (K = H then I; N = 2I then H)
    return hidden % 16 == 0 and inter % 16 == 0


def auto_prefers_deep_gemm(rows_per_expert: float, measured: Optional[str]) -> bool:
    """``"auto"``'s choice where both backends can run: the card's measured table (``measured``: the faster backend's
    name at the nearest tuned point, ``bench/tune_backend.py``) when it has one, else the row threshold above."""
    if measured in ("deep_gemm", "triton"):
        return measured == "deep_gemm"
    return rows_per_expert >= AUTO_DEEP_GEMM_MIN_ROWS_PER_EXPERT


def select_grouped_gemm(backend: str, *, device: torch.device, rows_per_expert: float, hidden: int, inter: int,
                        num_experts: Optional[int] = None):
    """The backend object for ``backend`` and these shapes. ``num_experts`` (local experts) keys the card's measured
    backend table for ``"auto"`` (``fp8_deep/configs/moe_backend/<card>.json``); without it only the threshold
    decides."""
    check_choice(backend, "backend", BACKENDS)
    if backend == "triton":
        return _TRITON
    if backend == "deep_gemm":
        if torch.device(device).type != "cuda":
            raise ValueError("backend='deep_gemm' needs CUDA tensors (DeepGEMM is an SM90 CUDA library)")
        if not deep_gemm_shape_ok(hidden, inter):
            raise ValueError(f"backend='deep_gemm' needs H and I multiples of 16 (TMA alignment), got H={hidden}, "
                             f"I={inter}; use backend='triton'")
        return _registry.load("grouped_gemm", "deep_gemm")
    device = torch.device(device)
    chosen = _TRITON
    if (device.type == "cuda" and deep_gemm_shape_ok(hidden, inter)
            and _registry.available("grouped_gemm", "deep_gemm")):
        measured = None
        if num_experts:
            measured = tuned_config("moe_backend", device, E=num_experts, N=2 * inter, K=hidden,
                                    rows=max(1, round(rows_per_expert)))
        if auto_prefers_deep_gemm(rows_per_expert, measured):
            chosen = _registry.load("grouped_gemm", "deep_gemm")
    log.debug("fp8_deep: grouped GEMM backend 'auto' -> %s (%.1f rows per expert)", chosen.name, rows_per_expert)
    return chosen
