"""SwiGLU backward from the FP8 cache (``fp8_deep.ops.swiglu.silu_mul_backward_quantize``): GB/s and % of a copy
of the same bytes.

Providers (each validated once before it is timed):
  fp8_deep  the op (one fused pass + a fixed-order row sum of the router-weight gradient); checked bit for bit
            against ``silu_mul_backward_quantize_ref`` evaluated on the GPU (torch's CUDA sigmoid uses the same
            libdevice expf and IEEE division as the kernel), grad_row_weights to a float tolerance.
  compile   ``torch.compile`` of that reference composition (dequantize the cache, recompute SwiGLU, the backward's
            math, three quantizations): the baseline of the x_compile ratio. Skipped with a note if it fails.
  copy_sm   a bf16 negation through an SM kernel moving the op's bytes (read + write): the ceiling.

Traffic counted (the op's minimal bytes): reads q_h (M*2I), s_h, grad_a (M*I*2), row_weights, m_indices; writes
q_dh (M*2I), q_dh_t (2I*M), q_wa_t (I*M), their scales and grad_row_weights. The op's internal per-chunk partial
sums (M * I/128 floats, written and read once) are not counted.

    python bench/bench_swiglu_backward.py                      # M = 8192, 32768 at I = 2048; M = 32768 at I = 768
    python bench/bench_swiglu_backward.py --shapes 16384x2048 --providers fp8_deep,copy_sm
    FP8_DEEP_SWIGLU_BWD_CONFIG=64,8 python bench/bench_swiglu_backward.py   # pin the (SUB, num_warps) tile
    python bench/bench_swiglu_backward.py --cpu-smoke          # no GPU: the plumbing on tiny shapes
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py when run as a script

import torch  # noqa: E402

import _common as C  # noqa: E402

SHAPES = [(8192, 2048), (32768, 2048), (32768, 768)]  # (M rows of the routing plan, I)
PROVIDERS = ["fp8_deep", "compile", "copy_sm"]


def nbytes(M: int, I: int, group: int = 128) -> int:
    G, G2, GM = -(-I // group), -(-2 * I // group), -(-M // group)
    reads = M * 2 * I + M * 2 * G * 4 + M * I * 2 + M * 4 + M * 4
    writes = M * 2 * I + M * G2 * 4 + 2 * I * M + 2 * I * GM * 4 + I * M + I * GM * 4 + M * 4
    return reads + writes


def make_inputs(M: int, I: int, seed: int = 0):
    """The FP8 cache of a random h (through the forward op, save_input=True), a bf16 gradient, router weights and a
    plan's m_indices (32 experts of 128-row segments, no padding)."""
    from fp8_deep.ops.swiglu import silu_mul_quantize
    h = C.randn((M, 2 * I), std=2.0, seed=seed)
    m = (torch.arange(M, device=C.device(), dtype=torch.int32) // 128) % 32
    _, _, q_h, s_h = silu_mul_quantize(h, m_indices=m, save_input=True)
    ga = C.randn((M, I), std=0.5, seed=seed + 1)
    g = torch.Generator(device=C.device())
    g.manual_seed(seed + 2)
    rw = torch.rand(M, generator=g, device=C.device())
    return q_h, s_h, ga, rw, m


def validate(out, ref) -> str:
    bad = []
    for i, (a, b) in enumerate(zip(out[:6], ref[:6])):
        a, b = a.contiguous(), b.contiguous()
        if a.dtype == torch.float8_e4m3fn:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
            n = int((a != b).sum())
        else:
            n = int(((a != b) & ~(torch.isnan(a) & torch.isnan(b))).sum())
        if n:
            bad.append(f"out[{i}]: {n} differ")
    err = (out[6] - ref[6]).abs().max().item()
    scale = ref[6].abs().max().item() or 1.0
    if err > 1e-4 * scale:
        bad.append(f"grad_row_weights max err {err:.3g}")
    return "ok" if not bad else "MISMATCH " + "; ".join(bad)


class SwigluBwdBench:
    def __init__(self, args):
        self.args = args
        self.providers = args.providers
        self.out_dir = C.results_dir()
        self.log = C.CsvLog(self.out_dir / "swiglu_backward.csv")
        self.budget = C.Budget(args.time_budget)
        self.copy_gbps = C.copy_bandwidth()

    def run_one(self, M: int, I: int, provider: str):
        from fp8_deep.ops.swiglu import silu_mul_backward_quantize, silu_mul_backward_quantize_ref
        if self.budget.spent():
            return float("nan"), float("nan"), float("nan")
        nb = nbytes(M, I)
        status = ""
        try:
            if provider == "copy_sm":
                fn = C.copy_of_bytes(nb, sm_kernel=True)
            else:
                q_h, s_h, ga, rw, m = make_inputs(M, I)
                if provider == "fp8_deep":
                    def fn():
                        return silu_mul_backward_quantize(q_h, s_h, ga, rw, m_indices=m)
                else:  # compile
                    comp = torch.compile(silu_mul_backward_quantize_ref, dynamic=False)

                    def fn():
                        return comp(q_h, s_h, ga, rw, m)
                status = validate(fn(), silu_mul_backward_quantize_ref(q_h, s_h, ga, rw, m))
                if not q_h.is_cuda and status != "ok":  # --cpu-smoke: numpy's exp vs torch's CPU sigmoid
                    status = "cpu-smoke (exp differs from torch's CPU sigmoid in last bits): " + status
                if provider == "compile" and status != "ok":
                    status = "differs (inductor's own division/exp lowering; timed anyway): " + status[:60]
            ms, lo, hi = C.bench(fn, rep=self.args.rep)
        except Exception as exc:  # a provider that cannot run is skipped with a note, not an error
            if self.args.verbose:
                traceback.print_exc()
            print(f"[note] {provider} at M={M} I={I} skipped: {type(exc).__name__}: {str(exc)[:200]}")
            return float("nan"), float("nan"), float("nan")
        finally:
            C.free_cuda()
        gb = C.gbps(nb, ms)
        self.log.add(shape=f"{M}x{I}", M=M, I=I, provider=provider, ms=ms, ms_p20=lo, ms_p80=hi, gbps=gb,
                     pct_copy=100 * gb / self.copy_gbps, mbytes=nb / 1e6, status=status,
                     config=os.environ.get("FP8_DEEP_SWIGLU_BWD_CONFIG", "default"))
        print(f"M={M} I={I} {provider}: {ms * 1e3:.1f} us {gb:.0f} GB/s {status}", flush=True)
        return ms, hi, lo

    def marks(self):
        import triton.testing as tt
        shapes = self.args.shapes
        bench = tt.Benchmark(x_names=["case"], x_vals=list(range(len(shapes))), line_arg="provider",
                             line_vals=self.providers, line_names=self.providers, ylabel="ms",
                             plot_name="swiglu_backward_ms", args={})

        @tt.perf_report(bench)
        def run(provider, case):
            M, I = shapes[case]
            return self.run_one(M, I, provider)

        return run

    def finish(self):
        rows = [r for r in self.log.rows if "ms" in r]
        copy = {r["shape"]: r["ms"] for r in rows if r["provider"] == "copy_sm"}
        comp = {r["shape"]: r["ms"] for r in rows if r["provider"] == "compile"}
        for r in rows:
            c = copy.get(r["shape"])
            r["pct_same_copy"] = 100 * c / r["ms"] if c else float("nan")
            c = comp.get(r["shape"])
            r["x_compile"] = c / r["ms"] if c else float("nan")
        self.log.flush()
        print()
        C.print_table(rows, ["shape", "provider", "ms", "gbps", "pct_copy", "pct_same_copy", "x_compile", "status"],
                      title=f"swiglu_backward ({C.card_name()}, 2 GiB copy {self.copy_gbps:.0f} GB/s; pct_same_copy: "
                            f"% of an SM copy of the same bytes; x_compile > 1 = faster than torch.compile)",
                      prefix="SUMMARY swiglu_bwd")
        print(f"[done] {len(rows)} timings in {self.budget.elapsed():.0f} s -> {self.log.path}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(f"{m}x{i}" for m, i in SHAPES),
                   help="comma list of MxI (M rows of the plan, I the expert width)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {PROVIDERS}")
    p.add_argument("--rep", type=int, default=100, help="do_bench rep time in ms")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; shapes left after it are skipped")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="no GPU: the plumbing on tiny CPU shapes through the interpreter (times nothing meaningful)")
    a = p.parse_args(argv)
    a.shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",") if s.strip()]
    a.providers = [s.strip() for s in a.providers.split(",") if s.strip()]
    unknown = set(a.providers) - set(PROVIDERS)
    if unknown:
        p.error(f"unknown providers {sorted(unknown)}; known: {PROVIDERS}")
    if a.cpu_smoke:
        a.shapes = [(256, 128), (256, 192)]
        a.providers = [pr for pr in a.providers if pr != "compile"]
    return a


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("bench_swiglu_backward needs a CUDA GPU (bench/gpu_check.sh runs it there); --cpu-smoke for a dry run")
        return 0
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before fp8_deep / triton are imported
    print(C.env_line())
    b = SwigluBwdBench(args)
    print(f"copy bandwidth (2 GiB bf16, read+write): {b.copy_gbps:.0f} GB/s")
    return C.run_bench(b)


if __name__ == "__main__":
    sys.exit(main())
