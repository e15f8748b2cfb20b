"""Main job: ``python -m fp8_deep`` runs one FP8 MoE forward and reports its error (and time) against BF16.

On a GPU: DeepSeek-V3 shapes (E=256, top-8, H=7168, I=2048, T=4096 by default). Without one: a tiny layer through
Triton's CPU interpreter (the same kernels; the process restarts itself with ``TRITON_INTERPRET=1`` because the
variable must be set before Triton is imported).
"""
import argparse
import os
import sys

import torch


def _parse():
    p = argparse.ArgumentParser(prog="python -m fp8_deep", description=__doc__)
    p.add_argument("--tokens", "-T", type=int, default=None, help="tokens (default 4096 on GPU, 16 on CPU)")
    p.add_argument("--experts", "-E", type=int, default=None, help="experts (default 256 on GPU, 8 on CPU)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size H (default 7168 on GPU, 256 on CPU)")
    p.add_argument("--inter", type=int, default=None, help="intermediate size I (default 2048 on GPU, 128 on CPU)")
    p.add_argument("--top-k", type=int, default=None, help="experts per token (default 8 on GPU, 2 on CPU)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "deep_gemm"])
    p.add_argument("--scale-fmt", default="fp32", choices=["fp32", "ue8m0"])
    return p.parse_args()


def main():
    args = _parse()
    gpu = torch.cuda.is_available()
    if not gpu and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "fp8_deep", *sys.argv[1:]])
    if not gpu:
        from fp8_deep.testing import patch_interpreter_fp8_cast
        patch_interpreter_fp8_cast()

    import fp8_deep
    from fp8_deep import ops, reference
    from fp8_deep.testing import calc_diff

    dev = "cuda" if gpu else "cpu"
    T = args.tokens or (4096 if gpu else 16)
    E = args.experts or (256 if gpu else 8)
    H = args.hidden or (7168 if gpu else 256)
    inter = args.inter or (2048 if gpu else 128)
    k = args.top_k or (8 if gpu else 2)
    torch.manual_seed(0)
    print(f"fp8_deep {fp8_deep.__version__}: MoE forward on {torch.cuda.get_device_name() if gpu else 'CPU (Triton interpreter)'}")
    print(f"  T={T} E={E} top-{k} H={H} I={inter} scale_fmt={args.scale_fmt}")
    hidden = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    w13 = torch.randn(E, 2 * inter, H, device=dev, dtype=torch.bfloat16) / H ** 0.5
    w2 = torch.randn(E, H, inter, device=dev, dtype=torch.bfloat16) / inter ** 0.5
    probs = torch.softmax(torch.randn(T, E, device=dev), -1)
    topk_w, topk_ids = probs.topk(k, dim=-1)
    topk_w = topk_w / topk_w.sum(-1, keepdim=True)
    topk_ids = topk_ids.to(torch.int32)

    q13, s13 = ops.quantize_weight_blockwise(w13, scale_fmt=args.scale_fmt)  # cached, as FP8MoE does
    q2, s2 = ops.quantize_weight_blockwise(w2, scale_fmt=args.scale_fmt)

    def fp8():
        return fp8_deep.moe_forward(hidden, q13, q2, topk_w, topk_ids, w13_scale=s13, w2_scale=s2,
                                    scale_fmt=args.scale_fmt, backend=args.backend)

    out = fp8()
    if gpu:
        from fp8_deep.testing.baselines import bf16_moe_grouped_mm
        ref = bf16_moe_grouped_mm(hidden, w13, w2, topk_w, topk_ids)
    else:
        ref = reference.moe_forward_bf16(hidden, w13, w2, topk_w, topk_ids)
    print(f"  grouped GEMM backend: {fp8_deep.last_backend()}")
    print(f"  FP8 vs BF16: calc_diff = {calc_diff(out, ref):.2e} (DeepGEMM's bar for one GEMM: 1e-3; a whole layer, "
          f"four quantizations deep, ~2e-3)")
    if gpu:
        import triton.testing
        t_fp8 = triton.testing.do_bench(fp8, return_mode="median")
        t_bf16 = triton.testing.do_bench(lambda: bf16_moe_grouped_mm(hidden, w13, w2, topk_w, topk_ids),
                                         return_mode="median")
        print(f"  FP8 (cached weights) {t_fp8:.3f} ms | BF16 torch._grouped_mm MoE {t_bf16:.3f} ms | "
              f"speed-up {t_bf16 / t_fp8:.2f}x")


if __name__ == "__main__":
    main()
