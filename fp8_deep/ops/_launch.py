"""Launch plans: a launcher's validated call, remembered per call signature and replayed without the Python work.

Why: at M = 4096 x 7168 the activation quantizer's kernel takes ~35 us on an H100, while a call through the launcher
cost 60-91 us of host time (bench/diag_host.py): argument checks, environment reads, the (B, M, K) views, and
Triton's ``JITFunction.run`` (28-32 us: it re-derives every argument's specialization and the cache key on each
call). Back-to-back calls were bound by the host. A launcher that keys a plan on its *own* inputs (shapes, strides,
dtypes, device, 16-byte alignment of the data pointers, its options and the environment switches it reads) knows
that every check passed and every specialization Triton derives is the same as the first time, so the plan keeps:

* the compiled kernel bound to its grid (``CompiledKernel[grid]``, the call ``JITFunction.run`` itself ends in), and
* every non-tensor argument, constexprs included, in signature order.

A hit then costs the key, the output allocations and the compiled kernel's launch. (A generic cache keyed on each
kernel argument's specialization, tried in run be1830c, cost 34-40 us per launch: more than Triton's own binder.)

Plans are built only for CUDA tensors outside the interpreter, and only when the compiled kernel exposes the launch
interface (Triton 3.6 and 3.9 do); anything else keeps the plain path. ``FP8_DEEP_LAUNCH_PLANS=0`` (read at import)
disables them, for A/B runs, and when Triton's own per-launch machinery must run on every call (launch hooks,
debug knobs set after the first call): a replay bypasses ``JITFunction.run``.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Hashable, Optional, Sequence

import torch

__all__ = ["PlanCache", "bind_compiled", "PLANS_ENABLED", "on_input_device"]

PLANS_ENABLED = os.environ.get("FP8_DEEP_LAUNCH_PLANS", "1") != "0"


class PlanCache:
    """A bounded ``key -> plan`` map for one call site. Keys must capture everything the call's validation, kernel
    choice and Triton's specialization depend on; a key that distinguishes more only costs an extra plan."""

    def __init__(self, maxsize: int = 256):
        self.maxsize = maxsize
        self._plans: dict = {}
        self.hits = 0      # counters for tests and diagnostics
        self.builds = 0

    def get(self, key: Hashable):
        plan = self._plans.get(key)
        if plan is not None:
            self.hits += 1
        return plan

    def put(self, key: Hashable, plan) -> None:
        if plan is None:
            return
        if len(self._plans) >= self.maxsize:
            # a workload cycling through more signatures than this gains little from plans: start over
            self._plans.clear()
        self._plans[key] = plan
        self.builds += 1

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)


def bind_compiled(kernel, compiled, grid: Sequence[int], args: Sequence, kwargs: dict,
                  n_dynamic: int) -> Optional[Callable]:
    """``launch(*first_args)`` relaunching ``compiled`` (what ``kernel[grid](*args, **kwargs)`` returned) on ``grid``:
    the first ``n_dynamic`` positional arguments (the tensors) are given per launch, the other positional arguments
    and the keyword parameters stay fixed. None when that cannot be done (no compiled kernel, e.g. the interpreter;
    a parameter left to its default; another Triton launch API).

    The launch runs on the current device's current stream, as ``kernel[grid]`` does (CUDA-graph capture works)."""
    if compiled is None or not hasattr(compiled, "__getitem__") or not hasattr(kernel, "params"):
        return None
    try:
        tail = tuple(args[n_dynamic:]) + tuple(kwargs[p.name] for p in kernel.params[len(args):])
        grid3 = (int(grid[0]), int(grid[1]) if len(grid) > 1 else 1, int(grid[2]) if len(grid) > 2 else 1)
        runner = compiled[grid3]
    except Exception:  # noqa: BLE001 -- any mismatch with this Triton's launch API means: no plan, plain path
        return None

    def launch(*dynamic):
        runner(*dynamic, *tail)

    return launch


def on_input_device(fn: Callable) -> Callable:
    """Run launcher ``fn(t, ...)`` with the current CUDA device set to the device of its first argument ``t``.

    Triton launches on the *current* device and its current stream, whatever device the tensors live on (and a
    plan replays the same way). A tensor on ``cuda:1`` while ``cuda:0`` is current would otherwise launch on GPU 0:
    an illegal-address error, or, with peer access enabled, a kernel on GPU 0's stream that is not ordered after
    the work on ``cuda:1`` that produced its input (stale reads). The same guard as vLLM's ops (a device guard);
    on the current device it costs one device query."""
    @functools.wraps(fn)
    def guarded(t, *args, **kwargs):
        if isinstance(t, torch.Tensor) and t.is_cuda:
            idx = t.get_device()
            if idx != torch.cuda.current_device():
                with torch.cuda.device(idx):
                    return fn(t, *args, **kwargs)
        return fn(t, *args, **kwargs)

    return guarded
