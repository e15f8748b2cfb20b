"""Numerics helpers for tests and benchmarks (never imported by library code)."""
from .numerics import assert_bitwise_equal, calc_diff, is_poison, poisoned, sqnr_db
from .interpreter import patch_interpreter_fp8_cast

__all__ = ["assert_bitwise_equal", "calc_diff", "sqnr_db", "poisoned", "is_poison", "patch_interpreter_fp8_cast"]
