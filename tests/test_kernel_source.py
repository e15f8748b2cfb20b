"""Source checks of the ``@triton.jit`` functions that the CPU interpreter cannot make.

A ``return`` inside an ``if`` on constexpr values, followed by more statements, runs as Python under the interpreter
but not when compiled: Triton's code generator visits only the taken branch of a constexpr ``if`` and then goes on
compiling the statements after it, dead code included. Triton 3.6 compiled such dead code silently where it happened
to type-check (and failed where it did not: a tensor descriptor handed to the pointer-load path); Triton 3.9 rejects
more of it. Every such helper is written as ``if``/``else`` assigning one value, returned once.
"""
import ast
import pathlib

import fp8_deep

KERNELS = pathlib.Path(fp8_deep.__file__).parent / "kernels"


def _constexpr_params(fn: ast.FunctionDef) -> set:
    return {a.arg for a in fn.args.args if a.annotation is not None and "constexpr" in ast.unparse(a.annotation)}


def _static_names(fn: ast.FunctionDef) -> set:
    """Names bound to compile-time values: constexpr parameters and ``NAME: tl.constexpr = ...`` locals."""
    names = _constexpr_params(fn)
    for node in ast.walk(fn):
        if isinstance(node, ast.AnnAssign) and "constexpr" in ast.unparse(node.annotation):
            names.add(node.target.id)
    return names


def _is_static(test: ast.expr, static: set) -> bool:
    names = {n.id for n in ast.walk(test) if isinstance(n, ast.Name)}
    return names <= static


def _returns(stmts) -> bool:
    return any(isinstance(n, ast.Return) for s in stmts for n in ast.walk(s))


def _early_static_returns(body, static, where, found):
    for i, stmt in enumerate(body):
        if (isinstance(stmt, ast.If) and _is_static(stmt.test, static) and i + 1 < len(body)
                and (_returns(stmt.body) or _returns(stmt.orelse))):
            found.append(f"{where}:{stmt.lineno}")
        for field in ("body", "orelse"):
            sub = getattr(stmt, field, None)
            if isinstance(sub, list):
                _early_static_returns(sub, static, where, found)


def _jit_functions():
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                yield path, node


def test_jit_functions_found():
    names = {fn.name for _, fn in _jit_functions()}
    assert {"_load_b", "_promote", "_grouped_gemm_swiglu_kernel"} <= names


def test_no_return_inside_a_constexpr_if_before_more_code():
    found = []
    for path, fn in _jit_functions():
        _early_static_returns(fn.body, _static_names(fn), f"{path.name}:{fn.name}", found)
    assert not found, ("return inside an `if` on constexpr values, followed by more statements (compiled as dead "
                       f"code on the GPU; write if/else and one return): {found}")


def test_checker_catches_the_pattern():
    src = ("@triton.jit\ndef f(x, FLAG: tl.constexpr):\n    if FLAG:\n        return x\n    return x + 1\n\n"
           "@triton.jit\ndef g(x, n):\n    if n > 0:\n        return\n    x = x + 1\n")
    found = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.FunctionDef):
            _early_static_returns(node.body, _static_names(node), node.name, found)
    assert found == ["f:3"]  # g's condition is a runtime value: a top-level early exit Triton supports


def test_fused_swiglu_variants_compile_for_sm90():
    """Every fused GEMM1 + SwiGLU variant and the block-map GEMM it must match compile for sm_90 with this Triton
    (no GPU needed: the wheel's ptxas), and each pair's K-block dot is the same MMA instruction: the interpreter
    cannot see either."""
    import os
    import subprocess
    import sys
    script = pathlib.Path(__file__).resolve().parent.parent / "bench" / "diag" / "swiglu_compile_check.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def _exercise_launchers():
    """A few launchers end to end, for a run of this file alone (the full suite records every test's launches)."""
    import torch

    from fp8_deep import moe_forward
    from fp8_deep.ops import quantize_activation, quantize_weight_blockwise
    torch.manual_seed(0)
    quantize_weight_blockwise(torch.randn(2, 256, 384, dtype=torch.bfloat16))
    quantize_activation(torch.randn(8, 256, dtype=torch.bfloat16))
    T, H, I, E, k = 4, 256, 128, 4, 2
    tw, ids = torch.topk(torch.softmax(torch.randn(T, E), -1), k)
    moe_forward(torch.randn(T, H, dtype=torch.bfloat16), torch.randn(E, 2 * I, H, dtype=torch.bfloat16) * 0.05,
                torch.randn(E, H, I, dtype=torch.bfloat16) * 0.05, tw, ids.int(), backend="triton")


def _every_gemm_config(monkeypatch):
    """``grouped_gemm_fp8`` with each candidate of bench/tune_grouped_gemm.py (and the fused GEMM1 + SwiGLU's block-map
    variants) on a small MoE-shaped problem; returns the configurations the launcher refused on this machine."""
    import torch

    from conftest import bench_module
    from fp8_deep.numerics import FP8_DTYPE
    from fp8_deep.ops import align_routing, grouped_gemm_fp8, grouped_gemm_swiglu_fp8, permute_rows, \
        quantize_activation
    E, N, K, T, k = 4, 256, 384, 8, 2
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int()
    plan = align_routing(ids, E, block_size=16)
    a, sa = permute_rows(*quantize_activation(torch.randn(T, K, dtype=torch.bfloat16)), plan)
    b = torch.zeros(E, N, K, dtype=FP8_DTYPE)
    sb = torch.ones(E, N // 128, K // 128)
    bmap = (plan.expert_ids, plan.m_indices, plan.block_size)
    refused = []
    with bench_module("tune_grouped_gemm") as tune:
        for cfg in tune.candidates():
            try:
                grouped_gemm_fp8(a, sa, b, sb, plan.expert_offsets, plan.expert_counts, config=cfg,
                                 block_map=bmap if cfg.BLOCK_MAP else None)
            except (ValueError, RuntimeError, NotImplementedError) as exc:  # e.g. Gluon without a GPU
                refused.append(f"{cfg}: {exc}"[:200])
    from fp8_deep.ops.grouped_gemm import FUSED_SWIGLU_ENV
    monkeypatch.setenv(FUSED_SWIGLU_ENV, "1")
    for tma in (0, 1):  # the fused kernel runs swap-AB tiles only
        cfg = f"BLOCK_M=16,BLOCK_N=128,GROUP_M=1,SWAP_AB=1,BLOCK_MAP=1,TMA_B={tma},num_warps=4,num_stages=2"
        grouped_gemm_swiglu_fp8(a, sa, b, sb, plan.expert_offsets, plan.expert_counts, bmap, config=cfg)
    # the decode path's GEMMs with each candidate of bench/tune_decode.py, the combine in GEMM2's tail or not
    from fp8_deep.ops.decode import decode_counters, moe_decode_gemm1, moe_decode_gemm2
    x = torch.randn(T, K, dtype=torch.bfloat16)
    b2 = torch.zeros(E, K, N // 2, dtype=FP8_DTYPE)
    sb2 = torch.ones(E, K // 128, N // 256)
    counters = decode_counters(K, "cpu")
    tw = torch.ones(T, k)
    with bench_module("tune_decode") as tune:
        for i, cfg in enumerate(tune.candidates()):
            h, inv = moe_decode_gemm1(x, ids, b, sb, config=cfg, counters=counters)
            moe_decode_gemm2(h, ids, b2, sb2, config=cfg, combine=(tw, inv, counters) if i % 2 else None)
        # the gathered GEMM1's tiles (each height with a plan aligned to it)
        from fp8_deep.ops.grouped_gemm import grouped_gemm_fp8_gather
        qx, sx = quantize_activation(x)
        for cfg in tune.gather_candidates():
            gplan = align_routing(ids, E, block_size=max(16, cfg.BLOCK_M))
            grouped_gemm_fp8_gather(qx, sx, b, sb, gplan, config=cfg)
    return refused


def _with_pdl(launches):
    """One launch of each kernel with a ``USE_PDL`` parameter again, as the GPU launches it on SM90+ (prologue on,
    ``launch_pdl``): the interpreter never runs with it (``ops._launch.pdl`` is off for CPU tensors). The prologue
    does not depend on the rest of the specialization: one compile per kernel keeps the CPU suite's time."""
    import dataclasses
    import importlib
    import inspect
    out, seen = [], set()
    for rec in launches:
        fn = getattr(importlib.import_module(rec.module), rec.name)
        if rec.name not in seen and "USE_PDL" in inspect.signature(getattr(fn, "fn", fn)).parameters:
            seen.add(rec.name)
            out.append(dataclasses.replace(rec, kwargs={**rec.kwargs, "USE_PDL": True, "launch_pdl": True}))
    assert out, "no recorded launch of a PDL kernel"
    return out


def test_recorded_launches_compile_for_sm90(recorded_launches, tmp_path, monkeypatch):
    """Every distinct kernel specialization the interpreter ran in this pytest run (every test before this one, which
    conftest runs last) compiles for sm_90 with this Triton: branches the interpreter never type-checks, dot
    lowering, ptxas. A run of this file alone compiles a few launchers' kernels instead."""
    import os
    import pickle
    import subprocess
    import sys

    import pytest
    from fp8_deep.numerics import interpreter_active
    from fp8_deep.testing.compile_check import record_launches
    if not interpreter_active():
        pytest.skip("records interpreted launches: runs in the CPU suite (the GPU compiles every kernel it runs)")
    launches = list(recorded_launches)
    if len({(r.module, r.name) for r in launches}) < 5:
        with record_launches(execute=True) as more:
            _exercise_launchers()
        launches += more
    with record_launches(execute=False) as configs:  # every tile family the tuner may pick, launched, not run
        refused = _every_gemm_config(monkeypatch)
    assert len(configs) >= 20, (len(configs), refused)
    launches += configs
    launches += _with_pdl(launches)
    path = tmp_path / "launches.pkl"
    with open(path, "wb") as f:
        pickle.dump(launches, f)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "fp8_deep.testing.compile_check", str(path)], capture_output=True,
                         text=True, env=env, timeout=1800)
    print(res.stdout[-3000:])
    if os.environ.get("FP8_DEEP_KEEP_LAUNCHES"):  # for a look at what was compiled
        import shutil
        shutil.copy(path, os.environ["FP8_DEEP_KEEP_LAUNCHES"])
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert "distinct kernels compiled" in res.stdout


def test_gluon_configs_compile_for_sm90():
    """The Gluon grouped-GEMM configurations (the tuned tables' pick at large T on the H100), which the interpreter
    cannot run at all, compile for sm_90 with this Triton (bench/diag/gluon_compile_check.py, no GPU needed)."""
    import os
    import subprocess
    import sys

    import pytest
    from fp8_deep.kernels import grouped_gemm_gluon as gk
    if not gk.GLUON_AVAILABLE:
        pytest.skip("this Triton has no Gluon: the launcher never picks a Gluon configuration")
    script = pathlib.Path(__file__).resolve().parent.parent / "bench" / "diag" / "gluon_compile_check.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert res.stdout.count(": ok ") >= 2, res.stdout[-2000:]


def test_every_launch_pins_fma_contraction():
    """Each ``kernel[grid](...)`` of the launchers passes ``enable_fp_fusion`` (``**FP_FUSION``, or False where the
    kernel matches torch's eager rounding): Triton 3.10 changes the default, and the bytes were verified under it on."""
    launchers = pathlib.Path(fp8_deep.__file__).parent / "ops"
    unpinned, count = [], 0
    for path in sorted(launchers.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                count += 1
                kws = {k.arg for k in node.keywords} | {ast.unparse(k.value) for k in node.keywords if k.arg is None}
                if not ({"enable_fp_fusion", "FP_FUSION"} & kws):
                    unpinned.append(f"{path.name}:{node.lineno} {ast.unparse(node.func)}")
    assert count >= 15, count
    assert not unpinned, unpinned
