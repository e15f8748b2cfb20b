"""Low-overhead kernel launches: ``launch(kernel, grid, *args, **kwargs)`` is ``kernel[grid](*args, **kwargs)``.

Why: Triton's ``JITFunction.run`` re-derives every argument's specialization, the cache key and the launch options
on each call: 32 us of host time per launch on the GPU machine (Triton 3.6), against 11 us to launch the compiled
kernel itself. At M = 4096 x 7168 the activation quantizer's kernel takes ~35 us, so back-to-back calls were bound
by host time (H100 host: 91 us per quantize_activation call, 37-67 us for torch.compile's precompiled launcher).
Here the compiled kernel is cached under a key that captures *at least* everything Triton specializes on, and is
relaunched directly (``CompiledKernel[grid](*all_args)``, the form ``JITFunction.run`` itself uses):

* tensors: dtype and whether the data pointer is 16-byte aligned;
* ints: == 1, % 16 == 0, and the integer width class (int32 / uint32 / wider) -- Triton's specializations;
* floats: the type only (passed as float32); bools, constexpr parameters and launch options: their exact values.

A key that distinguishes more than Triton does only costs an extra compile lookup, never a wrong kernel. The first
launch of a key goes through ``kernel[grid]`` (compiling when needed). Anything unusual (the interpreter, CPU
tensors, tensor descriptors, other argument types, keywords that are neither parameters nor launch options) takes
the plain path. ``FP8_DEEP_FAST_LAUNCH=0`` (read at import) disables the cache.
"""
from __future__ import annotations

import os

import torch
from triton.runtime.jit import JITFunction

__all__ = ["launch"]

ENABLED = os.environ.get("FP8_DEEP_FAST_LAUNCH", "1") != "0"
_CACHE: dict = {}
_META: dict = {}  # kernel -> (parameter names, constexpr flags)
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_Tensor = torch.Tensor


def _spec(v, constexpr: bool):
    if constexpr:
        return (type(v), v)
    t = type(v)
    if t is _Tensor or isinstance(v, _Tensor):
        return (v.dtype, v.data_ptr() % 16 == 0) if v.is_cuda else None
    if t is bool:
        return v
    if t is int:
        return (v == 1, v % 16 == 0, -0x80000000 <= v < 0x80000000, 0 <= v < 0x100000000)
    if t is float:
        return 0.5
    return None


def _meta(kernel):
    m = _META.get(kernel)
    if m is None:
        params = kernel.params
        m = _META[kernel] = (tuple(p.name for p in params), tuple(bool(p.is_constexpr) for p in params))
    return m


def _plan(kernel, args, kwargs):
    """(key, all parameter values in signature order) or None when the plain path must run."""
    names, constexpr = _meta(kernel)
    n = len(args)
    if n > len(names):
        return None
    full = list(args)
    try:
        full += [kwargs[name] for name in names[n:]]
    except KeyError:
        return None
    spec = []
    has_tensor = False
    for v, c in zip(full, constexpr):
        s = _spec(v, c)
        if s is None:
            return None
        if not c and type(s) is tuple and len(s) == 2:
            has_tensor = True
        spec.append(s)
    extra = len(kwargs) - (len(names) - n)
    opts = tuple(kwargs.get(k) for k in _OPTIONS)
    if not has_tensor or extra != sum(o is not None for o in opts):
        return None  # no CUDA tensor, or a keyword that is neither a parameter nor a known launch option
    return (kernel, torch.cuda.current_device(), opts, tuple(spec)), full


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` with the compiled kernel cached (see the module docstring)."""
    if not ENABLED or not isinstance(kernel, JITFunction):
        return kernel[grid](*args, **kwargs)
    try:
        planned = _plan(kernel, args, kwargs)
    except TypeError:  # an unhashable constexpr value
        planned = None
    if planned is None:
        return kernel[grid](*args, **kwargs)
    key, full = planned
    compiled = _CACHE.get(key)
    if compiled is None:
        compiled = kernel[grid](*args, **kwargs)
        if compiled is not None and hasattr(compiled, "__getitem__"):
            _CACHE[key] = compiled
        return compiled
    compiled[(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)](*full)
    return compiled
