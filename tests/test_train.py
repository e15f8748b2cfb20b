"""Training: the FP8 MoE backward (fp8_deep.moe.autograd) against the FP8-emulated backward reference elementwise, against
float autograd of the same layer globally (SQNR), the reference itself against finite differences, FP8MoE training,
and the errors. CPU runs the kernels through the Triton interpreter: shapes stay small."""
import pytest
import torch

import fp8_deep
from fp8_deep import reference
from fp8_deep.testing import sqnr_db


def make_layer(T, E, H, I, k, device, *, dtype=torch.bfloat16, wdtype=torch.bfloat16, routing="random", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, H, generator=g, device=device).to(dtype)
    w13 = torch.randn(E, 2 * I, H, generator=g, device=device, dtype=wdtype).div_(H ** 0.5)
    w2 = torch.randn(E, H, I, generator=g, device=device, dtype=wdtype).div_(I ** 0.5)
    logits = torch.randn(T, E, generator=g, device=device)
    if routing == "one_expert":
        logits[:, 1] += 100.0
    w, ids = torch.softmax(logits, -1).topk(k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    gy = torch.randn(T, H, generator=g, device=device).to(dtype)
    return x, w13, w2, w.contiguous(), ids.to(torch.int32), gy


def run_fp8(x, w13, w2, tw, ids, gy, **kw):
    """(output, grad_x, grad_w13, grad_w2, grad_topk_weights) of fp8_deep.moe_forward under autograd."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w13, w2, tw)]
    y = fp8_deep.moe_forward(*leaves, ids, backend="triton", **kw)
    y.backward(gy)
    return (y.detach(), *(t.grad for t in leaves))


def float_grads(x, w13, w2, tw, ids, gy, expert_map=None):
    """Gradients of the same layer in float64 autograd, no quantization (the function the recipe approximates)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, w13, w2, tw)]
    y = reference.moe_forward_float(*leaves, ids, expert_map=expert_map)
    y.backward(gy.double())
    return [t.grad for t in leaves]


def assert_close_scaled(actual, expected, name, tol=0.035):
    """Elementwise within ``tol`` of the reference's largest magnitude plus ``tol`` relative (vLLM's 0.035 bar, made
    scale-free: gradients are not O(1) like activations)."""
    a, e = actual.float(), expected.float()
    scale = max(e.abs().max().item(), 1e-30)
    torch.testing.assert_close(a / scale, e / scale, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


CPU_CASES = [
    # (T, E, H, I, k, routing): ragged I (192 = 1.5 blocks), a K tail, one token, all tokens on one expert
    pytest.param(33, 4, 256, 192, 2, "random", id="ragged_I192"),
    pytest.param(7, 3, 128, 128, 3, "random", id="T7_E3_k3"),
    pytest.param(1, 4, 256, 128, 2, "random", id="T1"),
    pytest.param(20, 4, 128, 128, 2, "one_expert", id="one_expert"),
]


@pytest.mark.parametrize("T,E,H,I,k,routing", CPU_CASES)
def test_gradients_match_emulated_reference(device, T, E, H, I, k, routing):
    x, w13, w2, tw, ids, gy = make_layer(T, E, H, I, k, device, routing=routing)
    y, gx, g13, g2, gtw = run_fp8(x, w13, w2, tw, ids, gy)
    with torch.no_grad():  # the training forward computes the inference forward's function, bit for bit
        assert torch.equal(y, fp8_deep.moe_forward(x, w13, w2, tw, ids, backend="triton"))
    r = reference.moe_backward(gy, x, w13, w2, tw, ids)
    assert gx.dtype == x.dtype and g13.dtype == w13.dtype and g2.dtype == w2.dtype and gtw.dtype == tw.dtype
    for name, a, e in zip(("x", "w13", "w2", "topk_weights"), (gx, g13, g2, gtw), r):
        assert a.shape == e.shape, name
        assert torch.isfinite(a).all(), name
        assert_close_scaled(a, e, name)


def test_gradients_sqnr_vs_float_autograd(device):
    # Gaussian data at a shape with enough elements for SQNR to mean something (ragged I, 128-row segments)
    x, w13, w2, tw, ids, gy = make_layer(96, 4, 512, 192, 2, device)
    _, *fp8 = run_fp8(x, w13, w2, tw, ids, gy)
    for name, a, e in zip(("x", "w13", "w2", "topk_weights"), fp8, float_grads(x, w13, w2, tw, ids, gy)):
        assert sqnr_db(e, a.double()) >= 20.0, (name, sqnr_db(e, a.double()))


@pytest.mark.parametrize("T", [1, 7])
def test_gradients_sqnr_tiny_batches(device, T):
    # x and the weights: SQNR over thousands of elements; the T*k router-weight gradients are too few for a
    # meaningful SQNR (they are checked elementwise against the emulated reference above)
    x, w13, w2, tw, ids, gy = make_layer(T, 4, 256, 192, 2, device, seed=T)
    _, gx, g13, g2, _ = run_fp8(x, w13, w2, tw, ids, gy)
    fx, f13, f2, _ = float_grads(x, w13, w2, tw, ids, gy)
    for name, a, e in (("x", gx, fx), ("w13", g13, f13), ("w2", g2, f2)):
        assert sqnr_db(e, a.double()) >= 20.0, (name, sqnr_db(e, a.double()))


def test_reference_backward_is_the_gradient():
    """``reference.moe_backward(quantize=False)`` is the analytic gradient: finite differences in float64."""
    torch.manual_seed(0)
    T, E, H, I, k = 5, 3, 8, 6, 2
    ids = torch.softmax(torch.randn(T, E), -1).topk(k, -1).indices
    ids[0] = torch.tensor([2, 0])  # tokens in non-ascending expert order

    class Layer(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w13, w2, tw):
            ctx.save_for_backward(x, w13, w2, tw)
            return reference.moe_forward_float(x, w13, w2, tw, ids)

        @staticmethod
        def backward(ctx, gy):
            return reference.moe_backward(gy, *ctx.saved_tensors, ids, quantize=False)

    args = (torch.randn(T, H, dtype=torch.float64, requires_grad=True),
            torch.randn(E, 2 * I, H, dtype=torch.float64, requires_grad=True),
            torch.randn(E, H, I, dtype=torch.float64, requires_grad=True),
            torch.rand(T, k, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(Layer.apply, args, eps=1e-6, atol=1e-7)


def test_expert_map_and_ue8m0(device):
    x, w13, w2, tw, ids, gy = make_layer(24, 6, 256, 128, 2, device)
    # 6 global experts, this rank holds 0, 2, 4 as local 0..2: the other choices are dropped
    expert_map = torch.tensor([0, -1, 1, -1, 2, -1], dtype=torch.int32, device=device)
    local = (w13[::2].contiguous(), w2[::2].contiguous())
    _, gx, g13, g2, gtw = run_fp8(x, *local, tw, ids, gy, expert_map=expert_map, scale_fmt="ue8m0")
    r = reference.moe_backward(gy, x, *local, tw, ids, expert_map=expert_map, scale_fmt="ue8m0")
    for name, a, e in zip(("x", "w13", "w2", "topk_weights"), (gx, g13, g2, gtw), r):
        assert_close_scaled(a, e, name)
    dropped = expert_map[ids.long()] < 0
    assert torch.all(gtw[dropped] == 0)


def test_no_tokens(device):
    x, w13, w2, tw, ids, gy = make_layer(0, 4, 128, 128, 2, device)
    y, gx, g13, g2, gtw = run_fp8(x, w13, w2, tw, ids, gy)
    assert y.shape == (0, 128)
    assert gx.shape == x.shape and gtw.shape == tw.shape
    assert torch.all(g13 == 0) and torch.all(g2 == 0)


def test_fp8_weights_reused_and_deterministic(device):
    x, w13, w2, tw, ids, gy = make_layer(16, 4, 256, 128, 2, device)
    first = run_fp8(x, w13, w2, tw, ids, gy)
    fw = fp8_deep.quantize_moe_weights(w13, w2)
    assert fw.has_transpose
    again = run_fp8(x, w13, w2, tw, ids, gy, fp8_weights=fw)
    for a, b in zip(first, again):  # same bytes: the weights' quantization is the only thing reused
        assert torch.equal(a, b)
    # bitwise deterministic run to run
    for a, b in zip(first, run_fp8(x, w13, w2, tw, ids, gy)):
        assert torch.equal(a, b)


def test_main_grad_accumulation(device):
    x, w13, w2, tw, ids, gy = make_layer(16, 4, 256, 128, 2, device)
    _, _, g13, g2, _ = run_fp8(x, w13.float(), w2.float(), tw, ids, gy)  # float32 gradients, for the sum below
    p13, p2 = w13.clone().requires_grad_(), w2.clone().requires_grad_()
    p13.main_grad = torch.ones_like(p13, dtype=torch.float32)
    p2.main_grad = torch.zeros_like(p2, dtype=torch.float32)
    for _ in range(2):
        fp8_deep.moe_forward(x, p13, p2, tw, ids, backend="triton").backward(gy)
    assert p13.grad is None and p2.grad is None  # added into main_grad instead, as Megatron's fused path does
    torch.testing.assert_close(p13.main_grad, 1 + 2 * g13, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p2.main_grad, 2 * g2, atol=1e-5, rtol=1e-5)


def test_frozen_fp8_experts_train_input_and_router(device):
    x, w13, w2, tw, ids, gy = make_layer(16, 4, 256, 128, 2, device)
    q13, s13 = fp8_deep.ops.quantize_weight_blockwise(w13)
    q2, s2 = fp8_deep.ops.quantize_weight_blockwise(w2)
    xs, tws = x.clone().requires_grad_(), tw.clone().requires_grad_()
    fp8_deep.moe_forward(xs, q13, q2, tws, ids, w13_scale=s13, w2_scale=s2, backend="triton").backward(gy)
    # the same FP8 weights reached through float32 master weights that dequantize to them exactly
    d13 = fp8_deep.ops.dequantize_blockwise(q13, s13)
    d2 = fp8_deep.ops.dequantize_blockwise(q2, s2)
    _, gx, _, _, gtw = run_fp8(x, d13, d2, tw, ids, gy)
    assert torch.equal(xs.grad, gx) and torch.equal(tws.grad, gtw)


def test_training_errors(device):
    x, w13, w2, tw, ids, gy = make_layer(4, 4, 128, 128, 2, device)
    q13, s13 = fp8_deep.ops.quantize_weight_blockwise(w13)
    q2, s2 = fp8_deep.ops.quantize_weight_blockwise(w2)
    with pytest.raises(TypeError, match="FP8 weights cannot be trained"):
        fp8_deep.moe_forward(x, q13.requires_grad_(), q2, tw, ids, w13_scale=s13, w2_scale=s2)
    xs = x.clone().requires_grad_()
    with pytest.raises(ValueError, match="out= and return_stages are for inference"):
        fp8_deep.moe_forward(xs, w13, w2, tw, ids, out=torch.empty_like(x))
    p13 = w13.clone().requires_grad_()
    p13.main_grad = torch.zeros_like(p13)  # bf16: not a float32 accumulator
    with pytest.raises(TypeError, match="main_grad must be a float32"):
        fp8_deep.moe_forward(x, p13, w2, tw, ids)
    fw = fp8_deep.quantize_moe_weights(w13, w2, with_transpose=False)
    with pytest.raises(ValueError, match="transposed FP8 copies"):
        fp8_deep.moe_forward(xs, w13, w2, tw, ids, fp8_weights=fw)
    other = fp8_deep.quantize_moe_weights(w13[:, :128].contiguous(), w2[:, :, :64].contiguous())
    with pytest.raises(ValueError, match=r"fp8_weights.w13 must have shape"):
        fp8_deep.moe_forward(xs, w13, w2, tw, ids, fp8_weights=other)
    with pytest.raises(TypeError, match="fp8_weights must be an fp8_deep.MoEWeightsFP8"):
        fp8_deep.moe_forward(xs, w13, w2, tw, ids, fp8_weights=(q13, s13, q2, s2))


def test_fp8moe_trains(device):
    torch.manual_seed(0)
    m = fp8_deep.FP8MoE(4, 128, 128, 2, device=device, backend="triton", dtype=torch.float32)
    x = torch.randn(32, 128, device=device, dtype=torch.bfloat16)
    target = torch.randn(32, 128, device=device)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    losses = []
    for step in range(4):
        opt.zero_grad(set_to_none=True)
        loss = (m(x).float() - target).pow(2).mean()
        loss.backward()
        losses.append(loss.item())
        assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0  # the router learns too
        assert m.w13.grad.dtype == torch.float32 and m.w13.grad.abs().sum() > 0
        assert m.fp8_requantizations == step + 1  # once per optimizer step, with the transposed copies
        assert m.fp8_weights(with_transpose=True).has_transpose
        opt.step()
    assert losses[-1] < losses[0]
    with torch.no_grad():  # inference after training: the cached weights of the last step are refreshed once
        m(x)
    assert m.fp8_requantizations == 5


@pytest.mark.gpu
@pytest.mark.parametrize("E,H,I,rows", [(32, 7168, 2048, 256), (16, 2048, 1408, 200)])
def test_gradients_gpu_real_shapes(E, H, I, rows):
    k = 8
    T = rows * E // k
    x, w13, w2, tw, ids, gy = make_layer(T, E, H, I, k, "cuda")
    y, gx, g13, g2, gtw = run_fp8(x, w13, w2, tw, ids, gy)
    r = reference.moe_backward(gy, x, w13, w2, tw, ids)
    f32 = [t.detach().float().requires_grad_() for t in (x, w13, w2, tw)]
    yf = reference.moe_forward_float(*f32, ids)
    yf.backward(gy.float())
    for name, a, e, f in zip(("x", "w13", "w2", "topk_weights"), (gx, g13, g2, gtw), r, (t.grad for t in f32)):
        # the GPU's FP8 tensor cores accumulate ~14 bits inside each 128-K block (reference.block_scaled_matmul), which
        # moves intermediate values across FP8 rounding boundaries: hold the emulated reference globally there
        assert sqnr_db(e.double(), a.double()) >= 30.0, (name, sqnr_db(e.double(), a.double()))
        assert sqnr_db(f.double(), a.double()) >= 20.0, (name, sqnr_db(f.double(), a.double()))


@pytest.mark.gpu
def test_backward_cuda_graph_capture():
    x, w13, w2, tw, ids, gy = make_layer(256, 8, 512, 256, 2, "cuda")
    leaves = [t.detach().clone().requires_grad_() for t in (x, w13, w2, tw)]
    fw = fp8_deep.quantize_moe_weights(leaves[1], leaves[2])

    def step():
        y = fp8_deep.moe_forward(*leaves, ids, backend="triton", fp8_weights=fw)
        return torch.autograd.grad(y, leaves, gy)

    expect = step()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up on the side stream (compiles, plans)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, expect):
        assert torch.equal(a, b)
