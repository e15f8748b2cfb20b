"""The DeepGEMM grouped-GEMM adapter (fp8_deep.integrations.deep_gemm).

CPU: a fake ``deep_gemm`` module in ``sys.modules`` checks symbol resolution, the argument mapping
(``fn((a, sfa), (b, sfb), out, m_indices)`` positionally), the alignment probe and every validation error.
GPU (``-m gpu``, needs a real DeepGEMM build; bench/gpu_check.sh builds one on the GPU machine): against the
FP8-emulated reference elementwise and against BF16 with DeepGEMM's own bar, ``calc_diff < 1e-3``.
"""
import sys
import types

import pytest
import torch

from fp8_deep import reference
from fp8_deep.integrations import deep_gemm as dg
from fp8_deep.numerics import FP8_DTYPE, align, cdiv
from fp8_deep.ops import _registry
from fp8_deep.ops.plan import RoutingPlan
from fp8_deep.testing import calc_diff


def _tma_aligned(s: torch.Tensor) -> torch.Tensor:
    """(M, G) float32 -> MN-major TMA-aligned copy, strides (1, align(M, 4))."""
    M, G = s.shape
    buf = torch.empty(max(align(M, 4) * G, 1), dtype=torch.float32, device=s.device)
    out = buf.as_strided((M, G), (1, align(M, 4)))
    out.copy_(s)
    return out


def _plan(counts, top_k=1, block=128, device="cpu"):
    """A RoutingPlan with 128-aligned segments for ``counts`` rows per expert (rows are the routed choices,
    one token per row when top_k=1)."""
    E = len(counts)
    offsets, m_idx, pos = [], [], 0
    for e, c in enumerate(counts):
        offsets.append(pos)
        seg = align(c, block)
        m_idx += [e] * c + [-1] * (seg - c)
        pos += seg
    rows = max(pos, block)
    m_idx += [-1] * (rows - len(m_idx))
    numel = sum(counts)
    sorted_ids = torch.full((rows,), numel, dtype=torch.int32)
    m = torch.tensor(m_idx, dtype=torch.int32)
    sorted_ids[m >= 0] = torch.arange(numel, dtype=torch.int32)
    expert_ids = m.view(-1, block)[:, 0].clone()
    return RoutingPlan(
        sorted_token_ids=sorted_ids.to(device), expert_ids=expert_ids.to(device),
        num_tokens_post_padded=torch.tensor([pos], dtype=torch.int32, device=device),
        m_indices=m.to(device), inv_perm=torch.arange(numel, dtype=torch.int32, device=device).view(-1, top_k),
        expert_offsets=torch.tensor(offsets, dtype=torch.int32, device=device),
        expert_counts=torch.tensor(counts, dtype=torch.int32, device=device),
        num_tokens=numel // top_k, top_k=top_k, num_experts=E, block_size=block)


def _operands(counts, N, K, device, scale=1.0):
    plan = _plan(counts, device=device)
    M, E = plan.num_rows, len(counts)
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    w = (torch.randn(E, N, K, device=device) * (scale / K ** 0.5)).to(torch.bfloat16)
    qa, sa = reference.quantize_activation(x)
    qb, sb = reference.quantize_weight_blockwise(w)
    return plan, x, w, qa, _tma_aligned(sa), qb, sb


# ----------------------------------------------------------------------------------------------------------- CPU
class _Recorder:
    def __init__(self, compute=True):
        self.calls = []
        self.compute = compute

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        (a, sa), (b, sb), out, m_indices = args
        if self.compute:
            out.copy_(reference.grouped_gemm_fp8(a, sa, b, sb, m_indices))


def _install_fake(monkeypatch, *, name="m_grouped_fp8_gemm_nt_contiguous", alignment=128, compute=True):
    fake = types.ModuleType("deep_gemm")
    rec = _Recorder(compute)
    rec.__name__ = name
    setattr(fake, name, rec)
    if alignment is not None:
        fake.get_mk_alignment_for_contiguous_layout = lambda: alignment
    fake.__version__ = "0.0-fake"
    monkeypatch.setitem(sys.modules, "deep_gemm", fake)
    dg.register()  # re-registering drops the registry's cached result
    return rec


@pytest.fixture(autouse=True)
def _fresh_registry():
    yield
    _registry._CACHE.pop(("grouped_gemm", "deep_gemm"), None)


def test_argument_mapping_and_result(monkeypatch):
    rec = _install_fake(monkeypatch)
    # segments of 3, 0 (empty expert), 130 and 1 rows: padding inside and between segments
    plan, x, w, qa, sa, qb, sb = _operands([3, 0, 130, 1], N=64, K=256, device="cpu")
    backend = _registry.load("grouped_gemm", "deep_gemm")
    assert backend.name == "deep_gemm" and backend.a_scale_layout == "tma_aligned"
    out = backend.gemm(qa, sa, qb, sb, plan)
    assert len(rec.calls) == 1
    args, kwargs = rec.calls[0]
    assert kwargs == {}, "DeepGEMM is called positionally only (both API generations accept that)"
    assert len(args) == 4
    (a_arg, sa_arg), (b_arg, sb_arg), out_arg, m_arg = args
    assert a_arg is qa and sa_arg is sa and b_arg is qb and sb_arg is sb and m_arg is plan.m_indices
    assert out_arg is out and out.dtype == torch.bfloat16 and out.shape == (plan.num_rows, 64)
    ref = reference.grouped_gemm_fp8(qa, sa, qb, sb, plan.m_indices)
    valid = plan.m_indices >= 0
    torch.testing.assert_close(out[valid], ref[valid], atol=0, rtol=0)
    # caller buffer is written in place and returned
    buf = torch.full((plan.num_rows, 64), float("nan"), dtype=torch.bfloat16)
    assert backend.gemm(qa, sa, qb, sb, plan, out=buf) is buf
    assert rec.calls[-1][0][2] is buf


def test_legacy_name_and_list_alignment(monkeypatch):
    rec = _install_fake(monkeypatch, name="m_grouped_gemm_fp8_fp8_bf16_nt_contiguous", alignment=[128, 128])
    backend = dg.load_backend()
    assert backend.fn_name == "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous"
    plan, x, w, qa, sa, qb, sb = _operands([5, 7], N=128, K=128, device="cpu")
    backend.gemm(qa, sa, qb, sb, plan)
    assert len(rec.calls) == 1
    assert dg.is_available()


def test_alignment_not_128_raises(monkeypatch):
    _install_fake(monkeypatch, alignment=256)
    with pytest.raises(ImportError, match="128"):
        _registry.load("grouped_gemm", "deep_gemm")
    assert not dg.is_available()


def test_missing_module_raises_with_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "deep_gemm", None)  # makes `import deep_gemm` raise ImportError
    dg.register()
    with pytest.raises(ImportError, match="fetch_deepgemm|backend='triton'"):
        _registry.load("grouped_gemm", "deep_gemm")
    assert not dg.is_available()


def test_module_without_gemm_raises(monkeypatch):
    fake = types.ModuleType("deep_gemm")
    fake.get_mk_alignment_for_contiguous_layout = lambda: 128
    monkeypatch.setitem(sys.modules, "deep_gemm", fake)
    with pytest.raises(ImportError, match="m_grouped_fp8_gemm_nt_contiguous"):
        dg.load_backend()


def _bad_cases():
    """(label, mutate(ops) -> ops, exception, message regex)."""
    def row_major_scale(o):
        o["sa"] = o["sa"].contiguous()
        return o

    def k_not_16(o):
        o["qa"] = o["qa"][:, :120].contiguous()
        o["qb"] = o["qb"][:, :, :120].contiguous()
        o["sa"] = _tma_aligned(o["sa"][:, :1].contiguous())
        o["sb"] = o["sb"][:, :, :1].contiguous()
        return o

    def n_not_8(o):
        o["qb"] = o["qb"][:, :60].contiguous()
        return o

    def bf16_scale(o):
        o["sb"] = o["sb"].to(torch.bfloat16)
        return o

    def int64_indices(o):
        o["plan"] = o["plan"]._replace(m_indices=o["plan"].m_indices.long())
        return o

    def wrong_out(o):
        o["out"] = torch.empty(o["plan"].num_rows, 32, dtype=torch.bfloat16)
        return o

    def fp32_out(o):
        o["out"] = torch.empty(o["plan"].num_rows, 64, dtype=torch.float32)
        return o

    def bf16_a(o):
        o["qa"] = o["qa"].to(torch.bfloat16)
        return o

    def b_not_k_major(o):
        o["qb"] = o["qb"].transpose(1, 2).contiguous().transpose(1, 2)
        return o

    def bad_sb_shape(o):
        o["sb"] = o["sb"][:, :, :1].contiguous()
        return o

    return [
        ("row-major a_scale", row_major_scale, ValueError, "TMA-aligned"),
        ("K % 16", k_not_16, ValueError, "K % 16"),
        ("N % 8", n_not_8, ValueError, "N % 8"),
        ("bf16 scales", bf16_scale, TypeError, "float32"),
        ("int64 m_indices", int64_indices, ValueError, "int32"),
        ("out shape", wrong_out, ValueError, "shape"),
        ("out dtype", fp32_out, TypeError, "bfloat16"),
        ("a not fp8", bf16_a, TypeError, "float8"),
        ("b not K-major", b_not_k_major, ValueError, "K-major"),
        ("b_scale shape", bad_sb_shape, ValueError, "b_scale"),
    ]


@pytest.mark.parametrize("label,mutate,exc,msg", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_validation_errors(monkeypatch, label, mutate, exc, msg):
    rec = _install_fake(monkeypatch, compute=False)
    plan, x, w, qa, sa, qb, sb = _operands([3, 200], N=64, K=256, device="cpu")
    o = mutate(dict(plan=plan, qa=qa, sa=sa, qb=qb, sb=sb, out=None))
    backend = dg.load_backend()
    with pytest.raises(exc, match=msg):
        backend.gemm(o["qa"], o["sa"], o["qb"], o["sb"], o["plan"], out=o["out"])
    assert rec.calls == [], "nothing may reach DeepGEMM after a failed check"


def test_rows_must_match_plan(monkeypatch):
    _install_fake(monkeypatch, compute=False)
    plan, x, w, qa, sa, qb, sb = _operands([3, 200], N=64, K=256, device="cpu")
    backend = dg.load_backend()
    with pytest.raises(ValueError, match="num_rows"):
        backend.gemm(qa[:128], _tma_aligned(sa[:128]), qb, sb, plan)


# ----------------------------------------------------------------------------------------------------------- GPU
# Shapes: DeepSeek-V3 GEMM1 (N=4096, K=7168) and GEMM2 (N=7168, K=2048) with uneven segments and an empty
# expert; a small one with ragged N (N=200: not a multiple of 128, but of 8) and a single-row expert.
GPU_CASES = [
    ("dsv3-gemm1", [300, 0, 513, 128, 1, 77, 640, 256], 4096, 7168),
    ("dsv3-gemm2", [300, 0, 513, 128, 1, 77, 640, 256], 7168, 2048),
    ("ragged-N", [1, 129, 5], 200, 512),
]


@pytest.mark.gpu
@pytest.mark.parametrize("label,counts,N,K", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_deep_gemm_matches_reference(label, counts, N, K):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("deep_gemm", reason="deep_gemm not installed (bench/gpu_check.sh builds it when carried)")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("float32-scale DeepGEMM path is SM90 only")
    dg.register()
    backend = _registry.load("grouped_gemm", "deep_gemm")
    plan, x, w, qa, sa, qb, sb = _operands(counts, N=N, K=K, device="cuda")
    out = torch.full((plan.num_rows, N), float("nan"), dtype=torch.bfloat16, device="cuda")  # poisoned
    backend.gemm(qa, sa, qb, sb, plan, out=out)
    torch.cuda.synchronize()
    valid = plan.m_indices >= 0
    got = out[valid].float()
    assert torch.isfinite(got).all(), "some valid rows were not written"
    # elementwise against the FP8-emulated reference (same quantized operands, float32 math, bf16 out)
    emu = reference.grouped_gemm_fp8(qa, sa, qb, sb, plan.m_indices)[valid].float()
    torch.testing.assert_close(got, emu, atol=1e-2, rtol=1e-2)
    # globally against the unquantized BF16 product (DeepGEMM's own bar)
    m = plan.m_indices.long()
    bf16 = torch.empty(plan.num_rows, N, dtype=torch.float32, device="cuda")
    for e in range(len(counts)):
        rows = (m == e).nonzero().flatten()
        if rows.numel():
            bf16[rows] = (x[rows] @ w[e].t()).float()
    diff = calc_diff(got, bf16[valid])
    assert diff < 1e-3, f"calc_diff vs bf16 = {diff:.2e}"
