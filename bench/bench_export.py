"""Weight-sync benchmark (issue 20, item 6): ``fp8_deep.quantize_state_dict`` streaming a model's BF16 weights into
block-FP8 buckets, end to end (host work included: naming, grouping, address tables, launches), against a same-bytes copy.

Models (BF16 weights allocated on the GPU, as many layers as fit in ``--mem-frac`` of free memory):
  dsv3   DeepSeek-V3 MoE layers' experts: E=256, w13 (E, 4096, 7168) + w2 (E, 7168, 2048) per layer (22.5 GB
         BF16 a layer; 58 layers = 1.3 TB do not fit one GPU: the run takes as many as fit and says how many).
  qwen3  a Qwen3-30B-A3B-sized model: H=2048, 32 q / 4 kv heads of 128, E=128 experts of I=768, vocab 151936 (embedding
         and lm_head pass through), up to 48 layers.

Layouts of the expert weights (providers):
  stacked    one (E, N, K) tensor per projection and layer (vLLM's ``experts.w13_weight`` names; what a trainer that
             keeps experts stacked, e.g. fp8_deep.FP8MoE, holds): one launch per tensor, no copy.
  views      per-expert names (``experts.{e}.gate_proj.weight``), views of a stacked (E, 2I, H) w13 (gate rows
             first, fp8_deep.FP8MoE's layout) and (E, H, I) w2: gate/up and down stacked again without a copy.
  separate   per-expert names, each tensor its own allocation (an HF model): same-shape tensors are quantized by one
             launch that reads them through a device table of their addresses (no copy).
  per_tensor separate tensors, one launch each (``batch=False``): what per-tensor sync loops cost.
  *_plan     the layout above through a ``WeightSyncPlan`` built once outside the timing and replayed (no per-tensor
             host work: what a trainer that syncs every step runs).
  copy_sm    an SM kernel moving the same bytes (read + write) as the quantized tensors' minimal traffic (3 bytes an
             element + scales), timed the same way: the ceiling.

Metrics: ms per full sync (all buckets), GB/s of BF16 read, % of the same-bytes copy rate (pct_copy = t_copy / t),
launches. Each provider's output is validated once (first bucket's quantized tensors bitwise against a direct
``quantize_weight_blockwise`` call) before timing. The consumer only drops each bucket (a rollout engine's
``load_weights`` or a broadcast would follow). Target: >= 85% of the copy rate end to end.

    python bench/bench_export.py                       # both models, all layouts (~3 min on an H100)
    python bench/bench_export.py --model qwen3 --layers 12 --bucket-mb 512
    python bench/bench_export.py --cpu-smoke            # plumbing only, tiny shapes, no meaningful times
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py when run as a script

import torch  # noqa: E402

import _common as C  # noqa: E402

PROVIDERS = ["stacked", "views", "separate", "per_tensor", "stacked_plan", "views_plan", "separate_plan", "copy_sm"]
MODELS = {
    # name: (layers, E, H, I, q_size, kv_size, vocab, attention)
    "dsv3": dict(layers=58, E=256, H=7168, inter=2048, attn=False, vocab=0),
    "qwen3": dict(layers=48, E=128, H=2048, inter=768, attn=True, q=4096, kv=512, vocab=151936),
}
SMOKE = {
    "dsv3": dict(layers=2, E=4, H=256, inter=128, attn=False, vocab=0),
    "qwen3": dict(layers=2, E=4, H=256, inter=128, attn=True, q=256, kv=128, vocab=64),
}


def layer_bytes(m) -> int:
    n = m["E"] * 3 * m["inter"] * m["H"]
    if m["attn"]:
        n += 2 * m["q"] * m["H"] + 2 * m["kv"] * m["H"]
    return 2 * n


def build(m, layers: int, layout: str):
    """A state dict (insertion order = a model's named_parameters order) in the given expert layout."""
    E, H, inter = m["E"], m["H"], m["inter"]
    sd = {}
    if m["vocab"]:
        sd["model.embed_tokens.weight"] = C.randn((m["vocab"], H), std=0.02)
    for i in range(layers):
        p = f"model.layers.{i}"
        if m["attn"]:
            sd[f"{p}.input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16, device=C.device())
            for n, shape in (("q_proj", (m["q"], H)), ("k_proj", (m["kv"], H)), ("v_proj", (m["kv"], H)),
                             ("o_proj", (H, m["q"]))):
                sd[f"{p}.self_attn.{n}.weight"] = C.randn(shape, std=0.02, seed=i)
            sd[f"{p}.mlp.gate.weight"] = C.randn((E, H), std=0.02, seed=i)
        if layout == "stacked":
            sd[f"{p}.mlp.experts.w13_weight"] = C.randn((E, 2 * inter, H), std=0.02, seed=i)
            sd[f"{p}.mlp.experts.w2_weight"] = C.randn((E, H, inter), std=0.02, seed=i)
            continue
        if layout == "views":  # per-expert views of a (E, 2I, H) w13 (gate rows first) and a (E, H, I) w2
            w13 = C.randn((E, 2 * inter, H), std=0.02, seed=i)
            stacks = {"gate_proj": w13[:, :inter], "up_proj": w13[:, inter:],
                      "down_proj": C.randn((E, H, inter), std=0.02, seed=i)}
        for e in range(E):
            for proj, shape in (("gate_proj", (inter, H)), ("up_proj", (inter, H)), ("down_proj", (H, inter))):
                name = f"{p}.mlp.experts.{e}.{proj}.weight"
                sd[name] = stacks[proj][e] if layout == "views" else C.randn(shape, std=0.02, seed=e)
    if m["vocab"]:
        sd["model.norm.weight"] = torch.ones(H, dtype=torch.bfloat16, device=C.device())
        sd["lm_head.weight"] = C.randn((m["vocab"], H), std=0.02)
    return sd


def traffic(sd):
    """(elements quantized, minimal bytes moved: BF16 read + FP8 written + float32 scales written)."""
    from fp8_deep.export import is_quantized_name
    elems, moved = 0, 0
    for n, t in sd.items():
        if is_quantized_name(n):
            nb = -(-t.shape[-2] // 128) * -(-t.shape[-1] // 128) * (t.numel() // (t.shape[-2] * t.shape[-1]))
            elems += t.numel()
            moved += 3 * t.numel() + 4 * nb
    return elems, moved


def sync_fn(sd, bucket_bytes, batch, plan=False):
    """One full sync as a callable: a fresh ``quantize_state_dict`` per call, or (``plan``) one ``WeightSyncPlan``
    built here (outside the timing, as a trainer builds it once) and replayed per call."""
    from fp8_deep.export import WeightSyncPlan, quantize_state_dict
    state = {}
    if plan:
        sync = WeightSyncPlan(sd, bucket_bytes=bucket_bytes)
        state["stats"] = sync.stats

        def run():
            for _bucket in sync.run():
                pass
        return run, state

    def run():
        stream = quantize_state_dict(sd, bucket_bytes=bucket_bytes, batch=batch)
        for _bucket in stream:
            pass  # a consumer (load_weights, broadcast) would take the bucket here
        state["stats"] = stream.stats

    return run, state


def validate(sd, bucket_bytes, batch) -> str:
    from fp8_deep.export import quantize_state_dict, scale_name
    from fp8_deep.ops import quantize_weight_blockwise
    stream = quantize_state_dict(sd, bucket_bytes=bucket_bytes, batch=batch)
    bucket = next(iter(stream))
    got = dict(bucket)
    checked = 0
    for n, t in got.items():
        if n in sd and t.dtype == torch.float8_e4m3fn:
            q, s = quantize_weight_blockwise(sd[n])
            if not (torch.equal(q.view(torch.uint8), t.view(torch.uint8)) and torch.equal(s, got[scale_name(n)])):
                return f"MISMATCH {n}"
            checked += 1
            if checked >= 8:
                break
    return f"ok ({checked} tensors)"


def run_model(name, m, args, log, rows, budget):
    layers = args.layers or m["layers"]
    if torch.cuda.is_available():
        free = torch.cuda.mem_get_info()[0]
        # embedding + lm_head, a bucket (and a bucket's worth of slack), and a stacked w13's FP8 output (larger than a
        # bucket)
        fixed = 2 * 2 * m["vocab"] * m["H"] + 2 * args.bucket_mb * 2 ** 20 + m["E"] * 2 * m["inter"] * m["H"]
        # the same-bytes copy baseline runs while the BF16 weights exist: its source and destination hold the
        # ~1.5x BF16 bytes a sync moves (run 0bfee9a: 34 Qwen3 layers fitted the old estimate, then every provider
        # ran out of memory)
        per_layer = layer_bytes(m) * (2.5 if "copy_sm" in args.providers else 1.0)
        fit = int((free * args.mem_frac - fixed) // per_layer)
        if fit < 1:
            print(f"[note] {name}: not one layer fits in {args.mem_frac:.0%} of free memory; skipped")
            return
        if fit < layers:
            print(f"[note] {name}: {layers} layers do not fit; running {fit} "
                  f"({layer_bytes(m) / 1e9:.2f} GB BF16 a layer)")
            layers = fit
    bucket_bytes = args.bucket_mb * 2 ** 20
    copy_ms = None
    for prov in args.providers:
        if budget.spent(reserve=5):
            print(f"[note] budget spent: {name}/{prov} skipped")
            break
        if prov == "copy_sm":
            continue
        if name == "dsv3" and prov in ("separate", "per_tensor", "separate_plan") and not args.dsv3_separate:
            # 768 separate tensors a layer: the same bytes as 'views' through address tables; --dsv3-separate to
            # run them
            continue
        layout = {"per_tensor": "separate"}.get(prov, prov).replace("_plan", "")
        try:
            sd = build(m, layers, layout)
            elems, moved = traffic(sd)
            if copy_ms is None and "copy_sm" in args.providers:
                copy = C.copy_of_bytes(moved, sm_kernel=True)
                copy_ms = C.bench(copy, warmup=2, rep=args.rep)[0]
                del copy
                log.add(model=name, provider="copy_sm", layers=layers, bucket_mb=args.bucket_mb, ms=copy_ms,
                        gbps_bf16=C.gbps(2 * elems, copy_ms), pct_copy=100.0, check="-")
                rows.append(dict(model=name, provider="copy_sm", layers=layers, ms=copy_ms,
                                 GBps_bf16=C.gbps(2 * elems, copy_ms), pct_copy=100.0, launches=1))
            batch = prov != "per_tensor"
            check = validate(sd, bucket_bytes, batch)
            fn, state = sync_fn(sd, bucket_bytes, batch, plan=prov.endswith("_plan"))
            ms = C.bench(fn, warmup=1, rep=args.rep)[0]
            st = state["stats"]
            pct = 100.0 * copy_ms / ms if copy_ms else float("nan")
            row = dict(model=name, provider=prov, layers=layers, ms=ms, GBps_bf16=C.gbps(2 * elems, ms),
                       pct_copy=pct, launches=st["launches"])
            rows.append(row)
            log.add(model=name, provider=prov, layers=layers, bucket_mb=args.bucket_mb, ms=ms,
                    gbps_bf16=row["GBps_bf16"], pct_copy=pct, launches=st["launches"], table_tensors=st["table_tensors"],
                    zero_copy_stacks=st["zero_copy_stacks"], buckets=st["buckets"], bf16_gb=2 * elems / 1e9,
                    moved_gb=moved / 1e9, check=check)
            print(f"{name:6s} {prov:10s} layers={layers} {ms:9.2f} ms  {row['GBps_bf16']:7.0f} GB/s bf16  "
                  f"{pct:5.1f}% of copy  launches={st['launches']}  {check}")
        except torch.cuda.OutOfMemoryError if torch.cuda.is_available() else MemoryError:
            print(f"[note] {name}/{prov}: out of memory; lower --layers or --mem-frac")
        except Exception:
            traceback.print_exc()
            print(f"[note] {name}/{prov} failed; continuing")
        finally:
            sd = None
            C.free_cuda()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all", choices=["all", *MODELS], help="which model (default: both)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {PROVIDERS}")
    p.add_argument("--layers", type=int, default=None, help="layers (default: the model's, capped by memory)")
    p.add_argument("--bucket-mb", type=int, default=1024, help="bucket size in MiB (default 1024)")
    p.add_argument("--mem-frac", type=float, default=0.55, help="fraction of free GPU memory for the BF16 weights")
    p.add_argument("--rep", type=int, default=200, help="do_bench rep (ms of timed runs per provider)")
    p.add_argument("--dsv3-separate", action="store_true", help="also run dsv3 with separate/per_tensor layouts")
    p.add_argument("--budget", type=float, default=None, help="wall-clock seconds; what is left is skipped")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: plumbing only")
    args = p.parse_args(argv)
    args.providers = [s for s in args.providers.split(",") if s]
    bad = set(args.providers) - set(PROVIDERS)
    if bad:
        p.error(f"unknown providers {sorted(bad)}; known: {PROVIDERS}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("bench_export needs a CUDA GPU (run it on the GPU machine); --cpu-smoke for a dry run")
        return 1
    models = SMOKE if args.cpu_smoke else MODELS
    if args.cpu_smoke:
        args.bucket_mb = min(args.bucket_mb, 1)
        args.dsv3_separate = True
    print(C.env_line())
    out = C.results_dir()
    log = C.CsvLog(out / "bench_export.csv")
    rows = []
    budget = C.Budget(args.budget)
    for name, m in models.items():
        if args.model in ("all", name):
            run_model(name, m, args, log, rows, budget)
    C.print_table(rows, ["model", "provider", "layers", "ms", "GBps_bf16", "pct_copy", "launches"],
                  title=f"weight sync BF16 -> block FP8, buckets of {args.bucket_mb} MiB ({C.card_name()}; "
                        f"pct_copy = same-bytes SM copy time / time; target >= 85)", prefix="SUMMARY export")
    print(f"CSV: {log.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
