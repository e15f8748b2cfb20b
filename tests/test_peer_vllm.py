"""The vLLM peer harness (bench/peer_vllm.py, issue 24): vLLM's block-FP8 ``fused_moe_kernel``, launched the way
vLLM launches it, computes the same MoE as ``fp8_deep.moe_forward`` from the same FP8 weights and scales.

On the CPU the kernel runs through the Triton interpreter (tiny shapes). Skipped when neither ``vllm`` is importable
nor ``.vllm/`` was fetched (``bash tools/fetch_vllm_moe.sh``). The launch decisions that only a GPU takes (SWAP_AB on
capability 9.0, the TMA descriptor for B on 9.x/10.x) are forced here so the interpreter runs those kernel paths too.
"""
import types

import pytest
import torch

import fp8_deep
from conftest import bench_module
from fp8_deep import reference
from fp8_deep.testing import calc_diff, poisoned


@pytest.fixture(scope="module")
def peer():
    with bench_module("peer_vllm") as m:
        yield m


@pytest.fixture(scope="module")
def kernel(peer):
    try:
        return peer.load_vllm_kernel("auto")
    except ImportError as exc:
        pytest.skip(str(exc))


M64 = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 32, "num_warps": 4,
       "num_stages": 3}
# (T, E, H, I, k, experts with no tokens, VllmPeer overrides, what it covers)
CASES = [
    (8, 4, 256, 256, 2, (), {}, "random routing, aligned blocks"),
    (1, 4, 256, 256, 2, (), {}, "T=1 through moe_align_block_size (two experts get no token)"),
    (8, 4, 256, 256, 2, (2,), {}, "expert 2 gets zero tokens"),
    (1, 8, 256, 256, 2, (), {}, "T=1, T*k*4 <= E: vLLM's naive block assignment (no alignment)"),
    (8, 4, 256, 256, 2, (1,), {"swap_ab": True}, "SWAP_AB (vLLM's pick on capability 9.0 at BLOCK_M < 64)"),
    (8, 4, 256, 256, 2, (), {"use_tma": True}, "TMA descriptor for B (vLLM's pick on capability 9.x/10.x)"),
    (8, 4, 256, 256, 2, (3,), {"use_tma": True, "swap_ab": True}, "TMA + SWAP_AB, an empty expert"),
    (6, 5, 384, 128, 3, (), {"config": M64}, "E=5, top-3, H=384, I=128, BLOCK_M=64 (a tuned-file shape)"),
]


def _inputs(peer, T, E, H, inter, k, empty, device, seed):
    q13, s13, q2, s2 = peer.make_weights(E, H, inter, device, seed=seed)
    tw, tid = peer.make_routing(T, E, k, device, seed=seed + 1, empty_experts=empty)
    g = torch.Generator(device=device).manual_seed(seed + 2)
    hidden = torch.randn(T, H, generator=g, device=device).to(torch.bfloat16)
    return hidden, q13, s13, q2, s2, tw, tid


@pytest.mark.parametrize("T,E,H,inter,k,empty,overrides", [c[:7] for c in CASES], ids=[c[7] for c in CASES])
def test_peer_matches_fp8_deep(peer, kernel, device, T, E, H, inter, k, empty, overrides):
    hidden, q13, s13, q2, s2, tw, tid = _inputs(peer, T, E, H, inter, k, empty, device, seed=T * 31 + E)
    for e in empty:
        assert not (tid == e).any()
    p = peer.VllmPeer(q13, s13, q2, s2, tid, tw, kernel=kernel, **overrides)
    assert p.naive == (T * k * 4 <= E)
    if "swap_ab" in overrides:
        assert p.launch1.swap_ab and p.launch2.swap_ab
    if "use_tma" in overrides:
        assert p.launch1.use_tma_b and p.launch2.use_tma_b
    # poison both GEMM outputs: a row the kernel leaves unwritten comes out NaN
    p.cache1.copy_(poisoned(p.cache1.shape, torch.bfloat16, device))
    p.cache3.copy_(poisoned(p.cache3.shape, torch.bfloat16, device))
    theirs = p.forward(hidden)
    ours = fp8_deep.moe_forward(hidden, q13, q2, tw, tid, w13_scale=s13, w2_scale=s2)
    assert theirs.shape == ours.shape == (T, H) and theirs.dtype == torch.bfloat16
    assert torch.isfinite(theirs).all()
    d = calc_diff(theirs.float(), ours.float())
    assert d < 1e-3, d
    torch.testing.assert_close(theirs.float(), ours.float(), atol=0.035, rtol=0.035)
    # the timing callable replays exactly these launches
    again = p.gemms_fn()().sum(dim=1).to(torch.bfloat16)
    assert torch.equal(again, theirs)


def test_peer_matches_fp8_deep_ue8m0(peer, kernel, device):
    # vLLM with DeepGEMM's E8M0 mode quantizes activations with power-of-two scales: ours with scale_fmt="ue8m0"
    hidden, q13, s13, q2, s2, tw, tid = _inputs(peer, 8, 4, 256, 256, 2, (), device, seed=5)
    theirs, ours, d, _, p = peer.compare(hidden, q13, s13, q2, s2, tw, tid, scale_fmt="ue8m0", kernel=kernel)
    assert p.ue8m0 and d < 1e-3, d
    torch.testing.assert_close(theirs.float(), ours.float(), atol=0.035, rtol=0.035)


def test_moe_align_block_size_is_vllms(peer, device):
    # vLLM's buffer sizes; the used prefix equals fp8_deep's reference of the same semantics (stable order)
    for T, E, k, bs in ((8, 4, 2, 16), (1, 4, 2, 16), (3, 16, 2, 64), (40, 6, 3, 16)):
        _, tid = peer.make_routing(T, E, k, device, seed=T + E, empty_experts=(1,) if E > k + 1 else ())
        sorted_ids, expert_ids, ntpp = peer.moe_align_block_size(tid, bs, E)
        numel = tid.numel()
        size = numel + E * (bs - 1)
        if numel < E:
            size = min(numel * bs, size)
        assert sorted_ids.numel() == size and expert_ids.numel() == -(-size // bs)
        assert sorted_ids.dtype == expert_ids.dtype == ntpp.dtype == torch.int32
        r_ids, r_exp, r_ntpp = reference.moe_align_block_size(tid, bs, E)
        n = int(ntpp)
        assert n == int(r_ntpp) and n % bs == 0
        assert torch.equal(sorted_ids[:n], r_ids[:n])
        assert torch.equal(expert_ids[:n // bs], r_exp[:n // bs])
        assert bool((sorted_ids[n:] == numel).all()) and bool((expert_ids[n // bs:] == -1).all())


def _fetched_function(kernel, name, **globals_):
    """One function of the kernel's fused_moe.py, executed with stand-ins for vLLM's globals."""
    import ast
    tree = ast.parse(kernel.source)
    node = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if node is None:
        pytest.skip(f"vLLM {kernel.version}'s fused_moe.py has no {name}")
    node.decorator_list = []
    ns = dict(globals_)
    exec(compile(ast.Module(body=[node], type_ignores=[]), "<fused_moe.py>", "exec"), ns)
    return ns[name]


def _platform(rocm=False):
    return types.SimpleNamespace(is_rocm=lambda: rocm, is_cuda=lambda: not rocm)


def test_default_config_is_vllms(peer, kernel):
    # our hand copy of get_default_config's block-FP8 branch against the fetched function itself
    fn = _fetched_function(kernel, "get_default_config", envs=types.SimpleNamespace(VLLM_BATCH_INVARIANT=False),
                           current_platform=_platform(), next_power_of_2=lambda n: 1 << max(0, n - 1).bit_length())
    for M in (1, 2, 4, 5, 8, 9, 16, 17, 64, 65, 256, 2048, 8192):
        want = fn(M, 256, 256, 7168, 8, "fp8_w8a8", [128, 128])
        assert peer.default_config(M) == want, (M, want)


def test_config_file_name_is_vllms(peer, kernel):
    import re
    for raw in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA H100 PCIe"):
        # stand-in for vLLM's get_device_name_as_file_name (vllm/utils/platform_utils.py, not fetched)
        fn = _fetched_function(kernel, "get_config_file_name",
                               get_device_name_as_file_name=lambda r=raw: re.sub(r"[\s/]+", "_", r))
        assert peer.config_file_name(256, 256, peer.card_file_name(raw)) == fn(256, 256, "fp8_w8a8", [128, 128])
    assert peer.card_file_name("NVIDIA H200 NVL") == "NVIDIA_H200"


def test_tuned_config_lookup_closest_key(peer, kernel):
    card, E, N = "NVIDIA_H200", 128, 768
    table, path = peer.tuned_configs(kernel.configs_dir, E, N, card)
    if table is None:
        pytest.skip(f"vLLM {kernel.version} ships no {peer.config_file_name(E, N, card)}")
    keys = list(table)
    for M in (1, 3, 100, 10 ** 6):
        cfg, src = peer.select_config(E, N, M, kernel.configs_dir, card)
        best = min(abs(m - M) for m in keys)
        key = next(m for m in keys if abs(m - M) == best)  # the first of equals, in file order, as min() picks
        assert cfg == table[key] and src.endswith(f"[{key}]")
    cfg, src = peer.select_config(3, 128, 4, kernel.configs_dir, card)  # no file for this shape
    assert src == "default" and cfg == peer.default_config(4)


def test_launch_logic_is_the_reproduced_version(peer, kernel):
    note = peer.launch_logic_note(kernel)
    if kernel.version != peer.LAUNCH_LOGIC_VERSION:
        pytest.skip(f"vLLM {kernel.version} (harness written for {peer.LAUNCH_LOGIC_VERSION}): {note or 'same'}")
    assert note == ""
    assert kernel.has_tma


def test_kernel_is_cut_out_at_its_own_lines(peer, kernel):
    if not kernel.origin.startswith(str(peer.VLLM_DIR)):
        pytest.skip(f"kernel from {kernel.origin}")
    fn = getattr(kernel.kernel, "fn", kernel.kernel)
    assert fn.__code__.co_filename == str((peer.VLLM_DIR / "fused_moe.py").resolve())
    lines = kernel.source.splitlines()
    first = fn.__code__.co_firstlineno  # the decorator's line: tracebacks and inspect read the fetched file
    assert lines[first - 1].strip() == "@triton.jit" and lines[first].startswith("def fused_moe_kernel(")


def test_extraction_refuses_other_globals(peer):
    src = "import triton\nBLOCK = 4\n\n@triton.jit\ndef k(x):\n    return x + BLOCK\n"
    with pytest.raises(ValueError, match="BLOCK"):
        peer.extract_jit_functions(src, "<test>", ("k",))
    with pytest.raises(ValueError, match="no @triton.jit function"):
        peer.extract_jit_functions(src, "<test>", ("missing",))


def test_getitem_compat_is_scoped(peer, kernel, device):
    from triton.language import core
    before = core.tensor.__dict__["__getitem__"]
    with peer.triton_getitem_compat():
        pass
    assert core.tensor.__dict__["__getitem__"] is before


def test_ours_gemms_fn_reruns_the_forwards_gemms(peer):
    """The GEMM-only side of the comparison re-runs exactly our forward's two launches: poisoned outputs come back
    with the forward's bytes (GEMM1's ``h``, GEMM2's ``o``), and ``o`` combined gives ``moe_forward``'s output."""
    from fp8_deep.ops.combine import moe_combine
    E, H, inter, k, T = 4, 256, 256, 2, 8
    q13, s13, q2, s2 = peer.make_weights(E, H, inter, "cpu", seed=3)
    tw, tid = peer.C.random_routing(T, E, k, seed=4)
    hidden = peer.C.randn((T, H), seed=5)
    run = peer.ours_gemms_fn(hidden, q13, s13, q2, s2, tw, tid, "triton")
    st = run.stages
    rows = st["plan"].inv_perm.reshape(-1).long()  # the rows holding a routed choice (others are padding)
    assert (rows >= 0).all()
    h_ref, o_ref = st["h"][rows].clone(), st["o"][rows].clone()
    for t in (st["h"], st["o"]):
        t.copy_(poisoned(t.shape, t.dtype, t.device))
    o = run()
    assert o is st["o"]
    assert torch.equal(st["h"][rows].view(torch.int16), h_ref.view(torch.int16))
    assert torch.equal(o[rows].view(torch.int16), o_ref.view(torch.int16))
    y = moe_combine(o, st["plan"].inv_perm, tw, out_dtype=hidden.dtype)
    ref = fp8_deep.moe_forward(hidden, q13, q2, tw, tid, w13_scale=s13, w2_scale=s2, backend="triton")
    assert torch.equal(y, ref)


def test_bench_models_plumbing(capsys):
    """bench/bench_models.py on the CPU (interpreter, a tiny layer): every provider that runs here checks against the
    BF16 MoE and lands in the summary."""
    with bench_module("bench_models") as bm:
        assert bm.main(["--cpu-smoke", "--providers", "bf16", "ours_triton", "ours_auto", "--tag", "_test"]) == 0
    out = capsys.readouterr().out
    assert "SUMMARY bench_models  tiny  1" in out and "CHECK FAILED" not in out


def test_ab_env_parsing(peer):
    """``--ab`` values: a comma starts a new variable only before an FP8_DEEP_ / TRITON_ name, so a config string
    or an integer list keeps its commas; a first piece that assigns nothing is refused."""
    assert peer.parse_ab_env("FP8_DEEP_DECODE=0,FP8_DEEP_ROUTED=0") == {"FP8_DEEP_DECODE": "0",
                                                                        "FP8_DEEP_ROUTED": "0"}
    assert peer.parse_ab_env("FP8_DEEP_DECODE_CONFIG=BLOCK_N=64,TMA_B=1,num_stages=6,FP8_DEEP_PDL=0") == {
        "FP8_DEEP_DECODE_CONFIG": "BLOCK_N=64,TMA_B=1,num_stages=6", "FP8_DEEP_PDL": "0"}
    assert peer.parse_ab_env("CUDA_LAUNCH_BLOCKING=1") == {"CUDA_LAUNCH_BLOCKING": "1"}
    assert peer.parse_ab_env("FP8_DEEP_PERMUTE_CONFIG=16,512") == {"FP8_DEEP_PERMUTE_CONFIG": "16,512"}
    with pytest.raises(ValueError, match="not ENV=VALUE"):
        peer.parse_ab_env("oops,FP8_DEEP_PDL=0")
