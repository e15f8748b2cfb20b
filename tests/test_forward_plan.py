"""Launch plans of the MoE forward (``fp8_deep.moe.plan``): a recorded call replayed with new per-call tensors.

CPU: the placement of every argument (per-call tensor, static tensor, result, workspace intermediate), the replay's
addresses, the refusals, the torch-op guard and the list of environment switches. GPU: replays give the plain
path's bytes (fresh inputs, ``out=``, BF16 weights, CUDA-graph capture), and refused signatures keep working.
"""
import re
from pathlib import Path

import pytest
import torch

import fp8_deep
from fp8_deep.moe import plan as P
from fp8_deep.ops._launch import LaunchTape, PlanCache
from fp8_deep.testing import assert_bitwise_equal


class _Param:
    def __init__(self, name, default=None, has_default=False):
        self.name, self.default, self.has_default = name, default, has_default


class _Kernel:
    __name__ = "fake_kernel"
    params = [_Param("x"), _Param("w"), _Param("tmp"), _Param("res"), _Param("n"), _Param("FLAG", True, True)]


class _Compiled:
    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args, stream=None: self.calls.append((grid, args))


def _tape(calls, args, kwargs=None, grid=(4,)):
    tape = LaunchTape()
    tape.add(_Kernel(), _Compiled(calls), grid, args, kwargs or {})
    return tape


def test_plan_places_every_argument_and_replays_new_addresses():
    x = torch.randn(8, 16)
    w = torch.randn(4, 16)
    big = torch.empty(1000, dtype=torch.uint8)
    tmp = big[100:164]                 # an intermediate view 100 bytes into its storage
    res = torch.empty(8, 16)
    calls = []
    tape = _tape(calls, (x, w, tmp, res, 7))
    assert tape.ok and len(tape.launches) == 1 and tape.launches[0][2] == (4, 1, 1)
    plan = P.ForwardPlan.build(tape, (x, None), (w,), res, "triton")
    assert isinstance(plan, P.ForwardPlan), plan
    assert plan.ws_bytes == 1024  # the storage's 1000 bytes, aligned
    x2 = torch.randn(8, 16)
    out = plan.replay((x2, None))
    assert out.shape == res.shape and out.dtype == res.dtype and out.data_ptr() != res.data_ptr()
    grid, args = calls[-1]
    assert grid == (4, 1, 1)
    assert args[0] == x2.data_ptr() and args[1] == w.data_ptr() and args[3] == out.data_ptr()
    assert args[4] == 7 and args[5] is True  # a constant and a default parameter
    assert (2, 3, 100) in plan.launches[0][2]  # the intermediate: workspace slot (after x, out, result), offset 100
    # two launches, two intermediate allocations: each its own aligned region of the workspace
    calls.clear()
    tape = _tape(calls, (x, w, torch.empty(10, dtype=torch.uint8), res, 7))
    tape.add(_Kernel(), _Compiled(calls), (1,), (x, w, tmp, res, 7), {})
    plan = P.ForwardPlan.build(tape, (x, None), (w,), res, "triton")
    assert plan.ws_bytes == 512 + 1024
    assert plan.launches[0][2][1] == (2, 3, 0) and plan.launches[1][2][1] == (2, 3, 512 + 100)
    # a per-call tensor given as a view inside it (an offset of 2 rows) is placed by its extent
    calls.clear()
    tape = _tape(calls, (x[2:], w, tmp, res, 7))
    plan = P.ForwardPlan.build(tape, (x, None), (w,), res, "triton")
    plan.replay((x2, None))
    assert calls[-1][1][0] == x2.data_ptr() + 2 * 16 * 4


def test_plan_with_the_callers_out_and_refusals():
    x, w, res = torch.randn(8, 16), torch.randn(4, 16), torch.empty(8, 16)
    calls = []
    plan = P.ForwardPlan.build(_tape(calls, (x, w, torch.empty(4), res, 1)), (x, res), (w,), res, "triton")
    out2 = torch.empty(8, 16)
    assert plan.replay((x, out2)) is out2 and calls[-1][1][3] == out2.data_ptr()
    # the result a view of a larger allocation
    bigres = torch.empty(20, 16)
    why = P.ForwardPlan.build(_tape(calls, (x, w, x, bigres[:8], 1)), (x, None), (w,), bigres[:8], "triton")
    assert "fresh tensor" in why

    class _Desc:  # a tensor descriptor over an intermediate
        def __init__(self, base):
            self.base = base
    # a descriptor over an intermediate: rebuilt per replay over the workspace address of that intermediate
    inter = torch.empty(64)
    plan = P.ForwardPlan.build(_tape(calls, (x, _Desc(inter[8:]), inter, res, 1)), (x, None), (w,), res, "triton")
    assert isinstance(plan, P.ForwardPlan), plan
    plan.replay((x, None))
    args = calls[-1][1]
    assert args[1].base.data_ptr() == args[2] + 8 * 4 and not isinstance(args[1].base, torch.Tensor)
    assert plan.launches[0][1][1].base.data_ptr() == 0  # the template itself holds no address of that call
    ok = P.ForwardPlan.build(_tape(calls, (x, _Desc(w), x, res, 1)), (x, None), (w,), res, "triton")
    assert isinstance(ok, P.ForwardPlan)  # ... over a static tensor is a constant, holding its address only
    desc = ok.launches[0][1][1]
    assert not isinstance(desc.base, torch.Tensor) and desc.base.data_ptr() == w.data_ptr()
    # a parameter with neither a value nor a default; a grid function; a failed tape
    tape = LaunchTape()
    tape.add(_Kernel(), _Compiled(calls), (1,), (x, w, x), {})
    assert not tape.ok and "res has no value" in tape.why
    tape = LaunchTape()
    tape.add(_Kernel(), _Compiled(calls), lambda meta: (1,), (x, w, x, res, 1), {})
    assert not tape.ok and "grid is a function" in tape.why
    assert P.ForwardPlan.build(LaunchTape(), (x, None), (w,), res, "triton") == "no launches recorded"


class _FakePlan(P.ForwardPlan):
    def __init__(self, result):
        super().__init__([], 0, None, torch.device("cpu"), "triton")
        self.result = result

    def replay(self, dynamic):
        self.replays += 1
        if dynamic[-1] is not None:
            dynamic[-1].copy_(self.result)
            return dynamic[-1]
        return self.result.clone()


def test_first_replay_is_checked_against_the_plain_path():
    """Only a plan whose first replay gave the plain path's bytes is replayed alone afterwards; a mismatch retires
    the signature with a warning."""
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    ref = torch.randn(4, 8, dtype=torch.bfloat16)
    P.FORWARD_PLANS.clear()
    plain_calls = []

    def call():
        plain_calls.append(1)
        return ref.clone()
    good = _FakePlan(ref)
    P.FORWARD_PLANS.put("k", good)
    res, _ = P.forward("k", call, (x, None), (), ["triton"])
    assert_bitwise_equal(res, ref)
    assert good.verified and good.replays == 1 and len(plain_calls) == 1
    res, name = P.forward("k", call, (x, None), (), ["triton"])
    assert good.replays == 2 and len(plain_calls) == 1 and name == "triton"  # replayed alone now
    bad = _FakePlan(ref + 1)
    P.FORWARD_PLANS.put("k2", bad)
    with pytest.warns(RuntimeWarning, match="other bytes than the plain path"):
        res, _ = P.forward("k2", call, (x, None), (), ["triton"])
    assert_bitwise_equal(res, ref)  # the plain path's result is what the caller gets
    assert not bad.verified and P.FORWARD_PLANS._plans["k2"] == P.MAX_REFUSALS
    # with the caller's out: the replay goes to a temporary of the same layout, the plain path into out
    out_plan = _FakePlan(ref)
    P.FORWARD_PLANS.put("k3", out_plan)
    out = torch.empty(4, 8, dtype=torch.bfloat16)

    def call_out():
        out.copy_(ref)
        return out
    res, _ = P.forward("k3", call_out, (x, out), (), ["triton"])
    assert res is out and out_plan.verified
    P.FORWARD_PLANS.clear()


def test_op_guard_allows_allocations_and_views_only():
    tape = LaunchTape()
    with P._OpGuard(tape):
        t = torch.empty(4, 8)
        t.view(8, 4).t()[1:]
        torch.empty_strided((2, 3), (1, 2))
    assert tape.ok
    with P._OpGuard(tape):
        torch.zeros(3).add_(1)
    assert not tape.ok and "outside the recorded" in tape.why


def test_plan_cache_is_bypassed_while_recording():
    """A sub-launcher's own plan must not replay inside a recording (its launch would bypass Triton's run)."""
    from fp8_deep.ops import _launch
    cache = PlanCache()
    cache.put("k", "plan")
    assert cache.get("k") == "plan"
    _launch._LOCAL.tape = LaunchTape()
    try:
        assert cache.get("k") is None
    finally:
        _launch._LOCAL.tape = None


def test_every_environment_switch_is_keyed():
    """A switch the forward reads but the plan key ignores would replay a stale choice: every FP8_DEEP_* name in the
    package is in FORWARD_ENVS or named as read only by training / at import."""
    root = Path(fp8_deep.__file__).parent
    names = set()
    for f in root.rglob("*.py"):
        names |= set(re.findall(r'"(FP8_DEEP_[A-Z0-9_]+)"', f.read_text()))
    assert names, "no switches found: the pattern is stale"
    missing = names - set(P.FORWARD_ENVS) - set(P.TRAINING_ONLY_ENVS)
    assert not missing, f"add to FORWARD_ENVS (or TRAINING_ONLY_ENVS): {sorted(missing)}"


def test_env_values_follow_the_environment(monkeypatch):
    i = P.FORWARD_ENVS.index("FP8_DEEP_FUSED_SWIGLU")
    monkeypatch.delenv("FP8_DEEP_FUSED_SWIGLU", raising=False)
    assert P._env_values()[i] is None
    monkeypatch.setenv("FP8_DEEP_FUSED_SWIGLU", "0")
    assert P._env_values()[i] in ("0", b"0")
    assert P._env_values() != tuple([None] * len(P.FORWARD_ENVS))


def test_plans_are_off_on_the_cpu():
    assert not P.plans_usable(torch.zeros(1))


# ---------------------------------------------------------------------------------------------------------- GPU
def _layer(E, H, I, T, k, dev, fp8=True, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, device=dev, generator=g, dtype=torch.bfloat16) * 0.05
    w2 = torch.randn(E, H, I, device=dev, generator=g, dtype=torch.bfloat16) * 0.05
    if fp8:
        q13, s13 = fp8_deep.ops.quantize_weight_blockwise(w13)
        q2, s2 = fp8_deep.ops.quantize_weight_blockwise(w2)
        return dict(w13=q13, w2=q2, w13_scale=s13, w2_scale=s2)
    return dict(w13=w13, w2=w2)


def _routing(T, E, k, dev, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    logits = torch.randn(T, E, device=dev, generator=g)
    tw, ids = torch.topk(torch.softmax(logits, -1), k)
    return tw, ids.int()


# tiles whose weights come through a TMA descriptor (static: kept as an address in the plan)
TMA_B_TILES = "BLOCK_M=16,BLOCK_N=128,GROUP_M=1,SWAP_AB=1,BLOCK_MAP=1,TMA_B=1,num_warps=4,num_stages=3"


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 16, 64])
@pytest.mark.parametrize("fp8,tiles", [(True, None), (False, None), (True, TMA_B_TILES)],
                         ids=["fp8_weights", "bf16_weights", "tma_weight_tiles"])
def test_replay_equals_plain_path_gpu(T, fp8, tiles, monkeypatch):
    dev = "cuda"
    E, H, I, k = 64, 1024, 512, 8
    if tiles:
        monkeypatch.setenv("FP8_DEEP_GEMM_CONFIG", tiles)
    layer = _layer(E, H, I, T, k, dev, fp8=fp8)
    P.FORWARD_PLANS.clear()
    P.ForwardPlan.refusals.clear()
    for step in range(4):
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        tw, ids = _routing(T, E, k, dev, seed=step)
        with torch.no_grad():
            got = fp8_deep.moe_forward(x, topk_weights=tw, topk_ids=ids, backend="triton", **layer)
            monkeypatch.setenv(P.FORWARD_PLANS_ENV, "0")
            ref = fp8_deep.moe_forward(x, topk_weights=tw, topk_ids=ids, backend="triton", **layer)
            monkeypatch.delenv(P.FORWARD_PLANS_ENV)
        assert_bitwise_equal(got, ref, f"step {step}")
    plans = [p for p in P.FORWARD_PLANS._plans.values() if isinstance(p, P.ForwardPlan)]
    # step 0 records, step 1 checks its first replay against the plain path, steps 2-3 replay alone
    assert len(plans) == 1 and plans[0].replays == 3 and plans[0].verified, (P.FORWARD_PLANS._plans,
                                                                              P.ForwardPlan.refusals)
    assert fp8_deep.last_backend() == "triton"


@pytest.mark.gpu
def test_replay_with_out_and_in_a_cuda_graph_gpu():
    dev = "cuda"
    E, H, I, k, T = 32, 512, 256, 4, 8
    layer = _layer(E, H, I, T, k, dev)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    tw, ids = _routing(T, E, k, dev, seed=1)
    P.FORWARD_PLANS.clear()
    P.ForwardPlan.refusals.clear()
    out = torch.empty(T, H, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = fp8_deep.moe_forward(x, topk_weights=tw, topk_ids=ids, out=out, **layer).clone()  # records
        res = fp8_deep.moe_forward(x, topk_weights=tw, topk_ids=ids, out=out, **layer)        # checks a replay
        res = fp8_deep.moe_forward(x, topk_weights=tw, topk_ids=ids, out=out, **layer)        # replays
        assert res is out
        assert_bitwise_equal(out, ref)
        assert [(p.replays, p.verified) for p in P.FORWARD_PLANS._plans.values()] == [(2, True)], \
            P.ForwardPlan.refusals
        # in place (out = hidden_states): its own signature, never replayed (refused: per-call tensors overlap)
        for _ in range(3):
            x_in = x.clone()
            assert fp8_deep.moe_forward(x_in, topk_weights=tw, topk_ids=ids, out=x_in, **layer) is x_in
            assert_bitwise_equal(x_in, ref)
        assert P.MAX_REFUSALS in P.FORWARD_PLANS._plans.values() and P.ForwardPlan.refusals
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # record the out-less signature, check its first replay
                fp8_deep.moe_forward(x, topk_weights=tw, topk_ids=ids, **layer)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=s):
                gout = fp8_deep.moe_forward(x, topk_weights=tw, topk_ids=ids, **layer)
        torch.cuda.current_stream().wait_stream(s)
        x.copy_(torch.randn_like(x))
        graph.replay()
        ref2 = fp8_deep.moe_forward(x, topk_weights=tw, topk_ids=ids, **layer)
    torch.cuda.synchronize()
    assert_bitwise_equal(gout, ref2)
    # out= plan: its check + one replay; out-less: its check, the captured replay, the replay giving ref2
    assert sum(p.replays for p in P.FORWARD_PLANS._plans.values() if isinstance(p, P.ForwardPlan)) == 5


@pytest.mark.gpu
def test_large_batch_tiles_replay_gpu():
    """A large batch: TMA / Gluon tiles whose descriptors describe the activations (intermediates), rebuilt over each
    replay's workspace; replays give the plain path's bytes."""
    dev = "cuda"
    E, H, I, k, T = 8, 512, 256, 2, 4096
    layer = _layer(E, H, I, T, k, dev)
    P.FORWARD_PLANS.clear()
    P.ForwardPlan.refusals.clear()
    outs = []
    for step in range(4):
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16, generator=torch.Generator(device=dev).manual_seed(5))
        tw, ids = _routing(T, E, k, dev, seed=3)
        with torch.no_grad():
            outs.append(fp8_deep.moe_forward(x, topk_weights=tw, topk_ids=ids, backend="triton", **layer))
    for o in outs[1:]:
        assert_bitwise_equal(o, outs[0])
    plans = [p for p in P.FORWARD_PLANS._plans.values() if isinstance(p, P.ForwardPlan)]
    assert len(plans) == 1 and plans[0].verified and plans[0].replays == 3, P.ForwardPlan.refusals
