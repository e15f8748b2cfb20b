"""Launch plans for the whole MoE forward: an inference call replayed as its Triton launches, without its Python work.

Why: eager decode is bound by the host. At T=16 a ``moe_forward`` call cost ~0.45 ms of host time for 0.15-0.20 ms
of GPU work (H100, 2026-12-07): argument checks, the routing plan's allocations, config lookups and six trips
through Triton's ``JITFunction.run`` (~25-30 us each: it re-derives every argument's specialization). vLLM's
``fused_moe`` has the same problem and answers it with CUDA graphs; a plan also serves callers that run eagerly.

How: the first call with a given *signature* runs normally while ``ops._launch.record_launches`` records its
launches (compiled kernel, grid, every argument). Each tensor argument is placed (``ForwardPlan``): one of the
call's per-call tensors (``hidden_states``, ``topk_weights``, ``topk_ids``, ``out``: their addresses change every
call), one of its static tensors (weights, scales, ``expert_map``: their addresses are in the signature, so they
stay constants), the result, or an intermediate (replayed at the same offset inside one fresh workspace
allocation); a TMA descriptor is placed by the tensor it describes and rebuilt over each replay's address.
Later calls with the same signature allocate the workspace and the result and relaunch the compiled
kernels with the new addresses: no checks (the signature holds everything they checked), no Triton binder.

The signature: shapes, strides, dtypes and devices of every tensor argument, the 16-byte alignment of the per-call
tensors (Triton specializes on it), the addresses of the static ones, the options, and every environment switch the
forward reads (``FORWARD_ENVS``). A recording is refused, and the call keeps the plain path for that signature, when
anything in it cannot be replayed safely: a torch operation doing GPU work (``_OpGuard``: only allocations and views
may run), a launch that bypassed ``JITFunction.run``, another backend than ours (DeepGEMM launches outside Triton),
a result that is not a fresh tensor of its own, per-call tensors that overlap (an ``out`` written
in place over ``hidden_states`` is keyed apart, so only that signature loses its plan). A signature refused
``MAX_REFUSALS`` times keeps the plain path; a refusal caused by another thread's launches is not counted.

A plan's first replay runs beside the plain path once and must give its bytes (``_first_replay``); only then are
replays returned, captured in CUDA graphs included. ``FP8_DEEP_FORWARD_PLANS=0`` (or ``FP8_DEEP_LAUNCH_PLANS=0``)
turns plans off. Training calls (autograd) never use
them; nor CPU tensors or the interpreter (no compiled kernels).
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..numerics import interpreter_active
from ..ops import _registry
from ..ops._launch import PLANS_ENABLED, LaunchTape, PlanCache, record_launches
from ..ops.routing import routing_check_enabled

__all__ = ["ForwardPlan", "FORWARD_PLANS_ENV", "FORWARD_ENVS", "plans_usable", "forward_key", "forward",
           "FORWARD_PLANS", "MAX_REFUSALS"]

FORWARD_PLANS_ENV = "FP8_DEEP_FORWARD_PLANS"
# every environment switch the inference forward (or a launcher it calls) reads: a plan is keyed on their values.
# tests/test_forward_plan.py checks that every FP8_DEEP_* switch of the package is here or in TRAINING_ONLY_ENVS.
FORWARD_ENVS = (
    "FP8_DEEP_ACT_QUANT_CONFIG", "FP8_DEEP_ACT_SCALE_EVICT", "FP8_DEEP_CHECK_ROUTING", "FP8_DEEP_DECODE",
    "FP8_DEEP_DECODE_COMBINE", "FP8_DEEP_DECODE_CONFIG", "FP8_DEEP_FUSED_ALIGN_QUANT",
    "FP8_DEEP_FUSED_QUANT_PERMUTE", "FP8_DEEP_FUSED_SWIGLU", "FP8_DEEP_GATHER", "FP8_DEEP_GATHER_CONFIG",
    "FP8_DEEP_GEMM_CONFIG", "FP8_DEEP_PDL", "FP8_DEEP_PERMUTE_CONFIG",
    "FP8_DEEP_ROUTED",
    "FP8_DEEP_QUANT_PLAIN", "FP8_DEEP_SWIGLU_GEMM_CONFIG",
    "FP8_DEEP_TUNED", "FP8_DEEP_WEIGHT_QUANT_CONFIG", "FP8_DEEP_WEIGHT_QUANT_HINTS", FORWARD_PLANS_ENV,
)
# read only by the backward's launchers (never by an inference call), or at import
TRAINING_ONLY_ENVS = ("FP8_DEEP_RETILE_CONFIG", "FP8_DEEP_SWIGLU_BWD_CONFIG", "FP8_DEEP_WGRAD_CONFIG",
                      "FP8_DEEP_LAUNCH_PLANS")

FORWARD_PLANS = PlanCache(maxsize=64)
# what the cache holds for a signature whose recording was refused (why: ForwardPlan.refusals): the count of
# refusals; after MAX_REFUSALS the signature keeps the plain path (a first call may do one-time work, e.g. a lazy
# import's torch ops, that a second recording does not meet)
MAX_REFUSALS = 2
_WS_ALIGN = 512  # the caching allocator's block alignment: offsets keep every address's alignment

_aten = torch.ops.aten
# allocations and views: no GPU work, nothing a replay would miss
_ALLOWED_OPS = {
    _aten.empty.memory_format, _aten.empty_strided.default, _aten.new_empty.default, _aten.new_empty_strided.default,
    _aten.view.default, _aten._unsafe_view.default, _aten.as_strided.default, _aten.t.default,
    _aten.transpose.int, _aten.permute.default, _aten.unsqueeze.default, _aten.squeeze.dim, _aten.squeeze.default,
    _aten.expand.default, _aten.slice.Tensor, _aten.select.int, _aten.alias.default, _aten.detach.default,
    _aten.unbind.int, _aten.split.Tensor, _aten.split_with_sizes.default, _aten.view.dtype,
}


class _Address:
    """A device address where Triton's launcher expects a tensor (it reads ``data_ptr()`` only)."""
    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def data_ptr(self) -> int:
        return self.ptr


class _OpGuard(TorchDispatchMode):
    """Fails ``tape`` at the first torch operation other than an allocation or a view: its GPU work would not be
    part of the recorded launches."""

    def __init__(self, tape: LaunchTape):
        super().__init__()
        self.tape = tape

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in _ALLOWED_OPS:
            self.tape.fail(f"torch operation {func} runs outside the recorded Triton launches")
        return func(*args, **(kwargs or {}))


def plans_usable(hidden_states: torch.Tensor) -> bool:
    """CUDA, compiled kernels, plans on, no routing check (its host sync and its ValueError belong to the plain
    path), not under torch.compile's tracing (fake tensors have no addresses)."""
    return (PLANS_ENABLED and hidden_states.is_cuda and not interpreter_active()
            and os.environ.get(FORWARD_PLANS_ENV, "1") != "0" and not routing_check_enabled()
            and not torch.compiler.is_compiling())


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte extents of ``a`` and ``b`` intersect."""
    pa, pb = a.data_ptr(), b.data_ptr()
    return pa < pb + _extent(b) and pb < pa + _extent(a)


def _extent(t: torch.Tensor) -> int:
    """Bytes from ``t.data_ptr()`` to one past its last element."""
    if t.numel() == 0:
        return 0
    return (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()


# os.environ's backing dict (encoded names): one dict lookup per switch instead of os.environ.get's encode + decode
_ENV_KEYS = tuple(os.environ.encodekey(n) for n in FORWARD_ENVS) if hasattr(os.environ, "encodekey") else None


def _env_values() -> tuple:
    data = getattr(os.environ, "_data", None)  # looked up per call: os.environ may have been replaced
    if isinstance(data, dict) and _ENV_KEYS is not None:
        return tuple(map(data.get, _ENV_KEYS))
    return tuple(os.environ.get(n) for n in FORWARD_ENVS)


def forward_key(dynamic: Sequence[Optional[torch.Tensor]], static: Sequence[Optional[torch.Tensor]], options: tuple):
    """The signature a plan is valid for (module docstring). Static tensors are keyed by address (unique across
    devices under CUDA's unified addressing), shape, strides and dtype."""
    key = [options, _env_values(), _registry.generation]
    for t in dynamic:
        key.append(None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16))
    for t in static:
        key.append(None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr()))
    return tuple(key)


class ForwardPlan:
    """A recorded forward call, replayable with new per-call tensors (module docstring). Build with ``build``."""

    refusals: dict = {}  # why recent recordings were refused (diagnostics and tests): why -> count

    def __init__(self, launches, ws_bytes, result_spec, device, backend_name):
        # (runner, template args, [(index, base slot, byte offset)] of addresses, [...] of descriptors' bases)
        self.launches = launches
        self.ws_bytes = ws_bytes
        self.result_spec = result_spec    # (shape, stride, dtype) of a fresh result, or None (the caller's out)
        self.device = device
        self.backend_name = backend_name
        self.replays = 0
        self.verified = False  # its first replay matched the plain path (_first_replay)

    @classmethod
    def build(cls, tape: LaunchTape, dynamic, static, result: torch.Tensor, backend_name: str):
        """The plan of ``tape`` (a recorded call whose per-call tensors were ``dynamic``, static ones ``static``, and
        whose returned tensor was ``result``), or the reason it cannot be replayed (a string)."""
        if not tape.ok:
            return tape.why
        if not tape.launches:
            return "no launches recorded"
        n_dyn = len(dynamic)
        present = [t for t in dynamic if t is not None]
        if any(overlaps(a, b) for i, a in enumerate(present) for b in present[i + 1:]):
            return "per-call tensors overlap (an argument could not be placed in one of them)"
        slots = [(i, t.data_ptr(), _extent(t)) for i, t in enumerate(dynamic) if t is not None]
        statics = [(t.data_ptr(), _extent(t)) for t in static if t is not None]
        out_given = dynamic[-1] is not None and result is dynamic[-1]
        if out_given:
            result_spec, res_base = None, None
        else:
            st = result.untyped_storage()
            if result.storage_offset() or st.nbytes() != _extent(result) or st.data_ptr() != result.data_ptr():
                return "the result is not a fresh tensor of its own"
            result_spec, res_base = (tuple(result.shape), result.stride(), result.dtype), result.data_ptr()
        RES, WS = n_dyn, n_dyn + 1  # base slots after the per-call tensors

        def tensors_of(arg):  # a tensor argument, or the tensor a TMA descriptor describes
            if isinstance(arg, torch.Tensor):
                return arg
            base = getattr(arg, "base", None)
            return base if isinstance(base, torch.Tensor) else None

        # storage address -> bytes: the largest allocation seen there (the caching allocator may have handed one
        # address to two buffers of the call, one after the other), then each its offset in the workspace
        ws_sizes: dict = {}
        for _, _, _, full in tape.launches:
            for arg in full:
                t = tensors_of(arg)
                if t is not None:
                    st = t.untyped_storage()
                    ws_sizes[st.data_ptr()] = max(ws_sizes.get(st.data_ptr(), 0), st.nbytes())
        ws_offsets: dict = {}
        ws_bytes = 0

        def place(t):
            """``(None, address)`` for a static tensor, else ``(base slot, byte offset)``."""
            nonlocal ws_bytes
            p = t.data_ptr()
            hit = next(((i, p - b) for i, b, n in slots if b <= p < b + n), None)
            if hit is not None:
                return hit
            if any(b <= p < b + n for b, n in statics):
                return None, p
            if res_base is not None and res_base <= p < res_base + _extent(result):
                return RES, p - res_base
            sb = t.untyped_storage().data_ptr()
            if sb not in ws_offsets:
                ws_offsets[sb] = ws_bytes
                ws_bytes += -(-ws_sizes[sb] // _WS_ALIGN) * _WS_ALIGN
            return WS, ws_offsets[sb] + p - sb

        launches = []
        for kernel, compiled, grid, full in tape.launches:
            template, fills, desc_fills = list(full), [], []
            for idx, arg in enumerate(full):
                t = tensors_of(arg)
                if t is None:
                    continue
                if t.device != result.device:
                    return f"{kernel.__name__}: argument {idx} is on {t.device}"
                slot, off = place(t)
                if isinstance(arg, torch.Tensor):
                    template[idx] = off if slot is None else 0  # an address: fixed, or filled in per replay
                    if slot is not None:
                        fills.append((idx, slot, off))
                else:
                    # the same descriptor over an address alone: a plan must not keep the weights alive (a cache
                    # refresh allocates new ones, under a new key; the old plan only ages out), and a descriptor
                    # over a per-call tensor or an intermediate gets each replay's address
                    desc = copy.copy(arg)
                    object.__setattr__(desc, "base", _Address(off if slot is None else 0))
                    template[idx] = desc
                    if slot is not None:
                        desc_fills.append((idx, slot, off))
            launches.append((compiled[grid], template, fills, desc_fills))
        return cls(launches, ws_bytes, result_spec, result.device, backend_name)

    def replay(self, dynamic: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """Run the recorded launches for new per-call tensors ``dynamic`` (same signature); returns the result."""
        self.replays += 1
        ws = torch.empty(self.ws_bytes, dtype=torch.uint8, device=self.device) if self.ws_bytes else None
        if self.result_spec is None:
            res = dynamic[-1]
        else:
            shape, stride, dtype = self.result_spec
            res = torch.empty_strided(shape, stride, dtype=dtype, device=self.device)
        bases = [0 if t is None else t.data_ptr() for t in dynamic]
        bases += [res.data_ptr(), ws.data_ptr() if ws is not None else 0]
        # the current stream once for all launches (each runner would look it up again)
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else None
        for runner, template, fills, desc_fills in self.launches:
            args = template.copy()
            for idx, slot, off in fills:
                args[idx] = bases[slot] + off
            for idx, slot, off in desc_fills:
                desc = copy.copy(args[idx])
                object.__setattr__(desc, "base", _Address(bases[slot] + off))
                args[idx] = desc
            runner(*args, stream=stream)
        return res


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.element_size() == 2:
        return torch.equal(a.view(torch.int16), b.view(torch.int16))
    return torch.equal(a, b)


def _first_replay(key, plan: "ForwardPlan", call, dynamic):
    """A plan's first replay runs beside the plain path, once, and must give its bytes (the forward is bitwise
    deterministic): the check that a recording placed every argument right, on this GPU and this Triton, before any
    replay's result is returned. A mismatch retires the signature to the plain path, with a warning (a defect to
    report). Under CUDA-graph capture (the comparison needs a host sync) an unchecked plan is not used."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return call()
    out = dynamic[-1]
    if out is None:
        got = plan.replay(dynamic)
    else:
        got = torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device=out.device)
        if got.data_ptr() % 16 != out.data_ptr() % 16:  # the signature's alignment: check on a later call
            return call()
        plan.replay((*dynamic[:-1], got))
    ref = call()
    if _same_bytes(got, ref):
        plan.verified = True
    else:
        why = "a replay differed from the plain path"
        ForwardPlan.refusals[why] = ForwardPlan.refusals.get(why, 0) + 1
        FORWARD_PLANS.put(key, MAX_REFUSALS)
        warnings.warn("fp8_deep: the launch plan of a moe_forward signature gave other bytes than the plain path; "
                      "that signature runs the plain path from now on. Please report this (FP8_DEEP_FORWARD_PLANS=0 "
                      "turns plans off).", RuntimeWarning, stacklevel=3)
    return ref


def forward(key, call, dynamic, static, chosen: list):
    """The MoE forward for signature ``key``: a replay of its plan, or ``call()`` (the plain path), recorded into a
    plan while the signature has fewer than MAX_REFUSALS refusals. ``chosen`` is the list the call's backend
    selection appends the chosen backend's name to. Returns ``(result, backend name or None)``."""
    entry = FORWARD_PLANS.get(key)
    if isinstance(entry, ForwardPlan):
        if entry.verified:
            return entry.replay(dynamic), entry.backend_name
        return _first_replay(key, entry, call, dynamic), None
    if entry is not None and entry >= MAX_REFUSALS:
        return call(), None
    tape = LaunchTape()
    with record_launches(tape), _OpGuard(tape):
        res = call()
    name = chosen[-1] if chosen else None
    if name != "triton":
        plan = f"backend {name!r} launches outside Triton"
    else:
        plan = ForwardPlan.build(tape, dynamic, static, res, name)
    if isinstance(plan, ForwardPlan):
        FORWARD_PLANS.put(key, plan)
    else:
        ForwardPlan.refusals[plan] = ForwardPlan.refusals.get(plan, 0) + 1
        if not tape.transient:
            FORWARD_PLANS.put(key, (entry or 0) + 1)
    return res, None
