"""Quantizer coverage beyond tests/test_quant.py: non-default block and group sizes (bit-exact against
fp8_deep.reference), the transposed pair written in place into poisoned ``out=`` buffers, empty inputs (every returned
shape and dtype), and the activation argument checks test_quant.py does not exercise.

Shapes stay small: on the CPU every kernel runs through the Triton interpreter.
"""
import pytest
import torch

from fp8_deep import ops, reference
from fp8_deep.numerics import FP8_DTYPE, align, cdiv
from fp8_deep.testing import assert_bitwise_equal
from test_quant import _check_weight, _w, _x


def _nan_fp8(shape, device):
    buf = torch.empty(shape, dtype=FP8_DTYPE, device=device)
    buf.view(torch.uint8).fill_(0x7F)  # E4M3 NaN
    return buf


# ---------------------------------------------------------------------------------------------- non-default sizes

# (block_size, shape): every shape leaves a partial edge block in N and in K for its block size
WEIGHT_BLOCK_CASES = [
    ((64, 64), (3, 200, 300)),
    ((128, 64), (130, 270)),
    ((64, 128), (3, 200, 300)),
    ((16, 16), (130, 270)),
    ((32, 256), (3, 200, 300)),
]


@pytest.mark.parametrize("block_size,shape", WEIGHT_BLOCK_CASES,
                         ids=[f"{bn}x{bk}-{'x'.join(map(str, s))}" for (bn, bk), s in WEIGHT_BLOCK_CASES])
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_weight_block_sizes_bit_exact(block_size, shape, scale_fmt, device):
    bn, bk = block_size
    # the transposed copy needs square blocks
    res = _check_weight(_w(shape, torch.bfloat16, device), scale_fmt, with_transpose=bn == bk, block_size=block_size)
    if scale_fmt == "ue8m0":
        assert (torch.frexp(res[1])[0] == 0.5).all()  # powers of two


# x shape per K: ragged (K=100 does not divide by 16, 64 or 256), whole groups (320 by 16 and 64, 512 by all three);
# M = 9 and 5 are not multiples of 4, so the TMA-aligned layout has padding rows
ACT_SHAPES = {320: (9, 320), 100: (2, 5, 100), 512: (9, 512)}


@pytest.mark.parametrize("K", list(ACT_SHAPES))
@pytest.mark.parametrize("group_size", [16, 64, 256])
@pytest.mark.parametrize("scale_layout", ["row_major", "tma_aligned"])
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_activation_group_sizes_bit_exact(K, group_size, scale_layout, scale_fmt, device):
    shape = ACT_SHAPES[K]
    x = _x(shape, torch.bfloat16, device)
    q, s = ops.quantize_activation(x, group_size=group_size, scale_fmt=scale_fmt, scale_layout=scale_layout,
                                   backend="triton")
    rq, rs = reference.quantize_activation(x.cpu(), group_size=group_size, scale_fmt=scale_fmt)
    G = cdiv(K, group_size)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32 and s.shape == (*shape[:-1], G)
    assert_bitwise_equal(q, rq, "q")
    assert_bitwise_equal(s.contiguous(), rs, "scale")  # values only: the layout is checked below
    if scale_layout == "row_major":
        assert s.is_contiguous()
    elif len(shape) == 2:
        assert s.stride() == (1, align(shape[0], 4))
    else:
        M = shape[1]
        assert s.stride() == (align(M, 4) * G, 1, align(M, 4))


# ---------------------------------------------------------------------------------------------- out= in place

@pytest.mark.parametrize("block_size,scale_fmt,dtype", [((128, 128), "fp32", torch.bfloat16),
                                                        ((64, 64), "ue8m0", torch.float32)],
                         ids=["128x128-fp32-bf16", "64x64-ue8m0-fp32"])
def test_weight_transposed_pair_out_in_place(block_size, scale_fmt, dtype, device):
    bn, bk = block_size
    E, N, K = 2, 130, 270
    w = _w((E, N, K), dtype, device)
    nb, kb = cdiv(N, bn), cdiv(K, bk)
    q, qt = _nan_fp8((E, N, K), device), _nan_fp8((E, K, N), device)
    s = torch.full((E, nb, kb), float("nan"), device=device)
    st = torch.full((E, kb, nb), float("nan"), device=device)
    bufs = (q, s, qt, st)
    ptrs = [b.data_ptr() for b in bufs]
    res = ops.quantize_weight_blockwise(w, block_size=block_size, scale_fmt=scale_fmt, with_transpose=True, out=bufs)
    assert len(res) == 4
    assert all(r is b for r, b in zip(res, bufs))
    assert [r.data_ptr() for r in res] == ptrs
    rq, rs = reference.quantize_weight_blockwise(w.cpu(), block_size=block_size, scale_fmt=scale_fmt)
    assert torch.isfinite(rs).all()  # so that a NaN left in a buffer can never match the expected value
    assert_bitwise_equal(q, rq, "q")
    assert_bitwise_equal(s, rs, "scale")
    assert_bitwise_equal(qt, rq.transpose(-1, -2).contiguous(), "q_t")
    assert_bitwise_equal(st, rs.transpose(-1, -2).contiguous(), "scale_t")


# ---------------------------------------------------------------------------------------------- empty inputs

@pytest.mark.parametrize("shape", [(0, 256), (256, 0), (2, 0, 128), (0, 128, 128)], ids=str)
@pytest.mark.parametrize("with_transpose", [False, True])
def test_weight_empty_shapes(shape, with_transpose, device):
    w = torch.empty(shape, dtype=torch.bfloat16, device=device)
    res = ops.quantize_weight_blockwise(w, with_transpose=with_transpose)
    *lead, N, K = shape
    nb, kb = cdiv(N, 128), cdiv(K, 128)
    expect = [((*lead, N, K), FP8_DTYPE), ((*lead, nb, kb), torch.float32)]
    if with_transpose:
        expect += [((*lead, K, N), FP8_DTYPE), ((*lead, kb, nb), torch.float32)]
    assert len(res) == len(expect)
    for i, (t, (eshape, edtype)) in enumerate(zip(res, expect)):
        assert tuple(t.shape) == eshape, (i, tuple(t.shape), eshape)
        assert t.dtype == edtype, (i, t.dtype, edtype)
        assert t.device == w.device


@pytest.mark.parametrize("shape", [(0, 256), (3, 0, 256)], ids=str)
@pytest.mark.parametrize("scale_layout", ["row_major", "tma_aligned"])
def test_activation_empty_shapes(shape, scale_layout, device):
    x = torch.empty(shape, dtype=torch.bfloat16, device=device)
    q, s = ops.quantize_activation(x, scale_layout=scale_layout, backend="triton")
    assert q.shape == shape and q.dtype == FP8_DTYPE
    assert s.shape == (*shape[:-1], 2) and s.dtype == torch.float32
    if scale_layout == "tma_aligned" and len(shape) == 2:
        assert s.shape == (0, 2)


# ---------------------------------------------------------------------------------------------- bad input
# test_quant.py::test_activation_bad_input / test_activation_out_buffers already cover an integer x, a non-unit last
# stride, unknown scale_layout and backend, group_size=100 and out_q / out_scale of the wrong shape; these are the
# rest. Matches name the argument only (messages may be reworded, the argument name stays).

ACT_BAD = [
    ("fp8_x", lambda d: dict(x=torch.randn(4, 256, device=d).to(FP8_DTYPE)), TypeError, r"\bx\b"),
    ("scale_fmt", lambda d: dict(scale_fmt="e8m0"), ValueError, "scale_fmt"),
    ("eps_zero", lambda d: dict(eps=0.0), ValueError, r"\beps\b"),
    ("eps_negative", lambda d: dict(eps=-1.0), ValueError, r"\beps\b"),
    ("out_q_dtype", lambda d: dict(out_q=torch.empty(4, 256, dtype=torch.bfloat16, device=d)), TypeError, "out_q"),
]


@pytest.mark.parametrize("make,exc,match", [c[1:] for c in ACT_BAD], ids=[c[0] for c in ACT_BAD])
def test_activation_bad_input_names_argument(make, exc, match, device):
    kwargs = dict(x=torch.randn(4, 256, device=device))
    kwargs.update(make(device))
    x = kwargs.pop("x")
    with pytest.raises(exc, match=match):
        ops.quantize_activation(x, **kwargs)
