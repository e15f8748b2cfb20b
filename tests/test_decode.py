"""The decode forward (``fp8_deep.ops.decode``, ``FP8_DEEP_DECODE=1``): two GEMMs that find their own rows; and the
routed path (``FP8_DEEP_ROUTED=1``): the routing plan's rows, the operands formed as the GEMMs load them.

CPU (interpreter) and GPU: bitwise the regular chain, stage by stage (h and o per choice) and end to end, over the
paths of the kernels (a slot with more rows than a tile, 64- and 128-row weight tiles, TMA weight loads, an expert
map with remote experts, out-of-range ids, duplicate choices, UE8M0 scales, float16 tokens); the launchers' errors;
when the forward takes the path. GPU: model shapes, eagerly and as a CUDA-graph replay, with and without PDL.
"""
import pytest
import torch

import fp8_deep
from fp8_deep import ops, reference
from fp8_deep.moe.forward import DECODE_ENV, _use_decode, moe_forward_impl
from fp8_deep.ops.backend import select_grouped_gemm
from fp8_deep.moe.forward import DECODE_COMBINE_ENV, ROUTED_ENV
from fp8_deep.numerics import use_triton
from fp8_deep.ops.decode import (DECODE_CONFIG_ENV, DECODE_MAX_CHOICES, DecodeConfig, decode_config, decode_counters,
                                 moe_decode_gemm1, moe_decode_gemm2, moe_routed_gemm1, moe_routed_gemm2)
from fp8_deep.testing import assert_bitwise_equal


def _layer(E, H, I, dev, scale_fmt="fp32", seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, device=dev, generator=g, dtype=torch.bfloat16) * 0.05
    w2 = torch.randn(E, H, I, device=dev, generator=g, dtype=torch.bfloat16) * 0.05
    q13, s13 = ops.quantize_weight_blockwise(w13, scale_fmt=scale_fmt)
    q2, s2 = ops.quantize_weight_blockwise(w2, scale_fmt=scale_fmt)
    return q13, s13, q2, s2


def _case(T, E, H, I, k, device, seed=0):
    """A layer and a call: (FP8 weights and scales, bf16 tokens, softmax top-k weights, ids)."""
    layer = _layer(E, H, I, device)
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    return (layer, x, *_routing(T, E, k, device, seed=seed))


def _remote_map_call(H, device, dtype):
    """4 local experts of 10 global ones (global 1, 4, 6, 9 -> local 0-3) and 4 tokens whose choices mix local and
    remote experts, one token with none local: (expert_map, ids, weights, tokens)."""
    emap = torch.full((10,), -1, dtype=torch.int32, device=device)
    emap[torch.tensor([1, 4, 6, 9])] = torch.arange(4, dtype=torch.int32).to(device)
    ids = torch.tensor([[1, 4, 3], [9, 6, 1], [0, 2, 5], [4, 4, 6]], dtype=torch.int32, device=device)
    tw = torch.softmax(torch.randn(4, 3, device=device), -1)
    return emap, ids, tw, torch.randn(4, H, device=device, dtype=dtype)


def _regular(x, layer, tw, ids, expert_map, scale_fmt):
    q13, s13, q2, s2 = layer
    out, st = moe_forward_impl(x, q13, q2, tw, ids, w13_scale=s13, w2_scale=s2, expert_map=expert_map,
                               scale_fmt=scale_fmt, return_stages=True,
                               select_gemm=lambda **kw: select_grouped_gemm("triton", **kw))
    return out, st


def _check_against_regular(x, layer, tw, ids, *, expert_map=None, scale_fmt="fp32", config=None):
    """Decode h / o per kept choice and the combined output, bitwise the regular chain's."""
    q13, s13, q2, s2 = layer
    ref_out, st = _regular(x, layer, tw, ids, expert_map, scale_fmt)
    kw = dict(expert_map=expert_map, scale_fmt=scale_fmt, config=config)
    h, inv = moe_decode_gemm1(x, ids, q13, s13, **kw)
    o = moe_decode_gemm2(h, ids, q2, s2, **kw)
    T, k = ids.shape
    kept = st["plan"].inv_perm.reshape(-1).long()
    flat = torch.arange(T * k, device=x.device)
    assert_bitwise_equal(inv, torch.where(kept >= 0, flat, -1).view(T, k).int(), "inv")
    rows, p = kept[kept >= 0], flat[kept >= 0]
    if st["h"] is not None:
        assert_bitwise_equal(h[p], st["h"][rows], "h")
    assert_bitwise_equal(o[p], st["o"][rows], "o")
    assert_bitwise_equal(ops.moe_combine(o, inv, tw, out_dtype=x.dtype), ref_out, "output")
    # the combine in GEMM2's tail: zeroed counters from GEMM1, the same sum
    counters = decode_counters(x.shape[1], x.device)
    h, inv = moe_decode_gemm1(x, ids, q13, s13, counters=counters, **kw)
    fused = moe_decode_gemm2(h, ids, q2, s2, combine=(tw, inv, counters), out_dtype=x.dtype, **kw)
    assert_bitwise_equal(fused, ref_out, "output, fused combine")
    if use_triton(x):  # each column tile's last program ran (and set the counter back to zero)
        tiles = -(-x.shape[1] // (config or decode_config(q2.shape[0], x.shape[1], q2.shape[2], T * k,
                                                          x.device)).BLOCK_N)
        assert counters[:tiles].tolist() == [0] * tiles
        again = moe_decode_gemm2(h, ids, q2, s2, combine=(tw, inv, counters), out_dtype=x.dtype, **kw)
        assert_bitwise_equal(again, ref_out, "output, fused combine relaunched on the same counters")
    return ref_out


def _routing(T, E, k, dev, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    tw, ids = torch.topk(torch.softmax(torch.randn(T, E, device=dev, generator=g), -1), k)
    return tw, ids.int()


# (T, E, H, I, k, config): the tile paths under the interpreter, small
CASES = [
    (1, 8, 256, 128, 2, None),
    (3, 8, 256, 256, 3, DecodeConfig(BLOCK_N=64)),
    (5, 4, 128, 256, 2, DecodeConfig(BLOCK_N=128, TMA_B=True)),
    (20, 4, 128, 128, 2, DecodeConfig(BLOCK_M=32, BLOCK_N=64)),  # the fused combine: two 16-token steps
    # the bound: 128 choices (P_POW2 = 128 comparisons in every program), 8 warps (compiled for sm_90 by the CPU suite)
    (16, 16, 128, 128, 8, DecodeConfig(BLOCK_N=128, num_warps=8)),
]


@pytest.mark.parametrize("T,E,H,I,k,config", CASES)
def test_decode_matches_the_regular_chain_bitwise(T, E, H, I, k, config, device):
    layer, x, tw, ids = _case(T, E, H, I, k, device)
    _check_against_regular(x, layer, tw, ids, config=config)


def test_decode_slot_with_more_rows_than_a_tile_and_duplicates(device):
    """18 choices of one expert (two 16-row tiles of its slot), a token choosing one expert twice, int64 ids."""
    E, H, I = 4, 128, 128
    layer = _layer(E, H, I, device)
    x = torch.randn(9, H, device=device, dtype=torch.bfloat16)
    ids = torch.full((9, 2), 2, dtype=torch.int64, device=device)
    ids[0, 1] = 1
    tw = torch.softmax(torch.randn(9, 2, device=device), -1)
    _check_against_regular(x, layer, tw, ids)


def test_decode_expert_map_remote_and_out_of_range(device):
    """Global ids through a map with remote (-1) experts, and ids outside the map: dropped, as the alignment drops
    them (the forward's range check is off for this call's CUDA ids, and the launchers never check ranges)."""
    H, I = 128, 128
    layer = _layer(4, H, I, device)
    emap, ids, tw, x = _remote_map_call(H, device, torch.bfloat16)
    out = _check_against_regular(x, layer, tw, ids, expert_map=emap)
    assert torch.count_nonzero(out[2]) == 0  # a token without a local expert gets zeros
    bad = ids.clone()
    bad[0, 0], bad[1, 2] = 12, -3
    q13, s13, _, _ = layer
    h, inv = moe_decode_gemm1(x, bad, q13, s13, expert_map=emap)
    ref_h, ref_inv = reference.moe_decode_gemm1(x, bad, q13, s13, expert_map=emap)
    assert_bitwise_equal(inv, ref_inv, "inv")
    assert inv[0, 0] == -1 and inv[1, 2] == -1


def test_decode_ue8m0_and_float16(device):
    E, H, I = 4, 128, 128
    layer = _layer(E, H, I, device, scale_fmt="ue8m0")
    x = torch.randn(2, H, device=device, dtype=torch.float16)
    tw, ids = _routing(2, E, 2, device)
    _check_against_regular(x, layer, tw, ids, scale_fmt="ue8m0")


def test_decode_stages_close_to_reference(device):
    """Against the float32-promotion reference of each stage (the kernels' spec), elementwise."""
    E, H, I = 4, 256, 128
    q13, s13, q2, s2 = _layer(E, H, I, device)
    x = torch.randn(3, H, device=device, dtype=torch.bfloat16)
    tw, ids = _routing(3, E, 2, device)
    h, inv = moe_decode_gemm1(x, ids, q13, s13)
    acc = "tensor_core" if x.is_cuda else "fp32"
    ref_h, ref_inv = reference.moe_decode_gemm1(x, ids, q13, s13, accumulate=acc)
    assert_bitwise_equal(inv, ref_inv, "inv")
    torch.testing.assert_close(h.float(), ref_h.float(), atol=2e-3, rtol=1e-2)
    o = moe_decode_gemm2(h, ids, q2, s2)
    torch.testing.assert_close(o.float(), reference.moe_decode_gemm2(h, ids, q2, s2, accumulate=acc).float(),
                               atol=2e-3, rtol=1e-2)


def test_decode_launcher_errors(device):
    q13, s13, q2, s2 = _layer(2, 128, 128, device)
    x = torch.randn(2, 128, device=device, dtype=torch.bfloat16)
    ids = torch.zeros(2, 2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="multiple of 128"):
        moe_decode_gemm1(x[:, :96], ids, q13[:, :, :96], s13[:, :, :1])
    with pytest.raises(ValueError, match="at most"):
        big = torch.zeros(DECODE_MAX_CHOICES + 1, 1, dtype=torch.int32, device=device)
        moe_decode_gemm1(torch.zeros(DECODE_MAX_CHOICES + 1, 128, device=device), big, q13, s13)
    with pytest.raises(ValueError, match="w13_scale must have shape"):
        moe_decode_gemm1(x, ids, q13, s13[:, :1])
    with pytest.raises(TypeError, match="w13"):
        moe_decode_gemm1(x, ids, q13.float(), s13)
    with pytest.raises(TypeError, match="expert_map"):
        moe_decode_gemm1(x, ids, q13, s13, expert_map=torch.zeros(2, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="T = 2 rows"):
        moe_decode_gemm1(x, ids[:1], q13, s13)
    h = torch.zeros(4, 256, device=device, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one row per choice"):
        moe_decode_gemm2(h[:3], ids, q2, s2)
    with pytest.raises(ValueError, match="BLOCK_N must be 64 or 128"):
        DecodeConfig(BLOCK_N=32)
    with pytest.raises(ValueError, match="num_warps must be 4 or 8.*mma.sync"):
        DecodeConfig(num_warps=2)
    hh, inv = moe_decode_gemm1(x, ids, q13, s13)
    tw = torch.ones(2, 2, device=device)
    with pytest.raises(ValueError, match="out= and out_dtype are for the fused combine"):
        moe_decode_gemm2(hh, ids, q2, s2, out_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="combine must be"):
        moe_decode_gemm2(hh, ids, q2, s2, combine=(tw, inv))
    with pytest.raises(ValueError, match="must be \\(T, top_k\\)"):
        moe_decode_gemm2(hh, ids, q2, s2, combine=(tw[:1], inv, decode_counters(128, device)))
    with pytest.raises(ValueError, match="share memory"):  # the output may not overlap an input
        moe_decode_gemm2(hh, ids, q2, s2, combine=(tw, inv, decode_counters(128, device)),
                         out=hh.view(torch.bfloat16)[:2, :128])
    if use_triton(x):
        with pytest.raises(ValueError, match="counters has 0 entries"):
            moe_decode_gemm2(hh, ids, q2, s2, combine=(tw, inv, torch.zeros(0, dtype=torch.int32, device=device)))


def test_decode_no_experts_or_no_choices(device):
    """No local experts (E = 0) or no choices (top_k = 0): no launch, every choice dropped, the combined output zero
    and the counters zero (not whatever the buffers held)."""
    H, I = 128, 128
    x = torch.randn(3, H, device=device, dtype=torch.bfloat16)
    for E, k in ((0, 2), (2, 0)):
        q13, s13, q2, s2 = _layer(E, H, I, device)
        ids = torch.zeros(3, k, dtype=torch.int32, device=device)
        counters = torch.full((4,), 7, dtype=torch.int32, device=device)
        h, inv = moe_decode_gemm1(x, ids, q13, s13, counters=counters)
        assert inv.shape == (3, k) and bool((inv == -1).all()) and bool((counters == 0).all())
        out = torch.full((3, H), float("nan"), device=device, dtype=torch.bfloat16)
        tw = torch.ones(3, k, device=device)
        res = moe_decode_gemm2(h, ids, q2, s2, combine=(tw, inv, counters), out=out)
        assert res.data_ptr() == out.data_ptr() and bool((out == 0).all())


def test_decode_switch(device, monkeypatch):
    x = torch.zeros(1, 128, device=device)
    triton_gemm = select_grouped_gemm("triton", device=device, rows_per_expert=1, hidden=128, inter=128)
    monkeypatch.delenv(DECODE_ENV, raising=False)
    assert not _use_decode(8, 128, 128, x, triton_gemm, False, 8)  # unset: the card's table (none off CUDA)
    import fp8_deep.moe.forward as fwd
    asked = []
    monkeypatch.setattr(fwd, "tuned_config", lambda op, dev, **kw: asked.append((op, kw)) or "decode")
    assert _use_decode(8, 128, 128, x, triton_gemm, False, 4)
    assert asked == [("moe_decode", dict(E=4, N=256, K=128, rows=8))]
    monkeypatch.setattr(fwd, "tuned_config", lambda op, dev, **kw: "chain")
    assert not _use_decode(8, 128, 128, x, triton_gemm, False, 4)
    monkeypatch.setenv(DECODE_ENV, "0")
    monkeypatch.setattr(fwd, "tuned_config", lambda op, dev, **kw: "decode")
    assert not _use_decode(8, 128, 128, x, triton_gemm, False, 4)
    monkeypatch.setenv(DECODE_ENV, "1")
    assert _use_decode(8, 128, 128, x, triton_gemm, False)
    assert not _use_decode(8, 128, 128, x, triton_gemm, True)            # stages asked for: the regular chain
    assert not _use_decode(DECODE_MAX_CHOICES + 1, 128, 128, x, triton_gemm, False)
    assert not _use_decode(8, 128, 96, x, triton_gemm, False)            # I not a multiple of 128

    class Other:
        name = "deep_gemm"
    assert not _use_decode(8, 128, 128, x, Other(), False)
    monkeypatch.setenv(DECODE_ENV, "on")
    with pytest.raises(ValueError, match=DECODE_ENV):
        _use_decode(8, 128, 128, x, triton_gemm, False)


def test_decode_config_pick(monkeypatch):
    monkeypatch.delenv(DECODE_CONFIG_ENV, raising=False)
    # 128-row weight tiles once the slots' tiles cover the SMs (2 off CUDA), 64-row ones before
    assert decode_config(8, 128, 256, 1, "cpu").BLOCK_N == 64
    assert decode_config(8, 128, 256, 2, "cpu").BLOCK_N == 128
    assert decode_config(1, 128, 256, 4, "cpu").BLOCK_N == 64  # one expert: one slot
    # a card's table (asked with the GEMM's sizes), unless the environment pins a config
    import fp8_deep.ops.decode as dec
    asked = []
    monkeypatch.setattr(dec, "tuned_config", lambda op, dev, **kw: asked.append((op, kw)) or "BLOCK_N=128,TMA_B=1")
    assert decode_config(8, 1536, 2048, 8, "cpu") == DecodeConfig(BLOCK_N=128, TMA_B=True)
    assert asked == [("decode", dict(E=8, N=1536, K=2048, rows=8))]
    monkeypatch.setattr(dec, "tuned_config", lambda op, dev, **kw: "BLOCK_N=96")
    with pytest.raises(ValueError, match="tuned decode table"):
        decode_config(8, 1536, 2048, 8, "cpu")
    monkeypatch.setenv(DECODE_CONFIG_ENV, "BLOCK_N=64,TMA_B=1,num_stages=4")
    assert decode_config(8, 4096, 128, 8, "cpu") == DecodeConfig(BLOCK_N=64, TMA_B=True, num_stages=4)
    monkeypatch.setenv(DECODE_CONFIG_ENV, "BLOCK_K=64")
    with pytest.raises(ValueError, match="unknown decode config key"):
        decode_config(8, 4096, 128, 8, "cpu")


def test_forward_takes_the_decode_path(device, monkeypatch):
    """moe_forward with FP8_DEEP_DECODE=1: the regular output's bytes, into out= as well, with an expert map."""
    E, H, I = 4, 128, 128
    q13, s13, q2, s2 = _layer(E, H, I, device)
    x = torch.randn(3, H, device=device, dtype=torch.bfloat16)
    tw, ids = _routing(3, E, 2, device)
    kw = dict(w13_scale=s13, w2_scale=s2, backend="triton", expert_map=torch.arange(E, device=device, dtype=torch.int32))
    monkeypatch.setenv(DECODE_ENV, "0")
    ref = fp8_deep.moe_forward(x, q13, q2, tw, ids, **kw)
    monkeypatch.setenv(DECODE_ENV, "1")
    calls = []
    import fp8_deep.moe.forward as fwd
    orig = fwd.moe_decode_gemm1
    monkeypatch.setattr(fwd, "moe_decode_gemm1", lambda *a, **k: calls.append(k["counters"] is not None) or
                        orig(*a, **k))
    for combine in ("1", "0"):
        monkeypatch.setenv(DECODE_COMBINE_ENV, combine)
        assert_bitwise_equal(fp8_deep.moe_forward(x, q13, q2, tw, ids, **kw), ref, f"forward, combine {combine}")
        out = torch.empty_like(x)
        assert fp8_deep.moe_forward(x, q13, q2, tw, ids, out=out, **kw) is out
        assert_bitwise_equal(out, ref, "out=")
    assert calls == [True, True, False, False]  # fused combine: GEMM1 zeroes its counters
    monkeypatch.setenv(DECODE_COMBINE_ENV, "yes")
    with pytest.raises(ValueError, match=DECODE_COMBINE_ENV):
        fp8_deep.moe_forward(x, q13, q2, tw, ids, **kw)


# ------------------------------------------------------------------------------------------------- routed path
def _check_routed(x, layer, tw, ids, *, expert_map=None, scale_fmt="fp32", config=None):
    """Routed GEMM1 / GEMM2 rows bitwise the regular chain's (same plan), and the combined output."""
    q13, s13, q2, s2 = layer
    ref_out, st = _regular(x, layer, tw, ids, expert_map, scale_fmt)
    plan = st["plan"]
    real = plan.m_indices >= 0
    h = moe_routed_gemm1(x, plan, q13, s13, scale_fmt=scale_fmt, config=config)
    if st["h"] is not None:
        assert_bitwise_equal(h[real], st["h"][real], "h")
    o = moe_routed_gemm2(h, plan, q2, s2, scale_fmt=scale_fmt, config=config)
    assert_bitwise_equal(o[real], st["o"][real], "o")
    assert_bitwise_equal(ops.moe_combine(o, plan.inv_perm, tw, out_dtype=x.dtype), ref_out, "output")


@pytest.mark.parametrize("T,E,H,I,k,config", [
    (3, 8, 256, 256, 3, None),
    (40, 4, 128, 128, 2, DecodeConfig(BLOCK_N=64, TMA_B=True)),  # 80 choices, 16-row tiles over 4 experts
])
def test_routed_matches_the_regular_chain_bitwise(T, E, H, I, k, config, device):
    layer, x, tw, ids = _case(T, E, H, I, k, device)
    _check_routed(x, layer, tw, ids, config=config)


def test_routed_expert_map_ue8m0_fp16(device):
    H, I = 128, 128
    layer = _layer(4, H, I, device, scale_fmt="ue8m0")
    emap, ids, tw, x = _remote_map_call(H, device, torch.float16)
    _check_routed(x, layer, tw, ids, expert_map=emap, scale_fmt="ue8m0")


def _error_call(device):
    """A small layer and call for the launchers' error tests: ((E, H, I), FP8 weights and scales, 6 bf16 tokens,
    top-2 weights and ids, their 16-row routing plan)."""
    E, H, I = 4, 128, 128
    x = torch.randn(6, H, device=device, dtype=torch.bfloat16)
    tw, ids = _routing(6, E, 2, device)
    return (E, H, I), _layer(E, H, I, device), x, tw, ids, ops.align_routing(ids, E, block_size=16)


def test_routed_errors_and_forward(device, monkeypatch):
    (E, H, I), (q13, s13, q2, s2), x, tw, ids, plan = _error_call(device)
    with pytest.raises(TypeError, match="RoutingPlan"):
        moe_routed_gemm1(x, (plan.sorted_token_ids,), q13, s13)
    with pytest.raises(ValueError, match="built for 6 tokens"):
        moe_routed_gemm1(x[:5], plan, q13, s13)
    with pytest.raises(ValueError, match="multiple of 128"):
        moe_routed_gemm1(x[:, :96], plan, q13[:, :, :96], s13[:, :, :1])
    with pytest.raises(ValueError, match="experts"):
        moe_routed_gemm1(x, plan, q13[:2], s13[:2])
    h = moe_routed_gemm1(x, plan, q13, s13)
    with pytest.raises(ValueError, match="plan.num_rows"):
        moe_routed_gemm2(h[:-16], plan, q2, s2)
    kw = dict(w13_scale=s13, w2_scale=s2, backend="triton")
    monkeypatch.setenv(ROUTED_ENV, "0")
    ref = fp8_deep.moe_forward(x, q13, q2, tw, ids, **kw)
    monkeypatch.setenv(ROUTED_ENV, "1")
    import fp8_deep.moe.forward as fwd
    calls = []
    orig = fwd.moe_routed_gemm1
    monkeypatch.setattr(fwd, "moe_routed_gemm1", lambda *a, **k: calls.append(1) or orig(*a, **k))
    assert_bitwise_equal(fp8_deep.moe_forward(x, q13, q2, tw, ids, **kw), ref, "forward, routed")
    assert calls
    monkeypatch.setenv(DECODE_ENV, "1")  # within the decode path's bound it goes first
    calls.clear()
    assert_bitwise_equal(fp8_deep.moe_forward(x, q13, q2, tw, ids, **kw), ref, "forward, decode")
    assert not calls
    monkeypatch.setenv(ROUTED_ENV, "yes")
    monkeypatch.setenv(DECODE_ENV, "0")
    with pytest.raises(ValueError, match=ROUTED_ENV):
        fp8_deep.moe_forward(x, q13, q2, tw, ids, **kw)
    # unset: the card's table decides (asked with the layer's sizes and the call's choices)
    monkeypatch.delenv(ROUTED_ENV)
    gemm = select_grouped_gemm("triton", device=device, rows_per_expert=1, hidden=H, inter=I)
    assert not fwd._use_routed(H, I, x, gemm, False, 12, E)  # no table off CUDA
    asked = []
    monkeypatch.setattr(fwd, "tuned_config", lambda op, dev, **k: asked.append((op, k)) or "routed")
    assert fwd._use_routed(H, I, x, gemm, False, 12, E)
    assert asked == [("moe_decode", dict(E=E, N=2 * I, K=H, rows=12))]
    monkeypatch.setattr(fwd, "tuned_config", lambda op, dev, **k: "decode")
    assert not fwd._use_routed(H, I, x, gemm, False, 12, E)


# ---------------------------------------------------------------------------------------------------------- GPU
GPU_SHAPES = {  # E, H, I, top_k
    "qwen3_30b": (128, 2048, 768, 8),
    "dsv3_tp8": (256, 7168, 256, 8),
    "mixtral": (8, 4096, 14336, 2),
}


@pytest.mark.gpu
@pytest.mark.parametrize("model,T", [("qwen3_30b", 1), ("qwen3_30b", 4), ("qwen3_30b", 16), ("dsv3_tp8", 1),
                                     ("dsv3_tp8", 16), ("mixtral", 1), ("mixtral", 16)])
@pytest.mark.parametrize("config", [None, "BLOCK_N=128,TMA_B=1"])  # None: 64-row tiles at T=1, 128 at T=16
def test_decode_matches_the_regular_chain_gpu(model, T, config, monkeypatch):
    E, H, I, k = GPU_SHAPES[model]
    layer, x, tw, ids = _case(T, E, H, I, k, "cuda", seed=T)
    _check_against_regular(x, layer, tw, ids, config=DecodeConfig.parse(config) if config else None)


@pytest.mark.gpu
def test_decode_expert_map_gpu():
    """The DeepSeek-V3 EP8 shard: 256 global experts, 32 local."""
    layer = _layer(32, 7168, 2048, "cuda")
    emap = torch.full((256,), -1, dtype=torch.int32, device="cuda")
    emap[64:96] = torch.arange(32, dtype=torch.int32, device="cuda")
    tw, ids = _routing(16, 256, 8, "cuda", seed=3)
    ids[:, 0] = 64 + torch.arange(16, device="cuda", dtype=torch.int32)  # every token has a local expert
    x = torch.randn(16, 7168, device="cuda", dtype=torch.bfloat16)
    _check_against_regular(x, layer, tw, ids, expert_map=emap)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 16])
@pytest.mark.parametrize("pdl", ["0", "1"])
def test_decode_forward_eager_and_graph_gpu(T, pdl, monkeypatch):
    """moe_forward with the decode path (launch plans, then a CUDA-graph replay on new inputs): the regular bytes."""
    E, H, I, k = GPU_SHAPES["qwen3_30b"]
    q13, s13, q2, s2 = _layer(E, H, I, "cuda")
    kw = dict(w13_scale=s13, w2_scale=s2, backend="triton")
    tw, ids = _routing(T, E, k, "cuda", seed=T)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    x2 = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setenv("FP8_DEEP_PDL", pdl)
    with torch.no_grad():
        monkeypatch.setenv(DECODE_ENV, "0")
        ref = fp8_deep.moe_forward(x, q13, q2, tw, ids, **kw)
        ref2 = fp8_deep.moe_forward(x2, q13, q2, tw, ids, **kw)
        monkeypatch.setenv(DECODE_ENV, "1")
        for _ in range(3):  # plain path, recording, first replay of the forward's launch plan
            assert_bitwise_equal(fp8_deep.moe_forward(x, q13, q2, tw, ids, **kw), ref, "eager")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=s):
                gout = fp8_deep.moe_forward(x, q13, q2, tw, ids, **kw)
        torch.cuda.current_stream().wait_stream(s)
        x.copy_(x2)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    assert_bitwise_equal(gout, ref2, "graph replay")


@pytest.mark.gpu
@pytest.mark.parametrize("model,T", [("qwen3_30b", 64), ("qwen3_30b", 256), ("dsv3_tp8", 256), ("mixtral", 256)])
def test_routed_matches_the_regular_chain_gpu(model, T):
    E, H, I, k = GPU_SHAPES[model]
    layer, x, tw, ids = _case(T, E, H, I, k, "cuda", seed=T)
    _check_routed(x, layer, tw, ids)
