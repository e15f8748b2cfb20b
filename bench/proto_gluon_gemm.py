"""Prototype: the Gluon FP8 grouped GEMM (``fp8_deep/kernels/grouped_gemm_gluon.py``) vs our Triton kernels.

The Gluon kernel overlaps each 128-K block's FP32 promotion with the next block's wgmma (``wgmma.wait_group 1``
ping-pong); see the kernel module's docstring. This script holds the launcher for now.

    python bench/proto_gluon_gemm.py                  # H100: correctness, then timings (< ~3 min)
    python bench/proto_gluon_gemm.py --skip-bench     # correctness only
    python bench/proto_gluon_gemm.py --compile-only   # no GPU needed: compile for sm_90 and inspect PTX / registers

Correctness: E=4 ragged segments (128-aligned starts), K in {7168, 320}, N in {4096, 200}, row-major and MN-major
``a_scale``, strided / fp32 outputs, against an FP32 per-128-K reference and against our Triton TMA kernel
(``BLOCK_M=128,BLOCK_N=128,TMA=1,WS=0,num_warps=8,num_stages=4``: the same hardware accumulation, so the two should
agree bitwise or within ~1e-6 of the row magnitude); rows outside the segments must stay untouched.
Timing: ``triton.testing.do_bench(rep=100, return_mode="median")``, E=256, balanced rows per expert in {1024, 2048},
GEMM1 (N=4096, K=7168) and GEMM2 (N=7168, K=2048); TFLOP/s = 2 * rows * E * N * K / t.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import triton  # noqa: E402

from fp8_deep.kernels import grouped_gemm_gluon as gk  # noqa: E402
from fp8_deep.numerics import FP8_DTYPE, align, cdiv  # noqa: E402

BLOCK_K = 128
TRITON_TMA_CONFIG = "BLOCK_M=128,BLOCK_N=128,TMA=1,WS=0,num_warps=8,num_stages=4"
# (BLOCK_M, BLOCK_N, num_warps, NUM_STAGES). 128x128 / 8 warps is the target config; 64x256 / 8 warps puts the two
# warpgroups side by side along N (same registers per thread, per-column weight scales); 64x128 / 4 warps fits two
# CTAs per SM (one CTA's prologue/epilogue overlaps the other's main loop). 128x256 needs 384 registers per thread
# for acc + two partial tiles: listed to show the spills, not expected to win.
VARIANTS = [
    (128, 128, 8, 3),
    (128, 128, 8, 4),
    (64, 256, 8, 3),
    (64, 256, 8, 4),
    (64, 128, 4, 4),
]
COMPILE_ONLY_EXTRA = [(128, 256, 8, 3)]


def _tensor_descriptor_cls():
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    return TensorDescriptor


def _descriptors(a, b, BLOCK_M, BLOCK_N):
    """Host TMA descriptors: ``a (M, K)`` with ``[BLOCK_M, 128]`` boxes, ``b`` viewed as ``(E * N, K)`` with
    ``[BLOCK_N, 128]`` boxes; 128-byte swizzled NVMMA shared layouts (128 FP8 = 128 bytes per box row)."""
    from triton.experimental.gluon import language as gl
    TensorDescriptor = _tensor_descriptor_cls()
    M, K = a.shape
    E, N, _ = b.shape
    a_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.float8e4nv)
    b_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.float8e4nv)
    a_desc = TensorDescriptor(a, [M, K], [a.stride(0), 1], [BLOCK_M, BLOCK_K], a_layout)
    b2 = b.view(E * N, K)
    b_desc = TensorDescriptor(b2, [E * N, K], [b2.stride(0), 1], [BLOCK_N, BLOCK_K], b_layout)
    return a_desc, b_desc


def _launch_args(a, a_scale, b, b_scale, offsets, counts, out, BLOCK_M, BLOCK_N, NUM_STAGES, GROUP_M, num_warps):
    """(grid, positional args, keyword args) of one launch; shared by the GPU launcher and the CPU compile check."""
    M, K = a.shape
    E, N, Kb = b.shape
    assert Kb == K and K > 0 and b.is_contiguous() and a.stride(1) == 1
    assert a.data_ptr() % 16 == 0 and a.stride(0) % 16 == 0, "TMA needs 16-byte aligned rows of a"
    a_desc, b_desc = _descriptors(a, b, BLOCK_M, BLOCK_N)
    # Upper bound of sum_e cdiv(count_e, BLOCK_M) for disjoint segments in [0, M) (as grouped_gemm_fp8).
    m_tiles_bound = (M + min(E, M) * (BLOCK_M - 1)) // BLOCK_M
    grid = (max(1, m_tiles_bound * cdiv(N, BLOCK_N)),)
    args = (a_desc, a_scale, b_desc, b_scale, out, offsets, counts, M, N, K, E,
            a_scale.stride(0), a_scale.stride(1),
            b_scale.stride(0), b_scale.stride(1), b_scale.stride(2),
            out.stride(0), out.stride(1))
    kwargs = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
                  BLOCK_E=max(32 * num_warps, triton.next_power_of_2(E)), NUM_STAGES=NUM_STAGES,
                  num_warps=num_warps)
    return grid, args, kwargs


_COMPILED = {}  # (BLOCK_M, BLOCK_N, num_warps, NUM_STAGES) -> CompiledKernel of the last launch (registers, spills)


def gluon_grouped_gemm(a, a_scale, b, b_scale, offsets, counts, out, *, BLOCK_M=128, BLOCK_N=128, NUM_STAGES=4,
                       GROUP_M=8, num_warps=8):
    """``out[r] = deq(a[r]) @ deq(b[e]).T`` for the rows of every expert's segment (see the kernel's docstring);
    ``out`` is written in place and returned. No host synchronisation (grid from host-known sizes only)."""
    grid, args, kwargs = _launch_args(a, a_scale, b, b_scale, offsets, counts, out, BLOCK_M, BLOCK_N, NUM_STAGES,
                                      GROUP_M, num_warps)
    ck = gk._grouped_gemm_fp8_gluon_kernel[grid](*args, **kwargs)
    _COMPILED[(BLOCK_M, BLOCK_N, num_warps, NUM_STAGES)] = ck
    return out


# ------------------------------------------------------------------------------------------------ CPU compile check
def _bin(name):
    import triton.backends.nvidia as nv
    return os.path.join(os.path.dirname(nv.__file__), "bin", name)


def compile_for_sm90(variant, N=4096, K=7168, E=4, rows=256, out_dtype=torch.bfloat16):
    """Compile the kernel for sm_90 without a GPU: CPU tensors give the launch's specialization (dtypes, 16-byte
    divisibility), the JIT's own binder packs signature / constexprs / attributes, ``triton.compile`` runs the whole
    pipeline (Gluon IR -> TTGIR -> LLVM -> PTX -> cubin with the wheel's ptxas) for ``GPUTarget("cuda", 90, 32)``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import create_function_from_signature

    BM, BN, nw, ns = variant
    M = E * align(rows, 128)
    a = torch.zeros(M, K, dtype=FP8_DTYPE)
    a_scale = torch.empty_strided((M, cdiv(K, 128)), (1, align(M, 4)), dtype=torch.float32)
    b = torch.zeros(E, N, K, dtype=FP8_DTYPE)
    b_scale = torch.zeros(E, cdiv(N, 128), cdiv(K, 128), dtype=torch.float32)
    offsets = torch.zeros(E, dtype=torch.int32)
    counts = torch.zeros(E, dtype=torch.int32)
    out = torch.empty(M, N, dtype=out_dtype)
    _, args, kwargs = _launch_args(a, a_scale, b, b_scale, offsets, counts, out, BM, BN, ns, 8, nw)

    fn = gk._grouped_gemm_fp8_gluon_kernel
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(GluonASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _resource_usage(cubin: bytes):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        res = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True)
        sass = subprocess.run([_bin("cuobjdump"), "--dump-sass", path], capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", res.stdout)
    return (m.groups() if m else (res.stdout.strip() or res.stderr.strip()), sass)


def _ptxas_advisories(ptx: str):
    """Re-run the ptxas Triton uses for sm_90 on the PTX and return its wgmma advisories (C7514: wgmma serialised;
    C7517: wait_group injected): the PTX's wait_group 1 is only real when there are none."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", src, "-o", dst], capture_output=True, text=True)
    log = r.stdout + r.stderr
    return [line.strip() for line in log.splitlines() if "C75" in line or "wgmma" in line.lower()] or ["none"]


def compile_only():
    print(f"triton {triton.__version__}, torch {torch.__version__}, GLUON_AVAILABLE={gk.GLUON_AVAILABLE}")
    if not gk.GLUON_AVAILABLE:
        return 1
    status = 0
    for variant in VARIANTS + COMPILE_ONLY_EXTRA:
        for (N, K) in ((4096, 7168), (200, 320)):
            tag = f"BM={variant[0]} BN={variant[1]} warps={variant[2]} stages={variant[3]} N={N} K={K}"
            try:
                t0 = time.time()
                ck = compile_for_sm90(variant, N=N, K=K)
                ptx = ck.asm["ptx"]
                usage, sass = _resource_usage(ck.asm["cubin"])
                wait1 = len(re.findall(r"wgmma\.wait_group\.sync\.aligned\s+1;", ptx))
                wait0 = len(re.findall(r"wgmma\.wait_group\.sync\.aligned\s+0;", ptx))
                print(f"{tag}: ok {time.time() - t0:.1f}s  REG/STACK/SHARED/LOCAL={usage}  "
                      f"smem(meta)={ck.metadata.shared}  PTX: wgmma.mma_async={ptx.count('wgmma.mma_async')} "
                      f"wait_group1={wait1} wait_group0={wait0} bar.sync={len(re.findall(r'bar(rier)?.sync', ptx))} "
                      f"tma_load={ptx.count('cp.async.bulk.tensor')} fma.rn.f32={ptx.count('fma.rn.f32')}  "
                      f"SASS: xGMMA={sass.count('GMMA')} WARPGROUP.DEPBAR={sass.count('WARPGROUP.DEPBAR')} "
                      f"FFMA={sass.count('FFMA')} MOV={len(re.findall(r' MOV ', sass))} "
                      f"STL={sass.count('STL')} LDL={sass.count('LDL')}", flush=True)
                print(f"    ptxas wgmma advisories: {_ptxas_advisories(ptx)}", flush=True)
                if os.environ.get("PROTO_DUMP"):
                    d = os.environ["PROTO_DUMP"]
                    os.makedirs(d, exist_ok=True)
                    stem = os.path.join(d, f"bm{variant[0]}_bn{variant[1]}_w{variant[2]}_s{variant[3]}_n{N}_k{K}")
                    for ext in ("ttgir", "llir", "ptx"):
                        if ext in ck.asm:
                            with open(f"{stem}.{ext}", "w") as f:
                                f.write(ck.asm[ext])
                    with open(f"{stem}.sass", "w") as f:
                        f.write(sass)
            except Exception as exc:  # report and go on with the other variants
                status = 1
                print(f"{tag}: FAILED {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    return status


# ------------------------------------------------------------------------------------------------ GPU correctness
def _reference(a, a_scale, b, b_scale, e, lo, hi):
    """FP32 per-128-K promotion of rows [lo, hi) with expert e."""
    K = a.shape[1]
    N = b.shape[1]
    acc = torch.zeros(hi - lo, N, dtype=torch.float32, device=a.device)
    for kb in range(cdiv(K, BLOCK_K)):
        ks = slice(kb * BLOCK_K, min((kb + 1) * BLOCK_K, K))
        part = a[lo:hi, ks].float() @ b[e, :, ks].float().t()
        sb = b_scale[e, :, kb].repeat_interleave(BLOCK_K)[:N]
        acc += part * a_scale[lo:hi, kb, None] * sb[None, :]
    return acc


def _make_case(counts_list, N, K, mn_major, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    E = len(counts_list)
    segs = [max(align(max(c, 0), 128), 128) for c in counts_list]  # every expert owns >= 128 rows: padding rows
    offsets_list = [sum(segs[:i]) for i in range(E)]
    M = sum(segs) + 128  # trailing rows belong to no expert
    a = (torch.randn(M, K, generator=g, device=device) * 2).to(FP8_DTYPE)
    G = cdiv(K, 128)
    if mn_major:
        a_scale = torch.empty_strided((M, G), (1, align(M, 4)), dtype=torch.float32, device=device)
    else:
        a_scale = torch.empty(M, G, dtype=torch.float32, device=device)
    a_scale.copy_(torch.rand(M, G, generator=g, device=device) * 1e-2 + 5e-3)
    b = (torch.randn(E, N, K, generator=g, device=device) * 2).to(FP8_DTYPE)
    b_scale = torch.rand(E, cdiv(N, 128), G, generator=g, device=device) * 1e-2 + 5e-3
    offsets = torch.tensor(offsets_list, dtype=torch.int32, device=device)
    counts = torch.tensor(counts_list, dtype=torch.int32, device=device)
    return a, a_scale, b, b_scale, offsets, counts


def _segment_rows(offsets, counts, M):
    valid = torch.zeros(M, dtype=torch.bool)
    for off, cnt in zip(offsets.tolist(), counts.tolist()):
        if cnt > 0:
            valid[off:off + cnt] = True
    return valid


def _row_rel_diff(x, y):
    """max over rows of max|x - y| / max|y| (the row's magnitude)."""
    if x.numel() == 0:
        return 0.0
    scale = y.abs().amax(dim=1).clamp(min=1e-30)
    return ((x - y).abs().amax(dim=1) / scale).max().item()


def correctness(variants, device):
    from fp8_deep.ops.grouped_gemm import grouped_gemm_fp8
    cases = []
    for counts_list in ((0, 1, 130, 300), (-3, 1, 130, 300)):
        for (N, K) in ((4096, 7168), (200, 320), (4096, 320), (200, 7168)):
            for mn_major in (True, False):
                if counts_list[0] < 0 and not (N == 4096 and K == 7168 and mn_major):
                    continue  # the negative-count case once is enough
                cases.append((counts_list, N, K, mn_major, "bf16"))
    cases.append(((0, 1, 130, 300), 200, 320, True, "fp32"))
    cases.append(((0, 1, 130, 300), 4096, 7168, True, "fp16-strided"))
    rows = []
    for counts_list, N, K, mn_major, out_kind in cases:
        a, a_scale, b, b_scale, offsets, counts = _make_case(counts_list, N, K, mn_major, device)
        M = a.shape[0]
        valid = _segment_rows(offsets, counts, M)
        ref = torch.full((M, N), float("nan"), device=device)
        for e, (off, cnt) in enumerate(zip(offsets.tolist(), counts.tolist())):
            if cnt > 0:
                ref[off:off + cnt] = _reference(a, a_scale, b, b_scale, e, off, off + cnt)
        out_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16-strided": torch.float16}[out_kind]
        tri = torch.full((M, N), 7.0, dtype=out_dtype, device=device)
        try:
            grouped_gemm_fp8(a, a_scale, b, b_scale, offsets, counts, out=tri, config=TRITON_TMA_CONFIG)
        except Exception as exc:
            tri = None
            print(f"  triton TMA kernel failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        for v in variants:
            tag = (f"counts={counts_list} N={N} K={K} a_scale={'MN' if mn_major else 'row'}-major out={out_kind} "
                   f"gluon{v}")
            try:
                if out_kind == "fp16-strided":
                    buf = torch.full((M, N + 64), 7.0, dtype=out_dtype, device=device)
                    out = buf[:, 32:32 + N]
                else:
                    out = torch.full((M, N), 7.0, dtype=out_dtype, device=device)
                gluon_grouped_gemm(a, a_scale, b, b_scale, offsets, counts, out, BLOCK_M=v[0], BLOCK_N=v[1],
                                   num_warps=v[2], NUM_STAGES=v[3])
                torch.cuda.synchronize()
                vd = valid.to(device)
                got = out[vd].float()
                want = ref[vd]
                err_ref = ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item() if got.numel() else 0.0
                untouched = bool((out[~vd] == 7.0).all().item())
                if out_kind == "fp16-strided":
                    untouched &= bool((buf[:, :32] == 7.0).all().item()) and bool((buf[:, 32 + N:] == 7.0).all().item())
                if tri is not None:
                    t = tri[vd].float()
                    d_tri = _row_rel_diff(got, t)
                    bitwise = bool(torch.equal(out[vd], tri[vd]))
                else:
                    d_tri, bitwise = float("nan"), False
                ok = err_ref < 1e-2 and untouched and (tri is None or d_tri < 1e-2)
                rows.append((tag, ok, err_ref, d_tri, bitwise, untouched))
                print(f"{'PASS' if ok else 'FAIL'} {tag}: rel-err vs fp32 ref {err_ref:.2e}, vs triton TMA "
                      f"(max per-row rel) {d_tri:.2e} bitwise={bitwise}, outside rows untouched={untouched}",
                      flush=True)
            except Exception as exc:
                rows.append((tag, False, float("nan"), float("nan"), False, False))
                print(f"FAIL {tag}: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
                traceback.print_exc(limit=2)
        del a, a_scale, b, b_scale, ref, tri
        torch.cuda.empty_cache()
    n_ok = sum(r[1] for r in rows)
    print(f"\ncorrectness: {n_ok}/{len(rows)} passed; max rel diff vs triton TMA over passing cases: "
          f"{max([r[3] for r in rows if r[1]] or [float('nan')]):.2e}; bitwise-equal in "
          f"{sum(r[4] for r in rows)}/{len(rows)}\n", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ GPU timing
def bench(variants, device, rep):
    from triton.testing import do_bench

    from bench_grouped_gemm import make_acts, make_weights, validate
    from fp8_deep.ops.grouped_gemm import grouped_gemm_fp8, pick_config

    results = []
    for gname, (N, K) in (("gemm1", (4096, 7168)), ("gemm2", (7168, 2048))):
        E = 256
        b, b_scale = make_weights(E, N, K, device)
        for rows in (1024, 2048):
            a, a_scale, offsets, counts = make_acts(E, rows, K, device)
            flops = 2.0 * rows * E * N * K
            out_ref = torch.empty(a.shape[0], N, dtype=torch.bfloat16, device=device)
            out = torch.empty_like(out_ref)
            providers = [(f"triton default ({pick_config(rows).BLOCK_M}x{pick_config(rows).BLOCK_N})",
                          lambda: grouped_gemm_fp8(a, a_scale, b, b_scale, offsets, counts, out=out_ref), out_ref),
                         ("triton TMA WS=0 128x128 s4",
                          lambda: grouped_gemm_fp8(a, a_scale, b, b_scale, offsets, counts, out=out,
                                                   config=TRITON_TMA_CONFIG), out)]
            for v in variants:
                providers.append((f"gluon {v[0]}x{v[1]} w{v[2]} s{v[3]}",
                                  (lambda v=v: gluon_grouped_gemm(a, a_scale, b, b_scale, offsets, counts, out,
                                                                  BLOCK_M=v[0], BLOCK_N=v[1], num_warps=v[2],
                                                                  NUM_STAGES=v[3])), out))
            for name, fn, o in providers:
                note = ""
                try:
                    o.fill_(float("nan"))
                    fn()
                    torch.cuda.synchronize()
                    validate(o, a, a_scale, b, b_scale, offsets, rows, f"{gname} rows={rows} {name}")
                    if o is not out_ref:
                        seg = torch.cat([torch.arange(int(off), int(off) + rows) for off in offsets.tolist()[::51]])
                        seg = seg.to(device)
                        note = f"vs default: {_row_rel_diff(o[seg].float(), out_ref[seg].float()):.1e}"
                    ms = do_bench(fn, rep=rep, return_mode="median")
                except Exception as exc:  # one failing variant must not stop the rest
                    ms = float("nan")
                    note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
                tf = flops / ms * 1e-9
                results.append((gname, rows, name, ms, tf, note))
                print(f"{gname} E={E} rows={rows:5d} {name:32s} {ms:8.3f} ms {tf:7.1f} TFLOP/s {note}", flush=True)
            del a, a_scale, offsets, counts, out, out_ref, providers
            torch.cuda.empty_cache()
        del b, b_scale
        torch.cuda.empty_cache()
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile-only", action="store_true", help="CPU: compile for sm_90, print registers / PTX checks")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--rep", type=int, default=100)
    args = p.parse_args()
    if args.compile_only:
        return compile_only()
    if not torch.cuda.is_available():
        print("proto_gluon_gemm: needs a CUDA GPU (or --compile-only)")
        return 1
    t0 = time.time()
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"GLUON_AVAILABLE={gk.GLUON_AVAILABLE}", flush=True)
    if not gk.GLUON_AVAILABLE:
        return 1
    check = [] if args.skip_check else correctness(VARIANTS, device)
    for key, ck in sorted(_COMPILED.items()):
        try:
            print(f"gluon {key}: n_regs={ck.n_regs} n_spills={ck.n_spills} shared={ck.metadata.shared}")
        except Exception as exc:
            print(f"gluon {key}: registers unavailable ({type(exc).__name__})")
    res = [] if args.skip_bench else bench(VARIANTS, device, args.rep)
    for key, ck in sorted(_COMPILED.items()):
        try:
            print(f"gluon {key}: n_regs={ck.n_regs} n_spills={ck.n_spills} shared={ck.metadata.shared}")
        except Exception:
            pass

    if res:
        print(f"\n{torch.cuda.get_device_name()} triton {triton.__version__}: E=256, ms / TFLOP/s")
        names = list(dict.fromkeys(r[2] for r in res))
        keys = list(dict.fromkeys((r[0], r[1]) for r in res))
        print(f"{'provider':32s} " + " ".join(f"{g + ' r' + str(rw):>18s}" for g, rw in keys))
        for name in names:
            cells = []
            for key in keys:
                r = next((r for r in res if (r[0], r[1]) == key and r[2] == name), None)
                cells.append(f"{r[3]:7.3f} / {r[4]:6.1f}" if r else f"{'-':>16s}")
            print(f"{name:32s} " + " ".join(f"{c:>18s}" for c in cells))
    if check:
        print(f"correctness: {sum(r[1] for r in check)}/{len(check)} passed")
    print(f"total {time.time() - t0:.0f} s")
    return 0 if all(r[1] for r in check) else 1


if __name__ == "__main__":
    sys.exit(main())
