"""fp8_deep.moe_forward: elementwise vs the FP8-emulated reference, globally vs BF16, edge cases, errors."""
import pytest
import torch

import fp8_deep
from fp8_deep import ops, reference
from fp8_deep.testing import calc_diff


def make_moe(T, E, H, I, k, device, *, dtype=torch.bfloat16, routing="random", seed=0):
    # drawn where they are used: at DeepSeek-V3 size (11G weights) CPU sampling took ~60 s of each GPU test
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, device=device).to(dtype)
    # in the weight dtype directly, scaled in place: no float32 copies of 11G elements
    w13 = torch.randn(E, 2 * I, H, generator=g, device=device, dtype=dtype).div_(H ** 0.5)
    w2 = torch.randn(E, H, I, generator=g, device=device, dtype=dtype).div_(I ** 0.5)
    logits = torch.randn(T, E, generator=g, device=device)
    if routing == "one_expert":
        logits[:, 1] += 100.0
    elif routing == "skip_half":  # experts 0, 2, 4, ... get no tokens
        logits[:, ::2] -= 100.0
    w, ids = torch.softmax(logits, -1).topk(k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    return hidden, w13, w2, w, ids.to(torch.int32)


def check_moe(hidden, w13, w2, topk_weights, topk_ids, *, expert_map=None, scale_fmt="fp32", backend="triton",
              prequantized=False, fp32_elementwise=False):
    """Elementwise vs the FP8-emulated reference with the GEMM arithmetic of the device (on CUDA the tensor cores'
    in-block FP8 accumulation, ``reference.block_scaled_matmul``), and globally vs BF16 within the error budget of
    the float32 recipe. ``fp32_elementwise`` also holds the output elementwise to the float32-accumulating reference
    (it holds at DeepSeek-V3 sizes; at I=128 one flipped intermediate moves an output by up to ~0.05, see
    bench/NOTES.md "Numerics: tensor-core accumulation")."""
    kw = dict(expert_map=expert_map, scale_fmt=scale_fmt)
    if prequantized:
        q13, s13 = ops.quantize_weight_blockwise(w13, scale_fmt=scale_fmt)
        q2, s2 = ops.quantize_weight_blockwise(w2, scale_fmt=scale_fmt)
        out = fp8_deep.moe_forward(hidden, q13, q2, topk_weights, topk_ids, w13_scale=s13, w2_scale=s2,
                                   backend=backend, **kw)
        ref_args = (hidden, q13, q2, topk_weights, topk_ids)
        kw.update(w13_scale=s13, w2_scale=s2)
    else:
        out = fp8_deep.moe_forward(hidden, w13, w2, topk_weights, topk_ids, backend=backend, **kw)
        ref_args = (hidden, w13, w2, topk_weights, topk_ids)
    emu32 = reference.moe_forward_fp8_emulated(*ref_args, **kw)
    emu = reference.moe_forward_fp8_emulated(*ref_args, accumulate="tensor_core", **kw) if hidden.is_cuda else emu32
    bf16 = reference.moe_forward_bf16(hidden, w13, w2, topk_weights, topk_ids, expert_map=expert_map)
    assert out.shape == hidden.shape and out.dtype == hidden.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), emu.float(), atol=0.035, rtol=0.035)
    if fp32_elementwise:
        torch.testing.assert_close(out.float(), emu32.float(), atol=0.035, rtol=0.035)
    d_ours, d_emu = calc_diff(out, bf16), calc_diff(emu32, bf16)
    # the recipe's own error (four quantizations deep) is the bar; a kernel may not add to it beyond rounding noise
    assert d_ours <= 1.1 * d_emu + 1e-6, (d_ours, d_emu)
    assert d_ours < 1e-2
    return out


# (T, E, H, I, k, routing, what it covers)
CASES = [
    (1, 4, 256, 128, 2, "random", "T=1"),
    (9, 5, 256, 192, 2, "random", "E not a power of two, I=192 (TP shard, ragged K of GEMM2)"),
    (8, 6, 320, 128, 3, "skip_half", "experts with no tokens, H=320 ragged"),
    (12, 4, 256, 128, 1, "one_expert", "all tokens on one expert, top-k=1"),
    (3, 4, 128, 128, 4, "random", "top-k = E"),
]


@pytest.mark.parametrize("T,E,H,I,k,routing", [c[:6] for c in CASES], ids=[c[6] for c in CASES])
def test_moe_matches_emulated_reference(T, E, H, I, k, routing, device):
    check_moe(*make_moe(T, E, H, I, k, device, routing=routing))


def test_moe_prequantized_and_ue8m0(device):
    args = make_moe(6, 4, 256, 128, 2, device, seed=1)
    a = check_moe(*args, prequantized=True)
    b = fp8_deep.moe_forward(*args, backend="triton")
    assert torch.equal(a, b)  # quantizing inside the call is the same function as loading FP8 weights
    check_moe(*args, scale_fmt="ue8m0")
    check_moe(*args, scale_fmt="ue8m0", prequantized=True)


def test_moe_expert_map_half_remote(device):
    """Expert parallelism: 8 global experts, this rank holds 4 (global 1, 3, 5, 7 -> local 0..3)."""
    T, Eg, H, I, k = 10, 8, 256, 128, 2
    hidden, w13g, w2g, w, ids = make_moe(T, Eg, H, I, k, device, seed=2)
    local = torch.tensor([1, 3, 5, 7])
    expert_map = torch.full((Eg,), -1, dtype=torch.int32)
    expert_map[local] = torch.arange(4, dtype=torch.int32)
    expert_map = expert_map.to(device)
    w13, w2 = w13g[local.to(device)], w2g[local.to(device)]
    out = check_moe(hidden, w13, w2, w, ids, expert_map=expert_map)
    # tokens whose choices are all remote get exactly zero
    all_remote = (expert_map[ids.long()] < 0).all(dim=1)
    assert (out[all_remote] == 0).all()
    # equivalent to zeroing the remote choices' weights on the full model
    w_masked = torch.where(expert_map[ids.long()] >= 0, w, torch.zeros_like(w))
    full = fp8_deep.moe_forward(hidden, w13g, w2g, w_masked, ids, backend="triton")
    torch.testing.assert_close(out.float(), full.float(), atol=0.035, rtol=0.035)


def test_moe_deterministic_and_out_buffer(device):
    args = make_moe(7, 4, 256, 128, 2, device, seed=3)
    a = fp8_deep.moe_forward(*args, backend="triton")
    buf = torch.full_like(a, float("nan"))
    b = fp8_deep.moe_forward(*args, backend="triton", out=buf)
    assert b is buf and torch.equal(a, b)


def test_moe_fused_and_separate_quantize_permute_agree(device, monkeypatch):
    """The forward's two ways into the first GEMM (quantize into the expert segments in one pass, or quantize then
    permute) give the same output bytes; the size rule and the switch."""
    from fp8_deep.moe import forward as F
    args = make_moe(9, 4, 256, 128, 3, device, seed=5)
    outs = []
    for env in ("1", "0"):
        monkeypatch.setenv(F.FUSED_QUANT_PERMUTE_ENV, env)
        outs.append(fp8_deep.moe_forward(*args, backend="triton"))
    assert torch.equal(outs[0], outs[1])
    monkeypatch.delenv(F.FUSED_QUANT_PERMUTE_ENV)
    x = args[0]
    assert F._fuse_quantize_permute(F.FUSED_QUANT_PERMUTE_MAX_ROWS, x)
    assert not F._fuse_quantize_permute(F.FUSED_QUANT_PERMUTE_MAX_ROWS + 1, x)
    # with vLLM's activation quantizer available (CUDA, whole groups) the forward keeps it
    monkeypatch.setattr(F._registry, "available", lambda kind, name: True)
    assert F._fuse_quantize_permute(4, x) == (not x.is_cuda)
    monkeypatch.setenv(F.FUSED_QUANT_PERMUTE_ENV, "yes")
    with pytest.raises(ValueError, match="expected 0 or 1"):
        fp8_deep.moe_forward(*args, backend="triton")


def test_moe_fp16(device):
    check_moe(*make_moe(5, 4, 256, 128, 2, device, dtype=torch.float16, seed=4))


def test_moe_empty_tokens(device):
    hidden, w13, w2, w, ids = make_moe(4, 4, 256, 128, 2, device)
    out = fp8_deep.moe_forward(hidden[:0], w13, w2, w[:0], ids[:0])
    assert out.shape == (0, 256) and out.dtype == torch.bfloat16


def test_moe_backend_choice(device):
    args = make_moe(4, 4, 256, 128, 2, device)
    fp8_deep.moe_forward(*args, backend="auto")
    assert fp8_deep.last_backend() in ("triton", "deep_gemm")
    with pytest.raises(ValueError, match="backend must be one of"):
        fp8_deep.moe_forward(*args, backend="cutlass")
    try:
        import deep_gemm  # noqa: F401
    except ImportError:
        if device == "cuda":
            with pytest.raises(ImportError, match="deep_gemm"):
                fp8_deep.moe_forward(*args, backend="deep_gemm")
        else:
            with pytest.raises(ValueError, match="needs CUDA"):
                fp8_deep.moe_forward(*args, backend="deep_gemm")


def test_moe_bad_input(device, monkeypatch):
    hidden, w13, w2, w, ids = make_moe(4, 4, 256, 128, 2, device)
    mf = fp8_deep.moe_forward
    monkeypatch.setenv("FP8_DEEP_CHECK_ROUTING", "1")  # CPU checks always; CUDA when asked (it syncs)
    with pytest.raises(ValueError, match="topk_ids"):
        mf(hidden, w13, w2, w, torch.full_like(ids, 4))
    with pytest.raises(ValueError, match="topk_ids"):
        mf(hidden, w13, w2, w, torch.full_like(ids, -1))
    with pytest.raises(ValueError, match=r"w13 must be \(E, 2I, H\) with H"):
        mf(hidden, w13[:, :, :128], w2, w, ids)
    with pytest.raises(ValueError, match=r"w2 must be \(E, H, I\)"):
        mf(hidden, w13, w2[:, :, :64], w, ids)
    with pytest.raises(TypeError, match="hidden_states must have dtype"):
        mf(hidden.float(), w13, w2, w, ids)
    with pytest.raises(TypeError, match="topk_ids must have dtype"):
        mf(hidden, w13, w2, w, ids.float())
    with pytest.raises(ValueError, match="topk_ids and topk_weights must both be"):
        mf(hidden, w13, w2, w[:, :1], ids)
    q13, s13 = ops.quantize_weight_blockwise(w13)
    q2, s2 = ops.quantize_weight_blockwise(w2)
    with pytest.raises(ValueError, match="FP8 weights need w13_scale"):
        mf(hidden, q13, q2, w, ids)
    with pytest.raises(ValueError, match=r"w2_scale must have shape"):
        mf(hidden, q13, q2, w, ids, w13_scale=s13, w2_scale=s2[:, :1])
    with pytest.raises(TypeError, match="both be FP8"):
        mf(hidden, q13, w2, w, ids, w13_scale=s13)
    with pytest.raises(ValueError, match="activation must be 'silu'"):
        mf(hidden, w13, w2, w, ids, activation="gelu")
    with pytest.raises(ValueError, match="scale_fmt must be one of"):
        mf(hidden, w13, w2, w, ids, scale_fmt="e4m3")
    if device == "cuda":
        with pytest.raises(ValueError, match="w13 is on cpu"):
            mf(hidden, w13.cpu(), w2, w, ids)


@pytest.mark.gpu
def test_gpu_unchecked_out_of_range_ids_are_dropped(monkeypatch):
    """Without the (syncing) check, an invalid id contributes nothing: no out-of-bounds read, no garbage."""
    monkeypatch.setenv("FP8_DEEP_CHECK_ROUTING", "0")
    hidden, w13, w2, w, ids = make_moe(8, 4, 256, 128, 2, "cuda", seed=8)
    bad = ids.clone()
    bad[3, 1] = 1000
    bad[5, 0] = -5
    out = fp8_deep.moe_forward(hidden, w13, w2, w, bad, backend="triton")
    w_masked = w.clone()
    w_masked[3, 1] = 0
    w_masked[5, 0] = 0
    expect = fp8_deep.moe_forward(hidden, w13, w2, w_masked, ids, backend="triton")
    torch.testing.assert_close(out.float(), expect.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [64, 512], ids=["swap_tiles", "tma_ws_tiles"])
def test_gpu_cuda_graph_capture_and_replay(T):
    args = make_moe(T, 16, 512, 256, 4, "cuda", seed=5)
    hidden, w13, w2, w, ids = args
    q13, s13 = ops.quantize_weight_blockwise(w13)
    q2, s2 = ops.quantize_weight_blockwise(w2)
    eager = fp8_deep.moe_forward(hidden, q13, q2, w, ids, w13_scale=s13, w2_scale=s2, backend="triton")
    static_h, static_w, static_ids = hidden.clone(), w.clone(), ids.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (compiles) outside the capture
        fp8_deep.moe_forward(static_h, q13, q2, static_w, static_ids, w13_scale=s13, w2_scale=s2, backend="triton")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_deep.moe_forward(static_h, q13, q2, static_w, static_ids, w13_scale=s13, w2_scale=s2,
                                   backend="triton")
    graph.replay()
    assert torch.equal(out, eager)
    # new routing and inputs in the same buffers: the replay must follow the device-side counts
    h2, _, _, w_new, ids_new = make_moe(T, 16, 512, 256, 4, "cuda", seed=6, routing="skip_half")
    static_h.copy_(h2)
    static_w.copy_(w_new)
    static_ids.copy_(ids_new)
    graph.replay()
    expect = fp8_deep.moe_forward(h2, q13, q2, w_new, ids_new, w13_scale=s13, w2_scale=s2, backend="triton")
    assert torch.equal(out, expect)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "deep_gemm"])
@pytest.mark.parametrize("T,I,E", [(256, 2048, 256), (64, 256, 256), (1, 2048, 256), (1024, 2048, 32)])
def test_gpu_deepseek_v3_shapes(T, I, E, backend):
    """top-8, H=7168, E=256 (and E=32, an expert-parallel shard whose 256 rows per expert take the warp-specialized
    TMA tiles): elementwise vs the emulated reference and the recipe's error budget vs BF16."""
    if backend == "deep_gemm" and not _has_deep_gemm():
        pytest.skip("deep_gemm not importable (build it on the GPU machine: bench/gpu_check.sh)")
    H, k = 7168, 8
    hidden, w13, w2, w, ids = make_moe(T, E, H, I, k, "cuda", seed=7)
    check_moe(hidden, w13, w2, w, ids, backend=backend, prequantized=True, fp32_elementwise=True)


@pytest.mark.gpu
def test_gpu_moe_row_scales_take_the_tma_ring():
    """Both GEMMs of the MoE get their row scales in the layout the Gluon kernel loads through its TMA ring
    (MN-major, 16-byte aligned); anything else would silently take the slower global-load path."""
    import functools

    from fp8_deep.moe.forward import moe_forward_impl
    from fp8_deep.ops import grouped_gemm as gg
    from fp8_deep.ops.backend import select_grouped_gemm
    T, E, k = 1024, 8, 2  # ~256 rows per expert: both GEMMs pick the warp-specialized Gluon kernel
    hidden, w13, w2, w, ids = make_moe(T, E, 256, 192, k, "cuda")
    out, st = moe_forward_impl(hidden, w13, w2, w, ids, return_stages=True,
                               select_gemm=functools.partial(select_grouped_gemm, "triton"))
    for a, sa, K in ((st["a1"], st["sa1"], 256), (st["a2"], st["sa2"], 192)):
        cfg = gg.pick_config(gg.peak_rows_per_expert(T * k, E), K)
        assert cfg.GLUON and cfg.WS
        assert gg._scales_tma_ok(sa, a.shape[0]), (tuple(sa.stride()), sa.data_ptr() % 16)
    assert torch.isfinite(out.float()).all()


def _has_deep_gemm():
    try:
        from fp8_deep.ops import _registry
        return _registry.available("grouped_gemm", "deep_gemm")
    except Exception:  # noqa: BLE001 - a broken build is reported by its own adapter test
        return False


def test_reference_accumulate_option(device):
    args = make_moe(3, 2, 256, 128, 1, device, seed=5)
    with pytest.raises(ValueError, match="accumulate"):
        reference.moe_forward_fp8_emulated(*args, accumulate="fp16")
    if device == "cpu":  # the tensor-core model needs the GPU's FP8 tensor cores
        with pytest.raises(ValueError, match="CUDA"):
            reference.moe_forward_fp8_emulated(*args, accumulate="tensor_core")
    else:  # both models agree to well within the test bar on a case whose flips are rare
        a = reference.moe_forward_fp8_emulated(*args)
        b = reference.moe_forward_fp8_emulated(*args, accumulate="tensor_core")
        assert calc_diff(a, b) < 1e-3
