"""Compile the fused GEMM1 + SwiGLU kernel and the block-map GEMM it must match for Hopper (sm_90) on a machine
without a GPU, and compare what each K block's product compiles to: the MMA kind (wgmma or mma.sync, and its
operand types), FMA contraction of the promotion, and the epilogue's conversions.

    python bench/diag/swiglu_compile_check.py             # every fused variant of tests/test_gemm_swiglu.py
    SWIGLU_DUMP=dir python bench/diag/swiglu_compile_check.py   # also write ttgir / ptx per kernel

The two kernels give the same bytes only if each 128-K block's dot runs the same instruction sequence in both
(the tensor cores' internal accumulation differs between wgmma and mma.sync, and between operand types). Run it
under each Triton the package supports (the GPU machine has 3.6, CI 3.9).
"""
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch  # noqa: E402
import triton  # noqa: E402

from fp8_deep.kernels.grouped_gemm import _grouped_gemm_fp8_blockmap_kernel, _grouped_gemm_swiglu_kernel  # noqa: E402
from fp8_deep.numerics import FP8_DTYPE, FP8_MAX  # noqa: E402
from fp8_deep.ops.grouped_gemm import GemmConfig  # noqa: E402
from fp8_deep.testing.compile_check import compile_kernel  # noqa: E402

VARIANTS = {  # tests/test_gemm_swiglu.py FUSED_CONFIGS
    "swap16": "BLOCK_M=16,BLOCK_N=128,GROUP_M=1,SWAP_AB=1,BLOCK_MAP=1,num_warps=4,num_stages=2",
    "swap16tma": "BLOCK_M=16,BLOCK_N=128,GROUP_M=1,SWAP_AB=1,BLOCK_MAP=1,TMA_B=1,num_warps=4,num_stages=3",
}  # swap-AB only: the fused kernel refuses plain-orientation tiles (ops.grouped_gemm._fused_swiglu_config says why)


def _operands(cfg, E=8, I=256, K=512, M=256):
    a = torch.zeros(M, K, dtype=FP8_DTYPE)
    sa = torch.empty_strided((M, K // 128), (1, M), dtype=torch.float32)
    b = torch.zeros(E, 2 * I, K, dtype=FP8_DTYPE)
    sb = torch.zeros(E, 2 * I // 128, K // 128, dtype=torch.float32)
    be = torch.zeros(M // 16, dtype=torch.int32)
    mi = torch.zeros(M, dtype=torch.int32)
    if cfg.TMA_B:
        from triton.tools.tensor_descriptor import TensorDescriptor
        b_fused = TensorDescriptor(b, [E * 2 * I, K], [b.stride(1), 1], [128, 128])
        b_gemm = TensorDescriptor(b, [E * 2 * I, K], [b.stride(1), 1], [cfg.BLOCK_N, 128])
    else:
        b_fused = b_gemm = b
    return a, sa, b, sb, be, mi, b_fused, b_gemm, M, I, K, E


def fused(cfg):
    a, sa, b, sb, be, mi, b_arg, _, M, I, K, E = _operands(cfg)
    q = torch.empty(M, I, dtype=FP8_DTYPE)
    s = torch.empty_strided((M, I // 128), (1, M), dtype=torch.float32)
    args = (a, sa, b_arg, sb, q, s, be, mi, M, I, K, E, a.stride(0), sa.stride(0), sa.stride(1), b.stride(0),
            b.stride(1), sb.stride(0), sb.stride(1), sb.stride(2), q.stride(0), q.stride(1), s.stride(0), s.stride(1))
    kw = dict(EPS=1e-10, FP8_MAX=FP8_MAX, UE8M0=False, ACCURATE_EXP=True, FMA_DIV=True, NAN_MAX=True,
              NAN_SELECT=False, BLOCK_M=cfg.BLOCK_M, BLOCK_K=128, GROUP_M=cfg.GROUP_M,
              EVEN_K=True, ACC_K=cfg.ACC_K, UPCAST=cfg.UPCAST, MAP_BLOCK=16, TMA_B=bool(cfg.TMA_B),
              num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return compile_kernel(_grouped_gemm_swiglu_kernel, args, kw)


def gemm(cfg):
    a, sa, b, sb, be, mi, _, b_arg, M, I, K, E = _operands(cfg)
    out = torch.empty(M, 2 * I, dtype=torch.bfloat16)
    args = (a, sa, b_arg, sb, out, be, mi, mi, M, 2 * I, K, E, M, 1, a.stride(0), sa.stride(0), sa.stride(1),
            b.stride(0), b.stride(1), sb.stride(0), sb.stride(1), sb.stride(2), out.stride(0), out.stride(1))
    kw = dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=128, GROUP_M=cfg.GROUP_M, SWAP_AB=cfg.SWAP_AB,
              EVEN_K=True, ACC_K=cfg.ACC_K, UPCAST=cfg.UPCAST, MAP_BLOCK=16, TMA_B=bool(cfg.TMA_B),
              num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return compile_kernel(_grouped_gemm_fp8_blockmap_kernel, args, kw)


def summary(ck):
    ptx, ttgir = ck.asm["ptx"], ck.asm["ttgir"]
    mma = sorted(set(re.findall(r"(wgmma\.mma_async\S*|mma\.sync\S*)", ptx)))
    dots = sorted(set(re.findall(r"(tt\.dot|ttng\.warp_group_dot|triton_nvidia_gpu\.warp_group_dot)\b[^\n]*?"
                                 r"(?:maxNumImpreciseAcc = \d+)?", ttgir)))
    imprecise = sorted(set(re.findall(r"maxNumImpreciseAcc = (\d+)", ttgir)))
    enc = sorted(set(re.findall(r"#ttg\.nvidia_mma<\{versionMajor = (\d+), versionMinor = \d+, warpsPerCTA = "
                                r"(\[[^\]]*\])(?:, instrShape = (\[[^\]]*\]))?", ttgir)))
    return dict(mma=mma, dot_ops=len(dots), imprecise=imprecise, mma_enc=enc,
                fma=len(re.findall(r"\bfma\.rn\.f32", ptx)), cvt_f16=len(re.findall(r"cvt\.rn\.f16x2\.e4m3x2", ptx)))


def main():
    """Exit status 1 when a kernel fails to compile or a fused variant's dot compiles to other MMA instructions
    than the GEMM it must match (tests/test_kernel_source.py runs this)."""
    print(f"triton {triton.__version__}")
    dump = os.environ.get("SWIGLU_DUMP")
    status = 0
    for name, spec in VARIANTS.items():
        cfg = GemmConfig.parse(spec)
        seen = {}
        for kind, build in (("fused", fused), ("gemm", gemm)):
            try:
                ck = build(cfg)
            except Exception as exc:  # report and go on
                status = 1
                print(f"{name:11s} {kind:5s} FAILED {type(exc).__name__}: {str(exc)[-1500:]}")
                continue
            seen[kind] = summary(ck)
            print(f"{name:11s} {kind:5s} {seen[kind]}")
            if dump:
                os.makedirs(dump, exist_ok=True)
                for ext in ("ttgir", "ptx"):
                    with open(os.path.join(dump, f"{name}_{kind}.{ext}"), "w") as f:
                        f.write(ck.asm[ext])
        if len(seen) == 2 and (seen["fused"]["mma"], seen["fused"]["mma_enc"]) != (seen["gemm"]["mma"],
                                                                               seen["gemm"]["mma_enc"]):
            status = 1
            print(f"{name:11s} MMA MISMATCH: the fused kernel's dot is not the GEMM's")
    return status


if __name__ == "__main__":
    sys.exit(main())
