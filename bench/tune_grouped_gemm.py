"""Tune the FP8 grouped GEMM's tile configuration on this card; write ``fp8_deep/configs/grouped_gemm/<card>.json``.

The launcher (``fp8_deep.ops.grouped_gemm_fp8``) reads that table (``fp8_deep/ops/_tuned.py``): for a call's
``(N, K)`` it takes the entry nearest in rows per expert (then in E), and keeps its built-in heuristic where the card
has no table or no entry of that ``(N, K)``. ``FP8_DEEP_TUNED=0`` ignores tables (A/B).

Grid: the two expert GEMMs of the MoE models users run -- GEMM1 ``(rows, H) x w13 (E, 2I, H)`` and GEMM2
``(rows, I) x w2 (E, H, I)``; ``--gemms dgrad1 dgrad2`` adds the training backward's ``(rows, 2I) x (E, H, 2I)`` and
``(rows, H) x (E, I, H)`` -- for each model below, at T tokens routed top-k at random (softmax of random logits,
the MoE's own layout: ``align_routing`` with the Triton backend's 16-row alignment). The key ``rows`` is what the MoE
passes as its hint, ``peak_rows_per_expert(T * top_k, E)``; the timing runs on the real, uneven counts.

Candidates: every configuration in the launcher's families (small-M swap-AB, medium TMA, large, Gluon, experimental)
plus swap-AB variants, those that can run here. A candidate's output must equal the heuristic pick's bit for bit on
every routed row (same per-128-K promotion order: a table may change speed, never results); one that differs is
reported and not eligible. Timing: ``triton.testing.do_bench`` medians (L2 flushed: the weights stream from HBM, as
in the MoE). Every grid point's winner is written, the heuristic's own config included, so that nearest-neighbour
lookups between grid points stay right; the table also records each winner's time and the heuristic's.

    python bench/tune_grouped_gemm.py                          # every model, T = 1 ... 8192 (a few minutes)
    python bench/tune_grouped_gemm.py --models qwen3_30b --T 16 256 --time-budget 120
    python bench/tune_grouped_gemm.py --dry-run                # print the grid and candidates, time nothing
    python bench/tune_grouped_gemm.py --cpu-smoke              # plumbing on a tiny shape (interpreter), no table

``--time-budget`` stops between grid points; the table is rewritten (atomically) after every grid point, merged
with the existing table's entries for the grid points not re-measured (``--no-merge``: dropped).
"""
from __future__ import annotations

import argparse
import dataclasses
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

# name: (E, H, I, top_k) -- issue 24's shapes (per GPU)
MODELS = {
    "qwen3_30b": (128, 2048, 768, 8),
    "dsv3_tp8": (256, 7168, 256, 8),
    "dsv3_ep8": (32, 7168, 2048, 8),
    "dsv3_tp1": (256, 7168, 2048, 8),
    "mixtral": (8, 4096, 14336, 2),
    "dsv2_lite": (64, 2048, 1408, 6),
}
TOKENS = (1, 16, 64, 256, 1024, 2048, 8192)
# (N, K) of each GEMM from (H, I): the forward's two, and the backward's dgrad GEMMs (dy @ W2 with W2^T's blocks,
# dh @ W13 with W13^T's blocks; fp8_deep/moe/autograd.py)
GEMM_SHAPES = {"gemm1": lambda H, i: (2 * i, H), "gemm2": lambda H, i: (H, i),
               "dgrad2": lambda H, i: (i, H), "dgrad1": lambda H, i: (H, 2 * i)}
SMOKE = {"smoke": (4, 256, 128, 2)}


def candidates():
    """Every distinct configuration of the launcher's families, plus swap-AB variants the heuristic never picks."""
    from fp8_deep.ops import grouped_gemm as gg
    from fp8_deep.ops.grouped_gemm import TritonGroupedGemm
    extra = (
        gg.GemmConfig(BLOCK_M=16, BLOCK_N=256, GROUP_M=1, SWAP_AB=True, PERSISTENT=True, num_warps=4, num_stages=4),
        gg.GemmConfig(BLOCK_M=32, BLOCK_N=64, GROUP_M=1, SWAP_AB=True, PERSISTENT=True, num_warps=4, num_stages=6),
        gg.GemmConfig(BLOCK_M=32, BLOCK_N=128, GROUP_M=1, SWAP_AB=True, PERSISTENT=False, num_warps=4, num_stages=5),
        gg.GemmConfig(BLOCK_M=64, BLOCK_N=128, GROUP_M=1, SWAP_AB=True, PERSISTENT=False, num_warps=4, num_stages=4),
        gg.GemmConfig(BLOCK_M=64, BLOCK_N=64, GROUP_M=1, SWAP_AB=True, PERSISTENT=True, num_warps=4, num_stages=6),
        # short K (Qwen3's GEMM2: K=768, six K steps a tile): fewer stages leave shared memory for 3-6 programs per SM
        # (16 KB of weight + 2 KB of tokens a stage), more tiles in flight to hide each one's load latency
        # (4 stages: vLLM's block-FP8 MoE decode tile on the H100, M16 N64 K128 w4 s4 with a TMA weight load; its
        # block-map / TMA_B variants follow below)
        *(gg.GemmConfig(BLOCK_M=16, BLOCK_N=bn, GROUP_M=1, SWAP_AB=True, PERSISTENT=False, num_warps=4, num_stages=st)
          for bn in (64, 128) for st in (2, 3, 4)),
        # ~100-200 rows per expert (Qwen3-30B-A3B and the DeepSeek-V3 TP8 shard at T=2048): 128-row tiles are 66% /
        # 50% full there (an expert of 130 rows takes two), 64-row ones 80% / 68%. One warpgroup of async wgmma,
        # 254 registers and 96 KiB of shared memory at 4 stages: two programs per SM (sm_90 compile, Triton 3.9)
        *(gg.GemmConfig(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, GLUON=True, num_warps=4, num_stages=st) for st in (3, 4)),
    )
    seen, out = set(), []
    for cfg in (*gg.SMALL_M_CONFIGS, *gg.MEDIUM_M_CONFIGS, *gg.LARGE_M_CONFIGS, *gg.GLUON_CONFIGS,
                *gg.EXPERIMENTAL_CONFIGS, *extra):
        variants = [cfg]
        # tiles no taller than the plan's 16-row blocks: also found through its block map (one program per tile)
        # (one program per tile), with pointer loads or the weight tiles through a TMA descriptor
        if cfg.BLOCK_M <= TritonGroupedGemm.row_alignment and not (cfg.TMA or cfg.GLUON or cfg.SPLIT_M):
            variants += [dataclasses.replace(cfg, PERSISTENT=False, BLOCK_MAP=True, TMA_B=tma) for tma in (False, True)]
        for v in variants:
            if str(v) not in seen:
                seen.add(str(v))
                out.append(v)
    return out


def runnable(cfg, a, b, N) -> bool:
    from fp8_deep.ops import grouped_gemm as gg
    if cfg.GLUON:
        return gg._gluon_problem(a, b, N) is None
    if cfg.TMA or cfg.TMA_B:
        return gg._tma_problem(a, b, N) is None
    return True


def operands(E, N, K, T, top_k, seed=0):
    """FP8 weights / scales, the routed FP8 activations in the MoE's layout, and the routing plan."""
    from fp8_deep.numerics import FP8_DTYPE, cdiv
    from fp8_deep.ops import quantize_activation
    from fp8_deep.ops.grouped_gemm import TritonGroupedGemm
    from fp8_deep.ops.routing import align_routing, permute_rows
    dev = C.device()
    b = torch.empty(E, N, K, dtype=FP8_DTYPE, device=dev)
    for e in range(E):  # per expert: bounded temporaries at DeepSeek-V3 sizes
        b[e] = C.randn((N, K), seed=seed + e).to(FP8_DTYPE)
    b_scale = torch.rand(E, cdiv(N, 128), cdiv(K, 128), device=dev) * 1e-2 + 5e-3
    _, ids = C.random_routing(T, E, top_k, seed=seed)
    plan = align_routing(ids, E, block_size=TritonGroupedGemm.row_alignment)
    qx, sx = quantize_activation(C.randn((T, K), seed=seed + 1))
    a, a_scale = permute_rows(qx, sx, plan, scale_layout=TritonGroupedGemm.a_scale_layout)
    return a, a_scale, b, b_scale, plan


def tune_point(E, N, K, T, top_k, cands, rep, log):
    """Time every runnable candidate at one grid point; the winner among those bitwise equal to the pick."""
    from fp8_deep.ops.grouped_gemm import grouped_gemm_fp8, peak_rows_per_expert, pick_config
    a, a_scale, b, b_scale, plan = operands(E, N, K, T, top_k)
    rows = peak_rows_per_expert(T * top_k, E)
    valid = plan.m_indices >= 0

    def run(cfg, out=None):  # as the MoE calls it (TritonGroupedGemm.gemm): with the plan's block map
        return grouped_gemm_fp8(a, a_scale, b, b_scale, plan.expert_offsets, plan.expert_counts, out=out,
                                config=cfg, expected_m=rows,
                                block_map=(plan.expert_ids, plan.m_indices, plan.block_size))

    pick = pick_config(rows, K)
    # the launcher's own choice, the heuristic with its fallbacks: no table, no pinned config
    own = {"FP8_DEEP_TUNED": "0", "FP8_DEEP_GEMM_CONFIG": None}
    with C.environ(own):
        ref = run(None)
        pick_ms = C.bench(lambda: run(None, torch.empty_like(ref)), rep=rep)[0]
    def attempt(cfg):
        out = torch.full_like(ref, float("nan"))
        run(cfg, out)
        return out[valid], lambda: run(cfg, out)
    results = race([c for c in cands if runnable(c, a, b, N)], attempt, ref[valid], rep, log)
    best = winner(results, pick, pick_ms, runnable(pick, a, b, N))
    a = a_scale = b = b_scale = plan = ref = None  # the closures hold them: release before freeing the cache
    C.free_cuda()
    if best is None:
        return None
    best_ms, best_cfg = best
    return dict(E=E, N=N, K=K, rows=rows, T=T, top_k=top_k, config=best_cfg, ms=round(best_ms, 5),
                heuristic=str(pick), heuristic_ms=round(pick_ms, 5), candidates=len(results))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--T", nargs="*", type=int, default=list(TOKENS), help="tokens per call (default %(default)s)")
    p.add_argument("--gemms", nargs="*", default=["gemm1", "gemm2"], choices=list(GEMM_SHAPES),
                   help="the forward's GEMMs (default) and/or the training backward's dgrad GEMMs")
    p.add_argument("--rep", type=int, default=25, help="do_bench rep per candidate (ms)")
    p.add_argument("--time-budget", type=float, default=480, help="seconds; stops between grid points")
    p.add_argument("--out", default=None, help="table path (default fp8_deep/configs/grouped_gemm/<card>.json)")
    p.add_argument("--no-merge", action="store_true", help="drop the existing table's other entries")
    p.add_argument("--only", nargs="*", default=[], metavar="TEXT",
                   help="candidates whose config string holds every TEXT (e.g. GLUON=1 BLOCK_M=64), raced against "
                        "the table's current pick for each point (a point keeps its entry unless one beats it)")
    p.add_argument("--dry-run", action="store_true", help="print the grid and the candidates; time nothing")
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny shape through the interpreter; writes no table")
    args = p.parse_args(argv)

    from fp8_deep.ops.grouped_gemm import _table_config
    cands = candidates()
    if args.only:
        cands = [c for c in cands if all(t in str(c) for t in args.only)]
    models = SMOKE if args.cpu_smoke else {m: MODELS[m] for m in args.models}
    tokens = [4] if args.cpu_smoke else args.T
    grid = []
    for name, (E, H, inter, top_k) in models.items():
        for g in args.gemms:
            N, K = GEMM_SHAPES[g](H, inter)
            grid += [(name, g, E, N, K, T, top_k) for T in tokens]
    if not announce("tune_grouped_gemm", grid, cands, args):
        return 0
    if args.cpu_smoke:  # the interpreter: pointer-load configs only, few of them
        cands = [c for c in cands if not (c.GLUON or c.TMA)][:3]
    card, path, old = table_target("grouped_gemm", args)
    t0 = time.time()
    entries, rows_out = [], []
    for name, g, E, N, K, T, top_k in grid:
        if args.time_budget and time.time() - t0 > args.time_budget:
            print(f"[note] time budget {args.time_budget:.0f} s spent: stopped before {name} {g} T={T}")
            break
        print(f"  {name} {g} E={E} N={N} K={K} T={T}", flush=True)
        point_cands = cands
        if args.only:  # the current entry races too: a restricted run never replaces it with a slower config
            cur = [_table_config(e["config"]) for e in old
                   if (e["E"], e["N"], e["K"], e["T"], e["top_k"]) == (E, N, K, T, top_k)]
            point_cands = cur + [c for c in cands if str(c) not in {str(x) for x in cur}]
        r = tune_point(E, N, K, T, top_k, point_cands, args.rep, log=print)
        if r is None:
            print("    no eligible candidate")
            continue
        entries.append(r)
        gain = r["heuristic_ms"] / r["ms"] if r["ms"] else float("nan")
        rows_out.append(dict(model=name, gemm=g, T=T, rows=r["rows"], best_ms=f"{r['ms']:.4f}",
                             heuristic_ms=f"{r['heuristic_ms']:.4f}", gain=f"{gain:.3f}x", config=r["config"]))
        if not args.cpu_smoke:  # after every point: a run cut short by its time limit keeps what it measured
            write_table(path, card, old, entries)
    C.print_table(rows_out, ["model", "gemm", "T", "rows", "best_ms", "heuristic_ms", "gain", "config"],
                  title=f"grouped GEMM tuning on {card} (gain = the launcher's own choice's time / the best's)",
                  prefix="SUMMARY")
    if args.cpu_smoke:
        print("SUMMARY cpu-smoke: plumbing only; no table written")
        return 0
    print(f"SUMMARY {len(entries)} grid points measured; table {path}")
    return 0


def race(cands, attempt, ref, rep, log):
    """Each candidate run once and compared with ``ref`` bit for bit, then timed: ``attempt(cfg)`` -> (its output,
    a callable to time). Returns ``[(ms, config string, bitwise equal)]``; a config that cannot compile or run here
    is reported and left out, one with other bytes is reported (and not eligible: ``winner``)."""
    results = []
    for cfg in cands:
        try:
            got, timed = attempt(cfg)
            same = torch.equal(got.view(torch.int16), ref.view(torch.int16))
            ms = C.bench(timed, rep=rep)[0]
        except Exception as exc:  # noqa: BLE001 -- a config that cannot compile or run here is not a candidate
            log(f"    {cfg}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
            continue
        results.append((ms, str(cfg), same))
        if not same:
            log(f"    {cfg}: {ms:.4f} ms but NOT bitwise equal to the pick: not eligible")
    return results


def winner(results, pick, pick_ms, pick_runs=True):
    """(ms, config string) of the fastest bitwise-equal candidate, or the heuristic's own pick when nothing beat it
    (and it runs here); None when neither exists."""
    eligible = sorted((ms, cfg) for ms, cfg, same in results if same)
    if pick_runs and (not eligible or pick_ms < eligible[0][0]):
        return pick_ms, str(pick)
    return eligible[0] if eligible else None


def announce(tool: str, grid, cands, args, what: str = "") -> bool:
    """Print the environment and the grid; False (nothing to time) on ``--dry-run`` (the grid and the candidates
    printed) or without a GPU unless ``--cpu-smoke``."""
    print(C.env_line())
    print(f"{tool}: {len(grid)} grid points{what} x up to {len(cands)} candidates")
    if args.dry_run:
        for pt in grid:
            print("  ", pt)
        for cfg in cands:
            print("   candidate", cfg)
        return False
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(f"{tool} needs a CUDA GPU (--cpu-smoke for the plumbing)")
        return False
    return True


def table_target(op: str, args):
    """(card, the table's path, the entries it holds that a run merges with): ``args.out`` or
    ``fp8_deep/configs/<op>/<card>.json``; none to merge with ``--no-merge`` or ``--cpu-smoke``."""
    from fp8_deep.ops._tuned import TABLE_DIR, card_key
    card = card_key(torch.cuda.get_device_name()) if torch.cuda.is_available() else "cpu"
    path = Path(args.out) if args.out else TABLE_DIR / op / f"{card}.json"
    old = []
    if path.is_file() and not args.no_merge and not args.cpu_smoke:
        old = json.loads(path.read_text())["entries"]
    return card, path, old


def write_table(path: Path, card: str, old, entries, op: str = "grouped_gemm") -> None:
    """The merged table, written to a temporary file and renamed over ``path`` (never half written)."""
    fresh = {(e["E"], e["N"], e["K"], e["rows"]) for e in entries}
    keep = [e for e in old if (e["E"], e["N"], e["K"], e["rows"]) not in fresh]
    table = dict(op=op, card=card, versions=C.versions(), git=C.git_rev(), date=time.strftime("%Y-%m-%d"),
                 entries=sorted(keep + entries, key=lambda e: (e["N"], e["K"], e["E"], e["rows"])))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    # a heuristic that could not be timed is null, not NaN (strict JSON)
    tmp.write_text(json.dumps(table, indent=1, allow_nan=False, default=str) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
