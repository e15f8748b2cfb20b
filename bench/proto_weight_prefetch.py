"""Prototype (session 10): a persistent one-layout weight quantizer that keeps the next tile's loads in flight
while it computes and stores the current one (register double buffering, no shared memory).

Why: the package kernel (two 128x128 blocks per program, 8 warps, 172 registers) runs one program per SM, so an SM
has no load in flight from the moment its tile has arrived until the next program has started and issued its loads:
the amax reduction (shuffles, a shared-memory exchange, a barrier), the two correctly rounded divisions, the cast
and the stores. torch.compile's kernel (one block, 32 warps, 31 registers, two programs per SM) overlaps two
programs instead. Here each program walks tiles ``pid, pid + P, ...`` (P programs; concurrent programs on adjacent
tiles, the order of the plain grid) and issues tile ``t + P``'s loads before it reduces tile ``t``. Triton's own
software pipeliner is off (``num_stages=1``): the prefetch is a loop-carried register tile.

The math is the package kernel's (``fp8_deep.kernels.quant._weight_blocks``); every variant is checked bit-exact
against ``ops.quantize_weight_blockwise`` before it is timed. CUDA-graph replays over two input sets, the
providers interleaved and the order reversed every other round, ratio paired per round pair (diag_weight_tail's
method).

Outcome (H100, session 10, call 8): every configuration 3-8% behind torch.compile on the large shapes (best
p_k2w8x1 0.940 / 0.943 / 0.945 on 32x4096x7168 / 32x7168x2048 / 7168x18432, the package kernel 0.999 in the same
run), level on 4096x7168 (0.998). Like the pipelined persistent kernel of session 4, a persistent grid loses to one
program per tile here. Kept as the record.

    python bench/proto_weight_prefetch.py   # GPU machine (gpu_check.sh: PROTO=bench/proto_weight_prefetch.py)
    PREFETCH_CONFIGS="p_k1w8x1,p_k2w8x1" PREFETCH_SHAPES="32x4096x7168" python bench/proto_weight_prefetch.py
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fp8_deep.kernels.quant import _weight_blocks  # noqa: E402
from fp8_deep.numerics import FP8_MAX, WEIGHT_AMAX_EPS  # noqa: E402
from fp8_deep.ops.quant import gpu_fast_paths  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diag_weight_tail import add_if_exact, launch, time_shapes  # noqa: E402


@triton.jit
def _tile_ptrs(t, n_tiles, N, K, nb, kt, stride_e, stride_n, stride_k, offs_n0, offs_k0,
               BLOCK_N: tl.constexpr, WIDTH: tl.constexpr):
    """Tile ``t`` (k fastest, then n, then the expert) -> (pointers, in-bounds mask, e, n, k tile indices)."""
    pk = t % kt
    pn = (t // kt) % nb
    pe = (t // (kt * nb)).to(tl.int64)
    offs_n = pn * BLOCK_N + offs_n0
    offs_k = pk * WIDTH + offs_k0
    # t < n_tiles as a tensor: a scalar boolean & a tensor mask becomes int32 in the interpreter
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K) & ((offs_n0 * 0 + t)[:, None] < n_tiles)
    ptrs = pe * stride_e + offs_n.to(tl.int64)[:, None] * stride_n + offs_k.to(tl.int64)[None, :] * stride_k
    return ptrs, mask, pe, pn, pk


@triton.jit
def quant_weight_prefetch_kernel(
    w_ptr, q_ptr, s_ptr, N, K, nb, kb, kt, n_tiles,
    stride_we, stride_wn, stride_wk, stride_qe, stride_qn, stride_qk, stride_se, stride_sn, stride_sk,
    FP8_MAX: tl.constexpr, AMAX_EPS: tl.constexpr, NAN_MAX: tl.constexpr, NAN_SELECT: tl.constexpr,
    LOAD_EVICT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKS_K: tl.constexpr,
):
    WIDTH: tl.constexpr = BLOCK_K * BLOCKS_K
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_k0 = tl.arange(0, WIDTH)
    ptrs, mask, _, _, _ = _tile_ptrs(pid, n_tiles, N, K, nb, kt, stride_we, stride_wn, stride_wk, offs_n0, offs_k0,
                                     BLOCK_N, WIDTH)
    w_next = tl.load(w_ptr + ptrs, mask=mask, other=0.0, eviction_policy=LOAD_EVICT)
    for t in range(pid, n_tiles, P):
        w = w_next.to(tl.float32)
        # the next tile's loads go out before this tile's reduction (masked off past the last tile)
        nptrs, nmask, _, _, _ = _tile_ptrs(t + P, n_tiles, N, K, nb, kt, stride_we, stride_wn, stride_wk, offs_n0,
                                           offs_k0, BLOCK_N, WIDTH)
        w_next = tl.load(w_ptr + nptrs, mask=nmask, other=0.0, eviction_policy=LOAD_EVICT)
        qptrs, mask, pe, pn, pk = _tile_ptrs(t, n_tiles, N, K, nb, kt, stride_qe, stride_qn, stride_qk, offs_n0,
                                             offs_k0, BLOCK_N, WIDTH)
        q8, s, inv, bad = _weight_blocks(w, q_ptr.dtype.element_ty, FP8_MAX, AMAX_EPS, False, NAN_MAX, NAN_SELECT,
                                         BLOCK_N, BLOCK_K, BLOCKS_K)
        kbs = pk * BLOCKS_K + tl.arange(0, BLOCKS_K)
        tl.store(s_ptr + pe * stride_se + pn * stride_sn + kbs * stride_sk, s, mask=kbs < kb)
        tl.store(q_ptr + qptrs, q8, mask=mask)


# name: (num_warps, BLOCKS_K, programs per SM); registers from ptxas (sm_90, Triton 3.6), each config's programs
# fit on an SM together: k1w8 144, k1w4 245 (two per SM), k1w16 93, k2w8 245, k2w16 128
CONFIGS = {"p_k1w8x1": (8, 1, 1), "p_k1w4x2": (4, 1, 2), "p_k1w16x1": (16, 1, 1), "p_k2w8x1": (8, 2, 1),
           "p_k2w16x1": (16, 2, 1)}
CONFIGS = {k: v for k, v in CONFIGS.items()
           if k in os.environ.get("PREFETCH_CONFIGS", ",".join(CONFIGS)).split(",")}
SHAPES = [(32, 4096, 7168), (32, 7168, 2048), (7168, 18432), (4096, 7168)]
if os.environ.get("PREFETCH_SHAPES"):
    SHAPES = [tuple(int(d) for d in sh.split("x")) for sh in os.environ["PREFETCH_SHAPES"].split(";")]


def launch_prefetch(w, q, s, warps, blocks_k, per_sm):
    w3, q3, s3 = (t if t.dim() == 3 else t.unsqueeze(0) for t in (w, q, s))
    E, N, K = w3.shape
    nb, kb = triton.cdiv(N, 128), triton.cdiv(K, 128)
    kt = triton.cdiv(kb, blocks_k)
    n_tiles = E * nb * kt
    grid = min(n_tiles, per_sm * torch.cuda.get_device_properties(w.device).multi_processor_count)
    fast = gpu_fast_paths(w)
    return quant_weight_prefetch_kernel[(grid,)](
        w3, q3, s3, N, K, nb, kb, kt, n_tiles, *w3.stride(), *q3.stride(), *s3.stride(),
        FP8_MAX=FP8_MAX, AMAX_EPS=WEIGHT_AMAX_EPS, NAN_MAX=fast["NAN_MAX"], NAN_SELECT=fast["NAN_SELECT"],
        LOAD_EVICT="evict_last", BLOCK_N=128, BLOCK_K=128, BLOCKS_K=blocks_k, num_warps=warps, num_stages=1)


def add_configs(fns, label, sets, q_ref, s_ref):
    fns["k2w8"] = [lambda t=t: launch(*t, 8, 2, None) for t in sets]
    for name, cfg in CONFIGS.items():
        add_if_exact(fns, label, name, sets, q_ref, s_ref, lambda w, q, s, c=cfg: launch_prefetch(w, q, s, *c),
                     lambda ck: f"regs {getattr(ck, 'n_regs', -1):3d} spills {getattr(ck, 'n_spills', -1):3d}")


if __name__ == "__main__":
    time_shapes(SHAPES, add_configs)
