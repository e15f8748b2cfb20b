"""vLLM as an optional backend of two ops (imported lazily, only when the backend is asked for).

* ``("activation_quant", "vllm")``: vLLM's ``per_token_group_quant_fp8``
  (``vllm.model_executor.layers.quantization.utils.fp8_utils``), signature there
  ``per_token_group_quant_fp8(x, group_size, eps=1e-10, dtype=None, column_major_scales=False,
  tma_aligned_scales=False, out_q=None, use_ue8m0=None) -> (q, scale)``; every argument is passed by keyword
  (older vLLM lacks ``tma_aligned_scales``: we then take its column-major scales and re-lay them out only when
  ``M % 4 != 0``). vLLM requires ``K % group_size == 0``: we raise a ValueError otherwise. ``use_ue8m0`` is always
  passed explicitly (its ``None`` default follows vLLM's DeepGEMM setting, not the caller). On CUDA vLLM runs its
  CUDA op (``csrc/quantization/w8a8/fp8/per_token_group_quant.cu``), whose UE8M0 scale is
  ``exp2f(ceilf(log2f(fmaxf(s, 1e-10f))))``: our kernels and reference apply the same 1e-10 floor (vLLM's Triton
  fallback, used off CUDA, has none). Non-finite input is where the two differ by design: vLLM's ``fmaxf`` drops NaN
  (a NaN element becomes -448 in a finite-scaled group) and an Inf gives scale Inf; ours gives scale NaN and
  all-NaN values.
* ``("moe_align", "vllm")``: vLLM's ``moe_align_block_size(topk_ids, block_size, num_experts, expert_map=None,
  pad_sorted_ids=False, ignore_invalid_experts=False)`` (``vllm.model_executor.layers.fused_moe.moe_align_block_size``),
  or the raw op ``vllm._custom_ops.moe_align_block_size(topk_ids, num_experts, block_size, sorted_ids, expert_ids,
  num_tokens_post_pad)`` when the Python wrapper is missing. Our wrapper has fp8_deep's semantics
  (``reference.moe_align_block_size``): ``num_experts`` are *local* experts and choices of remote experts are dropped,
  which vLLM does only with ``expert_map`` and ``ignore_invalid_experts=True`` (then ``num_experts`` is the global
  count); a vLLM without that flag cannot drop them and we raise rather than mis-lay the rows.
  vLLM orders rows inside an expert by atomics (not deterministic); ``fp8_deep.ops.align_routing`` derives the rest
  of the plan from whatever order it gets.

Nothing here is imported by ``fp8_deep.ops``: ``register()`` (called by ``fp8_deep.integrations``) only records the
loaders; a loader imports vLLM on first use and raises ImportError with the install hint when it is missing.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
from typing import Optional

import torch

from ..numerics import ACT_EPS, BLOCK, FP8_DTYPE, align, cdiv
from ..ops import _registry
from ..ops.layout import alloc_scales, tma_aligned_scale_strides

__all__ = ["is_available", "register", "load_activation_quant", "load_moe_align", "INSTALL_HINT"]

INSTALL_HINT = "vLLM is not importable: `pip install vllm` (matching your torch/CUDA), or use backend='triton'"

QUANT_MODULE = "vllm.model_executor.layers.quantization.utils.fp8_utils"
QUANT_NAME = "per_token_group_quant_fp8"
ALIGN_MODULE = "vllm.model_executor.layers.fused_moe.moe_align_block_size"
ALIGN_OPS_MODULE = "vllm._custom_ops"
ALIGN_NAME = "moe_align_block_size"


def is_available() -> bool:
    """Whether a ``vllm`` package is installed (cheap: looks it up without importing it)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} (importing {name} failed: {exc})") from exc


def _params(fn):
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # builtins / torch ops without a Python signature
        return set()


# ----------------------------------------------------------------------------------------------------------------------
# activation quantization
# ----------------------------------------------------------------------------------------------------------------------
def load_activation_quant():
    """Loader of ("activation_quant", "vllm"): returns ``fn(x, group_size, scale_fmt, scale_layout, eps, out_q,
    out_scale) -> (q, scale)`` with fp8_deep's contract (see ``fp8_deep.ops.quantize_activation``)."""
    mod = _import(QUANT_MODULE)
    vllm_fn = getattr(mod, QUANT_NAME, None)
    if vllm_fn is None:
        raise ImportError(f"{QUANT_MODULE} has no {QUANT_NAME}; this vLLM is too old or too new for fp8_deep "
                          f"({INSTALL_HINT})")
    params = _params(vllm_fn)
    has_tma = "tma_aligned_scales" in params
    has_ue8m0 = "use_ue8m0" in params

    def quantize(x: torch.Tensor, group_size: int = BLOCK, scale_fmt: str = "fp32", scale_layout: str = "row_major",
                 eps: float = ACT_EPS, out_q: Optional[torch.Tensor] = None,
                 out_scale: Optional[torch.Tensor] = None):
        K = x.shape[-1]
        if K % group_size != 0:
            raise ValueError(f"vLLM's per_token_group_quant_fp8 needs x.shape[-1] % group_size == 0, got K={K}, "
                             f"group_size={group_size}; use backend='triton' (ragged last group supported)")
        if scale_fmt == "ue8m0" and not has_ue8m0:
            raise ValueError("this vLLM's per_token_group_quant_fp8 has no use_ue8m0 argument; "
                             "use backend='triton' for scale_fmt='ue8m0'")
        kwargs = dict(group_size=group_size, eps=eps, dtype=FP8_DTYPE, out_q=out_q)
        if has_ue8m0:
            kwargs["use_ue8m0"] = scale_fmt == "ue8m0"
        if scale_layout == "tma_aligned":
            kwargs["column_major_scales"] = True
            if has_tma:
                kwargs["tma_aligned_scales"] = True
        else:
            kwargs["column_major_scales"] = False
        q, s = vllm_fn(x, **kwargs)
        if out_q is not None:
            q = out_q
        G = cdiv(K, group_size)
        shape = (*x.shape[:-1], G)
        if out_scale is not None:
            if out_scale.data_ptr() != s.data_ptr() or out_scale.stride() != s.stride():
                out_scale.copy_(s)
            return q, out_scale
        want = tma_aligned_scale_strides(shape) if scale_layout == "tma_aligned" and len(shape) in (2, 3) else None
        if scale_layout == "row_major" and not s.is_contiguous():
            s = s.contiguous()
        elif want is not None and s.numel() > 0 and tuple(s.stride()) != want:
            # column-major without TMA padding (older vLLM) and M % 4 != 0: re-lay out (a small copy)
            t = alloc_scales(shape, "tma_aligned", x.device)
            t.copy_(s)
            s = t
        return q, s

    quantize.vllm_fn = vllm_fn
    return quantize


# ----------------------------------------------------------------------------------------------------------------------
# routing alignment
# ----------------------------------------------------------------------------------------------------------------------
def load_moe_align():
    """Loader of ("moe_align", "vllm"): returns ``fn(topk_ids, block_size, num_experts, expert_map=None) ->
    (sorted_token_ids, expert_ids, num_tokens_post_padded)`` with ``reference.moe_align_block_size``'s semantics
    (local ``num_experts``, remote choices dropped); buffers may be longer than the plan's (the caller slices)."""
    wrapper = None
    try:
        wrapper = getattr(importlib.import_module(ALIGN_MODULE), ALIGN_NAME, None)
    except ImportError:
        wrapper = None
    raw = None
    if wrapper is None:
        raw = getattr(_import(ALIGN_OPS_MODULE), ALIGN_NAME, None)
        if raw is None:
            raise ImportError(f"neither {ALIGN_MODULE}.{ALIGN_NAME} nor {ALIGN_OPS_MODULE}.{ALIGN_NAME} exists in "
                              f"this vLLM ({INSTALL_HINT})")
    params = _params(wrapper) if wrapper is not None else set()
    can_drop = "ignore_invalid_experts" in params
    can_pad = "pad_sorted_ids" in params

    def moe_align(topk_ids: torch.Tensor, block_size: int, num_experts: int,
                  expert_map: Optional[torch.Tensor] = None):
        if expert_map is not None and not can_drop:
            raise ValueError("this vLLM's moe_align_block_size cannot drop choices of remote experts "
                             "(no ignore_invalid_experts); use backend='triton' with expert_map")
        if wrapper is not None:
            kwargs = {}
            if can_pad:
                kwargs["pad_sorted_ids"] = True
            if expert_map is not None:
                kwargs.update(expert_map=expert_map, ignore_invalid_experts=True)
                return wrapper(topk_ids, block_size, expert_map.numel(), **kwargs)
            return wrapper(topk_ids, block_size, num_experts, **kwargs)
        numel = topk_ids.numel()
        cap = align(numel + num_experts * (block_size - 1), block_size)
        dev = topk_ids.device
        sorted_ids = torch.full((cap,), numel, dtype=torch.int32, device=dev)
        expert_ids = torch.full((cap // block_size,), -1, dtype=torch.int32, device=dev)
        ntpp = torch.empty((1,), dtype=torch.int32, device=dev)
        raw(topk_ids, num_experts, block_size, sorted_ids, expert_ids, ntpp)
        return sorted_ids, expert_ids, ntpp

    moe_align.vllm_fn = wrapper if wrapper is not None else raw
    return moe_align


def register() -> None:
    """Record the lazy loaders (imports nothing optional)."""
    _registry.register("activation_quant", "vllm", load_activation_quant)
    _registry.register("moe_align", "vllm", load_moe_align)
