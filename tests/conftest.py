"""Test setup: device selection, markers, seeding, and the interpreter's FP8 cast fix.

Without a GPU the kernels run through Triton's CPU interpreter; ``TRITON_INTERPRET`` must be set before Triton is
first imported, so it is set here (when the caller has not chosen) before anything imports fp8_deep or triton.
"""
import contextlib
import importlib
import os
import pathlib
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fp8_deep.testing import patch_interpreter_fp8_cast  # noqa: E402

patch_interpreter_fp8_cast()

HAS_CUDA = torch.cuda.is_available()

# Every kernel launch the interpreter runs in this pytest run, described (fp8_deep.testing.compile_check): the last
# test (tests/test_kernel_source.py) compiles each distinct one for sm_90, which the interpreter never does.
_RECORDING = contextlib.ExitStack()
LAUNCHES = []
COMPILE_TEST = "test_recorded_launches_compile_for_sm90"


def pytest_configure(config):
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") == "1":
        from fp8_deep.testing.compile_check import record_launches
        LAUNCHES.append(_RECORDING.enter_context(record_launches(execute=True)))


def pytest_unconfigure(config):
    _RECORDING.close()


@pytest.fixture
def recorded_launches():
    """The launches recorded so far in this pytest run (empty on a GPU machine or without the interpreter)."""
    return list(LAUNCHES[0]) if LAUNCHES else []


def pytest_collection_modifyitems(config, items):
    # the compile test last: it compiles what every test before it launched
    items.sort(key=lambda item: COMPILE_TEST in item.nodeid)
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine: bench/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"


@contextlib.contextmanager
def bench_module(name: str):
    """A script of bench/ imported as a module (its folder on sys.path only while the block runs)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))
