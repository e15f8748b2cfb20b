from __future__ import annotations

import torch


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's / vLLM's global error metric: ``1 - 2*sum(x*y) / sum(x*x + y*y)`` in float64 (0 = identical)."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    if denom == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denom)


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.double(), test.double()
    noise = (ref - test).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise)) if noise > 0 else float("inf")


def _bits(t: torch.Tensor) -> torch.Tensor:
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(view)


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, name: str = "tensor") -> None:
    """Byte-for-byte equality (NaNs with equal payloads are equal); reports the first mismatching index."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{name}: dtype {actual.dtype} != expected {expected.dtype}")
    a, e = _bits(actual.cpu()), _bits(expected.cpu())
    mism = (a != e).nonzero()
    if mism.numel():
        idx = tuple(mism[0].tolist())
        raise AssertionError(
            f"{name}: {mism.shape[0]} of {a.numel()} elements differ; first at {idx}: "
            f"got {actual.cpu()[idx].float().item()!r} (bits {a[idx].item():#x}), "
            f"expected {expected.cpu()[idx].float().item()!r} (bits {e[idx].item():#x})")
