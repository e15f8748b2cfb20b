"""Quantization benchmark (issue 2, item 10): fp8_deep's kernels against plain torch, torch.compile and the copy ceiling.

Providers (each validated once before it is timed):
  fp8_deep  ``fp8_deep.ops.quantize_weight_blockwise`` / ``quantize_activation(backend="triton")``; bit-exact
            against ``fp8_deep.reference`` (fatal mismatch is reported, the timing still runs).
  torch     the pure-torch reference ``fp8_deep.reference`` (slow; timed on the first shape of each group only).
  compile   ``torch.compile`` of a compact torch reference for contiguous, 128-divisible shapes in DeepGEMM's
            ``per_block_cast_to_fp8`` style -- the fair baseline (ANCHORS.md). Its eager form is checked bit-exact
            against ours first; the compiled output is checked too (a mismatch is reported, not fatal: inductor may
            lower a division differently).
  copy      a device copy moving the same bytes (read + write): the ceiling.
  copy_sm   the same bytes through an SM kernel (bf16 negation): the ceiling in CUDA-graph timings (--graph,
            --rotate), where a captured ``copy_`` becomes a memcpy node that ran at ~80% of the copy rate.
  compile_aa  the same compiled baseline timed a second time, first in forward rounds and last in reversed ones (not
            in the default list): an A/A control, the ratio a provider identical to compile gets, i.e. the
            resolution of the paired ratios.

Metrics: ms (median), GB/s of the op's minimal traffic (read input once, write outputs once), % of the measured
2 GiB copy bandwidth (pct_copy), % of the rate of a copy of the same bytes timed the same way (pct_same_copy: the
faster of ``copy`` and ``copy_sm`` when both ran; below ~100 MB a copy itself falls short of the 2 GiB rate after
do_bench's L2 flush), and speed ratio to ``compile`` (>1 = faster than torch.compile).

    python bench/bench_quant.py                 # everything (~2 min on an H100)
    python bench/bench_quant.py --only act --act-m 4096,32768 --no-torch
    python bench/bench_quant.py --rounds 6 --no-torch   # interleaved rounds: medians and paired x compile ranges
    python bench/bench_quant.py --rounds 6 --rotate --providers fp8_deep,compile,compile_aa,copy_sm
        # --rotate: CUDA-graph replays cycling through input sets that together overflow L2 (cold inputs, no flush)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py when run as a script

import torch  # noqa: E402

import _common as C  # noqa: E402

# the DeepSeek-V3 expert stacks and a dense weight (issue 2), then one expert matrix and an 8-expert shard: the
# one-layout kernel changes between 8 and 32 experts (the tile kernel below ops.quant.STACK_WEIGHT_BLOCKS, the
# stack kernel from there on)
WEIGHT_SHAPES = [(32, 4096, 7168), (32, 7168, 2048), (7168, 18432), (4096, 7168), (8, 4096, 7168)]
ACT_M = [128, 512, 2048, 4096, 8192, 16384, 32768]
ACT_K = 7168  # DeepSeek-V3 hidden size
# exploration variants of our kernels, selected through the launchers' environment switches (bit-exactness is
# checked for each like for the default): (applies to "weight" / "act" groups, environment)
VARIANTS = {
    # the tile weight kernel, FP8_DEEP_WEIGHT_QUANT_CONFIG = "TCHUNK,num_warps[,BLOCKS_K]" (its one-layout default
    # 32,8,2 from 16384 scale blocks on, 32,16,1 below; 64,16 with the transposed copy). Pinning a configuration also
    # turns off the stack kernel, the default for contiguous one-layout stacks from 16384 blocks on: w_k2 is the
    # tile kernel those stacks ran before run 2d7c020
    "w_k2": ("weight_one", {"FP8_DEEP_WEIGHT_QUANT_CONFIG": "32,8,2"}),
    "w_w16": ("weight", {"FP8_DEEP_WEIGHT_QUANT_CONFIG": "32,16"}),
    "w_k1": ("weight_one", {"FP8_DEEP_WEIGHT_QUANT_CONFIG": "32,8,1"}),  # one scale block per program (run be1830c)
    "w_k2w16": ("weight_one", {"FP8_DEEP_WEIGHT_QUANT_CONFIG": "32,16,2"}),
    "w_k1w16": ("weight_one", {"FP8_DEEP_WEIGHT_QUANT_CONFIG": "32,16,1"}),  # the default below 16384 blocks
    "w_k4w16": ("weight_one", {"FP8_DEEP_WEIGHT_QUANT_CONFIG": "32,16,4"}),
    # L2 policies of the weight kernel's load / stores / transposed re-read, FP8_DEEP_WEIGHT_QUANT_HINTS (a preset
    # name; default el with one layout, el_rf with the transposed copy)
    "w_el_sf": ("weight_one", {"FP8_DEEP_WEIGHT_QUANT_HINTS": "el_sf"}),
    "w_none": ("weight", {"FP8_DEEP_WEIGHT_QUANT_HINTS": "none"}),
    "w_c64": ("weight_both", {"FP8_DEEP_WEIGHT_QUANT_CONFIG": "64,8"}),
    "w_fold": ("weight", {"FP8_DEEP_QUANT_PLAIN": "nan_max"}),  # NaN folded into Inf + plain max (3 ops, not 1)
    "w_sel": ("weight", {"FP8_DEEP_QUANT_PLAIN": "nan_select"}),  # per-element NaN select (the interpreter's code)
    # activation kernel, FP8_DEEP_ACT_QUANT_CONFIG = "BLOCK_M,GROUPS_PER_PROG,num_warps" (tile) or
    # "flat,BLOCK_G,num_warps" (BLOCK_G consecutive groups per program)
    "a_rn": ("act", {"FP8_DEEP_QUANT_PLAIN": "div"}),  # IEEE division per element instead of reciprocal + FMA fix
    "a_sel": ("act", {"FP8_DEEP_QUANT_PLAIN": "nan_select"}),  # per-element NaN select (the interpreter's code)
    "a_t32": ("act", {"FP8_DEEP_ACT_QUANT_CONFIG": "32,2,4"}),  # the (32 rows, 2 groups) tile, the old default
    # the flat kernel's scale stores without an L2 hint (the default before run 055c4f4: evict_last since)
    "a_snone": ("act", {"FP8_DEEP_ACT_SCALE_EVICT": "none"}),
    # tiles whose column-major (TMA-aligned) scale stores fill whole 32-byte sectors (8 rows) or half ones (4 rows)
    **{f"a_t{bm}g{gp}": ("act", {"FP8_DEEP_ACT_QUANT_CONFIG": f"{bm},{gp},4"}) for bm, gp in ((8, 8), (4, 16), (8, 4))},
    **{f"a_f{bg}w{nw}": ("act", {"FP8_DEEP_ACT_QUANT_CONFIG": f"flat,{bg},{nw}"})
       for bg, nw in ((8, 2), (32, 4), (64, 4))},
}
VARIANT_ENV = {name: env for name, (_, env) in VARIANTS.items()}
PROVIDERS = ["compile_aa", "fp8_deep", *VARIANTS, "torch", "compile", "copy", "copy_sm"]
DEFAULT_PROVIDERS = [p for p in PROVIDERS if p != "compile_aa"]
COLD_L2_MULTIPLE = 4  # --rotate: a set's input is cold once this many L2s of other traffic have passed since its use
MAX_ROTATE_SETS = 512
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)


# --------------------------------------------------------------------------------- compact references (compiled)
def weight_ref_fast(w: torch.Tensor):
    """DeepGEMM-style ``per_block_cast_to_fp8`` for contiguous (..., N, K) with N, K multiples of 128."""
    *lead, N, K = w.shape
    x = w.reshape(-1, N // 128, 128, K // 128, 128).float()
    amax = x.abs().amax(dim=(2, 4), keepdim=True).clamp(min=1e-4)
    s = amax / FP8_MAX
    q = (x * (1.0 / s)).to(FP8)
    return q.reshape(*lead, N, K), s.reshape(*lead, N // 128, K // 128)


def weight_ref_fast_both(w: torch.Tensor):
    q, s = weight_ref_fast(w)
    return q, s, q.transpose(-1, -2).contiguous(), s.transpose(-1, -2).contiguous()


def act_ref_fast(x: torch.Tensor):
    """vLLM ``per_token_group_quant_fp8`` math for contiguous (M, K), K a multiple of 128; row-major scales."""
    M, K = x.shape
    xg = x.reshape(M, K // 128, 128).float()
    amax = xg.abs().amax(dim=2, keepdim=True).clamp(min=1e-10)
    s = amax / FP8_MAX
    q = (xg / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(M, K), s.reshape(M, K // 128)


def act_ref_fast_tma(x: torch.Tensor):
    """Same, scales written MN-major TMA-aligned: (M, G) with strides (1, align(M, 4))."""
    q, s = act_ref_fast(x)
    M, G = s.shape
    Ma = (M + 3) // 4 * 4
    st = torch.empty(G, Ma, dtype=torch.float32, device=x.device)
    st[:, :M] = s.t()
    return q, st.t()[:M]


# --------------------------------------------------------------------------------- checks
def act_nbytes(numel: int) -> int:
    """An activation quantizer's minimal traffic for ``numel`` bf16 inputs: read them, write FP8 and one float32
    scale per 128."""
    return numel * 3 + (numel // 128) * 4


def same_bits(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of differing elements (bitwise); -1 on shape/dtype mismatch."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return -1
    view = {1: torch.uint8, 4: torch.int32}[a.element_size()]
    return int((a.contiguous().view(view) != b.contiguous().view(view)).sum())


def compare(outs, refs, strides=None) -> str:
    bad = []
    for i, (o, r) in enumerate(zip(outs, refs)):
        n = same_bits(o, r)
        if n != 0:
            bad.append(f"out{i}:{'shape/dtype' if n < 0 else f'{n} elems differ'}")
    if strides is not None and tuple(outs[1].stride()) != tuple(strides):
        bad.append(f"scale strides {tuple(outs[1].stride())} != {tuple(strides)}")
    return "bit-exact" if not bad else "MISMATCH " + ", ".join(bad)


def paired_ratios(base, times):
    """Sorted ratios base_r / times_r, rounds (2j, 2j+1) combined by their geometric mean: round 2j ran the providers
    in forward order and round 2j+1 in reverse, so a bias of position linear in it cancels (--rounds is even)."""
    r = [b / t for b, t in zip(base, times)]
    return sorted((r[i] * r[i + 1]) ** 0.5 for i in range(0, len(r) - 1, 2))


# --------------------------------------------------------------------------------- the benchmark
class QuantBench:
    def __init__(self, args):
        self.args = args
        self.providers = [p for p in PROVIDERS if p in args.providers]
        self.copy_gbps = C.copy_bandwidth()
        self.out_dir = C.results_dir()
        # how the timings were taken, in every file name: do_bench (L2 flushed), graph replays, rotated input sets
        self.mode = "_rotate" if args.rotate else "_graph" if args.graph else "_cleanflush" if args.clean_flush else ""
        self.mode += "_rounds" if args.rounds > 1 else ""
        self.log = C.CsvLog(self.out_dir / f"quant{self.mode}.csv")
        self.budget = C.Budget(args.time_budget)
        self.compiled = {}
        self.validated = set()
        try:
            from fp8_deep import ops, reference
            self.ops, self.reference = ops, reference
        except Exception as exc:  # the package is mid-change: report, keep the baselines running
            print(f"[note] fp8_deep not importable ({exc!r}): provider fp8_deep skipped")
            self.ops = None
            from fp8_deep import reference
            self.reference = reference

    # ---- one case = (group, shape): a callable per provider, the bytes it must move, the validation
    def _compile(self, key, fn):
        if key not in self.compiled:
            for name in ("cache_size_limit", "recompile_limit"):  # one static compile per shape of each group
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
            self.compiled[key] = torch.compile(fn, dynamic=self.args.compile_dynamic)
        return self.compiled[key]

    def cases(self, group, shape):
        """The case, or with ``--rotate`` as many independent input sets as push COLD_L2_MULTIPLE x L2 of other
        traffic between two uses of one set (a warning says when MAX_ROTATE_SETS falls short of that)."""
        first = self.case(group, shape)
        if not self.args.rotate:
            return [first]
        if not torch.cuda.is_available():  # --cpu-smoke: two sets exercise the plumbing
            return [first, self.case(group, shape, index=1)]
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        want = 1 + -(-COLD_L2_MULTIPLE * l2 // first["nbytes"])
        n = min(MAX_ROTATE_SETS, want)
        if n < want:
            print(f"[warn] --rotate {group} {shape}: {n} input sets push {(n - 1) * first['nbytes'] / l2:.1f} L2s "
                  f"between uses, not {COLD_L2_MULTIPLE}")
        return [first] + [self.case(group, shape, index=i) for i in range(1, n)]

    def case(self, group, shape, index=0):
        a = self.args
        if group.startswith("weight"):
            both = group == "weight_both"
            w = C.randn(shape, seed=1 + 100 * index, std=0.02)
            numel = w.numel()
            nblk = numel // (128 * 128)
            nbytes = numel * 2 + numel * (2 if both else 1) + nblk * 4 * (2 if both else 1)
            ops = self.ops

            def ours():
                return ops.quantize_weight_blockwise(w, with_transpose=both)

            def plain():
                q, s = self.reference.quantize_weight_blockwise(w)
                if both:
                    return q, s, q.transpose(-1, -2).contiguous(), s.transpose(-1, -2).contiguous()
                return q, s

            fast = weight_ref_fast_both if both else weight_ref_fast
            comp = self._compile((group, "dyn" if a.compile_dynamic else shape), fast)
            return dict(x=w, numel=numel, nbytes=nbytes, ours=ours if ops else None, plain=plain, fast=fast,
                        comp=lambda: comp(w), scale_strides=None)
        tma = group == "act_tma"
        M = shape[0]
        x = C.randn((M, ACT_K), seed=2 + 100 * index)
        numel = x.numel()
        nbytes = act_nbytes(numel)
        ops = self.ops
        layout = "tma_aligned" if tma else "row_major"

        def ours():
            return ops.quantize_activation(x, scale_layout=layout, backend="triton")

        def plain():
            q, s = self.reference.quantize_activation(x)
            if tma:
                st = torch.empty(s.shape[1], (M + 3) // 4 * 4, dtype=torch.float32, device=x.device)
                st[:, :M] = s.t()
                s = st.t()[:M]
            return q, s

        fast = act_ref_fast_tma if tma else act_ref_fast
        comp = self._compile((group, "dyn" if a.compile_dynamic else shape), fast)
        strides = (1, (M + 3) // 4 * 4) if tma else (ACT_K // 128, 1)
        return dict(x=x, numel=numel, nbytes=nbytes, ours=ours if ops else None, plain=plain, fast=fast,
                    comp=lambda: comp(x), scale_strides=strides)

    def run_one(self, group, shape, provider):
        label = "x".join(map(str, shape))
        if self.budget.spent(reserve=5):
            print(f"[skip] {group} {label} {provider}: time budget spent")
            return float("nan"), float("nan"), float("nan")
        if not self._applies(group, shape, provider):
            return float("nan"), float("nan"), float("nan")
        cases = self.cases(group, shape)
        nbytes = cases[0]["nbytes"]
        with C.environ(VARIANT_ENV.get(provider, {})):
            try:
                fn, valid = self._timed_fn(cases, group, label, provider)
                if fn is None:
                    return float("nan"), float("nan"), float("nan")
                C.free_cuda()
                ms, lo, hi = self._time(fn, len(cases))
            except Exception as exc:
                print(f"[error] {group} {label} {provider}: {exc!r}")
                if self.args.verbose:
                    traceback.print_exc()
                self.log.add(group=group, shape=label, provider=provider, status=f"error: {type(exc).__name__}")
                return float("nan"), float("nan"), float("nan")
            finally:
                del cases
                C.free_cuda()
        g = C.gbps(nbytes, ms)
        self.log.add(group=group, shape=label, provider=provider, ms=ms, ms_p20=lo, ms_p80=hi, gbps=g,
                     pct_copy=100 * g / self.copy_gbps, copy_gbps=self.copy_gbps, status=valid)
        print(f"  {group:12s} {label:>16s} {provider:10s} {ms:8.4f} ms {g:7.0f} GB/s {100 * g / self.copy_gbps:5.1f}% "
              f"of copy  [{valid}]", flush=True)
        return ms, lo, hi

    def _time(self, fn, n_sets):
        """[median, p20, p80] ms per call; ``--rotate``: graph replays of one call per input set, divided by them."""
        a = self.args
        return [t / n_sets for t in C.bench(fn, rep=a.rep, graph=a.graph or a.rotate, clean_flush=a.clean_flush)]

    def _timed_fn(self, cases, group, label, provider):
        """(callable, validation status): the provider on one case, or on every input set in turn (validated on
        the first)."""
        fn, valid = self._provider_fn(cases[0], group, label, provider)
        if fn is None or len(cases) == 1:
            return fn, valid
        fns = [fn] + [self._provider_fn(cs, group, label, provider, check=False)[0] for cs in cases[1:]]
        return (lambda: [f() for f in fns]), valid

    def _applies(self, group, shape, provider):
        if provider in VARIANTS and not group.startswith(VARIANTS[provider][0]):
            return False
        return provider != "torch" or self.args.torch_all or shape in self.torch_shapes[group]

    def _provider_fn(self, cs, group, label, provider, check=True):
        """(callable, validation status) of one provider on one case; run inside the provider's environment."""
        if provider in ("fp8_deep", *VARIANT_ENV):
            if cs["ours"] is None:
                return None, ""
            if not check:
                return cs["ours"], ""
            ref = cs["plain"]()
            valid = compare(cs["ours"](), ref, cs["scale_strides"])
            # the compact reference (what gets compiled) must compute the same bytes as ours
            fast_check = compare(cs["fast"](cs["x"]), ref, cs["scale_strides"])
            if fast_check != "bit-exact":
                print(f"[warn] compact torch reference differs from fp8_deep.reference on {group} {label}: "
                      f"{fast_check}")
            return cs["ours"], valid
        if provider == "torch":
            return cs["plain"], "reference"
        if provider in ("compile", "compile_aa"):
            if not check:
                return cs["comp"], ""
            return cs["comp"], compare(cs["comp"](), cs["plain"](), cs["scale_strides"])
        if provider == "copy_sm":
            return C.copy_of_bytes(cs["nbytes"], sm_kernel=True), "ceiling (SM kernel)"
        return C.copy_of_bytes(cs["nbytes"]), "ceiling"

    def run_rounds(self, groups):
        """``--rounds R``: per case, every provider timed once per round, the rounds interleaved, the provider
        order reversed every other round, so that drift in clocks or memory temperature and the position in a round
        hit all providers alike. Reports the median time and the paired ratio to torch.compile: each round's
        compile_r / provider_r, a forward round and the reversed one after it combined by their geometric mean
        (which cancels a bias of position), median [min, max] over those pairs."""
        R = self.args.rounds
        for group, shapes in groups:
            for shape in shapes:
                label = "x".join(map(str, shape))
                if self.budget.spent(reserve=5):
                    print(f"[skip] {group} {label}: time budget spent")
                    continue
                cases = self.cases(group, shape)
                fns, times = {}, {}
                for p in (p for p in self.providers if self._applies(group, shape, p)):
                    with C.environ(VARIANT_ENV.get(p, {})):
                        try:
                            fn, valid = self._timed_fn(cases, group, label, p)
                        except Exception as exc:
                            print(f"[error] {group} {label} {p}: {exc!r}")
                            continue
                    if fn is not None:
                        fns[p], times[p] = (fn, valid), []
                for r in range(R):
                    order = list(fns) if r % 2 == 0 else list(fns)[::-1]
                    for p in order:
                        with C.environ(VARIANT_ENV.get(p, {})):
                            C.free_cuda()
                            times[p].append(self._time(fns[p][0], len(cases))[0])
                comp = times.get("compile")
                nbytes = cases[0]["nbytes"]
                for p, (fn, valid) in fns.items():
                    ts = sorted(times[p])
                    ms = ts[len(ts) // 2]
                    ratios = paired_ratios(comp, times[p]) if comp else [float("nan")]
                    x_med = statistics.median(ratios)
                    g = C.gbps(nbytes, ms)
                    self.log.add(group=group, shape=label, provider=p, ms=ms, ms_p20=ts[0], ms_p80=ts[-1], gbps=g,
                                 pct_copy=100 * g / self.copy_gbps, copy_gbps=self.copy_gbps, status=valid,
                                 x_compile_paired=x_med, x_compile_min=ratios[0],
                                 x_compile_max=ratios[-1], rounds=R, input_sets=len(cases))
                    print(f"  {group:12s} {label:>16s} {p:10s} {ms:8.4f} ms (rounds {ts[0]:.4f}-{ts[-1]:.4f}) "
                          f"{100 * g / self.copy_gbps:5.1f}% of copy, x compile paired {x_med:.4f} "
                          f"[{ratios[0]:.4f}, {ratios[-1]:.4f}]  [{valid}]", flush=True)
                del cases, fns
                C.free_cuda()

    # ---- perf_report wiring
    def groups_of(self):
        a = self.args
        groups = []
        if "weight" in a.only:
            groups += [("weight_one", [tuple(s) for s in a.weight_shapes]),
                       ("weight_both", [tuple(s) for s in a.weight_shapes])]
        if "act" in a.only:
            groups += [("act_row", [(m,) for m in a.act_m]), ("act_tma", [(m,) for m in a.act_m])]
        # plain torch is slow: by default only the first shape of each group (and the largest activation)
        self.torch_shapes = {g: {shapes[0], shapes[-1]} if g.startswith("act") else {shapes[0]}
                             for g, shapes in groups}
        self.groups = groups
        return groups

    def marks(self):
        import triton.testing as tt
        groups = self.groups_of()
        benches = []
        for group, shapes in groups:
            if group.startswith("weight"):
                x_names, x_vals = ["case"], list(range(len(shapes)))
            else:
                x_names, x_vals = ["M"], [s[0] for s in shapes]
            benches.append(tt.Benchmark(
                x_names=x_names, x_vals=x_vals, line_arg="provider", line_vals=self.providers,
                line_names=self.providers, ylabel="ms", plot_name=f"quant_{group}_ms{self.mode}",
                x_log=group.startswith("act"),
                args={"group": group, "shapes": shapes}))

        @tt.perf_report(benches)
        def run(provider, group, shapes, case=None, M=None):
            shape = shapes[case] if case is not None else (M,)
            return self.run_one(group, shape, provider)

        return run

    def finish(self):
        rows = [r for r in self.log.rows if "ms" in r]
        comp = {(r["group"], r["shape"]): r["ms"] for r in rows if r["provider"] == "compile"}
        copy = {}  # the faster of the two copies of the same bytes (memcpy, SM kernel) when both ran
        for r in rows:
            if r["provider"] in ("copy", "copy_sm"):
                key = (r["group"], r["shape"])
                copy[key] = min(copy.get(key, float("inf")), r["ms"])
        for r in rows:
            c = comp.get((r["group"], r["shape"]))
            r["x_compile"] = (c / r["ms"]) if c else float("nan")
            # against a copy of the same bytes timed the same way (same L2 state, launch cost and size regime)
            c = copy.get((r["group"], r["shape"]))
            r["pct_same_copy"] = (100 * c / r["ms"]) if c else float("nan")
        self.log.flush()
        # plots: GB/s per provider, one PNG per group
        for group, shapes in self.groups:
            labels = ["x".join(map(str, s)) for s in shapes]
            series = {}
            for p in self.providers:
                by = {r["shape"]: r["gbps"] for r in rows if r["group"] == group and r["provider"] == p}
                series[p] = [by.get(l, float("nan")) for l in labels]
            xs = [s[0] for s in shapes] if group.startswith("act") else list(range(len(shapes)))
            C.plot(self.out_dir / f"quant_{group}_gbps{self.mode}.png", series, xs,
                   xlabel="M" if group.startswith("act") else "shape", ylabel="GB/s (minimal traffic)",
                   title=f"{group}: copy ceiling {self.copy_gbps:.0f} GB/s",
                   logx=group.startswith("act"), xticklabels=None if group.startswith("act") else labels)
        paired = self.args.rounds > 1
        table = [dict(group=r["group"], shape=r["shape"], provider=r["provider"], ms=r["ms"], gbps=r["gbps"],
                      pct_copy=r["pct_copy"], pct_same_copy=r["pct_same_copy"], x_compile=r["x_compile"],
                      check=r.get("status", ""),
                      **({"x_paired": r["x_compile_paired"],
                          "paired_range": f"{r['x_compile_min']:.3f}-{r['x_compile_max']:.3f}"} if paired else {}))
                 for r in rows]
        print()
        cols = ["group", "shape", "provider", "ms", "gbps", "pct_copy", "pct_same_copy", "x_compile"]
        C.print_table(table, cols + (["x_paired", "paired_range"] if paired else []) + ["check"],
                      title=f"quant{self.mode} ({C.card_name()}, copy {self.copy_gbps:.0f} GB/s; x_compile > 1 = faster than "
                            f"torch.compile)", prefix="SUMMARY quant")
        print(f"[done] {len(rows)} timings in {self.budget.elapsed():.0f} s -> {self.log.path}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="weight,act", help="comma list of groups: weight, act (default both)")
    p.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS), help=f"comma list of {PROVIDERS}")
    p.add_argument("--act-m", default=",".join(map(str, ACT_M)), help="activation rows M (K=7168)")
    p.add_argument("--weight-shapes", default=";".join("x".join(map(str, s)) for s in WEIGHT_SHAPES),
                   help="';'-separated weight shapes, e.g. '32x4096x7168;7168x18432'")
    p.add_argument("--torch-all", action="store_true", help="time the slow plain-torch reference on every shape")
    p.add_argument("--no-torch", action="store_true", help="drop the plain-torch provider")
    p.add_argument("--compile-dynamic", action="store_true",
                   help="one dynamic-shape compile per group instead of one static compile per shape (faster setup)")
    p.add_argument("--rep", type=int, default=100, help="do_bench rep time in ms")
    p.add_argument("--rounds", type=int, default=1,
                   help="even, > 1: time every provider once per round, rounds interleaved, the order reversed every "
                        "other round; report medians and the paired ratio to torch.compile (no perf_report plots)")
    p.add_argument("--graph", action="store_true",
                   help="time CUDA-graph replays (GPU time only, no host launch cost; every provider alike)")
    p.add_argument("--clean-flush", action="store_true",
                   help="do_bench's loop with an L2 flush that reads 256 MB instead of zeroing it (no dirty lines for "
                        "the timed call to write back; inputs still cold; host time counts as in do_bench)")
    p.add_argument("--rotate", action="store_true",
                   help="CUDA-graph replays of one call per input set, as many sets as push 4x L2 of traffic between "
                        "two uses of one set: cold inputs without do_bench's L2 flush (whose dirty lines the timed "
                        "call has to write back)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; shapes left after it are skipped")
    p.add_argument("--quick", action="store_true", help="M in {4096, 32768}, first weight shape, no plain torch")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="no GPU: run the plumbing on tiny CPU shapes (checks the script, times nothing meaningful)")
    a = p.parse_args(argv)
    a.only = [s.strip() for s in a.only.split(",") if s.strip()]
    a.providers = [s.strip() for s in a.providers.split(",") if s.strip()]
    a.act_m = [int(m) for m in a.act_m.split(",") if m.strip()]
    a.weight_shapes = [tuple(int(d) for d in s.split("x")) for s in a.weight_shapes.split(";") if s.strip()]
    if a.quick:
        a.act_m = [4096, 32768]
        a.weight_shapes = a.weight_shapes[:1]
        a.no_torch = True
    if a.cpu_smoke:
        from fp8_deep.testing import patch_interpreter_fp8_cast
        patch_interpreter_fp8_cast()  # the interpreter's float32 -> FP8 cast misrounds (tests/conftest.py)
        a.act_m = [8, 64]
        a.weight_shapes = [(2, 256, 384), (256, 128)]
    if a.clean_flush and (a.graph or a.rotate):
        p.error("--clean-flush times do_bench's loop: not with --graph / --rotate (graph replays have no flush)")
    if a.rounds > 1 and a.rounds % 2:
        p.error(f"--rounds {a.rounds}: use an even count (a forward and a reversed round make one paired ratio)")
    if a.no_torch and "torch" in a.providers:
        a.providers.remove("torch")
    for s in a.weight_shapes:
        if s[-1] % 128 or s[-2] % 128:
            p.error(f"weight shape {s}: the compiled baseline needs N and K multiples of 128")
    return a


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("bench_quant needs a CUDA GPU (run it on the GPU machine: bench/gpu_check.sh); --cpu-smoke for a dry run")
        return 0
    print(C.env_line())
    qb = QuantBench(args)
    print(f"copy bandwidth (2 GiB bf16, read+write): {qb.copy_gbps:.0f} GB/s")
    if args.rounds > 1:
        try:
            qb.run_rounds(qb.groups_of())
        finally:
            qb.finish()
        return 0
    return C.run_bench(qb)


if __name__ == "__main__":
    sys.exit(main())
