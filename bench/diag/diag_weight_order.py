"""Does the order in which programs walk the scale blocks move the one-layout weight quantizer against torch.compile?

Run f9ad68d found torch.compile's kernel sensitive to the shape at the 0.5% level (one more expert, E=33, cost it 0.6%
against ours) while everything inside a program (structure, occupancy, masks, math, hints) moved ours by at most
0.1%. Both kernels walk the blocks in the same order (K fastest, then N, then the expert), so the order -- which
DRAM rows and channels are open at the same time -- is the lever neither has tried. Variants, all the package's
per-block code (``_quant_weight_one_block``, two blocks per program, 8 warps: the default from 16384 blocks on),
only the map from the launch grid to (block column pair, block row, expert) changes:

  kne   K-pairs fastest, then N, then E (the package kernel's order; launched here through the same wrapper)
  nke   N fastest: consecutive programs take the same columns of successive 128-row bands
  ekn   E fastest: consecutive programs read the same block of different experts (58.7 MB apart)
  swz8  groups of 8 row bands walked column by column (GEMM-style grouping), within an expert

CUDA-graph replays over two input sets, providers interleaved, the order reversed every other round, paired ratio to
torch.compile per round pair (diag_weight_tail's method); every variant is checked bit-exact before it is timed.

Outcome (H100, run 706873e; docs/performance-log.md): the package's order is the fastest of the four; every other walk
is slower, by more than the whole gap to torch.compile. x compile on 32x4096x7168 / 32x7168x2048 / 7168x18432:
kne 0.9996 / 0.9993 / 0.9992 (the package, whole call: 0.9994 / 0.9990 / 1.011; A/A 1.0002 / 0.9999 / 1.0000), nke 0.965 /
0.980 / 0.948, ekn 0.956 / 0.965 / 1.001 (E=1: the same walk as kne), swz8 0.986 / 0.996 / 0.970.

    python bench/diag/diag_weight_order.py   # GPU (gpu_check.sh stage proto, PROTO=bench/diag/diag_weight_order.py)
"""
import argparse  # noqa: E402

if __name__ == "__main__":  # --help works without a GPU; the flags read below pass through
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_known_args()

import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from diag_weight_tail import add_if_exact, time_shapes  # noqa: E402
from fp8_deep.kernels.quant import _quant_weight_one_block  # noqa: E402
from fp8_deep.numerics import FP8_MAX, WEIGHT_AMAX_EPS  # noqa: E402
from fp8_deep.ops.quant import _weight_hints, gpu_fast_paths  # noqa: E402

ORDERS = {"kne": 0, "nke": 1, "ekn": 2, "swz8": 3}
ORDERS = {k: v for k, v in ORDERS.items() if k in os.environ.get("DIAG_ORDERS", ",".join(ORDERS)).split(",")}
SHAPES = [(32, 4096, 7168), (32, 7168, 2048), (7168, 18432)]
if os.environ.get("DIAG_SHAPES"):
    SHAPES = [tuple(int(d) for d in sh.split("x")) for sh in os.environ["DIAG_SHAPES"].split(";")]
GROUP_N = 8


@triton.jit
def ordered_kernel(w_ptr, q_ptr, s_ptr, N, K, kb, kp, nb,
                   stride_we, stride_wn, stride_wk, stride_qe, stride_qn, stride_qk, stride_se, stride_sn, stride_sk,
                   FP8_MAX: tl.constexpr, AMAX_EPS: tl.constexpr, NAN_MAX: tl.constexpr, NAN_SELECT: tl.constexpr,
                   LOAD_EVICT: tl.constexpr, STORE_EVICT: tl.constexpr, ORDER: tl.constexpr,
                   GROUP_N: tl.constexpr):
    p0 = tl.program_id(0)
    p1 = tl.program_id(1)
    p2 = tl.program_id(2)
    if ORDER == 0:
        pid_k, pid_n, pid_e = p0, p1, p2
    elif ORDER == 1:
        pid_n, pid_k, pid_e = p0, p1, p2
    elif ORDER == 2:
        pid_e, pid_k, pid_n = p0, p1, p2
    else:
        # p0 over one expert's kp * nb programs: GROUP_N row bands, column pair by column pair
        per = GROUP_N * kp
        grp = p0 // per
        r = p0 - grp * per
        pid_n = grp * GROUP_N + r % GROUP_N
        pid_k = r // GROUP_N
        pid_e = p2
    _quant_weight_one_block(
        w_ptr, q_ptr, s_ptr, q_ptr, s_ptr, pid_k, pid_n, pid_e, N, K, kb,
        stride_we, stride_wn, stride_wk, stride_qe, stride_qn, stride_qk, stride_se, stride_sn, stride_sk,
        stride_qe, stride_qn, stride_qk, stride_se, stride_sn, stride_sk,
        FP8_MAX, AMAX_EPS, False, False, NAN_MAX, NAN_SELECT, LOAD_EVICT, STORE_EVICT, LOAD_EVICT, 128, 128, 32, 2)


def launch(w, q, s, order):
    w3, q3, s3 = (t if t.dim() == 3 else t.unsqueeze(0) for t in (w, q, s))
    E, N, K = w3.shape
    nb, kb = N // 128, K // 128
    kp = math.ceil(kb / 2)
    grid = {0: (kp, nb, E), 1: (nb, kp, E), 2: (E, kp, nb), 3: (kp * nb, 1, E)}[order]
    fast = gpu_fast_paths(w)
    hints = _weight_hints(False)
    return ordered_kernel[grid](
        w3, q3, s3, N, K, kb, kp, nb, *w3.stride(), *q3.stride(), *s3.stride(), FP8_MAX=FP8_MAX,
        AMAX_EPS=WEIGHT_AMAX_EPS, NAN_MAX=fast["NAN_MAX"], NAN_SELECT=fast["NAN_SELECT"],
        LOAD_EVICT=hints["LOAD_EVICT"], STORE_EVICT=hints["STORE_EVICT"], ORDER=order, GROUP_N=GROUP_N, num_warps=8)


def add_orders(fns, label, sets, q_ref, s_ref):
    from fp8_deep import ops
    fns["compile_aa"] = fns["compile"][:]
    fns["package"] = [lambda w=w, q=q, s=s: ops.quantize_weight_blockwise(w, out=(q, s)) for w, q, s in sets]
    for name, order in ORDERS.items():
        if order == 3 and (sets[0][0].shape[-2] // 128) % GROUP_N:
            continue
        for t in sets:
            t[1].zero_()
        add_if_exact(fns, label, name, sets, q_ref, s_ref, lambda w, q, s, o=order: launch(w, q, s, o))


if __name__ == "__main__":
    time_shapes(SHAPES, add_orders)
