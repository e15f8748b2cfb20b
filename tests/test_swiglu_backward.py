"""The training pair of the fused SwiGLU: ``silu_mul_quantize(save_input=True)`` (the FP8 cache of h) and
``silu_mul_backward_quantize`` (SwiGLU recomputed from it, the backward GEMMs' FP8 operands).

The cache's inputs are h's own values: bit-exact against ``reference.quantize_gate_up`` everywhere. The backward's
float math has one function that is not IEEE-specified, the exp of the sigmoid. So it is compared twice:

* bit for bit against the reference composition evaluated with the kernel's own sigmoid (``_mirror``: numpy's float32
  exp under the interpreter, torch's CUDA sigmoid -- libdevice ``expf`` and an IEEE division, as the kernel -- on the
  GPU); the mirror itself is first checked bit for bit against ``silu_mul_backward_quantize_ref`` with torch's sigmoid;
* against ``silu_mul_backward_quantize_ref`` (torch's sigmoid) with one FP8 step of tolerance per dequantized element
  and at least 99% of the q bytes equal.
"""
import numpy as np
import pytest
import torch

from fp8_deep import reference
from fp8_deep.numerics import FP8_DTYPE, align, cdiv
from fp8_deep.ops.layout import alloc_scales, scale_strides
from fp8_deep.ops.swiglu import (silu_mul_backward_quantize, silu_mul_backward_quantize_ref, silu_mul_quantize)
from fp8_deep.testing import assert_bitwise_equal

NAMES = ("q_dh", "s_dh", "q_dh_t", "s_dh_t", "q_wa_t", "s_wa_t", "grad_row_weights")


# ------------------------------------------------------------------------------------------------ helpers
def _plan_rows(M, E, device, seed=0):
    """m_indices of a routing plan: 128-row expert segments, each with a ragged number of real rows (the rest -1),
    and one whole segment of padding (an empty expert's worth)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.full((M,), -1, dtype=torch.int32)
    for seg in range(M // 128):
        if seg == 1:
            continue  # all padding
        n = int(torch.randint(1, 129, (1,), generator=g))
        m[seg * 128: seg * 128 + n] = seg % E
    return m.to(device)


def _cache(M, I, device, dtype=torch.bfloat16, scale_fmt="fp32", m=None):
    h = (torch.randn(M, 2 * I) * 3).to(dtype).to(device)
    q_h, s_h = reference.quantize_gate_up(h, scale_fmt=scale_fmt)
    if m is not None:  # padding rows of the cache: whatever memory held (NaN here): never read
        pad = m < 0
        q_h.view(torch.uint8)[pad] = 0x7F
        s_h[pad] = float("nan")
    return q_h.to(device), s_h.to(device)


def _grads(M, I, device, m=None, dtype=torch.bfloat16):
    ga = (torch.randn(M, I) * 0.5).to(dtype).to(device)
    rw = torch.rand(M, device=device)
    if m is not None:
        ga[m < 0] = float("nan")
        rw[m < 0] = float("nan")
    return ga, rw


def _kernel_sigmoid(x):
    """The sigmoid the kernel computes on x's device: ``1 / (1 + exp(-x))`` with numpy's float32 exp (the
    interpreter's ``tl.exp``) on the CPU, torch's CUDA sigmoid (libdevice ``expf``, IEEE division) on the GPU."""
    if x.is_cuda:
        return torch.sigmoid(x)
    e = torch.from_numpy(np.exp(-x.numpy()))
    return 1.0 / (1.0 + e)


def _mirror(q_h, s_h, ga, rw, m=None, group_size=128, scale_fmt="fp32", eps=1e-10, sigmoid=torch.sigmoid):
    """``silu_mul_backward_quantize_ref`` with ``reference.silu_mul_backward``'s formula written out and the
    sigmoid passed in (same operations, same order)."""
    I = q_h.shape[1] // 2
    h_c = reference.dequantize_gate_up(q_h, s_h, group_size)
    g, w = ga.float(), rw.float()
    if m is not None:
        live = m >= 0
        h_c = torch.where(live[:, None], h_c, torch.zeros_like(h_c))
        g = torch.where(live[:, None], g, torch.zeros_like(g))
        w = torch.where(live, w, torch.zeros_like(w))
    gt, up = h_c[:, :I], h_c[:, I:]
    sig = sigmoid(gt)
    silu = gt * sig
    wg = w[:, None] * g
    dh = torch.cat([wg * up * (sig * (1 + gt * (1 - sig))), wg * silu], -1)
    a = silu * up
    return (*reference.quantize_activation(dh, group_size, scale_fmt, eps),
            *reference.quantize_activation_t(dh, None, group_size, scale_fmt, eps),
            *reference.quantize_activation_t(w[:, None] * a, None, group_size, scale_fmt, eps),
            (g * a).sum(-1))


def _check_layouts(out, M, I, group_size=128, dh_layout="tma_aligned", t_layout="tma_aligned"):
    G2, GM = cdiv(2 * I, group_size), cdiv(M, group_size)
    expect = [((M, 2 * I), (2 * I, 1)), ((M, G2), scale_strides((M, G2), dh_layout)),
              ((2 * I, M), (M, 1)), ((2 * I, GM), scale_strides((2 * I, GM), t_layout)),
              ((I, M), (M, 1)), ((I, GM), scale_strides((I, GM), t_layout)), ((M,), (1,))]
    for t, (shape, strides), name in zip(out, expect, NAMES):
        assert tuple(t.shape) == shape, f"{name}: shape {tuple(t.shape)} != {shape}"
        assert tuple(t.stride()) == tuple(strides), f"{name}: strides {t.stride()} != {strides}"
        assert t.dtype == (torch.float32 if name.startswith(("s_", "grad")) else FP8_DTYPE), name
    if t_layout == "tma_aligned":
        assert out[3].stride() == (1, align(2 * I, 4))


def _grw_close(grw, ref_grw, ga, m=None):
    # a sum of I float32 products in another order: error bounded by ~I ulps of sum |g * a|
    grw, ref_grw = grw.cpu(), ref_grw.cpu()
    tol = 1e-4 * ga.float().abs().nan_to_num(0).sum(-1).cpu() + 1e-6
    nan = torch.isnan(ref_grw)
    assert torch.equal(torch.isnan(grw), nan), "grad_row_weights: NaN rows differ"
    assert ((grw - ref_grw).abs() <= tol)[~nan].all()
    if m is not None:
        assert (grw.cpu()[m.cpu() < 0] == 0).all()


def _assert_exact(out, ref, ga, m=None):
    for t, r, name in zip(out[:6], ref[:6], NAMES):
        t, r = t.cpu().contiguous(), r.cpu().contiguous()
        if t.dtype == FP8_DTYPE:
            assert_bitwise_equal(t.view(torch.uint8), r.view(torch.uint8), name)
        else:
            assert_bitwise_equal(t, r, name)
    _grw_close(out[6], ref[6], ga, m)


def _fp8_step(q):
    """One FP8 E4M3 step at each value of q (float32): 2^(e - 3) for |q| in [2^e, 2^(e+1)), 2^-9 below 2^-6."""
    a = q.abs().clamp(min=2.0 ** -6)
    return torch.exp2(torch.floor(torch.log2(a)) - 3)


def _deq_t(q, s, group_size=128):
    # (C, M) transposed q with (C, ceil(M/g)) scales: per row of q, groups along M
    return reference.dequantize_activation(q.float(), s.float(), group_size)


def _assert_close(out, ref, ga, m=None, min_equal=0.99):
    """Each dequantized element within one FP8 step of the reference's (at the larger of the two scales, plus what
    a differing scale moves), and at least ``min_equal`` of the q bytes equal."""
    for qi, si in ((0, 1), (2, 3), (4, 5)):
        q, s, rq, rs = (out[qi].cpu(), out[si].cpu().contiguous(), ref[qi].cpu(), ref[si].cpu().contiguous())
        eq = (q.view(torch.uint8) == rq.view(torch.uint8)).float().mean().item()
        assert eq >= min_equal, f"{NAMES[qi]}: only {eq:.4%} of bytes equal"
        d, rd = _deq_t(q, s), _deq_t(rq, rs)
        fin = torch.isfinite(rd)
        assert torch.equal(fin, torch.isfinite(d)), f"{NAMES[qi]}: non-finite elements differ"
        s_full = s.repeat_interleave(128, -1)[:, :q.shape[1]]
        rs_full = rs.repeat_interleave(128, -1)[:, :q.shape[1]]
        tol = 1.001 * _fp8_step(rq.float()) * torch.maximum(s_full, rs_full) + (s_full - rs_full).abs() * \
            rq.float().abs()
        bad = ((d - rd).abs() > tol) & fin
        assert not bad.any(), f"{NAMES[qi]}: {int(bad.sum())} elements beyond one FP8 step"
    _grw_close(out[6], ref[6], ga, m)


def _poisoned_out(M, I, device, dh_layout="tma_aligned", t_layout="tma_aligned"):
    G2, GM = cdiv(2 * I, 128), cdiv(M, 128)

    def fp8(shape):
        return torch.full(shape, 0x7F, dtype=torch.uint8, device=device).view(FP8_DTYPE)

    def sc(shape, layout):
        return torch.empty_strided(shape, scale_strides(shape, layout), device=device).fill_(float("nan"))

    return (fp8((M, 2 * I)), sc((M, G2), dh_layout), fp8((2 * I, M)), sc((2 * I, GM), t_layout),
            fp8((I, M)), sc((I, GM), t_layout), torch.full((M,), float("nan"), device=device))


# ------------------------------------------------------------------------------------------------ forward: the cache
@pytest.mark.parametrize("I", [128, 192])  # one group per half / a ragged last group
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_save_input_is_quantize_gate_up(device, I, scale_fmt):
    M = 256
    m = _plan_rows(M, 3, device)
    h = (torch.randn(M, 2 * I) * 3).bfloat16().to(device)
    h[3, 7] = 1e-30  # tiny
    h[m < 0] = float("nan")  # padding: never read
    q0, s0 = silu_mul_quantize(h, m_indices=m, scale_fmt=scale_fmt)
    q, s, q_h, s_h = silu_mul_quantize(h, m_indices=m, scale_fmt=scale_fmt, save_input=True)
    # the SwiGLU outputs are those of save_input=False
    assert_bitwise_equal(q.view(torch.uint8), q0.view(torch.uint8), "q")
    assert_bitwise_equal(s, s0, "scale")
    assert q_h.shape == (M, 2 * I) and q_h.stride() == (2 * I, 1) and q_h.dtype == FP8_DTYPE
    G = cdiv(I, 128)
    assert s_h.shape == (M, 2 * G) and s_h.stride() == (2 * G, 1) and s_h.dtype == torch.float32
    live = (m >= 0).cpu()
    rq, rs = reference.quantize_gate_up(h.cpu()[live], scale_fmt=scale_fmt)
    assert_bitwise_equal(q_h.cpu()[live].view(torch.uint8), rq.view(torch.uint8), "q_h")
    assert_bitwise_equal(s_h.cpu()[live], rs, "s_h")
    assert (q_h.cpu()[~live].view(torch.uint8) == 0).all() and (s_h.cpu()[~live] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_save_input_out_buffers_and_edge_values(device, dtype):
    M, I = 12, 256
    h = torch.randn(M, 2 * I).to(dtype)
    h[0] = 0                       # all-zero groups: the eps rule
    h[1, I + 3] = float("nan")     # up NaN: up's group 0 of row 1 -> scale NaN, q all NaN
    h[2, 200] = -float("inf")      # gate -Inf: gate's group 1 of row 2
    h[3, :I] = 60000.0 if dtype == torch.float16 else 3e4
    h = h.to(device)
    big = torch.randn(M, 2 * I + 64, device=device).to(dtype)
    big[:, 32:32 + 2 * I] = h
    hs = big[:, 32:32 + 2 * I]  # strided input
    outs = (torch.full((M, I), 0x7F, dtype=torch.uint8, device=device).view(FP8_DTYPE),
            alloc_scales((M, 2), "tma_aligned", device).fill_(float("nan")),
            torch.full((M, 2 * I), 0x7F, dtype=torch.uint8, device=device).view(FP8_DTYPE),
            torch.full((M, 4), float("nan"), device=device))
    res = silu_mul_quantize(hs, save_input=True, out=outs)
    assert all(a is b for a, b in zip(res, outs))
    rq, rs = reference.quantize_gate_up(h.cpu())
    assert_bitwise_equal(res[2].cpu().view(torch.uint8), rq.view(torch.uint8), "q_h")
    assert_bitwise_equal(res[3].cpu(), rs, "s_h")
    s_h = res[3].cpu()
    assert torch.isnan(s_h[1, 2]) and torch.isnan(s_h[2, 1]) and not torch.isnan(s_h[1, 0])


def test_save_input_errors(device):
    h = torch.randn(4, 256, device=device).bfloat16()
    with pytest.raises(ValueError, match="4 tensors"):
        silu_mul_quantize(h, save_input=True, out=silu_mul_quantize(h))
    q, s, qh, sh = silu_mul_quantize(h, save_input=True)
    with pytest.raises(ValueError, match="out\\[3\\]"):
        silu_mul_quantize(h, save_input=True, out=(q, s, qh, sh.t().contiguous().t()[:, :2]))
    buf = torch.empty(16, device=device)
    with pytest.raises(ValueError, match="share memory"):  # s_h over the SwiGLU output's scales
        silu_mul_quantize(h, save_input=True, out=(q, buf.as_strided((4, 1), (1, 4)), qh, buf[:8].view(4, 2)))
    with pytest.raises(TypeError, match="save_input"):
        silu_mul_quantize(h, save_input=1)


# ------------------------------------------------------------------------------------------------ backward
def test_mirror_is_the_reference():
    """The tests' written-out composition equals silu_mul_backward_quantize_ref bit for bit (same sigmoid)."""
    M, I = 256, 192
    m = _plan_rows(M, 2, "cpu")
    q_h, s_h = _cache(M, I, "cpu", m=m)
    ga, rw = _grads(M, I, "cpu", m=m)
    ref = silu_mul_backward_quantize_ref(q_h, s_h, ga, rw, m)
    mir = _mirror(q_h, s_h, ga, rw, m)
    for a, b, name in zip(mir, ref, NAMES):
        if a.dtype == FP8_DTYPE:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert_bitwise_equal(a, b, name)


@pytest.mark.parametrize("I", [128, 192])  # aligned halves / dh groups straddling gate and up
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
@pytest.mark.parametrize("layouts", [("tma_aligned", "tma_aligned"), ("row_major", "row_major")])
def test_backward_matches_reference(device, I, scale_fmt, layouts):
    M = 256
    m = _plan_rows(M, 3, device)
    q_h, s_h = _cache(M, I, device, scale_fmt=scale_fmt, m=m)
    ga, rw = _grads(M, I, device, m=m)
    out = silu_mul_backward_quantize(q_h, s_h, ga, rw, m_indices=m, scale_fmt=scale_fmt,
                                     dh_scale_layout=layouts[0], t_scale_layout=layouts[1])
    _check_layouts(out, M, I, 128, *layouts)
    _assert_exact(out, _mirror(q_h, s_h, ga, rw, m, scale_fmt=scale_fmt, sigmoid=_kernel_sigmoid), ga, m)
    _assert_close(out, silu_mul_backward_quantize_ref(q_h, s_h, ga, rw, m, scale_fmt=scale_fmt), ga, m)
    # padding rows: dh = 0 and w * a = 0 (q 0, the eps rule's scale in dh's row groups)
    pad = (m < 0).cpu()
    assert (out[0].cpu()[pad].view(torch.uint8) == 0).all()
    assert (out[2].cpu()[:, pad].view(torch.uint8) == 0).all() and (out[4].cpu()[:, pad].view(torch.uint8) == 0).all()


def test_backward_fp16_no_plan_group64_ragged_tail(device):
    """float16 grad_a, no m_indices, group_size 64 (I = 160: 160 % 64 != 0), M not a multiple of the group (the
    last column groups cover 72 rows), strided inputs."""
    M, I, gs = 200, 160, 64
    h = (torch.randn(M, 2 * I) * 2).half()
    q_h, s_h = reference.quantize_gate_up(h, gs)
    big = torch.zeros(M, 2 * I + 32, dtype=torch.uint8)
    big[:, 16:16 + 2 * I] = q_h.view(torch.uint8)
    q_hs = big.view(FP8_DTYPE)[:, 16:16 + 2 * I].to(device)
    ga_big = (torch.randn(I, M) * 0.5).half().to(device)
    ga = ga_big.t()  # column-major grad_a
    rw = torch.rand(2 * M, device=device)[::2]  # strided row weights
    s_h = s_h.to(device)
    out = silu_mul_backward_quantize(q_hs, s_h, ga, rw, group_size=gs, t_scale_layout="row_major")
    _check_layouts(out, M, I, gs, "tma_aligned", "row_major")
    _assert_exact(out, _mirror(q_hs, s_h, ga, rw, None, gs, sigmoid=_kernel_sigmoid), ga)


def test_backward_out_buffers_edge_values_determinism(device):
    """Caller-owned (poisoned) outputs, a NaN group in the cache (its dh groups and column groups become NaN), an
    all-zero row (eps scales), a huge gradient; two runs give the same bits (grad_row_weights included)."""
    M, I = 256, 128
    m = _plan_rows(M, 2, device, seed=1)
    q_h, s_h = _cache(M, I, device, m=m)
    ga, rw = _grads(M, I, device, m=m)
    live = torch.nonzero(m >= 0).flatten().cpu()
    r_nan, r_zero, r_big = (int(v) for v in live[:3])
    s_h[r_nan, 1] = float("nan")      # up's group of one live row
    q_h.view(torch.uint8)[r_zero] = 0
    ga[r_big, :5] = 3e4
    out = _poisoned_out(M, I, device)
    res = silu_mul_backward_quantize(q_h, s_h, ga, rw, m_indices=m, out=out)
    assert all(a is b for a, b in zip(res, out))
    ref = _mirror(q_h, s_h, ga, rw, m, sigmoid=_kernel_sigmoid)
    _assert_exact(res, ref, ga, m)
    s_dh = res[1].cpu()
    # up NaN: dgate (grad * up * ...) NaN, dup (grad * silu(gate)) finite; w * a NaN in the column groups
    assert torch.isnan(s_dh[r_nan, 0]) and not torch.isnan(s_dh[r_nan, 1])
    assert torch.isnan(res[5].cpu()[:, r_nan // 128]).all()
    assert (s_dh[r_zero] == 1e-10 / 448).all() or torch.equal(s_dh[r_zero], ref[1][r_zero])
    again = silu_mul_backward_quantize(q_h, s_h, ga, rw, m_indices=m)
    for a, b, name in zip(res, again, NAMES):
        a, b = a.cpu(), b.cpu()
        if a.dtype == FP8_DTYPE:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert_bitwise_equal(a.contiguous(), b.contiguous(), name)


def test_cpu_reference_path(monkeypatch):
    """Without the interpreter, CPU tensors take the pure-torch composition, in the same layouts."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    M, I = 256, 192
    m = _plan_rows(M, 2, "cpu")
    q_h, s_h = _cache(M, I, "cpu", m=m)
    ga, rw = _grads(M, I, "cpu", m=m)
    out = silu_mul_backward_quantize(q_h, s_h, ga, rw, m_indices=m)
    _check_layouts(out, M, I)
    ref = silu_mul_backward_quantize_ref(q_h, s_h, ga, rw, m)
    for a, b, name in zip(out, ref, NAMES):
        if a.dtype == FP8_DTYPE:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert_bitwise_equal(a.contiguous(), b, name)
    h = torch.randn(M, 2 * I).bfloat16()
    h[m < 0] = float("nan")
    _, _, q_hh, s_hh = silu_mul_quantize(h, m_indices=m, save_input=True)
    rq, rs = reference.quantize_gate_up(h[m >= 0])
    assert_bitwise_equal(q_hh[m >= 0].view(torch.uint8), rq.view(torch.uint8), "q_h")
    assert_bitwise_equal(s_hh[m >= 0], rs, "s_h")
    assert (s_hh[m < 0] == 0).all()


def test_backward_errors(device):
    M, I = 128, 128
    q_h, s_h = _cache(M, I, device)
    ga, rw = _grads(M, I, device)
    with pytest.raises(TypeError, match="q_h"):
        silu_mul_backward_quantize(q_h.view(torch.uint8), s_h, ga, rw)
    with pytest.raises(TypeError, match="grad_a"):
        silu_mul_backward_quantize(q_h, s_h, ga.float(), rw)
    with pytest.raises(TypeError, match="row_weights"):
        silu_mul_backward_quantize(q_h, s_h, ga, rw.bfloat16())
    with pytest.raises(ValueError, match="s_h must have shape"):
        silu_mul_backward_quantize(q_h, s_h[:, :1], ga, rw)
    with pytest.raises(ValueError, match="grad_a must have shape"):
        silu_mul_backward_quantize(q_h, s_h, ga[:, :64], rw)
    with pytest.raises(ValueError, match="row_weights must have"):
        silu_mul_backward_quantize(q_h, s_h, ga, rw[:10])
    with pytest.raises(ValueError, match="odd"):
        silu_mul_backward_quantize(q_h[:, :255], s_h, ga, rw)
    with pytest.raises(ValueError, match="group_size"):
        silu_mul_backward_quantize(q_h, s_h, ga, rw, group_size=256)
    with pytest.raises(ValueError, match="t_scale_layout"):
        silu_mul_backward_quantize(q_h, s_h, ga, rw, t_scale_layout="col")
    with pytest.raises(ValueError, match="m_indices"):
        silu_mul_backward_quantize(q_h, s_h, ga, rw, m_indices=torch.zeros(3, dtype=torch.int32, device=device))
    out = list(_poisoned_out(M, I, device))
    with pytest.raises(ValueError, match="7 tensors"):
        silu_mul_backward_quantize(q_h, s_h, ga, rw, out=tuple(out[:6]))
    bad = list(out)
    bad[3] = torch.empty(tuple(bad[3].shape), device=device)  # row-major where TMA-aligned is asked for
    with pytest.raises(ValueError, match=r"out\[3\] \(s_dh_t\) must have strides"):
        silu_mul_backward_quantize(q_h, s_h, ga, rw, out=tuple(bad))
    bad = list(out)
    bad[0] = q_h  # the output over the input
    with pytest.raises(ValueError, match="share memory"):
        silu_mul_backward_quantize(q_h, s_h, ga, rw, out=tuple(bad))


# ------------------------------------------------------------------------------------------------ GPU, real shapes
@pytest.mark.gpu
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
@pytest.mark.parametrize("I", [2048, 1344])  # DeepSeek-V3's expert width; a ragged one (1344 % 128 = 64)
def test_gpu_forward_backward(scale_fmt, I):
    M = 16384 if I == 2048 else 4096
    m = _plan_rows(M, 32, "cuda")
    h = (torch.randn(M, 2 * I, device="cuda") * 2).bfloat16()
    h[m < 0] = float("nan")
    q, s, q_h, s_h = silu_mul_quantize(h, m_indices=m, scale_fmt=scale_fmt, save_input=True)
    live = m >= 0
    rq, rs = reference.quantize_gate_up(h[live], scale_fmt=scale_fmt)
    assert_bitwise_equal(q_h[live].view(torch.uint8), rq.view(torch.uint8), "q_h")
    assert_bitwise_equal(s_h[live], rs, "s_h")
    ga, rw = _grads(M, I, "cuda", m=m)
    out = silu_mul_backward_quantize(q_h, s_h, ga, rw, m_indices=m, scale_fmt=scale_fmt)
    _check_layouts(out, M, I)
    # the reference evaluated on the GPU (torch's CUDA sigmoid: libdevice expf + IEEE division, as the kernel)
    ref = silu_mul_backward_quantize_ref(q_h, s_h, ga, rw, m, scale_fmt=scale_fmt)
    _assert_exact(out, ref, ga, m)
