"""Numeric constants and tiny helpers shared by every layer (no kernels, no dispatch).

The scale convention everywhere in fp8_deep is the *dequantization* scale: ``x ~= q.float() * s``
(vLLM calls the weight one ``weight_scale_inv``; DeepGEMM's ``sf`` is the same number).
"""
from __future__ import annotations

import os

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
# DeepGEMM's reference clamps a weight block's amax to 1e-4 (per_block_cast_to_fp8); vLLM's activation
# quantizer uses eps=1e-10. Both keep an all-zero block from producing a zero scale (and 0 * inf = NaN).
WEIGHT_AMAX_EPS = 1e-4
ACT_EPS = 1e-10
# vLLM's CUDA per_token_group_quant_fp8 floors a UE8M0 activation scale at 1e-10 (float32) before rounding it up to a
# power of two, ``exp2f(ceilf(log2f(fmaxf(s, 1e-10f))))``: groups with amax < 448e-10 (all-zero padding rows) get
# 2^-33, not the round-up of amax / 448. Weights never reach it (amax >= 1e-4 -> s >= 2.2e-7).
UE8M0_ACT_SCALE_FLOOR = 1e-10
BLOCK = 128  # the DeepSeek-V3 block edge: 128x128 weight blocks, 1x128 activation groups, 128-row segments

SCALE_FMTS = ("fp32", "ue8m0")
SCALE_LAYOUTS = ("row_major", "tma_aligned")
HIGH_PRECISION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def align(x: int, a: int) -> int:
    return cdiv(x, a) * a


def is_pow2(v: int) -> bool:
    return v >= 1 and (v & (v - 1)) == 0


_SM_COUNT = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (cached); 2 off CUDA, where the interpreter runs programs one after
    the other and a small persistent grid exercises the loops over blocks or tiles."""
    device = torch.device(device)
    if device.type != "cuda":
        return 2
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def interpreter_active() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors always run the Triton kernels; CPU tensors do under the interpreter, else the reference. Under
    the interpreter its FP8 cast is fixed first (``fp8_deep._interpreter``): unpatched, ~3% of q bytes are wrong."""
    if interpreter_active():
        from ._interpreter import patch_interpreter_fp8_cast
        patch_interpreter_fp8_cast()
        return True
    return t.is_cuda
