"""Host (Python) time per ``fp8_deep.moe_forward`` call and per pipeline stage, next to the GPU time: where the
tensor-parallel shard (I=256) is launch-bound at small T, the MoE's speed-up is the host's, not the kernels'.

    python bench/diag/diag_moe_host.py [--I 256] [--T 16,128] [--profile]

Host time: best of 5 rounds of N back-to-back calls (no synchronisation inside a round; when the host is slower
than the GPU this is the call's cost). GPU time: CUDA-graph replays of the same call (``_common.bench(graph=True)``).
"""
import argparse
import functools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

import _common as C  # noqa: E402
import fp8_deep  # noqa: E402
from fp8_deep import ops  # noqa: E402
from fp8_deep.ops.backend import select_grouped_gemm  # noqa: E402
from fp8_deep.ops.combine import moe_combine  # noqa: E402
from fp8_deep.ops.grouped_gemm import FUSED_SWIGLU_ENV  # noqa: E402
from fp8_deep.ops.routing import align_routing, permute_rows  # noqa: E402
from fp8_deep.ops.swiglu import silu_mul_quantize  # noqa: E402
from fp8_deep.testing.baselines import bf16_moe_grouped_mm  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--I", type=int, default=256)
    p.add_argument("--T", default="16,128")
    p.add_argument("--E", type=int, default=256)
    p.add_argument("--H", type=int, default=7168)
    p.add_argument("--profile", action="store_true", help="cProfile 200 moe_forward calls (cumulative)")
    p.add_argument("--profile-top", type=int, default=40, help="entries of the profile to print")
    p.add_argument("--topk", type=int, default=8)
    a = p.parse_args()
    E, H, I = a.E, a.H, a.I
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * H ** -0.5
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * I ** -0.5
    q13, s13 = ops.quantize_weight_blockwise(w13)
    q2, s2 = ops.quantize_weight_blockwise(w2)
    gemm = select_grouped_gemm("triton", device=w13.device, rows_per_expert=1, hidden=H, inter=I)
    for T in (int(t) for t in a.T.split(",")):
        x = C.randn((T, H))
        tw, tid = C.random_routing(T, E, a.topk, seed=T)
        moe = functools.partial(fp8_deep.moe_forward, x, q13, q2, tw, tid, w13_scale=s13, w2_scale=s2, backend="triton")
        plan = align_routing(tid, E, block_size=gemm.row_alignment)
        qx, sx = ops.quantize_activation(x)
        a1, sa1 = permute_rows(qx, sx, plan, scale_layout=gemm.a_scale_layout)
        h = gemm.gemm(a1, sa1, q13, s13, plan)
        a2, sa2 = silu_mul_quantize(h, m_indices=plan.m_indices, scale_layout=gemm.a_scale_layout)
        o = gemm.gemm(a2, sa2, q2, s2, plan)
        stages = {
            "moe_forward (fp8, cached weights)": moe,
            "bf16 MoE (torch._grouped_mm)": lambda: bf16_moe_grouped_mm(x, w13, w2, tw, tid),
            "quantize_activation": lambda: ops.quantize_activation(x),
            "align_routing": lambda: align_routing(tid, E, block_size=gemm.row_alignment),
            "permute_rows": lambda: permute_rows(qx, sx, plan, scale_layout=gemm.a_scale_layout),
            "gemm1": lambda: gemm.gemm(a1, sa1, q13, s13, plan),
            "silu_mul_quantize": lambda: silu_mul_quantize(h, m_indices=plan.m_indices,
                                                           scale_layout=gemm.a_scale_layout),
            "gemm2": lambda: gemm.gemm(a2, sa2, q2, s2, plan),
            "moe_combine": lambda: moe_combine(o, plan.inv_perm, tw, out_dtype=x.dtype),
            # the fused forms the forward takes where they apply (FP8_DEEP_FUSED_*): one launch for two
            "quantize_permute (quant+permute)": lambda: ops.quantize_permute(x, plan,
                                                                              scale_layout=gemm.a_scale_layout),
            "align_quantize_permute (3 in 1)": lambda: ops.align_quantize_permute(
                x, tid, E, block_size=gemm.row_alignment, scale_layout=gemm.a_scale_layout),
            f"gemm_swiglu (FUSED_SWIGLU={os.environ.get(FUSED_SWIGLU_ENV, 'unset')})": lambda: gemm.gemm_swiglu(
                a1, sa1, q13, s13, plan, scale_layout=gemm.a_scale_layout),
        }
        print(f"E={E} H={H} I={I} T={T}: host us/call (best of 5 x 200) | GPU us (graph replay)", flush=True)
        for name, fn in stages.items():
            try:
                gpu = C.bench(fn, rep=50, graph=True)[0] * 1e3
            except Exception as exc:  # noqa: BLE001 - a stage that cannot be captured still gets its host time
                gpu, name = float("nan"), f"{name} (graph: {type(exc).__name__})"
            print(f"SUMMARY host I={I} T={T} {name:36s} host {C.host_us(fn, n=200):8.1f} us   GPU {gpu:8.1f} us",
                  flush=True)
        # the forward's launch plan for this signature: replayed, or why its recording was refused
        from fp8_deep.moe import plan as forward_plans
        print(f"SUMMARY host I={I} T={T} plan refusals so far: {dict(forward_plans.ForwardPlan.refusals) or 'none'}",
              flush=True)
        if a.profile:
            C.profile_calls(moe, 200, top=a.profile_top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
