"""Lean MoE sweep: one process, one weight set per I, fp8_deep (cached FP8 weights) vs the BF16 MoE and the BF16
GEMM-only bound, all timed in the same run. Holds only BF16 + FP8 weights (fits an 80 GB H100 at DeepSeek-V3 size).

    python bench/moe_sweep.py --T 1,16,128,512,2048,4096,16384 --I 2048,256
    python bench/moe_sweep.py --configs "BLOCK_M=32,BLOCK_N=128,SWAP_AB=1,PERSISTENT=1,num_warps=4,num_stages=5;..."

Also times ``backend="deep_gemm"`` and ``backend="auto"`` when DeepGEMM is importable, and each ``--configs`` entry
(our Triton GEMMs pinned to that tile configuration through ``FP8_DEEP_GEMM_CONFIG``) beside the default pick.
"""
import argparse
import os
import sys
from pathlib import Path

import torch
import triton.testing as tt

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import fp8_deep  # noqa: E402
from fp8_deep import ops  # noqa: E402
from fp8_deep.testing import calc_diff  # noqa: E402
from fp8_deep.testing.baselines import bf16_moe_grouped_mm, route_sorted, silu_mul_bf16  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--T", default="1,16,128,512,2048,4096,16384")
    p.add_argument("--I", default="2048,256")
    p.add_argument("--E", type=int, default=256)
    p.add_argument("--H", type=int, default=7168)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--rep", type=int, default=40)
    p.add_argument("--tag", default="", help="suffix of the CSV name")
    p.add_argument("--configs", default="", help="';'-separated GemmConfig strings to time beside the default pick")
    a = p.parse_args()
    configs = [c.strip() for c in a.configs.split(";") if c.strip()]
    from fp8_deep.ops import _registry
    has_dg = _registry.available("grouped_gemm", "deep_gemm")
    print(f"deep_gemm importable: {has_dg}", flush=True)
    # the topk_ids range check syncs with the host (FP8_DEEP_CHECK_ROUTING=1): report which setting ran
    print(f"FP8_DEEP_CHECK_ROUTING={os.environ.get('FP8_DEEP_CHECK_ROUTING', '1')}", flush=True)
    E, H, k = a.E, a.H, a.k
    rows = []
    for inter in [int(v) for v in a.I.split(",")]:
        g = torch.Generator(device="cuda").manual_seed(inter)
        w13 = torch.empty(E, 2 * inter, H, dtype=torch.bfloat16, device="cuda").normal_(0, H ** -0.5, generator=g)
        w2 = torch.empty(E, H, inter, dtype=torch.bfloat16, device="cuda").normal_(0, inter ** -0.5, generator=g)
        q13, s13 = ops.quantize_weight_blockwise(w13)
        q2, s2 = ops.quantize_weight_blockwise(w2)
        for T in [int(v) for v in a.T.split(",")]:
            x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=g)
            probs = torch.softmax(torch.randn(T, E, device="cuda", generator=g), -1)
            tw, tid = probs.topk(k, dim=-1)
            tw = tw / tw.sum(-1, keepdim=True)
            tid = tid.to(torch.int32)

            def fp8_backend(name):
                return lambda: fp8_deep.moe_forward(x, q13, q2, tw, tid, w13_scale=s13, w2_scale=s2, backend=name)

            fp8 = fp8_backend("triton")

            def bf16():
                return bf16_moe_grouped_mm(x, w13, w2, tw, tid)

            _, tok, offs = route_sorted(tid, E)
            xs = x.index_select(0, tok)

            def bf16_gemm():
                h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
                return torch._grouped_mm(silu_mul_bf16(h), w2.transpose(1, 2), offs=offs)

            extra = {}
            for name in (["deep_gemm", "auto"] if has_dg else []):
                try:
                    fn = fp8_backend(name)
                    fn()
                    extra[f"{name}_ms"] = tt.do_bench(fn, rep=a.rep, return_mode="median")
                    extra[f"{name}_is"] = fp8_deep.last_backend() if name == "auto" else name
                except Exception as exc:  # report and go on: the sweep's other lines still count
                    print(f"[error] backend {name} T={T} I={inter}: {exc!r}", flush=True)
            for i, cfg in enumerate(configs):
                os.environ["FP8_DEEP_GEMM_CONFIG"] = cfg
                try:
                    fp8()
                    extra[f"cfg{i}_ms"] = tt.do_bench(fp8, rep=a.rep, return_mode="median")
                except Exception as exc:
                    print(f"[error] config {cfg} T={T} I={inter}: {exc!r}", flush=True)
                finally:
                    os.environ.pop("FP8_DEEP_GEMM_CONFIG", None)

            gib = 2 ** 30
            base = torch.cuda.memory_allocated() / gib
            out8 = fp8()
            t_fp8 = tt.do_bench(fp8, rep=a.rep, return_mode="median")
            m_fp8 = torch.cuda.memory_allocated() / gib
            ref = bf16()
            m_bf16_1 = torch.cuda.memory_allocated() / gib
            err = calc_diff(out8, ref)
            del out8, ref
            t_bf16 = tt.do_bench(bf16, rep=a.rep, return_mode="median")
            t_gemm = tt.do_bench(bf16_gemm, rep=a.rep, return_mode="median")
            print(f"MEM T={T}: weights+inputs {base:.1f} GiB, after fp8 timing {m_fp8:.1f}, after one bf16 call "
                  f"{m_bf16_1:.1f}, after bf16 timing {torch.cuda.memory_allocated() / gib:.1f}, "
                  f"peak {torch.cuda.max_memory_allocated() / gib:.1f}", flush=True)
            flops = 2 * T * k * (2 * inter * H + inter * H)
            row = dict(I=inter, T=T, fp8_ms=t_fp8, bf16_ms=t_bf16, bf16_gemm_ms=t_gemm, x_bf16=t_bf16 / t_fp8,
                       x_bound=t_gemm / t_fp8, fp8_tflops=flops / t_fp8 / 1e9, calc_diff=err, **extra)
            rows.append(row)
            print("SWEEP " + " ".join(f"{key}={val:.4g}" if isinstance(val, float) else f"{key}={val}"
                                      for key, val in row.items()), flush=True)
        torch.cuda.empty_cache()
    for i, cfg in enumerate(configs):
        print(f"SWEEP cfg{i} = {cfg}")
    out = C.results_dir() / f"moe_sweep{a.tag}.csv"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out, "w") as f:
        f.write(",".join(keys) + "\n")
        for r in rows:
            f.write(",".join(f"{r[k]:.6g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
