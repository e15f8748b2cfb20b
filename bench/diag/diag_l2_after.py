"""What a weight-quantizer L2 policy costs the next kernel: ``quantize_weight_blockwise`` (per
``FP8_DEEP_WEIGHT_QUANT_HINTS`` preset) or torch.compile's kernel, followed by an L2-reusing matmul, or between two
sums of one 32 MB buffer (the second finds it in L2 only if the quantizer left room), each pattern timed as one CUDA
graph; the neighbours' share is the pattern's time minus the quantizer's alone. A block loaded ``evict_last`` keeps
its lines ahead of the next kernel's own in L2.

    python bench/diag_l2_after.py          # on the GPU machine (gpu_check.sh stage proto, PROTO=bench/diag_l2_after.py)
"""
import argparse  # noqa: E402

if __name__ == "__main__":  # --help works without a GPU; the flags read below pass through
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_known_args()

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
import triton.testing as tt  # noqa: E402

from fp8_deep import ops  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_quant import weight_ref_fast, weight_ref_fast_both  # noqa: E402

ROUNDS = 3
# (FP8_DEEP_WEIGHT_QUANT_HINTS preset or "compile" for torch.compile's kernel, with_transpose)
PRESETS = (("none", False), ("el", False), ("compile", False), ("none", True), ("el_rf", True), ("compile", True))


def main():
    torch.manual_seed(0)
    w = torch.randn(32, 4096, 7168, device="cuda", dtype=torch.bfloat16) * 0.02
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)  # 32 MB: L2-resident when re-read at once

    def mm():
        torch.mm(a, b)

    def reread():
        x.sum()
    compiled = {False: torch.compile(weight_ref_fast), True: torch.compile(weight_ref_fast_both)}
    rows = []
    for _ in range(ROUNDS):  # presets interleaved
        for preset in PRESETS:
            if preset[0] == "compile":  # torch.compile's kernel: what its own L2 policy costs the next kernel
                os.environ.pop("FP8_DEEP_WEIGHT_QUANT_HINTS", None)

                def quant():
                    compiled[preset[1]](w)
            else:
                os.environ["FP8_DEEP_WEIGHT_QUANT_HINTS"] = preset[0]

                def quant():
                    ops.quantize_weight_blockwise(w, with_transpose=preset[1])
            quant()
            tq = tt.do_bench_cudagraph(quant, rep=200)
            tqm = tt.do_bench_cudagraph(lambda: (quant(), mm()), rep=200)
            tqr = tt.do_bench_cudagraph(lambda: (reread(), quant(), reread()), rep=200)
            rows.append((preset, tq, tqm - tq, tqr - tq))
    tm = tt.do_bench_cudagraph(mm, rep=200)
    tr = tt.do_bench_cudagraph(reread, rep=200)
    print(f"alone: mm 4096^3 bf16 {tm * 1e3:.1f} us, 32 MB sum {tr * 1e3:.1f} us")
    for preset in PRESETS:
        rs = [r for r in rows if r[0] == preset]
        med = [sorted(r[i] for r in rs)[ROUNDS // 2] for i in (1, 2, 3)]
        print(f"### preset {preset[0]:6s} with_transpose={preset[1]!s:5s}: quant {med[0] * 1e3:8.1f} us | "
              f"mm after it {med[1] * 1e3:6.1f} us | two 32 MB sums around it {med[2] * 1e3:6.1f} us "
              f"(medians of {ROUNDS} rounds)", flush=True)


if __name__ == "__main__":
    main()
