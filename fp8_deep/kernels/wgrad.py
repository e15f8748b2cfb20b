"""FP8 block-scaled K-grouped GEMM kernels: the weight gradient (wgrad) of the MoE experts.

``out[e] = deq(a_t)[:, seg_e] @ deq(b_t)[:, seg_e].T`` with ``seg_e = [off_e, off_e + count_e)`` a range of the
token rows ``M`` of the permuted buffer: the reduction (K) axis is the tokens of expert ``e``. Operands are K-major
(``a_t`` ``(P, M)``, ``b_t`` ``(Q, M)``, unit stride along M), quantized in 128x1 tiles: one dequantization scale per
128 consecutive rows of M and per row of ``a_t`` / ``b_t`` (DeepSeek-V3 re-tiles its cached 1x128 activations this
way for Wgrad, section 3.3 of its report). Segments start at multiples of 128, so a scale block never straddles two
experts; that is a precondition (it cannot be checked without reading the offsets on the host).

Numerics: FP32 promotion every 128 of K, as DeepSeek-V3 and DeepGEMM do: each 128-row chunk is one FP8 ``tl.dot``
into a fresh float32 tile (on SM90 the tensor cores keep ~14 bits while accumulating inside it), then
``acc += part * sa[:, None] * sb[None, :]`` in float32 -- both scales vary along the output tile (one per output row
``p`` and one per output column ``q``), so the promotion is an outer product, not a scalar as in the forward.
Columns past ``count_e`` (padding up to the next segment, whatever bytes they hold, NaN included) are masked at the
load (``other=0``) in the last, partial chunk; full chunks load without masks. The float32 sum over all of an
expert's tokens is stored once per element in the output's dtype (or added into an float32 ``out``: the
read-modify-write of a ``main_grad``). Each output element is produced by one program with a fixed K order: results
are deterministic, no atomics.

Scheduling: the tile space is ``E x cdiv(P, BLOCK_P) x cdiv(Q, BLOCK_Q)`` -- every expert's whole output is written
(zeros for an empty expert), so the grid depends only on host-known sizes and the launch can be captured in a CUDA
graph; ``off_e`` / ``count_e`` are read on the device. Tiles are numbered expert after expert, so the programs
running at one time share one expert's ``a_t`` / ``b_t`` panels (a few MB) in L2; inside an expert, GROUP_P p-tiles
sweep the q-tiles together (the usual grouped order). Persistent programs walk the same order with a stride.
"""
import triton
import triton.language as tl


@triton.jit
def _wgrad_tile(tile_id, num_p, num_q, GROUP_P: tl.constexpr):
    """Tile ``tile_id`` -> (expert, p-tile, q-tile): expert-major, grouped order inside an expert."""
    tiles_per_e = num_p * num_q
    e = tile_id // tiles_per_e
    t = tile_id % tiles_per_e
    width = GROUP_P * num_q
    first_p = (t // width) * GROUP_P
    group_rows = tl.minimum(num_p - first_p, GROUP_P)
    tp = first_p + (t % width) % group_rows
    tq = (t % width) // group_rows
    return e, tp, tq


@triton.jit
def _locate(tile_id, num_p, num_q, offsets_ptr, counts_ptr, M, P, Q, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
            GROUP_P: tl.constexpr):
    """Tile -> (expert, p-tile, q-tile, the segment's first row and its valid rows, output rows/columns, and those
    clamped into P / Q for the loads: rows past P or Q are read from a valid row and never stored, so the loads need
    no row masks). A segment reaching past M is cut at M (a precondition violation must not read out of bounds)."""
    e, tp, tq = _wgrad_tile(tile_id, num_p, num_q, GROUP_P)
    seg = tl.load(offsets_ptr + e)
    count = tl.maximum(tl.minimum(tl.load(counts_ptr + e), M - seg), 0)
    offs_p = tp * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tq * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ld = tl.minimum(offs_p, P - 1).to(tl.int64)
    q_ld = tl.minimum(offs_q, Q - 1).to(tl.int64)
    return e, tp, tq, seg, count, offs_p, offs_q, p_ld, q_ld


@triton.jit
def _promote(acc, a, b, sa, sb):
    """One 128-row chunk: FP8 dot into a fresh float32 tile, then ``acc += part * sa[p] * sb[q]``."""
    part = tl.dot(a, tl.trans(b))
    return acc + part * sa[:, None] * sb[None, :]


@triton.jit
def _scale_ptrs(as_ptr, bs_ptr, p_ld, q_ld, seg, stride_asp, stride_ask, stride_bsq, stride_bsk,
                BLOCK_K: tl.constexpr):
    """The scales of the segment's first 128-row chunk: one per output row ``p`` and one per output column ``q``."""
    kb0 = (seg // BLOCK_K).to(tl.int64)
    return as_ptr + p_ld * stride_asp + kb0 * stride_ask, bs_ptr + q_ld * stride_bsq + kb0 * stride_bsk


@triton.jit
def _partial_chunk(acc, a_ptr, b_ptr, p_ld, q_ld, stride_ap, stride_bq, col0, rem, sa_ptrs, sb_ptrs,
                   BLOCK_K: tl.constexpr):
    """The segment's partial last chunk from column ``col0``: columns past ``rem`` are padding, loaded as zeros
    whatever they hold (masked pointer loads in both kernels: TMA bounds are the tensor's, not the segment's)."""
    offs_k = tl.arange(0, BLOCK_K)
    cols = (col0 + offs_k).to(tl.int64)
    k_ok = (offs_k < rem)[None, :]
    a = tl.load(a_ptr + p_ld[:, None] * stride_ap + cols[None, :], mask=k_ok, other=0.0)
    b = tl.load(b_ptr + q_ld[:, None] * stride_bq + cols[None, :], mask=k_ok, other=0.0)
    return _promote(acc, a, b, tl.load(sa_ptrs), tl.load(sb_ptrs))


@triton.jit
def _store_tile(acc, out_ptr, e, offs_p, offs_q, count, P, Q, stride_oe, stride_op, stride_oq,
                ACCUMULATE: tl.constexpr):
    """Write one (BLOCK_P, BLOCK_Q) tile of ``out[e]``: cast once to out's dtype, or add into a float32 out (nothing
    to add for an empty expert: its tile is left untouched)."""
    o_ptrs = (out_ptr + e.to(tl.int64) * stride_oe + offs_p.to(tl.int64)[:, None] * stride_op
              + offs_q.to(tl.int64)[None, :] * stride_oq)
    mask = (offs_p < P)[:, None] & (offs_q < Q)[None, :]
    if ACCUMULATE:
        if count > 0:
            prev = tl.load(o_ptrs, mask=mask, other=0.0)
            tl.store(o_ptrs, prev + acc, mask=mask)
    else:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _k_grouped_gemm_fp8_kernel(
    # pointers
    a_ptr,            # float8_e4m3fn (P, M), unit stride along M
    as_ptr,           # float32 (P, cdiv(M, 128)), any strides (MN-major (1, align(P, 4)) preferred: coalesced)
    b_ptr,            # float8_e4m3fn (Q, M), unit stride along M
    bs_ptr,           # float32 (Q, cdiv(M, 128)), any strides
    out_ptr,          # bf16/fp16/fp32 (E, P, Q), any strides; float32 when ACCUMULATE
    offsets_ptr,      # int32 (E,): first column (token row) of each expert's segment, a multiple of 128
    counts_ptr,       # int32 (E,): valid columns of each expert (negative counts as 0)
    # sizes
    P, Q, M, E,
    # strides (in elements)
    stride_ap,
    stride_asp, stride_ask,
    stride_bq,
    stride_bsq, stride_bsk,
    stride_oe, stride_op, stride_oq,
    # meta-parameters
    BLOCK_P: tl.constexpr,      # output rows per tile (rows of a_t)
    BLOCK_Q: tl.constexpr,      # output columns per tile (rows of b_t)
    BLOCK_K: tl.constexpr,      # must be 128: one promotion per scale block
    GROUP_P: tl.constexpr,      # p-tiles of one expert that sweep the q-tiles together (L2 reuse)
    ACCUMULATE: tl.constexpr,   # out (float32) += the product instead of out = product
):
    tl.static_assert(BLOCK_K == 128, "BLOCK_K must equal the 128-row scale block")
    num_p = tl.cdiv(P, BLOCK_P)
    num_q = tl.cdiv(Q, BLOCK_Q)
    total_tiles = E * num_p * num_q
    offs_k = tl.arange(0, BLOCK_K)

    for tile_id in tl.range(tl.program_id(0), total_tiles, tl.num_programs(0)):
        e, tp, tq, seg, count, offs_p, offs_q, p_ld, q_ld = _locate(tile_id, num_p, num_q, offsets_ptr, counts_ptr,
                                                                     M, P, Q, BLOCK_P, BLOCK_Q, GROUP_P)
        cols = (seg + offs_k).to(tl.int64)
        a_ptrs = a_ptr + p_ld[:, None] * stride_ap + cols[None, :]
        b_ptrs = b_ptr + q_ld[:, None] * stride_bq + cols[None, :]
        sa_ptrs, sb_ptrs = _scale_ptrs(as_ptr, bs_ptr, p_ld, q_ld, seg, stride_asp, stride_ask, stride_bsq,
                                       stride_bsk, BLOCK_K)

        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
        n_full = count // BLOCK_K
        for _ in tl.range(0, n_full):
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
            sa = tl.load(sa_ptrs)
            sb = tl.load(sb_ptrs)
            acc = _promote(acc, a, b, sa, sb)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
            sa_ptrs += stride_ask
            sb_ptrs += stride_bsk
        rem = count - n_full * BLOCK_K
        if rem > 0:
            acc = _partial_chunk(acc, a_ptr, b_ptr, p_ld, q_ld, stride_ap, stride_bq, seg + n_full * BLOCK_K, rem,
                                 sa_ptrs, sb_ptrs, BLOCK_K)

        _store_tile(acc, out_ptr, e, offs_p, offs_q, count, P, Q, stride_oe, stride_op, stride_oq, ACCUMULATE)


@triton.jit
def _k_grouped_gemm_fp8_tma_kernel(
    a_desc,           # TensorDescriptor over a_t (P, M) float8, block (BLOCK_P, BLOCK_K)
    b_desc,           # TensorDescriptor over b_t (Q, M) float8, block (BLOCK_Q, BLOCK_K)
    a_ptr, as_ptr, b_ptr, bs_ptr, out_ptr, offsets_ptr, counts_ptr,
    P, Q, M, E,
    stride_ap,
    stride_asp, stride_ask,
    stride_bq,
    stride_bsq, stride_bsk,
    stride_oe, stride_op, stride_oq,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_P: tl.constexpr,
    ACCUMULATE: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """The kernel above with TMA tensor-descriptor loads for the full 128-row chunks (the copy engine moves the FP8
    tiles and zero-fills rows past P / Q, which frees registers and issue slots for the outer-product promotion).
    The partial last chunk keeps masked pointer loads: TMA bounds are the tensor's, not the segment's, and the
    padding columns inside M may hold anything."""
    tl.static_assert(BLOCK_K == 128, "BLOCK_K must equal the 128-row scale block")
    num_p = tl.cdiv(P, BLOCK_P)
    num_q = tl.cdiv(Q, BLOCK_Q)
    total_tiles = E * num_p * num_q

    for tile_id in tl.range(tl.program_id(0), total_tiles, tl.num_programs(0)):
        e, tp, tq, seg, count, offs_p, offs_q, p_ld, q_ld = _locate(tile_id, num_p, num_q, offsets_ptr, counts_ptr,
                                                                     M, P, Q, BLOCK_P, BLOCK_Q, GROUP_P)
        sa_ptrs, sb_ptrs = _scale_ptrs(as_ptr, bs_ptr, p_ld, q_ld, seg, stride_asp, stride_ask, stride_bsq,
                                       stride_bsk, BLOCK_K)

        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
        n_full = count // BLOCK_K
        for i in tl.range(0, n_full, num_stages=NUM_STAGES):
            col = seg + i * BLOCK_K
            a = a_desc.load([tp * BLOCK_P, col])
            b = b_desc.load([tq * BLOCK_Q, col])
            sa = tl.load(sa_ptrs + i * stride_ask)
            sb = tl.load(sb_ptrs + i * stride_bsk)
            acc = _promote(acc, a, b, sa, sb)
        rem = count - n_full * BLOCK_K
        if rem > 0:
            acc = _partial_chunk(acc, a_ptr, b_ptr, p_ld, q_ld, stride_ap, stride_bq, seg + n_full * BLOCK_K, rem,
                                 sa_ptrs + n_full * stride_ask, sb_ptrs + n_full * stride_bsk, BLOCK_K)

        _store_tile(acc, out_ptr, e, offs_p, offs_q, count, P, Q, stride_oe, stride_op, stride_oq, ACCUMULATE)
