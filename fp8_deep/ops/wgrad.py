"""Launcher for the FP8 block-scaled K-grouped GEMM: the MoE experts' weight gradient (wgrad).

``out[e] (P, Q) = deq(a_t)[:, seg_e] @ deq(b_t)[:, seg_e].T``, summed over the token rows of expert ``e``'s segment
(the K axis is grouped, not M as in the forward). For the MoE: ``dW13[e] = dH_e^T X_e`` (``a_t`` = the gate/up
gradient transposed, ``P = 2I``; ``b_t`` = the cached input transposed, ``Q = H``) and ``dW2[e] = dY_e^T A_e``
(``P = H``, ``Q = I``). Operands come from ``quantize_activation_t``-style producers: K-major FP8 with 128x1 scales.

Numerics (DeepSeek-V3 section 3.3, DeepGEMM's k-grouped kernel): dequantization scales ``x ~= q * s``; every 128-row
chunk's FP8 product is promoted to float32 and scaled there, ``acc += dot(a_chunk, b_chunk^T) * sa[p] * sb[q]``.

Output bytes (see shared/docs/ANCHORS.md, training anchors): a wgrad of ``k`` rows does ``2k`` FLOPs per output
element, so below ~1000 rows per expert the output write, not the FP8 inputs, bounds the kernel. The whole
reduction over an expert's tokens is kept in float32 registers and the result is written **once** per element in
the gradient's dtype (``out_dtype=torch.bfloat16`` moves 2 bytes per element, DeepGEMM's SM90 kernel reads and
writes a float32 C: 8). ``accumulate=True`` adds into a float32 ``out`` (a Megatron-style ``main_grad``): 8 bytes,
only when the parameter has one.

No host synchronisation: the grid is ``E * cdiv(P, BLOCK_P) * cdiv(Q, BLOCK_Q)`` (or a persistent grid of at most
that); the kernel reads the offsets and counts on the device, so the launch can be captured in a CUDA graph.

Tile configurations: ``pick_wgrad_config(expected_rows, P, Q)``; ``FP8_DEEP_WGRAD_CONFIG`` (e.g.
``"BLOCK_P=128,BLOCK_Q=128,GROUP_P=8,num_warps=8,num_stages=3"``) pins one configuration for every call.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..kernels.wgrad import _k_grouped_gemm_fp8_kernel, _k_grouped_gemm_fp8_tma_kernel
from ..numerics import BLOCK, FP8_DTYPE, cdiv, sm_count, use_triton
from ._checks import check_out, check_outputs_disjoint, check_tensor
from ._config import TileConfig
from ._launch import FP_FUSION, on_input_device

__all__ = ["WgradConfig", "k_grouped_gemm_fp8", "pick_wgrad_config", "WGRAD_CONFIGS", "CONFIG_ENV"]

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CONFIG_ENV = "FP8_DEEP_WGRAD_CONFIG"


@dataclass(frozen=True)
class WgradConfig(TileConfig):
    """One tile configuration of the wgrad kernel. ``BLOCK_K`` is fixed at 128 (one promotion per scale block)."""
    _WHAT = "wgrad config"
    BLOCK_P: int = 128
    BLOCK_Q: int = 128
    GROUP_P: int = 8
    PERSISTENT: bool = False   # grid capped at 2 programs per SM looping over tiles (vs one program per tile)
    TMA: bool = False          # TMA descriptor loads for the full chunks (Hopper; 16-byte aligned operands)
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        self._check_pow2(("BLOCK_P", "BLOCK_Q"), 16, 256)
        if self.GROUP_P < 1:
            raise ValueError(f"WgradConfig.GROUP_P must be >= 1, got {self.GROUP_P}")
        self._check_warps()
        if self.num_stages < 1:
            raise ValueError(f"WgradConfig.num_stages must be >= 1, got {self.num_stages}")


# Candidates, timed by bench/bench_wgrad.py --sweep (H100 figures at pick_wgrad_config; the last four not yet).
# 128x128 output tiles with 8 warps: two warpgroups of 64 rows, the float32 accumulator and one chunk's product at
# 64 + 64 registers per thread; two programs share an SM only if the compiler stays under 128 registers per thread,
# else the global stores of one tile's epilogue (fire-and-forget) drain while the next tile's loads start.
# Short K loops (2-8 chunks at 256-1024 rows) gain little from deep pipelines: 3 stages = 96 KiB of shared memory,
# 4 for long segments. The 64-row / 4-warp tiles are the occupancy alternative, TMA=1 the copy-engine one.
WGRAD_CONFIGS = (
    WgradConfig(BLOCK_P=128, BLOCK_Q=128, GROUP_P=8, num_warps=8, num_stages=3),
    WgradConfig(BLOCK_P=128, BLOCK_Q=128, GROUP_P=8, num_warps=8, num_stages=4),
    WgradConfig(BLOCK_P=128, BLOCK_Q=128, GROUP_P=8, TMA=True, num_warps=8, num_stages=3),
    WgradConfig(BLOCK_P=128, BLOCK_Q=128, GROUP_P=8, PERSISTENT=True, num_warps=8, num_stages=3),
    WgradConfig(BLOCK_P=64, BLOCK_Q=128, GROUP_P=8, num_warps=4, num_stages=3),
    WgradConfig(BLOCK_P=128, BLOCK_Q=256, GROUP_P=4, num_warps=8, num_stages=3),
    WgradConfig(BLOCK_P=64, BLOCK_Q=64, GROUP_P=8, num_warps=4, num_stages=2),
    # TMA variants (the pointer-load tiles above measured 9-26 TFLOP/s on an H100): 64-row tiles with 4 warps fit
    # two or three programs per SM, so one program's epilogue (the output store) overlaps another's MMAs
    WgradConfig(BLOCK_P=64, BLOCK_Q=128, GROUP_P=8, TMA=True, num_warps=4, num_stages=3),
    WgradConfig(BLOCK_P=64, BLOCK_Q=256, GROUP_P=8, TMA=True, num_warps=4, num_stages=3),
    WgradConfig(BLOCK_P=128, BLOCK_Q=256, GROUP_P=4, TMA=True, num_warps=8, num_stages=3),
    WgradConfig(BLOCK_P=128, BLOCK_Q=128, GROUP_P=8, TMA=True, num_warps=8, num_stages=4),
    WgradConfig(BLOCK_P=128, BLOCK_Q=128, GROUP_P=8, TMA=True, PERSISTENT=True, num_warps=8, num_stages=3),
    # around the measured best ([7]): pipeline depth, m-grouping, a narrower tile (not measured yet)
    WgradConfig(BLOCK_P=64, BLOCK_Q=128, GROUP_P=8, TMA=True, num_warps=4, num_stages=4),
    WgradConfig(BLOCK_P=64, BLOCK_Q=128, GROUP_P=8, TMA=True, num_warps=4, num_stages=2),
    WgradConfig(BLOCK_P=64, BLOCK_Q=128, GROUP_P=16, TMA=True, num_warps=4, num_stages=3),
    WgradConfig(BLOCK_P=64, BLOCK_Q=64, GROUP_P=8, TMA=True, num_warps=4, num_stages=3),
)


def pick_wgrad_config(expected_rows: int, P: int, Q: int) -> WgradConfig:
    """The configuration for ``expected_rows`` token rows per expert and a ``(P, Q)`` gradient per expert
    (``FP8_DEEP_WGRAD_CONFIG`` overrides).

    64x128 tiles with 4 warps and TMA loads everywhere the gradient is at least that large (measured below); a
    gradient narrower than 128 on a side takes 64-wide pointer tiles (less masked work)."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return WgradConfig.parse(env)
    if P <= 64 or Q <= 64:
        return WGRAD_CONFIGS[6]
    # H100 (Triton 3.6), DeepSeek-V3 E=32, bf16 out, 2026-12-07 (bench_wgrad.py --sweep): the 64x128 TMA tiles with
    # 4 warps (two or three programs per SM, so one program's output store overlaps another's MMAs) took dW13 in
    # 1.31 / 3.31 ms at 256 / 1024 rows (367 / 582 TFLOP/s) and dW2 in 0.65 / 1.44 ms, against 2.09 / 4.37 and
    # 1.03 / 2.19 for the 128x128 8-warp TMA tiles; the pointer-load tiles 18-54x slower. The launcher falls back to
    # the pointer tiles where TMA cannot run (CPU, interpreter, operands TMA cannot describe).
    return WGRAD_CONFIGS[7]


def _validate(a_t, a_t_scale, b_t, b_t_scale, expert_offsets, expert_counts, out, out_dtype, accumulate):
    check_tensor(a_t, "a_t", dtypes=(FP8_DTYPE,), dims=(2,), last_stride_one=True)
    dev = a_t.device
    P, M = a_t.shape
    G = cdiv(M, BLOCK)
    check_tensor(b_t, "b_t", dtypes=(FP8_DTYPE,), dims=(2,), device=dev, last_stride_one=True)
    Q, Mb = b_t.shape
    if Mb != M:
        raise ValueError(f"b_t must be (Q, M) with M = a_t.shape[1] = {M} (the token rows both operands share), "
                         f"got shape {tuple(b_t.shape)}")
    check_tensor(a_t_scale, "a_t_scale", dtypes=(torch.float32,), dims=(2,), device=dev)
    if tuple(a_t_scale.shape) != (P, G):
        raise ValueError(f"a_t_scale must be (P, ceil(M/128)) = {(P, G)} (128x1 tiles of a_t: one scale per 128 "
                         f"token rows), got {tuple(a_t_scale.shape)}")
    check_tensor(b_t_scale, "b_t_scale", dtypes=(torch.float32,), dims=(2,), device=dev)
    if tuple(b_t_scale.shape) != (Q, G):
        raise ValueError(f"b_t_scale must be (Q, ceil(M/128)) = {(Q, G)} (128x1 tiles of b_t), got "
                         f"{tuple(b_t_scale.shape)}")
    check_tensor(expert_offsets, "expert_offsets", dtypes=(torch.int32,), dims=(1,), device=dev)
    E = expert_offsets.shape[0]
    check_tensor(expert_counts, "expert_counts", dtypes=(torch.int32,), dims=(1,), device=dev)
    if expert_counts.shape[0] != E:
        raise ValueError(f"expert_counts must have one entry per expert like expert_offsets, shape ({E},), got "
                         f"{tuple(expert_counts.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {[str(d) for d in OUT_DTYPES]}, got {out_dtype}")
    if accumulate:
        if out is None:
            raise ValueError("accumulate=True adds into an existing gradient: pass out=, a float32 (E, P, Q) buffer "
                             "(e.g. the parameter's main_grad)")
        if out_dtype != torch.float32 or (isinstance(out, torch.Tensor) and out.dtype != torch.float32):
            raise TypeError(f"accumulate=True needs a float32 out and out_dtype=torch.float32 (a bf16 running sum "
                            f"would round at every step), got out {getattr(out, 'dtype', None)} and out_dtype "
                            f"{out_dtype}")
    return P, Q, M, E


def _k_grouped_torch(a_t, a_t_scale, b_t, b_t_scale, expert_offsets, expert_counts, out, accumulate):
    """CPU path without Triton: the kernel's math (per-128-row promotion in float32), experts looped on the host."""
    M = a_t.shape[1]
    for e, (off, cnt) in enumerate(zip(expert_offsets.tolist(), expert_counts.tolist())):
        cnt = max(0, min(cnt, M - off))
        acc = torch.zeros(out.shape[1], out.shape[2], dtype=torch.float32, device=a_t.device)
        for k0 in range(0, cnt, BLOCK):
            cols = slice(off + k0, off + min(k0 + BLOCK, cnt))
            kb = (off + k0) // BLOCK
            part = a_t[:, cols].float() @ b_t[:, cols].float().t()
            acc += part * a_t_scale[:, kb, None] * b_t_scale[None, :, kb]
        if accumulate:
            out[e] += acc
        else:
            out[e] = acc.to(out.dtype)
    return out


def _tma_problem(a_t: torch.Tensor, b_t: torch.Tensor) -> Optional[str]:
    """Why the TMA kernel cannot take these operands here (None when it can)."""
    if a_t.is_cuda and torch.cuda.get_device_capability(a_t.device) < (9, 0):
        return "wgrad config TMA=1 needs an SM90 (Hopper) or newer GPU; use a pointer-load config (TMA=0)"
    for t, name in ((a_t, "a_t"), (b_t, "b_t")):
        if t.data_ptr() % 16 or (t.shape[0] > 1 and t.stride(0) % 16):
            return (f"wgrad config TMA=1 needs {name} 16-byte aligned with a row stride that is a multiple of 16 "
                    f"bytes (got stride {t.stride(0)}); use a pointer-load config (TMA=0)")
    return None


@on_input_device
def k_grouped_gemm_fp8(a_t: torch.Tensor, a_t_scale: torch.Tensor, b_t: torch.Tensor, b_t_scale: torch.Tensor,
                       expert_offsets: torch.Tensor, expert_counts: torch.Tensor, *,
                       out: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.float32,
                       accumulate: bool = False, config=None) -> torch.Tensor:
    """FP8 block-scaled GEMM grouped along K: ``out[e] = deq(a_t)[:, seg_e] @ deq(b_t)[:, seg_e].T``.

    Args:
        a_t: float8_e4m3fn ``(P, M)``, unit stride along M (K-major; M = the token rows of the permuted buffer).
        a_t_scale: float32 ``(P, ceil(M/128))`` dequantization scales of 128x1 tiles (one per 128 consecutive token
            rows and row of ``a_t``), any strides; MN-major ``(1, align(P, 4))`` (``alloc_scales(...,
            "tma_aligned")``, what the producers write) gives coalesced reads.
        b_t: float8_e4m3fn ``(Q, M)``, unit stride along M; b_t_scale: float32 ``(Q, ceil(M/128))``, any strides.
        expert_offsets: int32 ``(E,)`` on the device: expert ``e`` owns token rows ``[off_e, off_e + count_e)``.
            **Precondition** (not checked: it would need a host sync): every offset is a multiple of 128, so no
            128-row scale block straddles two experts, and segments lie inside ``[0, M)``.
        expert_counts: int32 ``(E,)`` on the device; negative counts as 0. Columns past ``count_e`` (padding up to
            the next segment) never contribute, whatever bytes they hold.
        out: optional caller buffer ``(E, P, Q)`` of ``out_dtype``, any strides, written in place.
        out_dtype: float32 (default), bfloat16 or float16: every element is written once in it (bf16 halves the
            output bytes, which bound the kernel below ~1000 rows per expert).
        accumulate: add into ``out`` (read-modify-write) instead of overwriting it; needs a float32 ``out`` (a
            Megatron-style ``main_grad``). An empty expert's slice is then left untouched.
        config: ``WgradConfig`` / dict / ``"KEY=VALUE,..."`` string pinning the tiles (default: ``pick_wgrad_config``
            with ``M // E`` expected rows per expert).

    Returns:
        ``out`` ``(E, P, Q)``: every element written (zeros for an empty expert unless ``accumulate``). P and Q need
        not be multiples of 128. No host synchronisation on CUDA; deterministic (fixed K order, no atomics).
    """
    P, Q, M, E = _validate(a_t, a_t_scale, b_t, b_t_scale, expert_offsets, expert_counts, out, out_dtype, accumulate)
    if out is None:
        out = torch.empty(E, P, Q, dtype=out_dtype, device=a_t.device)
    else:
        check_out(out, "out", (E, P, Q), out_dtype, a_t.device)
        check_outputs_disjoint([("a_t", a_t), ("a_t_scale", a_t_scale), ("b_t", b_t), ("b_t_scale", b_t_scale),
                                ("expert_offsets", expert_offsets), ("expert_counts", expert_counts)],
                               [("out", out)])
    if E == 0 or P == 0 or Q == 0:
        return out
    if M == 0:  # no token rows at all: every expert is empty
        if not accumulate:
            out.zero_()
        return out
    if not use_triton(a_t):
        return _k_grouped_torch(a_t, a_t_scale, b_t, b_t_scale, expert_offsets, expert_counts, out, accumulate)

    pinned = config if config is not None else os.environ.get(CONFIG_ENV)
    if pinned:
        cfg = WgradConfig.parse(pinned)
        if cfg.TMA:
            problem = _tma_problem(a_t, b_t)
            if problem:
                raise ValueError(problem)
    else:
        cfg = pick_wgrad_config(max(1, M // E), P, Q)
        if cfg.TMA and _tma_problem(a_t, b_t):
            cfg = WGRAD_CONFIGS[0]
    bp, bq = cfg.BLOCK_P, cfg.BLOCK_Q
    tiles = E * cdiv(P, bp) * cdiv(Q, bq)
    grid = (max(1, min(tiles, 2 * sm_count(a_t.device)) if cfg.PERSISTENT else tiles),)
    args = (a_t, a_t_scale, b_t, b_t_scale, out, expert_offsets, expert_counts,
            P, Q, M, E,
            a_t.stride(0),
            a_t_scale.stride(0), a_t_scale.stride(1),
            b_t.stride(0),
            b_t_scale.stride(0), b_t_scale.stride(1),
            out.stride(0), out.stride(1), out.stride(2))
    meta = dict(BLOCK_P=bp, BLOCK_Q=bq, BLOCK_K=BLOCK, GROUP_P=cfg.GROUP_P, ACCUMULATE=bool(accumulate),
                num_warps=cfg.num_warps)
    if cfg.TMA:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_desc = TensorDescriptor(a_t, [P, M], [a_t.stride(0), 1], [bp, BLOCK])
        b_desc = TensorDescriptor(b_t, [Q, M], [b_t.stride(0), 1], [bq, BLOCK])
        _k_grouped_gemm_fp8_tma_kernel[grid](a_desc, b_desc, *args, NUM_STAGES=cfg.num_stages, **meta,
                                             **FP_FUSION)
    else:
        _k_grouped_gemm_fp8_kernel[grid](*args, num_stages=cfg.num_stages, **meta, **FP_FUSION)
    return out
