"""128x1 re-tiling quantizer: ``x`` (M, C) -> FP8 ``q_t`` (C, M) with one scale per GROUP consecutive rows per column.

DeepSeek-V3's backward caches activations in FP8 with 1x128 tiles and re-tiles them to 128x1 for the weight-gradient
GEMM, whose reduction runs over tokens (technical report, section 3.3): the wgrad operand is ``x^T`` K-major, quantized
along M. Numerics are ``fp8_deep.reference.quantize_activation_t`` bit for bit: an FP8 input is first dequantized
with one float32 multiply per element (``q.float() * s``, its 1 x IN_GROUP row scale), then every column's run of
GROUP rows is quantized with the activation math shared by every kernel (``kernels.quant._quant_groups``: IEEE
``amax / 448``, correctly rounded ``x / s``, UE8M0 round-up on the bits, NaN/Inf groups -> scale NaN, q NaN).

The transpose: a program loads a (GROUP, BLOCK_C) tile coalesced along C (x's rows), reduces and quantizes it along
its rows (axis 0) in float32, transposes the float32 result in registers (``tl.trans``) and casts it after the
transpose, so that the store runs along M, q_t's contiguous axis. Transposing an FP8 register tile instead wrote
wrong bytes on the GPU under Triton 3.6 (bench/NOTES.md, the weight kernel's transposed copy); transpose in float32,
cast after, as ``kernels.quant._quant_weight_one_block`` does.
"""
import triton
import triton.language as tl

from .quant import _quant_groups


@triton.jit
def quant_act_t_kernel(
    # pointers: x (M, C) high precision or FP8; xs its (M, ceil(C / IN_GROUP)) float32 row scales (DEQUANT only);
    # q_t (C, M) FP8; s_t (C, ceil(M / GROUP)) float32
    x_ptr, xs_ptr, q_ptr, s_ptr,
    # sizes: the grid is 1-D, NUM_C_BLOCKS = cdiv(C, BLOCK_C) programs per GROUP-row band, column blocks fastest
    M, C, NUM_C_BLOCKS,
    # strides (elements)
    stride_xm, stride_xc,
    stride_xsm, stride_xsg,
    stride_qc, stride_qm,
    stride_sc, stride_sg,
    # numerics
    FP8_MAX: tl.constexpr, EPS: tl.constexpr, UE8M0: tl.constexpr, FMA_DIV: tl.constexpr, NAN_MAX: tl.constexpr,
    NAN_SELECT: tl.constexpr, DEQUANT: tl.constexpr,
    # meta: a program owns GROUP rows (one output scale group) x BLOCK_C columns; with DEQUANT, BLOCK_C divides
    # IN_GROUP (the launcher checks), so the tile's columns share one input scale per row
    GROUP: tl.constexpr, IN_GROUP: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_c = pid % NUM_C_BLOCKS
    pid_m = pid // NUM_C_BLOCKS
    offs_m = pid_m * GROUP + tl.arange(0, GROUP)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask = offs_m < M
    c_mask = offs_c < C
    m64 = offs_m.to(tl.int64)
    c64 = offs_c.to(tl.int64)
    # lanes outside x load 0: a zero never raises a column's amax, so the last (short) group covers its real rows
    x = tl.load(x_ptr + m64[:, None] * stride_xm + c64[None, :] * stride_xc,
                mask=m_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
    if DEQUANT:
        tl.static_assert(IN_GROUP % BLOCK_C == 0, "a tile's columns must share one input scale group")
        g_in = ((pid_c * BLOCK_C) // IN_GROUP).to(tl.int64)
        xs = tl.load(xs_ptr + m64 * stride_xsm + g_in * stride_xsg, mask=m_mask, other=1.0)
        x = x * xs[:, None]  # the reference's q.float() * s: one float32 multiply
    q, s = _quant_groups(x, 0, FP8_MAX, EPS, UE8M0, FMA_DIV, NAN_MAX, NAN_SELECT)  # (GROUP, BLOCK_C), (BLOCK_C,)
    # transposed in float32, cast after (see the module docstring); stored along M
    tl.store(q_ptr + c64[:, None] * stride_qc + m64[None, :] * stride_qm,
             tl.trans(q).to(q_ptr.dtype.element_ty), mask=c_mask[:, None] & m_mask[None, :])
    tl.store(s_ptr + c64 * stride_sc + pid_m.to(tl.int64) * stride_sg, s, mask=c_mask)
