"""The vLLM adapter: argument mapping and output handling against a fake ``vllm`` (always), and the real vLLM
against ours on CUDA (when installed)."""
import sys
import types

import pytest
import torch

from fp8_deep import reference
from fp8_deep.integrations import vllm as V
from fp8_deep.numerics import FP8_DTYPE, align
from fp8_deep.ops import _registry
from fp8_deep.ops import routing as R
from fp8_deep.testing import assert_bitwise_equal

QUANT_MOD = "vllm.model_executor.layers.quantization.utils.fp8_utils"
ALIGN_MOD = "vllm.model_executor.layers.fused_moe.moe_align_block_size"


def _fake_quant(calls, with_tma=True):
    """vLLM's documented contract of per_token_group_quant_fp8, implemented with fp8_deep.reference."""

    def per_token_group_quant_fp8(x, group_size, eps=1e-10, dtype=None, column_major_scales=False,
                                  tma_aligned_scales=False, out_q=None, use_ue8m0=None):
        calls.append(dict(group_size=group_size, eps=eps, dtype=dtype, column_major_scales=column_major_scales,
                          tma_aligned_scales=tma_aligned_scales, out_q=out_q, use_ue8m0=use_ue8m0))
        assert x.shape[-1] % group_size == 0 and x.stride(-1) == 1
        q, s = reference.quantize_activation(x, group_size, "ue8m0" if use_ue8m0 else "fp32", eps)
        if column_major_scales:
            M, G = s.shape
            m_pad = align(M, 4) if tma_aligned_scales else M
            buf = torch.empty(G * m_pad, dtype=torch.float32).as_strided((M, G), (1, m_pad))
            buf.copy_(s)
            s = buf
        if out_q is not None:
            out_q.copy_(q)
            q = out_q
        return q, s

    if not with_tma:
        def old(x, group_size, eps=1e-10, dtype=None, column_major_scales=False, out_q=None, use_ue8m0=None):
            return per_token_group_quant_fp8(x, group_size, eps, dtype, column_major_scales, False, out_q, use_ue8m0)
        return old
    return per_token_group_quant_fp8


def _fake_align(calls):
    def moe_align_block_size(topk_ids, block_size, num_experts, expert_map=None, pad_sorted_ids=False,
                             ignore_invalid_experts=False):
        calls.append(dict(block_size=block_size, num_experts=num_experts, expert_map=expert_map,
                          pad_sorted_ids=pad_sorted_ids, ignore_invalid_experts=ignore_invalid_experts))
        if expert_map is not None:
            assert ignore_invalid_experts
            n_local = int((expert_map >= 0).sum())
            s, e, n = reference.moe_align_block_size(topk_ids, block_size, n_local, expert_map)
        else:
            s, e, n = reference.moe_align_block_size(topk_ids, block_size, num_experts)
        # vLLM orders rows inside an expert by atomics: reverse them to prove we do not depend on the order
        s = s.clone()
        ntpp = int(n[0])
        numel = topk_ids.numel()
        seg_start = 0
        while seg_start < ntpp:
            ex = int(e[seg_start // block_size])
            end = seg_start
            while end < ntpp and int(e[end // block_size]) == ex:
                end += block_size
            seg = s[seg_start:end]
            real = seg[seg < numel]
            s[seg_start:seg_start + real.numel()] = real.flip(0)
            seg_start = end
        return s, e, n
    return moe_align_block_size


@pytest.fixture
def fake_vllm(monkeypatch):
    calls = {"quant": [], "align": []}
    names = ["vllm", "vllm.model_executor", "vllm.model_executor.layers", "vllm.model_executor.layers.quantization",
             "vllm.model_executor.layers.quantization.utils", QUANT_MOD, "vllm.model_executor.layers.fused_moe",
             ALIGN_MOD, "vllm._custom_ops"]
    mods = {n: types.ModuleType(n) for n in names}
    mods[QUANT_MOD].per_token_group_quant_fp8 = _fake_quant(calls["quant"])
    mods[ALIGN_MOD].moe_align_block_size = _fake_align(calls["align"])
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    V.register()  # drop cached loaders
    yield mods, calls
    V.register()


def test_registered_and_missing_vllm_hint(monkeypatch):
    V.register()
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    monkeypatch.setitem(sys.modules, QUANT_MOD, None)
    monkeypatch.setitem(sys.modules, ALIGN_MOD, None)
    monkeypatch.setitem(sys.modules, "vllm._custom_ops", None)
    with pytest.raises(ImportError, match="pip install vllm"):
        _registry.load("activation_quant", "vllm")
    with pytest.raises(ImportError, match="pip install vllm"):
        _registry.load("moe_align", "vllm")
    V.register()


@pytest.mark.parametrize("layout", ["row_major", "tma_aligned"])
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_activation_quant_mapping(fake_vllm, layout, scale_fmt):
    _, calls = fake_vllm
    fn = _registry.load("activation_quant", "vllm")
    M, K = 6, 256
    x = torch.randn(M, K).to(torch.bfloat16)
    out_q = torch.empty(M, K, dtype=FP8_DTYPE)
    q, s = fn(x, group_size=128, scale_fmt=scale_fmt, scale_layout=layout, eps=1e-10, out_q=out_q)
    c = calls["quant"][-1]
    assert c["group_size"] == 128 and c["eps"] == 1e-10 and c["dtype"] == FP8_DTYPE and c["out_q"] is out_q
    assert c["use_ue8m0"] is (scale_fmt == "ue8m0")
    assert c["column_major_scales"] is (layout == "tma_aligned")
    assert c["tma_aligned_scales"] is (layout == "tma_aligned")
    assert q is out_q
    assert s.stride() == ((2, 1) if layout == "row_major" else (1, align(M, 4)))
    rq, rs = reference.quantize_activation(x, 128, scale_fmt)
    assert_bitwise_equal(q.view(torch.uint8), rq.view(torch.uint8), "q")
    assert_bitwise_equal(s.contiguous(), rs, "scale")


def test_activation_quant_old_vllm_without_tma(fake_vllm):
    mods, calls = fake_vllm
    mods[QUANT_MOD].per_token_group_quant_fp8 = _fake_quant(calls["quant"], with_tma=False)
    V.register()
    fn = _registry.load("activation_quant", "vllm")
    x = torch.randn(7, 128).to(torch.bfloat16)  # M % 4 != 0: column-major must be re-laid out
    q, s = fn(x, group_size=128, scale_fmt="fp32", scale_layout="tma_aligned", eps=1e-10, out_q=None)
    assert "tma_aligned_scales" not in calls["quant"][-1] or calls["quant"][-1]["tma_aligned_scales"] is False
    assert s.stride() == (1, 8)
    assert_bitwise_equal(s.contiguous(), reference.quantize_activation(x)[1], "scale")


def test_activation_quant_out_scale_and_errors(fake_vllm):
    fn = _registry.load("activation_quant", "vllm")
    x = torch.randn(4, 256).to(torch.bfloat16)
    out_s = torch.full((4, 2), float("nan"))
    q, s = fn(x, group_size=128, scale_fmt="fp32", scale_layout="row_major", eps=1e-10, out_q=None, out_scale=out_s)
    assert s is out_s
    assert_bitwise_equal(s, reference.quantize_activation(x)[1], "scale")
    with pytest.raises(ValueError, match="group_size"):
        fn(torch.randn(4, 192).to(torch.bfloat16), group_size=128, scale_fmt="fp32", scale_layout="row_major",
           eps=1e-10, out_q=None)


def test_moe_align_mapping_and_plan(fake_vllm, device):
    _, calls = fake_vllm
    T, k, E = 50, 4, 12
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int().to(device)
    plan_v = R.align_routing(ids, E, backend="vllm")
    c = calls["align"][-1]
    assert c["block_size"] == 128 and c["num_experts"] == E and c["expert_map"] is None
    assert c["pad_sorted_ids"] is True
    plan_t = R.align_routing(ids, E, backend="triton")
    # same rows per expert (vLLM's order inside an expert differs), same derived fields
    for f in ("expert_ids", "num_tokens_post_padded", "expert_offsets", "expert_counts"):
        assert torch.equal(getattr(plan_v, f).cpu(), getattr(plan_t, f).cpu()), f
    assert torch.equal(plan_v.m_indices.cpu(), plan_t.m_indices.cpu())
    sid = plan_v.sorted_token_ids.cpu().long()
    inv = plan_v.inv_perm.cpu().flatten().long()
    assert torch.equal(sid[inv], torch.arange(T * k))
    assert not torch.equal(plan_v.sorted_token_ids.cpu(), plan_t.sorted_token_ids.cpu())  # the fake reorders


def test_moe_align_expert_map(fake_vllm, device):
    _, calls = fake_vllm
    G_E, E, T, k = 16, 8, 30, 4
    emap = torch.full((G_E,), -1, dtype=torch.int32)
    emap[::2] = torch.arange(E, dtype=torch.int32)
    ids = torch.stack([torch.randperm(G_E)[:k] for _ in range(T)]).int()
    plan_v = R.align_routing(ids.to(device), E, expert_map=emap.to(device), backend="vllm")
    c = calls["align"][-1]
    assert c["num_experts"] == G_E and c["ignore_invalid_experts"] is True and c["expert_map"] is not None
    plan_t = R.align_routing(ids.to(device), E, expert_map=emap.to(device), backend="triton")
    for f in ("expert_ids", "num_tokens_post_padded", "m_indices", "expert_offsets", "expert_counts"):
        assert torch.equal(getattr(plan_v, f).cpu(), getattr(plan_t, f).cpu()), f
    assert torch.equal(plan_v.inv_perm.cpu() < 0, plan_t.inv_perm.cpu() < 0)


def test_moe_align_old_vllm_refuses_expert_map(fake_vllm):
    mods, _ = fake_vllm

    def old(topk_ids, block_size, num_experts, expert_map=None, pad_sorted_ids=False):
        raise AssertionError("must not be called")
    mods[ALIGN_MOD].moe_align_block_size = old
    V.register()
    fn = _registry.load("moe_align", "vllm")
    with pytest.raises(ValueError, match="ignore_invalid_experts"):
        fn(torch.zeros(2, 2, dtype=torch.int32), 128, 4, torch.zeros(8, dtype=torch.int32))


def test_is_available_is_cheap():
    assert isinstance(V.is_available(), bool)


# ----------------------------------------------------------------------------------------------------------------------
# the real vLLM
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_real_vllm_matches_ours():
    pytest.importorskip("vllm", reason="vllm not installed")
    V.register()
    from fp8_deep.ops.quant import quantize_activation
    x = torch.randn(512, 7168, device="cuda").to(torch.bfloat16)
    x[0] = 0  # padding rows: UE8M0 scale 2^-33, vLLM's CUDA floor at 1e-10
    x[1] = x[1] * 1e-9  # amax / 448 below the floor: q follows the floored scale
    x[2] = x[2] * 1e-6  # just above it
    x[3] = x[3] * 1e30
    for fmt in ("fp32", "ue8m0"):
        qv, sv = quantize_activation(x, scale_fmt=fmt, scale_layout="tma_aligned", backend="vllm")
        qt, st = quantize_activation(x, scale_fmt=fmt, scale_layout="tma_aligned", backend="triton")
        assert sv.stride() == st.stride()
        assert_bitwise_equal(sv.contiguous(), st.contiguous(), f"scale {fmt}")
        assert_bitwise_equal(qv.view(torch.uint8), qt.view(torch.uint8), f"q {fmt}")
    ids = torch.stack([torch.randperm(256)[:8] for _ in range(1024)]).int().cuda()
    pv = R.align_routing(ids, 256, backend="vllm")
    pt = R.align_routing(ids, 256, backend="triton")
    for f in ("expert_ids", "num_tokens_post_padded", "m_indices", "expert_offsets", "expert_counts"):
        assert torch.equal(getattr(pv, f), getattr(pt, f)), f
