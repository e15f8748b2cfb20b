"""Launcher for the FP8 block-scaled grouped GEMM (contiguous expert segments, "NT": ``out = a @ b[e].T``).

Numerics (DeepSeek-V3 section 3.3, DeepGEMM, vLLM's Triton block-FP8 MoE): dequantization scales ``x ~= q * s``,
1x128 groups on ``a``, 128x128 blocks on ``b``; the partial product of every 128-wide K block is promoted to float32
and scaled there (``acc += dot(a_blk, b_blk) * a_scale[rows, kb] * b_scale[e, nb, kb]``); output rounded once.

No host synchronisation: the grid depends on ``M``, ``N``, ``E`` and the device's SM count only; the device maps
programs to ``(expert, m-tile, n-tile)`` from ``expert_counts`` (``fp8_deep.kernels.grouped_gemm``), so the launch can
be captured in a CUDA graph.

Tile configurations come from a bucket of the expected rows per expert (a host-side hint; the real counts live on the
device): few rows (<= 64) -> weight-bandwidth bound, persistent swap-AB tiles (weight rows fill the MMA's 64-wide M
side, tokens the narrow N side); 65-127 rows -> 128x128 Triton tiles with TMA loads and a warp-specialized K loop
(Hopper); from 128 rows -> compute bound, the Gluon kernels on SM90 (``fp8_deep.kernels.grouped_gemm_gluon``: async
wgmma, the promotion of one K block overlapped with the next block's MMA, a TMA producer warp), with the portable
Triton tiles wherever Gluon cannot run (CPU / interpreter, other GPUs, operands TMA cannot describe).
``FP8_DEEP_GEMM_CONFIG`` (e.g. ``"BLOCK_M=64,BLOCK_N=128,num_warps=4,num_stages=4,SWAP_AB=1"``) pins one
configuration for every call.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from .. import reference
from ..kernels import grouped_gemm_gluon as _gluon
from ..kernels.grouped_gemm import (_grouped_gemm_fp8_blockmap_kernel, _grouped_gemm_fp8_kernel,
                                    _grouped_gemm_fp8_tma_kernel, _grouped_gemm_swiglu_kernel)
from ..numerics import (ACT_EPS, BLOCK, FP8_DTYPE, FP8_MAX, SCALE_FMTS, SCALE_LAYOUTS, cdiv, interpreter_active,
                        is_pow2, sm_count, use_triton)
from ._checks import check_choice, check_eps, check_out, check_outputs_disjoint, check_tensor
from ._config import TileConfig
from ._launch import FP_FUSION, on_input_device, pdl
from ._tuned import tuned_config
from .layout import alloc_scales, scale_strides
from .plan import check_plan
from .quant import gpu_fast_paths
from .swiglu import silu_mul_quantize

__all__ = ["GemmConfig", "grouped_gemm_fp8", "grouped_gemm_fp8_gather", "gather_config", "gather_gemm2_config", "grouped_gemm_swiglu_fp8", "resolve_config", "pick_config", "peak_rows_per_expert", "TritonGroupedGemm",
           "SMALL_M_CONFIGS", "MEDIUM_M_CONFIGS", "LARGE_M_CONFIGS", "GLUON_CONFIGS", "EXPERIMENTAL_CONFIGS"]

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CONFIG_ENV = "FP8_DEEP_GEMM_CONFIG"


@dataclass(frozen=True)
class GemmConfig(TileConfig):
    """One tile configuration. ``BLOCK_K`` is fixed at 128 (one promotion per scale block)."""
    BLOCK_M: int = 128
    BLOCK_N: int = 128
    GROUP_M: int = 8
    SWAP_AB: bool = False
    SPLIT_M: bool = False      # two independent half-height dots per K block (hides the promotion; not with SWAP_AB)
    PERSISTENT: bool = False   # grid capped at 4 programs per SM looping over tiles (vs one program per tile bound)
    TMA: bool = False          # experimental: TMA tensor-descriptor loads, one program per tile (plain orientation)
    WS: bool = False           # experimental: warp-specialized K loop (needs TMA; Triton's Hopper auto-WS)
    ACC_K: int = 0             # >0: float32 partial sums every ACC_K of K inside a 128-K block (32, 64; 0 = off)
    UPCAST: bool = False       # FP16 dots on the exactly converted FP8 tiles (float32 accumulation throughout)
    GLUON: bool = False        # the Gluon kernel: async wgmma, block k-1 promoted while block k runs (SM90, CUDA)
    # tiles found through the routing plan's block map (one load, vLLM's scheduling) instead of a scan of every
    # expert's count; needs the map (grouped_gemm_fp8's block_map) and BLOCK_M dividing its alignment, else ignored
    BLOCK_MAP: bool = False
    # with BLOCK_MAP: weight tiles through a TMA descriptor (Hopper; vLLM's decode path) instead of pointer loads;
    # where TMA cannot describe the operands, the same tiles with pointer loads (same bytes)
    TMA_B: bool = False
    num_warps: int = 8
    num_stages: int = 4

    def __post_init__(self):
        self._check_pow2(("BLOCK_M", "BLOCK_N"), 16, 256)
        if self.GROUP_M < 1:
            raise ValueError(f"GemmConfig.GROUP_M must be >= 1, got {self.GROUP_M}")
        self._check_warps()
        if self.SPLIT_M and (self.SWAP_AB or self.BLOCK_M < 32):
            raise ValueError("GemmConfig.SPLIT_M needs SWAP_AB=0 and BLOCK_M >= 32 (two halves of >= 16 rows)")
        if self.ACC_K not in (0, 32, 64):
            raise ValueError(f"GemmConfig.ACC_K must be 0, 32 or 64, got {self.ACC_K}")
        if self.ACC_K and self.UPCAST:
            raise ValueError("GemmConfig.ACC_K applies to FP8 dots; UPCAST=1 runs FP16 dots (set one of them)")
        if self.num_stages < 1:
            raise ValueError(f"GemmConfig.num_stages must be >= 1, got {self.num_stages}")
        if self.WS and not (self.TMA or self.GLUON):
            raise ValueError("GemmConfig.WS needs TMA=1 or GLUON=1 (the warp-specialized loop is built on descriptor "
                             "loads)")
        if self.BLOCK_MAP and (self.PERSISTENT or self.TMA or self.GLUON or self.SPLIT_M):
            raise ValueError("GemmConfig.BLOCK_MAP is its own one-program-per-tile pointer kernel: unset PERSISTENT, "
                             "TMA, GLUON and SPLIT_M")
        if self.TMA_B and not self.BLOCK_MAP:
            raise ValueError("GemmConfig.TMA_B is an option of the BLOCK_MAP kernel: set BLOCK_MAP=1 (TMA=1 is the "
                             "descriptor kernel for both operands)")
        if self.TMA and (self.SWAP_AB or self.PERSISTENT or self.BLOCK_N > 128):
            raise ValueError("GemmConfig.TMA supports the plain orientation only: SWAP_AB=0, PERSISTENT=0, "
                             "BLOCK_N <= 128")
        if self.GLUON:
            others = [n for n in ("SWAP_AB", "SPLIT_M", "TMA", "ACC_K", "UPCAST") if getattr(self, n)]
            if others:
                raise ValueError(f"GemmConfig.GLUON is its own kernel (TMA loads, async wgmma): unset {others}")
            if self.PERSISTENT and not self.WS:
                raise ValueError("GemmConfig.GLUON: PERSISTENT=1 applies to the warp-specialized kernel (WS=1)")
            if self.num_stages < 2:
                raise ValueError("GemmConfig.GLUON needs num_stages >= 2")
            if self.WS and (self.BLOCK_M != 128 or self.BLOCK_N > 128 or self.num_warps != 4):
                raise ValueError("GemmConfig.GLUON with WS=1 needs BLOCK_M=128 (two consumer warpgroups of 64 rows), "
                                 "BLOCK_N <= 128 and num_warps=4 (the default partition is one consumer warpgroup)")
            if not self.WS and (self.BLOCK_M not in (64, 128) or self.num_warps not in (4, 8)):
                raise ValueError("GemmConfig.GLUON needs BLOCK_M 64 or 128 and num_warps 4 or 8")
            # the accumulator and two partial tiles live in registers: 3 * BLOCK_M * BLOCK_N / threads floats
            if not self.WS and 3 * self.BLOCK_M * self.BLOCK_N // (32 * self.num_warps) > 192:
                raise ValueError(f"GemmConfig.GLUON: a {self.BLOCK_M}x{self.BLOCK_N} tile with {self.num_warps} warps "
                                 f"needs more than 192 float32 registers per thread (accumulator + two partial tiles)")


# Weight-bandwidth-bound regime (rows per expert <= 64): swap-AB, the 128 weight rows of a tile are the MMA's M side
# (two 64-row wgmma per warpgroup), the 16-64 tokens its N side; deep pipelines keep enough weight bytes in flight.
# Shared memory per stage is 16 KiB of weight + BLOCK_M * 128 B of tokens, so these fit two CTAs per SM. Persistent:
# the tile bound from M (segments padded to 128 rows) is far above the real tile count here, so a one-program-per-
# tile grid would launch mostly empty programs. H100 (Triton 3.6): 2.6-2.8 TB/s of weights at E=256, ~2x BF16.
SMALL_M_CONFIGS = (
    GemmConfig(BLOCK_M=16, BLOCK_N=128, GROUP_M=1, SWAP_AB=True, PERSISTENT=True, num_warps=4, num_stages=6),
    GemmConfig(BLOCK_M=32, BLOCK_N=128, GROUP_M=1, SWAP_AB=True, PERSISTENT=True, num_warps=4, num_stages=5),
    GemmConfig(BLOCK_M=64, BLOCK_N=128, GROUP_M=1, SWAP_AB=True, PERSISTENT=True, num_warps=4, num_stages=4),
    GemmConfig(BLOCK_M=16, BLOCK_N=64, GROUP_M=1, SWAP_AB=True, PERSISTENT=True, num_warps=4, num_stages=8),
    # 9-16 rows per expert (e.g. T=128 at E=256, top-8) with a long K loop: nearly every expert is live and the tile
    # bound is tight, so one program per tile beats the persistent loop (H100, MoE T=128: 3.906 ms vs 3.964; T=16
    # 1.666 vs 1.671); with K <= 256 pick_config takes the persistent [0] instead (_flatten)
    GemmConfig(BLOCK_M=16, BLOCK_N=128, GROUP_M=1, SWAP_AB=True, PERSISTENT=False, num_warps=4, num_stages=6),
)
# Compute-bound regime: the per-128-K promotion (wait for the dot, then FMA) is the bottleneck (H100, Triton 3.6,
# 128x128 tiles: ~1200 TFLOP/s without promotion, ~680 with it). SPLIT_M=1 with BLOCK_M=256 runs two independent
# 128x128 dots per K block (~770 TFLOP/s on GEMM1). One program per tile (the bound is tight when rows are many).
LARGE_M_CONFIGS = (
    GemmConfig(BLOCK_M=256, BLOCK_N=128, GROUP_M=8, SPLIT_M=True, num_warps=8, num_stages=3),
    GemmConfig(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=4),
    GemmConfig(BLOCK_M=64, BLOCK_N=256, GROUP_M=8, num_warps=8, num_stages=4),
    GemmConfig(BLOCK_M=128, BLOCK_N=128, GROUP_M=16, SPLIT_M=True, num_warps=8, num_stages=4),
)


# Between the two regimes (more rows per expert than a 64-token swap tile holds, fewer than ~1024): 128x128 tiles
# with TMA descriptor loads and Triton's warp-specialized K loop (producer warps feed the copy engine while the
# consumer warpgroups run the dots and the promotion, DeepGEMM's structure). H100, whole MoE forward, E=256, top-8,
# I=2048 (docs/performance-log.md): T=2048 4.99 ms vs 5.28 with 64-token swap tiles; T=4096 6.77 vs 7.82; T=16384 19.7 vs
# 21.3 with the 256x128 split tiles; T=1024 (~49 rows peak) 4.66 vs 4.35: the swap tiles keep that one. Hopper only
# (TMA), and the operands must suit TMA (16-byte aligned rows); elsewhere MEDIUM_M_FALLBACK runs instead.
MEDIUM_M_CONFIGS = (
    GemmConfig(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, TMA=True, WS=True, num_warps=8, num_stages=4),
)
MEDIUM_M_FALLBACK = LARGE_M_CONFIGS[1]

# From 128 rows per expert on Hopper: the Gluon kernels (``fp8_deep/kernels/grouped_gemm_gluon.py``). They issue
# each 128-K block's wgmma asynchronously and promote the previous block on the CUDA cores meanwhile, which plain
# Triton cannot express (its dot must complete before the promotion reads it). Bitwise equal to the TMA kernel (same
# per-block wgmma chain, same K order). H100, E=256, TFLOP/s at 256 / 1024 / 2048 rows per expert
# (docs/performance-log.md, run 8055eb4, rep 200): GEMM1 (K=7168) WS 801 / 943 / 942, WS persistent 864 / 819 / 827, one-partition 5 stages
# 800 / 921 / 913, the 256x128 split Triton tiles 722 / 805 / 768; GEMM2 (K=2048) WS persistent 814 / 899 / 831,
# WS 697 / 815 / 787, one-partition 703 / 793 / 755, split 610 / 712 / 748. Run ce5d751: the warp-specialized kernel
# takes MN-major row scales through its TMA ring (+3.6-7.2%); the picks then reach GEMM1 1024 / 992 and GEMM2
# 1023 / 1005 TFLOP/s at 1024 / 2048 rows (DeepGEMM in the same run 1160-1227). CUDA on SM90 only; elsewhere the
# bucket's portable tiles run instead.
GLUON_CONFIGS = (
    # warp-specialized: a TMA producer warp and two consumer warpgroups synchronised by mbarriers only; one tile per
    # program (long K), or persistent (short K: the next tile's loads overlap the epilogue, which K=2048 exposes)
    GemmConfig(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, GLUON=True, WS=True, num_warps=4, num_stages=4),
    GemmConfig(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, GLUON=True, WS=True, PERSISTENT=True, num_warps=4,
               num_stages=4),
    # one partition, 8 warps (the consumers also issue the loads: CTA barriers keep the warpgroups in step)
    GemmConfig(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, GLUON=True, num_warps=8, num_stages=5),
    GemmConfig(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, GLUON=True, num_warps=8, num_stages=4),
    # deeper rings and wider m-groups for the persistent kernel (swept, not picked)
    GemmConfig(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, GLUON=True, WS=True, PERSISTENT=True, num_warps=4,
               num_stages=5),
    GemmConfig(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, GLUON=True, WS=True, PERSISTENT=True, num_warps=4,
               num_stages=6),
    GemmConfig(BLOCK_M=128, BLOCK_N=128, GROUP_M=16, GLUON=True, WS=True, PERSISTENT=True, num_warps=4,
               num_stages=4),
)

# Not picked by default, swept by bench/bench_grouped_gemm.py. H100, GEMM1 of DeepSeek-V3 (N=4096, K=7168) at
# 1024 / 2048 rows per expert: 128x128 WS 833 / 763 TFLOP/s, the 256x128 split default 806 / 813; TMA without WS and
# 256-row WS tiles are slower; a 64-row WS tile with 4 warps does not compile (Triton 3.6); one-warpgroup tiles for
# two programs per SM (64x128 / 128x64, 4 warps) measured 599-680 on GEMM2 (run 8055eb4) and were dropped.
EXPERIMENTAL_CONFIGS = (
    GemmConfig(BLOCK_M=256, BLOCK_N=128, GROUP_M=8, SPLIT_M=True, TMA=True, num_warps=8, num_stages=3),
    GemmConfig(BLOCK_M=256, BLOCK_N=128, GROUP_M=8, SPLIT_M=True, TMA=True, WS=True, num_warps=8, num_stages=3),
    GemmConfig(BLOCK_M=128, BLOCK_N=128, GROUP_M=16, TMA=True, WS=True, num_warps=8, num_stages=4),
    GemmConfig(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, TMA=True, WS=True, num_warps=8, num_stages=3),
)


def pick_config(expected_m: int, K: Optional[int] = None) -> GemmConfig:
    """The configuration for the rows of the most loaded experts (``FP8_DEEP_GEMM_CONFIG`` overrides).

    Up to 64 rows: swap-AB tiles as wide as that load (the weights stream once per expert; measured better than the
    128-row tiles, which pad every expert to 128 rows, up to ~49 rows), persistent except at 9-16 rows with a long
    K loop; 65-127: the 128x128 warp-specialized TMA tiles (``MEDIUM_M_CONFIGS``, measured at MoE T=2048); from
    128: the warp-specialized Gluon kernel, one tile per program when ``K`` (the reduction length, when given)
    exceeds 4096, persistent otherwise (``GLUON_CONFIGS``).
    Where Gluon cannot run, the bucket's portable tiles: the TMA WS tiles below 1024 rows, 256x128 tiles as two
    independent 128-row dots above (``LARGE_M_CONFIGS``)."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return GemmConfig.parse(env)
    if expected_m <= 8:
        return SMALL_M_CONFIGS[0]
    if expected_m <= 16:
        # one or two K blocks per tile (a tensor-parallel shard's GEMM2): the persistent, flattened loop (H100,
        # N=7168, K=256, 8 / 16 rows: 0.201 / 0.210 ms vs 0.438 / 0.437 one tile per program; equal at K=7168)
        return SMALL_M_CONFIGS[0] if K is not None and cdiv(K, BLOCK) <= 2 else SMALL_M_CONFIGS[4]
    if expected_m <= 32:
        return SMALL_M_CONFIGS[1]
    if expected_m <= 64:
        return SMALL_M_CONFIGS[2]
    if expected_m < 128:
        return MEDIUM_M_CONFIGS[0]
    return GLUON_CONFIGS[0] if K is not None and K > 4096 else GLUON_CONFIGS[1]


def _table_config(spec: str) -> GemmConfig:
    """A tuned table's entry as a config; one that changes the numerics (a table must only change speed) raises."""
    try:
        cfg = GemmConfig.parse(spec)
    except ValueError as exc:
        raise ValueError(f"a tuned grouped-GEMM table (fp8_deep/configs/grouped_gemm/) holds an invalid config "
                         f"{spec!r}: {exc}; regenerate it with bench/tune_grouped_gemm.py, or FP8_DEEP_TUNED=0") from None
    if cfg.ACC_K or cfg.UPCAST:
        raise ValueError(f"a tuned grouped-GEMM table entry {spec!r} sets ACC_K/UPCAST, which change the numerics; "
                         f"tables choose among configs with the same output (regenerate it, or FP8_DEEP_TUNED=0)")
    return cfg


def _tma_problem(a: torch.Tensor, b: torch.Tensor, N: int, what: str = "TMA=1") -> Optional[str]:
    """Why the TMA kernel cannot take these operands here (None when it can): it needs Hopper or newer (or the
    interpreter), 16-byte aligned bases and row strides, and the experts of ``b`` stacked without gaps."""
    if a.is_cuda and torch.cuda.get_device_capability(a.device) < (9, 0):
        return f"config {what} needs an SM90 (Hopper) or newer GPU; use a pointer-load config"
    if b.stride(0) != N * b.stride(1):
        return (f"config {what} needs b's experts stacked without gaps (b.stride(0) == N * b.stride(1)); "
                "pass b.contiguous() or a pointer-load config")
    for t, name in ((a, "a"), (b, "b")):
        if t.data_ptr() % 16 or t.stride(-2) % 16:
            return (f"config {what} needs {name} 16-byte aligned with a row stride that is a multiple of 16 bytes "
                    f"(got stride {t.stride(-2)}); use a pointer-load config")
    return None


def _gluon_problem(a: torch.Tensor, b: torch.Tensor, N: int) -> Optional[str]:
    """Why the Gluon kernel cannot run here (None when it can): Gluon in this Triton, a CUDA SM90 GPU (wgmma; not
    the interpreter, which cannot run Gluon), and operands TMA can describe."""
    if not _gluon.GLUON_AVAILABLE:
        return "config GLUON=1 needs triton.experimental.gluon (Triton >= 3.6); use a Triton config"
    if interpreter_active() or not a.is_cuda:
        return "config GLUON=1 runs on CUDA GPUs only (the Triton interpreter cannot run Gluon); use a Triton config"
    if torch.cuda.get_device_capability(a.device)[0] != 9:
        return "config GLUON=1 needs an SM90 (Hopper) GPU: its kernel is built on wgmma; use a Triton config"
    return _tma_problem(a, b, N, what="GLUON=1")


def peak_rows_per_expert(num_rows: int, num_experts: int) -> int:
    """Rows of the most loaded experts for ``num_rows`` routed rows spread at random over ``num_experts``: the mean
    plus three standard deviations of a Poisson load (a host-side estimate; no device values are read)."""
    mean = num_rows / max(1, num_experts)
    return max(1, math.ceil(mean + 3.0 * math.sqrt(mean)))


def _flatten(cfg: GemmConfig, K: int) -> bool:
    """Flatten a persistent kernel's tile loop with its K loop, so the pipeliner prefetches the next tile's blocks
    while the current one finishes: worth it when a tile is only one or two 128-K blocks (a tensor-parallel shard's
    GEMM2, K = 256: H100 0.240 -> 0.197 ms at 4 rows per expert, 0.270 -> 0.228 at 32), a loss with long K loops
    (K = 2048 / 7168: 1-6% slower) and for 64-row tiles (the flattened loop spills: 1.5-1.9x slower)."""
    return cfg.PERSISTENT and cfg.SWAP_AB and not cfg.SPLIT_M and cfg.BLOCK_M <= 32 and cdiv(K, BLOCK) <= 2


def _num_programs_cap(device: torch.device) -> int:
    """Persistent grid size: 4 programs per SM (those that do not fit wait, then run late or find no tile)."""
    return 4 * sm_count(device)


def _validate(a, a_scale, b, b_scale, expert_offsets, expert_counts, out_dtype, names=("a", "a_scale"), device=None):
    """The grouped GEMM's operands (``names``: what the caller calls ``a`` and ``a_scale``; ``device``: where they
    must be, default ``a``'s) -> ``(M, N, K, E)``."""
    an, sn = names
    check_tensor(a, an, dtypes=(FP8_DTYPE,), dims=(2,), device=device, last_stride_one=True)
    dev = a.device
    M, K = a.shape
    kb = cdiv(K, BLOCK)
    check_tensor(b, "b", dtypes=(FP8_DTYPE,), dims=(3,), device=dev, last_stride_one=True)
    E, N, Kb = b.shape
    if Kb != K:
        raise ValueError(f"b must be (E, N, K) with K = {an}.shape[1] = {K} (out = {an} @ b[e].T), got shape "
                         f"{tuple(b.shape)}")
    check_tensor(a_scale, sn, dtypes=(torch.float32,), dims=(2,), device=dev)
    if tuple(a_scale.shape) != (M, kb):
        raise ValueError(f"{sn} must be (M, ceil(K/128)) = {(M, kb)} (1x128 groups of {an}), got "
                         f"{tuple(a_scale.shape)}")
    check_tensor(b_scale, "b_scale", dtypes=(torch.float32,), dims=(3,), device=dev)
    if tuple(b_scale.shape) != (E, cdiv(N, BLOCK), kb):
        raise ValueError(f"b_scale must be (E, ceil(N/128), ceil(K/128)) = {(E, cdiv(N, BLOCK), kb)} (128x128 blocks "
                         f"of b), got {tuple(b_scale.shape)}")
    for t, name in ((expert_offsets, "expert_offsets"), (expert_counts, "expert_counts")):
        check_tensor(t, name, dtypes=(torch.int32,), dims=(1,), device=dev)
        if t.shape[0] != E:
            raise ValueError(f"{name} must have one entry per expert, shape ({E},), got {tuple(t.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {[str(d) for d in OUT_DTYPES]}, got {out_dtype}")
    return M, N, K, E


def _grouped_gemm_torch(a, a_scale, b, b_scale, expert_offsets, expert_counts, out):
    """CPU path without Triton: the kernel's math (per-128-K promotion in float32), experts looped on the host."""
    M, K = a.shape
    N = b.shape[1]
    for e, (off, cnt) in enumerate(zip(expert_offsets.tolist(), expert_counts.tolist())):
        lo, hi = max(off, 0), min(off + cnt, M)
        if hi <= lo:
            continue
        acc = torch.zeros(hi - lo, N, dtype=torch.float32, device=a.device)
        for kb in range(cdiv(K, BLOCK)):
            ks = slice(kb * BLOCK, min((kb + 1) * BLOCK, K))
            part = a[lo:hi, ks].float() @ b[e, :, ks].float().t()
            sb = b_scale[e, :, kb].repeat_interleave(BLOCK)[:N]
            acc += part * a_scale[lo:hi, kb, None] * sb[None, :]
        out[lo:hi] = acc.to(out.dtype)
    return out


@on_input_device
def grouped_gemm_fp8(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                     expert_offsets: torch.Tensor, expert_counts: torch.Tensor, *, out: Optional[torch.Tensor] = None,
                     out_dtype: torch.dtype = torch.bfloat16, config=None,
                     expected_m: Optional[int] = None, block_map=None) -> torch.Tensor:
    """FP8 block-scaled grouped GEMM over contiguous expert segments: ``out[r] = deq(a[r]) @ deq(b[e]).T``.

    Args:
        a: float8_e4m3fn ``(M, K)``, unit stride along K (any row stride).
        a_scale: float32 ``(M, ceil(K/128))`` dequantization scales of 1x128 groups, any strides: row-major
            ``(G, 1)`` or DeepGEMM's MN-major TMA-aligned ``(1, align(M, 4))`` (preferred: coalesced reads).
        b: float8_e4m3fn ``(E, N, K)``, unit stride along K ("NT": each expert's weight as ``nn.Linear`` stores it).
        b_scale: float32 ``(E, ceil(N/128), ceil(K/128))`` dequantization scales of 128x128 blocks, any strides.
        expert_offsets: int32 ``(E,)``, first row of expert ``e``'s segment in ``a`` / ``out``.
        expert_counts: int32 ``(E,)``, valid rows of expert ``e``; segments must be disjoint and inside ``[0, M)``.
        out: optional caller buffer ``(M, N)`` of ``out_dtype`` (any strides), written in place.
        out_dtype: bfloat16 (default), float16 or float32.
        config: ``GemmConfig`` / dict / ``"KEY=VALUE,..."`` string pinning the tiles (default: ``pick_config``).
        expected_m: host-side hint of the rows of the most loaded experts, picks the tile bucket (default
            ``M // E``, exact for balanced segments; the MoE passes ``peak_rows_per_expert(tokens * top_k, E)``).
        block_map: optional ``(block_expert, m_indices, block_size)`` of the routing plan that laid ``a`` out
            (``plan.expert_ids``, ``plan.m_indices``, ``plan.block_size``): int32 ``(M // block_size,)`` expert of each
            ``block_size``-row block (-1 unused), int32 ``(M,)`` expert of each row (-1 padding), and the segments'
            alignment. It must describe the same segments as ``expert_offsets`` / ``expert_counts``; configurations
            with ``BLOCK_MAP=1`` then find their tiles through it (same bytes), others ignore it.

    Returns:
        ``out`` ``(M, N)``: rows ``[off_e, off_e + count_e)`` of every expert written; every other row is left as it
        was (unspecified in a fresh buffer). N and K need not be multiples of 128. No host synchronisation on CUDA.
    """
    M, N, K, E = _validate(a, a_scale, b, b_scale, expert_offsets, expert_counts, out_dtype)
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    else:
        check_out(out, "out", (M, N), out_dtype, a.device)
        check_outputs_disjoint([("a", a), ("a_scale", a_scale), ("b", b), ("b_scale", b_scale)], [("out", out)])
    if M == 0 or N == 0 or E == 0:
        return out
    if not use_triton(a):
        return _grouped_gemm_torch(a, a_scale, b, b_scale, expert_offsets, expert_counts, out)

    cfg = resolve_config(config, a, b, expected_m)
    bm, bn = cfg.BLOCK_M, cfg.BLOCK_N
    if cfg.BLOCK_MAP:
        if block_map is not None and _check_block_map(block_map, M, E, a.device) % bm == 0:
            _launch_block_map(cfg, a, a_scale, b, b_scale, out, block_map, M, N, K, E)
            return out
        # no map, or tiles taller than its blocks: the same tiles through the segment kernel (pointer weight loads:
        # TMA_B is an option of the block-map kernel only), the same bytes
        cfg = dataclasses.replace(cfg, BLOCK_MAP=False, TMA_B=False)
    # Upper bound of sum_e cdiv(count_e, BM) for disjoint segments inside [0, M): at most min(E, M) experts are
    # non-empty and each wastes at most BM - 1 rows of its last tile.
    m_tiles_bound = (M + min(E, M) * (bm - 1)) // bm
    tiles_bound = m_tiles_bound * cdiv(N, bn)
    if cfg.TMA:
        _launch_tma(cfg, a, a_scale, b, b_scale, out, expert_offsets, expert_counts, M, N, K, E, tiles_bound)
        return out
    if cfg.GLUON:
        _launch_gluon(cfg, a, a_scale, b, b_scale, out, expert_offsets, expert_counts, M, N, K, E, tiles_bound)
        return out
    grid = (max(1, min(tiles_bound, _num_programs_cap(a.device)) if cfg.PERSISTENT else tiles_bound),)
    _grouped_gemm_fp8_kernel[grid](
        a, a_scale, b, b_scale, out, expert_offsets, expert_counts,
        M, N, K, E,
        a.stride(0),
        a_scale.stride(0), a_scale.stride(1),
        b.stride(0), b.stride(1),
        b_scale.stride(0), b_scale.stride(1), b_scale.stride(2),
        out.stride(0), out.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK, GROUP_M=cfg.GROUP_M, SWAP_AB=cfg.SWAP_AB,
        BLOCK_E=triton.next_power_of_2(E), EVEN_K=(K % BLOCK == 0), SPLIT_M=cfg.SPLIT_M,
        ACC_K=cfg.ACC_K, UPCAST=cfg.UPCAST,
        FLATTEN=_flatten(cfg, K),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **FP_FUSION, **pdl(a),
    )
    return out


def resolve_config(config, a: torch.Tensor, b: torch.Tensor, expected_m: Optional[int] = None) -> GemmConfig:
    """The configuration ``grouped_gemm_fp8`` runs for these operands: ``config`` or ``FP8_DEEP_GEMM_CONFIG`` when
    given, else the card's tuned table (``bench/tune_grouped_gemm.py``) where it has this (E, N, K), else
    ``pick_config``; a picked TMA / Gluon config that cannot run here becomes the same bucket's portable tiles."""
    pinned = config if config is not None else os.environ.get(CONFIG_ENV)
    if pinned:
        return _check_mma_height(GemmConfig.parse(pinned), a)
    (M, K), (E, N, _) = a.shape, b.shape
    rows = expected_m if expected_m is not None else max(1, M // max(1, E))
    tuned = tuned_config("grouped_gemm", a.device, E=E, N=N, K=K, rows=rows)
    cfg = _table_config(tuned) if tuned else pick_config(rows, K)
    if cfg.GLUON and _gluon_problem(a, b, N):
        cfg = MEDIUM_M_CONFIGS[0] if rows < 1024 else LARGE_M_CONFIGS[0]
    if cfg.TMA and _tma_problem(a, b, N):
        cfg = MEDIUM_M_FALLBACK
    return _check_mma_height(cfg, a)


def mma_sync_refusal(cfg: GemmConfig, a: torch.Tensor) -> Optional[str]:
    """Why ``cfg`` cannot run on ``a``'s device, or None: a plain-orientation tile under 64 rows per dot
    (``BLOCK_M``, or half of it with ``SPLIT_M``) on a Hopper-class GPU. Triton compiles those dots to mma.sync on
    FP16-upcast operands instead of wgmma, whose accumulation rounds differently, so their output bytes differ from
    every other tile's (H100, 2026-12-07: 12638 elements of a 1536 x 2048 GEMM, tests/test_grouped_gemm.py). A
    token's output must not depend on which tile its batch size picks: small tiles swap A and B (``SWAP_AB=1``)."""
    dot_rows = cfg.BLOCK_M // 2 if cfg.SPLIT_M else cfg.BLOCK_M
    if not a.is_cuda or interpreter_active() or torch.cuda.get_device_capability(a.device)[0] < 9:
        return None
    if cfg.num_warps < 4:
        return (f"grouped GEMM config {cfg}: {cfg.num_warps} warps are less than one warpgroup, so the dots run "
                f"mma.sync on this GPU and give other bytes than the wgmma tiles; use num_warps=4 or 8")
    if cfg.SWAP_AB or dot_rows >= 64:
        return None
    return (f"grouped GEMM config {cfg}: a plain-orientation tile of {dot_rows} rows per dot runs mma.sync on this "
            f"GPU and gives other bytes than the wgmma tiles; use SWAP_AB=1 for tiles under 64 rows (e.g. "
            f"BLOCK_M={cfg.BLOCK_M},BLOCK_N={cfg.BLOCK_N},SWAP_AB=1) or BLOCK_M >= 64")


def _check_mma_height(cfg: GemmConfig, a: torch.Tensor) -> GemmConfig:
    why = mma_sync_refusal(cfg, a)
    if why:
        raise ValueError(why)
    return cfg


def _check_block_map(block_map, M: int, E: int, device) -> int:
    """Validate ``grouped_gemm_fp8``'s ``block_map`` (its docstring); returns its block size."""
    if not (isinstance(block_map, (tuple, list)) and len(block_map) == 3):
        raise TypeError("block_map must be (block_expert, m_indices, block_size), e.g. (plan.expert_ids, "
                        "plan.m_indices, plan.block_size)")
    block_expert, m_indices, block_size = block_map
    if type(block_size) is not int or not is_pow2(block_size) or block_size < 16:
        raise ValueError(f"block_map's block_size must be a power of two >= 16, got {block_size!r}")
    if M % block_size:
        raise ValueError(f"a has {M} rows, not a multiple of block_map's block_size {block_size}: the plan that laid "
                         f"a out had another alignment")
    check_tensor(block_expert, "block_map[0] (block_expert)", dtypes=(torch.int32,), dims=(1,), device=device)
    check_tensor(m_indices, "block_map[1] (m_indices)", dtypes=(torch.int32,), dims=(1,), device=device)
    if block_expert.shape[0] != M // block_size or block_expert.stride(0) != 1:
        raise ValueError(f"block_map[0] must be contiguous ({M // block_size},): one expert per {block_size}-row block "
                         f"of a, got shape {tuple(block_expert.shape)}")
    if m_indices.shape[0] != M or m_indices.stride(0) != 1:
        raise ValueError(f"block_map[1] must be contiguous ({M},): one expert per row of a, got shape "
                         f"{tuple(m_indices.shape)}")
    return block_size


def _launch_block_map(cfg, a, a_scale, b, b_scale, out, block_map, M, N, K, E, gather=None):
    """``M``: rows of ``out`` (the plan's); ``gather``: ``(sorted_token_ids, numel, top_k)`` when ``a`` holds the
    tokens rather than their permuted copy."""
    block_expert, m_indices, block_size = block_map
    grid = ((M // cfg.BLOCK_M) * cdiv(N, cfg.BLOCK_N),)
    if grid[0] == 0:
        return
    tma_b = cfg.TMA_B and _tma_problem(a, b, N, what="TMA_B=1") is None
    if tma_b:
        from triton.tools.tensor_descriptor import TensorDescriptor
        b_arg = TensorDescriptor(b, [E * N, K], [b.stride(1), 1], [cfg.BLOCK_N, BLOCK])
    else:
        b_arg = b
    sorted_ids, numel, top_k = gather if gather is not None else (m_indices, M, 1)
    _grouped_gemm_fp8_blockmap_kernel[grid](
        a, a_scale, b_arg, b_scale, out, block_expert, m_indices, sorted_ids, M, N, K, E, numel, top_k,
        a.stride(0), a_scale.stride(0), a_scale.stride(1), b.stride(0), b.stride(1),
        b_scale.stride(0), b_scale.stride(1), b_scale.stride(2), out.stride(0), out.stride(1),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=BLOCK, GROUP_M=cfg.GROUP_M, SWAP_AB=cfg.SWAP_AB,
        EVEN_K=(K % BLOCK == 0), ACC_K=cfg.ACC_K, UPCAST=cfg.UPCAST, MAP_BLOCK=block_size, TMA_B=tma_b,
        GATHER=gather is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **FP_FUSION, **pdl(a),
    )


GATHER_CONFIG_ENV = "FP8_DEEP_GATHER_CONFIG"


def gather_config(E: int, N: int, K: int, choices: int, device) -> GemmConfig:
    """The tile of ``grouped_gemm_fp8_gather`` for ``choices = T * top_k`` routed rows over ``E`` experts of
    ``(N, K)`` weights: ``FP8_DEEP_GATHER_CONFIG`` when set; else this card's measured table
    (``fp8_deep/configs/gather/<card>.json``, written by ``bench/tune_decode.py``; nearest in choices); else vLLM's
    block-FP8 default shape for the load: 64-row plain tiles from 48 rows per expert, swap-AB tiles of 32 or 16
    token rows below (a plain tile under 64 rows would run mma.sync on Hopper, ``mma_sync_refusal``), 128 weight
    rows, weight tiles through TMA where it can describe them. Always a ``BLOCK_MAP`` tile: the plan's block map is
    how a gathered row finds its expert."""
    env = os.environ.get(GATHER_CONFIG_ENV)
    if env:
        return _gather_checked(GemmConfig.parse(env), GATHER_CONFIG_ENV)
    spec = tuned_config("gather", torch.device(device), E=E, N=N, K=K, rows=max(1, choices))
    if spec is not None:
        return _gather_checked(_table_config(spec), "a tuned gather table (fp8_deep/configs/gather/)")
    rows = peak_rows_per_expert(choices, E)
    if rows >= 48:
        return GemmConfig(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, BLOCK_MAP=True, TMA_B=True, num_warps=4, num_stages=3)
    return GemmConfig(BLOCK_M=32 if rows > 16 else 16, BLOCK_N=128, GROUP_M=1, SWAP_AB=True, BLOCK_MAP=True,
                      TMA_B=True, num_warps=4, num_stages=3)


def gather_gemm2_config(E: int, N: int, K: int, choices: int, device) -> Optional[GemmConfig]:
    """GEMM2's tile on the gather path's plan (aligned to the gathered GEMM1's tile), where this card's gather
    table holds one for GEMM2's ``(N, K) = (H, I)`` (``bench/tune_decode.py`` races vLLM's block-map tiles there
    against the grouped GEMM's own pick); None otherwise, and under a pinned ``FP8_DEEP_GEMM_CONFIG``: then the
    backend's own pick runs, as in the regular chain."""
    if os.environ.get(CONFIG_ENV):
        return None
    spec = tuned_config("gather", torch.device(device), E=E, N=N, K=K, rows=max(1, choices))
    return _table_config(spec) if spec is not None else None


def _gather_checked(cfg: GemmConfig, where: str) -> GemmConfig:
    if not cfg.BLOCK_MAP:
        raise ValueError(f"{where}: {cfg} is not a block-map tile; the gathered GEMM runs BLOCK_MAP=1 tiles only "
                         f"(e.g. BLOCK_M=64,BLOCK_N=128,BLOCK_MAP=1,TMA_B=1)")
    return cfg


@on_input_device
def grouped_gemm_fp8_gather(x_q: torch.Tensor, x_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                            plan, *, out: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
                            config=None) -> torch.Tensor:
    """``grouped_gemm_fp8(permute_rows(x_q, x_scale, plan), b)`` without the permuted copy: each row of the routing
    plan reads its token's row of ``x_q`` (vLLM's fused-MoE kernel reads its A this way). The same bytes as the
    permute + grouped GEMM chain for the plan's real rows.

    Args:
        x_q: float8_e4m3fn ``(T, K)`` quantized tokens (``quantize_activation``), unit stride along K.
        x_scale: float32 ``(T, ceil(K/128))`` their 1x128 dequantization scales, any strides (row-major preferred:
            a row's scales are read together).
        b, b_scale: float8_e4m3fn ``(E, N, K)`` (unit stride along K) and float32 ``(E, ceil(N/128), ceil(K/128))``.
        plan: the call's ``RoutingPlan`` (``align_routing``); its ``block_size`` must be a multiple of a given
            ``config``'s ``BLOCK_M`` (the default tile is cut to the plan's blocks; the forward aligns the plan to
            the tile ``gather_config`` picks).
        out: optional ``(plan.num_rows, N)`` of ``out_dtype`` (bf16 / fp16 / fp32), any strides.
        config: a ``BLOCK_MAP=1`` ``GemmConfig`` / string (default ``gather_config``).

    Returns:
        ``out`` ``(plan.num_rows, N)`` in the plan's rows: the real rows written, padding rows and unused blocks
        left as they were. No host synchronisation."""
    check_plan(plan)
    dev = plan.sorted_token_ids.device
    if isinstance(b, torch.Tensor) and b.dim() == 3 and b.shape[0] != plan.num_experts:
        raise ValueError(f"b has {b.shape[0]} experts, the plan {plan.num_experts}")
    T, N, K, E = _validate(x_q, x_scale, b, b_scale, plan.expert_offsets, plan.expert_counts, out_dtype,
                           names=("x_q", "x_scale"), device=dev)
    if T != plan.num_tokens:
        raise ValueError(f"x_q has {T} rows but the plan was built for {plan.num_tokens} tokens")
    M = plan.num_rows
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype, device=dev)
    else:
        check_out(out, "out", (M, N), out_dtype, dev)
        check_outputs_disjoint([("x_q", x_q), ("x_scale", x_scale), ("b", b), ("b_scale", b_scale)], [("out", out)])
    if config is not None:
        cfg = _gather_checked(GemmConfig.parse(config) if not isinstance(config, GemmConfig) else config, "config")
    else:
        cfg = gather_config(E, N, K, plan.num_tokens * plan.top_k, dev)
    if plan.block_size % cfg.BLOCK_M and config is None:
        # the default tile, cut to the plan's blocks (swap-AB under 64 rows: mma_sync_refusal); the same bytes
        cfg = dataclasses.replace(cfg, BLOCK_M=plan.block_size, SWAP_AB=cfg.SWAP_AB or plan.block_size < 64,
                                  GROUP_M=1 if plan.block_size < 64 else cfg.GROUP_M)
    if plan.block_size % cfg.BLOCK_M:
        raise ValueError(f"the gathered GEMM's tile {cfg} is taller than the plan's {plan.block_size}-row blocks: "
                         f"build the plan with align_routing(..., block_size={max(cfg.BLOCK_M, plan.block_size)}) "
                         f"or pick BLOCK_M <= {plan.block_size}")
    _check_mma_height(cfg, x_q)
    if M == 0 or N == 0 or E == 0:
        return out
    if not use_triton(x_q):
        a, sa = reference.permute_rows(x_q, x_scale, plan.sorted_token_ids, plan.top_k)
        real = plan.m_indices >= 0
        out[real] = reference.grouped_gemm_fp8(a, sa, b, b_scale, plan.m_indices, out_dtype=out_dtype)[real]
        return out
    _launch_block_map(cfg, x_q, x_scale, b, b_scale, out, (plan.expert_ids, plan.m_indices, plan.block_size), M, N,
                      K, E, gather=(plan.sorted_token_ids, plan.num_tokens * plan.top_k, max(1, plan.top_k)))
    return out


FUSED_SWIGLU_ENV = "FP8_DEEP_FUSED_SWIGLU"
SWIGLU_CONFIG_ENV = "FP8_DEEP_SWIGLU_GEMM_CONFIG"
# the fused kernel's tile when FP8_DEEP_FUSED_SWIGLU=1 forces it where the GEMM's own pick is not a block-map tile
FUSED_SWIGLU_DEFAULT = GemmConfig(BLOCK_M=16, BLOCK_N=128, GROUP_M=1, SWAP_AB=True, BLOCK_MAP=True, TMA_B=True,
                                  num_warps=4, num_stages=3)
# a stage holds two 16 KiB weight tiles (gate and up) plus the tokens: three stages leave room for two programs per SM
FUSED_SWIGLU_MAX_STAGES = 3


def _fused_swiglu_mode() -> Optional[str]:
    """``FP8_DEEP_FUSED_SWIGLU``: ``"1"``, ``"auto"``, or None (unset / ``0``: the two launches)."""
    env = os.environ.get(FUSED_SWIGLU_ENV)
    if env not in (None, "", "0", "1", "auto"):
        raise ValueError(f"{FUSED_SWIGLU_ENV}={env!r}: expected 0, 1 or auto (unset: off)")
    return env if env in ("1", "auto") else None


def _fused_swiglu_config(config, a, b, I: int, expected_m, block_size: int) -> Optional[GemmConfig]:
    """The block-map tile the fused GEMM1 + SwiGLU kernel runs, or None where the two launches run instead.

    Opt-in: ``FP8_DEEP_FUSED_SWIGLU=1`` fuses where the GEMM's own configuration (``resolve_config``: pinned, tuned or
    picked) is a block-map tile, and elsewhere runs ``FUSED_SWIGLU_DEFAULT``; ``auto`` fuses only where the GEMM's
    configuration is a block-map tile; unset or ``0`` never fuses. Not the default because it does not pay: on an
    H100 (2026-12-07 at ``bec78b1``, docs/performance.md) the forward with it was at most 0.5% faster and 18% slower
    on the DeepSeek-V3 TP8 shard at T=1 (its tiles span one 128-group of I, so a small I gives few programs). Its
    bytes equalled the two launches' there on small shapes and three of four decode shapes, not on Qwen3-30B-A3B at
    T=16 (tests/test_gemm_swiglu.py, xfail; cause not yet captured).
    ``FP8_DEEP_SWIGLU_GEMM_CONFIG`` pins the fused kernel's tile. The tile's columns are always one 128-group of gate
    and one of up (``BLOCK_N`` is ignored); it needs I a multiple of 128.

    Swap-AB tiles only (the token rows on the MMA's N side: wgmma on sm_90), the orientation decode picks: on an
    H100 (2026-12-07, Triton 3.6) they gave the two launches' bytes, while plain-orientation 16-row tiles (mma.sync
    on FP16-upcast operands) differed from them in 0.4% of q bytes by one FP8 step. A plain-orientation pick takes
    the two launches (``auto``) or ``FUSED_SWIGLU_DEFAULT`` (``1``); a pinned one is refused."""
    env = _fused_swiglu_mode()
    if env is None or I % BLOCK:
        return None
    pinned = os.environ.get(SWIGLU_CONFIG_ENV)
    cfg = GemmConfig.parse(pinned) if pinned else resolve_config(config, a, b, expected_m)
    if pinned and not (cfg.BLOCK_MAP and cfg.SWAP_AB):
        raise ValueError(f"{SWIGLU_CONFIG_ENV}={pinned!r}: the fused GEMM1 + SwiGLU kernel runs swap-AB block-map tiles "
                         f"only (BLOCK_MAP=1,SWAP_AB=1; e.g. {FUSED_SWIGLU_DEFAULT})")
    if not (cfg.BLOCK_MAP and cfg.SWAP_AB):
        if env != "1":
            return None
        cfg = FUSED_SWIGLU_DEFAULT
    if block_size % cfg.BLOCK_M:
        return None
    stages = cfg.num_stages if pinned else min(cfg.num_stages, FUSED_SWIGLU_MAX_STAGES)
    return dataclasses.replace(cfg, BLOCK_N=BLOCK, num_stages=stages)


@on_input_device
def grouped_gemm_swiglu_fp8(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                            expert_offsets: torch.Tensor, expert_counts: torch.Tensor, block_map, *,
                            scale_fmt: str = "fp32", scale_layout: str = "tma_aligned", eps: float = ACT_EPS,
                            config=None, expected_m: Optional[int] = None, out=None):
    """The MoE's first GEMM, SwiGLU and the 1 x 128 requantization that feeds the second GEMM:
    ``silu_mul_quantize(grouped_gemm_fp8(a, a_scale, b, b_scale, ...), m_indices=block_map[1], ...)``, bit for bit,
    in one launch where it can (``_fused_swiglu_config``), else those two launches.

    Args:
        a, a_scale, b, b_scale, expert_offsets, expert_counts, config, expected_m: as ``grouped_gemm_fp8``, with
            ``b`` the ``(E, 2I, K)`` ``[gate | up]`` weights.
        block_map: ``(block_expert, m_indices, block_size)`` of the routing plan (required: padding rows are the
            rows with ``m_indices < 0``).
        scale_fmt, scale_layout, eps: as ``silu_mul_quantize``.
        out: optional caller-owned ``(q, scale)`` in the layouts below.

    Returns:
        ``(q, scale)``: float8_e4m3fn ``(M, I)`` contiguous and float32 ``(M, ceil(I/128))`` dequantization scales in
        ``scale_layout``; rows with ``m_indices < 0`` get ``q = 0`` and scale 0.
    """
    if _fused_swiglu_mode() is None:  # the default: the two launches, each validating its own arguments
        _check_block_map(block_map, a.shape[0], b.shape[0], a.device)
        return _two_launches(a, a_scale, b, b_scale, expert_offsets, expert_counts, block_map, scale_fmt,
                             scale_layout, eps, config, expected_m, out)
    M, N, K, E = _validate(a, a_scale, b, b_scale, expert_offsets, expert_counts, torch.bfloat16)
    check_choice(scale_fmt, "scale_fmt", SCALE_FMTS)
    check_choice(scale_layout, "scale_layout", SCALE_LAYOUTS)
    check_eps(eps)
    if N % 2:
        raise ValueError(f"b must be (E, 2I, K) = [gate | up] rows; its N = {N} is odd")
    I = N // 2
    block_size = _check_block_map(block_map, M, E, a.device)
    G = cdiv(I, BLOCK)
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ValueError("out must be a tuple (q, scale)")
        q, s = out
        check_out(q, "out[0]", (M, I), FP8_DTYPE, a.device, strides=(I, 1))
        check_out(s, "out[1]", (M, G), torch.float32, a.device, strides=scale_strides((M, G), scale_layout))
        check_outputs_disjoint([("a", a), ("a_scale", a_scale), ("b", b), ("b_scale", b_scale)],
                               [("out[0]", q), ("out[1]", s)])
    cfg = _fused_swiglu_config(config, a, b, I, expected_m, block_size) if use_triton(a) and M and I and E else None
    if cfg is None:
        return _two_launches(a, a_scale, b, b_scale, expert_offsets, expert_counts, block_map, scale_fmt,
                             scale_layout, eps, config, expected_m, out)
    if out is None:
        q = torch.empty((M, I), dtype=FP8_DTYPE, device=a.device)
        s = alloc_scales((M, G), scale_layout, a.device)
    block_expert, m_indices, _ = block_map
    tma_b = cfg.TMA_B and _tma_problem(a, b, N, what="TMA_B=1") is None
    if tma_b:
        from triton.tools.tensor_descriptor import TensorDescriptor
        b_arg = TensorDescriptor(b, [E * N, K], [b.stride(1), 1], [BLOCK, BLOCK])
    else:
        b_arg = b
    _grouped_gemm_swiglu_kernel[((M // cfg.BLOCK_M) * G,)](
        a, a_scale, b_arg, b_scale, q, s, block_expert, m_indices, M, I, K, E,
        a.stride(0), a_scale.stride(0), a_scale.stride(1), b.stride(0), b.stride(1),
        b_scale.stride(0), b_scale.stride(1), b_scale.stride(2), q.stride(0), q.stride(1), s.stride(0), s.stride(1),
        EPS=eps, FP8_MAX=FP8_MAX, UE8M0=scale_fmt == "ue8m0", ACCURATE_EXP=a.is_cuda and not interpreter_active(),
        **gpu_fast_paths(a),
        BLOCK_M=cfg.BLOCK_M, BLOCK_K=BLOCK, GROUP_M=cfg.GROUP_M, EVEN_K=(K % BLOCK == 0),
        ACC_K=cfg.ACC_K, UPCAST=cfg.UPCAST, MAP_BLOCK=block_size, TMA_B=tma_b,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **FP_FUSION, **pdl(a),
    )
    return q, s


def _two_launches(a, a_scale, b, b_scale, expert_offsets, expert_counts, block_map, scale_fmt, scale_layout, eps,
                  config, expected_m, out):
    """``grouped_gemm_swiglu_fp8`` as the two launches it fuses: GEMM1 (bf16 h), then ``silu_mul_quantize``."""
    h = grouped_gemm_fp8(a, a_scale, b, b_scale, expert_offsets, expert_counts, config=config,
                         expected_m=expected_m, block_map=block_map)
    return silu_mul_quantize(h, m_indices=block_map[1], scale_fmt=scale_fmt, scale_layout=scale_layout, eps=eps,
                             out=out)


def _descriptor_kernel_args(a_desc, a_scale, b_desc, b_scale, out, expert_offsets, expert_counts, M, N, K, E):
    """The positional arguments the descriptor-based kernels (Triton TMA, Gluon) share, in their order."""
    return (a_desc, a_scale, b_desc, b_scale, out, expert_offsets, expert_counts, M, N, K, E,
            a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1), b_scale.stride(2),
            out.stride(0), out.stride(1))


def _launch_tma(cfg, a, a_scale, b, b_scale, out, expert_offsets, expert_counts, M, N, K, E, tiles_bound):
    """The TMA-descriptor kernel: host-side descriptors over ``a (M, K)`` and ``b`` viewed as ``(E * N, K)``."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    problem = _tma_problem(a, b, N)
    if problem:
        raise ValueError(problem)
    half = cfg.BLOCK_M // 2 if cfg.SPLIT_M else cfg.BLOCK_M
    a_desc = TensorDescriptor(a, [M, K], [a.stride(0), 1], [half, BLOCK])
    b_desc = TensorDescriptor(b, [E * N, K], [b.stride(1), 1], [cfg.BLOCK_N, BLOCK])
    _grouped_gemm_fp8_tma_kernel[(max(1, tiles_bound),)](
        *_descriptor_kernel_args(a_desc, a_scale, b_desc, b_scale, out, expert_offsets, expert_counts, M, N, K, E),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=BLOCK, GROUP_M=cfg.GROUP_M,
        BLOCK_E=triton.next_power_of_2(E), SPLIT_M=cfg.SPLIT_M, WS=cfg.WS, NUM_STAGES=cfg.num_stages,
        ACC_K=cfg.ACC_K, UPCAST=cfg.UPCAST, num_warps=cfg.num_warps, **FP_FUSION, **pdl(a),
    )


def _launch_gluon(cfg, a, a_scale, b, b_scale, out, expert_offsets, expert_counts, M, N, K, E, tiles_bound):
    """Launch the Gluon kernel of ``cfg`` where it can run (else a ValueError naming why)."""
    problem = _gluon_problem(a, b, N)
    if problem:
        raise ValueError(problem)
    kernel, grid, args, kwargs = gluon_launch_args(cfg, a, a_scale, b, b_scale, out, expert_offsets, expert_counts,
                                                   tiles_bound)
    kernel[grid](*args, **kwargs, **FP_FUSION)


def _scales_tma_ok(a_scale: torch.Tensor, M: int) -> bool:
    """Whether TMA can load ``a_scale``'s rows per 128-K block: MN-major (unit row stride, the ``tma_aligned``
    layout), 16-byte aligned base, blocks not overlapping. The block stride is kept a multiple of 4 (16-byte aligned
    block starts), the layout measured; TMA itself would take any start coordinate."""
    return (a_scale.stride(0) == 1 and a_scale.stride(1) % 4 == 0 and a_scale.stride(1) >= M
            and a_scale.data_ptr() % 16 == 0)


def gluon_launch_args(cfg, a, a_scale, b, b_scale, out, expert_offsets, expert_counts, tiles_bound):
    """``(kernel, grid, args, kwargs)`` of the Gluon kernel of ``cfg`` (no checks, no launch: ``bench/
    gluon_compile_check.py`` compiles from it on a CPU machine). Host descriptors over ``a (M, K)`` and ``b`` as
    ``(E * N, K)`` with 128-byte swizzled NVMMA shared layouts (one 128-K FP8 box row is 128 bytes)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    (M, K), (E, N, _) = a.shape, b.shape
    bm, bn = cfg.BLOCK_M, cfg.BLOCK_N
    a_desc = TensorDescriptor(a, [M, K], [a.stride(0), 1], [bm, BLOCK],
                              gl.NVMMASharedLayout.get_default_for([bm, BLOCK], gl.float8e4nv))
    b_desc = TensorDescriptor(b, [E * N, K], [b.stride(1), 1], [bn, BLOCK],
                              gl.NVMMASharedLayout.get_default_for([bn, BLOCK], gl.float8e4nv))
    if cfg.WS:
        kernel = _gluon._grouped_gemm_fp8_gluon_ws_kernel
        # the consumers' expert vector spans 4 warps x 32 lanes
        block_e = max(128, triton.next_power_of_2(E))
        grid = min(tiles_bound, sm_count(a.device)) if cfg.PERSISTENT else tiles_bound
    else:
        kernel = _gluon._grouped_gemm_fp8_gluon_kernel
        # the expert vector's blocked layout spans 32 lanes x num_warps: at least that many slots
        block_e = max(32 * cfg.num_warps, triton.next_power_of_2(E))
        grid = tiles_bound
    args = _descriptor_kernel_args(a_desc, a_scale, b_desc, b_scale, out, expert_offsets, expert_counts, M, N, K, E)
    kwargs = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK, GROUP_M=cfg.GROUP_M, BLOCK_E=block_e,
                  NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps)
    if cfg.WS and _scales_tma_ok(a_scale, M):
        # the MN-major row scales as one flat run (K block kb's rows start at kb * stride(1)), loaded by the
        # producer's TMA into the ring with the tiles: a box's rows past M read the alignment padding or the next
        # block's first rows, which only feed rows that are never stored
        G, Mp = a_scale.shape[1], a_scale.stride(1)
        flat = torch.as_strided(a_scale, ((G - 1) * Mp + M,), (1,))
        kwargs["as_desc"] = TensorDescriptor(flat, [flat.shape[0]], [1], [bm],
                                             gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1))
        kwargs["SCALES_TMA"] = True
    return kernel, (max(1, grid),), args, kwargs


class TritonGroupedGemm:
    """Grouped-GEMM backend for the MoE: our Triton kernel over the routing plan's contiguous expert segments."""
    name = "triton"
    a_scale_layout = "tma_aligned"  # MN-major LHS scales: each K block's BLOCK_M scales are one coalesced read
    # Segments need no alignment here (tiles are cut per expert and masked by its count). 16 rather than DeepGEMM's
    # 128 shrinks the padded buffers the glue kernels sweep: at T=128, E=256, top-8 the plan holds 4.9K rows
    # instead of 33.5K (permute zero-fill, GEMM outputs, SwiGLU pass all scale with it).
    row_alignment = 16

    def __init__(self, config=None):
        self.config = config

    def gemm(self, a, a_scale, b, b_scale, plan, out=None, out_dtype=torch.bfloat16):
        """``plan``: ``fp8_deep.ops.plan.RoutingPlan``; rows outside the experts' valid rows are left untouched."""
        expected = peak_rows_per_expert(plan.num_tokens * plan.top_k, plan.num_experts)
        return grouped_gemm_fp8(a, a_scale, b, b_scale, plan.expert_offsets, plan.expert_counts, out=out,
                                out_dtype=out_dtype, config=self.config, expected_m=expected,
                                block_map=(plan.expert_ids, plan.m_indices, plan.block_size))

    def gemm_swiglu(self, a, a_scale, b, b_scale, plan, scale_fmt="fp32", scale_layout="tma_aligned"):
        """GEMM1, SwiGLU and the requantization for GEMM2 (``grouped_gemm_swiglu_fp8``): ``(q, scale)``."""
        expected = peak_rows_per_expert(plan.num_tokens * plan.top_k, plan.num_experts)
        return grouped_gemm_swiglu_fp8(a, a_scale, b, b_scale, plan.expert_offsets, plan.expert_counts,
                                       (plan.expert_ids, plan.m_indices, plan.block_size), scale_fmt=scale_fmt,
                                       scale_layout=scale_layout, config=self.config, expected_m=expected)
