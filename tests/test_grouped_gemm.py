"""FP8 block-scaled grouped GEMM: elementwise against the FP8-emulated reference, globally against BF16.

CPU runs go through the Triton interpreter with small shapes (each config family pinned); ``-m gpu`` runs
DeepSeek-V3 shapes (GEMM1 N=4096 K=7168, GEMM2 N=7168 K=2048) on a CUDA device.
"""
import dataclasses

import pytest
import torch

from fp8_deep import reference
from fp8_deep.numerics import BLOCK, FP8_DTYPE, align, cdiv
from fp8_deep.ops import grouped_gemm as gg
from fp8_deep.ops.grouped_gemm import (EXPERIMENTAL_CONFIGS, GLUON_CONFIGS, LARGE_M_CONFIGS, MEDIUM_M_CONFIGS,
                                       SMALL_M_CONFIGS, GemmConfig, TritonGroupedGemm, grouped_gemm_fp8, pick_config)
from fp8_deep.ops.plan import RoutingPlan
from fp8_deep.testing import assert_bitwise_equal, calc_diff, is_poison, poisoned

# One config of each family, small enough for the interpreter: swap-AB (tokens on the MMA's narrow side), plain,
# split-M (two half-height dots), and BLOCK_N=256 (two weight-scale blocks per tile: the vector scale path); persistent
# (8 programs on the CPU, so the tile loop runs several tiles) and one-program-per-tile grids.
CPU_CONFIGS = {
    "swap16x64": "BLOCK_M=16,BLOCK_N=64,GROUP_M=1,SWAP_AB=1,PERSISTENT=1,num_warps=4,num_stages=2",
    "swap32x128": "BLOCK_M=32,BLOCK_N=128,GROUP_M=1,SWAP_AB=1,PERSISTENT=1,num_warps=4,num_stages=2",
    "plain32x128": "BLOCK_M=32,BLOCK_N=128,GROUP_M=2,SWAP_AB=0,num_warps=4,num_stages=2",
    "plain16x256": "BLOCK_M=16,BLOCK_N=256,GROUP_M=4,SWAP_AB=0,PERSISTENT=1,num_warps=8,num_stages=2",
    "swap16x256": "BLOCK_M=16,BLOCK_N=256,GROUP_M=1,SWAP_AB=1,num_warps=8,num_stages=2",
    "split32x64": "BLOCK_M=32,BLOCK_N=64,GROUP_M=2,SPLIT_M=1,PERSISTENT=1,num_warps=4,num_stages=2",
    "split64x256": "BLOCK_M=64,BLOCK_N=256,GROUP_M=1,SPLIT_M=1,num_warps=8,num_stages=2",
    # the experimental TMA-descriptor kernel: plain and split-M tiles, with and without the warp-specialized loop
    "tma32x64": "BLOCK_M=32,BLOCK_N=64,GROUP_M=2,TMA=1,num_warps=4,num_stages=2",
    # the picked 65-1023-rows config itself (TMA + warp-specialized loop), on ragged N and K
    "tma128x128ws": str(MEDIUM_M_CONFIGS[0]),
    # the accumulation options: float32 partial sums every 32 of K, and FP16 dots on the converted FP8 tiles
    "swap16x128acc32": "BLOCK_M=16,BLOCK_N=128,GROUP_M=1,SWAP_AB=1,ACC_K=32,num_warps=4,num_stages=2",
    "plain32x64upcast": "BLOCK_M=32,BLOCK_N=64,GROUP_M=2,UPCAST=1,num_warps=4,num_stages=2",
}


def tma_aligned(s: torch.Tensor) -> torch.Tensor:
    """The same scales, MN-major with the row count padded to 4 (DeepGEMM's LHS layout): strides (1, align(M, 4))."""
    M, G = s.shape
    t = torch.empty_strided((M, G), (1, align(M, 4)), dtype=s.dtype, device=s.device)
    t.copy_(s)
    return t


def make_case(counts, N, K, device, seg_align=BLOCK, scale_layout="row_major", extra_rows=0):
    """Quantized inputs with one ``seg_align``-aligned segment per expert (as the MoE lays them out).

    Padding rows of ``a`` hold NaN-valued FP8 and NaN scales: a kernel that let them leak into valid rows, or
    stored them, fails. Returns a dict with the FP8 operands, offsets/counts, ``m_indices`` and the float inputs.
    """
    E = len(counts)
    offsets, row = [], 0
    for c in counts:
        offsets.append(row)
        row += align(c, seg_align) if seg_align > 1 else c
    M = max(row + extra_rows, 1)
    x = torch.randn(M, K, device=device)
    w = torch.randn(E, N, K, device=device) * 0.05
    qa, sa = reference.quantize_activation(x)
    qb, sb = reference.quantize_weight_blockwise(w)
    m_indices = torch.full((M,), -1, dtype=torch.int32, device=device)
    for e, (o, c) in enumerate(zip(offsets, counts)):
        m_indices[o:o + c] = e
    pad = m_indices < 0
    qa.view(torch.uint8)[pad] = 0x7F  # E4M3FN NaN
    sa[pad] = float("nan")
    if scale_layout == "tma_aligned":
        sa = tma_aligned(sa)
    return dict(a=qa, a_scale=sa, b=qb, b_scale=sb,
                offsets=torch.tensor(offsets, dtype=torch.int32, device=device),
                counts=torch.tensor(counts, dtype=torch.int32, device=device),
                m_indices=m_indices, x=x, w=w, M=M, N=N, K=K)


# NaN with a payload no arithmetic produces (the GPU and the CPU make the canonical 0x7FC0): padding rows computed
# from NaN inputs and stored by mistake would still be NaN, but not this NaN.
def _assert_config_errors(table):
    """Each ``(spec, message)``: ``GemmConfig.parse(spec)`` raises ValueError matching the message."""
    for spec, match in table:
        with pytest.raises(ValueError, match=match):
            GemmConfig.parse(spec)


def skip_refused(cfg, a):
    """Skip a plain-orientation tile under 64 rows on a Hopper-class GPU: refused there (``mma_sync_refusal``; its
    own test is test_small_plain_tiles_refused_on_hopper_gpu)."""
    why = gg.mma_sync_refusal(GemmConfig.parse(cfg) if isinstance(cfg, str) else cfg, a)
    if why:
        pytest.skip(why)


def run(case, poison=True, **kw):
    if kw.get("config") is not None:
        skip_refused(kw["config"], case["a"])
    out = poisoned((case["M"], case["N"]), torch.bfloat16, case["a"].device) if poison else None
    return grouped_gemm_fp8(case["a"], case["a_scale"], case["b"], case["b_scale"], case["offsets"], case["counts"],
                            out=out, **kw)


def check(case, out, bf16_bar=True):
    """Valid rows: elementwise vs the FP8-emulated reference (bf16 rounding + summation-order budget) and
    ``calc_diff`` vs the BF16 product of the unquantized inputs; every other row: still the NaN poison."""
    valid = case["m_indices"] >= 0
    ref = reference.grouped_gemm_fp8(case["a"], case["a_scale"].contiguous(), case["b"], case["b_scale"],
                                     case["m_indices"], out_dtype=torch.float32)
    got = out[valid].float()
    exp = ref[valid]
    assert torch.isfinite(got).all(), "a valid row was not written (poison left) or is non-finite"
    scale = exp.abs().max().item() if exp.numel() else 1.0
    torch.testing.assert_close(got, exp, atol=1e-2 * scale, rtol=1e-2)
    assert is_poison(out[~valid]).all(), "a row outside every expert's valid rows was written"
    if bf16_bar and exp.numel():
        xb = case["x"].bfloat16()
        bf16 = torch.zeros_like(out, dtype=torch.float32)
        for e in range(case["b"].shape[0]):
            rows = (case["m_indices"] == e).nonzero().flatten()
            if rows.numel():
                bf16[rows] = (xb[rows] @ case["w"][e].bfloat16().t()).float()
        assert calc_diff(got, bf16[valid]) < 1e-3


@pytest.mark.parametrize("cfg", list(CPU_CONFIGS), ids=list(CPU_CONFIGS))
def test_ragged_nk_every_config_family(cfg, device):
    # K=192, N=300: ragged K block (64 of 128) and ragged N tile; E=3 (not a power of two) with an empty expert;
    # counts not multiples of any BLOCK_M; more tiles than the CPU grid (8 programs), so the tile loop runs.
    case = make_case([37, 0, 18], N=300, K=192, device=device)
    check(case, run(case, config=CPU_CONFIGS[cfg]))


@pytest.mark.parametrize("cfg", ["swap16x64", "plain32x128", "split32x64"])
def test_tma_aligned_scales_match_row_major_bitwise(cfg, device):
    case = make_case([20, 9], N=128, K=256, device=device)  # K % 128 == 0: the unmasked main loop
    out_rm = run(case, config=CPU_CONFIGS[cfg])
    case_t = dict(case, a_scale=tma_aligned(case["a_scale"]))
    assert case_t["a_scale"].stride() == (1, align(case["M"], 4))
    out_t = run(case_t, config=CPU_CONFIGS[cfg])
    check(case_t, out_t)
    assert_bitwise_equal(out_t, out_rm, "tma-aligned vs row-major a_scale")


@pytest.mark.parametrize("counts", [[0, 0, 0, 70, 0], [70]], ids=["E5", "E1"])
def test_all_rows_on_one_expert_and_determinism(counts, device):
    case = make_case(counts, N=96, K=128, device=device)
    out1 = run(case, config=CPU_CONFIGS["plain32x128"])
    check(case, out1)
    out2 = run(case, config=CPU_CONFIGS["plain32x128"])
    assert_bitwise_equal(out1, out2, "second run")


def test_unaligned_segments_default_config_fresh_out(device):
    # Tightly packed segments (no 128 alignment), a trailing unused row range, no out buffer, default config.
    case = make_case([3, 17, 1, 0, 9, 30], N=64, K=160, device=device, seg_align=1, extra_rows=5)
    out = run(case, poison=False)
    assert out.shape == (case["M"], 64) and out.dtype == torch.bfloat16
    valid = case["m_indices"] >= 0
    out_p = poisoned(out.shape, out.dtype, device)
    out_p[valid] = out[valid]
    check(case, out_p)


def test_strided_out_and_fp32_out(device):
    case = make_case([11, 40], N=128, K=128, device=device)
    buf = poisoned((128, case["M"]), torch.float32, device)
    out = buf.t()  # (M, N) with strides (1, M): the kernel must honour both out strides
    res = grouped_gemm_fp8(case["a"], case["a_scale"], case["b"], case["b_scale"], case["offsets"], case["counts"],
                           out=out, out_dtype=torch.float32, config=CPU_CONFIGS["swap16x64"])
    assert res is out
    valid = case["m_indices"] >= 0
    ref = reference.grouped_gemm_fp8(case["a"], case["a_scale"], case["b"], case["b_scale"], case["m_indices"],
                                     out_dtype=torch.float32)
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-3 * ref.abs().max().item(), rtol=1e-4)
    assert is_poison(out[~valid]).all()


def test_torch_fallback_matches_kernel(monkeypatch, device):
    if device != "cpu":
        pytest.skip("the pure-torch path is the CPU path without the interpreter")
    case = make_case([25, 0, 6], N=300, K=192, device=device)
    kern = run(case, config=CPU_CONFIGS["plain32x128"])
    monkeypatch.setattr(gg, "use_triton", lambda t: False)
    torch_out = run(case)
    check(case, torch_out)
    torch.testing.assert_close(torch_out.float(), kern.float(), atol=0.0, rtol=1e-2, equal_nan=True)


def test_backend_with_routing_plan(device):
    case = make_case([5, 0, 12, 3], N=128, K=128, device=device, scale_layout="tma_aligned")
    E, M = 4, case["M"]
    plan = RoutingPlan(
        sorted_token_ids=torch.zeros(M, dtype=torch.int32, device=device),
        expert_ids=torch.zeros(M // BLOCK, dtype=torch.int32, device=device),
        num_tokens_post_padded=torch.tensor([M], dtype=torch.int32, device=device),
        m_indices=case["m_indices"], inv_perm=torch.zeros(20, 1, dtype=torch.int32, device=device),
        expert_offsets=case["offsets"], expert_counts=case["counts"],
        num_tokens=20, top_k=1, num_experts=E, block_size=BLOCK)
    backend = TritonGroupedGemm()
    assert backend.name == "triton" and backend.a_scale_layout == "tma_aligned"
    out = poisoned((M, 128), torch.bfloat16, device)
    assert backend.gemm(case["a"], case["a_scale"], case["b"], case["b_scale"], plan, out=out) is out
    check(case, out)


def test_peak_rows_per_expert():
    # DeepSeek-V3 routing (E=256, top-8): T=128 -> mean 4, T=512 -> 16, T=2048 -> 64 rows per expert
    assert gg.peak_rows_per_expert(128 * 8, 256) == 10
    assert gg.peak_rows_per_expert(512 * 8, 256) == 28
    assert gg.peak_rows_per_expert(2048 * 8, 256) == 88
    assert gg.peak_rows_per_expert(1, 256) == 1 and gg.peak_rows_per_expert(0, 256) == 1
    assert pick_config(gg.peak_rows_per_expert(512 * 8, 256)).BLOCK_M == 32


def test_tma_config_validation():
    with pytest.raises(ValueError, match="WS needs TMA"):
        GemmConfig(WS=True)
    with pytest.raises(ValueError, match="plain orientation"):
        GemmConfig(BLOCK_M=16, SWAP_AB=True, TMA=True)
    assert GemmConfig.parse("TMA=1,WS=1").WS


@pytest.mark.parametrize("K", [256, 200], ids=["tma", "fallback"])
def test_medium_bucket_tma_and_fallback(K, device, monkeypatch):
    """The picked medium-rows config runs the TMA kernel where the operands suit TMA (16-byte row strides) and the
    pointer kernel's 128x128 tiles where they do not (K=200): same results, never an error."""
    monkeypatch.delenv(gg.CONFIG_ENV, raising=False)
    calls = []
    real = gg._launch_tma
    monkeypatch.setattr(gg, "_launch_tma", lambda *a, **k: (calls.append(1), real(*a, **k)))
    case = make_case([130, 0, 70], N=192, K=K, device=device, scale_layout="tma_aligned")
    check(case, run(case, expected_m=100))
    assert bool(calls) == (K % 16 == 0)
    if K % 16:  # pinned explicitly, the same config is not swapped behind the caller's back: a clear error
        monkeypatch.setenv(gg.CONFIG_ENV, str(MEDIUM_M_CONFIGS[0]))
        with pytest.raises(ValueError, match="TMA=1 needs a"):
            run(case, expected_m=100)


def test_config_heuristic_and_env_pin(monkeypatch):
    monkeypatch.delenv(gg.CONFIG_ENV, raising=False)
    assert pick_config(4).SWAP_AB and pick_config(4).BLOCK_M == 16 and pick_config(4).PERSISTENT
    assert pick_config(12).SWAP_AB and pick_config(12).BLOCK_M == 16 and not pick_config(12).PERSISTENT
    assert pick_config(12, K=7168) == pick_config(12) and not pick_config(12, K=2048).PERSISTENT
    # one or two K blocks per tile: persistent with the flattened loop
    assert pick_config(12, K=256) == SMALL_M_CONFIGS[0] and gg._flatten(pick_config(12, K=256), 256)
    assert pick_config(64).SWAP_AB and pick_config(64).BLOCK_M == 64
    assert pick_config(65) == pick_config(127) == MEDIUM_M_CONFIGS[0] and MEDIUM_M_CONFIGS[0].WS
    assert pick_config(128) == pick_config(4096, K=2048) == GLUON_CONFIGS[1] and GLUON_CONFIGS[1].PERSISTENT
    assert pick_config(128, K=7168) == GLUON_CONFIGS[0] and GLUON_CONFIGS[0].GLUON and GLUON_CONFIGS[0].WS
    assert all(c.SWAP_AB for c in SMALL_M_CONFIGS)
    monkeypatch.setenv(gg.CONFIG_ENV, "BLOCK_M=64,BLOCK_N=128,num_warps=4,num_stages=4,SWAP_AB=1")
    assert pick_config(4096) == GemmConfig(BLOCK_M=64, BLOCK_N=128, SWAP_AB=True, num_warps=4, num_stages=4)
    assert GemmConfig.parse(str(LARGE_M_CONFIGS[2])) == LARGE_M_CONFIGS[2]
    _assert_config_errors([("BLOCK_Q=3", "unknown config key"), ("BLOCK_N=96", "BLOCK_N"),
                           ("SPLIT_M=1,SWAP_AB=1", "SPLIT_M")])


def test_bad_inputs(device):
    case = make_case([4, 4], N=128, K=128, device=device)
    a, sa, b, sb, off, cnt = (case[k] for k in ("a", "a_scale", "b", "b_scale", "offsets", "counts"))
    with pytest.raises(TypeError, match="a must have dtype"):
        grouped_gemm_fp8(a.float(), sa, b, sb, off, cnt)
    with pytest.raises(ValueError, match="b must be"):
        grouped_gemm_fp8(a, sa, b[:, :, :64], sb, off, cnt)
    with pytest.raises(ValueError, match="a_scale must be"):
        grouped_gemm_fp8(a, sa[:, :0], b, sb, off, cnt)
    with pytest.raises(ValueError, match="b_scale must be"):
        grouped_gemm_fp8(a, sa, b, sb[:1], off, cnt)
    with pytest.raises(TypeError, match="expert_counts must have dtype"):
        grouped_gemm_fp8(a, sa, b, sb, off, cnt.long())
    with pytest.raises(ValueError, match="expert_offsets must have one entry per expert"):
        grouped_gemm_fp8(a, sa, b, sb, off[:1], cnt)
    with pytest.raises(ValueError, match="a must have unit stride"):
        grouped_gemm_fp8(torch.empty(128, 256, dtype=FP8_DTYPE, device=device)[:, ::2], sa, b, sb, off, cnt)
    with pytest.raises(ValueError, match="out must have shape"):
        grouped_gemm_fp8(a, sa, b, sb, off, cnt, out=torch.empty(3, 3, dtype=torch.bfloat16, device=device))
    with pytest.raises(TypeError, match="out must have dtype"):
        grouped_gemm_fp8(a, sa, b, sb, off, cnt, out=torch.empty(case["M"], 128, device=device))
    with pytest.raises(TypeError, match="out_dtype"):
        grouped_gemm_fp8(a, sa, b, sb, off, cnt, out_dtype=torch.int32)


# ----------------------------------------------------------------------------------------------------------------------
# GPU: DeepSeek-V3 shapes.
GPU_SHAPES = [(4096, 7168), (7168, 2048)]  # GEMM1 (w13: N=2I, K=H), GEMM2 (w2: N=H, K=I)


@pytest.mark.gpu
@pytest.mark.parametrize("N,K", GPU_SHAPES, ids=["gemm1", "gemm2"])
@pytest.mark.parametrize("E,rows", [(8, 1), (32, 4), (32, 16), (16, 64), (8, 256), (8, 1024)])
def test_deepseek_shapes_gpu(N, K, E, rows, device):
    g = torch.Generator().manual_seed(E * 10007 + rows)
    # Ragged counts around `rows` (some experts empty) with 128-aligned segments, as the MoE produces.
    counts = [0 if i % 5 == 3 else max(1, int(rows * (0.5 + torch.rand(1, generator=g).item()))) for i in range(E)]
    case = make_case(counts, N=N, K=K, device=device, scale_layout="tma_aligned")
    out = run(case, expected_m=rows)
    check(case, out)
    assert_bitwise_equal(run(case, expected_m=rows), out, "second run")


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", list(SMALL_M_CONFIGS) + list(MEDIUM_M_CONFIGS) + list(LARGE_M_CONFIGS)
                         + list(GLUON_CONFIGS) + list(EXPERIMENTAL_CONFIGS), ids=str)
def test_every_config_gpu(cfg, device):
    case = make_case([100, 0, 37, 300, 1], N=7168, K=2048, device=device)
    try:
        out = run(case, config=cfg)
    except Exception as exc:  # noqa: BLE001
        # an experimental config the installed Triton cannot compile is not a product defect (it is never picked);
        # anything else, and every wrong result, still fails
        compile_error = type(exc).__name__ == "CompilationError" or "PassManager" in str(exc)
        if cfg in EXPERIMENTAL_CONFIGS and compile_error:
            pytest.xfail(f"this Triton does not compile experimental config {cfg}: {str(exc).splitlines()[0][:200]}")
        raise
    check(case, out)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [16, 256], ids=["swap16", "tma128"])
def test_accumulation_precision_gpu(rows, device):
    """The tensor cores' in-block FP8 accumulation, measured against float64: the default kernel keeps it (bounded,
    and reproduced by the reference's tensor-core model to float32 rounding), ACC_K=32 tightens it, UPCAST=1 removes
    it (H100: 1.5-3e-4, 5-7e-5 and 3e-7 of the row's magnitude)."""
    case = make_case([rows, rows], N=1024, K=2048, device=device, scale_layout="tma_aligned")
    a, sa, b, sb = case["a"], case["a_scale"], case["b"], case["b_scale"]
    # ACC_K / UPCAST are options of the Triton kernels: the 256-row case pins the TMA tiles (the pick is Gluon there,
    # whose numerics equal the TMA kernel's bit for bit: test_gluon_bitwise_equals_tma_kernel_gpu)
    cfg = pick_config(rows) if rows <= 64 else MEDIUM_M_CONFIGS[0]

    def err(out, ref):
        rows_ = [slice(int(o), int(o) + int(c)) for o, c in zip(case["offsets"], case["counts"])]
        worst = 0.0
        for e, r in enumerate(rows_):
            exact = ref(e, r)
            worst = max(worst, ((out[r].double() - exact).abs() / exact.abs().amax(1, keepdim=True)).max().item())
        return worst

    def exact64(e, r):
        return reference.dequantize_activation(a[r], sa[r].contiguous()).double() @ \
            reference.dequantize_blockwise(b[e], sb[e]).double().t()

    def model(e, r):
        return reference.block_scaled_matmul(a[r], sa[r], b[e], sb[e], "tensor_core").double()

    errs = {}
    for name, extra in (("default", {}), ("acc32", {"ACC_K": 32}), ("upcast", {"UPCAST": True})):
        c = dataclasses.replace(cfg, **extra)
        out = grouped_gemm_fp8(a, sa, b, sb, case["offsets"], case["counts"], out_dtype=torch.float32, config=c)
        errs[name] = err(out, exact64)
        if name == "default":
            assert err(out, model) < 2e-6, "the reference's tensor-core model no longer reproduces the kernel"
    assert errs["default"] < 1e-3, errs
    assert errs["acc32"] < errs["default"], errs
    assert errs["upcast"] < 2e-6, errs


@pytest.mark.gpu
@pytest.mark.parametrize("expected_m", [None, 100, 2048], ids=["default", "medium_tma_ws", "gluon"])
def test_cuda_graph_capture_gpu(expected_m, device):
    case = make_case([30, 0, 200], N=4096, K=512, device=device, scale_layout="tma_aligned")
    out = poisoned((case["M"], case["N"]), torch.bfloat16, device)
    args = (case["a"], case["a_scale"], case["b"], case["b_scale"], case["offsets"], case["counts"])
    grouped_gemm_fp8(*args, out=out, expected_m=expected_m)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grouped_gemm_fp8(*args, out=out, expected_m=expected_m)
    out.copy_(poisoned(out.shape, out.dtype, device))
    graph.replay()
    torch.cuda.synchronize()
    check(case, out)


# ---------------------------------------------------------------------------------------------- Gluon kernel

def test_gluon_config_rules_and_fallback(device, monkeypatch):
    """GLUON=1 is its own kernel: exclusive options and its register budget are checked up front. Picked (>= 128
    rows) where it cannot run (CPU, the interpreter, operands TMA cannot describe) the bucket's portable tiles run
    instead; pinned explicitly there, a clear error."""
    monkeypatch.delenv(gg.CONFIG_ENV, raising=False)
    _assert_config_errors([
        ("GLUON=1,TMA=1", "GLUON is its own kernel"),
        ("GLUON=1,BLOCK_M=32", "BLOCK_M 64 or 128"),
        ("GLUON=1,BLOCK_M=128,BLOCK_N=256,num_warps=8", "more than 192 float32 registers"),
        ("GLUON=1,WS=1,BLOCK_M=128,BLOCK_N=128,num_warps=8", "WS=1 needs BLOCK_M=128"),
        ("GLUON=1,PERSISTENT=1", "PERSISTENT=1 applies to the warp-specialized"),
    ])
    assert all(GemmConfig.parse(str(c)) == c for c in GLUON_CONFIGS)
    assert GemmConfig.parse(str(GLUON_CONFIGS[0])) == GLUON_CONFIGS[0]
    case = make_case([130, 0, 70], N=192, K=200, device=device, scale_layout="tma_aligned")  # K=200: no TMA
    check(case, run(case, expected_m=4096))
    check(case, run(case, expected_m=300))
    with pytest.raises(ValueError, match="GLUON=1"):
        run(case, config=GLUON_CONFIGS[0])
    if device == "cpu":
        case = make_case([130, 0, 70], N=192, K=256, device=device)
        check(case, run(case, expected_m=4096))
        with pytest.raises(ValueError, match="GLUON=1 runs on CUDA GPUs only"):
            run(case, config=GLUON_CONFIGS[0])


@pytest.mark.gpu
@pytest.mark.parametrize("K", [256, 200, 128])
def test_flattened_persistent_loop_bitwise_gpu(K, device):
    """Short-K persistent tiles run with the tile loop flattened into the K loop (loads prefetched across tiles):
    the same bytes as one program per tile with the same tile shape."""
    case = make_case([1, 0, 5, 33, 16, 7], N=7168 // 8, K=K, device=device, scale_layout="tma_aligned")
    for cfg in SMALL_M_CONFIGS:
        if not gg._flatten(cfg, K):
            continue
        single = dataclasses.replace(cfg, PERSISTENT=False)
        out = run(case, config=cfg)
        check(case, out)
        assert_bitwise_equal(out, run(case, config=single), f"{cfg} flattened vs one tile per program")
    assert any(gg._flatten(c, K) for c in SMALL_M_CONFIGS) and not gg._flatten(SMALL_M_CONFIGS[0], 2048)


@pytest.mark.gpu
@pytest.mark.parametrize("N,K", [(4096, 7168), (200, 320), (7168, 2048), (256, 128)],
                         ids=["gemm1", "tails", "gemm2", "one_k_block"])
@pytest.mark.parametrize("scale_layout", ["row_major", "tma_aligned"])
def test_gluon_bitwise_equals_tma_kernel_gpu(N, K, scale_layout, device):
    """The Gluon kernel runs the same per-128-K wgmma chain and promotion order as the Triton TMA kernel: the same
    bytes, for every Gluon config, every output dtype (a strided float16 output too), ragged and empty experts, row
    scales read through the TMA ring (MN-major) or from global memory (row-major, or MN-major at a base TMA cannot
    take)."""
    case = make_case([0, 1, 130, 300, 64], N=N, K=K, device=device, scale_layout=scale_layout)
    tma = "BLOCK_M=128,BLOCK_N=128,GROUP_M=8,TMA=1,WS=0,num_warps=8,num_stages=4"
    for cfg in GLUON_CONFIGS:
        out = run(case, config=cfg)
        check(case, out)
        assert_bitwise_equal(out, run(case, config=tma), f"{cfg} vs the TMA kernel")
    args = (case["a"], case["a_scale"], case["b"], case["b_scale"], case["offsets"], case["counts"])
    if scale_layout == "tma_aligned":
        assert gg._scales_tma_ok(case["a_scale"], case["M"])
        ref = run(case, config=tma)
        # MN-major views with a storage offset: 4 rows in (16-byte aligned, the TMA ring reads them) and 1 row in
        # (4-byte offset: the consumers load them from global memory)
        for skip, tma_ok in ((4, True), (1, False)):
            big = torch.empty_strided((case["M"] + skip, case["a_scale"].shape[1]),
                                      (1, case["a_scale"].stride(1) + 4), dtype=torch.float32, device=device)
            view = big[skip:]
            view.copy_(case["a_scale"])
            assert gg._scales_tma_ok(view, case["M"]) == tma_ok
            out = poisoned((case["M"], N), torch.bfloat16, device)
            grouped_gemm_fp8(case["a"], view, *args[2:], out=out, config=GLUON_CONFIGS[1])
            check(case, out)
            assert_bitwise_equal(out, ref, f"MN-major scales {skip} rows into their buffer vs the TMA kernel")
    for dt in (torch.float32, torch.float16):
        ref = grouped_gemm_fp8(*args, out_dtype=dt, config=tma)
        full = torch.zeros(case["M"], 2 * N, dtype=dt, device=device)
        out = grouped_gemm_fp8(*args, out=full[:, ::2], out_dtype=dt, config=GLUON_CONFIGS[0])
        valid = case["m_indices"] >= 0
        assert_bitwise_equal(out[valid], ref[valid], f"{dt} strided output")
        assert (full[:, 1::2] == 0).all() and (out[~valid] == 0).all()


def test_out_must_not_overlap_operands(device):
    case = make_case([20, 0, 37], 256, 256, device, seg_align=16)
    M, N = case["M"], case["N"]
    args = (case["a"], case["a_scale"], case["b"], case["b_scale"], case["offsets"], case["counts"])
    with pytest.raises(ValueError, match="out has elements that share memory"):
        grouped_gemm_fp8(*args, out=torch.empty(1, N, dtype=torch.bfloat16, device=device).expand(M, N))
    # a bf16 output laid over the FP8 weights
    b_bytes = case["b"].view(torch.uint8).view(-1)
    assert b_bytes.numel() >= 2 * M * N
    with pytest.raises(ValueError, match="(b and out|out and b) share memory"):
        grouped_gemm_fp8(*args, out=b_bytes[:2 * M * N].view(torch.bfloat16).view(M, N))


# ---------------------------------------------------------------------------------------------- block-map tiles
def _block_expert(case, seg_align):
    """The routing plan's per-block expert map of a ``make_case`` layout: each ``seg_align``-row block of an expert's
    aligned segment holds the expert, every other block -1."""
    nblk = case["M"] // seg_align
    be = torch.full((nblk,), -1, dtype=torch.int32)
    for e, (o, c) in enumerate(zip(case["offsets"].tolist(), case["counts"].tolist())):
        be[o // seg_align: (o + align(c, seg_align)) // seg_align] = e
    return be.to(case["a"].device)


BLOCK_MAP_CONFIGS = {
    "swap16x64": "BLOCK_M=16,BLOCK_N=64,GROUP_M=1,SWAP_AB=1,BLOCK_MAP=1,num_warps=4,num_stages=2",
    "plain16x256g4": "BLOCK_M=16,BLOCK_N=256,GROUP_M=4,SWAP_AB=0,BLOCK_MAP=1,num_warps=8,num_stages=2",
    "swap16x128acc32": "BLOCK_M=16,BLOCK_N=128,GROUP_M=1,SWAP_AB=1,ACC_K=32,BLOCK_MAP=1,num_warps=4,num_stages=2",
    # weight tiles through a TMA descriptor (ragged N reads the next expert's rows, ragged K the copy engine's zeros)
    "swap16x64tma": "BLOCK_M=16,BLOCK_N=64,GROUP_M=1,SWAP_AB=1,BLOCK_MAP=1,TMA_B=1,num_warps=4,num_stages=3",
    "plain16x128tma": "BLOCK_M=16,BLOCK_N=128,GROUP_M=2,SWAP_AB=0,BLOCK_MAP=1,TMA_B=1,num_warps=4,num_stages=2",
}


@pytest.mark.parametrize("cfg", list(BLOCK_MAP_CONFIGS), ids=list(BLOCK_MAP_CONFIGS))
@pytest.mark.parametrize("N,K", [(192, 200), (128, 256)], ids=["ragged", "even"])
def test_block_map_tiles_same_bytes(cfg, N, K, device):
    """Tiles found through the plan's block map give the bytes of the same tiles found by scanning the counts, leave
    padding rows and unused blocks untouched, and match the FP8 reference."""
    case = make_case([5, 0, 17, 3, 40], N=N, K=K, device=device, seg_align=16, scale_layout="tma_aligned",
                     extra_rows=48)
    block_map = (_block_expert(case, 16), case["m_indices"], 16)
    spec = BLOCK_MAP_CONFIGS[cfg]
    skip_refused(spec, case["a"])
    args = (case["a"], case["a_scale"], case["b"], case["b_scale"], case["offsets"], case["counts"])
    got = poisoned((case["M"], N), torch.bfloat16, device)
    gg.grouped_gemm_fp8(*args, out=got, config=spec, block_map=block_map)
    ref = poisoned((case["M"], N), torch.bfloat16, device)
    gg.grouped_gemm_fp8(*args, out=ref, config=spec.replace("BLOCK_MAP=1", "BLOCK_MAP=0").replace(",TMA_B=1", ""))
    assert_bitwise_equal(got, ref)
    check(case, got)


def test_block_map_through_the_plan_and_fallbacks(device):
    """The MoE's path (TritonGroupedGemm with a real align_routing plan) and the cases where the map cannot serve:
    no map given, tiles taller than its blocks; bad maps are refused."""
    from fp8_deep.ops import align_routing, permute_rows, quantize_activation
    E, N, K, T, k = 6, 128, 256, 9, 2
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(device)
    ids[ids == 3] = 4  # expert 3 gets no token
    plan = align_routing(ids.int(), E, block_size=16)
    qx, sx = quantize_activation(torch.randn(T, K, device=device))
    a, sa = permute_rows(qx, sx, plan, scale_layout="tma_aligned")
    qb, sb = reference.quantize_weight_blockwise(torch.randn(E, N, K, device=device) * 0.05)
    spec = BLOCK_MAP_CONFIGS["swap16x64"]
    outs = []
    for cfg in (spec, spec.replace("BLOCK_MAP=1", "BLOCK_MAP=0")):
        out = poisoned((plan.num_rows, N), torch.bfloat16, device)
        TritonGroupedGemm(config=cfg).gemm(a, sa, qb, sb, plan, out=out)
        outs.append(out)
    assert_bitwise_equal(outs[0], outs[1])
    valid = plan.m_indices >= 0
    assert not is_poison(outs[0][valid]).any() and is_poison(outs[0][~valid]).all()
    args = (a, sa, qb, sb, plan.expert_offsets, plan.expert_counts)
    bmap = (plan.expert_ids, plan.m_indices, plan.block_size)
    # a TMA_B block-map tile without its map (the H100 table's Qwen3 T=16 GEMM1 tile, called without a plan): the
    # same tiles with pointer weight loads (raised in the fallback on the GPU on 2026-12-08)
    tma_spec = spec if "TMA_B=1" in spec else spec + ",TMA_B=1"
    for cfg, kw in ((spec, {}), (tma_spec, {}), (spec.replace("BLOCK_M=16", "BLOCK_M=32"), dict(block_map=bmap))):
        out = poisoned((plan.num_rows, N), torch.bfloat16, device)
        gg.grouped_gemm_fp8(*args, out=out, config=cfg, **kw)
        assert_bitwise_equal(out[valid], outs[1][valid])
    with pytest.raises(TypeError, match="block_map must be"):
        gg.grouped_gemm_fp8(*args, config=spec, block_map=(plan.expert_ids, plan.m_indices))
    with pytest.raises(ValueError, match="not a multiple of block_map's block_size 64"):
        gg.grouped_gemm_fp8(*args, config=spec, block_map=(plan.expert_ids, plan.m_indices, 64)) \
            if plan.num_rows % 64 else pytest.fail("test needs rows not divisible by 64")
    with pytest.raises(ValueError, match=r"block_map\[0\] must be contiguous"):
        gg.grouped_gemm_fp8(*args, config=spec, block_map=(plan.expert_ids[:-1], plan.m_indices, 16))
    with pytest.raises(TypeError, match=r"block_map\[1\] \(m_indices\) must have dtype"):
        gg.grouped_gemm_fp8(*args, config=spec, block_map=(plan.expert_ids, plan.m_indices.long(), 16))
    with pytest.raises(ValueError, match="BLOCK_MAP is its own"):
        gg.GemmConfig.parse(spec + ",PERSISTENT=1")
    with pytest.raises(ValueError, match="TMA_B is an option of the BLOCK_MAP kernel"):
        gg.GemmConfig.parse(spec.replace("BLOCK_MAP=1", "BLOCK_MAP=0") + ",TMA_B=1")


@pytest.mark.gpu
@pytest.mark.parametrize("N,K", [(1536, 2048), (2048, 768), (512, 7168)],
                         ids=["qwen3_gemm1", "qwen3_gemm2", "tp8_gemm1"])
@pytest.mark.parametrize("E,T", [(128, 1), (128, 16), (256, 64)])
def test_block_map_bitwise_gpu(N, K, E, T):
    """Every BLOCK_MAP variant the tuner may pick, at decode-sized MoE shapes: the bytes of the same tiles without
    the map, padding rows untouched."""
    from fp8_deep.ops import align_routing, permute_rows, quantize_activation
    dev = "cuda"
    ids = torch.stack([torch.randperm(E, device=dev)[:8] for _ in range(T)]).int()
    plan = align_routing(ids, E, block_size=TritonGroupedGemm.row_alignment)
    qx, sx = quantize_activation(torch.randn(T, K, device=dev, dtype=torch.bfloat16))
    a, sa = permute_rows(qx, sx, plan, scale_layout="tma_aligned")
    qb = (torch.randn(E, N, K, device=dev) * 0.1).to(FP8_DTYPE)
    sb = torch.rand(E, cdiv(N, BLOCK), cdiv(K, BLOCK), device=dev) + 0.01
    valid = plan.m_indices >= 0
    cfgs = [dataclasses.replace(c, PERSISTENT=False, BLOCK_MAP=True, TMA_B=tma) for c in SMALL_M_CONFIGS
            if c.BLOCK_M == 16 for tma in (False, True)]
    assert cfgs
    for cfg in cfgs:
        outs = []
        for c in (cfg, dataclasses.replace(cfg, BLOCK_MAP=False, TMA_B=False)):
            out = poisoned((plan.num_rows, N), torch.bfloat16, dev)
            TritonGroupedGemm(config=c).gemm(a, sa, qb, sb, plan, out=out)
            outs.append(out)
        assert_bitwise_equal(outs[0][valid], outs[1][valid], str(cfg))
        assert is_poison(outs[0][~valid]).all()


def test_block_map_ids_past_the_experts_read_nothing(device):
    """A block map naming an expert id >= E (a foreign or corrupt map) leaves that block unwritten instead of reading
    past the weights."""
    case = make_case([16, 16], N=64, K=128, device=device, seg_align=16, extra_rows=16)
    be = _block_expert(case, 16)
    be[1] = 7  # block 1 (expert 1's rows) claims a nonexistent expert
    out = poisoned((case["M"], 64), torch.bfloat16, device)
    gg.grouped_gemm_fp8(case["a"], case["a_scale"], case["b"], case["b_scale"], case["offsets"], case["counts"],
                        out=out, config=BLOCK_MAP_CONFIGS["swap16x64"], block_map=(be, case["m_indices"], 16))
    assert not is_poison(out[:16]).any() and is_poison(out[16:]).all()


@pytest.mark.gpu
def test_orientation_and_tile_height_same_bytes_gpu(device):
    """What the per-card tables rest on: a token's output must not depend on which tiles its batch size picks (RL
    rollouts and the trainer see different batch sizes). Swap-AB tiles of 16-64 rows, plain 64- and 128-row tiles,
    the TMA and Gluon kernels: the same bytes on every valid row (plain tiles under 64 rows are refused on the GPU:
    test_small_plain_tiles_refused_on_hopper_gpu)."""
    case = make_case([40, 0, 17, 64, 3], N=1536, K=2048, device=device, seg_align=16, scale_layout="tma_aligned")
    cfgs = ["BLOCK_M=16,BLOCK_N=128,GROUP_M=1,SWAP_AB=1,num_warps=4,num_stages=3",
            "BLOCK_M=32,BLOCK_N=128,GROUP_M=1,SWAP_AB=1,PERSISTENT=1,num_warps=4,num_stages=5",
            "BLOCK_M=64,BLOCK_N=128,GROUP_M=1,SWAP_AB=1,PERSISTENT=1,num_warps=4,num_stages=4",
            "BLOCK_M=64,BLOCK_N=128,GROUP_M=1,SWAP_AB=0,num_warps=4,num_stages=3",
            "BLOCK_M=128,BLOCK_N=128,GROUP_M=8,num_warps=8,num_stages=4",
            str(MEDIUM_M_CONFIGS[0]), str(GLUON_CONFIGS[0])]
    valid = case["m_indices"] >= 0
    ref = run(case, config=cfgs[0])[valid]
    diffs = {}
    for cfg in cfgs[1:]:
        out = run(case, config=cfg)[valid]
        diffs[cfg] = int((out.view(torch.int16) != ref.view(torch.int16)).sum())
    assert not any(diffs.values()), {c: n for c, n in diffs.items() if n}


@pytest.mark.gpu
def test_small_plain_tiles_refused_on_hopper_gpu(device):
    """Plain-orientation tiles under 64 rows per dot run mma.sync on sm_90 and gave other bytes than every other tile
    (H100, 2026-12-07: 12638 elements of this GEMM): refused there, with the fix named; swap-AB tiles of the same
    height run."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("wgmma-class GPUs only (sm_90+)")
    case = make_case([40, 0, 17, 64, 3], N=1536, K=2048, device=device, seg_align=16, scale_layout="tma_aligned")
    for cfg in ("BLOCK_M=16,BLOCK_N=128,GROUP_M=1,SWAP_AB=0,num_warps=4,num_stages=3",
                "BLOCK_M=64,BLOCK_N=64,GROUP_M=1,SPLIT_M=1,num_warps=4,num_stages=3"):
        with pytest.raises(ValueError, match="mma.sync.*SWAP_AB=1"):
            grouped_gemm_fp8(case["a"], case["a_scale"], case["b"], case["b_scale"], case["offsets"], case["counts"],
                             config=cfg)
    # fewer than one warpgroup: mma.sync in either orientation (sm_90 compile, 2026-12-08)
    with pytest.raises(ValueError, match="mma.sync.*num_warps=4 or 8"):
        grouped_gemm_fp8(case["a"], case["a_scale"], case["b"], case["b_scale"], case["offsets"], case["counts"],
                         config="BLOCK_M=16,BLOCK_N=128,GROUP_M=1,SWAP_AB=1,num_warps=2,num_stages=3")
    grouped_gemm_fp8(case["a"], case["a_scale"], case["b"], case["b_scale"], case["offsets"], case["counts"],
                     config="BLOCK_M=16,BLOCK_N=128,GROUP_M=1,SWAP_AB=1,num_warps=4,num_stages=3")
