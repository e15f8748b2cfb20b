"""Tune the FP8 quantizers' kernel choice and tiles on this card; write the tables ``fp8_deep/configs/<op>/<card>.json``.

Tables (looked up by ``fp8_deep.ops._tuned``; the launchers keep their built-in choice where a card has none):
  weight_quant     ``quantize_weight_blockwise``, one layout: the stack kernel or the tile kernel's
                   (TCHUNK, num_warps, BLOCKS_K, L2 hints); key ``(N, K)``, nearest E (``rows`` = E).
  weight_quant_t   the same with the transposed copy (``with_transpose=True``, tile kernel only).
  act_quant_row    ``quantize_activation``, row-major scales: flat kernel (BLOCK_G, num_warps) or tile kernel
                   (BLOCK_M, GROUPS_PER_PROG, num_warps); key ``K`` (``N`` = 1), nearest M (``rows`` = M).
  act_quant_tma    the same with TMA-aligned (column-major) scales.

Each candidate runs through the launcher's own table path (``tuned_config`` answering with it) and must write the
bytes of the built-in choice (``FP8_DEEP_TUNED=0``) before it is timed; the fastest such candidate is the entry, the
built-in choice included (its entry, ``"built-in"``, makes the launcher keep its own choice at that point). Timing: ``do_bench`` (L2 flushed before each call),
the same method as ``bench_quant.py``, which reports the ratios to torch.compile and to a same-bytes copy with the
tables in effect.

Grid: the weight stacks of issue 21 (32x4096x7168, 32x7168x2048, 7168x18432) and of the MoE models users run
(DeepSeek-V3 TP8 shards, Qwen3-30B-A3B, 4096x7168, 8x4096x7168), both layouts; activations of K = 7168 / 2048 at
M = 1 .. 32768, both scale layouts. ``--time-budget`` stops between points; the tables are rewritten atomically after
every point, merged with their entries for points not re-measured.

    python bench/tune_quant.py                          # every table (~5 min on an H100)
    python bench/tune_quant.py --ops weight_quant --time-budget 120
    python bench/tune_quant.py --cpu-smoke              # plumbing: tiny shapes through the interpreter, no table
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

if "--cpu-smoke" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py when run as a script

import torch  # noqa: E402

import _common as C  # noqa: E402
from tune_grouped_gemm import write_table  # noqa: E402

WEIGHT_SHAPES = [(32, 4096, 7168), (32, 7168, 2048), (1, 7168, 18432), (1, 4096, 7168), (8, 4096, 7168),
                 (128, 1536, 2048), (128, 2048, 768), (256, 512, 7168), (256, 7168, 256)]
ACT_K = (7168, 2048)
ACT_M = (1, 16, 128, 1024, 4096, 8192, 32768)
OPS = ("weight_quant", "weight_quant_t", "act_quant_row", "act_quant_tma")
SMOKE_WEIGHTS = [(2, 256, 384)]
SMOKE_ACT = ((512,), (40,))


def weight_candidates(with_transpose: bool):
    from fp8_deep.ops.quant import WeightQuantConfig
    if with_transpose:
        return [WeightQuantConfig(TCHUNK=t, num_warps=w, BLOCKS_K=1, HINTS=h)
                for t in (32, 64) for w in (8, 16) for h in (0, 1, 3)]
    return [WeightQuantConfig(STACK=True)] + [WeightQuantConfig(TCHUNK=32, num_warps=w, BLOCKS_K=bk, HINTS=h)
                                              for w in (4, 8, 16) for bk in (1, 2, 4) for h in (0, 1, 2)]


def act_candidates():
    from fp8_deep.ops.quant import ActQuantConfig
    flat = [ActQuantConfig(FLAT=True, BLOCK_G=g, num_warps=w) for g in (8, 16, 32, 64) for w in (2, 4, 8)]
    tile = [ActQuantConfig(FLAT=False, BLOCK_M=m, GROUPS_PER_PROG=gp, num_warps=w)
            for m, gp, w in ((4, 4, 2), (8, 1, 2), (16, 2, 4), (32, 2, 4), (32, 4, 8), (64, 2, 8))]
    return flat + tile


@contextlib.contextmanager
def _tuned_as(spec):
    """``quant.tuned_config`` answering every lookup with ``spec`` (None: no table): the launcher's table path. The
    launch-plan caches are emptied on the way in and out: a plan keys on the call, not on the table's answer, so a
    plan built under one candidate would replay its kernel under the next."""
    from fp8_deep.ops import quant
    saved = quant.tuned_config
    quant._WEIGHT_PLANS.clear()
    quant._ACT_PLANS.clear()
    quant.tuned_config = lambda op, dev, **kw: spec
    try:
        yield
    finally:
        quant.tuned_config = saved
        quant._WEIGHT_PLANS.clear()
        quant._ACT_PLANS.clear()


def _same(a, b) -> bool:
    return all(torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)) for x, y in zip(a, b))


def tune_point(fn, cands, applies, rep, log):
    """``fn()`` under each candidate; the fastest whose bytes equal the built-in choice's (which competes too)."""
    with _tuned_as(None):
        ref = fn()
        base_ms = C.bench(fn, rep=rep)[0]
    best = (base_ms, None)
    tried = 0
    for cfg in cands:
        if not applies(cfg):
            continue
        spec = str(cfg)
        try:
            with _tuned_as(spec):
                if not _same(fn(), ref):
                    log(f"    {spec}: other bytes than the built-in choice: not eligible")
                    continue
                ms = C.bench(fn, rep=rep)[0]
        except Exception as exc:  # noqa: BLE001 -- a config that cannot compile or run here is not a candidate
            log(f"    {spec}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
            continue
        tried += 1
        if ms < best[0]:
            best = (ms, spec)
    ref = None
    C.free_cuda()
    return best, base_ms, tried


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="*", default=list(OPS), choices=list(OPS))
    p.add_argument("--rep", type=int, default=25, help="do_bench rep per candidate (ms)")
    p.add_argument("--time-budget", type=float, default=480, help="seconds; stops between grid points")
    p.add_argument("--no-merge", action="store_true", help="drop the existing tables' other entries")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes through the interpreter; writes no table")
    args = p.parse_args(argv)

    from fp8_deep import ops
    from fp8_deep.ops import quant
    from fp8_deep.ops._tuned import TABLE_DIR, card_key
    smoke = args.cpu_smoke
    pins = [v for v in (quant.WEIGHT_CONFIG_ENV, quant.WEIGHT_HINTS_ENV, quant.ACT_CONFIG_ENV) if os.environ.get(v)]
    if pins:  # a pinned configuration wins over the table path: every candidate would time the pinned kernel
        print(f"tune_quant: unset {pins} first (they pin the kernels this script chooses between)")
        return 2
    if not torch.cuda.is_available() and not smoke:
        print("tune_quant needs a CUDA GPU (--cpu-smoke for the plumbing)")
        return 0
    card = card_key(torch.cuda.get_device_name()) if torch.cuda.is_available() else "cpu"
    print(C.env_line())
    weights = SMOKE_WEIGHTS if smoke else WEIGHT_SHAPES
    act_k, act_m = SMOKE_ACT if smoke else (ACT_K, ACT_M)
    grid = []
    for op in args.ops:
        if op.startswith("weight"):
            grid += [(op, E, N, K) for E, N, K in weights]
        else:
            grid += [(op, 1, M, K) for K in act_k for M in act_m]
    print(f"tune_quant: {len(grid)} grid points on {card}", flush=True)
    tables = {op: dict(path=TABLE_DIR / op / f"{card}.json", entries=[], old=[]) for op in args.ops}
    for op, t in tables.items():
        if t["path"].is_file() and not args.no_merge and not smoke:
            t["old"] = json.loads(t["path"].read_text())["entries"]
    t0, rows_out = time.time(), []
    for op, E, NM, K in grid:
        if args.time_budget and time.time() - t0 > args.time_budget:
            print(f"[note] time budget {args.time_budget:.0f} s spent: stopped before {op} {E}x{NM}x{K}")
            break
        print(f"  {op} {E}x{NM}x{K}", flush=True)
        if op.startswith("weight"):
            both = op == "weight_quant_t"
            w = C.randn((E, NM, K) if E > 1 else (NM, K), dtype=torch.bfloat16)

            def fn(w=w, both=both):
                return ops.quantize_weight_blockwise(w, with_transpose=both)

            w3 = w if w.dim() == 3 else w.unsqueeze(0)

            def applies(cfg, w3=w3, both=both):
                return not cfg.STACK or quant._stack_kernel_applies(w3, w3, w3, (128, 128), both)

            cands, key = weight_candidates(both), dict(E=E, N=NM, K=K, rows=E)
        else:
            x = C.randn((NM, K), dtype=torch.bfloat16)
            layout = "tma_aligned" if op == "act_quant_tma" else "row_major"

            def fn(x=x, layout=layout):
                return ops.quantize_activation(x, scale_layout=layout, backend="triton")

            def applies(cfg):
                return True

            cands, key = act_candidates(), dict(E=1, N=1, K=K, rows=NM)
        if smoke:
            cands = cands[:3]
        (best_ms, spec), base_ms, tried = tune_point(fn, cands, applies, args.rep, log=print)
        fn = w = x = None
        entry = dict(**key, config=spec or quant.BUILTIN, ms=round(best_ms, 5), builtin_ms=round(base_ms, 5),
                     candidates=tried)
        rows_out.append(dict(op=op, shape=f"{E}x{NM}x{K}", best_ms=f"{best_ms:.4f}", builtin_ms=f"{base_ms:.4f}",
                             gain=f"{base_ms / best_ms:.3f}x", config=spec or "built-in"))
        # a point where the built-in choice won gets a "built-in" entry: it replaces an older entry of the point and
        # keeps a neighbour's entry (the lookup takes the nearest within a factor of 2) from applying here
        tables[op]["entries"].append(entry)
        if not smoke:
            t = tables[op]
            write_table(t["path"], card, t["old"], t["entries"], op=op)
    C.print_table(rows_out, ["op", "shape", "best_ms", "builtin_ms", "gain", "config"],
                  title=f"quantizer tuning on {card} (gain = the built-in choice's time / the best's)",
                  prefix="SUMMARY")
    if smoke:
        print("SUMMARY cpu-smoke: plumbing only; no table written")
    else:
        for op, t in tables.items():
            print(f"SUMMARY {op}: {len(t['entries'])} entries -> {t['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
