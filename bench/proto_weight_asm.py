"""Prototype (session 9): the one-layout weight quantizer with its loads written in PTX, for the cache qualifiers
Triton does not expose: a fractional L2 policy (``createpolicy.fractional`` with a fraction below 1), the
``L2::256B`` prefetch size, the read-only ``.nc`` path. Each thread loads 8 bf16 (16 bytes) per pointer as four
32-bit words, widens them to float32 by shifts, and stores the 8 FP8 bytes as one 64-bit word; the math is the
package kernel's (bit-exact: checked against ``ops.quantize_weight_blockwise`` on every shape before timing).
Full 128x128 blocks, contiguous bfloat16 only.

Outcome (H100, session 9, call 4; bench/NOTES.md): every PTX variant ran 8-9% behind torch.compile where its bytes
were right (32x7168x2048, 7168x18432: 0.91-0.92x), the fractional policy (0.5) exactly as fast as the full one, the
256-byte L2 prefetch 0.4% slower, the ``.nc`` path 1% slower; on the N=4096, K=7168 shapes its FP8 bytes differed
from the package kernel's in 6% of the elements (not debugged: the approach was dropped). Kept as the record.

    python bench/proto_weight_asm.py   # GPU machine (gpu_check.sh stage proto, PROTO=bench/proto_weight_asm.py)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fp8_deep.numerics import FP8_MAX, WEIGHT_AMAX_EPS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diag_weight_tail import launch, n_differing, prepared, print_summary, time_interleaved  # noqa: E402


def _ld(policy: str, qual: str) -> str:
    """PTX of one 16-byte load ``$4`` -> ``$0..$3``; ``policy`` "" or a createpolicy line setting ``pol``."""
    hint = ".L2::cache_hint" if policy else ""
    tail = ", pol" if policy else ""
    return ("{ .reg .b64 pol; " + policy + f" ld.global{qual}{hint}.v4.b32 {{$0, $1, $2, $3}}, [$4]{tail}; }}")


FRAC = "createpolicy.fractional.L2::evict_last.L2::evict_unchanged.b64 pol, {f};"
VARIANTS = {
    "asm_el": _ld(FRAC.format(f="1.0"), ".L1::evict_last"),  # what Triton emits for evict_last: the control
    "asm_el50": _ld(FRAC.format(f="0.5"), ".L1::evict_last"),
    "asm_el_256": _ld(FRAC.format(f="1.0"), ".L1::evict_last.L2::256B"),
    "asm_256": _ld("", ".L2::256B"),
    "asm_nc256": _ld("", ".nc.L1::no_allocate.L2::256B"),
}


@triton.jit
def _widen(word):
    """int32 holding bf16 pair (low half first in memory) -> (float32 low, float32 high)."""
    lo = (word << 16).to(tl.float32, bitcast=True)
    hi = (word & -65536).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _byte(v, shift: tl.constexpr):
    return v.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.uint64) << shift


@triton.jit
def weight_quant_asm_kernel(w_ptr, q_ptr, s_ptr, stride_we, stride_wn, stride_qe, stride_qn, stride_se, stride_sn,
                            ASM: tl.constexpr, FP8_MAX: tl.constexpr, AMAX_EPS: tl.constexpr,
                            BLOCKS_K: tl.constexpr):
    """The tile is indexed flat (one 16-byte vector per index, row-major over 128 rows x 16 * BLOCKS_K vectors):
    a 2-D pointer tensor of stride-8 columns gets a row-per-thread layout (uncoalesced), a flat one gives
    consecutive lanes consecutive vectors."""
    tl.static_assert(BLOCKS_K <= 2)
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_e = tl.program_id(2).to(tl.int64)
    VEC: tl.constexpr = 16 * BLOCKS_K  # 8-element vectors per row of the tile
    i = tl.arange(0, 128 * VEC)
    row = (pid_n * 128 + i // VEC).to(tl.int64)
    col = (pid_k * VEC + i % VEC).to(tl.int64) * 8
    ptrs = w_ptr + pid_e * stride_we + row * stride_wn + col
    a0, a1, a2, a3 = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,l", [ptrs],
                                               dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    e0, e1 = _widen(a0)
    e2, e3 = _widen(a1)
    e4, e5 = _widen(a2)
    e6, e7 = _widen(a3)
    m = tl.maximum(tl.maximum(tl.maximum(tl.abs(e0), tl.abs(e1)), tl.maximum(tl.abs(e2), tl.abs(e3))),
                   tl.maximum(tl.maximum(tl.abs(e4), tl.abs(e5)), tl.maximum(tl.abs(e6), tl.abs(e7))))
    second = (i % VEC) >= 16  # which of the (at most two) scale blocks a vector belongs to
    kb0 = pid_k * BLOCKS_K
    s_base = s_ptr + pid_e * stride_se + pid_n * stride_sn
    if BLOCKS_K == 1:
        s0 = tl.math.div_rn(tl.maximum(tl.max(m, 0), AMAX_EPS), FP8_MAX)
        inv_v = tl.math.div_rn(1.0, s0) + tl.zeros_like(m)
        tl.store(s_base + kb0, s0)
    else:
        s0 = tl.math.div_rn(tl.maximum(tl.max(tl.where(second, 0.0, m), 0), AMAX_EPS), FP8_MAX)
        s1 = tl.math.div_rn(tl.maximum(tl.max(tl.where(second, m, 0.0), 0), AMAX_EPS), FP8_MAX)
        inv_v = tl.where(second, tl.math.div_rn(1.0, s1), tl.math.div_rn(1.0, s0))
        tl.store(s_base + kb0, s0)
        tl.store(s_base + kb0 + 1, s1)
    word = (_byte(e0 * inv_v, 0) | _byte(e1 * inv_v, 8) | _byte(e2 * inv_v, 16) | _byte(e3 * inv_v, 24)
            | _byte(e4 * inv_v, 32) | _byte(e5 * inv_v, 40) | _byte(e6 * inv_v, 48) | _byte(e7 * inv_v, 56))
    qp = (q_ptr + pid_e * stride_qe + row * stride_qn + col).to(tl.pointer_type(tl.uint64), bitcast=True)
    tl.store(qp, word)


def launch_asm(w, q, s, asm, blocks_k=2, warps=8):
    w3, q3, s3 = (t if t.dim() == 3 else t.unsqueeze(0) for t in (w, q, s))
    E, N, K = w3.shape
    weight_quant_asm_kernel[(K // 128 // blocks_k, N // 128, E)](
        w3, q3, s3, w3.stride(0), w3.stride(1), q3.stride(0), q3.stride(1), s3.stride(0), s3.stride(1),
        ASM=asm, FP8_MAX=FP8_MAX, AMAX_EPS=WEIGHT_AMAX_EPS, BLOCKS_K=blocks_k, num_warps=warps)


SHAPES = [(32, 4096, 7168), (32, 7168, 2048), (7168, 18432), (8, 4096, 7168), (4096, 7168)]
# package-kernel configs alongside (num_warps, BLOCKS_K, maxnreg): the default and one block per program
PKG = {"k2w8": (8, 2, None), "k1w16": (16, 1, None), "k1w32r32": (32, 1, 32)}


def main():
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    summary = []
    for shape in SHAPES:
        label, sets, comp, q_ref, s_ref = prepared(shape)
        fns = {"compile": [lambda w=w: comp(w) for w, _, _ in sets]}
        for name, cfg in PKG.items():
            fns[name] = [lambda t=t, c=cfg: launch(*t, *c) for t in sets]
        for name, asm in VARIANTS.items():
            try:
                launch_asm(*sets[0], asm)
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 -- report and go on with the others
                print(f"{name}: FAILED {type(exc).__name__}: {str(exc)[:800]}")
                continue
            bad = n_differing(*sets[0][1:], q_ref, s_ref)
            print(f"{label:>14s} {name:11s} elements differing from the package kernel's: {bad}")
            if bad:
                continue
            fns[name] = [lambda t=t, a=asm: launch_asm(*t, a) for t in sets]
        summary += time_interleaved(fns, label)
        del sets, fns
        torch.cuda.empty_cache()
    print_summary(summary)


if __name__ == "__main__":
    main()
