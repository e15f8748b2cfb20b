"""Is torch.compile's 0.1% lead on the 32-expert weight stacks in its kernel's code or in how it is launched?

Dumps the Triton kernel inductor generated for bench_quant's compiled weight reference (source, arguments, the
launch configuration it kept, the call in the compiled graph), then (``--launch``) runs that same JIT function
from here, on our own buffers, beside torch.compile's call and ours (CUDA-graph replays over two input sets, the
method of diag_weight_tail.py).

Outcome (H100, run e37b8e2; docs/performance-log.md): inductor's kernel launched from here times as torch.compile
(0.9999 / 1.0002 on 32x4096x7168 / 32x7168x2048): the lead is in the kernel's code, not in its launch. With the
contract's math swapped in (``ind_exact``: RN(amax / 448) and RN(1 / s), our bytes) it runs 0.9995 / 1.0011
(A/A 0.9998 / 1.0009), ours 0.9990 / 0.9994; with its sizes passed at run time instead of baked in, 0.87x (the
reduction loop no longer folds to one iteration).

Run 2d7c020 (``DIAG_TIMER=do_bench``: do_bench's loop, the acceptance method, instead of graph replays): ind_exact
0.9998 / 1.0006 (A/A 1.0000 / 1.0004), the tile kernel 0.9990 / 0.9982 (run d0f6207). That op sequence became the
package's ``quant_weight_stack_kernel``; run 2d7c020: ours (now that kernel) 0.9998 / 0.9996, ind_exact 0.9998 / 0.9999,
A/A 1.0000 / 1.0002, the tile kernel (``tile``) 0.9986 / 0.9981.

    python bench/diag/diag_inductor_kernel.py            # dump
    python bench/diag/diag_inductor_kernel.py --launch   # dump, then time compile / its kernel launched here / ours
    DIAG_TIMER=do_bench DIAG_ROUNDS=8 DIAG_VARIANTS=ind_exact python bench/diag/diag_inductor_kernel.py --launch
"""
import argparse  # noqa: E402

if __name__ == "__main__":  # --help works without a GPU; the flags read below pass through
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_known_args()

import os
import re
import sys
from pathlib import Path

if "--launch" not in sys.argv:
    os.environ.setdefault("TORCH_LOGS", "output_code")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from bench_quant import weight_ref_fast  # noqa: E402

SHAPE = tuple(int(d) for d in os.environ.get("DIAG_SHAPE", "32x4096x7168").split("x"))


def inductor_kernels():
    """[(name, CachingAutotuner)] of every Triton kernel inductor has loaded."""
    from torch._inductor.codecache import PyCodeCache
    mods = list(getattr(PyCodeCache, "modules", []) or getattr(PyCodeCache, "cache", {}).values())
    out = []
    for mod in mods:
        for name, obj in vars(mod).items():
            if getattr(obj, "launchers", None) is not None and hasattr(obj, "fn"):
                out.append((name, obj))
    return out


def main():
    w = (torch.randn(SHAPE, device="cuda") * 0.02).to(torch.bfloat16)
    comp = torch.compile(weight_ref_fast, dynamic=False)
    q, s = comp(w)
    torch.cuda.synchronize()
    print(f"compile outputs: q {tuple(q.shape)} {q.dtype} {q.stride()}, s {tuple(s.shape)} {s.stride()}")
    for name, obj in inductor_kernels():
        fn = obj.fn
        print(f"### {name}: arg_names {getattr(fn, 'arg_names', None)}")
        for ln in obj.launchers:
            cfg = getattr(ln, "config", None)
            print(f"### launcher: regs {getattr(ln, 'n_regs', None)} spills {getattr(ln, 'n_spills', None)} "
                  f"config {getattr(cfg, 'kwargs', None)} warps {getattr(cfg, 'num_warps', None)} "
                  f"stages {getattr(cfg, 'num_stages', None)}")
        print(getattr(fn, "src", "<no src>"))
    if "--launch" in sys.argv:
        del w, q, s  # time_launched makes its own input sets
        time_launched(comp)


def rebuilt(name, src):
    """A fresh JITFunction from inductor's kernel source (the one inductor loaded cannot be launched directly), in a
    module with the imports inductor's generated modules carry."""
    import importlib.util
    import tempfile
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text("import triton\nimport triton.language as tl\n"
                    "from torch._inductor.runtime import triton_helpers\n"
                    "from torch._inductor.runtime.triton_helpers import math as tl_math\n"
                    "from torch._inductor.runtime.triton_helpers import libdevice\n\n"
                    f"@triton.jit\n{src}\n")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, name)


def exact_math(src):
    """The contract's math (fp8_deep.reference): s = RN(amax / 448), q = w * RN(1 / s), instead of inductor's
    amax * (1/448) and approximate reciprocal."""
    src, n1 = re.subn(r"(tmp\d+) = (tmp\d+) \* tmp\d+\n(\s+)tl\.store\(out_ptr1",
                      r"\1 = tl.math.div_rn(\2, 448.0)\n\3tl.store(out_ptr1", src)
    src, n2 = re.subn(r"(tmp\d+) = \(tmp\d+ / (tmp\d+)\)",
                      r"\1 = tl.math.div_rn(tl.full([1, 1], 1.0, tl.float32), \2)", src)
    assert n1 == 1 and n2 == 1, (n1, n2)
    return src


def fast_exact_math(src):
    """The contract's math without the division's range check and slow path (FCHK + branch): s = RN(amax / 448)
    as RN(amax * c) corrected by one exact-residual FMA (Markstein; c = RN(1/448)), RN(1 / s) as the hardware
    reciprocal refined by ptxas's own div.rn fast-path sequence. Valid where that fast path is (normal s and 1/s:
    amax in [1e-4, FLT_MAX]); the bytes are compared with the contract's below."""
    src, n1 = re.subn(r"(\s+)(tmp\d+) = (tmp\d+) \* (tmp\d+)\n(\s+)tl\.store\(out_ptr1",
                      r"\1q0_ = \3 * \4\1\2 = tl.fma(tl.fma(-q0_, tl.full([1, 1], 448.0, tl.float32), \3), \4, q0_)"
                      r"\n\5tl.store(out_ptr1", src)
    src, n2 = re.subn(r"(\s+)(tmp\d+) = \(tmp\d+ / (tmp\d+)\)",
                      r'\1y0_ = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [\3], '
                      r'dtype=tl.float32, is_pure=True, pack=1)'
                      r"\1one_ = tl.full([1, 1], 1.0, tl.float32)"
                      r"\1y1_ = tl.fma(y0_, tl.fma(-\3, y0_, one_), y0_)"
                      r"\1\2 = tl.fma(y1_, tl.fma(-\3, y1_, one_), y1_)", src)
    assert n1 == 1 and n2 == 1, (n1, n2)
    return src


def runtime_numel(src):
    """xnumel / r0_numel as runtime arguments (inductor assigns them as constants inside the kernel)."""
    src, n = re.subn(r"\n\s+(xnumel|r0_numel) = \d+", "", src)
    assert n == 2, n
    return src


def runtime_strides(src):
    """The row stride, the block-row stride and the blocks per row as runtime arguments (SN, SB, KB)."""
    m = re.search(r"r0_2 \+ 128\*x0 \+ (\d+)\*r0_3 \+ (\d+)\*x1", src)
    src = src.replace(m.group(0), "r0_2 + 128*x0 + SN*r0_3 + SB*x1")
    src = re.sub(r"xindex % \d+", "xindex % KB", src)
    src = re.sub(r"xindex // \d+", "xindex // KB", src)
    return src.replace("r0_numel, XBLOCK", "r0_numel, SN, SB, KB, XBLOCK")


VARIANTS = {"inductor_here": [], "ind_exact": [exact_math], "ind_exact_rt": [exact_math, runtime_numel],
            "ind_exact_rts": [exact_math, runtime_numel, runtime_strides], "ind_fastrn": [fast_exact_math]}
VARIANTS = {k: v for k, v in VARIANTS.items() if k in os.environ.get("DIAG_VARIANTS", ",".join(VARIANTS)).split(",")}


def time_launched(comp):
    """compile (inductor's wrapper: allocations + launcher), its JIT function launched here on preallocated
    buffers, and ours (diag_weight_tail's k2w8, the default), interleaved graph replays over two input sets."""
    import diag_weight_tail as D
    from fp8_deep import ops
    # the code cache can list one module twice: every entry named for the amax reduction is the same kernel
    name, obj = next((n, o) for n, o in inductor_kernels() if "amax" in n)
    cfg = obj.launchers[0].config
    sets = D.input_sets(SHAPE)
    E, N, K = SHAPE
    xnumel, rnumel = E * (N // 128) * (K // 128), 128 * 128
    q_ref, s_ref = ops.quantize_weight_blockwise(sets[0][0])
    qc, sc = comp(sets[0][0])
    fns = {"compile": [lambda w=w: comp(w) for w, _, _ in sets]}
    for vname, steps in VARIANTS.items():
        src = obj.fn.src
        for step in steps:
            src = step(src)
        fn = rebuilt(name, src)
        extra = (K, 128 * K, K // 128) if runtime_strides in steps else ()

        def theirs(w, q, s, fn=fn, extra=extra):
            # the compiled graph's call: (in_ptr0, out_ptr1 = scales, out_ptr2 = q, xnumel, r0_numel)
            fn[(xnumel,)](w, s, q, xnumel, rnumel, *extra, **cfg.kwargs, num_warps=cfg.num_warps,
                          num_stages=cfg.num_stages)

        w, q, s = sets[0]
        theirs(w, q, s)
        torch.cuda.synchronize()
        print(f"{vname}: vs torch.compile's output {D.n_differing(q, s, qc, sc)} elements differ, vs ours "
              f"(the contract) {D.n_differing(q, s, q_ref, s_ref)}")
        fns[vname] = [lambda t=t, f=theirs: f(*t) for t in sets]
    del qc, sc, q_ref, s_ref
    fns["compile_aa"] = fns["compile"][:]
    fns["ours"] = [lambda w=w, q=q, s=s: ops.quantize_weight_blockwise(w, out=(q, s)) for w, q, s in sets]
    # the tile kernel (two blocks per program, 8 warps), the package's default for these stacks before run 2d7c020
    fns["tile"] = [lambda w=w, q=q, s=s: D.launch(w, q, s, 8, 2, None) for w, q, s in sets]
    D.print_summary(D.time_interleaved(fns, "x".join(map(str, SHAPE))))


if __name__ == "__main__":
    main()
