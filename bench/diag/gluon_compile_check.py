"""Compile every Gluon grouped-GEMM configuration for Hopper (sm_90) on a machine without a GPU, and report what the
compiled kernel looks like: registers, spills, shared memory, and whether the async-wgmma ping-pong survived ptxas.

    python bench/diag/gluon_compile_check.py                 # GLUON_CONFIGS of fp8_deep.ops.grouped_gemm, two shapes
    GLUON_DUMP=dir python bench/diag/gluon_compile_check.py  # also write ttgir / llir / ptx / sass per configuration

CPU tensors give the launch's specialization (dtypes, 16-byte divisibility); the launcher's own argument builder
(``fp8_deep.ops.grouped_gemm.gluon_launch_args``) gives the arguments, the JIT's binder packs them, and
``triton.compile`` runs the whole pipeline with the wheel's ptxas. Run it under each Triton the package supports
(the GPU machine has 3.6, CI 3.9). ``wgmma.wait_group 1`` in the PTX is only real when ptxas reports no C75xx
advisory (it serialises every wgmma when an in-flight result is read, and says so).
"""
import argparse  # noqa: E402

if __name__ == "__main__":  # --help works without a GPU; the flags read below pass through
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_known_args()

import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch  # noqa: E402
import triton  # noqa: E402

from fp8_deep.kernels import grouped_gemm_gluon as gk  # noqa: E402
from fp8_deep.numerics import FP8_DTYPE, align, cdiv  # noqa: E402
from fp8_deep.ops import grouped_gemm as gg  # noqa: E402

# DeepSeek-V3 GEMM1; ragged N and K (TMA zero-fill, masked stores) with row-major scales (global loads)
SHAPES = ((4096, 7168, "tma_aligned"), (200, 320, "row_major"))


def compile_sm90(cfg, N, K, E=4, rows=256, scale_layout="tma_aligned"):
    from fp8_deep.testing.compile_check import compile_kernel
    M = E * align(rows, 128)
    a = torch.zeros(M, K, dtype=FP8_DTYPE)
    G = cdiv(K, 128)
    # MN-major scales go through the warp-specialized kernel's TMA ring, row-major ones through global loads
    a_scale = (torch.empty_strided((M, G), (1, align(M, 4)), dtype=torch.float32) if scale_layout == "tma_aligned"
               else torch.empty(M, G, dtype=torch.float32))
    b = torch.zeros(E, N, K, dtype=FP8_DTYPE)
    b_scale = torch.zeros(E, cdiv(N, 128), cdiv(K, 128), dtype=torch.float32)
    seg = torch.zeros(E, dtype=torch.int32)
    out = torch.empty(M, N, dtype=torch.bfloat16)
    fn, _, args, kwargs = gg.gluon_launch_args(cfg, a, a_scale, b, b_scale, out, seg, seg, tiles_bound=1)
    return compile_kernel(fn, args, kwargs, gluon=True)


def _tool(name):
    import triton.backends.nvidia as nv
    return os.path.join(os.path.dirname(nv.__file__), "bin", name)


def inspect(ck):
    """(registers/stack/shared/local from cuobjdump, SASS text, ptxas wgmma advisories)."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as d:
        cubin, ptx = os.path.join(d, "k.cubin"), os.path.join(d, "k.ptx")
        with open(cubin, "wb") as f:
            f.write(ck.asm["cubin"])
        with open(ptx, "w") as f:
            f.write(ck.asm["ptx"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True)
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", cubin], capture_output=True, text=True).stdout
        pv = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", ptx, "-o", os.path.join(d, "v.cubin")],
                            capture_output=True, text=True)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", usage.stdout)
    advis = [ln.strip() for ln in (pv.stdout + pv.stderr).splitlines() if "C75" in ln] or ["none"]
    return (m.groups() if m else usage.stdout.strip()), sass, advis


def main():
    print(f"triton {triton.__version__}, torch {torch.__version__}, GLUON_AVAILABLE={gk.GLUON_AVAILABLE}")
    if not gk.GLUON_AVAILABLE:
        return 1
    status = 0
    for i, cfg in enumerate(gg.GLUON_CONFIGS):
        for N, K, layout in SHAPES:
            tag = f"GLUON_CONFIGS[{i}] N={N} K={K} {layout} scales"
            try:
                t0 = time.time()
                ck = compile_sm90(cfg, N, K, scale_layout=layout)
                usage, sass, advis = inspect(ck)
                wait1 = len(re.findall(r"wgmma\.wait_group\.sync\.aligned\s+1;", ck.asm["ptx"]))
                print(f"{tag}: ok {time.time() - t0:.1f}s REG/STACK/SHARED/LOCAL={usage} smem={ck.metadata.shared} "
                      f"wait_group1={wait1} "
                      f"GMMA={sass.count('GMMA')} STL={sass.count('STL')} LDL={sass.count('LDL')} "
                      f"ptxas advisories={advis}", flush=True)
                if os.environ.get("GLUON_DUMP"):
                    stem = os.path.join(os.environ["GLUON_DUMP"], f"cfg{i}_n{N}_k{K}")
                    os.makedirs(os.environ["GLUON_DUMP"], exist_ok=True)
                    texts = [(e, ck.asm[e]) for e in ("ttgir", "llir", "ptx") if e in ck.asm] + [("sass", sass)]
                    for ext, text in texts:
                        with open(f"{stem}.{ext}", "w") as f:
                            f.write(text)
            except Exception as exc:  # report and go on with the other configurations
                status = 1
                print(f"{tag} ({cfg}): FAILED {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
