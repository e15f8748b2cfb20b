"""``ops.align_quantize_permute``: the routing plan and the first GEMM's FP8 operand in one launch (decode sizes).

Spec: ``align_routing(..., backend="triton")`` then ``quantize_permute`` — every field of the plan and the bytes of
q and its scales. CPU runs go through the Triton interpreter; ``-m gpu`` runs decode-sized MoE routings on CUDA.
"""
import pytest
import torch

from fp8_deep.numerics import FP8_DTYPE
from fp8_deep.ops import align_quantize_permute, align_routing, quantize_permute
from fp8_deep.ops.quant import align_quantize_permute_fits
from fp8_deep.testing import assert_bitwise_equal

PLAN_FIELDS = ("sorted_token_ids", "expert_ids", "num_tokens_post_padded", "m_indices", "inv_perm", "expert_offsets",
               "expert_counts")


def _ids(T, k, E, device, gen):
    return torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).int().to(device)


def _check(x, ids, E, expert_map=None, block_size=16, **kw):
    plan, q, s = align_quantize_permute(x, ids, E, expert_map=expert_map, block_size=block_size, **kw)
    rp = align_routing(ids, E, expert_map=expert_map, block_size=block_size, backend="triton")
    rq, rs = quantize_permute(x, rp, **kw)
    for f in PLAN_FIELDS:
        assert_bitwise_equal(getattr(plan, f), getattr(rp, f), f)
    assert (plan.num_tokens, plan.top_k, plan.block_size) == (rp.num_tokens, rp.top_k, rp.block_size)
    assert q.dtype == FP8_DTYPE and s.stride() == rs.stride()
    assert_bitwise_equal(q, rq, "q")
    assert_bitwise_equal(s, rs, "scale")
    return plan


@pytest.mark.parametrize("T,k,E,H,bs", [(1, 8, 128, 256, 16), (16, 8, 128, 384, 16), (3, 2, 4, 200, 16),
                                        (7, 4, 6, 256, 64), (2, 2, 4, 128, 128)],
                         ids=["decode_t1", "t16_e128", "ragged_k", "bs64", "bs128"])
def test_same_plan_and_bytes(T, k, E, H, bs, device):
    gen = torch.Generator().manual_seed(T * 100 + E)
    x = torch.randn(T, H, generator=gen).to(device=device, dtype=torch.bfloat16)
    plan = _check(x, _ids(T, k, E, device, gen), E, block_size=bs)
    assert align_quantize_permute_fits(T * k, bs)
    assert plan.num_rows % bs == 0


def test_expert_map_drops_remote_choices(device):
    """EP: global ids through an expert map; remote and out-of-range choices get no row and inv_perm -1."""
    gen = torch.Generator().manual_seed(1)
    T, k, E = 6, 3, 5
    ids = torch.randint(0, 2 * E, (T, k), generator=gen, dtype=torch.int32)
    ids[0, 0] = 2 * E + 3  # out of range of the map: dropped, no out-of-bounds read
    emap = torch.full((2 * E,), -1, dtype=torch.int32)
    emap[1::2] = torch.arange(E, dtype=torch.int32)
    x = torch.randn(T, 256, generator=gen).to(device=device, dtype=torch.bfloat16)
    plan = _check(x, ids.to(device), E, expert_map=emap.to(device))
    assert int(plan.inv_perm[0, 0]) == -1


@pytest.mark.parametrize("scale_fmt,layout", [("ue8m0", "row_major"), ("fp32", "row_major")])
def test_scale_options(scale_fmt, layout, device):
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 384, generator=gen) * 30).to(device=device, dtype=torch.float16)
    _check(x, _ids(4, 2, 8, device, gen), 8, scale_fmt=scale_fmt, scale_layout=layout)


def test_non_finite_token_and_strided_ids(device):
    """A token holding inf gets quantize_permute's NaN scale in each of its rows; non-contiguous topk_ids."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 256, generator=gen).to(device=device, dtype=torch.bfloat16)
    x[2, 7] = float("inf")
    ids = _ids(5, 4, 8, device, gen).t().contiguous().t()  # strides (1, 5)
    assert ids.stride() != (4, 1)
    _check(x, ids, 8)


def test_many_choices_take_the_two_launches(device):
    """Past the one-launch tile: align_routing + quantize_permute, still the same plan and bytes."""
    assert not align_quantize_permute_fits(1024, 16) and not align_quantize_permute_fits(128, 128)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(40, 128, generator=gen).to(device=device, dtype=torch.bfloat16)
    _check(x, _ids(40, 4, 8, device, gen), 8, block_size=128)


def test_bad_input(device):
    x = torch.randn(4, 256, device=device, dtype=torch.bfloat16)
    ids = torch.zeros(4, 2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="topk_ids has 3"):
        align_quantize_permute(x, ids[:3], 4)
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        align_quantize_permute(x.to(FP8_DTYPE), ids, 4)
    with pytest.raises(ValueError, match="block_size"):
        align_quantize_permute(x, ids, 4, block_size=24)
    with pytest.raises(TypeError):
        align_quantize_permute(x, ids.float(), 4)


def test_moe_forward_with_and_without_the_fused_routing(device, monkeypatch):
    """The MoE forward with the plan out of the quantize launch and with the two launches: the same bytes."""
    from fp8_deep.moe import forward as F
    from test_gemm_swiglu import moe_forward_per_env
    fused, unfused = moe_forward_per_env(F.FUSED_ALIGN_ENV, ("1", "0"), device, monkeypatch)
    assert_bitwise_equal(fused, unfused)
    with pytest.raises(ValueError, match="FP8_DEEP_FUSED_ALIGN_QUANT"):
        moe_forward_per_env(F.FUSED_ALIGN_ENV, ("yes",), device, monkeypatch)
    x = torch.zeros(4, 256, device=device)
    monkeypatch.delenv(F.FUSED_ALIGN_ENV)
    assert not F._fuse_align(8, 16, x, None)  # opt-in: measured no faster on an H100
    monkeypatch.setenv(F.FUSED_ALIGN_ENV, "1")
    assert F._fuse_align(8, 16, x, None) and not F._fuse_align(4096, 16, x, None)


@pytest.mark.gpu
@pytest.mark.parametrize("E,H,T,k", [(128, 2048, 1, 8), (128, 2048, 16, 8), (256, 7168, 16, 8), (8, 4096, 64, 2),
                                     (64, 2048, 32, 6)], ids=["qwen3_t1", "qwen3_t16", "dsv3_t16", "mixtral_t64",
                                                              "v2lite_t32"])
def test_decode_routings_gpu(E, H, T, k):
    dev = "cuda"
    gen = torch.Generator().manual_seed(E + T)
    x = torch.randn(T, H, generator=gen).to(device=dev, dtype=torch.bfloat16)
    _check(x, _ids(T, k, E, dev, gen), E)
