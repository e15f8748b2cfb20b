"""moe_combine against reference.moe_combine: bit-exact (same float32 sequence, j ascending)."""
import pytest
import torch

from fp8_deep import reference
from fp8_deep.ops.combine import moe_combine
from fp8_deep.ops.routing import align_routing
from fp8_deep.testing import assert_bitwise_equal


def _inputs(T, k, E, H, device, w_dtype=torch.float32, x_dtype=torch.bfloat16, drop=False):
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int()
    emap = None
    if drop:
        emap = torch.arange(E, dtype=torch.int32)
        emap[E // 2:] = -1
    plan = align_routing(ids.to(device), E if emap is None else E // 2,
                         expert_map=None if emap is None else emap.to(device))
    x = torch.randn(plan.num_rows, H, device=device).to(x_dtype)
    w = torch.rand(T, k, device=device).to(w_dtype)
    return x, plan.inv_perm, w


@pytest.mark.parametrize("T,k,E,H", [(1, 8, 16, 256), (33, 2, 5, 200), (16, 6, 6, 1500)])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_combine_matches_reference(device, T, k, E, H, w_dtype):
    x, inv, w = _inputs(T, k, E, H, device, w_dtype)
    out = torch.full((T, H), float("nan"), dtype=torch.bfloat16, device=device)  # poisoned
    got = moe_combine(x, inv, w, out=out)
    assert got is out
    assert_bitwise_equal(got.cpu(), reference.moe_combine(x.cpu(), inv.cpu(), w.cpu()), "combine")


def test_dropped_choices_skipped(device):
    T, k, E, H = 24, 4, 8, 128
    x, inv, w = _inputs(T, k, E, H, device, drop=True)
    assert (inv.cpu() == -1).any()
    x[-1] = float("nan")  # rows never referenced must not leak in
    got = moe_combine(x, inv, w, out_dtype=torch.float32)
    assert got.dtype == torch.float32 and torch.isfinite(got.cpu()).all()
    assert_bitwise_equal(got.cpu(), reference.moe_combine(x.cpu(), inv.cpu(), w.cpu(), torch.float32), "combine")
    all_dropped = (inv.cpu() < 0).all(dim=1)
    assert (got.cpu()[all_dropped] == 0).all()


def test_strided_inputs(device):
    T, k, E, H = 10, 3, 4, 192
    x, inv, w = _inputs(T, k, E, H, device, x_dtype=torch.float16)
    xs = x.t().contiguous().t()
    ws = w.t().contiguous().t()
    out = torch.empty(H, T, dtype=torch.float16, device=device).t()
    got = moe_combine(xs, inv, ws, out=out)
    assert_bitwise_equal(got.cpu().contiguous(), reference.moe_combine(x.cpu(), inv.cpu(), w.cpu()), "combine")


def test_errors(device):
    x, inv, w = _inputs(4, 2, 4, 128, device)
    with pytest.raises(TypeError, match="inv_perm"):
        moe_combine(x, inv.long(), w)
    with pytest.raises(ValueError, match="topk_weights"):
        moe_combine(x, inv, w[:, :1])
    with pytest.raises(ValueError, match="out"):
        moe_combine(x, inv, w, out=torch.empty(3, 128, dtype=x.dtype, device=device))


@pytest.mark.gpu
def test_gpu_deepseek():
    T, k, E, H = 4096, 8, 256, 7168
    x, inv, w = _inputs(T, k, E, H, "cuda")
    got = moe_combine(x, inv, w)
    ref = reference.moe_combine(x, inv, w)
    assert_bitwise_equal(got, ref, "combine vs torch on the GPU")
    assert torch.equal(got, moe_combine(x, inv, w))  # deterministic


def test_out_must_not_overlap_inputs(device):
    """An ``out`` that aliases an input would be overwritten while other programs still read it."""
    T, k, E, H = 8, 2, 4, 128
    x, inv, w = _inputs(T, k, E, H, device, x_dtype=torch.float32)
    with pytest.raises(ValueError, match="(expert_out and out|out and expert_out) share memory"):
        moe_combine(x, inv, w, out=x[:T], out_dtype=torch.float32)
    with pytest.raises(ValueError, match="out has elements that share memory"):
        moe_combine(x, inv, w, out=torch.empty(1, H, device=device).expand(T, H), out_dtype=torch.float32)
