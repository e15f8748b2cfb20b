"""Measure which grouped-GEMM backend runs the whole MoE forward faster on this card; write
``fp8_deep/configs/moe_backend/<card>.json``, the table ``backend="auto"`` reads (``fp8_deep/ops/backend.py``).

For each model (issue 24's shapes) and T tokens routed top-k at random: ``fp8_deep.moe_forward`` with
``backend="triton"`` and with ``backend="deep_gemm"`` on the same FP8 weights, scales and routing, both as CUDA-graph
replays (GPU work only: how a serving engine runs them; eager host time is the same Python for both), outputs
checked against each other (calc_diff < 1e-3). The entry's key is the layer's ``(E, N = 2I, K = H)`` and
``rows = round(T * top_k / E)`` (what ``select_grouped_gemm`` passes); its ``config`` is the faster backend's name.
``auto`` takes the nearest entry within 2x of the rows, else its row threshold. Needs DeepGEMM (carry ``.deepgemm``).

    python bench/tune_backend.py                             # every model, T = 1 ... 8192
    python bench/tune_backend.py --models qwen3_30b --T 256 2048
    python bench/tune_backend.py --dry-run

The table is rewritten (atomically, merged with the entries not re-measured) after every grid point.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py and the GEMM tuner

import torch  # noqa: E402

import _common as C  # noqa: E402
from tune_grouped_gemm import MODELS, TOKENS, write_table  # noqa: E402


def point(E, H, inter, top_k, T, rep, seed=0):
    """(triton ms, deep_gemm ms, calc_diff) of one MoE forward at T tokens."""
    import fp8_deep
    from fp8_deep.ops import quantize_weight_blockwise
    from fp8_deep.testing import calc_diff
    q13, s13 = quantize_weight_blockwise(C.randn((E, 2 * inter, H), std=0.02, seed=seed))
    q2, s2 = quantize_weight_blockwise(C.randn((E, H, inter), std=0.02, seed=seed + 1))
    x = C.randn((T, H), seed=seed + 2)
    tw, ids = C.random_routing(T, E, top_k, seed=seed + 3)

    def fwd(backend):
        return lambda: fp8_deep.moe_forward(x, q13, q2, tw, ids, w13_scale=s13, w2_scale=s2, backend=backend)

    outs = {b: fwd(b)() for b in ("triton", "deep_gemm")}
    diff = calc_diff(outs["triton"].float(), outs["deep_gemm"].float())
    ms = {b: C.bench(fwd(b), rep=rep, graph=True)[0] for b in ("triton", "deep_gemm")}
    q13 = s13 = q2 = s2 = x = outs = None  # the closures hold them: release before freeing the cache
    C.free_cuda()
    return ms["triton"], ms["deep_gemm"], diff


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--T", nargs="*", type=int, default=list(TOKENS))
    p.add_argument("--rep", type=int, default=50, help="do_bench_cudagraph rep (ms)")
    p.add_argument("--time-budget", type=float, default=400, help="seconds; stops between grid points")
    p.add_argument("--out", default=None, help="table path (default fp8_deep/configs/moe_backend/<card>.json)")
    p.add_argument("--no-merge", action="store_true", help="drop the existing table's other entries")
    p.add_argument("--dry-run", action="store_true", help="print the grid; time nothing")
    args = p.parse_args(argv)

    grid = [(m, *MODELS[m], T) for m in args.models for T in args.T]
    print(C.env_line())
    print(f"tune_backend: {len(grid)} grid points")
    if args.dry_run:
        for pt in grid:
            print("  ", pt)
        return 0
    if not torch.cuda.is_available():
        print("tune_backend needs a CUDA GPU with DeepGEMM")
        return 0
    import json

    from fp8_deep.ops import _registry
    from fp8_deep.ops._tuned import TABLE_DIR, card_key
    if not _registry.available("grouped_gemm", "deep_gemm"):
        print("tune_backend: deep_gemm is not importable here (bash tools/fetch_deepgemm.sh, carry .deepgemm); "
              "nothing to compare")
        return 0
    import os
    os.environ["FP8_DEEP_CHECK_ROUTING"] = "0"  # graph capture: no host sync
    card = card_key(torch.cuda.get_device_name())
    path = Path(args.out) if args.out else TABLE_DIR / "moe_backend" / f"{card}.json"
    old = json.loads(path.read_text())["entries"] if path.is_file() and not args.no_merge else []
    t0, entries, rows_out = time.time(), [], []
    for name, E, H, inter, top_k, T in grid:
        if args.time_budget and time.time() - t0 > args.time_budget:
            print(f"[note] time budget {args.time_budget:.0f} s spent: stopped before {name} T={T}")
            break
        try:
            ms_t, ms_d, diff = point(E, H, inter, top_k, T, args.rep)
        except Exception as exc:  # noqa: BLE001 -- a shape one backend cannot run: no entry, the threshold decides
            print(f"  {name} T={T}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
            continue
        if not diff < 1e-3:
            print(f"  {name} T={T}: the backends disagree (calc_diff {diff:.2e}): no entry")
            continue
        best = "deep_gemm" if ms_d < ms_t else "triton"
        rows = max(1, round(T * top_k / E))
        entries.append(dict(E=E, N=2 * inter, K=H, rows=rows, T=T, top_k=top_k, config=best,
                            triton_ms=round(ms_t, 5), deep_gemm_ms=round(ms_d, 5)))
        rows_out.append(dict(model=name, T=T, rows=rows, triton_ms=f"{ms_t:.4f}", deep_gemm_ms=f"{ms_d:.4f}",
                             faster=best, calc_diff=f"{diff:.1e}"))
        print(f"  {name} T={T}: triton {ms_t:.4f} ms, deep_gemm {ms_d:.4f} ms -> {best}", flush=True)
        write_table(path, card, old, entries, op="moe_backend")
    C.print_table(rows_out, ["model", "T", "rows", "triton_ms", "deep_gemm_ms", "faster", "calc_diff"],
                  title=f"MoE forward backend on {card} (CUDA-graph replays)", prefix="SUMMARY")
    print(f"SUMMARY {len(entries)} grid points measured; table {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
