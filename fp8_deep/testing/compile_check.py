"""Compile, for a GPU target and without a GPU, the Triton kernels that launcher calls launch under the interpreter.

The CPU interpreter runs a kernel as Python: it never type-checks the branches a compiled kernel would contain, never
lowers a dot, never runs ptxas. A kernel can pass every CPU test and not compile for the GPU (constexpr-if dead code,
a layout a newer Triton rejects). Two steps close that gap on a CPU machine:

1. ``record_launches()`` (in a process with ``TRITON_INTERPRET=1``): every kernel launch made inside the block is
   described (kernel module and name, each argument's dtype / shape / strides / 16-byte alignment, integers, tensor
   descriptors, constexpr and launch options) instead of run, unless ``execute=True``.
2. ``compile_launches(records)`` (in a process *without* the interpreter, so ``triton.jit`` gives real
   ``JITFunction`` objects): one compile per distinct specialization, for sm_90 by default, with the installed
   Triton and its wheel's ptxas. ``python -m fp8_deep.testing.compile_check FILE`` compiles a pickled record list and
   prints one line per failure (exit status 1).

``tests/test_kernel_source.py`` drives both over every launcher and GEMM configuration family.
"""
from __future__ import annotations

import contextlib
import importlib
import pickle
import sys
from dataclasses import dataclass, field
from typing import Any, List, Tuple

__all__ = ["Launch", "record_launches", "compile_launches", "compile_kernel"]


@dataclass(frozen=True)
class _Tensor:
    dtype: str
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    aligned: bool  # data_ptr % 16 == 0: part of Triton's specialization


@dataclass(frozen=True)
class _Desc:
    base: _Tensor
    shape: Tuple[int, ...]
    strides: Tuple[int, ...]
    block_shape: Tuple[int, ...]


@dataclass
class Launch:
    module: str
    name: str
    args: Tuple[Any, ...]
    kwargs: dict = field(default_factory=dict)

    def key(self):
        """What decides how a kernel compiles: dtypes, pointer alignment, integers equal to 1, constexprs."""
        def k(v):
            if isinstance(v, _Tensor):
                return ("t", v.dtype, v.aligned)
            if isinstance(v, _Desc):
                return ("d", v.base.dtype, v.block_shape)
            if isinstance(v, bool) or v is None or isinstance(v, (float, str)):
                return v
            if isinstance(v, int):  # by == 1 and width only: 16-divisibility changes vector widths, not legality
                return ("i", v == 1, abs(v) >= 2 ** 31)
            return repr(v)
        return (self.module, self.name, tuple(k(a) for a in self.args),
                tuple(sorted((n, k(v) if not isinstance(v, int) or isinstance(v, bool) else v)
                             for n, v in self.kwargs.items())))


def _describe(v):
    import torch
    if isinstance(v, torch.Tensor):
        return _Tensor(str(v.dtype).replace("torch.", ""), tuple(v.shape), tuple(v.stride()), v.data_ptr() % 16 == 0)
    if type(v).__name__ == "TensorDescriptor":
        return _Desc(_describe(v.base), tuple(v.shape), tuple(v.strides), tuple(v.block_shape))
    if hasattr(v, "value") and type(v).__name__ == "constexpr":
        return v.value
    return v


@contextlib.contextmanager
def record_launches(execute: bool = False):
    """Record every interpreted kernel launch of the block (a list of ``Launch``); ``execute=False`` skips running
    them (outputs are then left unwritten: only the launches are of interest)."""
    from triton.runtime.interpreter import InterpretedFunction
    orig = InterpretedFunction.run
    records: List[Launch] = []

    def run(self, *args, grid, warmup, **kwargs):
        if self.fn.__module__.startswith("fp8_deep."):  # our kernels (a benchmark's peer kernel is not ours)
            records.append(Launch(self.fn.__module__, self.fn.__name__, tuple(_describe(a) for a in args),
                                  {n: _describe(v) for n, v in kwargs.items()}))
        if execute:
            return orig(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    InterpretedFunction.run = run
    try:
        yield records
    finally:
        InterpretedFunction.run = orig


def _rebuild(v):
    import torch
    if isinstance(v, _Tensor):
        dtype = getattr(torch, v.dtype)
        span = 1 + sum((s - 1) * st for s, st in zip(v.shape, v.stride) if s > 0)
        offset = 0 if v.aligned else 1  # an unaligned pointer stays unaligned (16 / itemsize >= 1 element off)
        storage = torch.zeros(span + offset + 16, dtype=dtype)
        return torch.as_strided(storage, v.shape, v.stride, offset)
    if isinstance(v, _Desc):
        from triton.tools.tensor_descriptor import TensorDescriptor
        return TensorDescriptor(_rebuild(v.base), list(v.shape), list(v.strides), list(v.block_shape))
    return v


def compile_kernel(fn, args, kwargs, capability: int = 90, warp_size: int = 32, gluon: bool = False):
    """``fn`` (a ``JITFunction``, or a Gluon one with ``gluon=True``) compiled for ``cuda:capability`` as a launch
    with ``args`` / ``kwargs`` (CPU tensors give the specialization) would compile it; no GPU or driver needed.
    Returns the ``CompiledKernel`` (``.asm["ttgir" / "ptx" / "cubin"]``, ``.metadata``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", capability, warp_size)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    opts, sig, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as source
    else:
        source = ASTSource
    return triton.compile(source(fn, sig, constexprs, attrs), target=target, options=opts.__dict__)


def _compile_one(rec: Launch, capability: int, warp_size: int):
    fn = getattr(importlib.import_module(rec.module), rec.name)
    args = [_rebuild(a) for a in rec.args]
    kwargs = {n: _rebuild(v) for n, v in rec.kwargs.items()}
    return compile_kernel(fn, args, kwargs, capability, warp_size)


def _try_compile(rec: Launch, capability: int, warp_size: int):
    try:
        _compile_one(rec, capability, warp_size)
        return None
    except Exception as exc:  # report every failing kernel, not just the first
        return f"{type(exc).__name__}: {str(exc)[-1200:]}"


def compile_launches(records, capability: int = 90, warp_size: int = 32, workers: int = 0):
    """Compile each distinct specialization of ``records`` for ``cuda:capability`` (``workers`` processes; 0: one
    per CPU). Returns ``(compiled, failures)``: the number of distinct kernels compiled and ``[(Launch, message)]``."""
    import os
    import triton.runtime.jit as jit
    if not hasattr(jit, "create_function_from_signature"):
        raise RuntimeError(f"this Triton ({sys.modules['triton'].__version__}) has no create_function_from_signature")
    unique = list({rec.key(): rec for rec in records}.values())
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(unique) > 4:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(max_workers=workers) as pool:
            errors = list(pool.map(_try_compile, unique, [capability] * len(unique), [warp_size] * len(unique)))
    else:
        errors = [_try_compile(rec, capability, warp_size) for rec in unique]
    failures = [(rec, err) for rec, err in zip(unique, errors) if err is not None]
    return len(unique) - len(failures), failures


def main(argv=None) -> int:
    import os
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: run without TRITON_INTERPRET (it needs real JITFunction objects)")
        return 2
    import time
    t0 = time.time()
    with open(argv[0], "rb") as f:
        records = pickle.load(f)
    compiled, failures = compile_launches(records)
    import triton
    print(f"compile_check: triton {triton.__version__}, sm_90: {compiled} distinct kernels compiled from "
          f"{len(records)} launches, {len(failures)} failed, {time.time() - t0:.0f} s")
    for rec, msg in failures:
        consts = {n: v for n, v in rec.kwargs.items() if not isinstance(v, (_Tensor, _Desc))}
        print(f"FAILED {rec.module}.{rec.name} {consts}\n    {msg}")
    return 1 if failures else 0


if __name__ == "__main__":
    # the pickled records hold this module's classes: run main from the imported module, not from __main__
    from fp8_deep.testing.compile_check import main as _main
    sys.exit(_main())
