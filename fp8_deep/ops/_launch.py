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

import contextlib
import functools
import os
import threading
from typing import Callable, Hashable, Optional, Sequence

import torch

from ..numerics import interpreter_active

__all__ = ["PlanCache", "bind_compiled", "PLANS_ENABLED", "FP_FUSION", "on_input_device", "LaunchTape", "record_launches",
           "PDL_ENV", "pdl"]

PLANS_ENABLED = os.environ.get("FP8_DEEP_LAUNCH_PLANS", "1") != "0"
# Every launch pins FMA contraction on, the default of every Triton up to 3.9, under which the kernels' bytes were
# verified on the GPU: a GEMM's 128-K promotion ``acc + part * scale`` is one fused multiply-add, and the PTX leaves
# ptxas free to contract elsewhere as it did. Triton 3.10 turns the default off (TRITON_DEFAULT_FP_FUSION): unpinned,
# the GEMMs would round their promotion twice and the other kernels' PTX would change. (The SwiGLU backward turns it
# off on purpose: it matches torch's eager rounding.)
FP_FUSION = {"enable_fp_fusion": True}
PDL_ENV = "FP8_DEEP_PDL"
_PDL_CAPABLE: dict = {}  # device index -> compute capability >= 9.0


def pdl(t: torch.Tensor) -> dict:
    """Launch keywords of a kernel in the MoE forward's chain (``fp8_deep/kernels/pdl.py``): ``USE_PDL`` (its
    constexpr: wait for the predecessor grid, then release the successor) and, when on, ``launch_pdl=True``
    (programmatic dependent launch). Opt-in, ``FP8_DEEP_PDL=1``, for CUDA tensors on SM90+ outside the interpreter:
    its bytes and its speed have not been measured on a GPU yet (tests/test_pdl.py and the peer benchmark's
    ``--ab pdl:FP8_DEEP_PDL=0`` will). Both keywords are always decided together: a kernel launched with PDL that did
    not wait could read its predecessor's output before it is written."""
    env = os.environ.get(PDL_ENV)
    if env not in (None, "", "0", "1"):
        raise ValueError(f"{PDL_ENV}={env!r}: expected 0 or 1 (unset: off)")
    if env != "1" or not t.is_cuda:
        return _PDL_OFF
    idx = t.get_device()
    cap = _PDL_CAPABLE.get(idx)
    if cap is None:
        cap = _PDL_CAPABLE[idx] = not interpreter_active() and torch.cuda.get_device_capability(idx)[0] >= 9
    return _PDL_ON if cap else _PDL_OFF


_PDL_OFF = {"USE_PDL": False}
_PDL_ON = {"USE_PDL": True, "launch_pdl": True}
_LOCAL = threading.local()  # .tape: the LaunchTape this thread records into, if any
_PATCH_LOCK = threading.Lock()


class PlanCache:
    """A bounded ``key -> plan`` map for one call site. Keys must capture everything the call's validation, kernel
    choice and Triton's specialization depend on; a key that distinguishes more only costs an extra plan."""

    def __init__(self, maxsize: int = 256):
        self.maxsize = maxsize
        self._plans: dict = {}
        self.hits = 0      # counters for tests and diagnostics
        self.builds = 0

    def get(self, key: Hashable):
        if getattr(_LOCAL, "tape", None) is not None:
            return None  # a call being recorded takes every launcher's plain path: its launches go through Triton's
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


class LaunchTape:
    """The Triton launches of one call, recorded so that the call can be replayed without its Python work.

    ``record_launches(tape)`` around the call collects every ``JITFunction.run`` of this thread: the compiled kernel,
    its grid and every argument in signature order (keyword and default parameters included). Each launch's
    arguments are then classified by ``classify``: a tensor is a *slot* (one of the caller's tensors, found by address
    inside its extent: dynamic inputs change per call, static ones are part of the plan's key) or an *intermediate*
    (any other allocation: replayed as an offset into one workspace); everything else is a constant. ``ok`` is False,
    with ``why``, wherever that cannot be trusted: a launch that bypassed Triton's ``run`` (counted by a launch hook),
    a grid that is a function, a parameter without a value, a tensor argument the classification cannot place."""

    def __init__(self):
        self.launches: list = []  # (kernel, compiled, grid, full_args)
        self.ok = True
        self.why = ""
        self.transient = False  # the failure says nothing about the call itself (another thread's activity)
        self.hook_count = 0
        self.thread = threading.get_ident()

    def fail(self, why: str, transient: bool = False) -> None:
        if self.ok:
            self.ok, self.why, self.transient = False, why, transient

    def add(self, kernel, compiled, grid, args, kwargs) -> None:
        if compiled is None or not hasattr(compiled, "__getitem__"):
            return self.fail(f"{getattr(kernel, '__name__', kernel)}: no compiled kernel (interpreter?)")
        if callable(grid):
            return self.fail(f"{kernel.__name__}: grid is a function")
        full = list(args)
        for p in kernel.params[len(args):]:
            if p.name in kwargs:
                full.append(kwargs[p.name])
            elif getattr(p, "has_default", False):
                full.append(p.default)
            else:
                return self.fail(f"{kernel.__name__}: parameter {p.name} has no value")
        g = tuple(int(v) for v in grid) + (1,) * (3 - len(grid))
        self.launches.append((kernel, compiled, g, full))

    def _hook(self, metadata) -> None:
        if threading.get_ident() == self.thread:  # the driver calls the hook on the launching thread
            self.hook_count += 1


@contextlib.contextmanager
def record_launches(tape: LaunchTape):
    """Record this thread's Triton launches into ``tape`` for the ``with`` block (see ``LaunchTape``). The launches
    still run. Sub-launchers' own plans are bypassed meanwhile (``PlanCache.get`` returns None), so that every launch
    passes through ``JITFunction.run``; a launch hook counts the launches that reach the driver, and any launch that
    did not pass through ``run`` (a count mismatch) fails the tape."""
    from triton import knobs
    from triton.runtime.jit import JITFunction

    chain = getattr(knobs.runtime, "launch_enter_hook", None)
    if not hasattr(chain, "add") or not hasattr(chain, "remove"):
        tape.fail("this Triton has no launch hook chain to check the recording against")
        yield tape
        return
    me = threading.get_ident()
    with _PATCH_LOCK:
        orig = JITFunction.run
        busy = getattr(orig, "_fp8_deep_recorder", False)
        if not busy:
            JITFunction.run = _recording_run(orig, me)
    if busy:
        tape.fail("another thread is recording", transient=True)
        yield tape
        return
    _LOCAL.tape = tape
    chain.add(tape._hook)
    try:
        yield tape
    finally:
        _LOCAL.tape = None
        chain.remove(tape._hook)
        with _PATCH_LOCK:
            JITFunction.run = orig
    if tape.hook_count != len(tape.launches):
        tape.fail(f"{tape.hook_count} launches reached the driver, {len(tape.launches)} passed through Triton's run")


def _recording_run(orig, me: int):
    """``JITFunction.run`` that also records thread ``me``'s launches into its tape."""
    def run(self, *args, grid, warmup, **kwargs):
        compiled = orig(self, *args, grid=grid, warmup=warmup, **kwargs)
        t = getattr(_LOCAL, "tape", None)
        if t is not None and not warmup and threading.get_ident() == me:
            t.add(self, compiled, grid, args, kwargs)
        return compiled

    run._fp8_deep_recorder = True
    return run
