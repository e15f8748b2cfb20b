"""One-launch quantization of separate same-shape weights (``ops.quantize_weights_grouped`` /
``ops.GroupedWeightQuant``): byte for byte ``quantize_weight_blockwise`` of each tensor, outputs in place, a prepared
group re-run after an in-place update, and clear errors. On the CPU the kernel runs through the interpreter (its
address table then holds host addresses), so the table path itself is what these tests cover."""
import pytest
import torch

from fp8_deep import ops
from fp8_deep.numerics import FP8_DTYPE
from fp8_deep.testing import assert_bitwise_equal, poisoned


def _weights(n, shape, dtype, device, seed=0, stride_pad=0):
    """``n`` separate tensors (each its own allocation); ``stride_pad`` > 0 makes them column-slices of wider rows."""
    g = torch.Generator().manual_seed(seed)
    ws = []
    for i in range(n):
        full = torch.randn(shape[0], shape[1] + stride_pad, generator=g) * (10.0 ** (i % 3 - 1))
        ws.append(full.to(dtype).to(device)[:, stride_pad:])
    return ws


def _expect(ws, scale_fmt):
    return [ops.quantize_weight_blockwise(w, scale_fmt=scale_fmt) for w in ws]


@pytest.mark.parametrize("shape,dtype,pad", [((256, 384), torch.bfloat16, 0), ((200, 300), torch.float32, 0),
                                             ((130, 129), torch.float16, 3)])
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_matches_per_tensor(shape, dtype, pad, scale_fmt, device):
    ws = _weights(3, shape, dtype, device, stride_pad=pad)
    ws[1][5, 7] = float("nan")  # one non-finite block: scale NaN, every q of it NaN
    ws[2][-1, -1] = float("inf")
    qs, ss = ops.quantize_weights_grouped(ws, scale_fmt=scale_fmt)
    assert len(qs) == len(ss) == 3
    assert qs[0].untyped_storage().data_ptr() == qs[2].untyped_storage().data_ptr()  # one stack, n views
    for (q, s), (rq, rs) in zip(zip(qs, ss), _expect(ws, scale_fmt)):
        assert_bitwise_equal(q, rq, "q")
        assert_bitwise_equal(s, rs, "scale")


def test_out_in_place_and_rerun(device):
    """Outputs of an engine's layout (q rows padded, scales transposed in memory) written in place; a prepared group
    re-run after an in-place update of its weights quantizes the new values into the same buffers."""
    ws = _weights(4, (256, 256), torch.bfloat16, device, seed=1)
    q_store = torch.empty(4, 256, 320, dtype=torch.uint8, device=device).view(FP8_DTYPE)
    qs = [q_store[i, :, :256] for i in range(4)]
    s_store = torch.empty(4, 2, 2, dtype=torch.float32, device=device)
    ss = [s_store[i].t() for i in range(4)]
    for t in ss:
        t.copy_(poisoned(t.shape, t.dtype, t.device))
    group = ops.GroupedWeightQuant(ws, out=(qs, ss))
    rq, rs = group()
    assert rq[2] is qs[2] and rs[3] is ss[3]
    for q, s, (eq, es) in zip(qs, ss, _expect(ws, "fp32")):
        assert_bitwise_equal(q.contiguous(), eq, "q")
        assert_bitwise_equal(s.contiguous(), es, "scale")
    with torch.no_grad():
        for w in ws:
            w.mul_(-3.0)  # an optimizer step: in place, same addresses
    group.run()
    for q, s, (eq, es) in zip(qs, ss, _expect(ws, "fp32")):
        assert_bitwise_equal(q.contiguous(), eq, "q after the update")
        assert_bitwise_equal(s.contiguous(), es, "scale after the update")


def test_one_tensor_and_empty(device):
    (w,) = _weights(1, (128, 128), torch.bfloat16, device)
    qs, ss = ops.quantize_weights_grouped([w])
    eq, es = ops.quantize_weight_blockwise(w)
    assert_bitwise_equal(qs[0], eq)
    assert_bitwise_equal(ss[0], es)
    qs, ss = ops.quantize_weights_grouped([torch.empty(0, 256, device=device, dtype=torch.bfloat16)] * 2)
    assert qs[0].shape == (0, 256) and ss[0].shape == (0, 2)


def test_bad_input(device):
    ws = _weights(3, (128, 256), torch.bfloat16, device)
    with pytest.raises(TypeError, match="non-empty list"):
        ops.quantize_weights_grouped([])
    with pytest.raises(TypeError, match="non-empty list"):
        ops.quantize_weights_grouped(torch.stack(ws))
    with pytest.raises(ValueError, match="2-D"):
        ops.quantize_weights_grouped([torch.stack(ws)])
    with pytest.raises(TypeError, match=r"ws\[1\] must be bfloat16"):
        ops.quantize_weights_grouped([ws[0], ws[1].to(FP8_DTYPE)])
    with pytest.raises(ValueError, match=r"ws\[2\] is \(128, 128\)"):
        ops.quantize_weights_grouped([ws[0], ws[1], ws[2][:, :128]])
    with pytest.raises(ValueError, match=r"ws\[1\].*float32"):
        ops.quantize_weights_grouped([ws[0], ws[1].float()])
    with pytest.raises(ValueError, match=r"ws\[1\].*strides \(1, 128\)"):
        ops.quantize_weights_grouped([ws[0], ws[1].t().contiguous().t()])
    with pytest.raises(ValueError, match="scale_fmt"):
        ops.quantize_weights_grouped(ws, scale_fmt="e8m0")
    qs = [torch.empty(128, 256, dtype=FP8_DTYPE, device=device) for _ in ws]
    ss = [torch.empty(1, 2, dtype=torch.float32, device=device) for _ in ws]
    with pytest.raises(ValueError, match="two lists of 3"):
        ops.quantize_weights_grouped(ws, out=(qs[:2], ss))
    with pytest.raises(TypeError, match=r"out\[1\]\[0\] must have dtype"):
        ops.quantize_weights_grouped(ws, out=(qs, [s.double() for s in ss]))
    with pytest.raises(ValueError, match=r"out\[0\]\[1\] must have strides"):
        ops.quantize_weights_grouped(ws, out=([qs[0], qs[1].t().contiguous().t(), qs[2]], ss))
    with pytest.raises(ValueError, match="share memory"):  # two outputs on one buffer
        ops.quantize_weights_grouped(ws, out=([qs[0], qs[0], qs[2]], ss))
    with pytest.raises(ValueError, match="share memory"):  # an output over a source
        over = ws[1].view(torch.uint8).view(-1)[: 128 * 256].view(128, 256).view(FP8_DTYPE)
        ops.quantize_weights_grouped(ws, out=([qs[0], over, qs[2]], ss))
    with pytest.raises(ValueError, match="share memory"):  # an expand()ed scale buffer
        ops.quantize_weights_grouped(ws, out=(qs, [s[:, :1].expand(1, 2) for s in ss]))


def test_sources_may_overlap(device):
    """Inputs are only read: views sharing memory (one buffer read twice) are fine."""
    (w,) = _weights(1, (128, 256), torch.bfloat16, device)
    qs, ss = ops.quantize_weights_grouped([w, w])
    assert_bitwise_equal(qs[0], qs[1])
    assert_bitwise_equal(ss[0], ss[1])


@pytest.mark.gpu
def test_gpu_many_tensors_and_graph():
    """Qwen3-30B-A3B-like experts (128 separate 768x2048 weights): bit-exact, and a prepared group replays inside a
    CUDA graph (no host synchronization, fixed addresses)."""
    ws = _weights(128, (768, 2048), torch.bfloat16, "cuda", seed=2)
    group = ops.GroupedWeightQuant(ws)
    qs, ss = group()
    for i in (0, 63, 127):
        eq, es = ops.quantize_weight_blockwise(ws[i])
        assert_bitwise_equal(qs[i], eq)
        assert_bitwise_equal(ss[i], es)
    group()  # the bound launch
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        group()
    with torch.no_grad():
        for w in ws:
            w.mul_(2.0)
    graph.replay()
    torch.cuda.synchronize()
    eq, es = ops.quantize_weight_blockwise(ws[5])
    assert_bitwise_equal(qs[5], eq)
    assert_bitwise_equal(ss[5], es)
