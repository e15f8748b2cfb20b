"""Prototype (session 13): where the activation quantizer's TMA-aligned (column-major) scales lose 1-2 us.

Measured (session 13, calls 1-4, H100): with TMA-aligned scales the flat kernel is 0.8 us slower than with row-major
ones at M=4096 and 2.3 us at M=8192 after do_bench's zeroing flush (ncu kernel time; 79 vs 82% and 89 vs 91% of the
copy rate) and writes ~2 MB more to DRAM, about the size of the scale array; without a flush ahead (the scale lines
still in L2 from the previous call) the two layouts run level. Session 12's tiles whose column stores fill whole
32-byte sectors did not help, so it is not partial sectors. Hypothesis: column-major scale lines (32 rows of one
group) are written over ~112 programs and get evicted, written back and re-allocated before they are complete.

Variants, all the package's math (checked bit-exact against ``ops.quantize_activation`` before timing):
  lib / lib_row   the package kernel, TMA-aligned / row-major scales (the gap being explained)
  p_base          this file's copy of the flat kernel (the control: should time as lib)
  p_sel           scale stores ``evict_last``: the partial scale lines stay in L2 until complete
  p_scs           scale stores ``.cs`` (streaming)
  p_swt           scale stores ``.wt`` (write-through)
  p_qef           q stores ``evict_first`` with scale stores ``evict_last``
  compile         torch.compile of the reference producing TMA-aligned scales (the baseline)

Outcome (H100, session 13, call 5): the hypothesis holds. With ``evict_last`` scale stores M=8192 takes 64.4 us
against 66.4 (1.032x, 91.6% of the copy rate), faster than row-major scales (65.0). M=4096 takes 35.1 us against 36.1.
``.cs`` and ``.wt`` give 1.01x. Adopted in ``quant_act_flat_kernel`` (``S_EVICT``).

Timed in do_bench's loop (zeroing flush) in interleaved rounds, order reversed every other round; paired ratio to lib.

    python bench/proto_act_tma.py   # GPU machine (gpu_check.sh stage proto, PROTO=bench/proto_act_tma.py)
"""
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="proto_act_tma_inductor_"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import triton.testing as tt  # noqa: E402

from fp8_deep import ops  # noqa: E402
from fp8_deep.kernels.quant import _quant_groups  # noqa: E402
from fp8_deep.numerics import ACT_EPS, FP8_MAX  # noqa: E402
from fp8_deep.ops.quant import gpu_fast_paths  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_quant import act_nbytes, act_ref_fast_tma  # noqa: E402

K = 7168
ROUNDS = int(os.environ.get("PAT_ROUNDS", "6"))


@triton.jit
def proto_act_flat_kernel(x_ptr, q_ptr, s_ptr, NG, G, stride_xm, stride_qm, stride_sm, stride_sg,
                          FP8_MAX: tl.constexpr, EPS: tl.constexpr, FMA_DIV: tl.constexpr, NAN_MAX: tl.constexpr,
                          NAN_SELECT: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                          S_EVICT: tl.constexpr, S_CACHE: tl.constexpr, Q_EVICT: tl.constexpr):
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = g < NG
    row = g // G
    gi = g - row * G
    m = row.to(tl.int64)
    gi = gi.to(tl.int64)
    j = tl.arange(0, GROUP)
    x = tl.load(x_ptr + (m * stride_xm + gi * GROUP)[:, None] + j[None, :], mask=gmask[:, None],
                other=0.0).to(tl.float32)
    q, s = _quant_groups(x, 1, FP8_MAX, EPS, False, FMA_DIV, NAN_MAX, NAN_SELECT)
    tl.store(q_ptr + (m * stride_qm + gi * GROUP)[:, None] + j[None, :], q.to(q_ptr.dtype.element_ty),
             mask=gmask[:, None], eviction_policy=Q_EVICT)
    tl.store(s_ptr + m * stride_sm + gi * stride_sg, s, mask=gmask, eviction_policy=S_EVICT, cache_modifier=S_CACHE)


# name -> (scale layout, S_EVICT, S_CACHE, Q_EVICT)
PROTOS = {
    "p_base": ("tma_aligned", "", "", ""),
    "p_sel": ("tma_aligned", "evict_last", "", ""),
    "p_scs": ("tma_aligned", "", ".cs", ""),
    "p_swt": ("tma_aligned", "", ".wt", ""),
    "p_qef": ("tma_aligned", "evict_last", "", "evict_first"),
}


def proto_call(x, layout, s_evict, s_cache, q_evict):
    M, K_ = x.shape
    G = K_ // 128
    q = torch.empty_like(x, dtype=torch.float8_e4m3fn)
    if layout == "tma_aligned":
        Ma = (M + 3) // 4 * 4
        s = torch.empty(G, Ma, dtype=torch.float32, device=x.device).t()[:M]
    else:
        s = torch.empty(M, G, dtype=torch.float32, device=x.device)
    NG = M * G
    proto_act_flat_kernel[(triton.cdiv(NG, 16),)](
        x, q, s, NG, G, x.stride(0), q.stride(0), s.stride(0), s.stride(1), FP8_MAX=FP8_MAX, EPS=ACT_EPS,
        GROUP=128, BLOCK_G=16, S_EVICT=s_evict, S_CACHE=s_cache, Q_EVICT=q_evict, num_warps=4,
        **gpu_fast_paths(x))
    return q, s


def main():
    print(C.env_line(), flush=True)
    copy = C.copy_bandwidth()
    ms = [int(m) for m in os.environ.get("PAT_M", "4096,8192").split(",")]
    for M in ms:
        x = C.randn((M, K), seed=M)
        fns = {"lib": lambda: ops.quantize_activation(x, backend="triton", scale_layout="tma_aligned"),
               "lib_row": lambda: ops.quantize_activation(x, backend="triton")}
        ref_q, ref_s = fns["lib"]()
        for name, cfg in PROTOS.items():
            fns[name] = (lambda cfg=cfg: proto_call(x, *cfg))
            q, s = fns[name]()
            ok = torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(s, ref_s) \
                and s.stride() == ref_s.stride()
            print(f"M={M} {name}: {'bit-exact' if ok else 'MISMATCH'}", flush=True)
        compiled = torch.compile(act_ref_fast_tma, dynamic=False)
        fns["compile"] = lambda: compiled(x)
        for fn in fns.values():
            fn()
        names = list(fns)
        times = {n: [] for n in names}
        for r in range(ROUNDS):
            order = names if r % 2 == 0 else names[::-1]
            for n in order:
                times[n].append(tt.do_bench(fns[n], warmup=25, rep=200, return_mode="median"))
        nbytes = act_nbytes(M * K)
        print(f"\nM={M}: median us, % of the 2 GiB copy rate ({copy:.0f} GB/s), paired ratio to lib (>1 faster) "
              f"[range], to compile")
        for n in names:
            med = statistics.median(times[n])
            pr = [a / b for a, b in zip(times["lib"], times[n])]
            pc = [a / b for a, b in zip(times["compile"], times[n])]
            print(f"  {n:8s} {med * 1e3:7.2f} us {100 * nbytes / (med * 1e-3) / 1e9 / copy:6.1f}%  "
                  f"x lib {statistics.median(pr):.4f} [{min(pr):.4f}-{max(pr):.4f}]  x compile "
                  f"{statistics.median(pc):.4f} [{min(pc):.4f}-{max(pc):.4f}]", flush=True)
        del x, fns
        C.free_cuda()


if __name__ == "__main__":
    main()
