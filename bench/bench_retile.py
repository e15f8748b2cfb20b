"""Re-tiling benchmark: ``quantize_activation_t`` (1x128 FP8 -> 128x1 FP8, transposed) against torch.compile and the
copy ceiling.

The MoE backward's wgrad GEMM reads the cached FP8 activation re-tiled: ``x`` (M, C) with 1x128 row scales is
dequantized and quantized again in 128x1 tiles, stored transposed as ``q_t`` (C, M) with MN-major (TMA-aligned)
scales ``s_t`` (C, M/128). Memory-bound: the kernel must run at the rate of a copy of the same bytes.

Providers (each validated once before it is timed):
  fp8_deep      ``fp8_deep.ops.transpose_quant.quantize_activation_t`` (default tile); bit-exact against
                ``fp8_deep.reference.quantize_activation_t`` and ``s_t`` strides (1, align(C, 4)) checked (a mismatch
                is reported in the ``check`` column; the timing still runs).
  v_cNwW        the same kernel with the tile pinned (``FP8_DEEP_RETILE_CONFIG="N,W"``: N columns, W warps), validated
                like the default: the tuning sweep.
  compile       ``torch.compile`` of a compact torch reference (contiguous, 128-divisible shapes, scales written
                MN-major as ours): the fair baseline; x_compile is measured against it. Its output is compared with
                the reference (a mismatch is reported, not fatal: inductor lowers ``/`` to an approximate division).
  compile_spec  ``torch.compile`` of ``fp8_deep.reference.quantize_activation_t`` itself (row-major scales; not in
                the default list: its compiles are slow).
  copy          a device copy (memcpy) moving the same bytes (read + write).
  copy_sm       the same bytes through an SM kernel (bf16 negation): the ceiling pct_same_copy is taken against.
``torch._dynamo.reset()`` runs before every compiled provider of every shape (one static compile per shape).

Metrics: ms (median of ``do_bench``, L2 flushed), GB/s of the op's minimal traffic (read ``x`` (+ its scales) once,
write ``q_t`` and ``s_t`` once), pct_copy (% of the measured 2 GiB copy rate), pct_same_copy (% of copy_sm's rate on
the same bytes, timed the same way), x_compile (compile ms / ours: > 1 = faster than torch.compile), x_spec (the same
against compile_spec). Targets on an H100: pct_same_copy >= 90, x_compile >= 1.0.

    python bench/bench_retile.py                    # FP8-in (TMA-aligned input scales) and bf16-in, ~2 min
    python bench/bench_retile.py --only fp8_tma,fp8_row,bf16 --providers all --time-budget 0   # everything
    python bench/bench_retile.py --only fp8_tma --providers fp8_deep,compile,copy_sm
    python bench/bench_retile.py --quick            # FP8-in with TMA-aligned input scales, default tile only
    python bench/bench_retile.py --cpu-smoke        # no GPU: the plumbing on tiny shapes (interpreter), no timings
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py when run as a script

import torch  # noqa: E402

import _common as C  # noqa: E402

# (M, C): DeepSeek-V3 hidden 7168 at 8192 and 32768 expert rows, then the 4096 / 2048 widths (the expert's 2I / I)
FP8_SHAPES = [(8192, 7168), (32768, 7168), (32768, 4096), (16384, 2048)]
BF16_SHAPES = [(32768, 7168)]
# groups: the input, and for FP8 the layout of its 1x128 scales (the forward quantizer writes either)
GROUPS = ["fp8_tma", "fp8_row", "bf16"]
DEFAULT_GROUPS = ["fp8_tma", "bf16"]
# tile variants of our kernel, FP8_DEEP_RETILE_CONFIG = "BLOCK_C,num_warps" (default 64,4; 32,4 for float32)
VARIANTS = {f"v_c{c}w{w}": {"FP8_DEEP_RETILE_CONFIG": f"{c},{w}"}
            for c, w in ((32, 2), (32, 4), (64, 2), (64, 8), (128, 4), (128, 8))}
PROVIDERS = ["fp8_deep", *VARIANTS, "compile", "compile_spec", "copy", "copy_sm"]
# the default run fits gpu_check.sh's "retile" stage (150 s): one compile per shape, the likeliest tiles
DEFAULT_PROVIDERS = ["fp8_deep", "v_c32w4", "v_c64w8", "v_c128w4", "v_c128w8", "compile", "copy", "copy_sm"]
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)


# --------------------------------------------------------------------------------- compact reference (compiled)
def retile_ref_fast(x: torch.Tensor, x_scale=None):
    """The re-tiling in plain torch for contiguous (M, C), M and C multiples of 128: dequantize with the 1x128 row
    scales, amax over 128 rows per column, ``x / s`` clamped, cast; ``s_t`` (C, G) with strides (1, C), the
    MN-major layout ours writes when C % 4 == 0."""
    M, Cc = x.shape
    xf = x.float()
    if x_scale is not None:
        xf = (xf.view(M, Cc // 128, 128) * x_scale[:, :, None]).view(M, Cc)
    xg = xf.view(M // 128, 128, Cc)
    amax = xg.abs().amax(dim=1, keepdim=True).clamp(min=1e-10)
    s = amax / FP8_MAX
    q = (xg / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(M, Cc).t().contiguous(), s.view(M // 128, Cc).t()


def retile_nbytes(M: int, Cc: int, in_bytes: int) -> int:
    """Minimal traffic: read x (and its 1x128 scales when FP8), write q_t and its 128x1 scales."""
    in_scales = M * (Cc // 128) * 4 if in_bytes == 1 else 0
    return M * Cc * in_bytes + in_scales + M * Cc + Cc * (-(-M // 128)) * 4


def same_bits(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of differing elements (bitwise); -1 on shape/dtype mismatch."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return -1
    view = {1: torch.uint8, 4: torch.int32}[a.element_size()]
    return int((a.contiguous().view(view) != b.contiguous().view(view)).sum())


def compare(outs, refs, scale_strides=None) -> str:
    bad = []
    for name, o, r in zip(("q_t", "s_t"), outs, refs):
        n = same_bits(o, r)
        if n:
            bad.append(f"{name}:{'shape/dtype' if n < 0 else f'{n} elems differ'}")
    if scale_strides is not None and tuple(outs[1].stride()) != tuple(scale_strides):
        bad.append(f"s_t strides {tuple(outs[1].stride())} != {tuple(scale_strides)}")
    return "bit-exact" if not bad else "MISMATCH " + ", ".join(bad)


# --------------------------------------------------------------------------------- the benchmark
class RetileBench:
    def __init__(self, args):
        self.args = args
        self.providers = [p for p in PROVIDERS if p in args.providers]
        self.copy_gbps = C.copy_bandwidth()
        self.out_dir = C.results_dir()
        self.log = C.CsvLog(self.out_dir / "retile.csv")
        self.budget = C.Budget(args.time_budget)
        self._case_key, self._case = None, None
        from fp8_deep import ops, reference
        from fp8_deep.numerics import align
        from fp8_deep.ops.transpose_quant import quantize_activation_t
        self.ops, self.reference, self.align, self.ours = ops, reference, align, quantize_activation_t

    def case(self, group, shape):
        """Inputs of one (group, shape), built once and kept while its providers run."""
        key = (group, shape)
        if self._case_key != key:
            self._case = None
            C.free_cuda()
            M, Cc = shape
            x = C.randn(shape, seed=3)
            xs = None
            if group.startswith("fp8"):
                layout = "tma_aligned" if group == "fp8_tma" else "row_major"
                x, xs = self.ops.quantize_activation(x, scale_layout=layout, backend="triton")
            self._case = dict(x=x, xs=xs, nbytes=retile_nbytes(M, Cc, x.element_size()), ref=None)
            self._case_key = key
        return self._case

    def reference_of(self, cs):
        if cs["ref"] is None:
            cs["ref"] = self.reference.quantize_activation_t(cs["x"], cs["xs"])
        return cs["ref"]

    def provider_fn(self, group, shape, provider):
        """(callable, validation status) of one provider on one case; run inside the provider's environment."""
        cs = self.case(group, shape)
        x, xs = cs["x"], cs["xs"]
        if provider == "fp8_deep" or provider in VARIANTS:
            fn = lambda: self.ours(x, xs)  # noqa: E731
            strides = (1, self.align(shape[1], 4))
            return fn, compare(fn(), self.reference_of(cs), strides)
        if provider in ("compile", "compile_spec"):
            torch._dynamo.reset()  # one static compile per shape, nothing carried over from the previous one
            comp = torch.compile(retile_ref_fast if provider == "compile" else self.reference.quantize_activation_t)
            fn = lambda: comp(x, xs)  # noqa: E731
            return fn, compare(fn(), self.reference_of(cs))
        if provider == "copy_sm":
            return C.copy_of_bytes(cs["nbytes"], sm_kernel=True), "ceiling (SM kernel)"
        return C.copy_of_bytes(cs["nbytes"]), "ceiling (memcpy)"

    def run_one(self, group, shape, provider):
        label = "x".join(map(str, shape))
        nan3 = float("nan"), float("nan"), float("nan")
        if self.budget.spent(reserve=5):
            print(f"[skip] {group} {label} {provider}: time budget spent")
            return nan3
        nbytes = self.case(group, shape)["nbytes"]
        with C.environ(VARIANTS.get(provider, {})):
            try:
                fn, valid = self.provider_fn(group, shape, provider)
                C.free_cuda()
                ms, lo, hi = C.bench(fn, rep=self.args.rep)
            except Exception as exc:
                print(f"[error] {group} {label} {provider}: {exc!r}")
                if self.args.verbose:
                    traceback.print_exc()
                self.log.add(group=group, shape=label, provider=provider, status=f"error: {type(exc).__name__}")
                return nan3
        g = C.gbps(nbytes, ms)
        self.log.add(group=group, shape=label, provider=provider, ms=ms, ms_p20=lo, ms_p80=hi, nbytes=nbytes, gbps=g,
                     pct_copy=100 * g / self.copy_gbps, copy_gbps=self.copy_gbps, status=valid)
        print(f"  {group:8s} {label:>11s} {provider:13s} {ms:8.4f} ms {g:7.0f} GB/s {100 * g / self.copy_gbps:5.1f}% "
              f"of copy  [{valid}]", flush=True)
        return ms, lo, hi

    def marks(self):
        import triton.testing as tt
        benches = []
        for group in self.args.only:
            shapes = self.args.bf16_shapes if group == "bf16" else self.args.fp8_shapes
            benches.append(tt.Benchmark(
                x_names=["case"], x_vals=list(range(len(shapes))), line_arg="provider", line_vals=self.providers,
                line_names=self.providers, ylabel="ms", plot_name=f"retile_{group}_ms",
                args={"group": group, "shapes": shapes}))

        @tt.perf_report(benches)
        def run(provider, group, shapes, case):
            return self.run_one(group, shapes[case], provider)

        return run

    def finish(self):
        rows = [r for r in self.log.rows if "ms" in r]

        def by(provider):
            return {(r["group"], r["shape"]): r["ms"] for r in rows if r["provider"] == provider}

        comp, spec, copy_sm, copy = by("compile"), by("compile_spec"), by("copy_sm"), by("copy")
        for r in rows:
            key = (r["group"], r["shape"])
            r["x_compile"] = comp[key] / r["ms"] if key in comp else float("nan")
            r["x_spec"] = spec[key] / r["ms"] if key in spec else float("nan")
            # against a copy of the same bytes timed the same way (same L2 state, launch cost and size regime)
            r["pct_same_copy"] = 100 * copy_sm[key] / r["ms"] if key in copy_sm else float("nan")
            r["pct_same_memcpy"] = 100 * copy[key] / r["ms"] if key in copy else float("nan")
        self.log.flush()
        for group in self.args.only:
            shapes = self.args.bf16_shapes if group == "bf16" else self.args.fp8_shapes
            labels = ["x".join(map(str, s)) for s in shapes]
            series = {p: [next((r["gbps"] for r in rows if r["group"] == group and r["shape"] == lab
                                and r["provider"] == p), float("nan")) for lab in labels] for p in self.providers}
            C.plot(self.out_dir / f"retile_{group}_gbps.png", series, list(range(len(shapes))), xlabel="(M, C)",
                   ylabel="GB/s (minimal traffic)", title=f"re-tiling {group}: copy {self.copy_gbps:.0f} GB/s",
                   xticklabels=labels)
        print()
        cols = ["group", "shape", "provider", "ms", "gbps", "pct_copy", "pct_same_copy", "pct_same_memcpy",
                "x_compile", "x_spec", "status"]
        C.print_table(rows, cols, title=f"retile ({C.card_name()}, copy {self.copy_gbps:.0f} GB/s; pct_same_copy: % "
                                        f"of an SM copy of the same bytes; x_compile > 1 = faster than torch.compile)",
                      prefix="SUMMARY retile")
        print(f"[done] {len(rows)} timings in {self.budget.elapsed():.0f} s -> {self.log.path}")


def _shapes(text):
    return [tuple(int(d) for d in s.split("x")) for s in text.split(";") if s.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(DEFAULT_GROUPS),
                   help="comma list of groups: fp8_tma (FP8 in, TMA-aligned input scales), fp8_row (row-major input "
                        "scales), bf16 (bf16 in)")
    p.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS), help=f"comma list of {PROVIDERS}, or 'all'")
    p.add_argument("--fp8-shapes", default=";".join("x".join(map(str, s)) for s in FP8_SHAPES),
                   help="';'-separated MxC shapes of the FP8 groups (M, C multiples of 128 for the compiled baseline)")
    p.add_argument("--bf16-shapes", default=";".join("x".join(map(str, s)) for s in BF16_SHAPES),
                   help="';'-separated MxC shapes of the bf16 group")
    p.add_argument("--rep", type=int, default=100, help="do_bench rep time in ms")
    p.add_argument("--time-budget", type=float, default=135,
                   help="seconds (default 135: the SUMMARY still prints inside gpu_check.sh's 150 s stage); cases "
                        "left after it are skipped; 0 = no budget")
    p.add_argument("--quick", action="store_true", help="fp8_tma only; fp8_deep, compile, copy_sm")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="no GPU: run the plumbing on tiny CPU shapes through the interpreter (no compiled providers)")
    a = p.parse_args(argv)
    a.only = [s.strip() for s in a.only.split(",") if s.strip()]
    a.providers = (list(PROVIDERS) if a.providers.strip() == "all"
                   else [s.strip() for s in a.providers.split(",") if s.strip()])
    for g in a.only:
        if g not in GROUPS:
            p.error(f"--only: unknown group {g!r}; known: {GROUPS}")
    for prov in a.providers:
        if prov not in PROVIDERS:
            p.error(f"--providers: unknown provider {prov!r}; known: {PROVIDERS}")
    a.fp8_shapes, a.bf16_shapes = _shapes(a.fp8_shapes), _shapes(a.bf16_shapes)
    if a.quick:
        a.only = ["fp8_tma"]
        a.providers = ["fp8_deep", "compile", "copy_sm"]
    if a.cpu_smoke:
        import os
        os.environ.setdefault("TRITON_INTERPRET", "1")
        a.fp8_shapes, a.bf16_shapes = [(256, 384), (384, 128)], [(256, 256)]
        a.providers = [prov for prov in a.providers if not prov.startswith("compile")]
    for s in a.fp8_shapes + a.bf16_shapes:
        if len(s) != 2 or s[0] % 128 or s[1] % 128:
            p.error(f"shape {s}: MxC with M and C multiples of 128 (the compiled baseline's reshapes)")
    return a


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("bench_retile needs a CUDA GPU (run it on the GPU machine: bench/gpu_check.sh); --cpu-smoke: a dry run")
        return 0
    print(C.env_line())
    rb = RetileBench(args)
    print(f"copy bandwidth (2 GiB bf16, read+write): {rb.copy_gbps:.0f} GB/s")
    return C.run_bench(rb)


if __name__ == "__main__":
    sys.exit(main())
