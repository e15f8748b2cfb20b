"""Launchers run on their input's device, whatever device is current (``ops._launch.on_input_device``).

Triton launches on the current device's current stream. Without the guard a tensor on ``cuda:1`` while ``cuda:0`` is
current launched on GPU 0: an illegal-address error, or with peer access a kernel unordered with ``cuda:1``'s
stream. The two-GPU cases run on a two-GPU machine (``run(kind="nvidia-h100-x2")``); the guard's no-switch path
runs everywhere.
"""
import pytest
import torch

import fp8_deep
from fp8_deep import ops
from fp8_deep.ops._launch import on_input_device
from fp8_deep.testing import assert_bitwise_equal

TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (kind nvidia-h100-x2)")


def test_guard_keeps_current_device_and_passes_through(device):
    seen = []

    @on_input_device
    def probe(t, *args, **kwargs):
        """doc"""
        seen.append((torch.cuda.current_device() if torch.cuda.is_available() else None, args, kwargs))
        return t

    x = torch.zeros(2, device=device)
    assert probe(x, 1, k=2) is x
    assert probe([1], 3) == [1]  # not a tensor: no device query, the launcher's own checks handle it
    assert probe.__doc__ == "doc" and probe.__wrapped__ is not None
    before = torch.cuda.current_device() if torch.cuda.is_available() else None
    assert [s[0] for s in seen] == [before, before] and seen[0][1:] == ((1,), {"k": 2})


@pytest.mark.gpu
@TWO_GPUS
def test_launchers_on_a_non_current_gpu():
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    g = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(3, 300, 520, generator=g, device=dev).to(torch.bfloat16)
    x = torch.randn(77, 320, generator=g, device=dev).to(torch.bfloat16)
    with torch.cuda.device(1):
        want_w = ops.quantize_weight_blockwise(w, with_transpose=True)
        want_x = ops.quantize_activation(x, scale_layout="tma_aligned", backend="triton")
    torch.cuda.synchronize(1)
    for _ in range(2):  # the second call replays the launch plan the first one built
        assert torch.cuda.current_device() == 0
        got_w = ops.quantize_weight_blockwise(w, with_transpose=True)
        got_x = ops.quantize_activation(x, scale_layout="tma_aligned", backend="triton")
        assert torch.cuda.current_device() == 0  # the guard restores the caller's device
        for a, b in zip(got_w + got_x, want_w + want_x):
            assert a.device == dev
            assert_bitwise_equal(a, b)
        assert got_x[1].stride() == want_x[1].stride()

    # the whole forward (routing, permute, grouped GEMMs, SwiGLU, combine) on cuda:1 from cuda:0
    T, E, H, I, k = 9, 4, 256, 128, 2
    hidden = torch.randn(T, H, generator=g, device=dev).to(torch.bfloat16)
    w13 = (torch.randn(E, 2 * I, H, generator=g, device=dev) / H ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g, device=dev) / I ** 0.5).to(torch.bfloat16)
    tw, ids = torch.softmax(torch.randn(T, E, generator=g, device=dev), -1).topk(k, dim=-1)
    args = (hidden, w13, w2, tw / tw.sum(-1, keepdim=True), ids.to(torch.int32))
    with torch.cuda.device(1):
        want = fp8_deep.moe_forward(*args, backend="triton")
    got = fp8_deep.moe_forward(*args, backend="triton")
    assert got.device == dev and torch.cuda.current_device() == 0
    assert torch.equal(got, want)
