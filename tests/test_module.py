"""FP8MoE: routing, FP8 weight cache (invalidated by optimizer steps), FP8-only loading, errors."""
import pytest
import torch

import fp8_deep
from fp8_deep import FP8MoE, ops, reference
from fp8_deep.testing import calc_diff


def _module(device, **kw):
    torch.manual_seed(0)
    return FP8MoE(4, 256, 128, 2, device=device, backend="triton", **kw)


def test_forward_matches_moe_forward(device):
    m = _module(device)
    x = torch.randn(6, 256, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        y = m(x)
        w, ids = m.route(x)
        expect = fp8_deep.moe_forward(x, m.w13, m.w2, w, ids, backend="triton")
        bf16 = reference.moe_forward_bf16(x, m.w13, m.w2, w, ids)
    assert torch.equal(y, expect)
    assert calc_diff(y, bf16) < 1e-2
    torch.testing.assert_close(w.sum(-1), torch.ones(6, device=device))


def test_cache_reused_and_invalidated_by_optimizer_step(device):
    m = _module(device)
    x = torch.randn(4, 256, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        y0 = m(x)
        m(x)
    assert m.fp8_requantizations == 1  # second call reused the cached FP8 weights
    opt = torch.optim.SGD([m.w13, m.w2], lr=0.5)
    m.w13.grad = torch.randn_like(m.w13)
    m.w2.grad = torch.randn_like(m.w2)
    opt.step()  # in-place update: bumps the version counters
    with torch.no_grad():
        y1 = m(x)
    assert m.fp8_requantizations == 2
    assert not torch.equal(y0, y1)
    with torch.no_grad():
        w, ids = m.route(x)
        fresh = fp8_deep.moe_forward(x, m.w13, m.w2, w, ids, backend="triton")
    assert torch.equal(y1, fresh)  # the cache holds the *new* weights' quantization
    m.w2.data = m.w2.data.clone()  # reassignment: new data pointer
    with torch.no_grad():
        m(x)
    assert m.fp8_requantizations == 3
    m.invalidate_fp8_cache()
    with torch.no_grad():
        m(x)
    assert m.fp8_requantizations == 4


def test_from_fp8_checkpoint(device):
    m = _module(device)
    q13, s13 = ops.quantize_weight_blockwise(m.w13.detach())
    q2, s2 = ops.quantize_weight_blockwise(m.w2.detach())
    served = FP8MoE.from_fp8(q13, s13, q2, s2, m.gate.weight.detach(), top_k=2, backend="triton")
    x = torch.randn(5, 256, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(served(x), m(x))
    assert served.w13 is None and "w13_fp8" in served.state_dict()
    with pytest.raises(ValueError, match=r"w2_scale must have shape"):
        _module(device).load_fp8_(q13, s13, q2, s2[:, :1])



def test_constructor_checks():
    with pytest.raises(ValueError, match="top_k must be in"):
        FP8MoE(4, 256, 128, 5)
    with pytest.raises(ValueError, match="backend must be one of"):
        FP8MoE(4, 256, 128, 2, backend="cublas")
