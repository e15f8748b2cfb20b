"""``FP8MoE``: an nn.Module holding BF16 master weights and a high-precision router, with cached FP8 weights."""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ..numerics import FP8_DTYPE, SCALE_FMTS, cdiv
from ..ops._checks import check_choice, check_tensor
from ..ops.backend import BACKENDS, select_grouped_gemm
from .autograd import MoEWeightsFP8, needs_grad, quantize_moe_weights
from .forward import moe_forward_impl

__all__ = ["FP8MoE"]


class FP8MoE(nn.Module):
    """Mixture-of-Experts layer with SwiGLU experts whose GEMMs run in FP8 (DeepSeek-V3 recipe).

    Parameters (vLLM layout): ``gate.weight`` ``(E, H)`` float32 router (kept in high precision, as DeepSeek-V3
    keeps its gating); ``w13`` ``(E, 2I, H)`` (gate rows first, then up) and ``w2`` ``(E, H, I)`` master weights in
    ``dtype``. ``forward(x (T, H)) -> (T, H)``: softmax router, top-k (renormalized if ``renormalize``), then
    ``fp8_deep.moe_forward`` with FP8 weights.

    Weight cache: the FP8 copies (``q`` + 128x128 scales) are computed on first use and reused until a master
    weight changes -- detected through the tensors' version counters (every in-place update, e.g. an optimizer
    step, bumps them) and data pointers (``.data =`` reassignment, ``load_state_dict``). ``invalidate_fp8_cache()``
    forces a requantization.

    A module built with ``from_fp8`` (or after ``load_fp8_``) holds FP8 weights only (serving / rollout): no master
    weights, no requantization.

    Training: with grad mode on, the forward records the FP8 backward (``fp8_deep.moe.autograd``, DeepSeek-V3's
    recipe): gradients reach the input, the master weights ``w13`` / ``w2`` (in their dtype, or added into a float32
    ``main_grad`` when a parameter has one) and the router ``gate`` (through the top-k weights). The cached FP8
    weights then include the transposed copies the backward's dgrad GEMMs read, written in the same pass; they are
    requantized once per change of the master weights, so micro-batches between two optimizer steps share them.
    An FP8-only module trains its input and router only (the experts are frozen).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, top_k: int, *,
                 renormalize: bool = True, dtype: torch.dtype = torch.bfloat16, scale_fmt: str = "fp32",
                 backend: str = "auto", device=None):
        super().__init__()
        check_choice(scale_fmt, "scale_fmt", SCALE_FMTS)
        check_choice(backend, "backend", BACKENDS)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts, self.hidden_size, self.intermediate_size, self.top_k = (num_experts, hidden_size,
                                                                                 intermediate_size, top_k)
        self.renormalize, self.scale_fmt, self.backend = renormalize, scale_fmt, backend
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, device=device, dtype=torch.float32)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, device=device, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, device=device, dtype=dtype))
        self.reset_parameters()
        self._cache = None
        self._cache_key = None
        self.fp8_requantizations = 0  # how many times the cache was (re)built: observable in tests and logs

    def reset_parameters(self):
        if getattr(self, "w13", None) is None:
            return
        # fan-in init of a linear layer, per expert
        nn.init.normal_(self.w13, std=1.0 / math.sqrt(self.hidden_size))
        nn.init.normal_(self.w2, std=1.0 / math.sqrt(self.intermediate_size))
        nn.init.normal_(self.gate.weight, std=1.0 / math.sqrt(self.hidden_size))

    # --------------------------------------------------------------------------------------- FP8 weights
    def _master_key(self):
        return (self.w13._version, self.w13.data_ptr(), self.w2._version, self.w2.data_ptr(), self.scale_fmt,
                self.w13.dtype, self.w2.dtype)

    def invalidate_fp8_cache(self):
        if self.w13 is not None:
            self._cache, self._cache_key = None, None

    def fp8_weights(self, with_transpose: bool = False) -> MoEWeightsFP8:
        """The layer's ``MoEWeightsFP8``, requantized only if a master weight changed (or the transposed copies are
        asked for and not cached yet)."""
        if self.w13 is None:  # FP8-only module
            return MoEWeightsFP8(self.w13_fp8, self.w13_scale, self.w2_fp8, self.w2_scale)
        key = self._master_key()
        if (self._cache is None or self._cache_key != key
                or (with_transpose and not self._cache.has_transpose)):
            self._cache = None  # free the old copies before the new ones are allocated
            self._cache = quantize_moe_weights(self.w13, self.w2, scale_fmt=self.scale_fmt,
                                               with_transpose=with_transpose)
            self._cache_key = key
            self.fp8_requantizations += 1
        return self._cache

    def load_fp8_(self, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor):
        """Load FP8 expert weights + 128x128 dequantization scales (checkpoint ``weight`` / ``weight_scale_inv``).

        The module becomes FP8-only: master weights are dropped (there is nothing to requantize from)."""
        E, H, inter = self.num_experts, self.hidden_size, self.intermediate_size
        dev = self.gate.weight.device
        for name, t, shape, dt in (("w13", w13, (E, 2 * inter, H), FP8_DTYPE),
                                   ("w13_scale", w13_scale, (E, cdiv(2 * inter, 128), cdiv(H, 128)), torch.float32),
                                   ("w2", w2, (E, H, inter), FP8_DTYPE),
                                   ("w2_scale", w2_scale, (E, cdiv(H, 128), cdiv(inter, 128)), torch.float32)):
            check_tensor(t, name, dtypes=(dt,))
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        self.w13 = None
        self.w2 = None
        # buffers, so that state_dict() / .to() carry the FP8 weights
        for name, t in (("w13_fp8", w13), ("w13_scale", w13_scale), ("w2_fp8", w2), ("w2_scale", w2_scale)):
            self.register_buffer(name, t.to(dev).contiguous())
        self._cache, self._cache_key = None, None
        return self

    @classmethod
    def from_fp8(cls, w13, w13_scale, w2, w2_scale, gate_weight, top_k, **kwargs) -> "FP8MoE":
        """Build an FP8-only module from checkpoint tensors (``gate_weight`` ``(E, H)``, the router)."""
        E, two_i, H = w13.shape
        m = cls(E, H, two_i // 2, top_k, device="meta", **kwargs)
        m.gate = nn.Linear(H, E, bias=False, device=gate_weight.device, dtype=torch.float32)
        with torch.no_grad():
            m.gate.weight.copy_(gate_weight.float())
        return m.load_fp8_(w13, w13_scale, w2, w2_scale)

    # --------------------------------------------------------------------------------------- forward
    def route(self, x: torch.Tensor):
        """Router in float32: softmax over experts, top-k, optional renormalization -> (weights f32, ids int32)."""
        logits = self.gate(x.float())
        probs = torch.softmax(logits, dim=-1)
        w, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        return w, ids.to(torch.int32)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        check_tensor(hidden_states, "hidden_states", dims=(2,))
        topk_weights, topk_ids = self.route(hidden_states)
        select = functools.partial(select_grouped_gemm, self.backend)
        if self.w13 is not None and needs_grad(hidden_states, topk_weights, self.w13, self.w2):
            fw = self.fp8_weights(with_transpose=True)
            return moe_forward_impl(hidden_states, self.w13, self.w2, topk_weights, topk_ids, select_gemm=select,
                                    scale_fmt=self.scale_fmt, fp8_weights=fw)
        fw = self.fp8_weights()
        return moe_forward_impl(hidden_states, fw.w13, fw.w2, topk_weights, topk_ids, select_gemm=select,
                                w13_scale=fw.w13_scale, w2_scale=fw.w2_scale, scale_fmt=self.scale_fmt)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, top_k={self.top_k}, scale_fmt={self.scale_fmt!r}, "
                f"backend={self.backend!r}, fp8_only={self.w13 is None}")
