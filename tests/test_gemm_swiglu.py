"""GEMM1 + SwiGLU + 1x128 requantization in one launch (``ops.grouped_gemm.grouped_gemm_swiglu_fp8``).

Spec: the two launches it replaces, ``silu_mul_quantize(grouped_gemm_fp8(...), m_indices=...)``, bit for bit on every
row (padding rows and blocks no expert owns: q = 0, scale 0). CPU runs go through the Triton interpreter; ``-m gpu``
runs decode-sized MoE shapes on a CUDA device.
"""
import dataclasses

import pytest
import torch

from fp8_deep.numerics import BLOCK, FP8_DTYPE, cdiv
from fp8_deep.ops import grouped_gemm as gg
from fp8_deep.ops.swiglu import silu_mul_quantize
from fp8_deep.testing import assert_bitwise_equal

from test_grouped_gemm import _block_expert, make_case

# the fused kernel's tile heights, tile grouping and weight loads (BLOCK_N is the kernel's own: one 128-group of gate
# and of up); swap-AB only (plain-orientation tiles are refused: test_plain_orientation_takes_the_two_launches)
FUSED_CONFIGS = {
    "swap16": "BLOCK_M=16,BLOCK_N=128,GROUP_M=1,SWAP_AB=1,BLOCK_MAP=1,num_warps=4,num_stages=2",
    "swap16tma": "BLOCK_M=16,BLOCK_N=128,GROUP_M=1,SWAP_AB=1,BLOCK_MAP=1,TMA_B=1,num_warps=4,num_stages=3",
    "swap16g2": "BLOCK_M=16,BLOCK_N=64,GROUP_M=2,SWAP_AB=1,BLOCK_MAP=1,num_warps=4,num_stages=2",
}


def _unfused(case, block_map, **kw):
    h = gg.grouped_gemm_fp8(case["a"], case["a_scale"], case["b"], case["b_scale"], case["offsets"], case["counts"],
                            config="BLOCK_M=16,BLOCK_N=64,GROUP_M=1,SWAP_AB=1,num_warps=4,num_stages=2")
    return silu_mul_quantize(h, m_indices=block_map[1], **kw)


def _fused(case, block_map, cfg, monkeypatch, **kw):
    monkeypatch.setenv(gg.FUSED_SWIGLU_ENV, "1")
    monkeypatch.setenv(gg.SWIGLU_CONFIG_ENV, FUSED_CONFIGS[cfg])
    return gg.grouped_gemm_swiglu_fp8(case["a"], case["a_scale"], case["b"], case["b_scale"], case["offsets"],
                                      case["counts"], block_map, **kw)


def _case(counts, I, K, device, extra_rows=32, **kw):
    case = make_case(counts, N=2 * I, K=K, device=device, seg_align=16, scale_layout="tma_aligned",
                     extra_rows=extra_rows)
    return case, (_block_expert(case, 16), case["m_indices"], 16)


@pytest.mark.parametrize("cfg", list(FUSED_CONFIGS), ids=list(FUSED_CONFIGS))
@pytest.mark.parametrize("K", [256, 200], ids=["even_k", "ragged_k"])
def test_fused_equals_two_launches(cfg, K, device, monkeypatch):
    """Every orientation and weight load, even and ragged K: the bytes of GEMM1 then silu_mul_quantize on every row
    (padding rows of a hold NaN: they must not leak into q or the scales)."""
    case, bmap = _case([5, 0, 17, 3, 33], I=256, K=K, device=device)
    q, s = _fused(case, bmap, cfg, monkeypatch)
    rq, rs = _unfused(case, bmap)
    assert q.dtype == FP8_DTYPE and tuple(q.shape) == (case["M"], 256) and s.stride() == rs.stride()
    assert_bitwise_equal(q, rq, "q")
    assert_bitwise_equal(s, rs, "scale")
    assert (q.view(torch.uint8)[case["m_indices"] < 0] == 0).all()


@pytest.mark.parametrize("scale_fmt,layout", [("ue8m0", "row_major"), ("fp32", "row_major")])
def test_fused_scale_options_and_out(scale_fmt, layout, device, monkeypatch):
    """UE8M0 scales, row-major scales and caller-owned outputs, written in place."""
    case, bmap = _case([9, 16, 1], I=128, K=128, device=device, extra_rows=16)
    M = case["M"]
    q = torch.empty((M, 128), dtype=FP8_DTYPE, device=device)
    s = torch.empty((M, 1), dtype=torch.float32, device=device)
    res = _fused(case, bmap, "swap16tma", monkeypatch, scale_fmt=scale_fmt, scale_layout=layout, out=(q, s))
    assert res[0] is q and res[1] is s
    rq, rs = _unfused(case, bmap, scale_fmt=scale_fmt, scale_layout=layout)
    assert_bitwise_equal(q, rq, "q")
    assert_bitwise_equal(s, rs, "scale")


def test_fused_nonfinite_groups(device, monkeypatch):
    """A row whose GEMM output overflows gets the NaN scale and NaN q of silu_mul_quantize in its groups."""
    case, bmap = _case([16, 7], I=128, K=128, device=device, extra_rows=0)
    case["a_scale"][3] = 3e38  # row 3 of expert 0: its products overflow to inf
    q, s = _fused(case, bmap, "swap16", monkeypatch)
    rq, rs = _unfused(case, bmap)
    assert torch.isnan(rs[3]).all()
    assert_bitwise_equal(q, rq, "q")
    assert_bitwise_equal(s, rs, "scale")


def test_fused_choice_and_fallbacks(device, monkeypatch):
    """Where the fused kernel runs: a block-map pick (auto), always (=1), never (=0, unset); I not a multiple of 128 and
    a non-block-map pick take the two launches; every path gives the same bytes. Bad input is refused."""
    case, bmap = _case([4, 12], I=128, K=128, device=device, extra_rows=0)
    args = (case["a"], case["a_scale"], case["b"], case["b_scale"], case["offsets"], case["counts"])
    monkeypatch.delenv(gg.SWIGLU_CONFIG_ENV, raising=False)
    monkeypatch.delenv(gg.FUSED_SWIGLU_ENV, raising=False)
    blockmap_cfg = "BLOCK_M=16,BLOCK_N=64,GROUP_M=1,SWAP_AB=1,BLOCK_MAP=1,num_warps=4,num_stages=2"
    assert gg._fused_swiglu_config(blockmap_cfg, case["a"], case["b"], 128, None, 16) is None  # off unless asked
    monkeypatch.setenv(gg.FUSED_SWIGLU_ENV, "auto")
    blockmap_cfg = "BLOCK_M=16,BLOCK_N=64,GROUP_M=1,SWAP_AB=1,BLOCK_MAP=1,num_warps=4,num_stages=2"
    scan_cfg = "BLOCK_M=16,BLOCK_N=64,GROUP_M=1,SWAP_AB=1,PERSISTENT=1,num_warps=4,num_stages=2"
    I, M = 128, case["M"]
    assert gg._fused_swiglu_config(blockmap_cfg, case["a"], case["b"], I, None, 16).BLOCK_N == BLOCK
    assert gg._fused_swiglu_config(scan_cfg, case["a"], case["b"], I, None, 16) is None
    assert gg._fused_swiglu_config(blockmap_cfg, case["a"], case["b"], 192, None, 16) is None
    monkeypatch.setenv(gg.FUSED_SWIGLU_ENV, "1")
    assert gg._fused_swiglu_config(scan_cfg, case["a"], case["b"], I, None, 16) == dataclasses.replace(
        gg.FUSED_SWIGLU_DEFAULT, num_stages=min(gg.FUSED_SWIGLU_DEFAULT.num_stages, gg.FUSED_SWIGLU_MAX_STAGES))
    monkeypatch.setenv(gg.FUSED_SWIGLU_ENV, "0")
    assert gg._fused_swiglu_config(blockmap_cfg, case["a"], case["b"], I, None, 16) is None
    monkeypatch.setenv(gg.FUSED_SWIGLU_ENV, "yes")
    with pytest.raises(ValueError, match="FP8_DEEP_FUSED_SWIGLU"):
        gg.grouped_gemm_swiglu_fp8(*args, bmap, config=blockmap_cfg)
    monkeypatch.setenv(gg.FUSED_SWIGLU_ENV, "auto")
    outs = [gg.grouped_gemm_swiglu_fp8(*args, bmap, config=c) for c in (blockmap_cfg, scan_cfg)]
    for a, b in zip(*outs):
        assert_bitwise_equal(a, b)
    with pytest.raises(ValueError, match="odd"):
        gg.grouped_gemm_swiglu_fp8(case["a"], case["a_scale"], case["b"][:, :255], case["b_scale"], case["offsets"],
                                   case["counts"], bmap)
    with pytest.raises(TypeError, match="block_map must be"):
        gg.grouped_gemm_swiglu_fp8(*args, bmap[:2])
    with pytest.raises(ValueError, match=r"out\[1\]"):
        gg.grouped_gemm_swiglu_fp8(*args, bmap, out=(torch.empty((M, I), dtype=FP8_DTYPE, device=device),
                                                      torch.empty((M, 2), device=device)))


def test_plain_orientation_takes_the_two_launches(device, monkeypatch):
    """Plain-orientation tiles (on an H100, 16-row ones ran mma.sync and gave other bytes than the two launches):
    ``auto`` runs the two launches for such a pick, ``1`` the fused default tile, a pinned one is refused."""
    case, bmap = _case([4, 12], I=128, K=128, device=device, extra_rows=0)
    args = (case["a"], case["a_scale"], case["b"], case["b_scale"], case["offsets"], case["counts"])
    plain = "BLOCK_M=16,BLOCK_N=64,GROUP_M=1,SWAP_AB=0,BLOCK_MAP=1,num_warps=4,num_stages=2"
    why = gg.mma_sync_refusal(gg.GemmConfig.parse(plain), case["a"])
    if why:  # a Hopper-class GPU refuses such tiles for the GEMM itself (tests/test_grouped_gemm.py)
        pytest.skip(why)
    monkeypatch.delenv(gg.SWIGLU_CONFIG_ENV, raising=False)
    monkeypatch.setenv(gg.FUSED_SWIGLU_ENV, "auto")
    assert gg._fused_swiglu_config(plain, case["a"], case["b"], 128, None, 16) is None
    monkeypatch.setenv(gg.FUSED_SWIGLU_ENV, "1")
    assert gg._fused_swiglu_config(plain, case["a"], case["b"], 128, None, 16).SWAP_AB
    q, s = gg.grouped_gemm_swiglu_fp8(*args, bmap, config=plain)
    rq, rs = _unfused(case, bmap)
    assert_bitwise_equal(q, rq, "q")
    assert_bitwise_equal(s, rs, "scale")
    monkeypatch.setenv(gg.SWIGLU_CONFIG_ENV, plain)
    with pytest.raises(ValueError, match="swap-AB block-map tiles only"):
        gg.grouped_gemm_swiglu_fp8(*args, bmap)


def moe_forward_per_env(env, values, device, monkeypatch):
    """A small MoE forward (triton backend) once per value of the environment switch ``env``; the outputs."""
    import fp8_deep
    torch.manual_seed(0)
    T, H, I, E, k = 6, 256, 128, 4, 2
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    w13 = torch.randn(E, 2 * I, H, device=device, dtype=torch.bfloat16) * 0.05
    w2 = torch.randn(E, H, I, device=device, dtype=torch.bfloat16) * 0.05
    tw, ids = torch.topk(torch.softmax(torch.randn(T, E, device=device), -1), k)
    outs = []
    for value in values:
        monkeypatch.setenv(env, value)
        outs.append(fp8_deep.moe_forward(x, w13, w2, tw, ids.int(), backend="triton"))
    return outs


def test_moe_forward_fused_and_unfused_same_bytes(device, monkeypatch):
    """The MoE forward with the fused GEMM1 (forced) and without it: the same output bytes."""
    fused, unfused = moe_forward_per_env(gg.FUSED_SWIGLU_ENV, ("1", "0"), device, monkeypatch)
    assert_bitwise_equal(fused, unfused)


@pytest.mark.gpu
@pytest.mark.parametrize("E,I,H,T", [pytest.param(128, 768, 2048, 1, id="qwen3_t1"),
                                     pytest.param(128, 768, 2048, 16, id="qwen3_t16"),
                                     pytest.param(256, 256, 7168, 16, id="tp8_t16"),
                                     pytest.param(32, 2048, 7168, 64, id="ep8_t64")])
def test_fused_equals_two_launches_gpu(E, I, H, T, monkeypatch):
    """Decode-sized MoE shapes on the GPU, every fused tile variant: the bytes of the two launches, with GEMM1 run on
    the same tiles (orientation, height, weight loads) and on the card's default tiles (the MoE's unfused path)."""
    from fp8_deep.ops import align_routing, permute_rows, quantize_activation
    dev = "cuda"
    ids = torch.stack([torch.randperm(E, device=dev)[:8] for _ in range(T)]).int()
    plan = align_routing(ids, E, block_size=gg.TritonGroupedGemm.row_alignment)
    qx, sx = quantize_activation(torch.randn(T, H, device=dev, dtype=torch.bfloat16))
    a, sa = permute_rows(qx, sx, plan, scale_layout="tma_aligned")
    qb = (torch.randn(E, 2 * I, H, device=dev) * 0.1).to(FP8_DTYPE)
    sb = torch.rand(E, cdiv(2 * I, BLOCK), cdiv(H, BLOCK), device=dev) + 0.01
    bmap = (plan.expert_ids, plan.m_indices, plan.block_size)
    args = (a, sa, qb, sb, plan.expert_offsets, plan.expert_counts)
    monkeypatch.setenv(gg.FUSED_SWIGLU_ENV, "1")
    default = silu_mul_quantize(gg.grouped_gemm_fp8(*args), m_indices=plan.m_indices)
    failures = []
    for name, spec in FUSED_CONFIGS.items():
        same_tiles = spec.replace("BLOCK_N=64", "BLOCK_N=128")
        rq, rs = silu_mul_quantize(gg.grouped_gemm_fp8(*args, config=same_tiles, block_map=bmap),
                                   m_indices=plan.m_indices)
        monkeypatch.setenv(gg.SWIGLU_CONFIG_ENV, spec)
        q, s = gg.grouped_gemm_swiglu_fp8(*args, bmap)
        for what, (eq, es) in (("same tiles", (rq, rs)), ("default tiles", default)):
            bad_q = (q.view(torch.uint8) != eq.view(torch.uint8)).sum().item()
            bad_s = (s.view(torch.int32) != es.view(torch.int32)).sum().item()
            if bad_q or bad_s:
                failures.append(f"{name} vs {what}: {bad_q} q bytes, {bad_s} scales differ")
    assert not failures, failures
