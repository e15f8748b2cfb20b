"""Optional-backend registry: lazy loaders, remembered failures, and no frames kept alive by failed lookups."""
import gc
import weakref

import pytest

from fp8_deep.ops import _registry


def test_missing_backend_raises_fresh_error_and_available_is_false():
    calls = []

    def loader():
        calls.append(1)
        raise ImportError("pip install nothing-here")

    _registry.register("test_kind", "missing", loader)
    assert not _registry.available("test_kind", "missing")
    with pytest.raises(ImportError, match="pip install nothing-here") as e1:
        _registry.load("test_kind", "missing")
    with pytest.raises(ImportError) as e2:
        _registry.load("test_kind", "missing")
    assert e1.value is not e2.value  # a fresh exception per raise: tracebacks never accumulate
    assert calls == [1]  # the failed import is not retried on every call
    with pytest.raises(ImportError, match="not registered"):
        _registry.load("test_kind", "never-registered")


def test_failed_lookup_keeps_no_caller_frame_alive():
    """The hot path asks available() on every CUDA call; it must not pin the caller's locals (tensors)."""
    _registry.register("test_kind", "missing2", lambda: (_ for _ in ()).throw(ImportError("nope")))

    class Big:
        pass

    def caller():
        big = Big()
        _registry.available("test_kind", "missing2")
        try:
            _registry.load("test_kind", "missing2")
        except ImportError:
            pass
        return weakref.ref(big)

    ref = caller()
    gc.collect()
    assert ref() is None


def test_loaded_backend_is_cached():
    obj = object()
    _registry.register("test_kind", "present", lambda: obj)
    assert _registry.available("test_kind", "present")
    assert _registry.load("test_kind", "present") is obj
