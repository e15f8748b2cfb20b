"""MoE forward benchmark (issue 3, item 7): fp8_deep against BF16 at DeepSeek-V3 shapes.

E=256 experts, top-8, H=7168, I=2048 (full expert) and I=256 (a tensor-parallel shard), T tokens with router-like
random routing (softmax of random logits, top-k, renormalised weights).

Providers (each validated once per shape before it is timed; the error is printed):
  fp8_cached   ``fp8_deep.moe_forward`` with cached FP8 weights + 128x128 scales (the product's path)
  fp8_quant    ``fp8_deep.moe_forward`` given BF16 weights: quantizes them inside every call
  deep_gemm    ``fp8_deep.moe_forward(..., backend="deep_gemm")`` (skipped with a note if DeepGEMM is missing)
  fp8_gemm     fp8_deep's grouped GEMM 1 + SwiGLU/requant + grouped GEMM 2 alone, on pre-permuted rows
  dg_gemm      the same through the DeepGEMM backend
  bf16         complete BF16 MoE on ``torch._grouped_mm``: sort routing, gather, two grouped GEMMs, SwiGLU,
               float32 ``index_add_`` combine (the baseline; must be at least as fast as ANCHORS.md's)
  bf16_gemm    the BF16 grouped GEMMs + SwiGLU alone on pre-gathered rows: a bound no BF16 MoE beats
  torch_fp8    PyTorch's rowwise FP8 ``torch._scaled_grouped_mm`` GEMMs + SwiGLU (weights pre-cast, activations
               cast rowwise in the call), on pre-gathered rows; skipped with a note if unsupported

Metrics: ms (median), TFLOP/s of the useful work (2 * T*k * 3*I*H: real routed rows, no padding), ratio to ``bf16``
(x_bf16 > 1 = faster than the BF16 MoE) and to ``bf16_gemm`` (x_bound).

    python bench/bench_moe.py                        # full grid (~4 min on an H100)
    python bench/bench_moe.py --quick                # T in {128, 4096}, I=2048
    python bench/bench_moe.py --T 1,128 --I 256 --providers fp8_cached,bf16
    python bench/bench_moe.py --breakdown            # per-stage times at T=128 and 4096
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py when run as a script

import torch  # noqa: E402

import _common as C  # noqa: E402
from fp8_deep.testing.baselines import bf16_moe_grouped_mm, route_sorted, silu_mul_bf16  # noqa: E402

E_DEFAULT, TOPK, HIDDEN = 256, 8, 7168
T_LIST = [1, 16, 128, 512, 2048, 4096, 16384]
# validation compares at most about this many output rows (evenly spread): calc_diff's float64 temporaries over all
# 131072 routed rows of T=16384 (7 GiB) ran the GEMM-only lines out of memory next to the weights
VALIDATE_ROWS = 16384
I_LIST = [2048, 256]
PROVIDERS = ["fp8_cached", "fp8_quant", "deep_gemm", "fp8_gemm", "dg_gemm", "bf16", "bf16_gemm", "torch_fp8"]
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)


def nan3():
    return float("nan"), float("nan"), float("nan")


# --------------------------------------------------------------------------------------- BF16 baseline (torch)
_silu_mul = silu_mul_bf16


def _rowwise_quant(x: torch.Tensor):
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    s = amax / FP8_MAX
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s.reshape(-1)


class TorchGlue:
    """SwiGLU and rowwise quantization for the torch baselines, fused by torch.compile (dynamic shapes: one compile
    for every T) when it works, eager otherwise: the baselines get the fastest glue we can reasonably give them."""

    def __init__(self, compile_glue: bool):
        self.silu_mul, self.rowwise_quant = _silu_mul, _rowwise_quant
        if compile_glue:
            try:
                self.silu_mul = torch.compile(_silu_mul, dynamic=True)
                self.rowwise_quant = torch.compile(_rowwise_quant, dynamic=True)
            except Exception as exc:  # no inductor on this build
                print(f"[note] torch.compile of the baseline glue failed ({exc!r}); eager glue")


def bf16_moe(x, w13t, w2t, topk_weights, topk_ids, glue: TorchGlue):
    """Complete BF16 MoE on transposed weight views (E, H, 2I) / (E, I, H): fp8_deep.testing.baselines."""
    return bf16_moe_grouped_mm(x, w13t.transpose(1, 2), w2t.transpose(1, 2), topk_weights, topk_ids, glue.silu_mul)


def bf16_gemms(xs, offs, w13t, w2t, glue: TorchGlue):
    return torch._grouped_mm(glue.silu_mul(torch._grouped_mm(xs, w13t, offs=offs)), w2t, offs=offs)


def _scaled_grouped_mm(a, b, sa, sb, offs):
    return torch._scaled_grouped_mm(a, b, sa, sb, offs=offs, out_dtype=torch.bfloat16)


def torch_fp8_gemms(xs, offs, q13t, s13, q2t, s2, glue: TorchGlue):
    qa, sa = glue.rowwise_quant(xs)
    h = _scaled_grouped_mm(qa, q13t, sa, s13, offs)
    qa2, sa2 = glue.rowwise_quant(glue.silu_mul(h))
    return _scaled_grouped_mm(qa2, q2t, sa2, s2, offs)


def rowwise_weights(w: torch.Tensor, chunk: int = 16):
    """(E, N, K) bf16 -> FP8 (E, N, K) and float32 (E, N) per-output-row scales, a few experts at a time."""
    q = torch.empty(w.shape, dtype=FP8, device=w.device)
    s = torch.empty(w.shape[:2], dtype=torch.float32, device=w.device)
    for e in range(0, w.shape[0], chunk):
        amax = w[e:e + chunk].abs().amax(dim=-1).float().clamp(min=1e-12)
        s[e:e + chunk] = amax / FP8_MAX
        q[e:e + chunk] = (w[e:e + chunk].float() / s[e:e + chunk, :, None]).to(FP8)
    return q, s


# --------------------------------------------------------------------------------------- the benchmark
class MoEBench:
    def __init__(self, args):
        self.args = args
        self.E = args.E
        self.out_dir = C.results_dir()
        self.log = C.CsvLog(self.out_dir / f"moe{'_breakdown' if args.breakdown else ''}{args.tag}.csv")
        self.budget = C.Budget(args.time_budget)
        self.glue = TorchGlue(not args.eager_glue)
        self.notes = []
        self.weights = None  # (I, dict)
        self.ctx = None  # ((I, T), dict)
        self.validated = set()
        import fp8_deep
        self.fp8_deep = fp8_deep
        from fp8_deep import ops, reference
        self.ops, self.reference = ops, reference
        self.has_dg = self._deep_gemm_available()

    def note(self, msg):
        if msg not in self.notes:
            self.notes.append(msg)
            print(f"[note] {msg}", flush=True)

    def _deep_gemm_available(self):
        try:
            from fp8_deep.integrations import deep_gemm as dg
            ok = dg.is_available()
            if not ok:
                try:
                    dg.load_backend()
                except ImportError as exc:
                    self.note(f"deep_gemm providers skipped: {str(exc).splitlines()[0][:200]}")
            return ok
        except Exception as exc:
            self.note(f"deep_gemm providers skipped: {exc!r}")
            return False

    def backend(self, name):
        from fp8_deep.ops import _registry
        if name == "triton":
            from fp8_deep.ops.grouped_gemm import TritonGroupedGemm
            return TritonGroupedGemm()
        return _registry.load("grouped_gemm", name)

    # ---- weights, once per I
    def get_weights(self, I):
        if self.weights is not None and self.weights[0] == I:
            return self.weights[1]
        self.weights = self.ctx = None
        C.free_cuda()
        E, H = self.E, self.args.H
        g = torch.Generator(device=C.device())
        g.manual_seed(1234 + I)
        w13 = torch.empty(E, 2 * I, H, dtype=torch.bfloat16, device=C.device()).normal_(0, H ** -0.5, generator=g)
        w2 = torch.empty(E, H, I, dtype=torch.bfloat16, device=C.device()).normal_(0, I ** -0.5, generator=g)
        W = dict(w13=w13, w2=w2, w13t=w13.transpose(1, 2), w2t=w2.transpose(1, 2))
        try:
            W["q13"], W["s13"] = self.ops.quantize_weight_blockwise(w13)
            W["q2"], W["s2"] = self.ops.quantize_weight_blockwise(w2)
        except Exception as exc:
            self.note(f"fp8_deep.ops.quantize_weight_blockwise failed ({exc!r}); weights quantized by the reference")
            W["q13"], W["s13"] = self._ref_quant(w13)
            W["q2"], W["s2"] = self._ref_quant(w2)
        if "torch_fp8" in self.args.providers and hasattr(torch, "_scaled_grouped_mm"):
            q13r, s13r = rowwise_weights(w13)
            q2r, s2r = rowwise_weights(w2)
            W.update(q13rt=q13r.transpose(1, 2), s13r=s13r, q2rt=q2r.transpose(1, 2), s2r=s2r)
        gb = sum(t.numel() * t.element_size() for k, t in W.items() if k in ("w13", "w2")) / 1e9
        print(f"[setup] I={I}: BF16 weights {gb:.1f} GB, FP8 {gb / 2:.1f} GB", flush=True)
        self.weights = (I, W)
        return W

    def _ref_quant(self, w, chunk=8):
        q = torch.empty(w.shape, dtype=FP8, device=w.device)
        s = torch.empty(w.shape[0], (w.shape[1] + 127) // 128, (w.shape[2] + 127) // 128, dtype=torch.float32,
                        device=w.device)
        for e in range(0, w.shape[0], chunk):
            q[e:e + chunk], s[e:e + chunk] = self.reference.quantize_weight_blockwise(w[e:e + chunk])
        return q, s

    # ---- inputs, once per (I, T)
    def get_ctx(self, I, T):
        if self.ctx is not None and self.ctx[0] == (I, T):
            return self.ctx[1]
        self.ctx = None
        C.free_cuda()
        self.get_weights(I)  # weights first: the largest allocation goes in before the per-T tensors
        x = C.randn((T, self.args.H), seed=T)
        tw, tid = C.random_routing(T, self.E, TOPK, seed=T + 1)
        ctx = dict(x=x, tw=tw, tid=tid)
        order, tok, offs = route_sorted(tid, self.E)
        ctx.update(order=order, tok=tok, offs=offs, xs=x.index_select(0, tok))
        self.ctx = ((I, T), ctx)
        return ctx

    def fp8_rows(self, I, T, layout, block_size=128):
        """Pre-permuted FP8 rows for the GEMM-only lines: (plan, a1, sa1) through fp8_deep.ops, segments aligned
        to the backend's ``row_alignment`` as moe_forward builds them."""
        ctx = self.get_ctx(I, T)
        key = f"rows_{layout}_{block_size}"
        if key not in ctx:
            from fp8_deep.ops.routing import align_routing, permute_rows
            plan = align_routing(ctx["tid"], self.E, block_size=block_size)
            qx, sx = self.ops.quantize_activation(ctx["x"])
            a1, sa1 = permute_rows(qx, sx, plan, scale_layout=layout)
            ctx[key] = (plan, a1, sa1)
        return ctx[key]

    def fp8_gemms_fn(self, I, T, backend_name):
        from fp8_deep.ops.swiglu import silu_mul_quantize
        W = self.get_weights(I)
        gemm = self.backend(backend_name)
        plan, a1, sa1 = self.fp8_rows(I, T, gemm.a_scale_layout, getattr(gemm, "row_alignment", 128))

        def run():
            h = gemm.gemm(a1, sa1, W["q13"], W["s13"], plan)
            a2, sa2 = silu_mul_quantize(h, m_indices=plan.m_indices, scale_layout=gemm.a_scale_layout)
            return gemm.gemm(a2, sa2, W["q2"], W["s2"], plan)
        return run, plan

    def provider_fn(self, provider, I, T):
        """(callable, kind) where kind says what its output is comparable with: 'moe' or 'gemms'."""
        W, ctx = self.get_weights(I), self.get_ctx(I, T)
        x, tw, tid = ctx["x"], ctx["tw"], ctx["tid"]
        moe = self.fp8_deep.moe_forward
        fb = self.args.fp8_backend
        if provider == "fp8_cached":
            return (lambda: moe(x, W["q13"], W["q2"], tw, tid, w13_scale=W["s13"], w2_scale=W["s2"], backend=fb)), "moe"
        if provider == "fp8_quant":
            return (lambda: moe(x, W["w13"], W["w2"], tw, tid, backend=fb)), "moe"
        if provider == "deep_gemm":
            if not self.has_dg:
                return None, None
            return (lambda: moe(x, W["q13"], W["q2"], tw, tid, w13_scale=W["s13"], w2_scale=W["s2"],
                                backend="deep_gemm")), "moe"
        if provider in ("fp8_gemm", "dg_gemm"):
            if provider == "dg_gemm" and not self.has_dg:
                return None, None
            fn, plan = self.fp8_gemms_fn(I, T, "triton" if provider == "fp8_gemm" else "deep_gemm")
            return (lambda: fn()), ("perm", plan)
        if provider == "bf16":
            return (lambda: bf16_moe(x, W["w13t"], W["w2t"], tw, tid, self.glue)), "moe"
        if provider == "bf16_gemm":
            return (lambda: bf16_gemms(ctx["xs"], ctx["offs"], W["w13t"], W["w2t"], self.glue)), "gemms"
        if provider == "torch_fp8":
            if not hasattr(torch, "_scaled_grouped_mm") or "q13rt" not in W:
                self.note("torch._scaled_grouped_mm not available: torch_fp8 skipped")
                return None, None
            return (lambda: torch_fp8_gemms(ctx["xs"], ctx["offs"], W["q13rt"], W["s13r"], W["q2rt"], W["s2r"],
                                            self.glue)), "gemms"
        raise ValueError(provider)

    # ---- validation (once per provider and shape)
    def reference_out(self, I, T, kind):
        ctx, W = self.get_ctx(I, T), self.get_weights(I)
        key = f"ref_{kind}"
        if key not in ctx:
            if kind == "moe":
                ctx[key] = bf16_moe(ctx["x"], W["w13t"], W["w2t"], ctx["tw"], ctx["tid"], TorchGlue(False))
            else:
                ctx[key] = bf16_gemms(ctx["xs"], ctx["offs"], W["w13t"], W["w2t"], TorchGlue(False))
        return ctx[key]

    def validate(self, provider, I, T, fn, kind) -> str:
        from fp8_deep.testing import calc_diff
        out = fn()
        if isinstance(kind, tuple):  # rows in the plan's order: compare the valid rows with the BF16 GEMMs' rows
            plan = kind[1]
            ctx = self.get_ctx(I, T)
            rows = (plan.m_indices >= 0).nonzero().flatten()
            if not _finite_rows(out, rows):  # every valid row, before the sample below
                return "NON-FINITE output"
            rows = rows[::max(1, rows.numel() // VALIDATE_ROWS)]  # a spread sample: calc_diff is a global ratio
            choice = plan.sorted_token_ids[rows].long()
            # bf16_gemm's row i holds choice order[i]; map choice -> row of the BF16 output
            pos = torch.empty_like(ctx["order"])
            pos[ctx["order"]] = torch.arange(ctx["order"].numel(), device=pos.device)
            ref = self.reference_out(I, T, "gemms")[pos[choice]]
            out = out[rows]
        else:
            ref = self.reference_out(I, T, kind)
            if not _finite_rows(out):
                return "NON-FINITE output"
            step = max(1, out.shape[0] // VALIDATE_ROWS)
            out, ref = out[::step], ref[::step]
        if not torch.isfinite(out.float()).all():
            return "NON-FINITE output"
        d = calc_diff(out.float(), ref.float())
        msg = f"calc_diff vs bf16 {d:.2e}"
        if provider == "bf16" and T <= self.args.ref_check_max_t:
            # our BF16 MoE must compute the reference function (per-expert loop, slow: small T only)
            W, ctx = self.get_weights(I), self.get_ctx(I, T)
            ref_b = self.reference.moe_forward_bf16(ctx["x"], W["w13"], W["w2"], ctx["tw"], ctx["tid"])
            msg = f"calc_diff vs reference.moe_forward_bf16 {calc_diff(out.float(), ref_b.float()):.2e}"
        if provider == "fp8_cached" and T <= self.args.ref_check_max_t:
            W, ctx = self.get_weights(I), self.get_ctx(I, T)
            emu = self.reference.moe_forward_fp8_emulated(ctx["x"], W["q13"], W["q2"], ctx["tw"], ctx["tid"],
                                                          w13_scale=W["s13"], w2_scale=W["s2"])
            close = torch.allclose(out.float(), emu.float(), atol=0.035, rtol=0.035)
            msg += (f"; emulated ref: calc_diff vs bf16 {calc_diff(emu.float(), ref.float()):.2e}, "
                    f"elementwise atol=rtol=0.035 {'ok' if close else 'FAILED'}")
        return msg

    def run_one(self, provider, I, T):
        if self.budget.spent(reserve=10):
            print(f"[skip] I={I} T={T} {provider}: time budget spent", flush=True)
            return nan3()
        try:
            fn, kind = self.provider_fn(provider, I, T)
            if fn is None:
                return nan3()
            check = self.validate(provider, I, T, fn, kind)
            ms, lo, hi = C.bench(fn, rep=self.args.rep, graph=self.args.graph)
        except Exception as exc:
            print(f"[error] I={I} T={T} {provider}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            if self.args.verbose:
                traceback.print_exc()
            self.log.add(I=I, T=T, provider=provider, status=f"error: {type(exc).__name__}: {str(exc)[:120]}")
            C.free_cuda()
            return nan3()
        flops = 2.0 * T * TOPK * 3 * I * self.args.H
        tf = C.tflops(flops, ms)
        self.log.add(I=I, T=T, provider=provider, ms=ms, ms_p20=lo, ms_p80=hi, tflops=tf, status=check)
        print(f"  I={I:5d} T={T:6d} {provider:10s} {ms:9.3f} ms {tf:7.1f} TFLOP/s  [{check}]", flush=True)
        return ms, lo, hi

    def marks(self):
        import triton.testing as tt
        a = self.args
        benches = [tt.Benchmark(x_names=["T"], x_vals=a.T, line_arg="provider", line_vals=a.providers,
                                line_names=a.providers, ylabel="ms", plot_name=f"moe_I{I}_ms", x_log=True,
                                args={"I": I}) for I in a.I]

        @tt.perf_report(benches)
        def run(T, provider, I):
            return self.run_one(provider, I, T)
        return run

    def finish(self):
        rows = [r for r in self.log.rows if "ms" in r]
        base = {(r["I"], r["T"], r["provider"]): r["ms"] for r in rows}
        for r in rows:
            b, g = base.get((r["I"], r["T"], "bf16")), base.get((r["I"], r["T"], "bf16_gemm"))
            r["x_bf16"] = b / r["ms"] if b else float("nan")
            r["x_bound"] = g / r["ms"] if g else float("nan")
        self.log.flush()
        for I in self.args.I:
            series = {p: [base.get((I, T, p), float("nan")) for T in self.args.T] for p in self.args.providers}
            C.plot(self.out_dir / f"moe_I{I}_ms_all{self.args.tag}.png", series, self.args.T, xlabel="tokens T", ylabel="ms",
                   title=f"MoE forward E={self.E} top-{TOPK} H={self.args.H} I={I}", logx=True, logy=True)
            xs = {p: [r["x_bf16"] for T in self.args.T for r in rows if r["I"] == I and r["T"] == T
                      and r["provider"] == p] for p in self.args.providers}
            if any(xs.values()):
                series = {p: [next((r["x_bf16"] for r in rows if r["I"] == I and r["T"] == T and r["provider"] == p),
                                   float("nan")) for T in self.args.T] for p in self.args.providers}
                C.plot(self.out_dir / f"moe_I{I}_speedup{self.args.tag}.png", series, self.args.T, xlabel="tokens T",
                       ylabel="speed-up over the BF16 MoE", title=f"MoE forward, I={I} (same run)", logx=True)
        table = [dict(I=r["I"], T=r["T"], provider=r["provider"], ms=r["ms"], tflops=r["tflops"],
                      x_bf16=r["x_bf16"], x_bound=r["x_bound"]) for r in rows]
        print()
        for n in self.notes:
            print(f"SUMMARY moe note: {n}")
        C.print_table(table, ["I", "T", "provider", "ms", "tflops", "x_bf16", "x_bound"],
                      title=f"moe ({C.card_name()}; x_bf16 = BF16 MoE ms / ms, x_bound = BF16 GEMM-only ms / ms)",
                      prefix="SUMMARY moe")
        print(f"[done] {len(rows)} timings in {self.budget.elapsed():.0f} s -> {self.log.path}")

    # ---- breakdown: each stage of the fp8_deep pipeline timed on its own
    def breakdown(self):
        a = self.args
        rows = []
        for I in a.I:
            for T in a.breakdown_T:
                if self.budget.spent(reserve=10):
                    print(f"[skip] breakdown I={I} T={T}: time budget spent")
                    continue
                rows += self._breakdown_one(I, T)
                self.ctx = None
                C.free_cuda()
        print()
        for n in self.notes:
            print(f"SUMMARY breakdown note: {n}")
        C.print_table(rows, ["I", "T", "stage", "ms", "pct", "rate", "unit", "status"],
                      title=f"moe breakdown ({C.card_name()}; pct = share of the sum of stages)",
                      prefix="SUMMARY breakdown")

    def _breakdown_one(self, I, T):
        a = self.args
        W, ctx = self.get_weights(I), self.get_ctx(I, T)
        x, tw, tid, H, E = ctx["x"], ctx["tw"], ctx["tid"], a.H, self.E
        gemm = self.backend("triton")
        layout = gemm.a_scale_layout
        M = T * TOPK
        st = {}  # stage -> (fn, result)
        out = []

        def stage(name, fn, nbytes=None, flops=None, fallback=None):
            """Time fn (validated by running it once); on failure use ``fallback`` (untimed) for later stages."""
            try:
                res = fn()
                ms = C.bench(fn, rep=a.rep, graph=a.graph)[0]
                rate, unit = ((C.tflops(flops, ms), "TFLOP/s") if flops else
                              (C.gbps(nbytes, ms), "GB/s") if nbytes else (float("nan"), ""))
                out.append(dict(I=I, T=T, stage=name, ms=ms, rate=rate, unit=unit, status="ok"))
                st[name] = res
            except Exception as exc:
                msg = f"{type(exc).__name__}: {str(exc)[:100]}"
                print(f"[error] breakdown I={I} T={T} {name}: {msg}", flush=True)
                if a.verbose:
                    traceback.print_exc()
                out.append(dict(I=I, T=T, stage=name, ms=float("nan"), rate=float("nan"), unit="", status=msg))
                st[name] = fallback() if fallback is not None else None
            return st[name]

        ops = self.ops
        qx = stage("quant", lambda: ops.quantize_activation(x), nbytes=T * H * 3 + T * H // 32,
                   fallback=lambda: self.reference.quantize_activation(x))
        try:
            from fp8_deep.ops.routing import align_routing, permute_rows
        except ImportError as exc:
            self.note(f"fp8_deep.ops.routing missing ({exc}); torch stand-ins for routing and permute")
            align_routing = permute_rows = None
        plan = stage("routing", lambda: align_routing(tid, E, block_size=getattr(gemm, "row_alignment", 128)),
                     fallback=lambda: C.torch_routing_plan(tid, E))
        R = plan.num_rows
        perm = stage("permute", lambda: permute_rows(qx[0], qx[1], plan, scale_layout=layout),
                     nbytes=2 * M * H + M * H // 32)
        if perm is None:
            return out
        h = stage("gemm1", lambda: gemm.gemm(perm[0], perm[1], W["q13"], W["s13"], plan), flops=2.0 * M * 2 * I * H)
        if h is None:
            return out
        try:
            from fp8_deep.ops.swiglu import silu_mul_quantize
        except ImportError as exc:
            self.note(f"fp8_deep.ops.swiglu missing ({exc})")
            return out
        act = stage("act", lambda: silu_mul_quantize(h, m_indices=plan.m_indices, scale_layout=layout),
                    nbytes=R * 2 * I * 2 + R * I + R * I // 32)
        if act is None:
            return out
        o = stage("gemm2", lambda: gemm.gemm(act[0], act[1], W["q2"], W["s2"], plan), flops=2.0 * M * I * H)
        if o is None:
            return out
        try:
            from fp8_deep.ops.combine import moe_combine
            stage("combine", lambda: moe_combine(o, plan.inv_perm, tw, out_dtype=x.dtype), nbytes=M * H * 2 + T * H * 2)
        except ImportError as exc:
            self.note(f"fp8_deep.ops.combine missing ({exc})")
        if self.has_dg:
            # DeepGEMM needs its own plan (128-row segments) and the inputs laid out on it
            dgb = self.backend("deep_gemm")
            plan_dg = align_routing(tid, E, block_size=dgb.row_alignment)
            perm_dg = permute_rows(qx[0], qx[1], plan_dg, scale_layout=dgb.a_scale_layout)
            h_dg = stage("gemm1[deep_gemm]", lambda: dgb.gemm(perm_dg[0], perm_dg[1], W["q13"], W["s13"], plan_dg),
                         flops=2.0 * M * 2 * I * H)
            if h_dg is not None:
                act_dg = silu_mul_quantize(h_dg, m_indices=plan_dg.m_indices, scale_layout=dgb.a_scale_layout)
                stage("gemm2[deep_gemm]", lambda: dgb.gemm(act_dg[0], act_dg[1], W["q2"], W["s2"], plan_dg),
                      flops=2.0 * M * I * H)
        total = sum(r["ms"] for r in out if r["status"] == "ok" and "[" not in r["stage"])
        fb = a.fp8_backend
        e2e = float("nan")
        try:
            e2e = C.bench(lambda: self.fp8_deep.moe_forward(x, W["q13"], W["q2"], tw, tid, w13_scale=W["s13"],
                                                             w2_scale=W["s2"], backend=fb), rep=a.rep, graph=a.graph)[0]
        except Exception as exc:
            print(f"[error] breakdown end-to-end: {exc!r}")
        for r in out:
            r["pct"] = 100 * r["ms"] / total if total and "[" not in r["stage"] else float("nan")
        out.append(dict(I=I, T=T, stage="sum of stages", ms=total, pct=100.0, rate=float("nan"), unit="",
                        status="ok"))
        out.append(dict(I=I, T=T, stage=f"moe_forward[{fb}]", ms=e2e, pct=100 * e2e / total if total else float("nan"),
                        rate=C.tflops(2.0 * M * 3 * I * H, e2e), unit="TFLOP/s", status="end to end"))
        for r in out:
            self.log.add(**r)
        for r in out:
            print(f"  I={I:5d} T={T:6d} {r['stage']:18s} {r['ms']:8.3f} ms  {r.get('rate', float('nan')):8.1f} "
                  f"{r.get('unit', '')}  {r['status']}", flush=True)
        return out


def _finite_rows(out: torch.Tensor, rows: Optional[torch.Tensor] = None, chunk: int = 8192) -> bool:
    """Whether ``out[rows]`` (all rows when None) is finite, checked in row chunks (no full-size temporaries)."""
    n = out.shape[0] if rows is None else rows.numel()
    for i in range(0, n, chunk):
        part = out[i:i + chunk] if rows is None else out[rows[i:i + chunk]]
        if not torch.isfinite(part).all():
            return False
    return True


def _ints(s):
    return [int(v) for v in str(s).split(",") if v.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=_ints, default=T_LIST, help=f"comma list of token counts (default {T_LIST})")
    p.add_argument("--I", type=_ints, default=I_LIST, help=f"comma list of intermediate sizes (default {I_LIST})")
    p.add_argument("--E", type=int, default=E_DEFAULT, help="experts (default 256)")
    p.add_argument("--H", type=int, default=HIDDEN, help="hidden size (default 7168)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {PROVIDERS}")
    p.add_argument("--fp8-backend", default="triton", choices=["triton", "auto", "deep_gemm"],
                   help="grouped-GEMM backend of the fp8_cached/fp8_quant lines (default triton: our kernel)")
    p.add_argument("--quick", action="store_true", help="T in {128, 4096}, I=2048")
    p.add_argument("--breakdown", action="store_true", help="time each stage of the fp8_deep pipeline")
    p.add_argument("--breakdown-T", type=_ints, default=[128, 4096], help="T values of --breakdown")
    p.add_argument("--graph", action="store_true",
                   help="time CUDA-graph replays (do_bench_cudagraph); sets FP8_DEEP_CHECK_ROUTING=0")
    p.add_argument("--skip-routing-check", action="store_true",
                   help="FP8_DEEP_CHECK_ROUTING=0: no host sync for the topk_ids range check (serving setting)")
    p.add_argument("--eager-glue", action="store_true", help="no torch.compile for the torch baselines' SwiGLU/cast")
    p.add_argument("--ref-check-max-t", type=int, default=16,
                   help="also check bf16 and fp8_cached against fp8_deep.reference up to this T (slow loops)")
    p.add_argument("--rep", type=int, default=100, help="do_bench rep time in ms")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; points left after it are skipped")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="no GPU: tiny shapes on the CPU to check the plumbing (times mean nothing)")
    p.add_argument("--tag", default="", help="suffix of the CSV/PNG names (parallel runs on several GPUs)")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    a.providers = [s.strip() for s in a.providers.split(",") if s.strip()]
    bad = [s for s in a.providers if s not in PROVIDERS]
    if bad:
        p.error(f"unknown providers {bad}; known: {PROVIDERS}")
    if a.quick:
        a.T, a.I = [128, 4096], [2048]
    if a.cpu_smoke:
        a.E, a.H, a.I, a.T, a.breakdown_T = 8, 256, [128], [1, 16], [16]
        a.eager_glue = True
    if a.graph or a.skip_routing_check:
        os.environ["FP8_DEEP_CHECK_ROUTING"] = "0"
    return a


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("bench_moe needs a CUDA GPU (run it on the GPU machine: bench/gpu_check.sh); --cpu-smoke for a dry run")
        return 0
    print(C.env_line())
    print(f"E={args.E} top-{TOPK} H={args.H} I={args.I} T={args.T} providers={args.providers} "
          f"fp8 backend={args.fp8_backend} graph={args.graph} "
          f"routing check={'off' if os.environ.get('FP8_DEEP_CHECK_ROUTING') == '0' else 'on'}", flush=True)
    mb = MoEBench(args)
    if args.breakdown:
        mb.breakdown()
        return 0
    return C.run_bench(mb)


if __name__ == "__main__":
    sys.exit(main())
