"""Accumulation precision of the FP8 grouped GEMM against float64, and its effect on the MoE test bar.

    python bench/diag/diag_accum.py --seeds 41 --variants ",ACC_K=32,UPCAST=1"

1. One 128-K-block GEMM problem (quantized Gaussian data): the float32 output of our kernel and of the float32
   emulated reference (dequantize, matmul) against the same product in float64. Reported as the error relative to
   the row's largest |h| and as the share of outputs whose bf16 rounding differs from the float64 one.
2. The small MoE test case (T=6, E=4, H=256, I=128, top-2) over many seeds: the worst ratio of
   ``|ours - emulated| / (0.035 + 0.035 |emulated|)`` (the test fails above 1), per tile variant.
3. ``--hw-model``: our kernel against ``reference.block_scaled_matmul(..., accumulate="tensor_core")``.
4. ``--perf "E,N,K,rows;..."``: the time of each variant on E balanced segments.
Variants are GemmConfig fields added to the config the launcher would pick (e.g. ``ACC_K=32``, ``UPCAST=1``).
H100 figures (run be1830c): docs/performance-log.md.
"""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from test_moe import make_moe  # noqa: E402

import fp8_deep  # noqa: E402
from fp8_deep.testing import patch_interpreter_fp8_cast  # noqa: E402
from fp8_deep import ops, reference  # noqa: E402
from fp8_deep.ops.grouped_gemm import CONFIG_ENV, GemmConfig, peak_rows_per_expert, pick_config  # noqa: E402


def with_variant(base: GemmConfig, variant: str) -> str:
    return str(base) + ("," + variant if variant else "")


def one_expert_gemm(dev, M, N, K, config=None, seed=0):
    """Quantized Gaussian (M, K) x (N, K) operands and our kernel's float32 output on them (one expert)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(M, K, generator=g, device=dev, dtype=torch.bfloat16)
    w = torch.randn(1, N, K, generator=g, device=dev, dtype=torch.bfloat16).div_(K ** 0.5)
    qa, sa = ops.quantize_activation(x, scale_layout="tma_aligned", backend="triton")
    qb, sb = ops.quantize_weight_blockwise(w)
    off = torch.zeros(1, dtype=torch.int32, device=dev)
    cnt = torch.full((1,), M, dtype=torch.int32, device=dev)
    ours = ops.grouped_gemm_fp8(qa, sa, qb, sb, off, cnt, out_dtype=torch.float32, config=config)
    exact = reference.dequantize_activation(qa, sa.contiguous()).double() @ \
        reference.dequantize_blockwise(qb[0], sb[0]).double().t()
    return (qa, sa, qb[0], sb[0]), ours, exact


def rel_and_flips(h, exact):
    """max |h - exact| / max_row |exact|, and the share of outputs whose bf16 rounding differs from exact's."""
    scale = exact.abs().amax(dim=1, keepdim=True)
    rel = ((h.double() - exact).abs() / scale).max().item()
    flips = (h.to(torch.bfloat16) != exact.to(torch.bfloat16)).float().mean().item()
    return rel, flips


def gemm_error(dev, M, N, K, variant, seed=0):
    cfg = with_variant(pick_config(M), variant)
    ops_args, ours, exact = one_expert_gemm(dev, M, N, K, cfg, seed)
    emu = reference.block_scaled_matmul(*ops_args)
    return cfg, {"ours": rel_and_flips(ours, exact), "emu": rel_and_flips(emu, exact)}


def hw_model(dev, M, N, K, seed=0):
    """Our float32 GEMM output against the reference's model of the tensor cores' in-block accumulation
    (``accumulate="tensor_core"``: cuBLAS FP8 per 128-K block, promoted in float32 like the kernel)."""
    ops_args, ours, exact = one_expert_gemm(dev, M, N, K, seed=seed)
    model = reference.block_scaled_matmul(*ops_args, accumulate="tensor_core")
    rel, flips = rel_and_flips(ours, model.double())
    same = (ours == model).float().mean().item()
    print(f"M={M} N={N} K={K}: ours vs model rel {rel:.2e}, bit-equal {same:.4f}, bf16-diff {flips:.4f}; "
          f"model vs float64 rel {rel_and_flips(model, exact)[0]:.2e}", flush=True)


def moe_ratio(dev, seed, variant):
    """Worst |ours - emulated| / (0.035 + 0.035 |emulated|) over the four scale/weight paths, against the float32
    reference and (CUDA) the tensor-core model."""
    args = make_moe(6, 4, 256, 128, 2, dev, seed=seed)
    base = pick_config(peak_rows_per_expert(12, 4))
    os.environ[CONFIG_ENV] = with_variant(base, variant)
    accs = ("fp32", "tensor_core") if dev == "cuda" else ("fp32",)
    worst = {acc: 0.0 for acc in accs}
    try:
        for fmt, pre in (("fp32", True), ("ue8m0", False), ("ue8m0", True), ("fp32", False)):
            hidden, w13, w2, w, ids = args
            kw = dict(scale_fmt=fmt)
            if pre:
                q13, s13 = ops.quantize_weight_blockwise(w13, scale_fmt=fmt)
                q2, s2 = ops.quantize_weight_blockwise(w2, scale_fmt=fmt)
                w13, w2 = q13, q2
                kw.update(w13_scale=s13, w2_scale=s2)
            out = fp8_deep.moe_forward(hidden, w13, w2, w, ids, backend="triton", **kw).float()
            for acc in accs:
                emu = reference.moe_forward_fp8_emulated(hidden, w13, w2, w, ids, accumulate=acc, **kw).float()
                r = ((out - emu).abs() / (0.035 + 0.035 * emu.abs())).max().item()
                worst[acc] = max(worst[acc], r)
        return worst
    finally:
        del os.environ[CONFIG_ENV]


def gemm_perf(dev, E, N, K, rows, variants, rep):
    """TFLOP/s of our grouped GEMM on E balanced segments of ``rows`` rows, the picked config plus each variant."""
    import triton.testing as tt
    g = torch.Generator(device=dev).manual_seed(0)
    M = E * rows
    a = torch.randn(M, K, generator=g, device=dev).to(torch.float8_e4m3fn)
    sa = torch.rand(K // 128, M, generator=g, device=dev).t()  # MN-major, as the MoE hands them over
    b = torch.empty(E, N, K, dtype=torch.float8_e4m3fn, device=dev)
    for e in range(E):
        b[e] = torch.randn(N, K, generator=g, device=dev).to(torch.float8_e4m3fn)
    sb = torch.rand(E, N // 128, K // 128, generator=g, device=dev)
    off = torch.arange(E, dtype=torch.int32, device=dev) * rows
    cnt = torch.full((E,), rows, dtype=torch.int32, device=dev)
    out = torch.empty(M, N, dtype=torch.bfloat16, device=dev)
    base = pick_config(rows)
    line = []
    for v in variants:
        cfg = with_variant(base, v)
        try:
            ms = tt.do_bench(lambda: ops.grouped_gemm_fp8(a, sa, b, sb, off, cnt, out=out, config=cfg), rep=rep)
            line.append(f"[{v or 'default'}] {ms:.3f} ms {2 * M * N * K / ms / 1e9:.0f} TFLOP/s "
                        f"{E * N * K / ms / 1e9:.0f} GB/s-w")
        except Exception as exc:  # a variant that does not compile is a finding, not a crash
            line.append(f"[{v or 'default'}] FAILED {type(exc).__name__}: {str(exc)[:120]}")
    print(f"E={E} N={N} K={K} rows={rows} base {base}: " + " | ".join(line), flush=True)
    del a, b


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=41)
    p.add_argument("--perf", default="", help="';'-separated E,N,K,rows problems to time per variant")
    p.add_argument("--rep", type=int, default=40)
    p.add_argument("--hw-model", action="store_true", help="compare against a cuBLAS FP8 per-block model")
    p.add_argument("--variants", default=",ACC_K=32,UPCAST=1", help="comma-free list separated by ';' or ','")
    a = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    patch_interpreter_fp8_cast()
    variants = [v.strip() for v in a.variants.replace(";", ",").split(",")]
    variants = [v for i, v in enumerate(variants) if v or i == 0]
    print(f"device {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}; variants {variants}")
    print("== GEMM accumulation vs float64 (float32 out): max |h - h64| / max_row|h64|, share of bf16(h) != bf16(h64)")
    shapes = ((8, 256, 256), (16, 4096, 7168), (256, 4096, 7168)) if dev == "cuda" else ((8, 256, 256),)
    for M, N, K in shapes:
        for v in variants:
            cfg, res = gemm_error(dev, M, N, K, v)
            print(f"M={M:4d} N={N} K={K} [{v or 'default'}] ours rel {res['ours'][0]:.2e} bf16-diff "
                  f"{res['ours'][1]:.4f} | emu rel {res['emu'][0]:.2e} bf16-diff {res['emu'][1]:.4f}  ({cfg})")
    if dev == "cuda" and a.hw_model:
        print("== tensor-core accumulation model (cuBLAS FP8 per 128-K block) vs our kernel")
        for M, N, K in ((16, 256, 256), (16, 4096, 7168), (256, 4096, 7168)):
            hw_model(dev, M, N, K)
    for prob in filter(None, a.perf.split(";")):
        E, N, K, rows = (int(x) for x in prob.split(","))
        gemm_perf(dev, E, N, K, rows, variants, a.rep)
    print(f"== MoE test case T=6 E=4 H=256 I=128 top-2, seeds 0..{a.seeds - 1}: worst |ours-emu|/(0.035+0.035|emu|)")
    for v in variants:
        res = [moe_ratio(dev, s, v) for s in range(a.seeds)]
        for acc in res[0]:
            ratios = [r[acc] for r in res]
            bad = [(s, round(r, 3)) for s, r in enumerate(ratios) if r > 1]
            print(f"[{v or 'default'}] vs {acc} reference: max {max(ratios):.3f} median "
                  f"{sorted(ratios)[len(ratios) // 2]:.3f} failing {len(bad)}/{len(ratios)} {bad}")


if __name__ == "__main__":
    main()
