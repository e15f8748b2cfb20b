"""Argument checks shared by the launchers: every message names the argument, what it got and what to do."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch


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
