"""MoE combine: ``out[t] = sum_j w[t, j] * x[inv_perm[t, j]]`` in float32, j ascending (a fixed order: bitwise
deterministic, no atomics), rows with ``inv_perm`` -1 (dropped choices) skipped.

Each term is formed as ``where(valid, w * x, 0)`` and then added, the reference's exact sequence; the select between
the product and the sum also keeps the compiler from contracting them into an FMA, so the GPU rounds like torch.
"""
import triton
import triton.language as tl

from .swiglu import _round_to
from .pdl import pdl_prologue


@triton.jit
def moe_combine_kernel(
    # pointers
    x_ptr, inv_ptr, w_ptr, out_ptr,
    # sizes
    H,
    # strides
    stride_xr, stride_xh, stride_it, stride_ik, stride_wt, stride_wk, stride_ot, stride_oh,
    # meta
    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, OUT_BF16: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # wait for / release the neighbouring launches (kernels/pdl.py)
):
    """Grid: (T, cdiv(H, BLOCK_H))."""
    pdl_prologue(USE_PDL)
    h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    t = tl.program_id(0).to(tl.int64)
    combine_rows(x_ptr, inv_ptr, w_ptr, out_ptr, t, h, None, h < H,
                 stride_xr, stride_xh, stride_it, stride_ik, stride_wt, stride_wk, stride_ot, stride_oh,
                 TOP_K, OUT_BF16, "")


@triton.jit
def combine_rows(x_ptr, inv_ptr, w_ptr, out_ptr, t, h, tmask, hmask,
                 stride_xr, stride_xh, stride_it, stride_ik, stride_wt, stride_wk, stride_ot, stride_oh,
                 TOP_K: tl.constexpr, OUT_BF16: tl.constexpr, X_CACHE: tl.constexpr):
    """``out[t, h]``, the module docstring's sum, for tokens ``t`` (int64: a scalar, or (TB, 1) for a tile of
    tokens, read where ``tmask``; None: every token is real) and columns ``h`` (int64 (BH,), or (1, BN); stored where
    ``hmask`` and ``tmask``). Per element the same operations in the same order whatever the shapes. ``X_CACHE``: the
    cache modifier of the rows' loads (``".cg"`` where other programs wrote them moments ago)."""
    acc = tl.zeros_like(h + t).to(tl.float32)
    if tmask is not None:
        hmask = hmask & tmask
    for j in tl.static_range(TOP_K):
        if tmask is None:
            row = tl.load(inv_ptr + t * stride_it + j * stride_ik)
            w = tl.load(w_ptr + t * stride_wt + j * stride_wk).to(tl.float32)
        else:
            row = tl.load(inv_ptr + t * stride_it + j * stride_ik, mask=tmask, other=-1)
            w = tl.load(w_ptr + t * stride_wt + j * stride_wk, mask=tmask, other=0.0).to(tl.float32)
        valid = row >= 0
        vmask = hmask & ((tl.zeros_like(h) + row) >= 0)  # vector mask: dropped choices read nothing
        x = tl.load(x_ptr + tl.where(valid, row, 0).to(tl.int64) * stride_xr + h * stride_xh, mask=vmask, other=0.0,
                    cache_modifier=X_CACHE)
        acc += tl.where(valid, w * x.to(tl.float32), 0.0)
    if OUT_BF16:  # round to nearest even by bits first: the CPU interpreter's float32 -> bfloat16 cast truncates
        acc = _round_to(acc, True)
    tl.store(out_ptr + t * stride_ot + h * stride_oh, acc.to(out_ptr.dtype.element_ty), mask=hmask)
