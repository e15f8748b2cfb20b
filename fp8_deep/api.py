"""Public entry point: wires the chosen grouped-GEMM backend into the FP8 MoE forward."""
from __future__ import annotations

from typing import Optional

import torch

from .moe import plan as _plan
from .moe.autograd import MoEWeightsFP8, needs_grad
from .moe.forward import moe_forward_impl
from .ops.backend import select_grouped_gemm
from .ops._launch import on_input_device

__all__ = ["moe_forward", "last_backend"]

_LAST_BACKEND: Optional[str] = None


def last_backend() -> Optional[str]:
    """Name of the grouped-GEMM backend the latest ``moe_forward`` call on this process used."""
    return _LAST_BACKEND


@on_input_device
def moe_forward(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, *, w13_scale: Optional[torch.Tensor] = None,
                w2_scale: Optional[torch.Tensor] = None, activation: str = "silu",
                expert_map: Optional[torch.Tensor] = None, scale_fmt: str = "fp32", backend: str = "auto",
                out: Optional[torch.Tensor] = None, fp8_weights: Optional[MoEWeightsFP8] = None) -> torch.Tensor:
    """FP8 Mixture-of-Experts forward (DeepSeek-V3 recipe), SwiGLU experts, vLLM weight layout.

    Args:
        hidden_states: ``(T, H)`` bfloat16 or float16, unit last stride.
        w13: ``(E, 2I, H)``: rows ``[0, I)`` gate projection, ``[I, 2I)`` up projection. Either high precision
            (bf16/fp16/fp32 master weights, quantized 128x128 inside the call) or float8_e4m3fn with ``w13_scale``.
        w2: ``(E, H, I)``, same dtype family as ``w13`` (FP8 with ``w2_scale``).
        topk_weights: ``(T, k)`` float32 (bf16/fp16 accepted, upcast); topk_ids: ``(T, k)`` int32/int64.
        w13_scale: float32 ``(E, ceil(2I/128), ceil(H/128))``; w2_scale: float32 ``(E, ceil(H/128), ceil(I/128))``:
            128x128 block dequantization scales, as stored in DeepSeek-V3 / vLLM block-FP8 checkpoints
            (``weight_scale_inv``).
        activation: ``"silu"`` only (``silu(gate) * up``).
        expert_map: ``(global_E,)`` int32, global expert id -> local id or -1 (vLLM expert parallelism); then
            ``topk_ids`` hold global ids and choices of remote experts contribute nothing.
        scale_fmt: ``"fp32"`` or ``"ue8m0"`` (power-of-two scales for activations and on-the-fly weights).
        backend: grouped GEMM: ``"triton"`` (ours), ``"deep_gemm"`` (raises ImportError if not installed), or
            ``"auto"`` (DeepGEMM where it measured faster: the card's table from ``bench/tune_backend.py`` where it
            has this layer's shape, else from 256 routed rows per expert; ours otherwise).
        out: optional ``(T, H)`` output buffer of ``hidden_states.dtype`` (inference calls only).
        fp8_weights: the FP8 forms of high-precision ``w13`` / ``w2`` from ``fp8_deep.quantize_moe_weights``
            (quantize once per optimizer step, reuse across micro-batches); the caller keeps them current. Without
            it, high-precision weights are quantized inside every call.

    Returns:
        ``(T, H)`` in ``hidden_states.dtype``: ``sum_k topk_weights[t,k] * expert_{topk_ids[t,k]}(x_t)``.

    Training: with grad mode on and any of ``hidden_states``, ``w13``, ``w2`` (high-precision master weights),
    ``topk_weights`` requiring grad, the call records a backward by DeepSeek-V3's FP8 recipe
    (``fp8_deep.moe.autograd``): gradients come back in each input's dtype (``w13``/``w2``: added into a float32
    ``main_grad`` instead when the parameter has one); FP8 weights must not require grad (TypeError).

    Never synchronizes with the host on CUDA (CUDA-graph capturable); bitwise deterministic. ``topk_ids`` are
    range-checked (ValueError) on CPU always and on CUDA when ``FP8_DEEP_CHECK_ROUTING=1`` (one host sync);
    unchecked out-of-range ids are dropped (that choice contributes nothing), never read out of bounds.
    """
    global _LAST_BACKEND
    chosen = []  # this call's backend (the launch plan's check must not read the process-wide _LAST_BACKEND)

    def select(**shape):
        global _LAST_BACKEND
        gemm = select_grouped_gemm(backend, **shape)
        chosen.append(gemm.name)
        _LAST_BACKEND = gemm.name
        return gemm

    def call():
        return moe_forward_impl(hidden_states, w13, w2, topk_weights, topk_ids, select_gemm=select,
                                w13_scale=w13_scale, w2_scale=w2_scale, activation=activation, expert_map=expert_map,
                                scale_fmt=scale_fmt, out=out, fp8_weights=fp8_weights)

    # an inference call on CUDA replays the launches its signature recorded (fp8_deep.moe.plan); arguments of any
    # other type than the documented ones take the plain path, whose checks name them
    if (type(hidden_states) is torch.Tensor and hidden_states.dim() == 2 and hidden_states.shape[0]
            and _plan.plans_usable(hidden_states)
            and all(type(t) is torch.Tensor for t in (w13, w2, topk_weights, topk_ids))
            and all(t is None or type(t) is torch.Tensor for t in (w13_scale, w2_scale, expert_map, out))
            and (fp8_weights is None or type(fp8_weights) is MoEWeightsFP8)
            and all(type(o) is str for o in (backend, activation, scale_fmt))
            and not needs_grad(hidden_states, w13, w2, topk_weights)):
        dynamic = (hidden_states, topk_weights, topk_ids, out)
        static = (w13, w2, w13_scale, w2_scale, expert_map, *(fp8_weights if fp8_weights is not None else ()))
        # an out that overlaps an input (in place, as vLLM's inplace=True) is its own signature: never replayed
        aliased = out is not None and any(_plan.overlaps(out, t) for t in dynamic[:3])
        key = _plan.forward_key(dynamic, static, (backend, activation, scale_fmt, fp8_weights is None, aliased))
        res, name = _plan.forward(key, call, dynamic, static, chosen)
        if name is not None:
            _LAST_BACKEND = name
        return res
    return call()
