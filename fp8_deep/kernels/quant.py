"""FP8 E4M3 quantization kernels: 128x128 weight blocks and 1xG activation groups.

Numerics are the ones of ``fp8_deep.reference`` bit for bit (the reasons are written there). Two GPU details:
``/`` on float32 compiles to an approximate division in Triton, so every division that must match torch's IEEE
result goes through ``tl.math.div_rn``; and the UE8M0 round-up is done on the bits, never through ``log2``.
"""
import triton
import triton.language as tl

from ..numerics import UE8M0_ACT_SCALE_FLOOR
from .pdl import pdl_prologue

_UE8M0_ACT_SCALE_FLOOR = tl.constexpr(UE8M0_ACT_SCALE_FLOOR)


@triton.jit
def _round_up_pow2(s):
    """Exact round-up of positive finite float32 values to a power of two (UE8M0 scales)."""
    bits = s.to(tl.int32, bitcast=True)
    exp = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    exp = tl.where(mant != 0, exp + 1, exp)
    return (exp << 23).to(tl.float32, bitcast=True)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _amax_nan(a, axis, NAN_MAX: tl.constexpr):
    """max |x| over ``axis`` that never hides a non-finite value (``_is_bad`` of the result flags NaN and Inf).

    NAN_MAX (GPU): one NaN-propagating max per element (``max.NaN``). Otherwise NaN is first folded into +Inf
    (abs, compare, select): the interpreter runs a custom-combine reduction as a Python loop, far too slow."""
    if NAN_MAX:
        return tl.reduce(tl.abs(a), axis, _max_nan)
    else:
        x = tl.abs(a)
        return tl.max(tl.where(x != x, float("inf"), x), axis)


@triton.jit
def _nan_if(bad, q, NAN_SELECT: tl.constexpr):
    """``q`` of a group/block whose scale is NaN when ``bad``. On the GPU every product or quotient with that NaN
    scale already is the canonical positive NaN (PTX arithmetic does not propagate payloads or signs), so the select
    is needed only where NaN keeps its sign: the interpreter (numpy), where a -NaN input would leak into q."""
    if NAN_SELECT:
        return tl.where(bad, float("nan"), q)
    else:
        return q


@triton.jit
def _is_bad(amax):
    return (amax != amax) | (amax == float("inf"))


@triton.jit
def _weight_blocks(w, out_ty: tl.constexpr, FP8_MAX: tl.constexpr, AMAX_EPS: tl.constexpr, UE8M0: tl.constexpr,
                   NAN_MAX: tl.constexpr, NAN_SELECT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCKS_K: tl.constexpr):
    """float32 ``w`` (BLOCK_N, BLOCK_K * BLOCKS_K), BLOCKS_K scale blocks side by side -> (q ``out_ty``, s, 1/s,
    non-finite flag), the last three (BLOCKS_K,). Lanes outside the tensor must hold 0, which never raises the amax:
    an edge block's amax covers only its real elements. A non-finite block: scale NaN and every q the positive NaN."""
    w3 = tl.reshape(w, (BLOCK_N, BLOCKS_K, BLOCK_K))
    amax = _amax_nan(_amax_nan(w3, 2, NAN_MAX), 0, NAN_MAX)
    s = tl.math.div_rn(tl.maximum(amax, AMAX_EPS), FP8_MAX)
    if UE8M0:
        s = _round_up_pow2(s)
    bad = _is_bad(amax)
    s = tl.where(bad, float("nan"), s)
    inv = tl.math.div_rn(1.0, s)
    q3 = _nan_if(bad[None, :, None], w3 * inv[None, :, None], NAN_SELECT)
    return tl.reshape(q3, (BLOCK_N, BLOCK_K * BLOCKS_K)).to(out_ty), s, inv, bad


@triton.jit
def _quant_weight_one_block(
    w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, pid_k, pid_n, pid_e, N, K, kb,
    stride_we, stride_wn, stride_wk, stride_qe, stride_qn, stride_qk, stride_se, stride_sn, stride_sk,
    stride_qte, stride_qtk, stride_qtn, stride_ste, stride_stk, stride_stn,
    FP8_MAX: tl.constexpr, AMAX_EPS: tl.constexpr, UE8M0: tl.constexpr, WITH_TRANSPOSE: tl.constexpr,
    NAN_MAX: tl.constexpr, NAN_SELECT: tl.constexpr, LOAD_EVICT: tl.constexpr, STORE_EVICT: tl.constexpr,
    RELOAD_EVICT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TCHUNK: tl.constexpr, BLOCKS_K: tl.constexpr,
):
    """Quantize scale blocks ``(pid_e, pid_n, pid_k * BLOCKS_K + j)``, j < BLOCKS_K: amax, scale and cast from one
    read of HBM. The transposed copy (BLOCKS_K == 1 only) is written in TCHUNK-column slices re-read from L2 (the
    block was just loaded) and transposed as float32 before the cast. Transposing the FP8 tile itself (one 16 KB
    shuffle) wrote wrong bytes on the GPU (Triton 3.6, H200) for float32 inputs with 16-aligned shapes, and was
    slower (docs/performance-log.md)."""
    pid_e = pid_e.to(tl.int64)
    WIDTH: tl.constexpr = BLOCK_K * BLOCKS_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * WIDTH + tl.arange(0, WIDTH)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    n64 = offs_n.to(tl.int64)
    k64 = offs_k.to(tl.int64)

    w = tl.load(w_ptr + pid_e * stride_we + n64[:, None] * stride_wn + k64[None, :] * stride_wk,
                mask=mask, other=0.0, eviction_policy=LOAD_EVICT).to(tl.float32)
    q_ptrs = q_ptr + pid_e * stride_qe + n64[:, None] * stride_qn + k64[None, :] * stride_qk
    q8, s, inv, bad = _weight_blocks(w, q_ptr.dtype.element_ty, FP8_MAX, AMAX_EPS, UE8M0, NAN_MAX, NAN_SELECT,
                                     BLOCK_N, BLOCK_K, BLOCKS_K)
    kbs = pid_k * BLOCKS_K + tl.arange(0, BLOCKS_K)
    tl.store(s_ptr + pid_e * stride_se + pid_n * stride_sn + kbs * stride_sk, s, mask=kbs < kb)
    tl.store(q_ptrs, q8, mask=mask, eviction_policy=STORE_EVICT)
    if WITH_TRANSPOSE:
        tl.static_assert(BLOCKS_K == 1, "the transposed copy is written per block")
        # a square block's transpose quantizes to the transposed block: same scale, same bytes
        qt_base = qt_ptr + pid_e * stride_qte
        for c in tl.static_range(BLOCK_K // TCHUNK):
            offs_c = pid_k * BLOCK_K + c * TCHUNK + tl.arange(0, TCHUNK)
            mask_c = (offs_n[:, None] < N) & (offs_c[None, :] < K)
            c64 = offs_c.to(tl.int64)
            wc = tl.load(w_ptr + pid_e * stride_we + n64[:, None] * stride_wn + c64[None, :] * stride_wk,
                         mask=mask_c, other=0.0, eviction_policy=RELOAD_EVICT).to(tl.float32)
            qc = tl.trans(_nan_if(bad[None, :], wc * inv[None, :], NAN_SELECT))  # (TCHUNK, BLOCK_N), float32
            tl.store(qt_base + c64[:, None] * stride_qtk + n64[None, :] * stride_qtn,
                     qc.to(qt_ptr.dtype.element_ty), mask=tl.trans(mask_c), eviction_policy=STORE_EVICT)
        tl.store(st_ptr + pid_e * stride_ste + kbs * stride_stk + pid_n * stride_stn, s)


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
    NAN_MAX: tl.constexpr, NAN_SELECT: tl.constexpr,
    # L2 eviction policies: of the block's load, of the FP8 stores, of the transposed copy's re-read
    LOAD_EVICT: tl.constexpr, STORE_EVICT: tl.constexpr, RELOAD_EVICT: tl.constexpr,
    # meta: one program per (BLOCK_N, BLOCK_K * BLOCKS_K) run of scale blocks, grid (cdiv(kb, BLOCKS_K), nb, E). A
    # persistent grid walking the blocks in a pipelined loop measured 8% slower on an H100 (docs/performance-log.md).
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TCHUNK: tl.constexpr, BLOCKS_K: tl.constexpr,
):
    _quant_weight_one_block(
        w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, tl.program_id(0), tl.program_id(1), tl.program_id(2), N, K, kb,
        stride_we, stride_wn, stride_wk, stride_qe, stride_qn, stride_qk, stride_se, stride_sn, stride_sk,
        stride_qte, stride_qtk, stride_qtn, stride_ste, stride_stk, stride_stn,
        FP8_MAX, AMAX_EPS, UE8M0, WITH_TRANSPOSE, NAN_MAX, NAN_SELECT, LOAD_EVICT, STORE_EVICT, RELOAD_EVICT, BLOCK_N,
        BLOCK_K, TCHUNK, BLOCKS_K)


@triton.jit
def quant_weight_table_kernel(
    # int64 (3, n): the addresses of tensor i's source, FP8 output and scales in row 0, 1, 2 of column i
    table, n,
    # sizes: each tensor (N, K); kb scale blocks along K
    N, K, kb,
    # strides (elements), shared by the n tensors: w, q are (N, K); s is (nb, kb)
    stride_wn, stride_wk, stride_qn, stride_qk, stride_sn, stride_sk,
    # numerics
    FP8_MAX: tl.constexpr, AMAX_EPS: tl.constexpr, UE8M0: tl.constexpr, NAN_MAX: tl.constexpr,
    NAN_SELECT: tl.constexpr,
    # L2 eviction policies of the block's load and of the FP8 stores
    LOAD_EVICT: tl.constexpr, STORE_EVICT: tl.constexpr,
    # the sources' element type (the table holds bare addresses); ALIGN16: every address is 16-byte aligned (the
    # launcher checked), which a pointer loaded from memory cannot tell the compiler: without it no vector accesses
    W_DTYPE: tl.constexpr, ALIGN16: tl.constexpr,
    # meta: as quant_weight_block_kernel, grid (cdiv(kb, BLOCKS_K), nb, n)
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKS_K: tl.constexpr,
):
    """``quant_weight_block_kernel`` (one layout) over ``n`` separate tensors of one shape and layout: tensor
    ``program_id(2)``'s addresses come from ``table``, so separately allocated weights (per-expert parameters) are
    quantized by one launch, without first copying them into a stack."""
    i = tl.program_id(2)
    w_ptr = tl.load(table + i).to(tl.pointer_type(W_DTYPE))
    q_ptr = tl.load(table + n + i).to(tl.pointer_type(tl.float8e4nv))
    s_ptr = tl.load(table + 2 * n + i).to(tl.pointer_type(tl.float32))
    if ALIGN16:
        w_ptr = tl.multiple_of(w_ptr, 16)
        q_ptr = tl.multiple_of(q_ptr, 16)
        s_ptr = tl.multiple_of(s_ptr, 16)
    # the per-tensor offset is in the addresses: expert index 0 of a one-expert stack, every expert stride 0
    _quant_weight_one_block(
        w_ptr, q_ptr, s_ptr, q_ptr, s_ptr, tl.program_id(0), tl.program_id(1), i * 0, N, K, kb,
        0, stride_wn, stride_wk, 0, stride_qn, stride_qk, 0, stride_sn, stride_sk,
        0, 0, 0, 0, 0, 0,
        FP8_MAX, AMAX_EPS, UE8M0, False, NAN_MAX, NAN_SELECT, LOAD_EVICT, STORE_EVICT, "", BLOCK_N,
        BLOCK_K, 32, BLOCKS_K)


@triton.jit
def _max_keep_nan(a, b):
    """max(a, b), NaN from either side wins (torch.amax's semantics), as a compare and a select."""
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def _stack_slice(r_off, r_base, bcol, brow, K: tl.constexpr, BLOCK: tl.constexpr):
    """Offsets and mask of one pass's (1, R) slice of block (brow, bcol): its element r is row r // BLOCK, column
    r % BLOCK of the block; a block row of w spans BLOCK * K elements."""
    r = r_off + r_base
    return r % BLOCK + BLOCK * bcol + K * (r // BLOCK) + (BLOCK * K) * brow, r < BLOCK * BLOCK


@triton.jit
def quant_weight_stack_kernel(
    # pointers: w, q contiguous (E, N, K) with N and K multiples of BLOCK; s contiguous (E, N / BLOCK, K / BLOCK)
    w_ptr, q_ptr, s_ptr,
    # K and K / BLOCK as compile-time constants: the index math folds to shifts and constants, the loops to one
    # iteration (passed at run time, the same kernel measured 0.87x: docs/performance-log.md, run d0a3d9d)
    K: tl.constexpr, KB: tl.constexpr,
    # numerics
    FP8_MAX: tl.constexpr, AMAX_EPS: tl.constexpr, UE8M0: tl.constexpr, NAN_MAX: tl.constexpr,
    NAN_SELECT: tl.constexpr,
    # meta: one BLOCK x BLOCK scale block per program, grid (E * N / BLOCK * KB,), 32 warps, num_stages=1
    BLOCK: tl.constexpr,
):
    """One-layout quantization of a large contiguous weight stack, one scale block per program, read twice: the
    amax pass loads the block ``evict_last``, the cast pass loads it again (an L2 hit) ``evict_first``, so nothing
    is held across the scale's computation (~30 registers, two 32-warp programs per SM).

    This is the op sequence torch.compile (inductor) generates for ``fp8_deep.reference``'s weight reduction, with
    the contract's math: ``s = RN(amax / 448)``, ``q = w * RN(1 / s)`` (inductor: ``amax * RN(1/448)`` and an
    approximate reciprocal, other bytes), and the non-finite policy of ``_weight_blocks``. Kept that close on
    purpose: the same structure written otherwise (1-D tiles, max.NaN reduction, 3-level block index, no loop;
    commit fb4be3d) ran 0.1% slower on the H100, this one level with torch.compile
    (docs/performance-log.md, run 2d7c020).
    Offsets are int32: the launcher sends only tensors of fewer than 2**31 elements."""
    R: tl.constexpr = BLOCK * BLOCK
    blk = tl.program_id(0) + tl.arange(0, 1)[:, None]  # (1, 1): the block, and its scale's flat index
    bcol = blk % KB
    brow = blk // KB  # block rows of all experts in turn
    r_base = tl.arange(0, R)[None, :]
    acc = tl.full([1, R], float("-inf"), tl.float32)
    for r_off in tl.range(0, R, R):
        offs, r_mask = _stack_slice(r_off, r_base, bcol, brow, K, BLOCK)
        x = tl.abs(tl.load(w_ptr + offs, r_mask, other=0.0, eviction_policy="evict_last").to(tl.float32))
        if NAN_MAX:
            acc = tl.where(r_mask, _max_keep_nan(acc, x), acc)
        else:  # the interpreter: NaN folded into +Inf, then a plain max (see _amax_nan)
            acc = tl.where(r_mask, tl.maximum(acc, tl.where(x != x, float("inf"), x)), acc)
    if NAN_MAX:
        amax = tl.reduce(acc, 1, _max_keep_nan)[:, None]
    else:
        amax = tl.max(acc, 1)[:, None]
    s = tl.math.div_rn(tl.maximum(amax, AMAX_EPS), FP8_MAX)
    if UE8M0:
        s = _round_up_pow2(s)
    bad = _is_bad(amax)
    s = tl.where(bad, float("nan"), s)
    tl.store(s_ptr + blk, s)
    inv = tl.math.div_rn(tl.full([1, 1], 1.0, tl.float32), s)
    for r_off in tl.range(0, R, R):
        offs, r_mask = _stack_slice(r_off, r_base, bcol, brow, K, BLOCK)
        w = tl.load(w_ptr + offs, r_mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        tl.store(q_ptr + offs, _nan_if(bad, w * inv, NAN_SELECT).to(q_ptr.dtype.element_ty), r_mask)


@triton.jit
def _group_scale(amax, FP8_MAX: tl.constexpr, EPS: tl.constexpr, UE8M0: tl.constexpr):
    """The scale half of ``_quant_groups`` from a group's amax (also for an amax gathered over several tiles with a
    NaN-propagating max): ``(s, non-finite flag)``. UE8M0: ``max(s, 1e-10)`` rounded up to a power of two, vLLM's
    CUDA op. A non-finite group gets scale NaN."""
    s = tl.math.div_rn(tl.maximum(amax, EPS), FP8_MAX)
    if UE8M0:
        # vLLM's CUDA op floors the scale at 1e-10 before the round-up
        s = _round_up_pow2(tl.maximum(s, _UE8M0_ACT_SCALE_FLOOR))
    bad = _is_bad(amax)
    return tl.where(bad, float("nan"), s), bad


@triton.jit
def _group_q(x, se, bad, FMA_DIV: tl.constexpr, NAN_SELECT: tl.constexpr):
    """The cast half of ``_quant_groups``: float32 ``x / se`` correctly rounded (``se``, ``bad`` broadcast over x).

    No clamp to +-FP8_MAX: with ``s >= RN(amax / FP8_MAX)`` every ``|x / s|`` rounds to at most FP8_MAX, so the
    reference's clamp never changes a finite value."""
    if FMA_DIV:
        # x / s correctly rounded without a per-element IEEE division: with r = RN(1/s) and q0 = RN(x*r)
        # (within 1 ulp), one exact-residual correction gives RN(x/s) (Markstein's theorem)
        r = tl.math.div_rn(1.0, se)
        q0 = x * r
        # q0 == 0 keeps x's sign (-0 / s is -0, the FMA chain would give +0: FP8 0x80 vs 0x00)
        q = tl.where(q0 == 0, q0, tl.fma(tl.fma(-q0, se, x), r, q0))
    else:
        q = tl.math.div_rn(x, se)
    return _nan_if(bad, q, NAN_SELECT)


@triton.jit
def _quant_groups(x, AXIS: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr, UE8M0: tl.constexpr,
                  FMA_DIV: tl.constexpr, NAN_MAX: tl.constexpr, NAN_SELECT: tl.constexpr):
    """float32 ``x`` whose ``AXIS`` spans one group -> (q float32 holding FP8 values, s per group): ``_group_scale``
    of the group's amax, then ``_group_q``. A non-finite group gets scale NaN and all q the positive NaN."""
    s, bad = _group_scale(_amax_nan(x, AXIS, NAN_MAX), FP8_MAX, EPS, UE8M0)
    return _group_q(x, tl.expand_dims(s, AXIS), tl.expand_dims(bad, AXIS), FMA_DIV, NAN_SELECT), s


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
    FP8_MAX: tl.constexpr, EPS: tl.constexpr, UE8M0: tl.constexpr, FMA_DIV: tl.constexpr, NAN_MAX: tl.constexpr,
    NAN_SELECT: tl.constexpr,
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
    q, s = _quant_groups(x3, 2, FP8_MAX, EPS, UE8M0, FMA_DIV, NAN_MAX, NAN_SELECT)
    tl.store(q_ptr + pid_b * stride_qb + m64[:, None] * stride_qm + k64[None, :] * stride_qk,
             tl.reshape(q, (BLOCK_M, WIDTH)).to(q_ptr.dtype.element_ty), mask=mask)
    g = pid_g * GROUPS_PER_PROG + tl.arange(0, GROUPS_PER_PROG)
    s_mask = (offs_m[:, None] < M) & (g[None, :] * GROUP < K)
    # int64: column-major scales put group g at g * align(M, 4), past 2**31 once M * G is
    g64 = g.to(tl.int64)
    tl.store(s_ptr + pid_b * stride_sb + m64[:, None] * stride_sm + g64[None, :] * stride_sg, s, mask=s_mask)


@triton.jit
def quant_act_flat_kernel(
    # pointers
    x_ptr, q_ptr, s_ptr,
    # sizes: x is viewed as (B, M, K) with K = G * GROUP (whole groups only); NG = B * M * G groups in all
    NG, M, G,
    # strides (elements); stride_xk == stride_qk == 1 (the launcher checks): a group is GROUP contiguous elements
    stride_xb, stride_xm, stride_qb, stride_qm,
    stride_sb, stride_sm, stride_sg,
    # numerics
    FP8_MAX: tl.constexpr, EPS: tl.constexpr, UE8M0: tl.constexpr, FMA_DIV: tl.constexpr, NAN_MAX: tl.constexpr,
    NAN_SELECT: tl.constexpr,
    # meta: a program owns BLOCK_G consecutive groups in (b, m, g) order -- for a contiguous x one contiguous run of
    # BLOCK_G * GROUP elements (the access pattern of a copy; the (BLOCK_M, width) tile of quant_act_group_kernel
    # reads BLOCK_M short row runs instead). S_EVICT: the scale stores' L2 policy ("" for none)
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, S_EVICT: tl.constexpr,
):
    # int32 index math (NG < 2**31, the launcher checks): a 64-bit division costs ~4x a 32-bit one
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = g < NG
    row = g // G
    gi = g - row * G
    b = (row // M).to(tl.int64)
    m = (row % M).to(tl.int64)
    gi = gi.to(tl.int64)
    j = tl.arange(0, GROUP)
    x = tl.load(x_ptr + (b * stride_xb + m * stride_xm + gi * GROUP)[:, None] + j[None, :],
                mask=gmask[:, None], other=0.0).to(tl.float32)
    q, s = _quant_groups(x, 1, FP8_MAX, EPS, UE8M0, FMA_DIV, NAN_MAX, NAN_SELECT)
    tl.store(q_ptr + (b * stride_qb + m * stride_qm + gi * GROUP)[:, None] + j[None, :],
             q.to(q_ptr.dtype.element_ty), mask=gmask[:, None])
    # column-major (TMA-aligned) scale lines hold 32 rows of one group, written by ~112 programs: evict_last keeps
    # each line in L2 until it is complete instead of writing it back in pieces (1-3% at M = 4096-8192 on an H100)
    tl.store(s_ptr + b * stride_sb + m * stride_sm + gi * stride_sg, s, mask=gmask, eviction_policy=S_EVICT)


@triton.jit
def quant_permute_kernel(
    # pointers: x (T, K) high precision; sorted (num_rows,) int32 flat choice index per row (sentinel >= numel on
    # padding); q (num_rows, K) FP8; s (num_rows, G) float32, any strides
    x_ptr, sorted_ptr, q_ptr, s_ptr,
    # sizes
    numel, top_k, num_rows, K,
    # strides (elements)
    stride_xm, stride_xk, stride_qm, stride_qk, stride_sm, stride_sg,
    # numerics
    FP8_MAX: tl.constexpr, EPS: tl.constexpr, UE8M0: tl.constexpr, FMA_DIV: tl.constexpr, NAN_MAX: tl.constexpr,
    NAN_SELECT: tl.constexpr,
    # meta: as quant_act_group_kernel, grid (cdiv(num_rows, BLOCK_M), cdiv(G, GROUPS_PER_PROG))
    GROUP: tl.constexpr, GROUPS_PER_PROG: tl.constexpr, BLOCK_M: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # wait for / release the neighbouring launches (kernels/pdl.py)
):
    """``quant_act_group_kernel`` reading each row of the routing plan from its token's row of ``x``: the activation
    quantization and ``permute_rows_kernel`` in one pass (the routed rows come out quantized in their expert
    segments; a token routed to k experts is quantized k times, to the same bytes). Padding rows: q 0, scale 0, as
    ``permute_rows`` writes them."""
    pdl_prologue(USE_PDL)
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < num_rows
    s_id = tl.load(sorted_ptr + r, mask=rmask, other=numel)
    real = rmask & (s_id >= 0) & (s_id < numel)
    _quant_routed_rows(x_ptr, q_ptr, s_ptr, tl.where(real, s_id, 0) // top_k, real, r, rmask, tl.program_id(1), K,
                       stride_xm, stride_xk, stride_qm, stride_qk, stride_sm, stride_sg,
                       FP8_MAX, EPS, UE8M0, FMA_DIV, NAN_MAX, NAN_SELECT, GROUP, GROUPS_PER_PROG, BLOCK_M)


@triton.jit
def _quant_routed_rows(x_ptr, q_ptr, s_ptr, tok, real, r, rmask, pid_g, K,
                       stride_xm, stride_xk, stride_qm, stride_qk, stride_sm, stride_sg,
                       FP8_MAX: tl.constexpr, EPS: tl.constexpr, UE8M0: tl.constexpr, FMA_DIV: tl.constexpr,
                       NAN_MAX: tl.constexpr, NAN_SELECT: tl.constexpr, GROUP: tl.constexpr,
                       GROUPS_PER_PROG: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows ``r`` (stored where ``rmask``) of the permuted operand, column slice ``pid_g`` (GROUPS_PER_PROG groups):
    each quantized from its token's row ``tok`` of x where ``real``; padding rows get q 0 and scale 0."""
    WIDTH: tl.constexpr = GROUPS_PER_PROG * GROUP
    tok = tok.to(tl.int64)
    offs_k = pid_g * WIDTH + tl.arange(0, WIDTH)
    kmask = offs_k < K
    k64 = offs_k.to(tl.int64)
    x = tl.load(x_ptr + tok[:, None] * stride_xm + k64[None, :] * stride_xk, mask=real[:, None] & kmask[None, :],
                other=0.0).to(tl.float32)
    q, s = _quant_groups(tl.reshape(x, (BLOCK_M, GROUPS_PER_PROG, GROUP)), 2, FP8_MAX, EPS, UE8M0, FMA_DIV, NAN_MAX,
                         NAN_SELECT)
    r64 = r.to(tl.int64)
    # a padding row quantizes zeros to +0 (0x00) already; its scale is set to 0 (the eps floor would give eps/448)
    tl.store(q_ptr + r64[:, None] * stride_qm + k64[None, :] * stride_qk,
             tl.reshape(q, (BLOCK_M, WIDTH)).to(q_ptr.dtype.element_ty), mask=rmask[:, None] & kmask[None, :])
    g = pid_g * GROUPS_PER_PROG + tl.arange(0, GROUPS_PER_PROG)
    tl.store(s_ptr + r64[:, None] * stride_sm + g.to(tl.int64)[None, :] * stride_sg, tl.where(real[:, None], s, 0.0),
             mask=rmask[:, None] & (g[None, :] * GROUP < K))
