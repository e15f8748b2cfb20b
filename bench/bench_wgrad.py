"""Benchmark: the MoE weight-gradient GEMM (FP8, grouped along K = tokens) vs BF16 ``torch._grouped_mm`` and DeepGEMM.

``out[e] (P, Q) = A_e^T B_e`` over each expert's token rows. Shapes (balanced rows per expert, 128-aligned
segments, MN-major TMA-aligned 128x1 scales, as the producers write them):

* DeepSeek-V3, E=32: dW13 (P=2I=4096, Q=H=7168) and dW2 (P=H=7168, Q=I=2048) at 256 / 512 / 1024 / 2048 rows;
* Qwen3-30B-A3B-like, E=128, H=2048, I=768: dW13 (1536 x 2048), dW2 (2048 x 768) at 256 / 1024 rows.

Providers (same operands; each validated once against the float32 reference before it is timed):
``fp8_bf16`` ours writing the bf16 gradient once; ``fp8_fp32`` ours writing float32; ``fp8_acc`` ours adding into a
float32 main_grad (read-modify-write); ``bf16`` ``torch._grouped_mm`` 2-D x 2-D with ``offs`` along K on the
dequantized operands in BF16; ``deepgemm`` DeepGEMM's SM90 ``k_grouped_fp8_gemm_nt_contiguous`` into a float32 C
(it always accumulates: its natural mode; the operand re-layout it needs is done once, outside the timing), when
``deep_gemm`` imports (else a skip note). Per shape the floors are printed: output bytes at 3.0 TB/s (2 B per
element for bf16, 4 for float32, 8 for read+write of a float32 accumulator) and FLOPs at ~1000 TFLOP/s.

    python bench/bench_wgrad.py                        # every shape, every provider
    python bench/bench_wgrad.py --shapes dsv3_dw13 --rows 256 512
    python bench/bench_wgrad.py --sweep                # also every WGRAD_CONFIGS entry of ours (bf16 out)
    python bench/bench_wgrad.py --cpu-smoke            # plumbing only (Triton interpreter, tiny shape)

Writes ``bench/results/<card>/wgrad.csv`` (card name and versions on every row) and perf_report's CSV/PNG.
"""
from __future__ import annotations

import argparse
import os
import sys

# (E, P, Q) per shape name; P = rows of a_t (gradient rows), Q = rows of b_t
SHAPES = {
    "dsv3_dw13": (32, 4096, 7168),
    "dsv3_dw2": (32, 7168, 2048),
    "qwen_dw13": (128, 1536, 2048),
    "qwen_dw2": (128, 2048, 768),
}
ROWS = {"dsv3_dw13": (256, 512, 1024, 2048), "dsv3_dw2": (256, 512, 1024, 2048),
        "qwen_dw13": (256, 1024), "qwen_dw2": (256, 1024)}
PROVIDERS = ("fp8_bf16", "fp8_fp32", "fp8_acc", "bf16", "deepgemm")
HBM_TBPS = 3.0       # floor bandwidth (H100 SXM copy rate is ~3.0 TB/s read+write)
PEAK_TFLOPS = 1000.0  # ~dense FP8 rate reachable on an H100


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--rows", nargs="*", type=int, default=None, help="rows per expert (default: per shape, above)")
    p.add_argument("--providers", nargs="*", default=list(PROVIDERS), choices=list(PROVIDERS))
    p.add_argument("--sweep", action="store_true", help="also time each WGRAD_CONFIGS entry (ours, bf16 out)")
    p.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shape through the Triton interpreter (plumbing)")
    return p.parse_args(argv)


def make_operands(E, P, Q, rows, device, seed=0):
    """FP8 operands over E balanced 128-aligned segments: a_t (P, M), b_t (Q, M), MN-major TMA-aligned scales."""
    import torch

    from fp8_deep.numerics import BLOCK, FP8_DTYPE, align, cdiv
    seg = align(rows, BLOCK)
    M = E * seg
    g = torch.Generator(device=device).manual_seed(seed)

    def fp8(R):
        q = torch.empty(R, M, dtype=FP8_DTYPE, device=device)
        for r0 in range(0, R, 1024):  # bounded temporaries
            r1 = min(R, r0 + 1024)
            q[r0:r1] = torch.randn(r1 - r0, M, generator=g, device=device, dtype=torch.bfloat16).to(FP8_DTYPE)
        s = torch.empty_strided((R, cdiv(M, BLOCK)), (1, align(R, 4)), dtype=torch.float32, device=device)
        s.copy_(torch.rand(R, cdiv(M, BLOCK), generator=g, device=device) * 1e-2 + 5e-3)
        return q, s

    a_t, sa = fp8(P)
    b_t, sb = fp8(Q)
    offsets = torch.arange(E, dtype=torch.int32, device=device) * seg
    counts = torch.full((E,), rows, dtype=torch.int32, device=device)
    return a_t, sa, b_t, sb, offsets, counts


def reference_expert(a_t, sa, b_t, sb, off, cnt):
    from fp8_deep.reference import dequantize_activation
    sl, blocks = slice(off, off + cnt), slice(off // 128, off // 128 + (cnt + 127) // 128)
    return dequantize_activation(a_t[:, sl], sa[:, blocks]) @ dequantize_activation(b_t[:, sl], sb[:, blocks]).t()


def validate(out, ops, what):
    """Experts 0 and E-1 against the float32 reference: max error relative to the expert's max (< 2e-2)."""
    a_t, sa, b_t, sb, offsets, counts = ops
    E = offsets.numel()
    for e in sorted({0, E - 1}):
        ref = reference_expert(a_t, sa, b_t, sb, int(offsets[e]), int(counts[e]))
        err = ((out[e].float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()
        if not err < 2e-2:
            raise AssertionError(f"{what}: expert {e} max relative error {err:.3e}")


def bf16_provider(ops):
    """``torch._grouped_mm(A (P, M), B (M, Q), offs)`` on the dequantized operands in BF16, or (None, why)."""
    import torch
    if not hasattr(torch, "_grouped_mm"):
        return None, "torch._grouped_mm missing"
    from fp8_deep.reference import dequantize_activation
    a_t, sa, b_t, sb, offsets, counts = ops
    # the valid token rows packed tightly (BF16 needs no 128-row alignment): groups end at cumsum(counts)
    cols = torch.cat([torch.arange(o, o + c, device=a_t.device) for o, c in zip(offsets.tolist(), counts.tolist())])
    a16 = torch.empty(a_t.shape[0], cols.numel(), dtype=torch.bfloat16, device=a_t.device)
    b16 = torch.empty(b_t.shape[0], cols.numel(), dtype=torch.bfloat16, device=b_t.device)
    for src, s, dst in ((a_t, sa, a16), (b_t, sb, b16)):
        for r0 in range(0, src.shape[0], 1024):
            dst[r0:r0 + 1024] = dequantize_activation(src[r0:r0 + 1024], s[r0:r0 + 1024])[:, cols].bfloat16()
    offs = torch.cumsum(counts, 0).to(torch.int32)
    fn = lambda: torch._grouped_mm(a16, b16.t(), offs=offs, out_dtype=torch.bfloat16)  # noqa: E731
    try:
        fn()
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        return None, f"torch._grouped_mm (2-D x 2-D, offs along K) failed: {str(exc).splitlines()[0][:100]}"
    return fn, ""


def deepgemm_provider(ops):
    """DeepGEMM's k-grouped kernel accumulating into a float32 C (operands re-laid out once, here), or (None, why)."""
    import torch
    try:
        from fp8_deep.integrations.deep_gemm import deep_gemm_k_grouped_operands, k_grouped_gemm_fp8_deep_gemm
        import deep_gemm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - not installed / not loadable: reported, not fatal
        return None, None, f"deep_gemm unavailable: {str(exc).splitlines()[0][:100]}"
    a_t, sa, b_t, sb, offsets, counts = ops
    try:
        prepared = deep_gemm_k_grouped_operands(*ops)
        d = torch.zeros(offsets.numel(), a_t.shape[0], b_t.shape[0], dtype=torch.float32, device=a_t.device)
        k_grouped_gemm_fp8_deep_gemm(*ops, out=d, operands=prepared)  # zeroes d, then C = D: the product
        validate(d, ops, "deepgemm")
    except Exception as exc:  # noqa: BLE001 - a DeepGEMM build that rejects these shapes: a note, not a crash
        return None, None, f"deep_gemm k-grouped failed: {str(exc).splitlines()[0][:100]}"
    fn = lambda: k_grouped_gemm_fp8_deep_gemm(*ops, out=d, accumulate=True, operands=prepared)  # noqa: E731
    return fn, d, ""


def main(argv=None):
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("bench_wgrad: needs a CUDA GPU (or --cpu-smoke for a plumbing run); nothing to do")
        return 0
    import triton

    import _common as C
    from fp8_deep.ops.wgrad import WGRAD_CONFIGS, k_grouped_gemm_fp8, pick_wgrad_config

    device = C.device()
    print(C.env_line())
    shapes = {k: SHAPES[k] for k in args.shapes}
    rows_of = {k: (tuple(args.rows) if args.rows else ROWS[k]) for k in shapes}
    if args.cpu_smoke:
        shapes, rows_of = {"smoke": (2, 96, 80)}, {"smoke": (130,)}
    points = [f"{k}@{r}" for k in shapes for r in rows_of[k]]
    providers = list(args.providers) + ([f"cfg{i}" for i in range(len(WGRAD_CONFIGS))] if args.sweep else [])
    log = C.CsvLog(C.results_dir() / "wgrad.csv")
    state = {"point": None}
    summary = []
    notes = set()

    def setup(point):
        if state["point"] == point:
            return state
        state.clear()
        C.free_cuda()
        name, rows = point.split("@")
        E, P, Q = shapes[name]
        rows = int(rows)
        ops = make_operands(E, P, Q, rows, device)
        state.update(point=point, name=name, E=E, P=P, Q=Q, rows=rows, ops=ops, fns={}, outs={})
        elems = E * P * Q
        flops = 2.0 * E * rows * P * Q
        state["flops"] = flops
        floors = {"flop_ms": flops / (PEAK_TFLOPS * 1e12) * 1e3,
                  "out_bf16_ms": elems * 2 / (HBM_TBPS * 1e12) * 1e3,
                  "out_fp32_ms": elems * 4 / (HBM_TBPS * 1e12) * 1e3,
                  "out_acc_ms": elems * 8 / (HBM_TBPS * 1e12) * 1e3}
        state["floors"] = floors
        print(f"FLOOR {point}: E={E} P={P} Q={Q} rows={rows}: FLOPs {floors['flop_ms']:.3f} ms at "
              f"{PEAK_TFLOPS:.0f} TFLOP/s; output {floors['out_bf16_ms']:.3f} (bf16) / {floors['out_fp32_ms']:.3f} "
              f"(fp32) / {floors['out_acc_ms']:.3f} (fp32 read+write) ms at {HBM_TBPS} TB/s; pick "
              f"{pick_wgrad_config(rows, P, Q)}", flush=True)
        return state

    def provider_fn(st, provider):
        """(fn, out, note): validated once before the first timing."""
        if provider in st["fns"]:
            return st["fns"][provider]
        ops, E, P, Q = st["ops"], st["E"], st["P"], st["Q"]
        fn, out, note = None, None, ""
        if provider in ("fp8_bf16", "fp8_fp32", "fp8_acc") or provider.startswith("cfg"):
            dtype = torch.float32 if provider in ("fp8_fp32", "fp8_acc") else torch.bfloat16
            cfg = WGRAD_CONFIGS[int(provider[3:])] if provider.startswith("cfg") else None
            out = torch.empty(E, P, Q, dtype=dtype, device=device)
            out.fill_(float("nan"))
            k_grouped_gemm_fp8(*ops, out=out, out_dtype=dtype, config=cfg)
            validate(out, ops, provider)
            acc = provider == "fp8_acc"
            fn = lambda: k_grouped_gemm_fp8(*ops, out=out, out_dtype=dtype, accumulate=acc, config=cfg)  # noqa
        elif provider == "bf16":
            fn, note = bf16_provider(ops)
            if fn is not None:
                try:
                    validate(fn(), ops, "bf16")
                except AssertionError as exc:
                    fn, note = None, f"torch._grouped_mm output mismatch: {exc}"
        elif provider == "deepgemm":
            fn, out, note = deepgemm_provider(ops)
        st["fns"][provider] = (fn, out, note)
        return st["fns"][provider]

    @triton.testing.perf_report(triton.testing.Benchmark(
        x_names=["point"], x_vals=points, line_arg="provider", line_vals=providers, line_names=providers,
        ylabel="ms", plot_name="wgrad", args={}))
    def run(point, provider):
        st = setup(point)
        fn, _, note = provider_fn(st, provider)
        if fn is None:
            if note not in notes:
                print(f"[skip] {provider}: {note}", flush=True)
                notes.add(note)
            return float("nan"), float("nan"), float("nan")
        ms, lo, hi = C.bench(fn, rep=args.rep)
        fl = st["floors"]
        floor = max(fl["flop_ms"], {"fp8_fp32": fl["out_fp32_ms"], "fp8_acc": fl["out_acc_ms"],
                                    "deepgemm": fl["out_acc_ms"]}.get(provider, fl["out_bf16_ms"]))
        row = log.add(shape=st["name"], E=st["E"], P=st["P"], Q=st["Q"], rows_per_expert=st["rows"],
                      provider=provider, ms=ms, ms_p20=lo, ms_p80=hi, tflops=C.tflops(st["flops"], ms),
                      floor_ms=floor, pct_of_floor=floor / ms * 100,
                      config=str(WGRAD_CONFIGS[int(provider[3:])]) if provider.startswith("cfg") else
                      (str(pick_wgrad_config(st["rows"], st["P"], st["Q"])) if provider.startswith("fp8") else ""))
        summary.append(row)
        print(f"{point:18s} {provider:9s} {ms:8.3f} ms {C.tflops(st['flops'], ms):7.1f} TFLOP/s  floor {floor:.3f} ms "
              f"({floor / ms * 100:5.1f}%)", flush=True)
        return ms, hi, lo

    try:
        C.run_mark(run, C.results_dir())
    finally:
        base = {(r["shape"], r["rows_per_expert"]): r["ms"] for r in summary if r["provider"] == "bf16"}
        for r in summary:
            b = base.get((r["shape"], r["rows_per_expert"]))
            r["x_bf16"] = b / r["ms"] if b else float("nan")
        C.print_table(summary, ["shape", "rows_per_expert", "provider", "ms", "tflops", "floor_ms", "pct_of_floor",
                                "x_bf16"], title="wgrad: time, TFLOP/s, floor, speed vs BF16 _grouped_mm",
                      prefix="SUMMARY")
        for n in sorted(notes):
            print(f"SUMMARY note: {n}")
        print(f"wrote {log.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
