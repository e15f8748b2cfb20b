"""FP8 E4M3 quantization kernels: 128x128 weight blocks and 1xG activation groups.

Numerics are the ones of ``fp8_deep.reference`` bit for bit (the reasons are written there). Two GPU details:
``/`` on float32 compiles to an approximate division in Triton, so every division that must match torch's IEEE
result goes through ``tl.math.div_rn``; and the UE8M0 round-up is done on the bits, never through ``log2``.
"""
import triton
import triton.language as tl


@triton.jit
def _round_up_pow2(s):
    """Exact round-up of positive finite float32 values to a power of two (UE8M0 scales)."""
    bits = s.to(tl.int32, bitcast=True)
    exp = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    exp = tl.where(mant != 0, exp + 1, exp)
    return (exp << 23).to(tl.float32, bitcast=True)


@triton.jit
def _abs_nan_as_inf(x):
    """|x| with NaN folded into +Inf: a max that ignores NaN would otherwise hide it, and an amax of +Inf then
    flags every non-finite block or group."""
    a = tl.abs(x)
    return tl.where(a != a, float("inf"), a)


@triton.jit
def _quant_weight_one_block(
    w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, pid_k, pid_n, pid_e, N, K,
    stride_we, stride_wn, stride_wk, stride_qe, stride_qn, stride_qk, stride_se, stride_sn, stride_sk,
    stride_qte, stride_qtk, stride_qtn, stride_ste, stride_stk, stride_stn,
    FP8_MAX: tl.constexpr, AMAX_EPS: tl.constexpr, UE8M0: tl.constexpr, WITH_TRANSPOSE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TCHUNK: tl.constexpr,
):
    """Quantize scale block ``(pid_e, pid_n, pid_k)``: amax, scale and cast from one read of HBM. The transposed
    copy is written in TCHUNK-column slices re-read from L2 (the block was just loaded) and transposed as float32
    before the cast. Transposing the FP8 tile itself (one 16 KB shuffle) wrote wrong bytes on the GPU (Triton 3.6,
    H200) for float32 inputs with 16-aligned shapes, and was slower (bench/NOTES.md)."""
    pid_e = pid_e.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    n64 = offs_n.to(tl.int64)
    k64 = offs_k.to(tl.int64)

    w = tl.load(w_ptr + pid_e * stride_we + n64[:, None] * stride_wn + k64[None, :] * stride_wk,
                mask=mask, other=0.0).to(tl.float32)
    # masked lanes read 0, which never raises the amax: an edge block's amax covers only its real elements
    amax = tl.max(tl.max(_abs_nan_as_inf(w), axis=1), axis=0)
    bad = amax == float("inf")
    s = tl.math.div_rn(tl.maximum(amax, AMAX_EPS), FP8_MAX)
    if UE8M0:
        s = _round_up_pow2(s)
    inv = tl.math.div_rn(1.0, s)
    q = w * inv
    q = tl.where(bad, float("nan"), q)
    s = tl.where(bad, float("nan"), s)
    q8 = q.to(q_ptr.dtype.element_ty)

    tl.store(q_ptr + pid_e * stride_qe + n64[:, None] * stride_qn + k64[None, :] * stride_qk, q8, mask=mask)
    tl.store(s_ptr + pid_e * stride_se + pid_n * stride_sn + pid_k * stride_sk, s)
    if WITH_TRANSPOSE:
        # a square block's transpose quantizes to the transposed block: same scale, same bytes
        qt_base = qt_ptr + pid_e * stride_qte
        for c in tl.static_range(BLOCK_K // TCHUNK):
            offs_c = pid_k * BLOCK_K + c * TCHUNK + tl.arange(0, TCHUNK)
            mask_c = (offs_n[:, None] < N) & (offs_c[None, :] < K)
            c64 = offs_c.to(tl.int64)
            wc = tl.load(w_ptr + pid_e * stride_we + n64[:, None] * stride_wn + c64[None, :] * stride_wk,
                         mask=mask_c, other=0.0).to(tl.float32)
            qc = tl.trans(tl.where(bad, float("nan"), wc * inv))  # (TCHUNK, BLOCK_N), still float32
            tl.store(qt_base + c64[:, None] * stride_qtk + n64[None, :] * stride_qtn,
                     qc.to(qt_ptr.dtype.element_ty), mask=tl.trans(mask_c))
        tl.store(st_ptr + pid_e * stride_ste + pid_k * stride_stk + pid_n * stride_stn, s)


@triton.jit
def quant_weight_block_kernel(
    # pointers
    w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr,
    # sizes: E experts of (N, K); kb x nb scale blocks each
    N, K, E, nb, kb,
    # strides (elements): w, q are (E, N, K); s is (E, nb, kb); qt is (E, K, N); st is (E, kb, nb)
    stride_we, stride_wn, stride_wk,
    stride_qe, stride_qn, stride_qk,
    stride_se, stride_sn, stride_sk,
    stride_qte, stride_qtk, stride_qtn,
    stride_ste, stride_stk, stride_stn,
    # numerics
    FP8_MAX: tl.constexpr, AMAX_EPS: tl.constexpr, UE8M0: tl.constexpr, WITH_TRANSPOSE: tl.constexpr,
    # meta: one program per (BLOCK_N, BLOCK_K) scale block (grid (kb, nb, E)), or with PERSISTENT a 1-D grid whose
    # programs walk the blocks k-fastest in a pipelined loop (STAGES: the next block's load is issued while the
    # current one is reduced and stored; experimental, bench/NOTES.md)
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TCHUNK: tl.constexpr, PERSISTENT: tl.constexpr,
    STAGES: tl.constexpr,
):
    if PERSISTENT:
        for blk in tl.range(tl.program_id(0), E * nb * kb, tl.num_programs(0), num_stages=STAGES):
            _quant_weight_one_block(
                w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, blk % kb, (blk // kb) % nb, blk // (kb * nb), N, K,
                stride_we, stride_wn, stride_wk, stride_qe, stride_qn, stride_qk, stride_se, stride_sn, stride_sk,
                stride_qte, stride_qtk, stride_qtn, stride_ste, stride_stk, stride_stn,
                FP8_MAX, AMAX_EPS, UE8M0, WITH_TRANSPOSE, BLOCK_N, BLOCK_K, TCHUNK)
    else:
        _quant_weight_one_block(
            w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, tl.program_id(0), tl.program_id(1), tl.program_id(2), N, K,
            stride_we, stride_wn, stride_wk, stride_qe, stride_qn, stride_qk, stride_se, stride_sn, stride_sk,
            stride_qte, stride_qtk, stride_qtn, stride_ste, stride_stk, stride_stn,
            FP8_MAX, AMAX_EPS, UE8M0, WITH_TRANSPOSE, BLOCK_N, BLOCK_K, TCHUNK)


@triton.jit
def quant_act_group_kernel(
    # pointers
    x_ptr, q_ptr, s_ptr,
    # sizes: x is viewed as (B, M, K); G = ceil(K / GROUP) groups per row
    M, K,
    # strides (elements)
    stride_xb, stride_xm, stride_xk,
    stride_qb, stride_qm, stride_qk,
    stride_sb, stride_sm, stride_sg,
    # numerics
    FP8_MAX: tl.constexpr, EPS: tl.constexpr, UE8M0: tl.constexpr, FMA_DIV: tl.constexpr,
    # meta: a program owns BLOCK_M rows x GROUPS_PER_PROG groups, loaded as one tile so that all its bytes are in
    # flight at once; writing the scales of many rows of one group keeps column-major (TMA-aligned) stores contiguous
    GROUP: tl.constexpr, GROUPS_PER_PROG: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    WIDTH: tl.constexpr = GROUPS_PER_PROG * GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_g * WIDTH + tl.arange(0, WIDTH)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    m64 = offs_m.to(tl.int64)
    k64 = offs_k.to(tl.int64)
    x = tl.load(x_ptr + pid_b * stride_xb + m64[:, None] * stride_xm + k64[None, :] * stride_xk,
                mask=mask, other=0.0).to(tl.float32)
    x3 = tl.reshape(x, (BLOCK_M, GROUPS_PER_PROG, GROUP))
    amax = tl.max(_abs_nan_as_inf(x3), axis=2)  # (BLOCK_M, GROUPS_PER_PROG)
    bad = amax == float("inf")
    s = tl.math.div_rn(tl.maximum(amax, EPS), FP8_MAX)
    if UE8M0:
        s = _round_up_pow2(s)
    if FMA_DIV:
        # x / s correctly rounded without a per-element IEEE division: with r = RN(1/s) and q0 = RN(x*r)
        # (within 1 ulp), one exact-residual correction gives RN(x/s) (Markstein's theorem)
        r = tl.math.div_rn(1.0, s)[:, :, None]
        q0 = x3 * r
        q = tl.fma(tl.fma(-q0, s[:, :, None], x3), r, q0)
    else:
        q = tl.math.div_rn(x3, s[:, :, None])
    q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
    q = tl.where(bad[:, :, None], float("nan"), q)
    s = tl.where(bad, float("nan"), s)
    tl.store(q_ptr + pid_b * stride_qb + m64[:, None] * stride_qm + k64[None, :] * stride_qk,
             tl.reshape(q, (BLOCK_M, WIDTH)).to(q_ptr.dtype.element_ty), mask=mask)
    g = pid_g * GROUPS_PER_PROG + tl.arange(0, GROUPS_PER_PROG)
    s_mask = (offs_m[:, None] < M) & (g[None, :] * GROUP < K)
    tl.store(s_ptr + pid_b * stride_sb + m64[:, None] * stride_sm + g[None, :] * stride_sg, s, mask=s_mask)
