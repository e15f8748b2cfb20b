"""Programmatic dependent launch in the MoE forward's kernel chain (``fp8_deep/kernels/pdl.py``, ``ops._launch.pdl``).

CPU: the switch (off for CPU tensors, ``FP8_DEEP_PDL`` validated), and the rule PDL's correctness rests on, read
from the source: every kernel with a ``USE_PDL`` parameter calls ``pdl_prologue(USE_PDL)`` before anything else,
and every launch that passes ``**pdl(...)`` launches such a kernel. (tests/test_kernel_source.py compiles each
recorded launch for sm_90 with ``USE_PDL`` on as well.) GPU: the forward with PDL gives the bytes it gives without,
eagerly and as a CUDA-graph replay, at decode and prefill sizes, with each opt-in fusion.
"""
import ast
import pathlib

import pytest
import torch

import fp8_deep
from fp8_deep.ops._launch import PDL_ENV, pdl
from fp8_deep.testing import assert_bitwise_equal

PKG = pathlib.Path(fp8_deep.__file__).parent


def test_pdl_is_off_on_cpu_and_validates_its_switch(monkeypatch):
    x = torch.zeros(4)
    monkeypatch.delenv(PDL_ENV, raising=False)
    assert pdl(x) == {"USE_PDL": False}
    monkeypatch.setenv(PDL_ENV, "1")
    assert pdl(x) == {"USE_PDL": False}  # CPU tensors: never
    monkeypatch.setenv(PDL_ENV, "yes")
    with pytest.raises(ValueError, match="FP8_DEEP_PDL"):
        pdl(x)
    monkeypatch.setenv(PDL_ENV, "0")
    assert pdl(x) == {"USE_PDL": False}


def _kernels_with_pdl():
    found = {}
    for path in sorted((PKG / "kernels").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if (isinstance(node, ast.FunctionDef) and node.name != "pdl_prologue"
                    and any(a.arg == "USE_PDL" for a in node.args.args)):
                found[node.name] = (path.name, node)
    return found


def test_every_pdl_kernel_waits_first():
    """A kernel launched with PDL may run while its predecessor still writes: it must wait before any access."""
    found = _kernels_with_pdl()
    assert len(found) >= 9, sorted(found)
    for name, (fname, node) in found.items():
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # docstring
        first = ast.unparse(body[0])
        assert first == "pdl_prologue(USE_PDL)", f"{fname}:{name} starts with {first!r}"


def test_every_pdl_launch_targets_a_pdl_kernel():
    """``**pdl(t)`` sets ``launch_pdl`` and the kernel's ``USE_PDL`` together; a launch of a kernel without the
    parameter would be refused by Triton, and a PDL kernel launched without it never waits (then PDL is off: safe)."""
    kernels = _kernels_with_pdl()
    launches = 0
    for path in sorted((PKG / "ops").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                if any(k.arg is None and ast.unparse(k.value).startswith("pdl(") for k in node.keywords):
                    launches += 1
                    name = ast.unparse(node.func.value)
                    assert name in kernels, f"{path.name}:{node.lineno} {name} launched with pdl() has no USE_PDL"
    assert launches >= 10, launches


def _layer(E, H, I, dev):
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.randn(E, 2 * I, H, device=dev, generator=g, dtype=torch.bfloat16) * 0.05
    w2 = torch.randn(E, H, I, device=dev, generator=g, dtype=torch.bfloat16) * 0.05
    q13, s13 = fp8_deep.ops.quantize_weight_blockwise(w13)
    q2, s2 = fp8_deep.ops.quantize_weight_blockwise(w2)
    return dict(w13=q13, w2=q2, w13_scale=s13, w2_scale=s2)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 16, 256])
@pytest.mark.parametrize("fusion", [None, "FP8_DEEP_FUSED_SWIGLU", "FP8_DEEP_FUSED_ALIGN_QUANT",
                                    "FP8_DEEP_FUSED_QUANT_PERMUTE"])
def test_pdl_same_bytes_eager_and_graph_gpu(T, fusion, monkeypatch):
    dev = "cuda"
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs SM90+ (the launchers leave it off)")
    E, H, I, k = 128, 2048, 768, 8  # Qwen3-30B-A3B-sized
    layer = _layer(E, H, I, dev)
    monkeypatch.setenv("FP8_DEEP_DECODE", "0")  # the regular chain's fusions (tests/test_decode.py: PDL with decode)
    if fusion == "FP8_DEEP_FUSED_QUANT_PERMUTE":
        monkeypatch.setenv(fusion, "0")  # the two-launch quantize, then permute
    elif fusion:
        monkeypatch.setenv(fusion, "1")
    g = torch.Generator(device=dev).manual_seed(T)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16, generator=g)
    tw, ids = torch.topk(torch.softmax(torch.randn(T, E, device=dev, generator=g), -1), k)
    ids = ids.int()
    monkeypatch.setenv(PDL_ENV, "1")
    assert pdl(x) == {"USE_PDL": True, "launch_pdl": True}
    with torch.no_grad():
        monkeypatch.setenv(PDL_ENV, "0")
        ref = fp8_deep.moe_forward(x, topk_weights=tw, topk_ids=ids, backend="triton", **layer)
        monkeypatch.setenv(PDL_ENV, "1")
        for _ in range(3):  # plain path, recording, first replay
            assert_bitwise_equal(fp8_deep.moe_forward(x, topk_weights=tw, topk_ids=ids, backend="triton", **layer),
                                 ref, "eager")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=s):
                gout = fp8_deep.moe_forward(x, topk_weights=tw, topk_ids=ids, backend="triton", **layer)
        torch.cuda.current_stream().wait_stream(s)
        x2 = torch.randn(T, H, device=dev, dtype=torch.bfloat16, generator=g)
        monkeypatch.setenv(PDL_ENV, "0")
        ref2 = fp8_deep.moe_forward(x2, topk_weights=tw, topk_ids=ids, backend="triton", **layer)
        monkeypatch.setenv(PDL_ENV, "1")
        x.copy_(x2)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    assert_bitwise_equal(gout, ref2, "graph replay")
