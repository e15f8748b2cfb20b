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
    if actual.device == expected.device and torch.equal(_bits(actual), _bits(expected)):
        return  # compared where the tensors live (a GPU test's 235 MB need no trip through the host)
    a, e = _bits(actual.cpu()), _bits(expected.cpu())
    mism = (a != e).nonzero()
    if mism.numel():
        idx = tuple(mism[0].tolist())
        raise AssertionError(
            f"{name}: {mism.shape[0]} of {a.numel()} elements differ; first at {idx}: "
            f"got {actual.cpu()[idx].float().item()!r} (bits {a[idx].item():#x}), "
            f"expected {expected.cpu()[idx].float().item()!r} (bits {e[idx].item():#x})")


# NaN payloads no kernel produces: an output element still holding one was never written
POISON_BITS = {torch.bfloat16: (torch.int16, 0x7FC1), torch.float16: (torch.int16, 0x7E01),
               torch.float32: (torch.int32, 0x7FC00001)}


def poisoned(shape, dtype, device) -> torch.Tensor:
    """A tensor of ``shape`` whose every element is the poison NaN of ``dtype`` (bf16, fp16, fp32)."""
    view, bits = POISON_BITS[dtype]
    return torch.full(shape, bits, dtype=view, device=device).view(dtype)


def is_poison(t: torch.Tensor) -> torch.Tensor:
    """Elementwise: still the poison value (never written)."""
    view, bits = POISON_BITS[t.dtype]
    return t.contiguous().view(view) == bits
