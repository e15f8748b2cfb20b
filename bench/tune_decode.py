"""Tune the decode, routed and gather paths' GEMM tiles on this card; write ``fp8_deep/configs/decode/<card>.json``,
``configs/gather/<card>.json`` and which path the forward takes, ``configs/moe_decode/<card>.json``.

The decode launchers (``fp8_deep.ops.moe_decode_gemm1`` / ``moe_decode_gemm2``, the MoE's path with
``FP8_DEEP_DECODE=1``) read the decode table through ``ops.decode.decode_config``: for a GEMM's ``(N, K)`` the entry
nearest in choices ``T * top_k`` (then in E), else the built-in heuristic. The gather path (``FP8_DEEP_GATHER=1``)
reads the gather table the same way: its GEMM1's tile (``ops.grouped_gemm_fp8_gather``, ``gather_config``) and, where
one was measured, its GEMM2's on the plan aligned to that tile (``gather_gemm2_config``; else the grouped GEMM's own
pick). ``FP8_DEEP_TUNED=0`` ignores tables (A/B).

Grid: the models of ``tune_grouped_gemm.py`` at T tokens, routed top-k at random: within the decode path's bound
(``T * top_k <= 128``) its GEMMs, above it the routed path's (``ops.moe_routed_gemm1`` / ``2``, the routing plan's
rows) and the gather path's two (``gather``: the gathered GEMM1; ``gather2``: GEMM2 on the aligned plan, vLLM's
block-map tiles against the grouped GEMM's pick); each timed as the forward launches it (GEMM1 ``w13 (E, 2I, H)``,
tokens quantized on load or gathered; GEMM2 ``w2 (E, H, I)``, SwiGLU on load or formed before, the decode path's
combine in its tail). Candidates of the
on-load GEMMs: 64- and 128-row weight tiles, pointer or TMA weight loads, 3 or 4 pipeline stages, 4 or 8 warps, 16-
or 32-choice row tiles; of the gathered GEMM: block-map tiles of 16 to 128 token rows, both orientations, TMA or
pointer weight loads. A candidate's output must equal the heuristic's bit for bit (kept rows; GEMM2: the combined
output) or it is reported and not eligible; every grid point's winner is written, the heuristic's own config
included.

Then, per (model, T), the whole forward as CUDA-graph replays down each path that applies (decode within its bound;
routed and gather above it) and down the regular chain, outputs compared bit for bit: the moe_decode table records
the fastest of those equal to the chain (``config`` "decode", "routed", "gather" or "chain", keyed by the layer's
``(E, N = 2I, K = H)`` and choices), and the forward takes the path this card's table names at the nearest choices
(within 2x) unless ``FP8_DEEP_DECODE`` / ``FP8_DEEP_ROUTED`` / ``FP8_DEEP_GATHER`` say otherwise (``--no-forward``:
tiles only).

    python bench/tune_decode.py                            # every model, T = 1, 4, 16, 64, 256, 2048
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
from tune_grouped_gemm import MODELS, SMOKE, announce, race, table_target, winner, write_table  # noqa: E402

TOKENS = (1, 4, 16, 64, 256, 2048)


def candidates():
    from fp8_deep.ops.decode import DecodeConfig
    out = [DecodeConfig(BLOCK_N=bn, TMA_B=tma, num_stages=stages) for bn in (64, 128) for tma in (False, True)
           for stages in (3, 4)]
    out += [DecodeConfig(BLOCK_N=128, TMA_B=tma, num_warps=8) for tma in (False, True)]
    out += [DecodeConfig(BLOCK_M=32, BLOCK_N=bn) for bn in (64, 128)]
    # where few experts leave SMs idle (T=1 on a TP8 shard: 8 experts x 8 tiles of 64 weight rows), each program's
    # weight stream is latency bound: six 8 KB stages in flight instead of three or four
    out += [DecodeConfig(BLOCK_N=64, TMA_B=tma, num_stages=6) for tma in (False, True)]
    return out


def gather_candidates():
    """Block-map tiles of the gathered GEMM1 (vLLM's fused-MoE kernel's family: its block-FP8 default is the 64-row
    plain tile, 3 stages), both orientations; plain tiles start at 64 rows (mma.sync below, see
    ``mma_sync_refusal``)."""
    from fp8_deep.ops.grouped_gemm import GemmConfig

    def g(bm, swap=False, tma=True, warps=4, stages=3, group=8):
        return GemmConfig(BLOCK_M=bm, BLOCK_N=128, GROUP_M=group if not swap else 1, SWAP_AB=swap, BLOCK_MAP=True,
                          TMA_B=tma, num_warps=warps, num_stages=stages)
    return [g(16, swap=True), g(32, swap=True, stages=4), g(64, swap=True), g(64), g(64, stages=4),
            g(64, tma=False, stages=4), g(64, group=32), g(128, warps=8)]


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
    """``{gemm: (run(cfg) -> the output to compare, the heuristic's pick, the candidates)}`` as the forward launches
    them: the decode GEMMs within the decode path's bound (GEMM2 with the combine in its tail), else the routed GEMMs
    over the routing plan, the gathered GEMM1 and the gather path's GEMM2 (rows in choice order: each tile height
    has its own plan)."""
    from fp8_deep import ops
    from fp8_deep.ops.decode import (decode_config, decode_counters, decode_fits, moe_decode_gemm1, moe_decode_gemm2,
                                     moe_routed_gemm1, moe_routed_gemm2)
    from fp8_deep.ops.grouped_gemm import (gather_config, grouped_gemm_fp8_gather, peak_rows_per_expert,
                                           resolve_config)
    x, ids = o["x"], o["ids"]
    E, P = o["q13"].shape[0], T * top_k
    with C.environ({"FP8_DEEP_TUNED": "0", "FP8_DEEP_DECODE_CONFIG": None, "FP8_DEEP_GATHER_CONFIG": None}):
        pick1 = decode_config(E, 2 * inter, H, P, x.device)
        pick2 = decode_config(E, H, inter, P, x.device)
        pick_g = gather_config(E, 2 * inter, H, P, x.device)
    if decode_fits(P, H, inter):
        counters = decode_counters(H, x.device)
        h, inv = moe_decode_gemm1(x, ids, o["q13"], o["s13"], counters=counters)
        kept = inv.reshape(-1) >= 0
        return {"gemm1": (lambda cfg: moe_decode_gemm1(x, ids, o["q13"], o["s13"], counters=counters,
                                                       config=cfg)[0][kept], pick1, candidates()),
                "gemm2": (lambda cfg: moe_decode_gemm2(h, ids, o["q2"], o["s2"], combine=(o["tw"], inv, counters),
                                                       config=cfg), pick2, candidates())}
    plan = ops.align_routing(ids, E, block_size=16)
    real = plan.m_indices >= 0
    h = moe_routed_gemm1(x, plan, o["q13"], o["s13"])
    qx, sx = ops.quantize_activation(x)
    plans = {}

    def gathered(cfg):
        pl, rows = plans_for(ids, E, max(16, cfg.BLOCK_M), plans)
        return grouped_gemm_fp8_gather(qx, sx, o["q13"], o["s13"], pl, config=cfg)[rows]
    # GEMM2 on the gather path's plan: each choice's SwiGLU operand, laid out in the rows of the plan of each tile
    # height; against the grouped GEMM's own pick (its table in effect), as the forward runs it without an entry
    kept = plan.inv_perm.reshape(-1)
    a2c, s2c = ops.silu_mul_quantize(h[kept[kept >= 0].long()], scale_layout="row_major")
    expected = peak_rows_per_expert(P, E)
    pick_g2 = resolve_config(None, a2c, o["q2"], expected)

    def gemm2_on_plan(cfg):
        pl = plans_for(ids, E, max(16, cfg.BLOCK_M if cfg.BLOCK_MAP else 16), plans)[0]
        sid = pl.sorted_token_ids.long()
        src = torch.where(sid < a2c.shape[0], sid, 0)
        out = ops.grouped_gemm_fp8(a2c[src], s2c[src], o["q2"], o["s2"], pl.expert_offsets, pl.expert_counts,
                                   config=cfg, expected_m=expected,
                                   block_map=(pl.expert_ids, pl.m_indices, pl.block_size))
        return out[plans_for(ids, E, pl.block_size, plans)[1]]
    return {"gemm1": (lambda cfg: moe_routed_gemm1(x, plan, o["q13"], o["s13"], config=cfg)[real], pick1,
                      candidates()),
            "gemm2": (lambda cfg: moe_routed_gemm2(h, plan, o["q2"], o["s2"], config=cfg)[real], pick2,
                      candidates()),
            "gather": (gathered, pick_g, gather_candidates()),
            "gather2": (gemm2_on_plan, pick_g2, gather_candidates())}


def plans_for(ids, E, block_size, cache):
    """The routing plan aligned to ``block_size`` and its rows in choice order (each tile height has its own)."""
    from fp8_deep import ops
    if block_size not in cache:
        pl = ops.align_routing(ids, E, block_size=block_size)
        inv = pl.inv_perm.reshape(-1)
        cache[block_size] = (pl, inv[inv >= 0].long())
    return cache[block_size]


# the routed GEMMs' tiles are the 16-row blocks of the plan (swap-AB, each re-quantizing its rows per weight tile):
# past this many rows per expert they are not raced (the Gluon / gathered tiles are the candidates there)
ROUTED_MAX_ROWS = 128


def forward_paths(E, T, top_k, H, inter):
    """The paths besides the regular chain raced at this point: decode within its bound; above it the gather path,
    and the routed path up to ``ROUTED_MAX_ROWS`` rows per expert."""
    from fp8_deep.ops.decode import decode_fits
    from fp8_deep.ops.grouped_gemm import peak_rows_per_expert
    if decode_fits(T * top_k, H, inter):
        return ["decode"]
    return (["routed"] if peak_rows_per_expert(T * top_k, E) <= ROUTED_MAX_ROWS else []) + ["gather"]


def gemms_at(E, T, top_k, H, inter, gemms):
    """The GEMMs tuned at this point: those of the paths ``forward_paths`` races (decode and routed: gemm1 / gemm2;
    gather: gather / gather2)."""
    paths = forward_paths(E, T, top_k, H, inter)
    return [g for g in gemms if ("gather" in paths) == g.startswith("gather") or
            (g.startswith("gemm") and set(paths) & {"decode", "routed"})]


def tune_point(E, H, inter, T, top_k, gemm, rep, log, smoke=False):
    """Time every candidate at one grid point; the winner among those bitwise equal to the heuristic's pick."""
    o = operands(E, H, inter, T, top_k)
    P = T * top_k
    run, pick, cands = _runners(o, H, inter, T, top_k)[gemm]
    if smoke:
        cands = [c for c in cands if c.num_warps == 4 and c.num_stages == 3][:3]
    N, K = (H, inter) if gemm in ("gemm2", "gather2") else (2 * inter, H)
    ref = run(pick)
    pick_ms = C.bench(lambda: run(pick), rep=rep)[0]
    results = race(cands, lambda cfg: (run(cfg), lambda: run(cfg)), ref, rep, log)
    best_ms, best_cfg = winner(results, pick, pick_ms)
    o = run = ref = None
    C.free_cuda()
    return dict(E=E, N=N, K=K, rows=P, T=T, top_k=top_k, config=best_cfg, ms=round(best_ms, 5),
                heuristic=str(pick), heuristic_ms=round(pick_ms, 5), candidates=len(results))


PATH_ENVS = {"decode": "FP8_DEEP_DECODE", "routed": "FP8_DEEP_ROUTED", "gather": "FP8_DEEP_GATHER"}


def forward_point(E, H, inter, T, top_k, paths, rep, seed=0):
    """The whole MoE forward as CUDA-graph replays down each of ``paths`` and down the regular chain (same weights,
    routing, tokens; the tile tables just written in effect): ({path: ms}, {path: bitwise equal to the chain})."""
    import fp8_deep
    from fp8_deep.ops import _tuned
    _tuned.load_table.cache_clear()  # the tables this run is writing
    _tuned._lookup_cached.cache_clear()
    o = operands(E, H, inter, T, top_k, seed=seed)

    def fwd():
        return fp8_deep.moe_forward(o["x"], o["q13"], o["q2"], o["tw"], o["ids"], w13_scale=o["s13"],
                                    w2_scale=o["s2"], backend="triton")
    ms, outs = {}, {}
    for path in ["chain", *paths]:
        with C.environ({env: "1" if name == path else "0" for name, env in PATH_ENVS.items()}):
            outs[path] = fwd()
            ms[path] = C.bench(fwd, rep=rep, graph=torch.cuda.is_available())[0]
    same = {p: torch.equal(outs[p].view(torch.int16), outs["chain"].view(torch.int16)) for p in paths}
    o = outs = None
    C.free_cuda()
    return ms, same


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--T", nargs="*", type=int, default=list(TOKENS), help="tokens per call (default %(default)s)")
    p.add_argument("--gemms", nargs="*", default=["gemm1", "gemm2", "gather", "gather2"],
                   choices=["gemm1", "gemm2", "gather", "gather2"],
                   help="the GEMMs tuned (above the decode bound, gather / gather2: the gather path's GEMM1 / GEMM2)")
    p.add_argument("--rep", type=int, default=25, help="do_bench rep per candidate (ms)")
    p.add_argument("--time-budget", type=float, default=300, help="seconds; stops between grid points")
    p.add_argument("--out", default=None, help="the decode table's path (default fp8_deep/configs/decode/<card>.json)")
    p.add_argument("--no-merge", action="store_true", help="drop the existing tables' other entries")
    p.add_argument("--no-forward", action="store_true",
                   help="tune the GEMM tiles only (no forward timing, no moe_decode table entry)")
    p.add_argument("--dry-run", action="store_true", help="print the grid and the candidates; time nothing")
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny shape through the interpreter; writes no table")
    args = p.parse_args(argv)

    from fp8_deep.ops.decode import DECODE_MAX_CHOICES
    models = SMOKE if args.cpu_smoke else {m: MODELS[m] for m in args.models}
    tokens = [2, 70] if args.cpu_smoke else args.T  # the decode GEMMs, then the routed and gathered ones
    grid = [(name, g, E, H, inter, T, top_k) for name, (E, H, inter, top_k) in models.items() for T in tokens
            if H % 128 == 0 and inter % 128 == 0 for g in gemms_at(E, T, top_k, H, inter, args.gemms)]
    if not announce("tune_decode", grid, candidates() + gather_candidates(), args,
                    f" (the decode GEMMs up to {DECODE_MAX_CHOICES} choices, the routed and gathered ones above)"):
        return 0
    card, path, old = table_target("decode", args)
    no_out = argparse.Namespace(**{**vars(args), "out": None})
    _, gather_path, gather_old = table_target("gather", no_out)
    _, fwd_path, fwd_old = table_target("moe_decode", no_out)
    fwd_entries, fwd_rows = [], []
    t0 = time.time()
    entries, gather_entries, rows_out = [], [], []
    for i, (name, g, E, H, inter, T, top_k) in enumerate(grid):
        if args.time_budget and time.time() - t0 > args.time_budget:
            print(f"[note] time budget {args.time_budget:.0f} s spent: stopped before {name} {g} T={T}")
            break
        print(f"  {name} {g} E={E} H={H} I={inter} T={T}", flush=True)
        r = tune_point(E, H, inter, T, top_k, g, args.rep, log=print, smoke=args.cpu_smoke)
        (gather_entries if g.startswith("gather") else entries).append(r)
        gain = r["heuristic_ms"] / r["ms"] if r["ms"] else float("nan")
        rows_out.append(dict(model=name, gemm=g, T=T, choices=r["rows"], best_ms=f"{r['ms']:.4f}",
                             heuristic_ms=f"{r['heuristic_ms']:.4f}", gain=f"{gain:.3f}x", config=r["config"]))
        if not args.cpu_smoke:  # after every point: a run cut short by its time limit keeps what it measured
            write_table(path, card, old, entries, op="decode")
            if gather_entries:
                write_table(gather_path, card, gather_old, gather_entries, op="gather")
        last_of_point = i + 1 == len(grid) or grid[i + 1][0] != name or grid[i + 1][5] != T
        if not last_of_point or args.no_forward:
            continue
        # every GEMM of this (model, T) tuned: the forward down each path against the regular chain
        paths = forward_paths(E, T, top_k, H, inter)
        ms, same = forward_point(E, H, inter, T, top_k, paths, args.rep)
        use = min(["chain"] + [q for q in paths if same[q]], key=lambda q: ms[q])
        fwd_rows.append(dict(model=name, T=T, choices=T * top_k, chain_ms=f"{ms['chain']:.4f}",
                             paths=" ".join(f"{q} {ms[q]:.4f} ({ms['chain'] / ms[q]:.3f}x{'' if same[q] else ', NOT bitwise'})"
                                            for q in paths), use=use))
        fwd_entries.append(dict(E=E, N=2 * inter, K=H, rows=T * top_k, T=T, top_k=top_k, config=use,
                                chain_ms=round(ms["chain"], 5), **{f"{q}_ms": round(ms[q], 5) for q in paths},
                                bitwise={q: same[q] for q in paths}))
        if not args.cpu_smoke:
            write_table(fwd_path, card, fwd_old, fwd_entries, op="moe_decode")
    C.print_table(rows_out, ["model", "gemm", "T", "choices", "best_ms", "heuristic_ms", "gain", "config"],
                  title=f"decode / routed / gathered GEMM tuning on {card} (gain = the heuristic's time / the best's)",
                  prefix="SUMMARY")
    C.print_table(fwd_rows, ["model", "T", "choices", "chain_ms", "paths", "use"],
                  title=f"MoE forward on {card}, each path vs the regular chain (CUDA-graph replays; (x) = chain / "
                        f"path; 'use' is what the forward does with FP8_DEEP_DECODE / FP8_DEEP_ROUTED / "
                        f"FP8_DEEP_GATHER unset)", prefix="SUMMARY")
    if args.cpu_smoke:
        print("SUMMARY cpu-smoke: plumbing only; no table written")
        return 0
    print(f"SUMMARY {len(entries) + len(gather_entries)} grid points measured; tables {path}, {gather_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
