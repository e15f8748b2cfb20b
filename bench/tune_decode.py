"""Tune the decode and routed paths' GEMM tiles on this card; write ``fp8_deep/configs/decode/<card>.json``.

The decode launchers (``fp8_deep.ops.moe_decode_gemm1`` / ``moe_decode_gemm2``, the MoE's path with
``FP8_DEEP_DECODE=1``) read that table through ``ops.decode.decode_config``: for a GEMM's ``(N, K)`` the entry nearest
in choices ``T * top_k`` (then in E), else the built-in heuristic. ``FP8_DEEP_TUNED=0`` ignores tables (A/B).

Grid: the models of ``tune_grouped_gemm.py`` at T tokens, routed top-k at random: within the decode path's bound
(``T * top_k <= 128``) its GEMMs, above it the routed path's (``ops.moe_routed_gemm1`` / ``2``, the routing plan's
rows); each model's GEMM1 (``w13 (E, 2I, H)``, tokens quantized on load) and GEMM2 (``w2 (E, H, I)``, SwiGLU on
load, the combine in its tail) timed as the forward launches them. Candidates: 64- and 128-row weight tiles, pointer
or TMA weight loads, 3 or 4 pipeline stages, 4 or 8 warps, 16- or 32-choice row tiles. A candidate's output must equal
the heuristic's bit for bit (kept rows; GEMM2: the combined output) or it is reported and not eligible; every grid
point's winner is written, the heuristic's own config included.

Then, per (model, T), the whole forward as CUDA-graph replays with that path (the tiles just tuned) and with the
regular chain, outputs compared bit for bit: ``fp8_deep/configs/moe_decode/<card>.json`` records which is faster
(``config`` "decode", "routed" or "chain", keyed by the layer's ``(E, N = 2I, K = H)`` and choices), and the forward
takes the path where this card's table names it at the nearest choices (within 2x) unless ``FP8_DEEP_DECODE`` /
``FP8_DEEP_ROUTED`` say otherwise (``--no-forward``: tiles only).

    python bench/tune_decode.py                            # every model, T = 1, 4, 16, 64, 256
    python bench/tune_decode.py --models qwen3_30b --T 1 --time-budget 60
    python bench/tune_decode.py --dry-run                  # print the grid and candidates, time nothing
    python bench/tune_decode.py --cpu-smoke                # plumbing on a tiny shape (interpreter), no table
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if "--cpu-smoke" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py when run as a script

import torch  # noqa: E402

import _common as C  # noqa: E402
from tune_grouped_gemm import MODELS, SMOKE, announce, table_target, write_table  # noqa: E402

TOKENS = (1, 4, 16, 64, 256)


def candidates():
    from fp8_deep.ops.decode import DecodeConfig
    out = [DecodeConfig(BLOCK_N=bn, TMA_B=tma, num_stages=stages) for bn in (64, 128) for tma in (False, True)
           for stages in (3, 4)]
    out += [DecodeConfig(BLOCK_N=128, TMA_B=tma, num_warps=8) for tma in (False, True)]
    out += [DecodeConfig(BLOCK_M=32, BLOCK_N=bn) for bn in (64, 128)]
    return out


def operands(E, H, inter, T, top_k, seed=0):
    """FP8 expert weights and scales, tokens, routing, and GEMM1's output for GEMM2's grid points."""
    from fp8_deep import ops
    dev = C.device()
    q13, s13 = ops.quantize_weight_blockwise(C.randn((E, 2 * inter, H), std=0.05, seed=seed))
    q2, s2 = ops.quantize_weight_blockwise(C.randn((E, H, inter), std=0.05, seed=seed + 1))
    tw, ids = C.random_routing(T, E, top_k, seed=seed)
    x = C.randn((T, H), seed=seed + 2)
    return dict(q13=q13, s13=s13, q2=q2, s2=s2, tw=tw, ids=ids, x=x, dev=dev)


def _runners(o, H, inter, T, top_k):
    """``{gemm: run(cfg) -> the output to compare}`` as the forward launches them: the decode GEMMs within the
    decode path's bound (GEMM2 with the combine in its tail), else the routed GEMMs over the routing plan."""
    from fp8_deep import ops
    from fp8_deep.ops.decode import (decode_counters, decode_fits, moe_decode_gemm1, moe_decode_gemm2,
                                     moe_routed_gemm1, moe_routed_gemm2)
    x, ids = o["x"], o["ids"]
    if decode_fits(T * top_k, H, inter):
        counters = decode_counters(H, x.device)
        h, inv = moe_decode_gemm1(x, ids, o["q13"], o["s13"], counters=counters)
        kept = inv.reshape(-1) >= 0
        return {"gemm1": lambda cfg: moe_decode_gemm1(x, ids, o["q13"], o["s13"], counters=counters,
                                                      config=cfg)[0][kept],
                "gemm2": lambda cfg: moe_decode_gemm2(h, ids, o["q2"], o["s2"], combine=(o["tw"], inv, counters),
                                                      config=cfg)}
    plan = ops.align_routing(ids, o["q13"].shape[0], block_size=16)
    real = plan.m_indices >= 0
    h = moe_routed_gemm1(x, plan, o["q13"], o["s13"])
    return {"gemm1": lambda cfg: moe_routed_gemm1(x, plan, o["q13"], o["s13"], config=cfg)[real],
            "gemm2": lambda cfg: moe_routed_gemm2(h, plan, o["q2"], o["s2"], config=cfg)[real]}


def tune_point(E, H, inter, T, top_k, gemm, cands, rep, log):
    """Time every candidate at one grid point; the winner among those bitwise equal to the heuristic's pick."""
    from fp8_deep.ops.decode import decode_config
    o = operands(E, H, inter, T, top_k)
    P = T * top_k
    run = _runners(o, H, inter, T, top_k)[gemm]
    N, K = (2 * inter, H) if gemm == "gemm1" else (H, inter)
    with C.environ({"FP8_DEEP_TUNED": "0", "FP8_DEEP_DECODE_CONFIG": None}):
        pick = decode_config(E, N, K, P, o["x"].device)
    ref = run(pick)
    pick_ms = C.bench(lambda: run(pick), rep=rep)[0]
    results = []
    for cfg in cands:
        try:
            same = torch.equal(run(cfg).view(torch.int16), ref.view(torch.int16))
            ms = C.bench(lambda cfg=cfg: run(cfg), rep=rep)[0]
        except Exception as exc:  # noqa: BLE001 -- a config that cannot compile or run here is not a candidate
            log(f"    {cfg}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
            continue
        results.append((ms, str(cfg), same))
        if not same:
            log(f"    {cfg}: {ms:.4f} ms but NOT bitwise equal to the pick: not eligible")
    eligible = sorted(r for r in results if r[2])
    if not eligible or pick_ms < eligible[0][0]:
        eligible.insert(0, (pick_ms, str(pick), True))
    o = run = ref = None
    C.free_cuda()
    best_ms, best_cfg, _ = eligible[0]
    return dict(E=E, N=N, K=K, rows=P, T=T, top_k=top_k, config=best_cfg, ms=round(best_ms, 5),
                heuristic=str(pick), heuristic_ms=round(pick_ms, 5), candidates=len(results))


def forward_point(E, H, inter, T, top_k, path, rep, seed=0):
    """The whole MoE forward as CUDA-graph replays with ``path`` ("decode" or "routed") and with the regular chain
    (same weights, routing, tokens; the tile table just written in effect): (path ms, chain ms, bitwise equal)."""
    import fp8_deep
    from fp8_deep.ops import _tuned
    _tuned.load_table.cache_clear()  # the table this run is writing
    _tuned._lookup_cached.cache_clear()
    o = operands(E, H, inter, T, top_k, seed=seed)

    def fwd():
        return fp8_deep.moe_forward(o["x"], o["q13"], o["q2"], o["tw"], o["ids"], w13_scale=o["s13"],
                                    w2_scale=o["s2"], backend="triton")
    ms, outs = {}, {}
    for mode in ("1", "0"):
        on = mode == "1"
        with C.environ({"FP8_DEEP_DECODE": "1" if on and path == "decode" else "0",
                        "FP8_DEEP_ROUTED": "1" if on and path == "routed" else "0"}):
            outs[mode] = fwd()
            ms[mode] = C.bench(fwd, rep=rep, graph=torch.cuda.is_available())[0]
    same = torch.equal(outs["1"].view(torch.int16), outs["0"].view(torch.int16))
    o = outs = None
    C.free_cuda()
    return ms["1"], ms["0"], same


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--T", nargs="*", type=int, default=list(TOKENS), help="tokens per call (default %(default)s)")
    p.add_argument("--gemms", nargs="*", default=["gemm1", "gemm2"], choices=["gemm1", "gemm2"])
    p.add_argument("--rep", type=int, default=25, help="do_bench rep per candidate (ms)")
    p.add_argument("--time-budget", type=float, default=300, help="seconds; stops between grid points")
    p.add_argument("--out", default=None, help="table path (default fp8_deep/configs/decode/<card>.json)")
    p.add_argument("--no-merge", action="store_true", help="drop the existing table's other entries")
    p.add_argument("--no-forward", action="store_true",
                   help="tune the GEMM tiles only (no forward timing, no moe_decode table entry)")
    p.add_argument("--dry-run", action="store_true", help="print the grid and the candidates; time nothing")
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny shape through the interpreter; writes no table")
    args = p.parse_args(argv)

    from fp8_deep.ops.decode import DECODE_MAX_CHOICES, decode_fits
    cands = candidates()
    models = SMOKE if args.cpu_smoke else {m: MODELS[m] for m in args.models}
    tokens = [2, 70] if args.cpu_smoke else args.T  # the decode GEMMs, then the routed ones (140 choices)
    grid = [(name, g, E, H, inter, T, top_k) for name, (E, H, inter, top_k) in models.items() for g in args.gemms
            for T in tokens if H % 128 == 0 and inter % 128 == 0]
    if not announce("tune_decode", grid, cands, args,
                    f" (the decode GEMMs up to {DECODE_MAX_CHOICES} choices, the routed ones above)"):
        return 0
    if args.cpu_smoke:
        cands = [c for c in cands if c.num_warps == 4 and c.num_stages == 3][:3]
    card, path, old = table_target("decode", args)
    _, fwd_path, fwd_old = table_target("moe_decode", argparse.Namespace(**{**vars(args), "out": None}))
    fwd_entries, fwd_rows = [], []
    t0 = time.time()
    entries, rows_out = [], []
    for name, g, E, H, inter, T, top_k in grid:
        if args.time_budget and time.time() - t0 > args.time_budget:
            print(f"[note] time budget {args.time_budget:.0f} s spent: stopped before {name} {g} T={T}")
            break
        print(f"  {name} {g} E={E} H={H} I={inter} T={T}", flush=True)
        r = tune_point(E, H, inter, T, top_k, g, cands, args.rep, log=print)
        entries.append(r)
        gain = r["heuristic_ms"] / r["ms"] if r["ms"] else float("nan")
        rows_out.append(dict(model=name, gemm=g, T=T, choices=r["rows"], best_ms=f"{r['ms']:.4f}",
                             heuristic_ms=f"{r['heuristic_ms']:.4f}", gain=f"{gain:.3f}x", config=r["config"]))
        if not args.cpu_smoke:  # after every point: a run cut short by its time limit keeps what it measured
            write_table(path, card, old, entries, op="decode")
        if g != args.gemms[-1] or args.no_forward:
            continue
        # both GEMMs of this (model, T) tuned: the forward with the path against the regular chain
        path_name = "decode" if decode_fits(T * top_k, H, inter) else "routed"
        path_ms, chain_ms, same = forward_point(E, H, inter, T, top_k, path_name, args.rep)
        use = path_name if same and path_ms < chain_ms else "chain"
        fwd_rows.append(dict(model=name, T=T, choices=T * top_k, path=path_name, path_ms=f"{path_ms:.4f}",
                             chain_ms=f"{chain_ms:.4f}", gain=f"{chain_ms / path_ms:.3f}x", bitwise=same, use=use))
        fwd_entries.append(dict(E=E, N=2 * inter, K=H, rows=T * top_k, T=T, top_k=top_k, config=use,
                                path_ms=round(path_ms, 5), chain_ms=round(chain_ms, 5), bitwise=same))
        if not args.cpu_smoke:
            write_table(fwd_path, card, fwd_old, fwd_entries, op="moe_decode")
    C.print_table(rows_out, ["model", "gemm", "T", "choices", "best_ms", "heuristic_ms", "gain", "config"],
                  title=f"decode GEMM tuning on {card} (gain = the heuristic's time / the best's)", prefix="SUMMARY")
    C.print_table(fwd_rows, ["model", "T", "choices", "path", "path_ms", "chain_ms", "gain", "bitwise", "use"],
                  title=f"MoE forward on {card}, the decode or routed path vs the regular chain (CUDA-graph replays; "
                        f"gain = chain / path; 'use' is what the forward does with FP8_DEEP_DECODE / "
                        f"FP8_DEEP_ROUTED unset)", prefix="SUMMARY")
    if args.cpu_smoke:
        print("SUMMARY cpu-smoke: plumbing only; no table written")
        return 0
    print(f"SUMMARY {len(entries)} grid points measured; table {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
