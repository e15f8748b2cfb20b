"""Benchmark: FP8 block-scaled grouped GEMM (ours, every candidate config + the heuristic pick) vs BF16 _grouped_mm.

DeepSeek-V3 MoE GEMMs: GEMM1 ``(rows, H=7168) x w13 (E, 2I=4096, H)``, GEMM2 ``(rows, I=2048) x w2 (E, H=7168, I)``;
E=256 (all routed experts) and E=8 (dense-ish); balanced rows per expert, 128-aligned segments (the MoE layout) and
TMA-aligned LHS scales. Timing: ``triton.testing.do_bench(return_mode="median")``. TFLOP/s count valid rows only;
GB/s is the FP8 weight bytes (+ scales) of the experts read, the figure that matters when rows are few.

    python bench/bench_grouped_gemm.py                 # full sweep (~1-2 min on an H100)
    python bench/bench_grouped_gemm.py --quick         # heuristic pick + BF16 only
    python bench/bench_grouped_gemm.py --gemm gemm2 --experts 256 --rows 16 1024
    python bench/bench_grouped_gemm.py --quick --deepgemm --rounds 5 --rows 1024 2048
    python bench/bench_grouped_gemm.py --gemm gemm2_tp8 --rows 8 --ab "FP8_DEEP_GEMM_CONFIG=<config>|<config>"

``--ab VAR=v1,v2`` times the pick once per value of an environment switch, interleaved over ``--rounds`` rounds
(A B A B ...), with the SM clock and power sampled during each timing: at the H100's 700 W cap the clock moves by
+-10% between runs, so variants are compared round by round and as TFLOP/s per GHz, never across processes.
``--deepgemm`` adds DeepGEMM's contiguous grouped GEMM on the same operands (when ``deep_gemm`` imports). This mode
writes ``bench/results/<card>/grouped_gemm_ab.csv``.

Writes ``bench/results/<card>/grouped_gemm.csv``.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# (N, K): DeepSeek-V3's two expert GEMMs, and the same on a tensor-parallel shard (TP=8: I = 256)
GEMMS = {"gemm1": (4096, 7168), "gemm2": (7168, 2048), "gemm1_tp8": (512, 7168), "gemm2_tp8": (7168, 256)}
ROWS = (4, 16, 64, 256, 512, 1024, 2048)
EXPERTS = (256, 8)


def card_name() -> str:
    return torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")


def make_weights(E, N, K, device):
    """Random FP8 weights (N(0,1) cast) and positive block scales; built per expert to bound the temporaries."""
    from fp8_deep.numerics import FP8_DTYPE, cdiv
    b = torch.empty(E, N, K, dtype=FP8_DTYPE, device=device)
    for e in range(E):
        b[e] = torch.randn(N, K, dtype=torch.bfloat16, device=device).to(FP8_DTYPE)
    b_scale = torch.rand(E, cdiv(N, 128), cdiv(K, 128), device=device) * 1e-2 + 5e-3
    return b, b_scale


def make_acts(E, rows, K, device):
    from fp8_deep.numerics import FP8_DTYPE, align, cdiv
    seg = align(rows, 128)
    M = E * seg
    a = torch.randn(M, K, dtype=torch.bfloat16, device=device).to(FP8_DTYPE)
    G = cdiv(K, 128)
    a_scale = torch.empty_strided((M, G), (1, align(M, 4)), dtype=torch.float32, device=device)
    a_scale.copy_(torch.rand(M, G, device=device) * 1e-2 + 5e-3)
    offsets = torch.arange(E, dtype=torch.int32, device=device) * seg
    counts = torch.full((E,), rows, dtype=torch.int32, device=device)
    return a, a_scale, offsets, counts


def reference_rows(a, a_scale, b, b_scale, e, lo, hi):
    """fp32 dequantized product of rows [lo, hi) with expert e (per-128-K promotion is exact in fp32 here)."""
    from fp8_deep.reference import dequantize_activation, dequantize_blockwise
    x = dequantize_activation(a[lo:hi], a_scale[lo:hi])
    w = dequantize_blockwise(b[e], b_scale[e])
    return x @ w.t()


def validate(out, a, a_scale, b, b_scale, offsets, rows, what):
    E = b.shape[0]
    for e in sorted({0, E - 1}):
        lo = int(offsets[e])
        ref = reference_rows(a, a_scale, b, b_scale, e, lo, lo + rows)
        got = out[lo:lo + rows].float()
        err = ((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()
        if not err < 2e-2:
            raise AssertionError(f"{what}: expert {e} max relative error {err:.3e}")


def bf16_grouped_mm(E, rows, N, K, device):
    """BF16 ``torch._grouped_mm`` on the valid rows only (tightly packed), or None when unavailable."""
    if not hasattr(torch, "_grouped_mm"):
        return None, "torch._grouped_mm missing"
    try:
        a = torch.randn(E * rows, K, dtype=torch.bfloat16, device=device)
        w = torch.randn(E, N, K, dtype=torch.bfloat16, device=device)
        offs = torch.arange(1, E + 1, dtype=torch.int32, device=device) * rows
        fn = lambda: torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)  # noqa: E731
        out = fn()
        ref = a[:rows].float() @ w[0].float().t()
        if not torch.allclose(out[:rows].float(), ref, atol=0.5, rtol=2e-2):
            return None, "torch._grouped_mm output mismatch"
        return fn, ""
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        return None, f"torch._grouped_mm failed: {str(exc).splitlines()[0][:80]}"


def deepgemm_fn(a, a_scale, b, b_scale, rows, out):
    """DeepGEMM's contiguous grouped GEMM over ``make_acts``' layout (128-aligned segments), or (None, why)."""
    try:
        from types import SimpleNamespace

        from fp8_deep.integrations.deep_gemm import load_backend
        backend = load_backend()
    except Exception as exc:  # noqa: BLE001 - not installed / not loadable: reported, not fatal
        return None, f"deep_gemm unavailable: {str(exc).splitlines()[0][:80]}"
    E, M = b.shape[0], a.shape[0]
    seg = M // E
    idx = torch.arange(M, device=a.device, dtype=torch.int32)
    m_indices = torch.where(idx % seg < rows, idx // seg, -1).to(torch.int32)
    plan = SimpleNamespace(num_rows=M, m_indices=m_indices, block_size=128)
    return (lambda: backend.gemm(a, a_scale, b, b_scale, plan, out=out)), ""


def ab_main(args, device, bench):
    """Interleaved timings of the pick under each value of the ``--ab`` switches (and DeepGEMM), clocks sampled."""
    import itertools
    import statistics

    from _common import ClockSampler, environ

    from fp8_deep.ops.grouped_gemm import grouped_gemm_fp8, pick_config
    specs = []
    for spec in args.ab:
        var, _, vals = spec.partition("=")  # values split on "|" when given so (a config string has commas)
        specs.append([(var, v) for v in vals.split("|" if "|" in vals else ",")])
    variants = [dict(c) for c in itertools.product(*specs)] if specs else [{}]
    records = []
    sampler = ClockSampler()
    try:
        for gname in args.gemm:
            N, K = GEMMS[gname]
            for E in args.experts:
                b, b_scale = make_weights(E, N, K, device)
                for rows in args.rows:
                    a, a_scale, offsets, counts = make_acts(E, rows, K, device)
                    flops = 2.0 * E * rows * N * K
                    out = torch.empty(a.shape[0], N, dtype=torch.bfloat16, device=device)
                    fns, cfgs = [], {}
                    for env in variants:
                        name = ",".join(f"{k}={v}" for k, v in env.items()) or "pick"
                        with environ(env):  # a variant may pin the config itself (FP8_DEEP_GEMM_CONFIG)
                            cfgs[name] = pick_config(rows, K)

                        def fn(env=env):
                            with environ(env):
                                return grouped_gemm_fp8(a, a_scale, b, b_scale, offsets, counts, out=out,
                                                        config=pick_config(rows, K))
                        fns.append((name, fn))
                    if args.deepgemm:
                        dg, why = deepgemm_fn(a, a_scale, b, b_scale, rows, out)
                        if dg is not None:
                            fns.append(("deepgemm", dg))
                        else:
                            print(f"  {why}")
                    first = None
                    for name, fn in fns:  # correctness of every variant before any timing
                        out.fill_(float("nan"))
                        fn()
                        validate(out, a, a_scale, b, b_scale, offsets, rows, f"{gname} rows={rows} {name}")
                        valid = torch.cat([out[int(o):int(o) + rows] for o in offsets.tolist()])
                        if first is None:
                            first = (name, valid)
                        elif name != "deepgemm":  # our variants should compute the same bits
                            same = torch.equal(valid.view(torch.int16), first[1].view(torch.int16))
                            print(f"{gname} rows={rows} {name}: bitwise equal to {first[0]}: {same}"
                                  f"{'' if same else '  <-- NOT BITWISE EQUAL'}", flush=True)
                    del first, valid
                    res = {name: [] for name, _ in fns}
                    for r in range(args.rounds):
                        line = []
                        for name, fn in fns:
                            fn()
                            t0 = time.time()
                            ms = bench(fn)
                            mhz, watt, n = sampler.window(t0, time.time())
                            res[name].append((ms, mhz, watt))
                            line.append(f"{name} {flops / ms * 1e-9:6.1f} TF/s @ {mhz:5.0f} MHz {watt:4.0f} W")
                        print(f"{gname} E={E} rows={rows} round {r}: " + " | ".join(line), flush=True)
                    print(f"{gname} E={E} rows={rows}: median over {args.rounds} rounds")
                    for name, v in res.items():
                        ms = statistics.median(x[0] for x in v)
                        clocks = [x[1] for x in v if x[1] == x[1]]  # rounds with clock samples
                        mhz = statistics.median(clocks) if clocks else float("nan")
                        records.append(dict(card=card_name(), gemm=gname, N=N, K=K, E=E, rows_per_expert=rows,
                                            variant=name, config=str(cfgs.get(name, "")),
                                            ms=ms, tflops=flops / ms * 1e-9, mhz=mhz,
                                            rounds_tflops=" ".join(f"{flops / x[0] * 1e-9:.1f}" for x in v),
                                            rounds_mhz=" ".join(f"{x[1]:.0f}" for x in v)))
                        print(f"SUMMARY {gname} rows={rows} {name:32s} {ms:8.3f} ms {flops / ms * 1e-9:7.1f} TFLOP/s  "
                              f"{mhz:6.0f} MHz  "
                              f"{flops / ms * 1e-9 / (mhz / 1000):7.1f} TFLOP/s per GHz  "
                              f"(rounds: {' '.join(f'{flops / x[0] * 1e-9:.0f}' for x in v)})", flush=True)
                    del a, a_scale, out, fns
                    torch.cuda.empty_cache()
                del b, b_scale
                torch.cuda.empty_cache()
    finally:
        sampler.close()
    if records:
        out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", card_name())
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "grouped_gemm_ab.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows(records)
        print(f"wrote {path}")
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gemm", nargs="*", default=["gemm1", "gemm2"], choices=list(GEMMS))
    p.add_argument("--experts", nargs="*", type=int, default=list(EXPERTS))
    p.add_argument("--rows", nargs="*", type=int, default=list(ROWS))
    p.add_argument("--quick", action="store_true", help="heuristic pick and BF16 only (no config sweep)")
    p.add_argument("--family", choices=("all", "gluon"), default="all",
                   help="gluon: the pick, the Gluon configs and the default large tiles only (a short sweep)")
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--rep", type=int, default=40, help="do_bench rep (ms)")
    p.add_argument("--ab", action="append", default=[], metavar="VAR=v1,v2 (or v1|v2)",
                   help="time the pick per value of an environment switch, interleaved (see the module docstring)")
    p.add_argument("--rounds", type=int, default=5, help="--ab rounds")
    p.add_argument("--deepgemm", action="store_true", help="also time DeepGEMM's contiguous grouped GEMM")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_grouped_gemm: needs a CUDA GPU; nothing to do")
        return 0

    import triton
    from triton.testing import do_bench

    from fp8_deep.ops.grouped_gemm import (EXPERIMENTAL_CONFIGS, GLUON_CONFIGS, LARGE_M_CONFIGS, MEDIUM_M_CONFIGS,
                                           SMALL_M_CONFIGS, grouped_gemm_fp8, pick_config)

    device = torch.device("cuda")
    card = card_name()
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", card)
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "grouped_gemm.csv")
    t_start = time.time()
    records = []
    bench = lambda fn: do_bench(fn, warmup=10, rep=args.rep, return_mode="median")  # noqa: E731
    print(f"card {card}, torch {torch.__version__}, triton {triton.__version__}")
    if args.ab or args.deepgemm:
        return ab_main(args, device, bench)

    for gname in args.gemm:
        N, K = GEMMS[gname]
        for E in args.experts:
            b, b_scale = make_weights(E, N, K, device)
            w_bytes = b.numel() + b_scale.numel() * 4
            for rows in args.rows:
                a, a_scale, offsets, counts = make_acts(E, rows, K, device)
                flops = 2.0 * E * rows * N * K
                out = torch.empty(a.shape[0], N, dtype=torch.bfloat16, device=device)
                pick = pick_config(rows, K)
                cands = [pick]
                if not args.quick:
                    family = (SMALL_M_CONFIGS if rows <= 64 else
                              MEDIUM_M_CONFIGS + GLUON_CONFIGS + LARGE_M_CONFIGS + EXPERIMENTAL_CONFIGS)
                    if args.family == "gluon" and rows > 64:
                        family = GLUON_CONFIGS + MEDIUM_M_CONFIGS + LARGE_M_CONFIGS[:1]
                    cands += [c for c in family if c != pick]
                for cfg in cands:
                    fn = lambda: grouped_gemm_fp8(a, a_scale, b, b_scale, offsets, counts, out=out,  # noqa: E731
                                                  config=cfg)
                    provider = "fp8_triton_pick" if cfg is pick else "fp8_triton"
                    try:
                        out.fill_(float("nan"))
                        fn()
                        validate(out, a, a_scale, b, b_scale, offsets, rows, f"{gname} E={E} rows={rows} {cfg}")
                        ms = bench(fn)
                        note = ""
                    except Exception as exc:  # a config that fails to compile/validate is reported, not fatal
                        ms, note = float("nan"), f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
                    records.append(dict(card=card, gemm=gname, N=N, K=K, E=E, rows_per_expert=rows,
                                        provider=provider, config=str(cfg), ms=ms, tflops=flops / ms * 1e-9,
                                        weight_gbps=w_bytes / ms * 1e-6, note=note))
                    print(f"{gname} E={E:3d} rows={rows:5d} {provider:16s} {str(cfg):75s} {ms:8.3f} ms "
                          f"{flops / ms * 1e-9:7.1f} TFLOP/s {w_bytes / ms * 1e-6:7.0f} GB/s {note}", flush=True)
                del a, a_scale, out
                if not args.no_bf16:
                    fn, note = bf16_grouped_mm(E, rows, N, K, device)
                    ms = bench(fn) if fn is not None else float("nan")
                    records.append(dict(card=card, gemm=gname, N=N, K=K, E=E, rows_per_expert=rows,
                                        provider="bf16_grouped_mm", config="", ms=ms, tflops=flops / ms * 1e-9,
                                        weight_gbps=2 * b.numel() / ms * 1e-6, note=note))
                    print(f"{gname} E={E:3d} rows={rows:5d} {'bf16_grouped_mm':16s} {'':75s} {ms:8.3f} ms "
                          f"{flops / ms * 1e-9:7.1f} TFLOP/s {note}", flush=True)
                    del fn
                torch.cuda.empty_cache()
            del b, b_scale
            torch.cuda.empty_cache()

    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]) + ["torch", "triton"])
        w.writeheader()
        for r in records:
            w.writerow(dict(r, torch=torch.__version__, triton=triton.__version__))

    # Compact table: heuristic pick, best swept config, BF16, and the ratios.
    print(f"\n{card}: FP8 grouped GEMM (ms / TFLOP/s; weight GB/s for the pick)")
    print(f"{'gemm':6s} {'E':>4s} {'rows':>5s} | {'pick ms':>8s} {'TF/s':>6s} {'GB/s':>6s} | {'best ms':>8s} "
          f"{'best config':40s} | {'bf16 ms':>8s} {'pick/bf16':>9s}")
    keys = sorted({(r["gemm"], r["E"], r["rows_per_expert"]) for r in records}, key=lambda k: (k[0], -k[1], k[2]))
    for key in keys:
        rs = [r for r in records if (r["gemm"], r["E"], r["rows_per_expert"]) == key]
        pk = next(r for r in rs if r["provider"] == "fp8_triton_pick")
        fp8 = [r for r in rs if r["provider"].startswith("fp8") and r["ms"] == r["ms"]]
        best = min(fp8, key=lambda r: r["ms"]) if fp8 else pk
        bf = next((r for r in rs if r["provider"] == "bf16_grouped_mm"), None)
        bf_ms = bf["ms"] if bf else float("nan")
        cfg_short = best["config"].replace("BLOCK_", "").replace("num_", "").replace("GROUP_M", "G")
        print(f"{key[0]:6s} {key[1]:4d} {key[2]:5d} | {pk['ms']:8.3f} {pk['tflops']:6.0f} {pk['weight_gbps']:6.0f} | "
              f"{best['ms']:8.3f} {cfg_short[:40]:40s} | {bf_ms:8.3f} {bf_ms / pk['ms']:8.2f}x")
    print(f"\nwrote {csv_path} ({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
