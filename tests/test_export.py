"""Weight sync and checkpoint export (fp8_deep.export): names, skip rules, shapes, batching, bucket bounds, in-place
updates, tensor-parallel shards, checkpoint round trip, vLLM's loader conventions (a fixture), transformers (a real
client), bad input.

Quantized bytes are checked bit-exact against ``fp8_deep.reference`` (the contract of CONTRACTS.md section 1).
CPU runs go through the Triton interpreter with tiny shapes; ``-m gpu`` adds the transformers round trip on CUDA and
the memory bound of bucketed streaming.
"""
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fp8_deep import reference
from fp8_deep.export import (WeightSyncPlan, default_skip, fp8_expert_stacks, fp8_quantization_config,
                             is_quantized_name, load_fp8_checkpoint, quantize_state_dict, quantize_tp_shard,
                             save_fp8_checkpoint, scale_name)
from fp8_deep.numerics import FP8_DTYPE, cdiv
from fp8_deep.testing import assert_bitwise_equal, calc_diff

REPO = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()


def _bits(t):
    return t.contiguous().view(torch.uint8) if t.dtype == FP8_DTYPE else t


def _assert_quantized_like_reference(name, src, out, scale_fmt="fp32"):
    q_ref, s_ref = reference.quantize_weight_blockwise(src.float().to(src.dtype).cpu(), scale_fmt=scale_fmt)
    assert out[name].dtype == FP8_DTYPE and tuple(out[name].shape) == tuple(src.shape), name
    assert out[scale_name(name)].dtype == torch.float32, name
    assert_bitwise_equal(out[name].cpu(), q_ref, name)
    assert_bitwise_equal(out[scale_name(name)].cpu(), s_ref, scale_name(name))


def _qwen3_moe_state_dict(device, *, layers=1, E=4, H=256, inter=128, vocab=64, q=256, kv=128, stacked=False,
                          dtype=torch.bfloat16):
    """A Qwen3-MoE-shaped state dict (HF names). ``stacked``: per-expert weights are views of (E, N, K) stacks (one
    storage, as a trainer that keeps experts stacked has them)."""
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype).to(device)

    sd = {"model.embed_tokens.weight": r(vocab, H)}
    for i in range(layers):
        p = f"model.layers.{i}"
        sd.update({f"{p}.input_layernorm.weight": r(H), f"{p}.self_attn.q_proj.weight": r(q, H),
                   f"{p}.self_attn.k_proj.weight": r(kv, H), f"{p}.self_attn.v_proj.weight": r(kv, H),
                   f"{p}.self_attn.o_proj.weight": r(H, q), f"{p}.self_attn.q_norm.weight": r(128),
                   f"{p}.self_attn.k_norm.weight": r(128), f"{p}.post_attention_layernorm.weight": r(H),
                   f"{p}.mlp.gate.weight": r(E, H)})
        if stacked:
            gate, up, down = r(E, inter, H), r(E, inter, H), r(E, H, inter)
        for e in range(E):
            for proj, shape in (("gate_proj", (inter, H)), ("up_proj", (inter, H)), ("down_proj", (H, inter))):
                sd[f"{p}.mlp.experts.{e}.{proj}.weight"] = (
                    {"gate_proj": gate, "up_proj": up, "down_proj": down}[proj][e] if stacked else r(*shape))
    sd["model.norm.weight"] = r(H)
    sd["lm_head.weight"] = r(vocab, H)
    return sd


# ------------------------------------------------------------------------------------------------ names, skip rules
@pytest.mark.parametrize("name,quantized", [
    ("model.layers.0.self_attn.q_proj.weight", True),
    ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", True),  # DeepSeek-V3 MLA
    ("model.layers.3.mlp.experts.17.gate_proj.weight", True),  # per-expert (HF checkpoints)
    ("model.layers.3.mlp.experts.17.down_proj.weight", True),
    ("model.layers.3.mlp.shared_experts.up_proj.weight", True),
    ("model.layers.3.mlp.experts.w13_weight", True),  # vLLM FusedMoE stacks
    ("model.layers.3.mlp.experts.w2_weight", True),
    ("model.layers.3.mlp.experts.gate_up_proj", True),  # transformers 5 fused experts
    ("layers.0.moe.w13", True),  # fp8_deep.FP8MoE
    ("model.layers.0.block_sparse_moe.experts.2.w1.weight", True),  # Mixtral
    ("model.embed_tokens.weight", False),
    ("lm_head.weight", False),
    ("model.norm.weight", False),
    ("model.layers.0.input_layernorm.weight", False),
    ("model.layers.0.self_attn.q_norm.weight", False),
    ("model.layers.3.mlp.gate.weight", False),  # the router
    ("model.layers.3.mlp.gate.e_score_correction_bias", False),
    ("model.layers.3.mlp.shared_expert_gate.weight", False),
    ("model.layers.0.self_attn.q_proj.bias", False),
    ("model.layers.0.mlp.router.proj.weight", False),  # a router's *_proj is still a router
    ("model.layers.0.self_attn.q_proj.weight_scale_inv", False),  # already a scale
])
def test_name_rules(name, quantized):
    assert is_quantized_name(name) is quantized


def test_skip_forms():
    n = "model.layers.0.self_attn.o_proj.weight"
    assert is_quantized_name(n)
    assert not is_quantized_name(n, skip=lambda s: "o_proj" in s)
    assert is_quantized_name("lm_head_proj.weight", skip=None)  # None: only the name patterns decide
    assert default_skip("lm_head_proj.weight")
    sd = {n: torch.randn(128, 128, dtype=torch.bfloat16), "model.layers.0.self_attn.q_proj.weight":
          torch.randn(128, 128, dtype=torch.bfloat16)}
    out = dict(quantize_state_dict(sd, skip=r"o_proj"))  # regular expressions add to default_skip
    assert out[n] is not None and out[n].dtype == torch.bfloat16 and scale_name(n) not in out
    assert out["model.layers.0.self_attn.q_proj.weight"].dtype == FP8_DTYPE
    with pytest.raises(TypeError, match="skip"):
        quantize_state_dict(sd, skip=[3])


def test_quantization_config():
    cfg = fp8_quantization_config()
    assert cfg == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    assert fp8_quantization_config(scale_fmt="ue8m0")["scale_fmt"] == "ue8m0"
    with pytest.raises(ValueError, match="scale_fmt"):
        fp8_quantization_config(scale_fmt="e8m0")


# ------------------------------------------------------------------------------------------------ quantize_state_dict
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_state_dict_bytes_names_passthrough(device, scale_fmt):
    sd = _qwen3_moe_state_dict(device)
    stream = quantize_state_dict(sd.items(), scale_fmt=scale_fmt)  # an iterator, as named_parameters() is
    pairs = list(stream)
    out = dict(pairs)
    assert len(out) == len(pairs)
    quantized = [n for n in sd if is_quantized_name(n)]
    assert len(quantized) == 4 + 12
    for n, t in sd.items():
        if n in quantized:
            _assert_quantized_like_reference(n, t, out, scale_fmt)
            assert out[n].is_contiguous() and out[scale_name(n)].is_contiguous()
        else:
            assert out[n] is t or out[n].data_ptr() == t.data_ptr()  # untouched, no copy
            assert scale_name(n) not in out
    # order: input order, each scale right after its weight
    names = [n for n, _ in pairs]
    assert names[:3] == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                         "model.layers.0.self_attn.q_proj.weight"]
    assert names[3] == "model.layers.0.self_attn.q_proj.weight_scale_inv"
    cfg = stream.quantization_config
    assert cfg["modules_to_not_convert"] == ["model.embed_tokens", "model.layers.0.mlp.gate", "lm_head"]
    assert cfg.get("scale_fmt") == ("ue8m0" if scale_fmt == "ue8m0" else None)
    assert stream.stats["quantized"] == 16 and stream.stats["passed"] == len(sd) - 16


def test_ragged_shapes_and_3d_stacks(device):
    """Shapes not divisible by 128 (the quantizer's ragged-edge contract) and (E, N, K) stacks."""
    g = torch.Generator().manual_seed(2)
    sd = {"a.q_proj.weight": torch.randn(200, 136, generator=g).to(device, torch.bfloat16),
          "b.q_proj.weight": torch.randn(200, 136, generator=g).to(device, torch.bfloat16),
          "m.experts.w2_weight": torch.randn(3, 136, 72, generator=g).to(device, torch.float16),
          "m.w13": torch.randn(3, 256, 136, generator=g).to(device)}  # FP8MoE's master weight, float32
    out = dict(quantize_state_dict(sd))
    for n, t in sd.items():
        _assert_quantized_like_reference(n, t, out)
    assert out["m.experts.w2_weight_scale_inv"].shape == (3, 2, 1)
    assert out["m.w13_scale_inv"].shape == (3, 2, 2)


def test_w13_halves_quantized_apart(device):
    """A stacked w13 (E, 2I, H) with I % 128 != 0: gate and up quantized separately (vLLM's 2 * ceil(I/128) scale
    rows), so no block mixes them."""
    w = torch.randn(2, 2 * 80, 256, dtype=torch.bfloat16).to(device)
    out = dict(quantize_state_dict({"mlp.experts.w13_weight": w}))
    q, s = out["mlp.experts.w13_weight"], out["mlp.experts.w13_weight_scale_inv"]
    assert s.shape == (2, 2, 2)
    for half in range(2):
        q_ref, s_ref = reference.quantize_weight_blockwise(w[:, half * 80:(half + 1) * 80].cpu())
        assert_bitwise_equal(q[:, half * 80:(half + 1) * 80].cpu(), q_ref)
        assert_bitwise_equal(s[:, half:half + 1].cpu(), s_ref)


def test_batching_zero_copy_table_and_per_tensor_agree(device):
    """Same bytes whether same-shape tensors are stacked without a copy (views of one storage), read through an
    address table (separate tensors) or quantized one by one; the launch counts show which ran."""
    views = _qwen3_moe_state_dict(device, stacked=True)
    separate = {n: t.clone() for n, t in views.items()}
    s_views, s_sep, s_one = (quantize_state_dict(views), quantize_state_dict(separate),
                             quantize_state_dict(separate, batch=False))
    outs = [dict(s) for s in (s_views, s_sep, s_one)]
    for n in views:
        for o in outs[1:]:
            assert torch.equal(_bits(outs[0][n]), _bits(o[n])), n
    # groups by shape: (256, 256) q/o_proj; (128, 256) k/v_proj + gate/up of 4 experts; (256, 128) down_proj.
    # With views, down_proj's 4 are one storage (no copy); the gate/up views alternate between two storages (no
    # run) and join k/v_proj, q/o_proj are separate: address tables, one launch per group
    assert s_views.stats["zero_copy_stacks"] == 1 and s_views.stats["table_tensors"] == 2 + 10
    assert s_views.stats["launches"] == 3 and s_views.stats["table_launches"] == 2
    assert s_sep.stats["zero_copy_stacks"] == 0 and s_sep.stats["table_tensors"] == 16
    assert s_sep.stats["launches"] == 3 == s_sep.stats["table_launches"]
    assert s_one.stats["launches"] == 16 and s_one.stats["table_launches"] == 0
    # staging_bytes=0: one launch each, same bytes
    s_small = quantize_state_dict(separate, staging_bytes=0)
    assert all(torch.equal(_bits(v), _bits(outs[1][k])) for k, v in s_small)
    assert s_small.stats["table_tensors"] == 0 and s_small.stats["launches"] == 16


def test_stacks_cut_by_buckets_stay_copy_free(device):
    """Per-expert views of each layer's stacked w13 / w2 (FP8MoE's layout under HF names) with buckets that end
    inside a layer: a bucket's same-shape group then spans two layers' storages, and each layer's run is still
    quantized without a copy, with the bytes of one launch per tensor."""
    E, H, inter, layers = 16, 256, 128, 3
    g = torch.Generator().manual_seed(5)
    sd = {}
    for i in range(layers):
        w13 = torch.randn(E, 2 * inter, H, generator=g).to(torch.bfloat16).to(device)
        w2 = torch.randn(E, H, inter, generator=g).to(torch.bfloat16).to(device)
        for e in range(E):
            sd[f"model.layers.{i}.mlp.experts.{e}.gate_proj.weight"] = w13[e, :inter]
            sd[f"model.layers.{i}.mlp.experts.{e}.up_proj.weight"] = w13[e, inter:]
            sd[f"model.layers.{i}.mlp.experts.{e}.down_proj.weight"] = w2[e]
    layer_bytes = E * 3 * (inter * H + 4)
    stream = quantize_state_dict(sd, bucket_bytes=int(1.5 * layer_bytes) + 4096)
    got = {}
    for b in stream:
        got.update({n: t.clone() for n, t in b})
    # a bucket edge may leave a piece shorter than _MIN_RUN on each side, in each of the two shape groups: those
    # go through an address table
    from fp8_deep import export
    assert stream.stats["buckets"] >= 2, stream.stats
    assert stream.stats["table_tensors"] <= (stream.stats["buckets"] - 1) * 2 * 2 * (export._MIN_RUN - 1), stream.stats
    assert stream.stats["zero_copy_stacks"] >= 2 * layers
    ref = dict(quantize_state_dict(sd, batch=False))
    for n in ref:
        assert torch.equal(_bits(got[n]), _bits(ref[n])), n


def test_separate_tensors_before_a_run_keep_their_slots(device):
    """A group whose separate tensors come before a run of views of one storage (a bucket edge leaves the end of one
    layer's stack, then a whole next layer): every tensor gets its own bytes, not its neighbour's."""
    g = torch.Generator().manual_seed(7)
    stack = torch.randn(6, 128, 256, generator=g).to(torch.bfloat16).to(device)
    sd = {f"a{i}.q_proj.weight": torch.randn(128, 256, generator=g).to(torch.bfloat16).to(device) for i in range(2)}
    sd.update({f"b{e}.q_proj.weight": stack[e] for e in range(6)})
    stream = quantize_state_dict(sd)
    got = {n: t.clone() for n, t in stream}
    assert stream.stats["zero_copy_stacks"] == 1 and stream.stats["table_tensors"] == 2
    ref = dict(quantize_state_dict(sd, batch=False))
    for n in ref:
        assert torch.equal(_bits(got[n]), _bits(ref[n])), n
    plan = WeightSyncPlan(sd)
    for n, t in plan.run():
        assert torch.equal(_bits(t), _bits(ref[n])), n


def test_short_runs_tabled_and_aliasing_storages():
    """Runs of views shorter than _MIN_RUN join the separate tensors (one launch, not one per run), and two storages
    that start at one address but differ in size are never mistaken for one (no out-of-bounds stack view)."""
    import numpy as np

    from fp8_deep import export
    flat = [torch.randn(2, 128, 128).to(torch.bfloat16) for _ in range(6)]  # 6 buffers of 2 same-shape weights
    sd = {f"l.{i}.{n}_proj.weight": flat[i][j] for i in range(6) for j, n in enumerate(("q", "o"))}
    st = quantize_state_dict(sd)
    got = dict(st)
    assert st.stats["launches"] == 1 and st.stats["table_tensors"] == 12 and st.stats["zero_copy_stacks"] == 0
    assert export._MIN_RUN > 2
    arr = np.random.default_rng(0).standard_normal((4, 128, 128)).astype(np.float32)
    small, big = torch.from_numpy(arr[:1]), torch.from_numpy(arr)  # same start address, different sizes
    assert small.untyped_storage().data_ptr() == big.untyped_storage().data_ptr()
    sd2 = {"a.q_proj.weight": small[0], **{f"b{i}.q_proj.weight": big[i] for i in range(1, 4)}}
    got2 = dict(quantize_state_dict(sd2))
    for src in (sd, sd2):
        ref = dict(quantize_state_dict(src, batch=False))
        for n in ref:
            assert torch.equal(_bits((got if src is sd else got2)[n]), _bits(ref[n])), n


def test_buckets_bounded_and_reused(device):
    sd = _qwen3_moe_state_dict(device, layers=2)
    bucket = 200_000
    stream = quantize_state_dict(sd, bucket_bytes=bucket)
    seen, ptrs, flat = [], set(), {}
    big = 0
    for b in stream:
        assert isinstance(b, list) and b
        assert torch.is_grad_enabled()  # no_grad stays inside the quantization, never leaks into the consumer
        payload = sum(t.numel() * t.element_size() for _, t in b)
        fp8_storages = {t.untyped_storage().data_ptr() for n, t in b if n in sd and t.dtype == FP8_DTYPE}
        if payload > bucket:  # only a tensor larger than a bucket comes alone
            assert len([n for n, _ in b if n in sd]) == 1
            big += 1
        for n, t in b:
            if n in sd and t.dtype == FP8_DTYPE:
                assert t.untyped_storage().nbytes() <= bucket
        ptrs |= fp8_storages
        seen += [n for n, _ in b]
        flat.update({n: t.clone() for n, t in b})  # consume the bucket before the next one reuses the buffer
    assert big == 0
    assert len(ptrs) == 1  # one bucket buffer, reused
    assert stream.stats["bucket_alloc_bytes"] == bucket and stream.stats["buckets"] > 2
    assert stream.stats["max_bucket_payload"] <= bucket
    assert len(seen) == len(set(seen)) == len(sd) + 2 * 16
    for n, t in sd.items():
        if is_quantized_name(n):
            _assert_quantized_like_reference(n, t, flat)
    # without reuse every bucket has its own storage; a tensor larger than a bucket comes alone
    sd2 = {"x.q_proj.weight": torch.randn(256, 256, dtype=torch.bfloat16).to(device),
           "y.q_proj.weight": torch.randn(128, 128, dtype=torch.bfloat16).to(device)}
    bs = list(quantize_state_dict(sd2, bucket_bytes=20_000, reuse_buffers=False))
    assert [len(b) for b in bs] == [2, 2]
    assert bs[0][0][1].untyped_storage().data_ptr() != bs[1][0][1].untyped_storage().data_ptr()


def test_out_in_place(device):
    """out=: an engine's FP8 parameters and scales (here: strided views of stacked buffers, as vLLM's w13/w2 are)
    are written in place; nothing is yielded for them; pass-through tensors in out are copied."""
    sd = _qwen3_moe_state_dict(device, E=3)
    E = 3
    eng_q = torch.empty(E, 128, 256, dtype=FP8_DTYPE, device=device)  # per-expert gate_proj targets
    eng_s = torch.full((E, 1, 2), float("nan"), device=device)
    out = {}
    for e in range(E):
        n = f"model.layers.0.mlp.experts.{e}.gate_proj.weight"
        out[n], out[scale_name(n)] = eng_q[e], eng_s[e]
    o_n = "model.layers.0.self_attn.o_proj.weight"
    out[o_n] = torch.empty(256, 256, dtype=FP8_DTYPE, device=device).t()  # any strides
    out[scale_name(o_n)] = torch.empty(2, 2, device=device)
    out["model.norm.weight"] = torch.zeros(256, dtype=torch.bfloat16, device=device)
    stream = quantize_state_dict(sd, out=out)
    rest = dict(stream)
    assert not set(out) & set(rest)
    assert stream.stats["in_place"] == E + 2
    assert torch.equal(out["model.norm.weight"], sd["model.norm.weight"])
    for e in range(E):
        n = f"model.layers.0.mlp.experts.{e}.gate_proj.weight"
        _assert_quantized_like_reference(n, sd[n], out)
    with pytest.raises(ValueError, match="together with its scale"):
        list(quantize_state_dict(sd, out={o_n: out[o_n]}))
    with pytest.raises(ValueError, match=r"out\['model.layers.0.self_attn.o_proj.weight_scale_inv'\]"):
        list(quantize_state_dict(sd, out={o_n: out[o_n], scale_name(o_n): torch.empty(3, 2, device=device)}))


def test_out_in_place_separate_engine_buffers(device):
    """Engine parameters allocated one by one (no common stack) and separate sources: one address-table launch
    writes them all; an engine buffer that overlaps a source is refused, naming it."""
    E = 4
    sd = _qwen3_moe_state_dict(device, E=E)
    names = [f"model.layers.0.mlp.experts.{e}.up_proj.weight" for e in range(E)]
    out = {}
    for n in names:
        out[n] = torch.empty(128, 256, dtype=FP8_DTYPE, device=device)
        out[scale_name(n)] = torch.full((1, 2), float("nan"), device=device)
    stream = quantize_state_dict(sd, out=out)
    rest = dict(stream)
    assert not set(out) & set(rest)
    assert stream.stats["table_launches"] >= 1 and stream.stats["table_tensors"] >= E
    for n in names:
        _assert_quantized_like_reference(n, sd[n], out)
    bad = dict(out)
    bad[names[1]] = sd[names[2]].view(torch.uint8).view(-1)[: 128 * 256].view(128, 256).view(FP8_DTYPE)
    with pytest.raises(ValueError, match="share memory"):
        list(quantize_state_dict(sd, out=bad))


def _consume(stream, bucketed):
    """Names and cloned tensors of a sync, in order; with buckets also the names of each bucket."""
    names, got, buckets = [], {}, []
    for b in stream:
        pairs = b if bucketed else [b]
        if bucketed:
            buckets.append([n for n, _ in b])
        for n, t in pairs:
            names.append(n)
            got[n] = t.clone()
    return names, got, buckets


@pytest.mark.parametrize("bucket_bytes", [None, 150_000])
def test_weight_sync_plan_replays_fresh_sync(device, bucket_bytes):
    """A WeightSyncPlan built once gives, after an in-place optimizer step, the names, buckets and bytes of a fresh
    quantize_state_dict of the updated weights, with one recorded op per launch (no per-tensor work)."""
    sd = _qwen3_moe_state_dict(device, layers=2, E=4)
    sd["model.layers.1.mlp.experts.w13_weight"] = torch.randn(3, 2 * 192, 256).to(torch.bfloat16).to(device)  # split
    plan = WeightSyncPlan(sd, bucket_bytes=bucket_bytes)
    ref = quantize_state_dict(sd)
    list(ref)
    assert plan.quantization_config == ref.quantization_config
    for step in range(2):
        with torch.no_grad():
            for t in sd.values():
                t.mul_(-1.5).add_(0.01)  # an optimizer step: in place
        fresh = _consume(quantize_state_dict(sd, bucket_bytes=bucket_bytes), bucket_bytes is not None)
        replay = _consume(plan.run(), bucket_bytes is not None)
        assert replay[0] == fresh[0] and replay[2] == fresh[2]
        for n, t in fresh[1].items():
            assert t.dtype == replay[1][n].dtype and torch.equal(_bits(replay[1][n]), _bits(t)), n
    assert plan.stats["runs"] == 2 and plan.stats["recorded_ops"] == plan.stats["launches"]
    assert plan.stats["launches"] < plan.stats["quantized"]  # groups, not tensors


def test_weight_sync_plan_in_place_and_moved_tensor(device):
    """out= engine buffers rewritten by every run (pass-through copies included); a reallocated parameter is caught."""
    E = 4
    sd = _qwen3_moe_state_dict(device, E=E)
    names = [f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in range(E)]
    out = {"model.norm.weight": torch.zeros(256, dtype=torch.bfloat16, device=device)}
    for n in names:
        out[n] = torch.empty(256, 128, dtype=FP8_DTYPE, device=device)
        out[scale_name(n)] = torch.empty(2, 1, device=device)
    plan = WeightSyncPlan(sd, out=out)
    with torch.no_grad():
        for n in names + ["model.norm.weight"]:
            sd[n].mul_(3.0)
    rest = dict(plan.run())
    assert not set(out) & set(rest)
    for n in names:
        _assert_quantized_like_reference(n, sd[n], out)
    # a plan that only writes in place does its work in run() itself (nothing to iterate)
    inplace = {n: t for n, t in sd.items() if n in names}
    only = WeightSyncPlan(inplace, out={k: v for k, v in out.items() if k.startswith("model.layers")})
    with torch.no_grad():
        for n in names:
            sd[n].mul_(-2.0)
    assert list(only.run()) == []
    for n in names:
        _assert_quantized_like_reference(n, sd[n], out)
    assert torch.equal(out["model.norm.weight"], sd["model.norm.weight"])
    sd[names[2]].data = sd[names[2]].clone()  # reallocated behind the plan's back
    with pytest.raises(RuntimeError, match=r"experts.2.down_proj.weight has moved"):
        plan.run()


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("tensor,exc,match", [
    (torch.zeros(128, 128, dtype=torch.int8), TypeError, r"q_proj.weight: dtype torch.int8 cannot be quantized"),
    (torch.zeros(128, 128, dtype=torch.float64), TypeError, r"dtype torch.float64"),
    (torch.zeros(128, 128, dtype=FP8_DTYPE), TypeError, r"q_proj.weight: already FP8"),
    (torch.zeros(128), ValueError, r"q_proj.weight: named as a linear/expert weight but has shape \(128,\)"),
    (torch.zeros(2, 2, 128, 128), ValueError, r"shape \(2, 2, 128, 128\)"),
])
def test_bad_tensors_named_for_quantization(tensor, exc, match):
    with pytest.raises(exc, match=match):
        list(quantize_state_dict({"model.layers.0.self_attn.q_proj.weight": tensor}))


def test_bad_arguments():
    t = torch.zeros(128, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="appears twice"):
        list(quantize_state_dict([("a.q_proj.weight", t), ("a.q_proj.weight", t)]))
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        list(quantize_state_dict({"a.q_proj.weight": [1.0]}))
    with pytest.raises(TypeError, match=r"\(name, tensor\) pairs"):
        list(quantize_state_dict([t]))
    with pytest.raises(TypeError, match="state dict"):
        quantize_state_dict(t)
    with pytest.raises(ValueError, match="bucket_bytes"):
        quantize_state_dict({}, bucket_bytes=0)
    with pytest.raises(ValueError, match="scale_fmt"):
        quantize_state_dict({}, scale_fmt="fp8")
    with pytest.raises(TypeError, match="out must be a mapping"):
        quantize_state_dict({}, out=[t])
    s = quantize_state_dict({"a.q_proj.weight": t})
    list(s)
    with pytest.raises(RuntimeError, match="iterated once"):
        list(s)


# ------------------------------------------------------------------------------------------------ tensor parallel
@pytest.mark.parametrize("parallel,world", [("column", 2), ("row", 3)])
def test_tp_shard_equals_full_slice(device, parallel, world):
    # the last shard ends on the full tensor's ragged edge (N = 2 * 128 + 72 / K = 3 * 128 with world=3: even)
    full = torch.randn(2 * 128 + 72 if parallel == "column" else 256, 3 * 128 if parallel == "row" else 136,
                       dtype=torch.bfloat16).to(device)
    q_full, s_full = reference.quantize_weight_blockwise(full.cpu())
    dim = 0 if parallel == "column" else 1
    total = full.shape[dim]
    size = 128 if parallel == "column" else 128
    starts = list(range(0, total, size))
    for rank, start in enumerate(starts):
        end = min(start + size, total)
        shard = full.narrow(dim, start, end - start)
        q, s = quantize_tp_shard("layers.0.o_proj.weight", shard, parallel=parallel, rank=rank,
                                 world_size=len(starts), full_size=total, offset=start)
        assert_bitwise_equal(q.cpu(), q_full.narrow(dim, start, end - start))
        assert_bitwise_equal(s.cpu(), s_full.narrow(dim, start // 128, cdiv(end, 128) - start // 128))


def test_tp_shard_not_on_block_edges_names_the_tensor():
    w = torch.randn(192, 256, dtype=torch.bfloat16)  # N = 384 split in 2: shard edge at 192
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight: column-parallel shard \[192, 384\)"):
        quantize_tp_shard("model.layers.0.mlp.gate_proj.weight", w, parallel="column", rank=1, world_size=2)
    with pytest.raises(ValueError, match="parallel must be"):
        quantize_tp_shard("x.weight", w, parallel="col", rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank 2"):
        quantize_tp_shard("x.weight", w, parallel="row", rank=2, world_size=2)


# ------------------------------------------------------------------------------------------------ checkpoint I/O
def test_checkpoint_round_trip(tmp_path, device):
    pytest.importorskip("safetensors", reason="safetensors not installed (pip install safetensors)")
    sd = _qwen3_moe_state_dict(device, layers=2)
    expected = {n: t.cpu().clone() for n, t in quantize_state_dict(sd)}
    config = {"model_type": "qwen3_moe", "hidden_size": 256, "torch_dtype": "bfloat16"}
    index = save_fp8_checkpoint(tmp_path, sd, config, max_shard_bytes=150_000, bucket_bytes=100_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not list(tmp_path.glob(".shard-*"))
    on_disk = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert on_disk == json.loads(json.dumps(index)) and set(on_disk["weight_map"].values()) == set(shards)
    assert on_disk["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["quantization_config"]["quant_method"] == "fp8"
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    tensors, cfg2 = load_fp8_checkpoint(tmp_path)
    assert cfg2 == cfg and sorted(tensors) == sorted(expected)
    for n, t in expected.items():
        assert tensors[n].dtype == t.dtype and torch.equal(_bits(tensors[n]), _bits(t)), n
    # already-quantized pairs written as given; a second export into the same folder replaces the shards
    save_fp8_checkpoint(tmp_path, expected, config, quantize=False, quantization_config=cfg["quantization_config"])
    assert sorted(p.name for p in tmp_path.glob("model-*.safetensors")) == ["model-00001-of-00001.safetensors"]
    tensors3, cfg3 = load_fp8_checkpoint(tmp_path)
    assert cfg3 == cfg and all(torch.equal(_bits(tensors3[n]), _bits(t)) for n, t in expected.items())


def test_checkpoint_feeds_fp8moe(tmp_path, device):
    """load_fp8_checkpoint -> fp8_expert_stacks -> FP8MoE.load_fp8_: the layer computes what the FP8 layer built
    from the same BF16 experts computes."""
    pytest.importorskip("safetensors", reason="safetensors not installed (pip install safetensors)")
    from fp8_deep import FP8MoE
    sd = _qwen3_moe_state_dict(device, E=4, H=256, inter=128)
    save_fp8_checkpoint(tmp_path, sd, {})
    tensors, _ = load_fp8_checkpoint(tmp_path, device=device)
    w13, w13_s, w2, w2_s = fp8_expert_stacks(tensors, "model.layers.0.mlp")
    assert w13.shape == (4, 256, 256) and w13_s.shape == (4, 2, 2) and w2.shape == (4, 256, 128)
    p = "model.layers.0.mlp"
    ref = FP8MoE(4, 256, 128, 2, device=device, backend="triton")
    with torch.no_grad():
        ref.w13.copy_(torch.stack([torch.cat([sd[f"{p}.experts.{e}.gate_proj.weight"],
                                              sd[f"{p}.experts.{e}.up_proj.weight"]]) for e in range(4)]))
        ref.w2.copy_(torch.stack([sd[f"{p}.experts.{e}.down_proj.weight"] for e in range(4)]))
        ref.gate.weight.copy_(sd[f"{p}.gate.weight"].float())
    m = FP8MoE(4, 256, 128, 2, device=device, backend="triton")
    with torch.no_grad():
        m.gate.weight.copy_(ref.gate.weight)
    m.load_fp8_(w13, w13_s, w2, w2_s)
    x = torch.randn(5, 256, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        assert torch.equal(m(x), ref(x))


# ------------------------------------------------------------------------------------------------ vLLM (a fixture)
def _vllm_qwen3_moe_params(layers, E, H, inter, q, kv, vocab):
    """Parameters vLLM's Qwen3MoeForCausalLM creates for a block-FP8 checkpoint (Fp8LinearMethod /
    Fp8MoEMethod with weight_block_size [128, 128], tp=1; vLLM 0.19 sources): name -> (shape, dtype)."""
    f8, f32, bf = FP8_DTYPE, torch.float32, torch.bfloat16
    P = {"model.embed_tokens.weight": ((vocab, H), bf), "model.norm.weight": ((H,), bf),
         "lm_head.weight": ((vocab, H), bf)}
    for i in range(layers):
        p = f"model.layers.{i}"
        P.update({
            f"{p}.self_attn.qkv_proj.weight": ((q + 2 * kv, H), f8),
            # one block row range per shard: vLLM requires every shard's size to divide by block_n
            f"{p}.self_attn.qkv_proj.weight_scale_inv": ((cdiv(q, 128) + 2 * cdiv(kv, 128), cdiv(H, 128)), f32),
            f"{p}.self_attn.o_proj.weight": ((H, q), f8),
            f"{p}.self_attn.o_proj.weight_scale_inv": ((cdiv(H, 128), cdiv(q, 128)), f32),
            f"{p}.self_attn.q_norm.weight": ((128,), bf), f"{p}.self_attn.k_norm.weight": ((128,), bf),
            f"{p}.input_layernorm.weight": ((H,), bf), f"{p}.post_attention_layernorm.weight": ((H,), bf),
            f"{p}.mlp.gate.weight": ((E, H), bf),  # ReplicatedLinear(quant_config=None)
            f"{p}.mlp.experts.w13_weight": ((E, 2 * inter, H), f8),
            f"{p}.mlp.experts.w13_weight_scale_inv": ((E, 2 * cdiv(inter, 128), cdiv(H, 128)), f32),
            f"{p}.mlp.experts.w2_weight": ((E, H, inter), f8),
            f"{p}.mlp.experts.w2_weight_scale_inv": ((E, cdiv(H, 128), cdiv(inter, 128)), f32),
        })
    return P


def _vllm_load(params, ckpt, q, kv, inter):
    """vLLM's Qwen3MoeModel.load_weights name rules (stacked_params_mapping, FusedMoE.make_expert_params_mapping)
    and weight loaders (block-FP8 scales sharded in units of 128-row blocks), on tensors: every checkpoint tensor
    must land on a parameter slice of exactly its shape and dtype."""
    stacked = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v")]
    qkv_rows = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}
    for name, t in ckpt.items():
        is_scale = name.endswith("weight_scale_inv")
        m = re.search(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.", name)
        if m:
            e, proj = int(m.group(1)), m.group(2)
            pname = name.replace(m.group(0), "mlp.experts.w13_" if proj != "down_proj" else "mlp.experts.w2_")
            dst = params[pname][e]
            if proj != "down_proj":
                rows = cdiv(inter, 128) if is_scale else inter
                dst = dst.narrow(0, 0 if proj == "gate_proj" else rows, rows)
        else:
            for pn, wn, shard in stacked:
                if wn in name:
                    pname = name.replace(wn, pn)
                    off, size = qkv_rows[shard]
                    dst = params[pname]
                    dst = dst.narrow(0, off // 128, cdiv(size, 128)) if is_scale else dst.narrow(0, off, size)
                    break
            else:
                pname = name
                if pname not in params:
                    raise KeyError(f"vLLM has no parameter for checkpoint tensor {name}")
                dst = params[pname]
        assert tuple(dst.shape) == tuple(t.shape), f"{name} -> {pname}: {tuple(t.shape)} into {tuple(dst.shape)}"
        assert dst.dtype == t.dtype, f"{name} -> {pname}: {t.dtype} into {dst.dtype}"
        dst.copy_(t)


def test_vllm_loader_conventions_fixture():
    """Names and scale shapes as vLLM's loader expects them: every parameter fully written, nothing left over, and
    the FP8 experts it assembles dequantize to the BF16 ones."""
    L, E, H, inter, q, kv, vocab = 1, 4, 256, 128, 256, 128, 64
    sd = _qwen3_moe_state_dict("cpu", layers=L, E=E, H=H, inter=inter, q=q, kv=kv, vocab=vocab)
    ckpt = dict(quantize_state_dict(sd))
    shapes = _vllm_qwen3_moe_params(L, E, H, inter, q, kv, vocab)
    params = {}
    for n, (shape, dt) in shapes.items():  # poisoned: NaN everywhere (0x7F is an E4M3 NaN)
        params[n] = (torch.full(shape, 0x7F, dtype=torch.uint8).view(FP8_DTYPE) if dt == FP8_DTYPE
                     else torch.full(shape, float("nan"), dtype=dt))
    _vllm_load(params, ckpt, q, kv, inter)
    for n, t in params.items():
        assert not torch.isnan(t.float()).any(), f"vLLM parameter {n} not fully written"
    p = "model.layers.0.mlp.experts"
    w13 = reference.dequantize_blockwise(params[f"{p}.w13_weight"], params[f"{p}.w13_weight_scale_inv"])
    gate0 = sd["model.layers.0.mlp.experts.0.gate_proj.weight"].float()
    up3 = sd["model.layers.0.mlp.experts.3.up_proj.weight"].float()
    assert calc_diff(w13[0, :inter], gate0) < 1e-3 and calc_diff(w13[3, inter:], up3) < 1e-3
    # the stacked form (vLLM's own names) gives the same parameters
    stacked = {n: t for n, t in sd.items() if "experts." not in n}
    stacked[f"{p}.w13_weight"] = torch.stack([torch.cat([sd[f"{p}.{e}.gate_proj.weight"],
                                                         sd[f"{p}.{e}.up_proj.weight"]]) for e in range(E)])
    stacked[f"{p}.w2_weight"] = torch.stack([sd[f"{p}.{e}.down_proj.weight"] for e in range(E)])
    out2 = dict(quantize_state_dict(stacked))
    for n in (f"{p}.w13_weight", f"{p}.w13_weight_scale_inv", f"{p}.w2_weight", f"{p}.w2_weight_scale_inv"):
        assert torch.equal(_bits(out2[n]), _bits(params[n])), n


# ------------------------------------------------------------------------------------------------ transformers
def _tiny_qwen3_moe_config(transformers):
    return transformers.Qwen3MoeConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=128, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=256, tie_word_embeddings=False, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], torch_dtype="bfloat16")


def _import_transformers():
    """transformers (+ accelerate, which its FP8 loader requires); from the wheels in .whl/ (tools/fetch_wheels.sh)
    when not installed and the folder is there (the GPU machine has no network)."""
    try:
        return importlib.import_module("transformers")
    except ImportError:
        pass
    whl = REPO / ".whl"
    if not whl.is_dir():
        pytest.skip("transformers not installed and no .whl/ folder (bash tools/fetch_wheels.sh, then carry .whl)")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(whl),
                        "transformers==4.57.6", "accelerate", "safetensors"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"transformers could not be installed from .whl/: {r.stderr.strip()[-500:]}")
    importlib.invalidate_caches()
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:
        pytest.skip(f"transformers installed from .whl/ but does not import: {exc}")


_PINNED_ENV = "FP8_DEEP_TEST_PINNED_TRANSFORMERS"
# the wheels tools/fetch_wheels.sh fetches that a newer transformers' environment holds in other versions
_PINNED_WHEELS = ("transformers==4.57.6", "accelerate", "huggingface-hub<1.0", "tokenizers<=0.23.0", "safetensors",
                  "hf-xet")
# and those it needs only when this environment lacks them (distribution: module)
_DEP_WHEELS = {"tqdm": "tqdm", "regex": "regex", "pyyaml": "yaml", "requests": "requests", "filelock": "filelock",
               "packaging": "packaging", "fsspec": "fsspec", "psutil": "psutil", "urllib3": "urllib3", "idna": "idna",
               "certifi": "certifi", "charset-normalizer": "charset_normalizer",
               "typing-extensions": "typing_extensions"}


def _run_with_pinned_transformers(tmp_path, test_name: str):
    """Run ``test_name`` of this file in a child pytest whose path starts with transformers 4.57 (and the packages
    whose versions it pins) installed from .whl/ into a private folder, without deps: the rest comes from this
    environment (a newer transformers' dependencies cover the 4.57 line's)."""
    whl = REPO / ".whl"
    if not whl.is_dir():
        pytest.skip("transformers >= 5 installed and no .whl/ folder with the 4.57 line (bash tools/fetch_wheels.sh, "
                    "then carry .whl)")
    target = tmp_path / "pinned_site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(whl),
                        "--no-deps", "--target", str(target), *_PINNED_WHEELS,
                        *[d for d, m in _DEP_WHEELS.items() if importlib.util.find_spec(m) is None]],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"the pinned transformers could not be installed from .whl/: {r.stderr.strip()[-500:]}")
    path = [str(target), str(REPO)] + [e for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), **{_PINNED_ENV: "1"})
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-m", "gpu",
                        f"{__file__}::{test_name}"], capture_output=True, text=True, env=env, cwd=str(REPO))
    out = (r.stdout + r.stderr).strip()
    print(out[-3000:])
    assert r.returncode == 0 and " passed" in out, f"the pinned child run failed:\n{out[-3000:]}"


def test_transformers_reads_checkpoint_cpu(tmp_path):
    """transformers' own FP8 integration on the CPU: 4.x turns the model's linears into FP8Linear (which only runs on
    a GPU) and the checkpoint must load into it strictly (names, shapes, dtypes, modules_to_not_convert); 5.x
    dequantizes a pre-quantized checkpoint on the CPU, and its logits must match the BF16 model's."""
    try:
        transformers = importlib.import_module("transformers")
        importlib.import_module("accelerate")
        importlib.import_module("safetensors")
    except ImportError as exc:
        pytest.skip(f"{exc.name} not installed (pip install 'fp8_deep[transformers]')")
    cfg = _tiny_qwen3_moe_config(transformers)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
    save_fp8_checkpoint(tmp_path, model.state_dict(), cfg)
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        from transformers.integrations.finegrained_fp8 import FP8Linear, replace_with_fp8_linear
        from transformers.utils.quantization_config import FineGrainedFP8Config
        qcfg = FineGrainedFP8Config.from_dict(json.loads((tmp_path / "config.json").read_text())["quantization_config"])
        fp8_model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
        fp8_model = replace_with_fp8_linear(fp8_model, modules_to_not_convert=["lm_head"], quantization_config=qcfg)
        tensors, _ = load_fp8_checkpoint(tmp_path)
        missing, unexpected = fp8_model.load_state_dict(tensors, strict=False, assign=True)
        assert not unexpected, unexpected
        assert not [k for k in missing if "rotary" not in k], missing
        fp8_linears = [n for n, m in fp8_model.named_modules() if isinstance(m, FP8Linear)]
        assert len(fp8_linears) == 2 * (4 + 8 * 3)  # attention + every expert; the router gate stays nn.Linear
        assert not any(n.endswith("mlp.gate") for n in fp8_linears)
        assert fp8_model.model.layers[0].mlp.experts[0].gate_proj.weight.dtype == FP8_DTYPE
        return
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        ref, got = model(ids).logits.float(), loaded(ids).logits.float()
    assert calc_diff(got, ref) < 5e-3


@pytest.mark.gpu
def test_transformers_fp8_round_trip_gpu(tmp_path):
    """A random Qwen3-MoE saved by save_fp8_checkpoint, loaded by transformers' fine-grained FP8 support (FP8Linear,
    its Triton block-FP8 GEMM on the GPU): the weights it holds are our bytes, and its logits are as close to the
    BF16 model's as an FP8-emulated model (weights dequantized) plus 1x128 activation quantization allows."""
    transformers = _import_transformers()
    if int(transformers.__version__.split(".")[0]) >= 5:
        # 5.x takes its FP8 GEMM from the hub (kernels package) or DeepGEMM: run this test again in a child process
        # with the 4.57 line (in-tree Triton kernel) from .whl/ installed into a private folder ahead on its path
        if os.environ.get(_PINNED_ENV):
            pytest.skip(f"transformers {transformers.__version__} still first on the path of the pinned child")
        _run_with_pinned_transformers(tmp_path, "test_transformers_fp8_round_trip_gpu")
        return
    cfg = _tiny_qwen3_moe_config(transformers)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).cuda().eval()
    sd = model.state_dict()
    save_fp8_checkpoint(tmp_path, sd, cfg)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.bfloat16,
                                                               device_map="cuda").eval()
    from transformers.integrations.finegrained_fp8 import FP8Linear
    n_fp8 = sum(isinstance(m, FP8Linear) for m in loaded.modules())
    assert n_fp8 == 2 * (4 + 8 * 3)
    ours = dict(quantize_state_dict(sd))
    held = loaded.state_dict()
    for n, t in ours.items():
        if t.dtype == FP8_DTYPE:
            assert torch.equal(_bits(held[n]), _bits(t)), n
        elif n.endswith("weight_scale_inv"):
            # transformers 4.57 casts every floating non-FP8 tensor of a quantized model to the dtype it loads with
            # (_infer_parameter_dtype: config._pre_quantization_dtype), scales included: it holds our float32 scales
            # rounded to that dtype; the checkpoint itself keeps them in float32 (test_checkpoint_round_trip)
            assert held[n].dtype == torch.bfloat16 and torch.equal(held[n], t.to(torch.bfloat16)), n
        else:
            assert torch.equal(held[n], t), n
    # FP8-emulated: the BF16 model with every quantized weight replaced by its dequantization
    emulated = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).cuda().eval()
    deq = {n: (reference.dequantize_blockwise(ours[n], ours[scale_name(n)]).to(torch.bfloat16)
               if ours[n].dtype == FP8_DTYPE else t) for n, t in sd.items()}
    emulated.load_state_dict(deq)
    ids = torch.randint(0, 512, (4, 64), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits.float()
        got = loaded(ids).logits.float()
        emu = emulated(ids).logits.float()
    d_fp8, d_emu = calc_diff(got, ref), calc_diff(emu, ref)
    print(f"[transformers {transformers.__version__}] calc_diff vs BF16: FP8 model {d_fp8:.2e}, "
          f"weights-only emulation {d_emu:.2e}")
    assert d_fp8 < 1e-2
    assert d_fp8 < max(4 * d_emu, 2e-3)  # activation quantization adds error of the weights' own order


@pytest.mark.gpu
def test_bucket_memory_bound_gpu():
    """Peak extra device memory of a bucketed sync <= one bucket (+ allocator slack): no staging copies."""
    sd = _qwen3_moe_state_dict("cuda", layers=4, E=32, H=1024, inter=512, q=1024, kv=256, vocab=1024)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    bucket = 8 << 20
    stream = quantize_state_dict(sd, bucket_bytes=bucket)
    n = 0
    for b in stream:
        n += len(b)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= bucket + (2 << 20), (extra, stream.stats)
    # separate per-expert tensors go through address-table launches (since 815d4b4), each group in one launch
    assert stream.stats["table_launches"] > 0 and n == len(sd) + stream.stats["quantized"], stream.stats
