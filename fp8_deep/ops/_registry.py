"""Optional backends (vLLM ops, DeepGEMM) plug in here, so ops/ never imports an optional dependency.

``fp8_deep.integrations`` registers a *loader* per backend at import time (cheap: no optional import happens);
the loader imports the dependency on first use and returns the implementation, or raises ``ImportError`` with the
install hint. Kinds: ``"activation_quant"`` (vLLM ``per_token_group_quant_fp8``), ``"moe_align"`` (vLLM
``moe_align_block_size``), ``"grouped_gemm"`` (DeepGEMM contiguous grouped GEMM).
"""
from __future__ import annotations

from typing import Callable, Dict

_LOADERS: Dict[str, Dict[str, Callable[[], object]]] = {}
_CACHE: Dict[tuple, object] = {}
# bumped by every register(): callers that cache a decision taken from availability (the MoE forward's launch
# plans) key on it
generation = 0


def register(kind: str, name: str, loader: Callable[[], object]) -> None:
    global generation
    _LOADERS.setdefault(kind, {})[name] = loader
    _CACHE.pop((kind, name), None)
    generation += 1


class _Missing:
    """A remembered failure: only the message is kept. Storing the ImportError itself and re-raising it would chain
    every raise's traceback onto it, and those tracebacks keep the callers' frames -- with every intermediate tensor
    of every MoE forward that asked -- alive for good (seen on an H100: +16 GiB after a few hundred calls)."""
    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


def _resolve(kind: str, name: str):
    key = (kind, name)
    if key not in _CACHE:
        loader = _LOADERS.get(kind, {}).get(name)
        if loader is None:
            return _Missing(f"backend {name!r} for {kind} is not registered; import fp8_deep (not only "
                            f"fp8_deep.ops) so that fp8_deep.integrations registers it")
        try:
            _CACHE[key] = loader()
        except ImportError as exc:  # remembered: a missing package is not re-searched on every call
            _CACHE[key] = _Missing(str(exc))
    return _CACHE[key]


def load(kind: str, name: str):
    """The implementation, or ImportError (with the install hint) when the dependency is missing."""
    impl = _resolve(kind, name)
    if isinstance(impl, _Missing):
        raise ImportError(impl.message)
    return impl


def available(kind: str, name: str) -> bool:
    """Whether the backend can be loaded; never raises (and so never builds a traceback on the hot path)."""
    return not isinstance(_resolve(kind, name), _Missing)
