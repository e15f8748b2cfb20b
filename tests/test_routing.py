"""align_routing / permute_rows / check_topk_ids against fp8_deep.reference (CPU: Triton interpreter, small shapes;
GPU: ``-m gpu`` adds DeepSeek-V3 sizes)."""
import pytest
import torch

from fp8_deep import reference
from fp8_deep.numerics import FP8_DTYPE, align
from fp8_deep.ops import routing as R
from fp8_deep.ops.layout import alloc_scales
from fp8_deep.ops.plan import max_padded_rows
from fp8_deep.testing import assert_bitwise_equal


def _ids(T, k, n_ids, device, dtype=torch.int32, gen_seed=0):
    """Distinct choices per token (a real router), random."""
    g = torch.Generator().manual_seed(gen_seed)
    ids = torch.stack([torch.randperm(n_ids, generator=g)[:k] for _ in range(T)]) if T else torch.empty(0, k)
    return ids.to(dtype).to(device)


def _check_plan(plan, topk_ids, E, expert_map=None, block_size=128):
    T, k = topk_ids.shape
    numel = T * k
    rows = max_padded_rows(T, k, E, block_size)
    assert plan.num_rows == rows and (plan.num_tokens, plan.top_k, plan.num_experts) == (T, k, E)
    cpu = {f: getattr(plan, f).cpu() for f in ("sorted_token_ids", "expert_ids", "num_tokens_post_padded",
                                               "m_indices", "inv_perm", "expert_offsets", "expert_counts")}
    for f, t in cpu.items():
        assert t.dtype == torch.int32, f
    s, e, n = reference.moe_align_block_size(topk_ids.cpu(), block_size, E,
                                             expert_map.cpu() if expert_map is not None else None)
    ntpp = int(n[0])
    assert int(cpu["num_tokens_post_padded"][0]) == ntpp
    assert ntpp <= rows
    assert torch.equal(cpu["sorted_token_ids"][:ntpp], s[:ntpp])
    assert (cpu["sorted_token_ids"][ntpp:] == numel).all()
    nb = ntpp // block_size
    assert torch.equal(cpu["expert_ids"][:nb], e[:nb])
    assert (cpu["expert_ids"][nb:] == -1).all()
    # derived fields
    local = reference.kept_local_ids(topk_ids.cpu(), E, expert_map.cpu() if expert_map is not None else None).flatten()
    keep = local >= 0
    counts = torch.bincount(local[keep], minlength=E)[:E]
    padded = (counts + block_size - 1) // block_size * block_size
    assert torch.equal(cpu["expert_counts"].long(), counts)
    assert torch.equal(cpu["expert_offsets"].long(), torch.cumsum(padded, 0) - padded)
    assert (cpu["expert_offsets"] % block_size == 0).all()
    sid = cpu["sorted_token_ids"].long()
    real = sid < numel
    want_m = torch.where(real, cpu["expert_ids"].long().repeat_interleave(block_size), -1)
    assert torch.equal(cpu["m_indices"].long(), want_m)
    inv = cpu["inv_perm"].flatten().long()
    assert torch.equal(inv < 0, ~keep)
    assert torch.equal(sid[inv[keep]], torch.arange(numel)[keep])
    assert torch.equal(cpu["m_indices"][inv[keep]].long(), local[keep])


CASES = [
    # (T, k, E, what it covers)
    (1, 8, 256, "T=1 decode, DeepSeek-V3 routing width"),
    (5, 2, 6, "E not a power of two, most experts empty-ish"),
    (37, 3, 7, "ragged: odd T, E=7"),
    (64, 1, 16, "top_k=1"),
    (24, 12, 12, "top_k=E: every token on every expert"),
    (300, 8, 40, "several 128-row blocks per expert, fused path (2400 choices)"),
    (700, 8, 33, "T*k=5600 > 4096: three-launch path, several chunks"),
]


@pytest.mark.parametrize("T,k,E,what", CASES, ids=[c[3] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_align_matches_reference(device, T, k, E, what, dtype):
    ids = _ids(T, k, E, device, dtype)
    if dtype == torch.int64 and T > 100:
        ids = ids.t().contiguous().t()  # a strided view: strides are passed, not assumed
    _check_plan(R.align_routing(ids, E, backend="triton"), ids, E)


@pytest.mark.parametrize("T", [40, 600])
def test_all_tokens_one_expert(device, T):
    E, k = 9, 1
    ids = torch.full((T, k), 4, dtype=torch.int32, device=device)
    _check_plan(R.align_routing(ids, E, backend="triton"), ids, E)


@pytest.mark.parametrize("T,k", [(50, 4), (700, 6)])
def test_expert_map_half_remote(device, T, k):
    g_e, E = 32, 16
    emap = torch.full((g_e,), -1, dtype=torch.int32)
    emap[1::2] = torch.arange(E, dtype=torch.int32).flip(0)  # odd globals local, in reverse order
    emap = emap.to(device)
    ids = _ids(T, k, g_e, device)
    plan = R.align_routing(ids, E, expert_map=emap, backend="triton")
    _check_plan(plan, ids, E, emap)
    assert (plan.inv_perm.cpu() == -1).any()


def test_all_choices_remote(device):
    emap = torch.full((8,), -1, dtype=torch.int32, device=device)
    emap[0] = 0
    ids = torch.tensor([[1, 2], [3, 4]], dtype=torch.int32, device=device)
    plan = R.align_routing(ids, 2, expert_map=emap, backend="triton")
    _check_plan(plan, ids, 2, emap)
    assert int(plan.num_tokens_post_padded[0]) == 0 and (plan.inv_perm.cpu() == -1).all()


def test_zero_tokens(device):
    ids = torch.empty(0, 8, dtype=torch.int32, device=device)
    plan = R.align_routing(ids, 4)
    assert plan.num_rows == 0 and int(plan.num_tokens_post_padded[0]) == 0
    assert plan.expert_counts.cpu().tolist() == [0] * 4


def test_bad_inputs(device):
    ids = _ids(4, 2, 8, device)
    with pytest.raises(TypeError, match="topk_ids"):
        R.align_routing(ids.float(), 8)
    with pytest.raises(ValueError, match="topk_ids"):
        R.align_routing(ids.flatten(), 8)
    with pytest.raises(TypeError, match="expert_map"):
        R.align_routing(ids, 8, expert_map=torch.zeros(8, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="expert_map"):
        R.align_routing(ids, 8, expert_map=torch.zeros(2, 4, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="block_size"):
        R.align_routing(ids, 8, block_size=100)
    with pytest.raises(ValueError, match="backend"):
        R.align_routing(ids, 8, backend="cuda")
    with pytest.raises(ValueError, match="num_experts"):
        R.align_routing(ids, 0)


def test_check_topk_ids():
    ids = torch.tensor([[0, 3], [2, 1]], dtype=torch.int32)
    R.check_topk_ids(ids, 4)
    with pytest.raises(ValueError, match=r"topk_ids\[1, 0\] = 5"):
        R.check_topk_ids(torch.tensor([[0, 3], [5, 1]]), 4)
    with pytest.raises(ValueError, match=r"topk_ids\[0, 1\] = -1"):
        R.check_topk_ids(torch.tensor([[0, -1]]), 4)
    emap = torch.tensor([0, -1, 1, -1], dtype=torch.int32)
    R.check_topk_ids(torch.tensor([[3, 2]]), 2, emap)
    with pytest.raises(ValueError, match="global experts"):
        R.check_topk_ids(torch.tensor([[4, 2]]), 2, emap)
    with pytest.raises(ValueError, match=r"expert_map\[2\] = 7"):
        R.check_topk_ids(torch.tensor([[0]]), 2, torch.tensor([0, -1, 7], dtype=torch.int32))


def test_out_of_range_ids_are_dropped_not_read_oob(device):
    """Without the (syncing) check, a bad id must not corrupt memory: it is dropped like a remote expert."""
    ids = torch.tensor([[0, 9], [-3, 1]], dtype=torch.int32, device=device)
    plan = R.align_routing(ids, 4, backend="triton")
    assert plan.inv_perm.cpu().tolist()[0][1] == -1 and plan.inv_perm.cpu().tolist()[1][0] == -1
    _check_plan(plan, ids, 4)


def test_torch_path_matches_triton(device, monkeypatch):
    """The CPU path without the interpreter (pure torch) builds the same plan."""
    ids = _ids(90, 4, 12, "cpu")
    emap = torch.full((12,), -1, dtype=torch.int32)
    emap[:9] = torch.arange(9, dtype=torch.int32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ref_plan = R.align_routing(ids, 9, expert_map=emap)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tri_plan = R.align_routing(ids.to(device), 9, expert_map=emap.to(device), backend="triton")
    for f in ("sorted_token_ids", "expert_ids", "num_tokens_post_padded", "m_indices", "inv_perm",
              "expert_offsets", "expert_counts"):
        assert torch.equal(getattr(ref_plan, f), getattr(tri_plan, f).cpu()), f


# ----------------------------------------------------------------------------------------------------------------------
# permute_rows
# ----------------------------------------------------------------------------------------------------------------------
def _quantized(T, K, device):
    x = torch.randn(T, K, dtype=torch.bfloat16, device=device)
    q, s = reference.quantize_activation(x.cpu())
    return q.to(device), s.to(device)


def _check_permute(qp, sp, q, s, plan, layout):
    rows = plan.num_rows
    K, G = q.shape[1], s.shape[1]
    assert qp.shape == (rows, K) and qp.stride() == (K, 1) and qp.dtype == FP8_DTYPE
    want_strides = (G, 1) if layout == "row_major" else (1, align(rows, 4))
    assert sp.shape == (rows, G) and sp.stride() == want_strides
    want_q, want_s = reference.permute_rows(q.cpu(), s.cpu(), plan.sorted_token_ids.cpu(), plan.top_k)
    assert_bitwise_equal(qp.cpu(), want_q, "q_perm")
    assert_bitwise_equal(sp.cpu().contiguous(), want_s, "scale_perm")


@pytest.mark.parametrize("block_size", [128, 16])
@pytest.mark.parametrize("layout", ["tma_aligned", "row_major"])
@pytest.mark.parametrize("T,k,E,K", [(1, 8, 16, 256), (13, 2, 5, 320), (40, 3, 6, 192)])
def test_permute_rows(device, layout, T, k, E, K, block_size):
    ids = _ids(T, k, E, device)
    plan = R.align_routing(ids, E, block_size=block_size)
    q, s = _quantized(T, K, device)
    rows = plan.num_rows
    # poison caller-owned outputs: every element must be written
    qo = torch.full((rows, K), 0x7F, dtype=torch.uint8, device=device).view(FP8_DTYPE)
    so = alloc_scales((rows, s.shape[1]), layout, device)
    so.fill_(float("nan"))
    qp, sp = R.permute_rows(q, s, plan, scale_layout=layout, out=(qo, so))
    assert qp is qo and sp is so
    _check_permute(qp, sp, q, s, plan, layout)


def test_permute_rows_strided_inputs(device):
    T, k, E, K = 20, 2, 4, 256
    ids = _ids(T, k, E, device)
    plan = R.align_routing(ids, E)
    q, s = _quantized(T, K, device)
    qs = torch.empty(K, T, dtype=FP8_DTYPE, device=device).t()
    qs.view(torch.uint8).copy_(q.view(torch.uint8))
    ss = s.t().contiguous().t()  # column-major scales in
    qp, sp = R.permute_rows(qs, ss, plan)
    _check_permute(qp, sp, q, s, plan, "tma_aligned")


@pytest.mark.parametrize("pinned", ["16,512", "2,4096,8", "1,64,1"])
def test_permute_rows_pinned_tiles(device, monkeypatch, pinned):
    """``FP8_DEEP_PERMUTE_CONFIG`` (A/B runs) moves the same bytes with other tiles; a bad value names the variable."""
    T, k, E, K = 13, 3, 6, 320
    plan = R.align_routing(_ids(T, k, E, device), E, block_size=16)
    q, s = _quantized(T, K, device)
    monkeypatch.setenv(R.PERMUTE_CONFIG_ENV, pinned)
    qp, sp = R.permute_rows(q, s, plan)
    _check_permute(qp, sp, q, s, plan, "tma_aligned")
    monkeypatch.setenv(R.PERMUTE_CONFIG_ENV, "16,500")
    with pytest.raises(ValueError, match=R.PERMUTE_CONFIG_ENV):
        R.permute_rows(q, s, plan)


def test_permute_rows_errors(device):
    ids = _ids(4, 2, 4, device)
    plan = R.align_routing(ids, 4)
    q, s = _quantized(4, 256, device)
    with pytest.raises(TypeError, match="q"):
        R.permute_rows(q.float(), s, plan)
    with pytest.raises(ValueError, match="tokens"):
        R.permute_rows(q[:3], s[:3], plan)
    with pytest.raises(ValueError, match="scale_layout"):
        R.permute_rows(q, s, plan, scale_layout="col")
    with pytest.raises(ValueError, match="strides"):
        bad = torch.empty(plan.num_rows, 2, dtype=torch.float32, device=device)
        R.permute_rows(q, s, plan, scale_layout="tma_aligned",
                       out=(torch.empty(plan.num_rows, 256, dtype=FP8_DTYPE, device=device), bad))


# ----------------------------------------------------------------------------------------------------------------------
# GPU: DeepSeek-V3 sizes
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("T,k,E", [(1, 8, 256), (512, 8, 256), (4096, 8, 256), (16384, 8, 256), (4096, 8, 512)])
def test_align_gpu_deepseek(T, k, E):
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int().cuda()
    plan = R.align_routing(ids, E, backend="triton")
    _check_plan(plan, ids, E)
    again = R.align_routing(ids, E, backend="triton")
    assert torch.equal(plan.sorted_token_ids, again.sorted_token_ids)  # deterministic


@pytest.mark.gpu
def test_align_gpu_cuda_graph():
    T, k, E = 256, 8, 256
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int().cuda()
    R.align_routing(ids, E, backend="triton")  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan = R.align_routing(ids, E, backend="triton")
    ids.copy_(torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int().cuda())
    graph.replay()
    torch.cuda.synchronize()
    _check_plan(plan, ids, E)


@pytest.mark.gpu
def test_permute_gpu_deepseek():
    T, k, E, K = 4096, 8, 256, 7168
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int().cuda()
    plan = R.align_routing(ids, E)
    q, s = _quantized(T, K, "cuda")
    qp, sp = R.permute_rows(q, s, plan)
    _check_permute(qp, sp, q, s, plan, "tma_aligned")


@pytest.mark.parametrize("T,k,E", [(1, 8, 256), (37, 3, 7), (300, 8, 40), (700, 8, 33)])
def test_align_16_row_segments(device, T, k, E):
    """Our grouped GEMM asks for 16-row segments (DeepGEMM for 128): both launch paths, vs the reference."""
    ids = _ids(T, k, E, device)
    _check_plan(R.align_routing(ids, E, block_size=16, backend="triton"), ids, E, block_size=16)


def test_permute_rows_out_must_not_overlap_inputs(device):
    T, k, E, K = 13, 2, 5, 256
    plan = R.align_routing(_ids(T, k, E, device), E, block_size=16)
    q, s = _quantized(T, K, device)
    rows = plan.num_rows
    big = torch.empty(rows * K + T * K, dtype=torch.uint8, device=device)
    big[:T * K].copy_(q.view(torch.uint8).reshape(-1))
    q_in = big[:T * K].view(FP8_DTYPE).view(T, K)
    so = alloc_scales((rows, s.shape[1]), "row_major", device)
    with pytest.raises(ValueError, match=r"(q and out\[0\]|out\[0\] and q) share memory"):
        R.permute_rows(q_in, s, plan, scale_layout="row_major",
                       out=(big[T * K - K:T * K - K + rows * K].view(FP8_DTYPE).view(rows, K), so))


@pytest.mark.parametrize("block_size", [128, 16])
@pytest.mark.parametrize("layout", ["tma_aligned", "row_major"])
@pytest.mark.parametrize("T,k,E,K,fmt", [(1, 8, 16, 256, "fp32"), (13, 2, 5, 320, "ue8m0"), (40, 3, 6, 192, "fp32")])
def test_quantize_permute_fused(device, layout, T, k, E, K, fmt, block_size):
    """The fused pass writes the bytes of quantize_activation + permute_rows (padding rows zero), NaN/Inf groups and
    a remote expert (expert_map) included."""
    from fp8_deep import ops
    ids = _ids(T, k, E, device)
    emap = torch.arange(E, dtype=torch.int32, device=device)
    emap[E - 1] = -1  # the last expert lives on another rank: its choices are dropped
    plan = R.align_routing(ids, E, block_size=block_size, expert_map=emap)
    x = (torch.randn(T, K, device=device) * torch.logspace(-2, 2, K, device=device)).to(torch.bfloat16)
    x[T // 2, 3] = float("nan")
    x[0, K - 1] = float("inf")
    got = ops.quantize_permute(x, plan, scale_fmt=fmt, scale_layout=layout)
    want = R.permute_rows(*ops.quantize_activation(x, scale_fmt=fmt, backend="triton"), plan, scale_layout=layout)
    assert_bitwise_equal(got[0], want[0], "q_perm")
    assert got[1].stride() == want[1].stride()
    assert_bitwise_equal(got[1].contiguous(), want[1].contiguous(), "scale_perm")


def test_quantize_permute_errors(device):
    from fp8_deep import ops
    ids = _ids(4, 2, 4, device)
    plan = R.align_routing(ids, 4, block_size=16)
    x = torch.randn(4, 256, device=device, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="plan must be a RoutingPlan"):
        ops.quantize_permute(x, None)
    with pytest.raises(ValueError, match="x has 3 rows but the plan was built for 4 tokens"):
        ops.quantize_permute(x[:3], plan)
    with pytest.raises(TypeError, match="x must be bfloat16"):
        ops.quantize_permute(x.to(FP8_DTYPE), plan)
    with pytest.raises(ValueError, match="unit stride"):
        ops.quantize_permute(x.t().contiguous().t(), plan)
