"""MoE layer training step: fp8_deep forward+backward against BF16 ``torch._grouped_mm`` autograd, same routing.

The target (shared/docs/ANCHORS.md): MoE forward+backward >= 1.3x BF16 forward+backward at the same shapes.

Shapes (top-8, balanced routing: token t picks experts (8t .. 8t+7) mod E, so every expert gets exactly ``rows`` rows;
T = rows * E / 8 tokens):
  dsv3_ep32   E=32 local experts (an expert-parallel shard of DeepSeek-V3), H=7168, I=2048, rows 256/512/1024/2048
  qwen3_30b   E=128, H=2048, I=768 (Qwen3-30B-A3B-like), rows 256/1024

Providers (grad mode on everywhere; gradients set to None before every call; validated once per shape first):
  fp8_fwd        ``fp8_deep.moe_forward(..., fp8_weights=fw)``: the training forward (records the backward)
  fp8_fwdbwd     forward + backward with ``fw = fp8_deep.quantize_moe_weights(w13, w2)`` made outside the timing
                 (the weights quantized once per optimizer step)
  fp8_fwdbwd_q   forward + backward, the call quantizing w13/w2 itself (both layouts) every time
  fp8_wquant     ``quantize_moe_weights`` alone: the per-step cost the fp8_fwdbwd line leaves out
  bf16_fwd       ``fp8_deep.testing.baselines.bf16_moe_train`` (= ``bf16_moe_grouped_mm``: routing sort, gather,
                 two ``torch._grouped_mm`` + SwiGLU, float32 ``index_add_`` combine), forward
  bf16_fwdbwd    the same, forward + backward through autograd

Validation (before timing a shape; exit 1 at the end if any fails): calc_diff of the FP8 output and of every gradient
(x, w13, w2, topk_weights) against BF16, the per-call-quantization path against the cached-weights path, the
gradients' dtypes; at the first shape of each model (and in --cpu-smoke) also against ``fp8_deep.reference``'s
FP8-recipe spec (``moe_forward_fp8_emulated`` / ``moe_backward``, float32 math).

Metrics: ms (median of ``triton.testing.do_bench``), TFLOP/s of the useful work (forward 2*T*k*3*I*H, fwd+bwd 3x
that), ``x_bf16`` = the BF16 line's ms / ms (forward lines against bf16_fwd, fwd+bwd lines against bf16_fwdbwd; > 1 =
faster), ``peak_GiB`` = ``torch.cuda.max_memory_allocated`` during one call minus what was allocated before it
(inputs, weights, FP8 weights), ``retained_B_tok`` = bytes the autograd graph holds after the forward (allocated
memory delta minus the output) per token, ``hooks_B_tok`` = bytes of the tensors seen by
``torch.autograd.graph.saved_tensors_hooks`` per token, inputs and weights excluded (a Function that keeps its
cache on ``ctx`` attributes, as fp8_deep's does, is invisible to the hooks: compare ``retained_B_tok``).

    python bench/bench_train.py                 # both models, all rows (~3-4 min on an H100)
    python bench/bench_train.py --quick         # dsv3_ep32 at 1024 rows, qwen3_30b at 256
    python bench/bench_train.py --models qwen3_30b --rows 256,512
    python bench/bench_train.py --cpu-smoke     # tiny shapes on the CPU (FP8 kernels interpreted): plumbing only
"""
from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv[1:]:
    # fp8_deep runs its Triton kernels on CPU tensors only through the interpreter, chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py when run as a script

import torch  # noqa: E402

import _common as C  # noqa: E402
from fp8_deep.testing import calc_diff  # noqa: E402
from fp8_deep.testing.baselines import bf16_moe_train, grouped_mm_available  # noqa: E402

TOPK = 8
MODELS = {
    "dsv3_ep32": dict(E=32, H=7168, I=2048, rows=[256, 512, 1024, 2048]),
    "qwen3_30b": dict(E=128, H=2048, I=768, rows=[256, 1024]),
}
QUICK = {"dsv3_ep32": [1024], "qwen3_30b": [256]}
SMOKE = {"smoke": dict(E=8, H=256, I=128, rows=[16])}  # T = 16 tokens, top-8 of 8 experts
PROVIDERS = ["fp8_fwd", "fp8_fwdbwd", "fp8_fwdbwd_q", "fp8_wquant", "bf16_fwd", "bf16_fwdbwd"]
BASELINE = {"fp8_fwd": "bf16_fwd", "fp8_fwdbwd": "bf16_fwdbwd", "fp8_fwdbwd_q": "bf16_fwdbwd",
            "bf16_fwd": "bf16_fwd", "bf16_fwdbwd": "bf16_fwdbwd"}
TENSORS = ["out", "grad_x", "grad_w13", "grad_w2", "grad_topk_weights"]
# failure bounds ("wrong", not "a little worse"): the FP8 MoE forward is ~2e-3 calc_diff from BF16 on Gaussian data
# (ANCHORS.md); a broken kernel, a missing scale or a wrong row order lands at 1e-1 and above
MAX_DIFF_VS_BF16 = {"out": 1e-2, "grad_x": 2e-2, "grad_w13": 2e-2, "grad_w2": 2e-2, "grad_topk_weights": 2e-2}
MAX_DIFF_VS_SPEC = 1e-3  # same quantizations in float32 math: accumulation order and FP8 rounding ties only
MAX_DIFF_Q_VS_CACHED = 1e-6  # the same quantizer either way: expected bitwise equal
DIFF_CHUNK = 1 << 26  # calc_diff's float64 temporaries: a 7168x4096x32 gradient at once would take ~30 GB


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``fp8_deep.testing.calc_diff`` (``1 - 2*sum(a*b) / sum(a*a + b*b)`` in float64), the same sums accumulated
    over chunks for tensors too large for its float64 temporaries."""
    if a.numel() <= DIFF_CHUNK:
        return calc_diff(a.float(), b.float())
    a, b = a.reshape(-1), b.reshape(-1)
    ab = aabb = 0.0
    for i in range(0, a.numel(), DIFF_CHUNK):
        x, y = a[i:i + DIFF_CHUNK].double(), b[i:i + DIFF_CHUNK].double()
        ab += float((x * y).sum())
        aabb += float((x * x + y * y).sum())
    return 0.0 if aabb == 0 else 1 - 2 * ab / aabb


def finite(t: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(c).all()) for c in t.reshape(-1).split(DIFF_CHUNK))


class NumericsError(RuntimeError):
    pass


class TrainBench:
    def __init__(self, args):
        self.args = args
        self.dev = torch.device("cpu" if args.cpu_smoke else C.device())
        self.out_dir = C.results_dir("cpu" if args.cpu_smoke else None)
        self.log = C.CsvLog(self.out_dir / f"moe_train{args.tag}.csv")
        self.budget = C.Budget(args.time_budget)
        self.notes: List[str] = []
        self.failures: List[str] = []
        self.weights = None  # (model name, dict)
        self.ctx = None  # ((model, rows), dict)
        self.results: Dict = {}  # (model, rows, provider) -> row dict
        import fp8_deep
        from fp8_deep import reference
        self.fp8_deep, self.reference = fp8_deep, reference

    def note(self, msg):
        if msg not in self.notes:
            self.notes.append(msg)
            print(f"[note] {msg}", flush=True)

    # ---- inputs
    def shape(self, model):
        return self.args.models[model]

    def get_weights(self, model):
        if self.weights is None or self.weights[0] != model:
            self.weights = self.ctx = None
            C.free_cuda()
            s = self.shape(model)
            E, H, inter, dt = s["E"], s["H"], s["I"], self.args.master_dtype
            w13 = torch.nn.Parameter(self.randn((E, 2 * inter, H), dt, std=H ** -0.5, seed=1))
            w2 = torch.nn.Parameter(self.randn((E, H, inter), dt, std=inter ** -0.5, seed=2))
            self.weights = (model, dict(w13=w13, w2=w2))
        return self.weights[1]

    def randn(self, shape, dtype, std=1.0, seed=0):
        """Gaussian ``shape`` in ``dtype``; 3-D stacks filled one expert at a time (no float32 copy of a whole
        2.8 GB weight stack)."""
        g = torch.Generator(device=self.dev).manual_seed(seed)
        if len(shape) < 3:
            return torch.randn(shape, generator=g, device=self.dev, dtype=torch.float32).mul_(std).to(dtype)
        t = torch.empty(shape, dtype=dtype, device=self.dev)
        for i in range(shape[0]):
            t[i] = torch.randn(shape[1:], generator=g, device=self.dev, dtype=torch.float32).mul_(std)
        return t

    def get_ctx(self, model, rows):
        self.get_weights(model)  # switching models drops the previous model's context first
        key = (model, rows)
        if self.ctx is None or self.ctx[0] != key:
            self.ctx = None
            C.free_cuda()
            s = self.shape(model)
            E, H = s["E"], s["H"]
            T = rows * E // TOPK
            ids = (torch.arange(T, device=self.dev)[:, None] * TOPK + torch.arange(TOPK, device=self.dev)) % E
            logits = self.randn((T, TOPK), torch.float32, seed=3)
            tw = torch.softmax(logits, dim=-1)  # positive, sum to 1: a renormalised router's weights
            x = self.randn((T, H), torch.bfloat16, seed=4)
            gout = self.randn((T, H), torch.bfloat16, seed=5)
            self.ctx = (key, dict(T=T, x=x.requires_grad_(True), tw=tw.requires_grad_(True),
                                  tid=ids.to(torch.int32).contiguous(), gout=gout, fw=None, checked=None))
        return self.ctx[1]

    # ---- the callables
    def fns(self, model, rows):
        W, ctx = self.get_weights(model), self.get_ctx(model, rows)
        a = self.args
        x, tw, tid, gout, w13, w2 = ctx["x"], ctx["tw"], ctx["tid"], ctx["gout"], W["w13"], W["w2"]
        fd = self.fp8_deep
        leaves = (x, w13, w2, tw)
        if ctx["fw"] is None:
            ctx["fw"] = fd.quantize_moe_weights(w13, w2, scale_fmt=a.scale_fmt)
        fw = ctx["fw"]

        def fp8(cached=True):
            return fd.moe_forward(x, w13, w2, tw, tid, scale_fmt=a.scale_fmt, backend=a.fp8_backend,
                                  fp8_weights=fw if cached else None)

        def bf16():
            return bf16_moe_train(x, w13, w2, tw, tid)

        def fwdbwd(f):
            def run():
                for t in leaves:
                    t.grad = None
                out = f()
                out.backward(gout)
                return out
            return run

        def fwd(f):
            def run():
                for t in leaves:
                    t.grad = None
                return f()
            return run

        return dict(fp8_fwd=fwd(fp8), fp8_fwdbwd=fwdbwd(fp8), fp8_fwdbwd_q=fwdbwd(lambda: fp8(cached=False)),
                    fp8_wquant=lambda: fd.quantize_moe_weights(w13, w2, scale_fmt=a.scale_fmt),
                    bf16_fwd=fwd(bf16), bf16_fwdbwd=fwdbwd(bf16)), leaves

    # ---- validation, once per shape
    def grads(self, fn, leaves):
        out = fn()
        res = dict(out=out.detach(), grad_x=leaves[0].grad, grad_w13=leaves[1].grad, grad_w2=leaves[2].grad,
                   grad_topk_weights=leaves[3].grad)
        for t in leaves:
            t.grad = None
        return res

    def validate(self, model, rows):
        ctx = self.get_ctx(model, rows)
        if ctx["checked"] is not None:
            return ctx["checked"]
        fns, leaves = self.fns(model, rows)
        ref = self.grads(fns["bf16_fwdbwd"], leaves)
        try:
            got = self.grads(fns["fp8_fwdbwd"], leaves)
            backend = self.fp8_deep.last_backend()
            got_q = self.grads(fns["fp8_fwdbwd_q"], leaves)
        except Exception as exc:
            ctx["checked"] = msg = f"FP8 forward+backward raised {type(exc).__name__}: {str(exc)[:200]}"
            if self.args.verbose:
                traceback.print_exc()
            self.failures.append(f"{model} rows={rows}: {msg}")
            print(f"[FAIL] {model} rows={rows}: {msg}", flush=True)
            return msg
        spec = None
        if self.args.spec_check and (self.args.cpu_smoke or rows == self.shape(model)["rows"][0]):
            spec = self.spec(model, rows, leaves)
        bad, parts = [], []
        for name in TENSORS:
            a, b = got[name], ref[name]
            if a is None or b is None:
                bad.append(f"{name} missing ({'fp8' if a is None else 'bf16'})")
                continue
            d = diff(a, b)
            dq = diff(got_q[name], a) if got_q[name] is not None else float("nan")
            ok_finite = finite(a)
            part = f"{name} {d:.2e}"
            if not ok_finite:
                bad.append(f"{name} not finite")
            if not d <= MAX_DIFF_VS_BF16[name]:
                bad.append(f"{name} calc_diff vs bf16 {d:.2e} > {MAX_DIFF_VS_BF16[name]:.0e}")
            if not dq <= MAX_DIFF_Q_VS_CACHED:
                bad.append(f"{name}: per-call weight quantization differs from fp8_weights= (calc_diff {dq:.2e})")
            if spec is not None:
                ds = diff(a, spec[name])
                part += f" (spec {ds:.1e})"
                if not ds <= MAX_DIFF_VS_SPEC:
                    bad.append(f"{name} calc_diff vs spec {ds:.2e} > {MAX_DIFF_VS_SPEC:.0e}")
            parts.append(part)
        for name, w in (("grad_w13", leaves[1]), ("grad_w2", leaves[2])):
            if got[name] is not None and got[name].dtype != w.dtype:
                bad.append(f"{name} dtype {got[name].dtype}, expected the master weight's {w.dtype}")
        msg = f"calc_diff vs bf16: {', '.join(parts)}; backend {backend}"
        print(f"  {model} rows={rows} T={ctx['T']}: {msg}", flush=True)
        if bad:
            msg = "FAILED " + "; ".join(bad) + " | " + msg
            self.failures.append(f"{model} rows={rows}: " + "; ".join(bad))
            print(f"[FAIL] {model} rows={rows}: {'; '.join(bad)}", flush=True)
        ctx["checked"] = msg
        del got, got_q, ref
        C.free_cuda()
        return msg

    def spec(self, model, rows, leaves):
        """fp8_deep.reference's FP8 recipe in float32 math (per-expert loops): forward and every gradient."""
        x, w13, w2, tw = (t.detach() for t in leaves)
        ctx = self.get_ctx(model, rows)
        r = self.reference
        out = r.moe_forward_fp8_emulated(x, w13, w2, tw, ctx["tid"], scale_fmt=self.args.scale_fmt)
        gx, g13, g2, gtw = r.moe_backward(ctx["gout"], x, w13, w2, tw, ctx["tid"], scale_fmt=self.args.scale_fmt,
                                          out_dtype=w13.dtype)
        return dict(out=out, grad_x=gx, grad_w13=g13, grad_w2=g2, grad_topk_weights=gtw)

    # ---- memory
    def memory(self, fn, leaves, exclude, saved: bool):
        """(peak GiB over one call, graph-retained bytes, saved_tensors_hooks bytes) beyond what existed before;
        the last two (a second call, keeping its output and graph) only with ``saved`` (forward lines)."""
        for t in leaves:
            t.grad = None
        excluded = {t.untyped_storage().data_ptr() for t in exclude if isinstance(t, torch.Tensor)}
        seen = {}

        def pack(t):
            try:
                st = t.untyped_storage()
                if st.data_ptr() not in excluded:
                    seen[st.data_ptr()] = st.nbytes()
            except (RuntimeError, NotImplementedError):  # a tensor without storage (a wrapper subclass)
                pass
            return t

        cuda = self.dev.type == "cuda"
        peak = retained = float("nan")
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            for t in leaves:
                t.grad = None
            C.free_cuda()
            base = torch.cuda.memory_allocated()
        if not saved:
            return peak, float("nan"), float("nan")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        if cuda and isinstance(out, torch.Tensor):
            torch.cuda.synchronize()
            retained = torch.cuda.memory_allocated() - base - out.untyped_storage().nbytes()
        del out
        for t in leaves:
            t.grad = None
        return peak, retained, float(sum(seen.values()))

    # ---- one point
    def run_one(self, provider, model, rows):
        nan3 = (float("nan"),) * 3
        if self.budget.spent(reserve=15):
            self.note("time budget spent: the points left were skipped")
            print(f"[skip] {model} rows={rows} {provider}: time budget spent", flush=True)
            return nan3
        s = self.shape(model)
        try:
            check = self.validate(model, rows)
            if provider.startswith("fp8") and check.startswith("FP8 forward+backward raised"):
                return nan3
            fns, leaves = self.fns(model, rows)
            fn = fns[provider]
            ctx = self.get_ctx(model, rows)
            T = ctx["T"]
            fw = ctx["fw"]
            exclude = [*leaves, ctx["tid"], ctx["gout"], *(t for t in fw if isinstance(t, torch.Tensor))] \
                if isinstance(fw, tuple) else [*leaves, ctx["tid"], ctx["gout"]]
            peak, retained, hooked = self.memory(fn, leaves, exclude, saved=provider in ("fp8_fwd", "bf16_fwd"))
            ms, lo, hi = C.bench(fn, rep=self.args.rep)
            for t in leaves:
                t.grad = None
        except Exception as exc:
            print(f"[error] {model} rows={rows} {provider}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            if self.args.verbose:
                traceback.print_exc()
            if provider.startswith("fp8"):
                self.failures.append(f"{model} rows={rows} {provider}: {type(exc).__name__}: {str(exc)[:120]}")
            self.log.add(model=model, rows=rows, provider=provider, status=f"error: {type(exc).__name__}: "
                                                                           f"{str(exc)[:120]}")
            C.free_cuda()
            return nan3
        fwd_flops = 2.0 * T * TOPK * 3 * s["I"] * s["H"]
        flops = {"fp8_fwd": fwd_flops, "bf16_fwd": fwd_flops, "fp8_wquant": float("nan")}.get(provider, 3 * fwd_flops)
        row = dict(model=model, E=s["E"], H=s["H"], I=s["I"], top_k=TOPK, rows=rows, T=T, provider=provider, ms=ms,
                   ms_p20=lo, ms_p80=hi, tflops=C.tflops(flops, ms), peak_GiB=peak, retained_B_tok=retained / T,
                   hooks_B_tok=hooked / T, master_dtype=str(self.args.master_dtype).replace("torch.", ""),
                   scale_fmt=self.args.scale_fmt, fp8_backend=self.fp8_deep.last_backend() or "",
                   status=self.get_ctx(model, rows)["checked"])
        self.results[(model, rows, provider)] = row = self.log.add(**row)
        print(f"  {model} rows={rows:5d} T={T:6d} {provider:13s} {ms:9.3f} ms {row['tflops']:7.1f} TFLOP/s  "
              f"peak {peak:6.2f} GiB  retained {retained / T:8.0f} B/tok  hooks {hooked / T:8.0f} B/tok", flush=True)
        return ms, lo, hi

    def marks(self):
        import triton.testing as tt
        a = self.args
        benches = [tt.Benchmark(x_names=["rows"], x_vals=s["rows"], line_arg="provider", line_vals=a.providers,
                                line_names=a.providers, ylabel="ms", plot_name=f"moe_train_{m}_ms{a.tag}", x_log=True,
                                args={"model": m}) for m, s in a.models.items()]

        @tt.perf_report(benches)
        def run(rows, provider, model):
            return self.run_one(provider, model, rows)
        return run

    def finish(self):
        rows = list(self.results.values())
        for r in rows:
            b = self.results.get((r["model"], r["rows"], BASELINE.get(r["provider"], "")))
            r["x_bf16"] = b["ms"] / r["ms"] if b else float("nan")
        self.log.flush()
        for m, s in self.args.models.items():
            series = {p: [self.results.get((m, n, p), {}).get("x_bf16", float("nan")) for n in s["rows"]]
                      for p in self.args.providers if p.startswith("fp8") and p != "fp8_wquant"}
            if any(v == v for vs in series.values() for v in vs):
                C.plot(self.out_dir / f"moe_train_{m}_speedup{self.args.tag}.png", series, s["rows"],
                       xlabel="rows per expert", ylabel="BF16 ms / ms (> 1 = faster)", logx=True,
                       title=f"MoE layer training step, {m}: E={s['E']} top-{TOPK} H={s['H']} I={s['I']}")
        print()
        print(f"SUMMARY moe_train {C.env_line()}")
        print(f"SUMMARY moe_train master weights {self.args.master_dtype}, scale_fmt {self.args.scale_fmt}, "
              f"fp8 backend {self.args.fp8_backend}; BF16 on "
              f"{'torch._grouped_mm' if grouped_mm_available(self.dev) else 'a per-expert loop (no _grouped_mm)'}")
        for n in self.notes:
            print(f"SUMMARY moe_train note: {n}")
        for m, s in self.args.models.items():
            for n in s["rows"]:
                ctx_msg = next((r["status"] for r in rows if r["model"] == m and r["rows"] == n), None)
                if ctx_msg:
                    print(f"SUMMARY moe_train check {m} rows={n}: {ctx_msg}")
        C.print_table(rows, ["model", "rows", "T", "provider", "ms", "tflops", "x_bf16", "peak_GiB", "retained_B_tok",
                             "hooks_B_tok"],
                      title=f"moe_train ({C.card_name()}; x_bf16 = BF16 ms / ms of the same pass, > 1 = faster; "
                            f"target fwd+bwd >= 1.3x)", prefix="SUMMARY moe_train")
        if self.failures:
            for f in self.failures:
                print(f"SUMMARY moe_train FAILED: {f}")
        print(f"[done] {len(rows)} timings in {self.budget.elapsed():.0f} s -> {self.log.path}")


def _ints(s):
    return [int(v) for v in str(s).split(",") if v.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    p.add_argument("--rows", type=_ints, default=None, help="rows per expert for every model (default: each model's)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {PROVIDERS}")
    p.add_argument("--quick", action="store_true", help="dsv3_ep32 at 1024 rows per expert, qwen3_30b at 256")
    p.add_argument("--master-dtype", default="bf16", choices=["bf16", "fp32"],
                   help="dtype of w13/w2 (the master weights; gradients come back in it). Default bf16")
    p.add_argument("--scale-fmt", default="fp32", choices=["fp32", "ue8m0"])
    p.add_argument("--fp8-backend", default="auto", choices=["auto", "triton", "deep_gemm"])
    p.add_argument("--no-spec-check", dest="spec_check", action="store_false",
                   help="skip the check against fp8_deep.reference at each model's first shape")
    p.add_argument("--rep", type=int, default=100, help="do_bench rep time in ms")
    p.add_argument("--time-budget", type=float, default=230,
                   help="seconds for the whole script (default 230); points left after it are skipped, with a note")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes (E=8, H=256, I=128, 16 rows per expert) on the CPU, FP8 kernels through Triton's "
                        "interpreter: plumbing and numerics checks, times mean nothing")
    p.add_argument("--tag", default="", help="suffix of the CSV/PNG names")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    a.master_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.master_dtype]
    a.providers = [s.strip() for s in a.providers.split(",") if s.strip()]
    bad = [s for s in a.providers if s not in PROVIDERS]
    if bad:
        p.error(f"unknown providers {bad}; known: {PROVIDERS}")
    names = [s.strip() for s in a.models.split(",") if s.strip()]
    bad = [s for s in names if s not in MODELS]
    if bad:
        p.error(f"unknown models {bad}; known: {list(MODELS)}")
    a.models = {m: dict(MODELS[m]) for m in names}
    if a.quick:
        a.models = {m: {**s, "rows": QUICK[m]} for m, s in a.models.items()}
    if a.rows:
        a.models = {m: {**s, "rows": a.rows} for m, s in a.models.items()}
    if a.cpu_smoke:
        a.models = {m: dict(s) for m, s in SMOKE.items()}
        if a.rows:
            a.models["smoke"]["rows"] = a.rows
        a.time_budget = None
    for m, s in a.models.items():
        for n in s["rows"]:
            if n * s["E"] % TOPK:
                p.error(f"{m}: rows * E must divide by top-{TOPK} for balanced routing, got rows={n}, E={s['E']}")
    return a


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("bench_train needs a CUDA GPU (run it on the GPU machine); --cpu-smoke for a dry run")
        return 0
    print(C.env_line())
    print(f"models {args.models}, top-{TOPK}, providers {args.providers}, master {args.master_dtype}, "
          f"scale_fmt {args.scale_fmt}, fp8 backend {args.fp8_backend}, budget {args.time_budget} s", flush=True)
    tb = TrainBench(args)
    C.run_bench(tb)
    return 1 if tb.failures else 0


if __name__ == "__main__":
    sys.exit(main())
