"""Host (Python) time per call of the quantization launchers next to torch.compile's: at M = 4096 the kernel takes
~35 us, so a launcher slower than that leaves the GPU idle between calls and do_bench times the host.

    python bench/diag/diag_host.py [--profile]

"act triton row" and "weight (8 experts)" replay launch plans (fp8_deep.ops._launch); "..., no plan" is the full
launcher path.
Each figure is the best of 5 rounds of 300 calls (the host's other load makes single rounds noisy).
"""
import argparse  # noqa: E402

if __name__ == "__main__":  # --help works without a GPU; the flags read below pass through
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_known_args()

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
import triton  # noqa: E402

import bench_quant as BQ  # noqa: E402
from _common import host_us, profile_calls  # noqa: E402
from fp8_deep import ops  # noqa: E402
from fp8_deep.kernels.quant import quant_act_flat_kernel  # noqa: E402
from fp8_deep.ops import quant as quant_ops  # noqa: E402


x = torch.randn(4096, 7168, device="cuda", dtype=torch.bfloat16)
q = torch.empty(x.shape, device="cuda", dtype=torch.float8_e4m3fn)
s = torch.empty(4096, 56, device="cuda")
w = torch.randn(8, 4096, 7168, device="cuda", dtype=torch.bfloat16)
comp = torch.compile(BQ.act_ref_fast)
wcomp = torch.compile(BQ.weight_ref_fast, dynamic=False)
wout = (torch.empty(w.shape, device="cuda", dtype=torch.float8_e4m3fn), torch.empty(8, 32, 56, device="cuda"))
NG = 4096 * 56
kargs = (x.view(1, 4096, 7168), q.view(1, 4096, 7168), s.view(1, 4096, 56), NG, 4096, 56, x.numel(), 7168, q.numel(),
         7168, s.numel(), 56, 1)
kw = dict(FP8_MAX=448.0, EPS=1e-10, UE8M0=False, FMA_DIV=True, NAN_MAX=True, NAN_SELECT=False, GROUP=128, BLOCK_G=16,
          S_EVICT="evict_last", num_warps=4)
grid = (triton.cdiv(NG, 16),)
compiled = quant_act_flat_kernel[grid](*kargs, **kw)
full = list(kargs) + [kw[p.name] for p in quant_act_flat_kernel.params[len(kargs):]]


def _no_plan(fn):
    quant_ops.PLANS_ENABLED = False
    try:
        return fn()
    finally:
        quant_ops.PLANS_ENABLED = True


cases = {
    "kernel[grid] plain": lambda: quant_act_flat_kernel[grid](*kargs, **kw),
    "compiled[grid]": lambda: compiled[grid + (1, 1)](*full),
    "act triton row": lambda: ops.quantize_activation(x, backend="triton"),
    "act row, no plan": lambda: _no_plan(lambda: ops.quantize_activation(x, backend="triton")),
    "act triton tma": lambda: ops.quantize_activation(x, backend="triton", scale_layout="tma_aligned"),
    "act compile": lambda: comp(x),
    "weight (8 experts)": lambda: ops.quantize_weight_blockwise(w),
    "weight, no plan": lambda: _no_plan(lambda: ops.quantize_weight_blockwise(w)),
    "weight, out=": lambda: ops.quantize_weight_blockwise(w, out=wout),
    "weight compile": lambda: wcomp(w),
    "torch.empty x2": lambda: (torch.empty(4096, 7168, device="cuda", dtype=torch.float8_e4m3fn),
                               torch.empty(4096, 56, device="cuda")),
}
for name, fn in cases.items():
    print(f"{name:20s} host {host_us(fn):7.1f} us/call", flush=True)
if "--profile" in sys.argv:
    profile_calls(cases["act triton row"], 500, sort="tottime", top=22)
