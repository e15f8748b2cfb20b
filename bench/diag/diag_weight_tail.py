"""Where the one-layout weight quantizer's last 0.1% against torch.compile goes: occupancy and the last wave.

Hypothesis (run f9ad68d): both kernels stream HBM at the same rate, and ours loses its ~0.8 us in the last, partial
wave of programs. Ours runs 128x256 tiles, one program per SM (registers), so a launch of P programs ends with
P mod 132 programs on an otherwise idle chip. Two checks, CUDA-graph replays over two input sets (cold inputs),
providers interleaved, order reversed every other round, paired ratio to torch.compile per round pair:

1. the compiled kernels' registers, spills and programs per SM (ours per config, inductor's);
2. the ratio on expert counts E whose program count fills the last wave (E=33: 29568 = 224 x 132) against E=32
   (28672: 217 waves + 28 programs), and configs with other wave shapes (register caps via ``maxnreg``).

Outcome (H100, run f9ad68d; docs/performance-log.md): not the last wave. torch.compile's kernel runs the same
occupancy (one block per program, 32 warps, 31 registers: two programs per SM) and the same last wave; at E=33 both
fill it, and there ours leads by 0.5-0.7% (compile's time grows 3.8% for 3.1% more bytes, ours 3.2%). What the
configs did show: one block per program with 16 warps is 1% faster on 7168x18432, the default below 16384 blocks
since (ops.quant.SMALL_WEIGHT_BLOCKS).

Runs ae6972e / e37b8e2: inductor's structure in our kernel (``rr_*``: the cast re-loads the tile from L2 instead
of holding it, 30-64 registers, full occupancy; a kernel switch of commit e37b8e2), the same without masks
(``*_even``, same commit), and our FP8 output written at other addresses (``DIAG_QOFFSETS``): none moves the
32-expert stacks past 0.998-1.000x (rr_k1w32 0.9980-0.9984 / 0.9998-1.0000, k2w16_even 0.9997 / 0.9998, output
offsets 0.9982-0.9993 / 0.9988-0.9997).

    python bench/diag/diag_weight_tail.py   # GPU machine (gpu_check.sh stage proto, PROTO=bench/diag/diag_weight_tail.py)
"""
import argparse  # noqa: E402

if __name__ == "__main__":  # --help works without a GPU; the flags read below pass through
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_known_args()

import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from fp8_deep import ops  # noqa: E402
from fp8_deep.kernels.quant import quant_weight_block_kernel  # noqa: E402
from fp8_deep.numerics import FP8_DTYPE, FP8_MAX, WEIGHT_AMAX_EPS  # noqa: E402
from fp8_deep.ops.quant import _weight_hints, gpu_fast_paths  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_quant import paired_ratios, weight_ref_fast  # noqa: E402

ROUNDS = int(os.environ.get("DIAG_ROUNDS", 6))
SETS = 2
REPS = 8  # calls per set in one graph
# name: (num_warps, BLOCKS_K, maxnreg or None)
# (registers from ptxas for sm_90, Triton 3.6: k2w8 172 -> 1 program per SM, k1w8 96 -> 2, k2w16 93 -> 1,
# k1w16 58 -> 2, k1w32 41 -> 1, k1w32r32 31 -> 2 (inductor's own kernel: one block, 32 warps, 31 registers),
# k2w32 55 -> 1. Measured in run e37b8e2 and dropped: k1w4 168 -> 3 and k1w8r80 (80, 8 bytes of spill) -> 3, 1.2-1.5%
# slower than k2w8.) Run d0a3d9d's re-read (rr_*) and unmasked (*_even) variants ran with the kernel switches of
# commit e37b8e2, removed after.
CONFIGS = {"k2w8": (8, 2, None), "k2w16": (16, 2, None), "k1w8": (8, 1, None), "k1w16": (16, 1, None),
           "k1w32": (32, 1, None), "k1w32r32": (32, 1, 32), "k2w32": (32, 2, None)}
# DIAG_CONFIGS / DIAG_SHAPES (comma / ";" lists, "32x4096x7168") select a subset
CONFIGS = {k: v for k, v in CONFIGS.items() if k in os.environ.get("DIAG_CONFIGS", ",".join(CONFIGS)).split(",")}
SHAPES = [(32, 4096, 7168), (33, 4096, 7168), (32, 7168, 2048), (7168, 18432)]
if os.environ.get("DIAG_SHAPES"):
    SHAPES = [tuple(int(d) for d in sh.split("x")) for sh in os.environ["DIAG_SHAPES"].split(";")]


def launch(w, q, s, warps, blocks_k, maxnreg):
    w3, q3, s3 = (t if t.dim() == 3 else t.unsqueeze(0) for t in (w, q, s))
    E, N, K = w3.shape
    nb, kb = N // 128, K // 128
    fast = gpu_fast_paths(w)
    extra = {"maxnreg": maxnreg} if maxnreg else {}
    return quant_weight_block_kernel[(math.ceil(kb / blocks_k), nb, E)](
        w3, q3, s3, q3, s3, N, K, E, nb, kb, *w3.stride(), *q3.stride(), *s3.stride(), *q3.stride(), *s3.stride(),
        FP8_MAX=FP8_MAX, AMAX_EPS=WEIGHT_AMAX_EPS, UE8M0=False, WITH_TRANSPOSE=False, NAN_MAX=fast["NAN_MAX"],
        NAN_SELECT=fast["NAN_SELECT"], **_weight_hints(False), BLOCK_N=128, BLOCK_K=128, TCHUNK=32,
        BLOCKS_K=blocks_k, num_warps=warps, **extra)


def per_sm(n_regs, warps, shared):
    """Programs per SM on sm_90: 64K registers (allocated per warp in units of 256), 2048 threads, 228 KB smem."""
    regs_warp = math.ceil(max(n_regs, 1) * 32 / 256) * 256
    by_regs = 65536 // (regs_warp * warps)
    by_threads = 2048 // (32 * warps)
    by_smem = (233472 // shared) if shared else 32
    return min(by_regs, by_threads, by_smem, 32)


def graph_ms(fns):
    """ms per call: one graph of REPS calls on each input set in turn, replayed 5 times, median."""
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        for _ in range(REPS):
            for f in fns:
                f()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / (REPS * len(fns)))
    del g
    return statistics.median(ts)


def input_sets(shape, n=SETS):
    """``n`` independent (bf16 input, FP8 output, scale output) triples of one weight shape (cold-input rotation)."""
    sets = []
    for i in range(n):
        g = torch.Generator(device="cuda")
        g.manual_seed(1 + 100 * i)
        w = (torch.randn(shape, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
        q = torch.empty(shape, dtype=FP8_DTYPE, device="cuda")
        s = torch.empty(*shape[:-2], shape[-2] // 128, shape[-1] // 128, dtype=torch.float32, device="cuda")
        sets.append((w, q, s))
    return sets


def prepared(shape):
    """(label, input sets, torch.compile of the reference compiled for this shape, the package kernel's (q, scale) on
    set 0: the contract's bytes, bit-exact in the GPU tests)."""
    sets = input_sets(shape)
    # a static compile per shape, as bench_quant: one compile over several shapes turns dynamic (run e37b8e2: 3.9 ms
    # instead of 0.46 on the second shape)
    comp = torch.compile(weight_ref_fast, dynamic=False)
    comp(sets[0][0])
    q_ref, s_ref = ops.quantize_weight_blockwise(sets[0][0])
    torch.cuda.synchronize()
    return "x".join(map(str, shape)), sets, comp, q_ref, s_ref


def n_differing(q, s, q_ref, s_ref):
    """Elements of (q, s) whose bits differ from the reference outputs."""
    return int((q.view(torch.uint8) != q_ref.view(torch.uint8)).sum()) + int(
        (s.view(torch.int32) != s_ref.view(torch.int32)).sum())


def add_if_exact(fns, label, name, sets, q_ref, s_ref, launch, describe=None):
    """Run ``launch(w, q, s)`` once on input set 0 and add it to ``fns`` (the providers timed) only if it wrote the
    package kernel's bytes; ``describe(compiled)`` adds to the printed line (registers, spills)."""
    ck = launch(*sets[0])
    torch.cuda.synchronize()
    bad = n_differing(*sets[0][1:], q_ref, s_ref)
    print(f"{label:>14s} {name:10s} {describe(ck) + ' ' if describe else ''}"
          f"{'bit-exact' if not bad else f'{bad} elements DIFFER: not timed'}", flush=True)
    if not bad:
        fns[name] = [lambda t=t: launch(*t) for t in sets]


def do_bench_ms(fns):
    """ms per call as bench_quant times it: do_bench's median (its 256 MB zeroing flush before every call), the
    first input set only."""
    import triton.testing
    return triton.testing.do_bench(fns[0], return_mode="median")


# DIAG_TIMER=do_bench: do_bench_ms instead of graph_ms (graph replays hide the launch and the flush's write-backs,
# which the acceptance figures, taken with do_bench, include)
TIMER = {"graph": graph_ms, "do_bench": do_bench_ms}[os.environ.get("DIAG_TIMER", "graph")]


def time_interleaved(fns, label):
    """{provider: [callable per input set]} with a "compile" entry -> one summary line per provider: median us and
    the paired ratio to compile over ROUNDS rounds, the order reversed every other round (bench_quant's method)."""
    times = {p: [] for p in fns}
    for r in range(ROUNDS):
        for p in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            times[p].append(TIMER(fns[p]))
    lines = []
    for p, ts in times.items():
        pairs = paired_ratios(times["compile"], ts)
        lines.append(f"{label:>14s} {p:11s} {statistics.median(ts) * 1e3:8.1f} us  "
                     f"x compile {statistics.median(pairs):.4f} [{pairs[0]:.4f}, {pairs[-1]:.4f}]")
        print(lines[-1], flush=True)
    return lines


def time_shapes(shapes, add_providers):
    """Per shape: torch.compile of the reference and what ``add_providers(fns, label, sets, q_ref, s_ref)`` adds to
    ``fns`` ({name: [callable per input set]}), timed by time_interleaved; the summary table last."""
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    summary = []
    for shape in shapes:
        label, sets, comp, q_ref, s_ref = prepared(shape)
        fns = {"compile": [lambda w=w: comp(w) for w, _, _ in sets]}
        add_providers(fns, label, sets, q_ref, s_ref)
        summary += time_interleaved(fns, label)
        del sets, fns, q_ref, s_ref
        torch.cuda.empty_cache()
    print_summary(summary)


def print_summary(lines):
    """The closing table of time_interleaved's lines (gpu_check.sh shows what follows SUMMARY)."""
    how = "CUDA graph" if TIMER is graph_ms else "do_bench"
    print(f"\nSUMMARY ({how}, {SETS} input sets, {ROUNDS} rounds alternating order, paired x compile median "
          f"[range])")
    for line in lines:
        print(line)


def inductor_launchers():
    """(name, n_regs, n_spills, num_warps, shared, config) of every Triton kernel inductor has loaded."""
    out = []
    try:
        from torch._inductor.codecache import PyCodeCache
        mods = list(getattr(PyCodeCache, "modules", []) or getattr(PyCodeCache, "cache", {}).values())
    except Exception as exc:  # noqa: BLE001
        print(f"[inductor] cannot list modules: {exc!r}")
        return out
    for mod in mods:
        for name, obj in vars(mod).items():
            for ln in getattr(obj, "launchers", []) or []:
                cfg = getattr(ln, "config", None)
                out.append((name, getattr(ln, "n_regs", None), getattr(ln, "n_spills", None),
                            getattr(cfg, "num_warps", None), getattr(ln, "shared", None),
                            getattr(cfg, "kwargs", None)))
    return out


def main():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}  SMs {sms}  torch {torch.__version__}")
    summary = []
    for shape in SHAPES:
        label, sets, comp, q_ref, s_ref = prepared(shape)
        fns = {"compile": [lambda w=w: comp(w) for w, _, _ in sets]}
        lead = shape[0] if len(shape) == 3 else 1
        blocks = lead * (shape[-2] // 128) * (shape[-1] // 128)
        for name, (warps, bk, reg) in CONFIGS.items():
            ck = launch(*sets[0], warps, bk, reg)
            torch.cuda.synchronize()
            # every config must write the package kernel's bytes (a register cap could change nothing but speed)
            bad = n_differing(*sets[0][1:], q_ref, s_ref)
            nreg, nspill = getattr(ck, "n_regs", -1), getattr(ck, "n_spills", -1)
            shared = getattr(ck.metadata, "shared", 0)
            k = per_sm(nreg, warps, shared)
            progs = blocks // bk
            wave = k * sms
            print(f"{label:>14s} {name:9s} regs {nreg:3d} spills {nspill:3d} shared {shared:6d} "
                  f"-> {k} per SM; {progs} programs = {progs // wave} waves of {wave} + {progs % wave}; "
                  f"{'bit-exact' if not bad else f'{bad} elements DIFFER: not timed'}")
            if bad:
                continue
            fns[name] = [lambda t=t, a=(warps, bk, reg): launch(*t, *a) for t in sets]
        # run d0a3d9d: the same kernel writing its FP8 output at other addresses (byte offsets into a larger buffer):
        # does the placement of the write stream against the read stream move the ratio?
        first = next(iter(CONFIGS))
        held = []
        for off in [int(v) for v in os.environ.get("DIAG_QOFFSETS", "").split(",") if v]:
            moved = []
            for w, q, s in sets:
                buf = torch.empty(q.numel() + off, dtype=torch.uint8, device="cuda")
                moved.append((w, buf[off:].view(FP8_DTYPE).view(q.shape), s))
                held.append(buf)
            launch(*moved[0], *CONFIGS[first])
            torch.cuda.synchronize()
            bad = n_differing(*moved[0][1:], q_ref, s_ref)
            print(f"{label:>14s} {first}@q+{off}: q - w = {moved[0][1].data_ptr() - moved[0][0].data_ptr()} bytes; "
                  f"{'bit-exact' if not bad else f'{bad} elements DIFFER: not timed'}")
            if not bad:
                fns[f"{first}@q+{off}"] = [lambda t=t: launch(*t, *CONFIGS[first]) for t in moved]
        summary += time_interleaved(fns, label)
        del sets, fns, q_ref, s_ref, held
        torch.cuda.empty_cache()
    for row in inductor_launchers():
        print("[inductor]", *row)
    print_summary(summary)


if __name__ == "__main__":
    main()
