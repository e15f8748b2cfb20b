"""DeepGEMM as a grouped-GEMM backend of the MoE (optional; imported lazily, only when the backend is asked for).

DeepGEMM (https://github.com/deepseek-ai/DeepGEMM) ships the FP8 grouped GEMM DeepSeek-V3 uses for its MoE: the
"contiguous" layout, where each expert's rows form one segment starting at a multiple of 128 and a per-row
``m_indices`` names the expert (-1 on padding rows). Its Python entry point (2.x; ``csrc/apis/gemm.hpp``):

    m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), d, m_indices,
                                     recipe=None, ..., disable_ue8m0_cast=False, ...)

(``m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices)`` before 2.0). On SM90 with float32 scales the
default recipe is ``(1, 128, 128)`` -- 1x128 LHS groups, 128x128 RHS blocks, exactly fp8_deep's quantization -- and the
float32 scales are used as they are: ``disable_ue8m0_cast`` only matters on SM100, where float32 scales are packed
into UE8M0 (rounded to powers of two). So we pass nothing but the four positional arguments, which both API
generations accept. On SM100 this backend computes the same function only with ``scale_fmt="ue8m0"`` scales.

What DeepGEMM needs, checked here so a mismatch raises a readable error instead of a C++ assertion or a silent
re-layout copy inside DeepGEMM:

* ``a`` FP8 ``(M, K)`` K-major; ``sfa`` float32 ``(M, ceil(K/128))`` MN-major and TMA-aligned, strides
  ``(1, align(M, 4))`` (DeepGEMM would otherwise transpose it itself, an extra pass per call).
* ``b`` FP8 ``(E, N, K)`` K-major; ``sfb`` float32 ``(E, ceil(N/128), ceil(K/128))`` contiguous.
* ``K % 16 == 0`` and ``N % 8 == 0``: TMA needs 16-byte aligned rows of ``a``/``b`` (FP8) and of ``d`` (bf16).
* ``d`` bf16 ``(M, N)`` row-major; no accumulation into it.
* ``m_indices`` int32 ``(M,)`` contiguous; every segment starts at a multiple of
  ``get_mk_alignment_for_contiguous_layout()``, which must be 128 (fp8_deep's routing block); SM100 builds can move
  it to 256, and we refuse rather than mis-lay the segments.

Rows whose ``m_indices`` is -1 are padding: DeepGEMM skips them, so their output rows are unspecified unless the
caller zeroed ``out``; consumers (the combine) never read them.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from ..numerics import BLOCK, FP8_DTYPE, cdiv
from ..ops import _registry
from ..ops.layout import tma_aligned_scale_strides

__all__ = ["DeepGemmGroupedGemm", "is_available", "load_backend", "register", "INSTALL_HINT"]

INSTALL_HINT = (
    "DeepGEMM is not importable. Install it for your torch/CUDA (it builds from source: "
    "`pip install deepinfer-gemm==2.8.2` or a clone of https://github.com/deepseek-ai/DeepGEMM with "
    "`DG_FORCE_BUILD=1 python setup.py build_ext --inplace`), and put it on PYTHONPATH; on the project's GPU machine "
    "bench/gpu_check.sh builds it from the sdist that tools/fetch_deepgemm.sh fetches (see "
    "shared/docs/DEEPGEMM_ON_DEVICE.md; run with LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6). "
    "Or use backend='triton'."
)

# Newest first: 2.x name, then the 1.x name (same positional convention).
GEMM_NAMES = ("m_grouped_fp8_gemm_nt_contiguous", "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous")
ALIGNMENT_NAME = "get_mk_alignment_for_contiguous_layout"
ALIGNMENT_LEGACY_NAME = "get_m_alignment_for_contiguous_layout"


def _import_deep_gemm():
    try:
        return importlib.import_module("deep_gemm")
    except ImportError as exc:  # also a broken build: undefined symbols surface as ImportError
        raise ImportError(f"{INSTALL_HINT} (import error: {exc})") from exc
    except OSError as exc:  # a shared library that cannot be loaded
        raise ImportError(f"{INSTALL_HINT} (loading failed: {exc})") from exc


def _resolve(module, names):
    """First attribute of ``module`` (or its ``utils`` submodule) among ``names``, or None."""
    for owner in (module, getattr(module, "utils", None)):
        if owner is None:
            continue
        for name in names:
            fn = getattr(owner, name, None)
            if callable(fn):
                return fn
    return None


def _check_alignment(module) -> int:
    fn = _resolve(module, (ALIGNMENT_NAME, ALIGNMENT_LEGACY_NAME))
    if fn is None:  # very old builds have no query: their contiguous layout is 128 rows
        return BLOCK
    value = fn()
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or any(int(v) != BLOCK for v in values):
        raise ImportError(
            f"deep_gemm.{ALIGNMENT_NAME}() returned {value!r}, but fp8_deep lays expert segments out on {BLOCK}-row "
            f"boundaries; this DeepGEMM build (or its set_mk_alignment_for_contiguous_layout setting) is not "
            f"compatible. Use backend='triton'.")
    return BLOCK


class DeepGemmGroupedGemm:
    """Grouped-GEMM backend over DeepGEMM's contiguous FP8 GEMM (same interface as ``ops.grouped_gemm``'s
    ``TritonGroupedGemm``: ``gemm(a, a_scale, b, b_scale, plan, out=None)``)."""

    name = "deep_gemm"
    a_scale_layout = "tma_aligned"
    row_alignment = 128  # its contiguous layout: every expert segment starts at a multiple of 128 rows

    def __init__(self, fn, module=None, alignment: int = BLOCK):
        self._fn = fn
        self.module = module
        self.alignment = alignment
        self.fn_name = getattr(fn, "__name__", repr(fn))

    def gemm(self, a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, plan,
             out: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """``out[r] = deq(a[r]) @ deq(b[plan.m_indices[r]]).T`` for every row ``r`` whose ``m_indices`` is >= 0.

        a: float8_e4m3fn ``(plan.num_rows, K)`` K-major (unit last stride, 16-byte aligned rows).
        a_scale: float32 ``(plan.num_rows, ceil(K/128))`` MN-major TMA-aligned, strides ``(1, align(M, 4))``.
        b: float8_e4m3fn ``(E, N, K)`` K-major; b_scale: float32 ``(E, ceil(N/128), ceil(K/128))`` contiguous.
        plan: ``fp8_deep.ops.plan.RoutingPlan``; only ``m_indices`` (int32, -1 on padding) and ``num_rows`` are read.
        out: optional bf16 ``(plan.num_rows, N)`` row-major buffer. Returns ``out``; padding rows unspecified.
        """
        M = plan.num_rows
        m_indices = plan.m_indices
        if getattr(plan, "block_size", self.row_alignment) % self.row_alignment:
            raise ValueError(f"plan.block_size must be a multiple of {self.row_alignment} for DeepGEMM's contiguous "
                             f"layout (every expert segment starts at a multiple of 128 rows), got {plan.block_size}; "
                             f"build it with align_routing(..., block_size=128)")
        self._validate(a, a_scale, b, b_scale, m_indices, M, out, out_dtype)
        N = b.shape[1]
        if out is None:
            out = torch.empty(M, N, dtype=torch.bfloat16, device=a.device)
        if M == 0:
            return out
        self._fn((a, a_scale), (b, b_scale), out, m_indices)
        return out

    def _validate(self, a, a_scale, b, b_scale, m_indices, M, out, out_dtype):
        def tensor(t, name):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")

        for t, name in ((a, "a"), (a_scale, "a_scale"), (b, "b"), (b_scale, "b_scale"), (m_indices, "plan.m_indices")):
            tensor(t, name)
        if out_dtype != torch.bfloat16:
            raise TypeError(f"the deep_gemm backend writes bfloat16 only, got out_dtype={out_dtype}")
        if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
            raise TypeError(f"a and b must be {FP8_DTYPE}, got a {a.dtype} and b {b.dtype}")
        if a.dim() != 2:
            raise ValueError(f"a must be 2-D (M, K), got shape {tuple(a.shape)}")
        if b.dim() != 3:
            raise ValueError(f"b must be 3-D (E, N, K), got shape {tuple(b.shape)}")
        K = a.shape[1]
        E, N, Kb = b.shape
        if Kb != K:
            raise ValueError(f"b must be (E, N, K) with K = a.shape[1] = {K}, got shape {tuple(b.shape)}")
        if a.shape[0] != M:
            raise ValueError(f"a must have plan.num_rows = {M} rows, got shape {tuple(a.shape)}")
        if K % 16 != 0:
            raise ValueError(f"the deep_gemm backend needs K % 16 == 0 (16-byte TMA rows of FP8), got K = {K}; "
                             f"use backend='triton'")
        if N % 8 != 0:
            raise ValueError(f"the deep_gemm backend needs N % 8 == 0 (16-byte TMA rows of the bf16 output), got "
                             f"N = {N}; use backend='triton'")
        if M % self.alignment != 0:
            raise ValueError(f"plan.num_rows must be a multiple of {self.alignment} (DeepGEMM's contiguous layout), "
                             f"got {M}")
        if K > 1 and a.stride(1) != 1 or (M > 1 and a.stride(0) % 16 != 0):
            raise ValueError(f"a must be K-major with 16-byte aligned rows, got strides {a.stride()}")
        if b.stride(2) != 1 or (N > 1 and b.stride(1) % 16 != 0):
            raise ValueError(f"b must be K-major (unit stride along K, 16-byte aligned rows), got strides {b.stride()}")
        kb = cdiv(K, BLOCK)
        if a_scale.dtype != torch.float32 or b_scale.dtype != torch.float32:
            raise TypeError(f"a_scale and b_scale must be float32 (SM90 DeepGEMM reads float32 scales), got "
                            f"{a_scale.dtype} and {b_scale.dtype}")
        if tuple(a_scale.shape) != (M, kb):
            raise ValueError(f"a_scale must be (M, ceil(K/128)) = {(M, kb)}, got {tuple(a_scale.shape)}")
        want = tma_aligned_scale_strides((M, kb))
        if M > 0 and tuple(a_scale.stride()) != want:
            raise ValueError(f"a_scale must be MN-major TMA-aligned with strides {want}, got {a_scale.stride()}; "
                             f"produce it with quantize_activation(..., scale_layout='tma_aligned') or "
                             f"fp8_deep.ops.to_tma_aligned_scales")
        nb = cdiv(N, BLOCK)
        if tuple(b_scale.shape) != (E, nb, kb):
            raise ValueError(f"b_scale must be (E, ceil(N/128), ceil(K/128)) = {(E, nb, kb)}, got {tuple(b_scale.shape)}")
        if not b_scale.is_contiguous():
            raise ValueError(f"b_scale must be contiguous, got strides {b_scale.stride()}")
        if m_indices.dtype != torch.int32 or m_indices.dim() != 1 or m_indices.shape[0] != M:
            raise ValueError(f"plan.m_indices must be int32 ({M},) (expert of each row, -1 on padding), got "
                             f"{m_indices.dtype} {tuple(m_indices.shape)}")
        if not m_indices.is_contiguous():
            raise ValueError("plan.m_indices must be contiguous")
        dev = a.device
        for t, name in ((a_scale, "a_scale"), (b, "b"), (b_scale, "b_scale"), (m_indices, "plan.m_indices")):
            if t.device != dev:
                raise ValueError(f"{name} is on {t.device} but a is on {dev}")
        if out is not None:
            tensor(out, "out")
            if out.dtype != torch.bfloat16:
                raise TypeError(f"out must be bfloat16 (DeepGEMM writes bf16 on SM90), got {out.dtype}")
            if tuple(out.shape) != (M, N):
                raise ValueError(f"out must have shape {(M, N)}, got {tuple(out.shape)}")
            if out.device != dev:
                raise ValueError(f"out is on {out.device} but a is on {dev}")
            if M > 0 and N > 0 and (out.stride(1) != 1 or out.stride(0) % 8 != 0):
                raise ValueError(f"out must be row-major with 16-byte aligned rows, got strides {out.stride()}")


def load_backend() -> DeepGemmGroupedGemm:
    """Import deep_gemm and return the backend; ImportError (with the build/install hint) when it cannot run."""
    module = _import_deep_gemm()
    fn = _resolve(module, GEMM_NAMES)
    if fn is None:
        raise ImportError(f"deep_gemm {getattr(module, '__version__', '?')} has none of {list(GEMM_NAMES)}; "
                          f"{INSTALL_HINT}")
    alignment = _check_alignment(module)
    return DeepGemmGroupedGemm(fn, module=module, alignment=alignment)


def register() -> None:
    """Register the loader with ``fp8_deep.ops._registry`` (cheap: nothing is imported until first use)."""
    _registry.register("grouped_gemm", "deep_gemm", load_backend)


def is_available() -> bool:
    """True when deep_gemm imports and exposes a compatible contiguous grouped GEMM (result cached)."""
    register_needed = "deep_gemm" not in _registry._LOADERS.get("grouped_gemm", {})
    if register_needed:
        register()
    return _registry.available("grouped_gemm", "deep_gemm")


# ------------------------------------------------------------------------------------------------ k-grouped (wgrad)
# DeepGEMM 2.x, csrc/apis/gemm.hpp + the pybind registration (2.8.x):
#     k_grouped_fp8_gemm_nt_contiguous(a, b, d, ks, ks_tensor, c=None, recipe=(1, 1, 128), compiled_dims="mn")
# (later builds rename ks -> ks_cpu, ks_tensor -> grouped_layout and add use_psum_layout=False: the same positions).
# On SM90 it is the k-grouped FP8 entry point (in the sources read, the "tn" variant has no SM90 branch); it wants
#   a: float8 1-D ``(sum(ks) * P,)``: group i's ``(P, ks[i])`` block K-major and contiguous, groups back to back;
#   sfa: float32 ``(P, sum(ks) / 128)``, column j = the j-th 128-row block of the concatenated groups, MN-major
#        TMA-aligned (it re-lays out anything else itself, at a cost); b / sfb likewise with Q;
#   d: float32 ``(E, P, Q)`` contiguous and c (required for "nt"): d = c + the product (``c is d``: in place);
#   ks: host list of the groups' K (multiples of 128; 0 allowed: the group is skipped, d keeps c), ks_tensor the same
#       on the device; all padding inside a group must be zero bytes (it is multiplied, not masked).
K_GROUPED_NAMES = ("k_grouped_fp8_gemm_nt_contiguous",)


def deep_gemm_k_grouped_operands(a_t: torch.Tensor, a_t_scale: torch.Tensor, b_t: torch.Tensor,
                                 b_t_scale: torch.Tensor, expert_offsets: torch.Tensor, expert_counts: torch.Tensor):
    """fp8_deep's wgrad operands (``ops.wgrad.k_grouped_gemm_fp8``'s: ``a_t`` ``(P, M)`` / ``b_t`` ``(Q, M)`` FP8 with
    128x1 scales ``(P|Q, ceil(M/128))``, 128-aligned expert segments with padding columns of any content) re-laid out
    for DeepGEMM's SM90 k-grouped kernel: returns ``((a, sfa), (b, sfb), ks, ks_tensor)``.

    Conversion (a copy of both FP8 operands and their scales; **reads the counts on the host**: DeepGEMM takes the
    group sizes as a Python list, so this path is not CUDA-graph capturable and syncs once):
      * data: each expert's columns ``[off_e, off_e + count_e)`` become one contiguous K-major ``(P, ks_e)`` block,
        ``ks_e = align(count_e, 128)``, the padding columns zeroed (ours may hold anything, DeepGEMM multiplies them);
      * scales: the expert's 128-row blocks ``off_e / 128 + j`` gathered into consecutive columns of a new
        ``(P, sum(ks) / 128)`` MN-major TMA-aligned tensor (our producers already write MN-major TMA-aligned scales,
        DeepGEMM's own layout, so only the column gather is new)."""
    from ..numerics import align

    if a_t.dtype != FP8_DTYPE or b_t.dtype != FP8_DTYPE:
        raise TypeError(f"a_t and b_t must be {FP8_DTYPE}, got {a_t.dtype} and {b_t.dtype}")
    if a_t.dim() != 2 or b_t.dim() != 2 or a_t.shape[1] != b_t.shape[1]:
        raise ValueError(f"a_t must be (P, M) and b_t (Q, M) with the same M, got {tuple(a_t.shape)} and "
                         f"{tuple(b_t.shape)}")
    if a_t_scale.dtype != torch.float32 or b_t_scale.dtype != torch.float32:
        raise TypeError("a_t_scale and b_t_scale must be float32 (SM90 DeepGEMM reads float32 scales)")
    M = a_t.shape[1]
    offs = [int(v) for v in expert_offsets.tolist()]
    counts = [max(0, min(int(c), M - o)) for o, c in zip(offs, expert_counts.tolist())]
    if any(o % BLOCK for o, c in zip(offs, counts) if c):
        raise ValueError(f"expert_offsets must be multiples of {BLOCK} (128-row scale blocks), got {offs}")
    ks = [align(c, BLOCK) for c in counts]
    dev = a_t.device

    def pack(x, sx):
        rows = x.shape[0]
        flat = torch.zeros(sum(ks) * rows, dtype=torch.uint8, device=dev)
        sf = torch.empty_strided((rows, sum(ks) // BLOCK), tma_aligned_scale_strides((rows, sum(ks) // BLOCK)),
                                 dtype=torch.float32, device=dev)
        start = 0
        for o, c, k in zip(offs, counts, ks):
            if k:
                block = flat[start * rows:(start + k) * rows].view(rows, k)
                block[:, :c] = x[:, o:o + c].view(torch.uint8)
                sf[:, start // BLOCK:(start + k) // BLOCK] = sx[:, o // BLOCK:o // BLOCK + k // BLOCK]
            start += k
        return flat.view(FP8_DTYPE), sf

    a = pack(a_t, a_t_scale)
    b = pack(b_t, b_t_scale)
    return a, b, ks, torch.tensor(ks, dtype=torch.int32, device=dev)


def k_grouped_gemm_fp8_deep_gemm(a_t: torch.Tensor, a_t_scale: torch.Tensor, b_t: torch.Tensor,
                                 b_t_scale: torch.Tensor, expert_offsets: torch.Tensor, expert_counts: torch.Tensor,
                                 *, out: Optional[torch.Tensor] = None, accumulate: bool = False,
                                 operands=None) -> torch.Tensor:
    """The wgrad GEMM of ``fp8_deep.ops.wgrad.k_grouped_gemm_fp8`` (same operands, same function:
    ``out[e] = deq(a_t)[:, seg_e] @ deq(b_t)[:, seg_e].T``) computed by DeepGEMM's SM90
    ``k_grouped_fp8_gemm_nt_contiguous`` (per-128-row FP32 promotion, like ours).

    DeepGEMM always accumulates into a float32 C: the result is float32 ``(E, P, Q)``. ``accumulate=True`` adds into
    ``out`` (float32, contiguous; C is D, in place); otherwise a fresh zeroed float32 buffer (or ``out``, zeroed
    first) receives the product -- the zeroing and DeepGEMM's read of C are the extra output bytes its SM90 kernel
    moves compared with a single store. ``operands``: what ``deep_gemm_k_grouped_operands`` returned for these
    inputs, to skip the re-layout (a copy of both operands and a host sync; see there). ImportError with the install
    hint when deep_gemm is missing."""
    module = _import_deep_gemm()
    fn = _resolve(module, K_GROUPED_NAMES)
    if fn is None:
        raise ImportError(f"deep_gemm {getattr(module, '__version__', '?')} has no {K_GROUPED_NAMES[0]} "
                          f"(DeepGEMM >= 2.1 on SM90); {INSTALL_HINT}")
    (a, sfa), (b, sfb), ks, ks_tensor = operands if operands is not None else deep_gemm_k_grouped_operands(
        a_t, a_t_scale, b_t, b_t_scale, expert_offsets, expert_counts)
    E, P, Q = len(ks), a_t.shape[0], b_t.shape[0]
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True adds into out: pass a float32 (E, P, Q) contiguous out")
        out = torch.zeros(E, P, Q, dtype=torch.float32, device=a_t.device)
    else:
        if out.dtype != torch.float32 or tuple(out.shape) != (E, P, Q) or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 {(E, P, Q)} tensor (DeepGEMM's SM90 k-grouped kernel "
                             f"accumulates into a float32 C), got {out.dtype} {tuple(out.shape)} strides "
                             f"{out.stride()}")
        if not accumulate:
            out.zero_()
    fn((a, sfa), (b, sfb), out, ks, ks_tensor, out)
    return out
