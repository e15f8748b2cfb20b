"""GEMM1 reading the quantized tokens through the routing plan (``ops.grouped_gemm_fp8_gather``,
``FP8_DEEP_GATHER=1``): no permuted copy of the tokens.

CPU (interpreter) and GPU: bitwise the permute + grouped GEMM chain per real row, over the tile paths (swap-AB 16- and
32-row tiles, 64-row plain tiles, TMA and pointer weight loads, K and N not multiples of 128, an expert map with
remote experts, padding rows), and the whole forward bitwise the regular chain; the launcher's errors and the tile
pick. GPU: model shapes from 64 to 16384 routed rows, eagerly and as a CUDA-graph replay.
"""
from types import SimpleNamespace

import pytest
import torch

import fp8_deep
from fp8_deep import ops
from fp8_deep.moe.forward import DECODE_ENV, GATHER_ENV, ROUTED_ENV
from fp8_deep.ops.backend import select_grouped_gemm
from fp8_deep.ops.grouped_gemm import GATHER_CONFIG_ENV, GemmConfig, gather_config, grouped_gemm_fp8_gather
from fp8_deep.testing import assert_bitwise_equal

from test_decode import GPU_SHAPES, _case, _error_call, _layer, _remote_map_call, _routing

PLAIN64 = "BLOCK_M=64,BLOCK_N=128,GROUP_M=8,BLOCK_MAP=1,TMA_B=1"
SWAP16 = "BLOCK_M=16,BLOCK_N=128,GROUP_M=1,SWAP_AB=1,BLOCK_MAP=1,TMA_B=1"
SWAP32_N64 = "BLOCK_M=32,BLOCK_N=64,GROUP_M=1,SWAP_AB=1,BLOCK_MAP=1"


def _check_gemm(x, ids, E, q13, s13, config, *, expert_map=None, scale_fmt="fp32", out_dtype=torch.bfloat16):
    """The gathered GEMM's real rows bitwise the permuted copy's GEMM (same plan, same tile)."""
    cfg = GemmConfig.parse(config)
    plan = ops.align_routing(ids, E, expert_map=expert_map, block_size=max(16, cfg.BLOCK_M))
    qx, sx = ops.quantize_activation(x, scale_fmt=scale_fmt)
    a, sa = ops.permute_rows(qx, sx, plan)
    ref = ops.TritonGroupedGemm(config).gemm(a, sa, q13, s13, plan, out_dtype=out_dtype)
    out = grouped_gemm_fp8_gather(qx, sx, q13, s13, plan, config=config, out_dtype=out_dtype)
    real = plan.m_indices >= 0
    assert int(real.sum()) > 0
    assert_bitwise_equal(out[real], ref[real], f"gathered GEMM {config}")
    return plan, qx, sx


@pytest.mark.parametrize("T,E,H,I,k,config", [
    (6, 4, 256, 128, 2, SWAP16),
    (20, 4, 256, 128, 3, PLAIN64),       # 60 rows over 4 experts: a 64-row tile per expert, padding rows unread
    (9, 8, 128, 96, 3, SWAP32_N64),      # N = 192: a partial weight tile; pointer weight loads
])
def test_gather_matches_permuted_gemm(T, E, H, I, k, config, device):
    (q13, s13, _, _), x, _, ids = _case(T, E, H, I, k, device)
    _check_gemm(x, ids, E, q13, s13, config)


def test_gather_ragged_k_row_major_and_tma_scales(device):
    """K = 320 (a partial K block: the masked loop) with row-major and TMA-aligned token scales; fp32 output."""
    E, H, N, T, k = 4, 320, 128, 7, 2
    w = torch.randn(E, N, H, device=device) * 0.05
    q, s = ops.quantize_weight_blockwise(w)
    x = torch.randn(T, H, device=device)
    _, ids = _routing(T, E, k, device)
    plan, qx, sx = _check_gemm(x, ids, E, q, s, SWAP16, out_dtype=torch.float32)
    qx_t, sx_t = ops.quantize_activation(x, scale_layout="tma_aligned")
    assert sx_t.stride() != sx.stride()
    real = plan.m_indices >= 0
    assert_bitwise_equal(grouped_gemm_fp8_gather(qx_t, sx_t, q, s, plan, config=SWAP16)[real],
                         grouped_gemm_fp8_gather(qx, sx, q, s, plan, config=SWAP16)[real], "scale layouts")


def test_gather_expert_map_and_ue8m0(device):
    H, I = 128, 128
    q13, s13, _, _ = _layer(4, H, I, device, scale_fmt="ue8m0")
    emap, ids, _, x = _remote_map_call(H, device, torch.bfloat16)
    _check_gemm(x, ids, 4, q13, s13, SWAP16, expert_map=emap, scale_fmt="ue8m0")


def _forward(x, layer, tw, ids, gather, monkeypatch, expert_map=None, scale_fmt="fp32"):
    q13, s13, q2, s2 = layer
    monkeypatch.setenv(GATHER_ENV, gather)
    return fp8_deep.moe_forward(x, q13, q2, tw, ids, w13_scale=s13, w2_scale=s2, backend="triton",
                                expert_map=expert_map, scale_fmt=scale_fmt)


@pytest.mark.parametrize("config", [None, PLAIN64])
def test_forward_gather_matches_the_chain(config, device, monkeypatch):
    layer, x, tw, ids = _case(24, 4, 256, 128, 3, device)
    if config:
        monkeypatch.setenv(GATHER_CONFIG_ENV, config)
    ref = _forward(x, layer, tw, ids, "0", monkeypatch)
    import fp8_deep.moe.forward as fwd
    calls = []
    orig = fwd.grouped_gemm_fp8_gather
    monkeypatch.setattr(fwd, "grouped_gemm_fp8_gather", lambda *a, **k: calls.append(k["config"]) or orig(*a, **k))
    assert_bitwise_equal(_forward(x, layer, tw, ids, "1", monkeypatch), ref, "forward, gather")
    assert calls and calls[0] == (GemmConfig.parse(config) if config else gather_config(4, 256, 256, 72, device))


def test_forward_gather_gemm2_tile_from_the_table(device, monkeypatch):
    """The gather table's GEMM2 tile (a 64-row block-map tile) runs on a plan aligned to it: the chain's bytes; a
    pinned FP8_DEEP_GEMM_CONFIG or no entry leaves GEMM2 to the backend's own pick."""
    import fp8_deep.moe.forward as fwd
    from fp8_deep.ops import grouped_gemm as gg
    layer, x, tw, ids = _case(24, 4, 256, 128, 3, device)
    ref = _forward(x, layer, tw, ids, "0", monkeypatch)
    asked, gemm2, plans = [], [], []
    monkeypatch.setattr(gg, "tuned_config", lambda op, dev, **k: asked.append((op, k)) or (
        PLAIN64 if (op, k["N"], k["K"]) == ("gather", 256, 128) else None))
    orig_gemm, orig_align = fwd.TritonGroupedGemm.gemm, fwd.align_routing
    monkeypatch.setattr(fwd.TritonGroupedGemm, "gemm",
                        lambda self, *a, **k: gemm2.append(self.config) or orig_gemm(self, *a, **k))
    monkeypatch.setattr(fwd, "align_routing", lambda *a, **k: plans.append(k["block_size"]) or orig_align(*a, **k))
    assert_bitwise_equal(_forward(x, layer, tw, ids, "1", monkeypatch), ref, "forward, gather, GEMM2 tile")
    assert ("gather", dict(E=4, N=256, K=128, rows=72)) in asked  # GEMM2's (N, K) = (H, I), the call's choices
    assert gemm2 == [GemmConfig.parse(PLAIN64)] and plans == [64]
    gemm2.clear()
    monkeypatch.setenv("FP8_DEEP_GEMM_CONFIG", "BLOCK_M=32,BLOCK_N=128,SWAP_AB=1")
    assert gg.gather_gemm2_config(4, 256, 128, 72, device) is None
    monkeypatch.delenv("FP8_DEEP_GEMM_CONFIG")
    monkeypatch.setattr(gg, "tuned_config", lambda op, dev, **k: None)
    assert gg.gather_gemm2_config(4, 256, 128, 72, device) is None
    plans.clear()
    assert_bitwise_equal(_forward(x, layer, tw, ids, "1", monkeypatch), ref, "forward, gather, backend's GEMM2")
    assert gemm2 == [None] and plans == [max(16, gather_config(4, 256, 256, 72, device).BLOCK_M)]


def test_forward_gather_expert_map_ue8m0(device, monkeypatch):
    layer = _layer(4, 128, 128, device, scale_fmt="ue8m0")
    emap, ids, tw, x = _remote_map_call(128, device, torch.float16)
    ref = _forward(x, layer, tw, ids, "0", monkeypatch, expert_map=emap, scale_fmt="ue8m0")
    assert_bitwise_equal(_forward(x, layer, tw, ids, "1", monkeypatch, expert_map=emap, scale_fmt="ue8m0"), ref,
                         "forward, gather, expert map")


def test_gather_errors(device, monkeypatch):
    (E, H, I), (q13, s13, _, _), x, _, ids, plan = _error_call(device)
    qx, sx = ops.quantize_activation(x)
    with pytest.raises(TypeError, match="RoutingPlan"):
        grouped_gemm_fp8_gather(qx, sx, q13, s13, (plan.sorted_token_ids,))
    with pytest.raises(TypeError, match="x_q"):
        grouped_gemm_fp8_gather(x, sx, q13, s13, plan)
    with pytest.raises(ValueError, match="built for 6 tokens"):
        grouped_gemm_fp8_gather(qx[:5], sx[:5], q13, s13, plan)
    with pytest.raises(ValueError, match="x_scale must be"):
        grouped_gemm_fp8_gather(qx, sx[:, :0], q13, s13, plan)
    with pytest.raises(ValueError, match="experts"):
        grouped_gemm_fp8_gather(qx, sx, q13[:2], s13[:2], plan)
    with pytest.raises(ValueError, match="b must be"):
        grouped_gemm_fp8_gather(qx[:, :64].contiguous(), sx, q13, s13, plan)
    with pytest.raises(ValueError, match="not a block-map tile"):
        grouped_gemm_fp8_gather(qx, sx, q13, s13, plan, config="BLOCK_M=16,BLOCK_N=128,SWAP_AB=1")
    with pytest.raises(ValueError, match=r"align_routing\(\.\.\., block_size=64\)"):
        grouped_gemm_fp8_gather(qx, sx, q13, s13, plan, config=PLAIN64)
    # the default tile (64 rows here, pinned through the env) is cut to the plan's 16-row blocks: the same bytes
    monkeypatch.setenv(GATHER_CONFIG_ENV, PLAIN64)
    cut = grouped_gemm_fp8_gather(qx, sx, q13, s13, plan)
    monkeypatch.delenv(GATHER_CONFIG_ENV)
    real = plan.m_indices >= 0
    assert_bitwise_equal(cut[real], grouped_gemm_fp8_gather(qx, sx, q13, s13, plan, config=SWAP16)[real], "cut tile")
    with pytest.raises(TypeError, match="out_dtype"):
        grouped_gemm_fp8_gather(qx, sx, q13, s13, plan, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="out must have shape"):
        grouped_gemm_fp8_gather(qx, sx, q13, s13, plan, out=torch.empty(3, 2 * I, device=device,
                                                                          dtype=torch.bfloat16))


def test_gather_config_pick(monkeypatch):
    monkeypatch.delenv(GATHER_CONFIG_ENV, raising=False)
    # rows per expert: 2048 * 8 / 128 = 128 -> 64-row plain tiles; 16 * 8 / 128 = 1 -> 16-row swap-AB tiles
    big = gather_config(128, 1536, 2048, 2048 * 8, "cpu")
    assert (big.BLOCK_M, big.SWAP_AB, big.BLOCK_MAP, big.TMA_B) == (64, False, True, True)
    small = gather_config(128, 1536, 2048, 16 * 8, "cpu")
    assert (small.BLOCK_M, small.SWAP_AB, small.BLOCK_MAP) == (16, True, True)
    mid = gather_config(8, 1536, 2048, 30 * 8, "cpu")  # peak rows per expert 30 -> 32-row swap-AB tiles
    assert (mid.BLOCK_M, mid.SWAP_AB) == (32, True)
    monkeypatch.setenv(GATHER_CONFIG_ENV, SWAP32_N64)
    assert gather_config(128, 1536, 2048, 8, "cpu") == GemmConfig.parse(SWAP32_N64)
    monkeypatch.setenv(GATHER_CONFIG_ENV, "BLOCK_M=64,BLOCK_N=128")
    with pytest.raises(ValueError, match="BLOCK_MAP"):
        gather_config(128, 1536, 2048, 8, "cpu")
    # the card's table (asked with GEMM1's (N, K) and the call's choices), checked as the env's value is
    from fp8_deep.ops import grouped_gemm as gg
    monkeypatch.delenv(GATHER_CONFIG_ENV)
    asked = []
    monkeypatch.setattr(gg, "tuned_config", lambda op, dev, **k: asked.append((op, k)) or SWAP32_N64)
    assert gather_config(128, 1536, 2048, 640, "cpu") == GemmConfig.parse(SWAP32_N64)
    assert asked == [("gather", dict(E=128, N=1536, K=2048, rows=640))]
    monkeypatch.setattr(gg, "tuned_config", lambda op, dev, **k: "BLOCK_M=64,BLOCK_N=128,GROUP_M=8")
    with pytest.raises(ValueError, match="tuned gather table.*BLOCK_MAP"):
        gather_config(128, 1536, 2048, 640, "cpu")


def test_gather_switch(device, monkeypatch):
    """``FP8_DEEP_GATHER`` 1 / 0 / unset (the card's table names "gather"); a bad value names the variable; the
    gather path runs under vLLM's activation quantizer too (it quantizes with ``quantize_activation``)."""
    import fp8_deep.moe.forward as fwd
    E, H, I = 4, 128, 128
    x = torch.randn(6, H, device=device, dtype=torch.bfloat16)
    gemm = select_grouped_gemm("triton", device=device, rows_per_expert=1, hidden=H, inter=I)
    monkeypatch.setenv(GATHER_ENV, "1")
    assert fwd._use_gather(H, I, x, gemm, False, 12, E)
    assert not fwd._use_gather(H, I, x, gemm, True, 12, E)  # stages asked for: the regular chain
    # a chain pinned in ways the other paths do not follow: every call takes the chain
    monkeypatch.setenv(DECODE_ENV, "1")
    assert fwd._use_decode(12, H, I, x, gemm, False, E)
    for var, value in (("FP8_DEEP_FUSED_SWIGLU", "auto"), ("FP8_DEEP_GEMM_CONFIG", "BLOCK_M=64,BLOCK_N=128,ACC_K=32")):
        monkeypatch.setenv(var, value)
        assert not fwd._use_gather(H, I, x, gemm, False, 12, E)
        assert not fwd._use_decode(12, H, I, x, gemm, False, E)
        monkeypatch.delenv(var)
    monkeypatch.delenv(DECODE_ENV)
    monkeypatch.setenv("FP8_DEEP_GEMM_CONFIG", "BLOCK_M=64,BLOCK_N=128")  # a tile pin alone changes no bytes
    assert fwd._use_gather(H, I, x, gemm, False, 12, E)
    monkeypatch.delenv("FP8_DEEP_GEMM_CONFIG")
    assert not fwd._use_gather(H, I, x, ops.TritonGroupedGemm("BLOCK_M=64,BLOCK_N=128"), False, 12, E)
    monkeypatch.setenv(GATHER_ENV, "0")
    assert not fwd._use_gather(H, I, x, gemm, False, 12, E)
    monkeypatch.setenv(GATHER_ENV, "on")
    with pytest.raises(ValueError, match=GATHER_ENV):
        fwd._use_gather(H, I, x, gemm, False, 12, E)
    monkeypatch.delenv(GATHER_ENV)
    asked = []
    monkeypatch.setattr(fwd, "tuned_config", lambda op, dev, **k: asked.append((op, k)) or "gather")
    assert fwd._use_gather(H, I, x, gemm, False, 12, E)
    assert asked == [("moe_decode", dict(E=E, N=2 * I, K=H, rows=12))]
    monkeypatch.setattr(fwd, "tuned_config", lambda op, dev, **k: "routed")
    assert not fwd._use_gather(H, I, x, gemm, False, 12, E)
    monkeypatch.setattr(fwd, "tuned_config", lambda op, dev, **k: op == "moe_decode" and "gather")
    monkeypatch.setattr(fwd._registry, "available", lambda kind, name: True)  # vLLM's quantizer installed
    cuda_x = SimpleNamespace(is_cuda=True, device=torch.device("cuda"))  # the rule reads only these
    assert fwd._use_gather(H, I, cuda_x, gemm, False, 12, E)
    monkeypatch.setenv(ROUTED_ENV, "1")  # a path that quantizes in its kernel steps aside for vLLM's quantizer
    assert not fwd._use_routed(H, I, cuda_x, gemm, False, 12, E)


def test_routed_goes_before_gather(device, monkeypatch):
    """Both forced on: the routed path (the table names one path per point; the env order is routed, gather)."""
    import fp8_deep.moe.forward as fwd
    layer, x, tw, ids = _case(6, 4, 128, 128, 2, device)
    monkeypatch.setenv(ROUTED_ENV, "1")
    calls = []
    monkeypatch.setattr(fwd, "grouped_gemm_fp8_gather", lambda *a, **k: calls.append(1))
    _forward(x, layer, tw, ids, "1", monkeypatch)
    assert not calls


# ---------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("model,T,config", [  # None: gather_config's pick (16-, 32- or 64-row tiles by the load)
    ("qwen3_30b", 64, None), ("qwen3_30b", 2048, None),
    ("qwen3_30b", 2048, "BLOCK_M=64,BLOCK_N=128,GROUP_M=8,BLOCK_MAP=1,TMA_B=0,num_stages=4"),
    ("dsv3_tp8", 256, None), ("dsv3_tp8", 2048, None),
    ("dsv3_tp8", 2048, "BLOCK_M=128,BLOCK_N=128,GROUP_M=8,BLOCK_MAP=1,TMA_B=1,num_warps=8"),
    ("mixtral", 1024, None), ("mixtral", 1024, SWAP16)])
def test_gather_matches_permuted_gemm_gpu(model, T, config):
    E, H, I, k = GPU_SHAPES[model]
    (q13, s13, _, _), x, _, ids = _case(T, E, H, I, k, "cuda", seed=T)
    if config is None:
        config = str(gather_config(E, 2 * I, H, T * k, "cuda"))
    _check_gemm(x, ids, E, q13, s13, config)


@pytest.mark.gpu
@pytest.mark.parametrize("model,T", [("qwen3_30b", 2048), ("dsv3_tp8", 2048)])
def test_forward_gather_eager_and_graph_gpu(model, T, monkeypatch):
    """moe_forward with the gather path, eagerly and as a CUDA-graph replay on new tokens: the chain's bytes."""
    E, H, I, k = GPU_SHAPES[model]
    layer, x, tw, ids = _case(T, E, H, I, k, "cuda", seed=T)
    q13, s13, q2, s2 = layer
    x2 = torch.randn_like(x)
    with torch.no_grad():
        ref = _forward(x, layer, tw, ids, "0", monkeypatch)
        ref2 = _forward(x2, layer, tw, ids, "0", monkeypatch)
        for _ in range(3):  # plain path, recording, first replay of the forward's launch plan
            assert_bitwise_equal(_forward(x, layer, tw, ids, "1", monkeypatch), ref, "eager")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=s):
                gout = _forward(x, layer, tw, ids, "1", monkeypatch)
        torch.cuda.current_stream().wait_stream(s)
        x.copy_(x2)
        graph.replay()
        torch.cuda.synchronize()
    assert_bitwise_equal(gout, ref2, "graph replay")


def test_forward_path_order(device, monkeypatch):
    """``forward_path`` names the way an inference call goes, in the forward's order: decode (within its bound),
    routed, gather, else the chain; stages asked for always take the chain."""
    from fp8_deep.moe.forward import DECODE_ENV, forward_path
    E, H, I = 4, 128, 128
    x = torch.randn(6, H, device=device, dtype=torch.bfloat16)
    gemm = select_grouped_gemm("triton", device=device, rows_per_expert=1, hidden=H, inter=I)
    for var in (DECODE_ENV, ROUTED_ENV, GATHER_ENV):
        monkeypatch.setenv(var, "1")
    assert forward_path(12, E, H, I, x, gemm) == "decode"
    assert forward_path(12, E, H, I, x, gemm, return_stages=True) == "chain"
    assert forward_path(200, E, H, I, x, gemm) == "routed"  # past the decode bound
    monkeypatch.setenv(ROUTED_ENV, "0")
    assert forward_path(200, E, H, I, x, gemm) == "gather"
    monkeypatch.setenv(GATHER_ENV, "0")
    assert forward_path(200, E, H, I, x, gemm) == "chain"
