"""The MoE forward of the models users run, every provider, eager and as CUDA-graph replays (issue 24, item 5).

Models (E, H, I per GPU, top-k): Qwen3-30B-A3B (128, 2048, 768, 8), DeepSeek-V3 TP8 shard (256, 7168, 256, 8), EP8
shard (32, 7168, 2048, 8), TP1 (256, 7168, 2048, 8), Mixtral-8x7B (8, 4096, 14336, 2), DeepSeek-V2-Lite
(64, 2048, 1408, 6); T = 1, 16, 256, 2048, 8192 tokens, softmax-top-k routing.

Providers, all from the same FP8 weights (and their dequantization for BF16), routing and hidden states:
  bf16            the complete BF16 MoE (``torch._grouped_mm`` GEMMs, ``fp8_deep.testing.baselines``)
  vllm            vLLM's block-FP8 fused-MoE Triton kernel, its two GEMM launches only, launched as vLLM does
                  (``bench/peer_vllm.py``; needs ``vllm`` or ``.vllm/`` from ``tools/fetch_vllm_moe.sh``)
  ours_triton     ``fp8_deep.moe_forward(..., backend="triton")``, complete
  ours_deep_gemm  the same on DeepGEMM's grouped GEMM (when it imports)
  ours_auto       ``backend="auto"`` (the backend it ran is recorded)
Each is timed eager (``do_bench``, L2 flushed: the host's launch work included when it is the longer) and as CUDA-graph
replays (GPU work only, how a serving engine runs decode). Ratios in the summary: a provider's time over ours_auto's.
Checks before timing: ours against the BF16 MoE (calc_diff, the recipe's error ~2e-3) and vLLM against ours (< 1e-3).

    python bench/bench_models.py                            # everything (~6 min on an H100)
    python bench/bench_models.py --models qwen3-30b-a3b dsv2-lite --T 1 16 256
    python bench/bench_models.py --cpu-smoke                # plumbing: a tiny layer through the interpreter
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

if "--cpu-smoke" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py, bench/peer_vllm.py

import torch  # noqa: E402

import _common as C  # noqa: E402
import peer_vllm as P  # noqa: E402

MODELS = {**{k: v for k, v in P.SHAPES.items() if k != "tiny"}, "dsv2-lite": (64, 2048, 1408, 6)}
SMOKE = {"tiny": P.SHAPES["tiny"]}
TOKENS = [1, 16, 256, 2048, 8192]
PROVIDERS = ["bf16", "vllm", "ours_triton", "ours_deep_gemm", "ours_auto"]


def bf16_weights(q, s):
    """The BF16 weights the FP8 ones stand for (dequantized a few experts at a time)."""
    from fp8_deep import ops
    w = torch.empty(q.shape, dtype=torch.bfloat16, device=q.device)
    for e in range(0, q.shape[0], 8):
        w[e:e + 8] = ops.dequantize_blockwise(q[e:e + 8], s[e:e + 8]).to(torch.bfloat16)
    return w


def providers(hidden, weights, tw, tid, *, kernel, want):
    """``name -> callable`` for the providers of ``want`` that can run here, and notes on the ones that cannot."""
    import fp8_deep
    from fp8_deep.ops import _registry
    from fp8_deep.testing.baselines import bf16_moe_grouped_mm, bf16_moe_loop, grouped_mm_available
    q13, s13, q2, s2, w13, w2 = weights
    fns, notes = {}, []
    if "bf16" in want:
        moe = bf16_moe_grouped_mm if grouped_mm_available(hidden.device) else bf16_moe_loop
        fns["bf16"] = lambda: moe(hidden, w13, w2, tw, tid)
    if "vllm" in want:
        if kernel is None:
            notes.append("vllm: no kernel (pip install vllm, or bash tools/fetch_vllm_moe.sh)")
        else:
            peer = P.VllmPeer(q13, s13, q2, s2, tid, tw, kernel=kernel)
            fns["vllm"] = peer.gemms_fn(hidden)
            fns["_vllm_full"] = lambda: peer.forward(hidden)  # checked, not timed
    for b in ("triton", "deep_gemm", "auto"):
        if f"ours_{b}" not in want:
            continue
        if b == "deep_gemm" and not _registry.available("grouped_gemm", "deep_gemm"):
            notes.append("ours_deep_gemm: DeepGEMM not importable")
            continue
        fns[f"ours_{b}"] = (lambda b=b: fp8_deep.moe_forward(hidden, q13, q2, tw, tid, w13_scale=s13, w2_scale=s2,
                                                             backend=b))
    return fns, notes


def run_point(model, E, H, inter, k, T, weights, kernel, args, log):
    import fp8_deep
    from fp8_deep.testing import calc_diff
    dev = C.device()
    tw, tid = P.make_routing(T, E, k, dev, seed=T)
    hidden = C.randn((T, H), seed=T + 1)
    fns, notes = providers(hidden, weights, tw, tid, kernel=kernel, want=args.providers)
    for n in notes:
        print(f"  [note] {n}")
    row = dict(model=model, E=E, H=H, I=inter, topk=k, T=T)
    ours = fns.get("ours_auto", fns.get("ours_triton"))
    if ours is not None:
        out = ours().float()
        row["auto_backend"] = fp8_deep.last_backend()
        row["auto_path"] = P.forward_path_of(hidden, tid, E, H, inter, "auto" if "ours_auto" in fns else "triton")
        if "bf16" in fns:
            row["calc_diff_bf16"] = calc_diff(out, fns["bf16"]().float())
        if "_vllm_full" in fns:
            row["calc_diff_vllm"] = calc_diff(out, fns.pop("_vllm_full")().float())
    fns.pop("_vllm_full", None)
    for name, fn in fns.items():
        for mode in ("eager", "graph"):
            if mode == "graph" and dev != "cuda":
                continue
            try:
                row[f"{name}_{mode}_ms"] = C.bench(fn, rep=args.rep, graph=mode == "graph")[0]
            except Exception as exc:  # noqa: BLE001 -- one provider failing must not cost the others' numbers
                print(f"  [error] {name} {mode}: {type(exc).__name__}: {str(exc)[:160]}")
    ok = (row.get("calc_diff_bf16", 0.0) < 1e-2) and (row.get("calc_diff_vllm", 0.0) < 1e-3)
    row["status"] = "ok" if ok else "CHECK FAILED"
    log.add(**row)
    del fns, hidden, tw, tid
    C.free_cuda()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--T", nargs="*", type=int, default=TOKENS)
    p.add_argument("--providers", nargs="*", default=PROVIDERS, choices=PROVIDERS)
    p.add_argument("--rep", type=int, default=50, help="do_bench rep (ms)")
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds; what is left is skipped")
    p.add_argument("--tag", default="", help="suffix of the CSV and PNG names")
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny layer through the interpreter (no timings)")
    args = p.parse_args(argv)
    models = SMOKE if args.cpu_smoke else {m: MODELS[m] for m in args.models}
    tokens = [1, 8] if args.cpu_smoke else args.T
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("bench_models needs a CUDA GPU (--cpu-smoke for the plumbing)")
        return 0
    print(C.env_line(), flush=True)
    try:
        kernel = P.load_vllm_kernel("auto") if "vllm" in args.providers else None
    except ImportError as exc:
        kernel = None
        print(f"[note] {exc}")
    budget = C.Budget(args.time_budget)
    out_dir = C.results_dir()
    log = C.CsvLog(out_dir / f"bench_models{args.tag}.csv")
    rows = []
    for model, (E, H, inter, k) in models.items():
        if budget.spent(reserve=20):
            print(f"[skip] {model}: time budget spent")
            continue
        dev = C.device()
        q13, s13, q2, s2 = P.make_weights(E, H, inter, dev, seed=inter)
        w13 = w2 = None
        if "bf16" in args.providers:
            w13, w2 = bf16_weights(q13, s13), bf16_weights(q2, s2)
        weights = (q13, s13, q2, s2, w13, w2)
        mrows = []
        for T in tokens:
            if budget.spent(reserve=15):
                print(f"[skip] {model} T={T}: time budget spent")
                continue
            print(f"{model} T={T}", flush=True)
            try:
                mrows.append(run_point(model, E, H, inter, k, T, weights, kernel, args, log))
            except torch.cuda.OutOfMemoryError if torch.cuda.is_available() else MemoryError:
                print(f"[skip] {model} T={T}: out of memory")
                C.free_cuda()
        rows += mrows
        mode = "graph" if torch.cuda.is_available() else "eager"
        series = {pr: [r.get(f"{pr}_{mode}_ms", math.nan) for r in mrows] for pr in PROVIDERS}
        C.plot(out_dir / f"bench_models_{model}{args.tag}.png", series, [r["T"] for r in mrows], xlabel="tokens T",
               ylabel=f"ms ({mode})", title=f"{model} (E, H, I, top-k) = {(E, H, inter, k)}, {C.card_name()}",
               logx=True, logy=True)
        del weights, q13, s13, q2, s2, w13, w2
        C.free_cuda()
    table = []
    for r in rows:
        t = dict(model=r["model"], T=r["T"], backend=r.get("auto_backend", ""), path=r.get("auto_path", ""),
                 status=r["status"])
        for mode in ("graph", "eager"):
            base = r.get(f"ours_auto_{mode}_ms")
            for pr in ("bf16", "vllm", "ours_triton", "ours_deep_gemm"):
                v = r.get(f"{pr}_{mode}_ms")
                t[f"{pr}/auto_{mode}"] = f"{v / base:.2f}" if v is not None and base else "-"
            t[f"auto_{mode}_ms"] = f"{base:.3f}" if base else "-"
        table.append(t)
    cols = ["model", "T", "auto_graph_ms", "bf16/auto_graph", "vllm/auto_graph", "ours_triton/auto_graph",
            "ours_deep_gemm/auto_graph", "auto_eager_ms", "vllm/auto_eager", "backend", "path", "status"]
    C.print_table(table, cols, title=f"bench_models ({C.card_name()}): each provider's time over ours_auto's "
                                     f"(> 1: ours_auto faster)", prefix="SUMMARY bench_models")
    print(f"[done] {len(rows)} points -> {log.path}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
