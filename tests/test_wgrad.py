"""FP8 K-grouped GEMM (the MoE weight gradient): elementwise against the reference, globally against BF16.

CPU runs go through the Triton interpreter with tiny shapes (several config families pinned); ``-m gpu`` runs the
DeepSeek-V3 / Qwen3-like wgrad shapes (dW13 P=2I, Q=H; dW2 P=H, Q=I) on a CUDA device.
Every case NaN-poisons the padding columns between segments (FP8 bytes 0x7F, and the scales of blocks that hold
no valid column): a kernel that let them into a sum fails, whatever the config.
"""
import pytest
import torch

from fp8_deep import reference
from fp8_deep.numerics import BLOCK, FP8_DTYPE, align, cdiv
from fp8_deep.ops import wgrad as wg
from fp8_deep.ops.wgrad import WGRAD_CONFIGS, WgradConfig, k_grouped_gemm_fp8, pick_wgrad_config
from fp8_deep.testing import assert_bitwise_equal, calc_diff, is_poison, poisoned

# Small enough for the interpreter: plain one-program-per-tile tiles, persistent (the CPU grid is 2 * 2 programs,
# so the tile loop runs many tiles), TMA descriptors for the full chunks, rectangular tiles, tiles wider than P / Q.
CPU_CONFIGS = {
    "plain32x64": "BLOCK_P=32,BLOCK_Q=64,GROUP_P=2,num_warps=4,num_stages=2",
    "persistent32x32": "BLOCK_P=32,BLOCK_Q=32,GROUP_P=3,PERSISTENT=1,num_warps=4,num_stages=2",
    "tma64x32": "BLOCK_P=64,BLOCK_Q=32,GROUP_P=1,TMA=1,num_warps=4,num_stages=2",
    "wide128x128": "BLOCK_P=128,BLOCK_Q=128,GROUP_P=8,num_warps=8,num_stages=3",
}

def tma_aligned(s: torch.Tensor) -> torch.Tensor:
    """The same scales, MN-major with the row count padded to 4: strides (1, align(P, 4)) (what producers write)."""
    R, G = s.shape
    t = torch.empty_strided((R, G), (1, align(R, 4)), dtype=s.dtype, device=s.device)
    t.copy_(s)
    return t


def make_case(counts, P, Q, device, scale_layout="tma_aligned", extra_cols=0, seg_pad=None):
    """Wgrad operands over 128-aligned segments (the MoE layout): ``x`` ``(M, P)`` and ``y`` ``(M, Q)`` token rows
    quantized in 128x1 tiles (``quantize_activation_t``), so ``out[e] ~= x_e^T y_e``.

    ``seg_pad[e]`` extra 128-row blocks after expert e's segment (default one for the first expert): whole padding
    blocks whose scales are NaN too. Padding columns hold FP8 NaN bytes."""
    E = len(counts)
    seg_pad = seg_pad if seg_pad is not None else [1] + [0] * (E - 1)
    offsets, col = [], 0
    for c, extra in zip(counts, seg_pad):
        offsets.append(col)
        col += align(c, BLOCK) + extra * BLOCK
    M = col + extra_cols
    x = torch.randn(M, P, device=device)
    y = torch.randn(M, Q, device=device) * 0.1
    qa, sa = reference.quantize_activation_t(x)
    qb, sb = reference.quantize_activation_t(y)
    valid = torch.zeros(M, dtype=torch.bool, device=device)
    for o, c in zip(offsets, counts):
        valid[o:o + c] = True
    qa.view(torch.uint8)[:, ~valid] = 0x7F  # E4M3FN NaN
    qb.view(torch.uint8)[:, ~valid] = 0x7F
    block_used = torch.zeros(cdiv(M, BLOCK), dtype=torch.bool, device=device)
    for o, c in zip(offsets, counts):
        block_used[o // BLOCK:cdiv(o + c, BLOCK)] = True
    sa[:, ~block_used] = float("nan")
    sb[:, ~block_used] = float("nan")
    if scale_layout == "tma_aligned":
        sa, sb = tma_aligned(sa), tma_aligned(sb)
    return dict(a_t=qa, a_t_scale=sa, b_t=qb, b_t_scale=sb,
                offsets=torch.tensor(offsets, dtype=torch.int32, device=device),
                counts=torch.tensor(counts, dtype=torch.int32, device=device),
                x=x, y=y, P=P, Q=Q, M=M, E=E)


def args(case):
    return (case["a_t"], case["a_t_scale"], case["b_t"], case["b_t_scale"], case["offsets"], case["counts"])


def ref_of(case):
    return reference.k_grouped_gemm_fp8(case["a_t"], case["a_t_scale"].contiguous(), case["b_t"],
                                        case["b_t_scale"].contiguous(), case["offsets"], case["counts"])


def bf16_product(case):
    """The unquantized product in BF16 (float32 accumulation), per expert: the global bar."""
    out = torch.zeros(case["E"], case["P"], case["Q"], dtype=torch.float32, device=case["x"].device)
    for e, (o, c) in enumerate(zip(case["offsets"].tolist(), case["counts"].tolist())):
        if c:
            out[e] = (case["x"][o:o + c].bfloat16().t() @ case["y"][o:o + c].bfloat16()).float()
    return out


def check(case, out, ref=None, rtol=1e-4):
    """Every element written and finite; elementwise vs the reference (float32 summation-order budget, or the
    output dtype's rounding); empty experts exactly zero."""
    ref = ref_of(case) if ref is None else ref
    got = out.float()
    assert torch.isfinite(got).all(), "an element was not written (poison left), or padding leaked (NaN)"
    scale = ref.abs().max().item() if ref.numel() else 1.0
    atol = max(rtol, 1e-5) * scale
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol)
    for e, c in enumerate(case["counts"].tolist()):
        if c <= 0:
            assert (got[e] == 0).all(), f"empty expert {e} is not zero"


# ------------------------------------------------------------------------------------------------------ CPU / any
@pytest.mark.parametrize("cfg", list(CPU_CONFIGS), ids=list(CPU_CONFIGS))
def test_ragged_pq_padding_and_empty_expert(cfg, device):
    # P=80, Q=72: ragged tiles on both sides; counts 130 (one full chunk + a 2-row tail), 0 (empty), 37 (tail only);
    # a whole padding block after expert 0 with NaN scales; E=3 (not a power of two).
    case = make_case([130, 0, 37], P=80, Q=72, device=device)
    out = poisoned((3, 80, 72), torch.float32, device)
    res = k_grouped_gemm_fp8(*args(case), out=out, config=CPU_CONFIGS[cfg])
    assert res is out
    check(case, out)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_out_dtypes_written_once(out_dtype, device):
    case = make_case([200, 64, 0], P=64, Q=96, device=device)
    out = poisoned((3, 64, 96), out_dtype, device)
    k_grouped_gemm_fp8(*args(case), out=out, out_dtype=out_dtype, config=CPU_CONFIGS["plain32x64"])
    assert not is_poison(out).any()
    ref = ref_of(case)
    check(case, out, ref.to(out_dtype).float(), rtol=1e-2)
    fresh = k_grouped_gemm_fp8(*args(case), out_dtype=out_dtype, config=CPU_CONFIGS["plain32x64"])
    assert fresh.dtype == out_dtype and fresh.shape == (3, 64, 96)
    assert_bitwise_equal(fresh, out, "fresh output vs caller buffer")


def test_accumulate_into_main_grad(device):
    case = make_case([150, 0, 20], P=48, Q=40, device=device)
    base = torch.randn(3, 48, 40, device=device)
    out = base.clone()
    k_grouped_gemm_fp8(*args(case), out=out, accumulate=True, config=CPU_CONFIGS["persistent32x32"])
    ref = ref_of(case)
    torch.testing.assert_close(out, base + ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-5)
    assert_bitwise_equal(out[1], base[1], "empty expert's main_grad under accumulate=True")
    # accumulate=False overwrites (no read of the old values)
    out2 = base.clone()
    k_grouped_gemm_fp8(*args(case), out=out2, config=CPU_CONFIGS["persistent32x32"])
    check(case, out2, ref)


def test_strided_out_row_major_scales_and_determinism(device):
    case = make_case([100, 260], P=64, Q=64, device=device)
    buf = poisoned((64, 2, 64), torch.float32, device)
    out = buf.permute(1, 2, 0)  # (E, P, Q) with strides (64, 1, 128): every out stride honoured
    k_grouped_gemm_fp8(*args(case), out=out, config=CPU_CONFIGS["plain32x64"])
    check(case, out)
    rm = dict(case, a_t_scale=case["a_t_scale"].contiguous(), b_t_scale=case["b_t_scale"].contiguous())
    assert rm["a_t_scale"].stride() != case["a_t_scale"].stride()
    out_rm = k_grouped_gemm_fp8(*args(rm), config=CPU_CONFIGS["plain32x64"])
    assert_bitwise_equal(out_rm, out.contiguous(), "row-major vs MN-major scales")
    assert_bitwise_equal(k_grouped_gemm_fp8(*args(rm), config=CPU_CONFIGS["plain32x64"]), out_rm, "second run")


def test_all_empty_and_no_rows(device):
    case = make_case([0, 0], P=32, Q=32, device=device, seg_pad=[1, 0])
    out = k_grouped_gemm_fp8(*args(case), out=poisoned((2, 32, 32), torch.float32, device),
                             config=CPU_CONFIGS["plain32x64"])
    assert (out == 0).all()
    a = torch.empty(32, 0, dtype=FP8_DTYPE, device=device)
    s = torch.empty(32, 0, device=device)
    z = torch.zeros(2, dtype=torch.int32, device=device)
    out = k_grouped_gemm_fp8(a, s, a, s, z, z, out=poisoned((2, 32, 32), torch.float32, device))
    assert (out == 0).all()


def test_torch_fallback_matches_kernel(monkeypatch, device):
    if device != "cpu":
        pytest.skip("the pure-torch path is the CPU path without the interpreter")
    case = make_case([130, 0, 37], P=80, Q=72, device=device)
    kern = k_grouped_gemm_fp8(*args(case), config=CPU_CONFIGS["plain32x64"])
    monkeypatch.setattr(wg, "use_triton", lambda t: False)
    out = k_grouped_gemm_fp8(*args(case), out=poisoned((3, 80, 72), torch.float32, device))
    check(case, out)
    torch.testing.assert_close(out, kern, atol=1e-5 * kern.abs().max().item(), rtol=1e-5)
    base = torch.randn(3, 80, 72, device=device)
    acc = base.clone()
    k_grouped_gemm_fp8(*args(case), out=acc, accumulate=True)
    torch.testing.assert_close(acc, base + kern, atol=1e-4 * kern.abs().max().item(), rtol=1e-5)
    assert_bitwise_equal(acc[1], base[1], "empty expert under accumulate (torch path)")


def test_config_parse_heuristic_and_env(monkeypatch):
    monkeypatch.delenv(wg.CONFIG_ENV, raising=False)
    for rows in (256, 512, 1024, 2048):  # 64x128 TMA tiles: the fastest measured on an H100 (ops/wgrad.py)
        cfg = pick_wgrad_config(rows, 4096, 7168)
        assert (cfg.BLOCK_P, cfg.BLOCK_Q, cfg.num_warps, cfg.TMA) == (64, 128, 4, True)
    assert pick_wgrad_config(256, 48, 7168).BLOCK_P == 64
    assert all(WgradConfig.parse(str(c)) == c for c in WGRAD_CONFIGS)
    monkeypatch.setenv(wg.CONFIG_ENV, "BLOCK_P=128,BLOCK_Q=128,num_warps=8,TMA=1")
    assert pick_wgrad_config(4096, 4096, 7168) == WgradConfig(BLOCK_P=128, BLOCK_Q=128, num_warps=8, TMA=True)
    for spec, match in [("BLOCK_X=3", "unknown wgrad config key"), ("BLOCK_P=96", "BLOCK_P"),
                        ("GROUP_P=0", "GROUP_P"), ("num_warps=3", "num_warps"), ("BLOCK_P", "KEY=VALUE")]:
        with pytest.raises(ValueError, match=match):
            WgradConfig.parse(spec)
    with pytest.raises(TypeError, match="config must be"):
        WgradConfig.parse(3)


def test_env_pin_is_used(monkeypatch, device):
    case = make_case([40], P=32, Q=32, device=device, seg_pad=[0])
    monkeypatch.setenv(wg.CONFIG_ENV, CPU_CONFIGS["persistent32x32"])
    check(case, k_grouped_gemm_fp8(*args(case)))
    monkeypatch.setenv(wg.CONFIG_ENV, "BLOCK_P=100")
    with pytest.raises(ValueError, match="BLOCK_P"):
        k_grouped_gemm_fp8(*args(case))


def test_bad_inputs(device):
    case = make_case([64, 64], P=32, Q=48, device=device, seg_pad=[0, 0])
    a, sa, b, sb, off, cnt = args(case)
    f = k_grouped_gemm_fp8
    with pytest.raises(TypeError, match="a_t must have dtype"):
        f(a.float(), sa, b, sb, off, cnt)
    with pytest.raises(TypeError, match="b_t must be a torch.Tensor"):
        f(a, sa, None, sb, off, cnt)
    with pytest.raises(ValueError, match="b_t must be \\(Q, M\\)"):
        f(a, sa, b[:, :128], sb, off, cnt)
    with pytest.raises(ValueError, match="a_t must have unit stride"):
        f(torch.empty(32, 512, dtype=FP8_DTYPE, device=device)[:, ::2], sa, b, sb, off, cnt)
    with pytest.raises(ValueError, match="a_t must be 2-D"):
        f(a[None], sa, b, sb, off, cnt)
    with pytest.raises(ValueError, match="a_t_scale must be \\(P, ceil\\(M/128\\)\\)"):
        f(a, sa[:, :1], b, sb, off, cnt)
    with pytest.raises(ValueError, match="b_t_scale must be"):
        f(a, sa, b, sb[:1], off, cnt)
    with pytest.raises(TypeError, match="a_t_scale must have dtype"):
        f(a, sa.double(), b, sb, off, cnt)
    with pytest.raises(TypeError, match="expert_counts must have dtype"):
        f(a, sa, b, sb, off, cnt.long())
    with pytest.raises(ValueError, match="expert_counts must have one entry per expert"):
        f(a, sa, b, sb, off, cnt[:1])
    with pytest.raises(ValueError, match="out must have shape"):
        f(a, sa, b, sb, off, cnt, out=torch.empty(2, 32, 47, device=device))
    with pytest.raises(TypeError, match="out must have dtype"):
        f(a, sa, b, sb, off, cnt, out=torch.empty(2, 32, 48, dtype=torch.bfloat16, device=device))
    with pytest.raises(TypeError, match="out_dtype"):
        f(a, sa, b, sb, off, cnt, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="accumulate=True .* pass out="):
        f(a, sa, b, sb, off, cnt, accumulate=True)
    with pytest.raises(TypeError, match="accumulate=True needs a float32 out"):
        f(a, sa, b, sb, off, cnt, accumulate=True, out_dtype=torch.bfloat16,
          out=torch.zeros(2, 32, 48, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="out must have elements .*|share memory"):
        f(a, sa, b, sb, off, cnt, out=torch.zeros(1, 1, 48, device=device).expand(2, 32, 48))


def test_deep_gemm_operand_layout_emulated(device):
    """The DeepGEMM adapter's re-layout, checked without DeepGEMM: the SM90 kernel's contract (flat K-major group
    blocks, scales per 128-row block of the concatenated groups, zero padding) emulated in torch."""
    from fp8_deep.integrations.deep_gemm import deep_gemm_k_grouped_operands

    case = make_case([130, 0, 37], P=40, Q=24, device=device)
    (a, sfa), (b, sfb), ks, ks_t = deep_gemm_k_grouped_operands(*args(case))
    assert ks == [256, 0, 128] and ks_t.tolist() == ks and a.dim() == 1 and a.numel() == 384 * 40
    assert sfa.shape == (40, 3) and sfa.stride() == (1, 40)
    out = torch.zeros(3, 40, 24, device=device)
    start = 0
    for e, k in enumerate(ks):
        for j in range(k // BLOCK):
            ka = a[(start * 40):(start + k) * 40].view(40, k)[:, j * BLOCK:(j + 1) * BLOCK].float()
            kb = b[(start * 24):(start + k) * 24].view(24, k)[:, j * BLOCK:(j + 1) * BLOCK].float()
            kbi = start // BLOCK + j
            out[e] += (ka @ kb.t()) * sfa[:, kbi, None] * sfb[None, :, kbi]
        start += k
    check(case, out)


# ------------------------------------------------------------------------------------------------------ GPU
# (P, Q) per expert: DeepSeek-V3 dW13 (2I=4096, H=7168) and dW2 (H=7168, I=2048); Qwen3-30B-A3B-like dW13 / dW2;
# ragged ones (not multiples of 128).
GPU_SHAPES = {"dsv3_dw13": (4096, 7168), "dsv3_dw2": (7168, 2048), "qwen_dw13": (1536, 2048),
              "qwen_dw2": (2048, 768), "ragged_384x192": (384, 192), "ragged_192x1408": (192, 1408)}


def _gpu_counts(E, rows, seed):
    g = torch.Generator().manual_seed(seed)
    # ragged counts around `rows` (some experts empty, none a multiple of 128 by luck alone)
    return [0 if i % 5 == 3 else max(1, int(rows * (0.5 + torch.rand(1, generator=g).item()))) for i in range(E)]


def _check_gpu(case, out):
    ref = ref_of(case)
    got = out.float()
    assert torch.isfinite(got).all()
    for e in range(case["E"]):
        scale = ref[e].abs().max().item() or 1.0
        torch.testing.assert_close(got[e], ref[e], atol=5e-3 * scale, rtol=2e-2)
    assert calc_diff(got, bf16_product(case)) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(GPU_SHAPES), ids=list(GPU_SHAPES))
@pytest.mark.parametrize("E,rows", [(8, 256), (4, 1024)])
def test_shapes_gpu(shape, E, rows, device):
    P, Q = GPU_SHAPES[shape]
    case = make_case(_gpu_counts(E, rows, E * 7 + rows), P=P, Q=Q, device=device)
    out = poisoned((E, P, Q), torch.bfloat16, device)
    k_grouped_gemm_fp8(*args(case), out=out, out_dtype=torch.bfloat16)
    _check_gpu(case, out)
    out32 = k_grouped_gemm_fp8(*args(case))
    _check_gpu(case, out32)
    assert_bitwise_equal(k_grouped_gemm_fp8(*args(case)), out32, "second run")
    assert_bitwise_equal(out, out32.bfloat16(), "bf16 out = float32 result rounded once")


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", WGRAD_CONFIGS, ids=str)
def test_every_config_gpu(cfg, device):
    case = make_case([300, 0, 37, 1000, 128], P=1408, Q=384, device=device)
    out = poisoned((5, 1408, 384), torch.float32, device)
    k_grouped_gemm_fp8(*args(case), out=out, config=cfg)
    _check_gpu(case, out)
    base = torch.randn_like(out)
    acc = base.clone()
    k_grouped_gemm_fp8(*args(case), out=acc, accumulate=True, config=cfg)
    torch.testing.assert_close(acc, base + out, atol=1e-5 * out.abs().max().item(), rtol=1e-6)


@pytest.mark.gpu
def test_int64_offsets_gpu(device):
    """out[e] offsets past 2^31 elements (E * P * Q > 2^31): the last expert's tile addresses need int64."""
    E, P, Q = 80, 4096, 7168
    if torch.cuda.get_device_properties(0).total_memory < 12 * 2**30:
        pytest.skip("needs ~10 GiB of GPU memory")
    counts = [0] * (E - 1) + [200]
    case = make_case(counts, P=P, Q=Q, device=device, seg_pad=[0] * E)
    out = torch.zeros(E, P, Q, dtype=torch.bfloat16, device=device)
    out[-1].copy_(poisoned((P, Q), torch.bfloat16, device))
    k_grouped_gemm_fp8(*args(case), out=out, out_dtype=torch.bfloat16)
    ref = ref_of(dict(case, offsets=case["offsets"][-1:], counts=case["counts"][-1:]))[0]
    torch.testing.assert_close(out[-1].float(), ref, atol=5e-3 * ref.abs().max().item(), rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("accumulate", [False, True], ids=["bf16_out", "accumulate_fp32"])
def test_cuda_graph_capture_gpu(accumulate, device):
    case = make_case([300, 0, 37], P=1024, Q=768, device=device)
    dtype = torch.float32 if accumulate else torch.bfloat16
    out = torch.zeros(3, 1024, 768, dtype=dtype, device=device)
    kw = dict(out=out, out_dtype=dtype, accumulate=accumulate)
    k_grouped_gemm_fp8(*args(case), **kw)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        k_grouped_gemm_fp8(*args(case), **kw)
    out.copy_(torch.zeros_like(out) if accumulate else poisoned(out.shape, dtype, device))
    graph.replay()
    torch.cuda.synchronize()
    _check_gpu(case, out)
    # the counts live on the device: a replay with new counts computes the new function
    # (inside the columns that hold real data: the padding columns are NaN-poisoned by make_case)
    case["counts"].copy_(torch.tensor([20, 0, 30], dtype=torch.int32, device=device))
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    _check_gpu_counts(case, out)


def _check_gpu_counts(case, out):
    ref = ref_of(case)
    for e in range(case["E"]):
        scale = ref[e].abs().max().item() or 1.0
        torch.testing.assert_close(out[e].float(), ref[e], atol=5e-3 * scale, rtol=2e-2)


@pytest.mark.gpu
def test_deep_gemm_peer_gpu(device):
    pytest.importorskip("deep_gemm", reason="deep_gemm not installed")
    from fp8_deep.integrations.deep_gemm import k_grouped_gemm_fp8_deep_gemm

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("DeepGEMM's k-grouped FP8 kernel is SM90 here")
    case = make_case(_gpu_counts(8, 512, 3), P=2048, Q=768, device=device)
    dg = k_grouped_gemm_fp8_deep_gemm(*args(case))
    _check_gpu(case, dg)
    ours = k_grouped_gemm_fp8(*args(case))
    assert calc_diff(ours, dg) < 1e-5
