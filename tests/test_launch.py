"""ops._launch: the cached-kernel launch keys on (a superset of) Triton's specializations and relaunches correctly."""
import pytest
import torch
import triton
import triton.language as tl

from fp8_deep.ops import _launch
from fp8_deep.ops._launch import _spec, launch


def test_spec_distinguishes_every_triton_specialization():
    # ints: == 1, % 16, and the width class are what Triton specializes on; each must change the key
    assert _spec(1, False) != _spec(2, False)
    assert _spec(16, False) != _spec(17, False)
    assert _spec(2 ** 31 - 16, False) != _spec(2 ** 31 + 16, False)
    assert _spec(2 ** 32 + 16, False) != _spec(2 ** 31 + 16, False)
    assert _spec(32, False) == _spec(48, False)  # same specialization, same compiled kernel
    # constexprs and bools by value, floats by type
    assert _spec(16, True) != _spec(32, True)
    assert _spec(True, False) != _spec(False, False)
    assert _spec(0.5, False) == _spec(2.0, False)
    # CPU tensors and unknown objects take the plain path
    assert _spec(torch.zeros(4), False) is None
    assert _spec(1, False) != _spec(True, False)
    assert _spec(object(), False) is None


@triton.jit
def _axpy_kernel(x_ptr, y_ptr, n, a, BLOCK: tl.constexpr, NEG: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m)
    tl.store(y_ptr + offs, (-a if NEG else a) * x + 1.0, mask=m)


@pytest.mark.gpu
def test_cached_launch_matches_plain_launch_gpu(monkeypatch):
    _launch._CACHE.clear()
    base = torch.randn(4099, device="cuda")
    cases = []
    for n in (4096, 4097, 1, 17):            # n % 16 == 0, odd, == 1
        for off in (0, 1):                   # 16-byte aligned and misaligned pointers
            for neg in (False, True):        # a constexpr
                cases.append((n, off, neg))
    for _ in range(2):  # the second round relaunches every key from the cache
        for n, off, neg in cases:
            x = base[off:off + n]
            y = torch.full_like(x, float("nan"))
            launch(_axpy_kernel, (triton.cdiv(n, 256),), x, y, n, 0.5, BLOCK=256, NEG=neg, num_warps=4)
            expect = (-0.5 if neg else 0.5) * x + 1.0
            assert torch.equal(y, expect), (n, off, neg)
    # 4097 and 17 share Triton's specialization (neither 1 nor a multiple of 16): 3 x 2 x 2 kernels
    assert len(_launch._CACHE) == 12
    monkeypatch.setattr(_launch, "ENABLED", False)
    y = torch.empty(5, device="cuda")
    launch(_axpy_kernel, (1,), base[:5], y, 5, 2.0, BLOCK=256, NEG=False, num_warps=4)
    assert torch.equal(y, 2.0 * base[:5] + 1.0)
