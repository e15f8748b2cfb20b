"""Correct the Triton CPU interpreter's float -> FP8 (and float32 -> bfloat16) casts so interpreter runs are bit-exact.

The interpreter (Triton 3.x, ``triton.runtime.interpreter._convert_float``) narrows a float to FP8 by truncating the
mantissa and adding one when the first dropped bit is set: it rounds half *up* instead of to even, ignores the
sticky bits, and drops the carry out of the mantissa (1.9375 * 2^e rounds to 1.0 * 2^e instead of 2^(e+1)), so about
3% of values come out wrong, some by 2x. The GPU's ``cvt.rn.satfinite`` and torch's cast round to nearest even.
The float32 -> bfloat16 cast truncates (the GPU rounds to nearest even). We route both narrowings through torch's
cast, which on the CPU is round-to-nearest-even and saturating (the same as ``satfinite`` on the GPU); every other
conversion keeps the interpreter's own code.

The library installs the fix itself before it runs a kernel through the interpreter (``numerics.use_triton``): a
user who sets ``TRITON_INTERPRET=1`` gets the reference's bytes, not only our test suite. It patches a private
function of Triton's interpreter module, process-wide, so other Triton code run through the interpreter in the same
process gets torch's rounding for these casts too (the GPU's).
"""
from __future__ import annotations

import numpy as np
import torch

_PATCHED = False


def patch_interpreter_fp8_cast() -> bool:
    """Install the fix (idempotent). Returns True when the interpreter module was found and patched."""
    global _PATCHED
    if _PATCHED:
        return True
    try:
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except ImportError:  # no triton: nothing runs through the interpreter, nothing to fix
        return False
    original = interp._convert_float
    float_src = {
        tl.float32: (np.uint32, torch.float32),
        tl.float16: (np.uint16, torch.float16),
        tl.bfloat16: (np.uint16, torch.bfloat16),
    }
    # float32 -> bfloat16 has the same defect (the interpreter truncates; the GPU rounds to nearest even)
    narrow_dst = {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2, tl.bfloat16: torch.bfloat16}

    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        if (input_dtype in float_src and output_dtype in narrow_dst
                and input_dtype.primitive_bitwidth > output_dtype.primitive_bitwidth):
            np_uint, t_src = float_src[input_dtype]
            bits = np.frombuffer(np.ascontiguousarray(input).tobytes(), dtype=np_uint).copy()
            src = torch.from_numpy(bits.view(np.int32 if np_uint is np.uint32 else np.int16)).view(t_src)
            dst = narrow_dst[output_dtype]
            out = src.to(dst).view(torch.uint8 if dst.itemsize == 1 else torch.int16).numpy()
            out = out.view(np.uint8 if dst.itemsize == 1 else np.uint16)
            return out.reshape(np.shape(input))
        return original(input, input_dtype, output_dtype, rounding_mode)

    interp._convert_float = convert_float
    _PATCHED = True
    return True
