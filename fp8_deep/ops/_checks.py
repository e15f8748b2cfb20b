"""Argument checks shared by the launchers: every message names the argument, what it got and what to do."""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch

from ..numerics import FP8_MAX


def check_tensor(t, name: str, *, dtypes: Optional[Iterable[torch.dtype]] = None, dims: Optional[Sequence[int]] = None,
                 device: Optional[torch.device] = None, last_stride_one: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{name} must be {' or '.join(f'{d}-D' for d in dims)}, got shape {tuple(t.shape)}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}; move it with .to({str(device)!r})")
    if last_stride_one and t.numel() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dimension (got strides {t.stride()}); "
                         f"pass {name}.contiguous()")


def check_choice(value, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_out(buf, name: str, shape, dtype: torch.dtype, device, strides=None) -> None:
    """A caller-owned output buffer must match exactly: we never silently reallocate or copy."""
    check_tensor(buf, name, dtypes=(dtype,), device=device)
    if tuple(buf.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(buf.shape)}")
    if strides is not None and buf.numel() > 0 and tuple(buf.stride()) != tuple(strides):
        raise ValueError(f"{name} must have strides {tuple(strides)}, got {tuple(buf.stride())}")


def check_int(value, name: str, what: str = "an int") -> None:
    if type(value) is not int:  # bool is an int subclass, a float may hash like an int: both rejected
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")


def is_int_pair(value) -> bool:
    """A tuple or list of exactly two ints (bools and floats excluded: ``(128.0, 128.0)`` hashes like the ints)."""
    return type(value) in (tuple, list) and len(value) == 2 and all(type(v) is int for v in value)


# eps / 448 is a group's smallest scale: below the smallest normal float32 the GPU's division flushes it to zero
# (scale 0, q NaN) where the CPU keeps a subnormal, and far below it every path divides by zero
EPS_RANGE = (FP8_MAX * 2.0 ** -126, float(torch.finfo(torch.float32).max))


def check_eps(eps) -> None:
    lo, hi = EPS_RANGE
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or not lo <= eps <= hi:
        raise ValueError(f"eps must be a float in [{lo:.3g}, {hi:.3g}] (eps / 448 must be a normal float32), "
                         f"got {eps!r}")


def byte_span(t: torch.Tensor) -> int:
    """Bytes from ``t.data_ptr()`` to one past the last element ``t`` can address (0 when empty)."""
    if t.numel() == 0:
        return 0
    return (sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def any_overlap(ranges: Iterable) -> bool:
    """Whether two of the byte ranges ``(start, end)`` intersect (empty ones never do). Sorted by start, an
    intersecting pair implies an intersecting neighbour pair. The launch-plan replays' check: their inputs are one
    tensor, so any overlap is one check_outputs_disjoint rejects."""
    ranges = sorted(r for r in ranges if r[1] > r[0])
    return any(b0 < a1 for (_, a1), (b0, _) in zip(ranges, ranges[1:]))


def check_outputs_disjoint(inputs: Sequence, outputs: Sequence) -> None:
    """Caller-owned outputs must not overlap themselves (``expand``ed buffers), each other or an input: the kernel's
    programs would race on shared bytes or overwrite input they have not read yet. ``inputs`` / ``outputs``:
    ``(name, tensor)`` pairs (inputs may overlap each other: they are only read). Address ranges are compared, so
    interleaved views of one buffer count as overlapping too."""
    for name, buf in outputs:
        if buf.numel() > 1 and torch._debug_has_internal_overlap(buf) == 1:
            raise ValueError(f"{name} has elements that share memory (an expand()ed view?); pass a buffer with "
                             f"distinct elements")
    # sorted by start address, an intersecting pair is caught when its later member is reached: an output against
    # every span before it, an input against the outputs before it (inputs may overlap each other). O(n log n): the
    # grouped launchers pass hundreds of tensors
    spans = sorted([(t.data_ptr(), t.data_ptr() + byte_span(t), False, name) for name, t in inputs if t.numel()]
                   + [(t.data_ptr(), t.data_ptr() + byte_span(t), True, name) for name, t in outputs if t.numel()])
    end_all = end_out = (-1, None)
    for start, end, is_out, name in spans:
        hit = end_all if is_out else end_out
        if start < hit[0]:
            raise ValueError(f"{hit[1]} and {name} share memory: outputs must not overlap the inputs or each other")
        end_all = max(end_all, (end, name))
        if is_out:
            end_out = max(end_out, (end, name))
