"""The interpreter's FP8-cast fix, kept here under its old name for scripts that import it from ``fp8_deep.testing``;
the library applies it itself (``fp8_deep._interpreter``) whenever it runs a kernel through the interpreter."""
from .._interpreter import patch_interpreter_fp8_cast

__all__ = ["patch_interpreter_fp8_cast"]
