"""FP8 block-scaled grouped GEMM kernel (DeepSeek-V3 recipe), contiguous expert segments, "NT" layout.

``out[r, :] = (a[r, :] * a_scale[r, k // 128]) @ (b[e] * b_scale[e, n // 128, k // 128]).T`` for every row ``r`` of
expert ``e``'s segment ``[expert_offsets[e], expert_offsets[e] + expert_counts[e])``. Scales are dequantization
scales (``x ~= q.float() * s``): 1x128 groups for ``a``, 128x128 blocks for ``b``.

Numerics: FP32 promotion every 128 of K, as DeepSeek-V3 does (its section 3.3) and DeepGEMM / vLLM's Triton block-FP8
MoE do: each 128-wide K block is one ``tl.dot`` into a fresh float32 tile (on SM90 the tensor cores keep ~14 bits while
accumulating inside it; Triton's sm90 default ``max_num_imprecise_acc`` leaves that chain alone, which is fine over 128
elements), the block's partial product is scaled by ``a_scale[rows, kb] * b_scale[e, nb, kb]`` and added to a
float32 accumulator. Each output element is produced by one program with a fixed K order: results are deterministic.

Scheduling: persistent programs walk a flat tile space ``(global m-tile, n-tile)``; the m-tiles of all experts are
numbered expert after expert (``cdiv(count_e, BLOCK_M)`` each), computed on the device from ``expert_counts`` with an
in-kernel prefix sum, so nothing is synchronised with the host and the grid only depends on host-known bounds (a
CUDA graph can capture the launch). Empty experts own no tile: their weights are never read.
"""
import triton
import triton.language as tl

from .quant import _quant_groups
from .swiglu import _round_to, _silu_mul
from .pdl import pdl_prologue


@triton.jit
def _load_k(ptrs, offs_k, k_left, EVEN_K: tl.constexpr):
    """One BLOCK_K slice of an FP8 operand; the K tail is masked only when K is not a multiple of BLOCK_K."""
    if EVEN_K:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=offs_k[None, :] < k_left, other=0.0)
    return x


@triton.jit
def _load_b(b, row0, k0, offs_k, k_left, EVEN_K: tl.constexpr, TMA_B: tl.constexpr):
    """One BLOCK_K slice of the weight tile: ``b`` is a tensor descriptor (TMA_B; its rows start at ``row0``) or the
    tile's pointers at this K (``_load_k``)."""
    if TMA_B:
        x = b.load([row0, k0])
    else:
        x = _load_k(b, offs_k, k_left, EVEN_K)
    return x


@triton.jit
def _dot_block(x, y, ACC_K: tl.constexpr, UPCAST: tl.constexpr):
    """One 128-K block's FP8 product in float32. ``ACC_K > 0`` adds the tensor cores' partial sum into a float32
    register every ACC_K elements of K (Triton's ``max_num_imprecise_acc``) instead of chaining all four k=32 wgmma
    in their ~14-bit accumulator; ``UPCAST`` runs the block as an FP16 dot (E4M3 -> FP16 is exact and one
    ``cvt.f16x2.e4m3x2`` per pair; float32 accumulation): the emulated reference's precision at half the FP8 rate."""
    if UPCAST:
        return tl.dot(x.to(tl.float16), y.to(tl.float16))
    elif ACC_K > 0:
        return tl.dot(x, y, max_num_imprecise_acc=ACC_K)
    else:
        return tl.dot(x, y)


@triton.jit
def _promote(acc, part, sa, sb, BLOCK_N: tl.constexpr):
    """FP32 promotion of one 128-K block: ``acc += part * sa[row] * sb[col]``. ``part`` is (rows, cols); ``sb`` is
    one scalar per 128-column block, so a vector only when BLOCK_N spans two of them."""
    if BLOCK_N <= 128:
        acc = acc + part * (sa * sb)[:, None]
    else:
        acc = acc + part * sa[:, None] * sb[None, :]
    return acc


@triton.jit
def _acc_block(acc, a, b, sa, sb, BLOCK_N: tl.constexpr, SWAP_AB: tl.constexpr, ACC_K: tl.constexpr,
               UPCAST: tl.constexpr):
    """``acc`` plus one 128-K block's product of the token rows ``a`` and the weight rows ``b``, promoted: ``acc`` is
    (BLOCK_N, rows) with SWAP_AB (the weight rows on the MMA's M side), else (rows, BLOCK_N). The arithmetic every
    pointer-load kernel here shares, so that their bytes agree."""
    if SWAP_AB:
        part = _dot_block(b, tl.trans(a), ACC_K, UPCAST)  # (BLOCK_N, rows), fp32
        if BLOCK_N <= 128:
            return acc + part * (sa * sb)[None, :]
        else:
            return acc + part * sb[:, None] * sa[None, :]
    else:
        return _promote(acc, _dot_block(a, tl.trans(b), ACC_K, UPCAST), sa, sb, BLOCK_N)


@triton.jit
def _zero_acc(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP_AB: tl.constexpr):
    if SWAP_AB:
        return tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        return tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)


@triton.jit
def _locate_tile(tile_id, total_m, num_n, cum_tiles, m_tiles, counts, offs_e, offsets_ptr, GROUP_M: tl.constexpr):
    """Tile ``tile_id`` -> (expert ``e``, m-tiles of the experts before ``e``, n-tile, ``e``'s valid rows, the first row
    of ``e``'s segment, global m-tile).

    Grouped order: GROUP_M consecutive m-tiles (mostly of one expert) sweep the n-tiles together, so each weight
    tile is read from HBM once per group rather than once per m-tile. The expert owning global m-tile ``tm`` is the
    number of experts whose tiles all come before it."""
    tiles_per_group = GROUP_M * num_n
    first_m = (tile_id // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(total_m - first_m, GROUP_M)
    tm = first_m + (tile_id % tiles_per_group) % group_rows
    tn = (tile_id % tiles_per_group) // group_rows
    e = tl.sum((cum_tiles <= tm).to(tl.int32), 0)
    tiles_before = tl.sum(tl.where(offs_e < e, m_tiles, 0), 0)
    count = tl.sum(tl.where(offs_e == e, counts, 0), 0)
    seg_start = tl.load(offsets_ptr + e)
    return e, tiles_before, tn, count, seg_start, tm


@triton.jit
def _grouped_gemm_fp8_kernel(
    # pointers
    a_ptr,            # float8_e4m3fn (M, K), unit stride along K
    as_ptr,           # float32 (M, cdiv(K, 128)), any strides (row-major or MN-major TMA-aligned)
    b_ptr,            # float8_e4m3fn (E, N, K), unit stride along K
    bs_ptr,           # float32 (E, cdiv(N, 128), cdiv(K, 128)), any strides
    out_ptr,          # bf16/fp16/fp32 (M, N)
    offsets_ptr,      # int32 (E,): first row of each expert's segment
    counts_ptr,       # int32 (E,): valid rows of each expert (negative counts as 0)
    # sizes
    M, N, K, E,
    # strides (in elements)
    stride_am,
    stride_asm, stride_ask,
    stride_be, stride_bn,
    stride_bse, stride_bsn, stride_bsk,
    stride_om, stride_on,
    # meta-parameters
    BLOCK_M: tl.constexpr,    # rows (tokens) per tile
    BLOCK_N: tl.constexpr,    # output columns per tile
    BLOCK_K: tl.constexpr,    # must be 128: one promotion per scale block
    GROUP_M: tl.constexpr,    # m-tiles that share one sweep of n-tiles (L2 reuse of the weight tile)
    SWAP_AB: tl.constexpr,    # compute out^T = b_tile @ a_tile^T: N fills the MMA's M side, tokens the narrow side
    BLOCK_E: tl.constexpr,    # next power of two >= E: the per-expert tile counts live in registers
    EVEN_K: tl.constexpr,     # K % BLOCK_K == 0: no masks in the main loop
    SPLIT_M: tl.constexpr,    # two independent half-height dots per K block (not with SWAP_AB), see below
    ACC_K: tl.constexpr,      # see _dot_block: 0 = one wgmma chain per 128-K block
    UPCAST: tl.constexpr,     # see _dot_block: FP16 dots
    FLATTEN: tl.constexpr = False,  # persistent tile loop flattened with the K loop (loads prefetched across tiles)
    USE_PDL: tl.constexpr = False,  # wait for / release the neighbouring launches (kernels/pdl.py)
):
    pdl_prologue(USE_PDL)
    tl.static_assert(BLOCK_K == 128, "BLOCK_K must equal the 128-wide scale block")
    tl.static_assert(not (SPLIT_M and SWAP_AB), "SPLIT_M applies to the plain orientation only")

    # Per-expert m-tile counts and their inclusive prefix sum, identical in every program.
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0)
    counts = tl.maximum(counts, 0)
    m_tiles = (counts + BLOCK_M - 1) // BLOCK_M
    cum_tiles = tl.cumsum(m_tiles, 0)
    total_m = tl.sum(m_tiles, 0)
    num_n = tl.cdiv(N, BLOCK_N)
    total_tiles = total_m * num_n

    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)

    for tile_id in tl.range(tl.program_id(0), total_tiles, tl.num_programs(0), flatten=FLATTEN):
        e, tiles_before, tn, count, seg_start, tm = _locate_tile(tile_id, total_m, num_n, cum_tiles, m_tiles, counts,
                                                                 offs_e, offsets_ptr, GROUP_M)
        e64 = e.to(tl.int64)

        local_m = (tm - tiles_before) * BLOCK_M + offs_m0          # row inside the segment
        rows = seg_start + local_m                                  # row of a / out
        row_ok = (local_m < count) & (rows < M)
        # Rows past the segment's count are read from a valid row (clamped) and never stored: no load masks.
        rows_ld = tl.minimum(tl.maximum(rows, 0), M - 1).to(tl.int64)
        cols = tn * BLOCK_N + offs_n0
        cols_ld = tl.minimum(cols, N - 1).to(tl.int64)

        b_ptrs, bs_ptrs = _weight_tile_ptrs(b_ptr, bs_ptr, e64, tn, cols_ld, offs_k, stride_be, stride_bn,
                                            stride_bse, stride_bsn, BLOCK_N)
        cols64 = cols.to(tl.int64)
        col_ok = cols < N

        if SPLIT_M:
            # The promotion needs each block's dot result before the next dot may accumulate, which serialises the
            # tensor cores and the FMAs. Two independent half-tile dots let one half's promotion run while the
            # other half's wgmma is in flight (measured on H100: 128x128 -> 2x(128x128), +8-12%).
            HALF_M: tl.constexpr = BLOCK_M // 2
            rows_lo = seg_start + (tm - tiles_before) * BLOCK_M + tl.arange(0, HALF_M)
            rows_hi = rows_lo + HALF_M
            ld_lo = tl.minimum(tl.maximum(rows_lo, 0), M - 1).to(tl.int64)
            ld_hi = tl.minimum(tl.maximum(rows_hi, 0), M - 1).to(tl.int64)
            a_lo_ptrs = a_ptr + ld_lo[:, None] * stride_am + offs_k[None, :]
            a_hi_ptrs = a_ptr + ld_hi[:, None] * stride_am + offs_k[None, :]
            as_lo_ptrs = as_ptr + ld_lo * stride_asm
            as_hi_ptrs = as_ptr + ld_hi * stride_asm
            acc_lo = tl.zeros((HALF_M, BLOCK_N), dtype=tl.float32)
            acc_hi = tl.zeros((HALF_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kb = k0 // BLOCK_K
                a_lo = _load_k(a_lo_ptrs, offs_k, K - k0, EVEN_K)
                a_hi = _load_k(a_hi_ptrs, offs_k, K - k0, EVEN_K)
                b = _load_k(b_ptrs, offs_k, K - k0, EVEN_K)
                sb = tl.load(bs_ptrs + kb * stride_bsk)
                sa_lo = tl.load(as_lo_ptrs + kb * stride_ask)
                sa_hi = tl.load(as_hi_ptrs + kb * stride_ask)
                acc_lo = _promote(acc_lo, _dot_block(a_lo, tl.trans(b), ACC_K, UPCAST), sa_lo, sb, BLOCK_N)
                acc_hi = _promote(acc_hi, _dot_block(a_hi, tl.trans(b), ACC_K, UPCAST), sa_hi, sb, BLOCK_N)
                a_lo_ptrs += BLOCK_K
                a_hi_ptrs += BLOCK_K
                b_ptrs += BLOCK_K
            lo_ok = ((rows_lo - seg_start) < count) & (rows_lo < M)
            hi_ok = ((rows_hi - seg_start) < count) & (rows_hi < M)
            o_lo = out_ptr + rows_lo.to(tl.int64)[:, None] * stride_om + cols64[None, :] * stride_on
            o_hi = out_ptr + rows_hi.to(tl.int64)[:, None] * stride_om + cols64[None, :] * stride_on
            tl.store(o_lo, acc_lo.to(out_ptr.dtype.element_ty), mask=lo_ok[:, None] & col_ok[None, :])
            tl.store(o_hi, acc_hi.to(out_ptr.dtype.element_ty), mask=hi_ok[:, None] & col_ok[None, :])
        else:
            _tile_nt(a_ptr, as_ptr, b_ptrs, bs_ptrs, out_ptr, rows, rows_ld, row_ok, cols64, col_ok, offs_k, K,
                     stride_am, stride_asm, stride_ask, stride_bsk, stride_om, stride_on,
                     BLOCK_M, BLOCK_N, BLOCK_K, SWAP_AB, EVEN_K, ACC_K, UPCAST)


@triton.jit
def _weight_tile_ptrs(b_ptr, bs_ptr, e64, tn, cols_ld, offs_k, stride_be, stride_bn, stride_bse, stride_bsn,
                      BLOCK_N: tl.constexpr):
    """Expert ``e64``'s weight rows ``cols_ld`` at K = 0, and their scales' pointers (``_weight_scale_ptrs``)."""
    b_ptrs = b_ptr + e64 * stride_be + cols_ld[:, None] * stride_bn + offs_k[None, :]
    return b_ptrs, _weight_scale_ptrs(bs_ptr, e64, tn, cols_ld, stride_bse, stride_bsn, BLOCK_N)


@triton.jit
def _weight_scale_ptrs(bs_ptr, e64, tn, cols_ld, stride_bse, stride_bsn, BLOCK_N: tl.constexpr):
    """Pointers to the scales of expert ``e64``'s weight rows ``cols_ld`` at K block 0 (per K block, add ``kb *
    stride_bsk``): one scalar per K block when BLOCK_N divides 128 (the tile lies in one 128-row weight block), else
    one per column."""
    bs_base = bs_ptr + e64 * stride_bse
    if BLOCK_N <= 128:
        return bs_base + ((tn * BLOCK_N) // 128) * stride_bsn
    else:
        return bs_base + (cols_ld // 128) * stride_bsn


@triton.jit
def _tile_nt(a_ptr, as_ptr, b_ptrs, bs_ptrs, out_ptr, rows, rows_ld, row_ok, cols64, col_ok, offs_k, K,
             stride_am, stride_asm, stride_ask, stride_bsk, stride_om, stride_on,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr,
             EVEN_K: tl.constexpr, ACC_K: tl.constexpr, UPCAST: tl.constexpr,
             TMA_B: tl.constexpr = False, b_row0=0):
    """One output tile of the pointer-load kernels: rows ``rows`` (read from ``rows_ld``, stored where ``row_ok``) by
    columns ``cols64`` (``b_ptrs`` / ``bs_ptrs`` at K = 0 of the tile's weight rows), K blocks in order, each promoted
    in float32: the numerics every kernel here shares. ``TMA_B``: ``b_ptrs`` is a tensor descriptor over the
    weights as ``(E * N, K)`` and the tile's rows start at ``b_row0`` (the copy engine zero-fills past K and past the
    last row; rows past the expert's N feed only columns that are never stored)."""
    a_ptrs = a_ptr + rows_ld[:, None] * stride_am + offs_k[None, :]
    as_ptrs = as_ptr + rows_ld * stride_asm
    acc = _zero_acc(BLOCK_M, BLOCK_N, SWAP_AB)
    for k0 in range(0, K, BLOCK_K):
        kb = k0 // BLOCK_K
        a = _load_k(a_ptrs, offs_k, K - k0, EVEN_K)
        b = _load_b(b_ptrs, b_row0, k0, offs_k, K - k0, EVEN_K, TMA_B)
        sa = tl.load(as_ptrs + kb * stride_ask)           # (BLOCK_M,)
        sb = tl.load(bs_ptrs + kb * stride_bsk)           # scalar, or (BLOCK_N,) when BLOCK_N > 128
        acc = _acc_block(acc, a, b, sa, sb, BLOCK_N, SWAP_AB, ACC_K, UPCAST)
        a_ptrs += BLOCK_K
        if not TMA_B:
            b_ptrs += BLOCK_K

    rows64 = rows.to(tl.int64)
    if SWAP_AB:
        o_ptrs = out_ptr + rows64[None, :] * stride_om + cols64[:, None] * stride_on
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=col_ok[:, None] & row_ok[None, :])
    else:
        o_ptrs = out_ptr + rows64[:, None] * stride_om + cols64[None, :] * stride_on
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _block_map_tile(tile_id, num_m, num_n, GROUP_M: tl.constexpr):
    """Program ``tile_id`` of a one-program-per-tile grid -> (m-tile, n-tile), GROUP_M m-tiles sweeping the n-tiles
    together (each weight tile read once per group)."""
    tiles_per_group = GROUP_M * num_n
    first_m = (tile_id // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile_id % tiles_per_group) % group_rows, (tile_id % tiles_per_group) // group_rows


@triton.jit
def _grouped_gemm_fp8_blockmap_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, out_ptr,
    block_expert_ptr,  # int32 (M // MAP_BLOCK,): expert of each MAP_BLOCK-row block of out, -1 for unused blocks
    m_idx_ptr,         # int32 (M,): expert of each row, -1 on padding
    sorted_ptr,        # GATHER: int32 (M,) the plan's sorted_token_ids (flat choice t * top_k + j of each row)
    M, N, K, E,
    numel, top_k,      # GATHER: the plan's choices (its padding sentinel) and top_k
    stride_am, stride_asm, stride_ask, stride_be, stride_bn, stride_bse, stride_bsn, stride_bsk,
    stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SWAP_AB: tl.constexpr, EVEN_K: tl.constexpr, ACC_K: tl.constexpr, UPCAST: tl.constexpr,
    MAP_BLOCK: tl.constexpr,  # the routing plan's segment alignment; BLOCK_M divides it
    TMA_B: tl.constexpr = False,  # b_ptr is a tensor descriptor over b as (E * N, K), block (BLOCK_N, BLOCK_K)
    GATHER: tl.constexpr = False,  # a / as_ptr hold the tokens (T, K): row r reads token sorted[r] // top_k
    USE_PDL: tl.constexpr = False,  # wait for / release the neighbouring launches (kernels/pdl.py)
):
    """``_grouped_gemm_fp8_kernel`` for tiles no taller than the segment alignment, scheduled like vLLM's fused-MoE
    kernel: program ``p`` takes a fixed ``BLOCK_M``-row block of ``a`` and finds its expert with one load from the
    routing plan's block map, instead of every program loading all E counts and scanning them (three reductions over
    E before its first weight load: latency that a short-K, few-rows GEMM cannot hide). Blocks past the used rows
    exit at once. Same per-row arithmetic as the other kernels (``_tile_nt``): the same bytes. ``TMA_B`` streams the
    weight tiles through the copy engine (one descriptor load per K block, as vLLM's kernel does on Hopper) instead
    of 128 threads' pointer loads: the weight bytes are the whole cost of a decode-sized call.

    ``GATHER``: ``a`` / ``as_ptr`` are the quantized tokens and their scales, not their permuted copy; each row of
    the plan reads its token's row (``sorted_token_ids[r] // top_k``; padding rows read token 0 and are never
    stored), as vLLM's fused-MoE kernel reads its A: neither the permutation's launch nor its copy (``top_k`` times
    the tokens' bytes, written and read back) exist. The same per-row arithmetic, so the same bytes."""
    pdl_prologue(USE_PDL)
    tl.static_assert(MAP_BLOCK % BLOCK_M == 0, "a tile must not straddle two experts' segments")
    tm, tn = _block_map_tile(tl.program_id(0), M // BLOCK_M, tl.cdiv(N, BLOCK_N), GROUP_M)
    row0 = tm * BLOCK_M
    e = tl.load(block_expert_ptr + row0 // MAP_BLOCK)
    if (e >= 0) & (e < E):  # an id past the experts (a foreign map) reads nothing, as the counts kernel would
        e64 = e.to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = tl.load(m_idx_ptr + rows) == e  # the segment's real rows; its padding holds -1
        if GATHER:
            sid = tl.load(sorted_ptr + rows)
            rows_ld = (tl.where(row_ok & (sid >= 0) & (sid < numel), sid, 0) // top_k).to(tl.int64)
        else:
            rows_ld = rows.to(tl.int64)
        cols = tn * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_ld = tl.minimum(cols, N - 1).to(tl.int64)
        if TMA_B:
            bs_ptrs = _weight_scale_ptrs(bs_ptr, e64, tn, cols_ld, stride_bse, stride_bsn, BLOCK_N)
            _tile_nt(a_ptr, as_ptr, b_ptr, bs_ptrs, out_ptr, rows, rows_ld, row_ok, cols.to(tl.int64), cols < N,
                     offs_k, K, stride_am, stride_asm, stride_ask, stride_bsk, stride_om, stride_on,
                     BLOCK_M, BLOCK_N, BLOCK_K, SWAP_AB, EVEN_K, ACC_K, UPCAST, True, e * N + tn * BLOCK_N)
        else:
            b_ptrs, bs_ptrs = _weight_tile_ptrs(b_ptr, bs_ptr, e64, tn, cols_ld, offs_k, stride_be, stride_bn,
                                                stride_bse, stride_bsn, BLOCK_N)
            _tile_nt(a_ptr, as_ptr, b_ptrs, bs_ptrs, out_ptr, rows, rows_ld, row_ok, cols.to(tl.int64), cols < N,
                     offs_k, K, stride_am, stride_asm, stride_ask, stride_bsk, stride_om, stride_on,
                     BLOCK_M, BLOCK_N, BLOCK_K, SWAP_AB, EVEN_K, ACC_K, UPCAST)


@triton.jit
def _grouped_gemm_fp8_tma_kernel(
    a_desc,           # TensorDescriptor over a (M, K) float8, block (BLOCK_M // (2 if SPLIT_M else 1), BLOCK_K)
    as_ptr,           # float32 (M, cdiv(K, 128)), any strides
    b_desc,           # TensorDescriptor over b viewed as (E * N, K) float8, block (BLOCK_N, BLOCK_K)
    bs_ptr,           # float32 (E, cdiv(N, 128), cdiv(K, 128)), any strides
    out_ptr, offsets_ptr, counts_ptr,
    M, N, K, E,
    stride_asm, stride_ask,
    stride_bse, stride_bsn, stride_bsk,
    stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_E: tl.constexpr, SPLIT_M: tl.constexpr, WS: tl.constexpr, NUM_STAGES: tl.constexpr,
    ACC_K: tl.constexpr, UPCAST: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # wait for / release the neighbouring launches (kernels/pdl.py)
):
    """The plain-orientation kernel above with TMA tensor-descriptor loads (one program per tile): the copy engine
    moves the FP8 tiles and zero-fills past K and past the tensors' ends, which frees the warps' registers and issue
    slots for the per-128-K promotion; ``WS`` asks Triton to warp-specialize the K loop (producer warps issue the
    loads, consumer warps run the dots and the promotion, DeepGEMM's structure). Rows a tile reads past its expert's
    segment belong to other segments or padding: they are computed and never stored, as in the pointer kernel."""
    pdl_prologue(USE_PDL)
    tl.static_assert(BLOCK_K == 128, "BLOCK_K must equal the 128-wide scale block")
    tl.static_assert(BLOCK_N <= 128, "one weight scale per K block: BLOCK_N must divide 128")
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.maximum(tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0), 0)
    m_tiles = (counts + BLOCK_M - 1) // BLOCK_M
    cum_tiles = tl.cumsum(m_tiles, 0)
    total_m = tl.sum(m_tiles, 0)
    num_n = tl.cdiv(N, BLOCK_N)
    tile_id = tl.program_id(0)
    if tile_id >= total_m * num_n:
        return
    e, tiles_before, tn, count, seg_start, tm = _locate_tile(tile_id, total_m, num_n, cum_tiles, m_tiles, counts,
                                                             offs_e, offsets_ptr, GROUP_M)
    row0 = seg_start + (tm - tiles_before) * BLOCK_M
    b_row0 = e * N + tn * BLOCK_N
    bs_ptrs = bs_ptr + e.to(tl.int64) * stride_bse + ((tn * BLOCK_N) // 128) * stride_bsn
    cols = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    HALF_M: tl.constexpr = BLOCK_M // 2 if SPLIT_M else BLOCK_M
    rows_lo = row0 + tl.arange(0, HALF_M)
    as_lo = as_ptr + tl.minimum(tl.maximum(rows_lo, 0), M - 1).to(tl.int64) * stride_asm
    acc_lo = tl.zeros((HALF_M, BLOCK_N), dtype=tl.float32)
    if SPLIT_M:
        rows_hi = rows_lo + HALF_M
        as_hi = as_ptr + tl.minimum(tl.maximum(rows_hi, 0), M - 1).to(tl.int64) * stride_asm
        acc_hi = tl.zeros((HALF_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES, warp_specialize=WS):
        kb = k0 // BLOCK_K
        b = b_desc.load([b_row0, k0])
        sb = tl.load(bs_ptrs + kb * stride_bsk)
        a_lo = a_desc.load([row0, k0])
        part_lo = _dot_block(a_lo, tl.trans(b), ACC_K, UPCAST)
        acc_lo = _promote(acc_lo, part_lo, tl.load(as_lo + kb * stride_ask), sb, BLOCK_N)
        if SPLIT_M:
            a_hi = a_desc.load([row0 + HALF_M, k0])
            part_hi = _dot_block(a_hi, tl.trans(b), ACC_K, UPCAST)
            acc_hi = _promote(acc_hi, part_hi, tl.load(as_hi + kb * stride_ask), sb, BLOCK_N)
    lo_ok = ((rows_lo - seg_start) < count) & (rows_lo < M)
    tl.store(out_ptr + rows_lo.to(tl.int64)[:, None] * stride_om + cols.to(tl.int64)[None, :] * stride_on,
             acc_lo.to(out_ptr.dtype.element_ty), mask=lo_ok[:, None] & col_ok[None, :])
    if SPLIT_M:
        hi_ok = ((rows_hi - seg_start) < count) & (rows_hi < M)
        tl.store(out_ptr + rows_hi.to(tl.int64)[:, None] * stride_om + cols.to(tl.int64)[None, :] * stride_on,
                 acc_hi.to(out_ptr.dtype.element_ty), mask=hi_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_gemm_swiglu_kernel(
    a_ptr, as_ptr,
    b_ptr,             # float8 (E, 2I, K) w13 ([gate | up] rows), or a tensor descriptor over it as (E * 2I, K)
    bs_ptr,            # float32 (E, 2I / 128, cdiv(K, 128))
    q_ptr,             # float8 (M, I): SwiGLU of the GEMM's output, requantized in 1 x 128 groups
    s_ptr,             # float32 (M, I / 128) their dequantization scales, any strides
    block_expert_ptr, m_idx_ptr,  # the routing plan's block map (see _grouped_gemm_fp8_blockmap_kernel)
    M, I, K, E,
    stride_am, stride_asm, stride_ask, stride_be, stride_bn, stride_bse, stride_bsn, stride_bsk,
    stride_qm, stride_qk, stride_sm, stride_sg,
    EPS: tl.constexpr, FP8_MAX: tl.constexpr, UE8M0: tl.constexpr, ACCURATE_EXP: tl.constexpr,
    FMA_DIV: tl.constexpr, NAN_MAX: tl.constexpr, NAN_SELECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, ACC_K: tl.constexpr, UPCAST: tl.constexpr, MAP_BLOCK: tl.constexpr,
    TMA_B: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # wait for / release the neighbouring launches (kernels/pdl.py)
):
    """The MoE's first GEMM with SwiGLU and the 1 x 128 requantization in its epilogue: one launch instead of two,
    and ``h`` (M, 2I) never leaves the registers.

    A program owns a block-map tile (``_grouped_gemm_fp8_blockmap_kernel``'s scheduling) of BLOCK_M rows by one
    128-column group of the intermediate dimension, and accumulates both its gate columns ``[c, c + 128)`` and its up
    columns ``[I + c, I + c + 128)``: two 128-wide accumulators, each K block's dot promoted exactly as
    ``_tile_nt`` promotes it. The epilogue then applies ``silu_mul_quant_kernel``'s per-element math to the values
    the GEMM would have stored (rounded to bfloat16) and ``_quant_groups`` over the group: the bytes of
    ``grouped_gemm_fp8`` (bf16 out) followed by ``silu_mul_quantize``. Padding rows of a live block and every row of
    a block no expert owns get q = 0 and scale 0, as ``silu_mul_quantize`` with ``m_indices`` writes them.
    I must be a multiple of 128 (a group's gate and up columns each lie in one weight scale block)."""
    pdl_prologue(USE_PDL)
    tl.static_assert(BLOCK_K == 128, "BLOCK_K must equal the 128-wide scale block")
    tl.static_assert(MAP_BLOCK % BLOCK_M == 0, "a tile must not straddle two experts' segments")
    # swap-AB tiles only: the accumulators are (128 columns, BLOCK_M rows), the orientation whose bytes the GPU showed
    # equal to the two launches (the launcher's _fused_swiglu_config says why not the plain one)
    GROUP: tl.constexpr = 128
    tm, tn = _block_map_tile(tl.program_id(0), M // BLOCK_M, I // GROUP, GROUP_M)
    row0 = tm * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    cols64 = (tn * GROUP + tl.arange(0, GROUP)).to(tl.int64)
    q_ptrs = q_ptr + rows64[None, :] * stride_qm + cols64[:, None] * stride_qk
    s_ptrs = s_ptr + rows64 * stride_sm + tn * stride_sg
    e = tl.load(block_expert_ptr + row0 // MAP_BLOCK)
    if (e >= 0) & (e < E):
        e64 = e.to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        row_ok = tl.load(m_idx_ptr + rows) == e
        a_ptrs = a_ptr + rows64[:, None] * stride_am + offs_k[None, :]
        as_ptrs = as_ptr + rows64 * stride_asm
        bsg_ptrs = bs_ptr + e64 * stride_bse + tn * stride_bsn              # gate rows' 128-row scale block
        bsu_ptrs = bsg_ptrs + (I // GROUP) * stride_bsn                      # up rows' block
        g_row0 = e * (2 * I) + tn * GROUP                                    # descriptor rows (TMA_B)
        if TMA_B:
            bg_ptrs = b_ptr  # the descriptor
            up_step = I      # the up rows: I rows further, in descriptor rows or in pointer strides
        else:
            bg_ptrs = b_ptr + e64 * stride_be + cols64[:, None] * stride_bn + offs_k[None, :]
            up_step = I * stride_bn
        acc_g = _zero_acc(BLOCK_M, GROUP, True)
        acc_u = _zero_acc(BLOCK_M, GROUP, True)
        for k0 in range(0, K, BLOCK_K):
            kb = k0 // BLOCK_K
            a = _load_k(a_ptrs, offs_k, K - k0, EVEN_K)
            bg = _load_b(bg_ptrs, g_row0, k0, offs_k, K - k0, EVEN_K, TMA_B)
            if TMA_B:
                bu = _load_b(bg_ptrs, g_row0 + up_step, k0, offs_k, K - k0, EVEN_K, TMA_B)
            else:
                bu = _load_b(bg_ptrs + up_step, 0, k0, offs_k, K - k0, EVEN_K, TMA_B)
            sa = tl.load(as_ptrs + kb * stride_ask)
            sbg = tl.load(bsg_ptrs + kb * stride_bsk)
            sbu = tl.load(bsu_ptrs + kb * stride_bsk)
            acc_g = _acc_block(acc_g, a, bg, sa, sbg, GROUP, True, ACC_K, UPCAST)
            acc_u = _acc_block(acc_u, a, bu, sa, sbu, GROUP, True, ACC_K, UPCAST)
            a_ptrs += BLOCK_K
            if not TMA_B:
                bg_ptrs += BLOCK_K
        # h as the GEMM stores it (bf16), then silu_mul_quant_kernel's math on it
        y = _silu_mul(_round_to(acc_g, True), _round_to(acc_u, True), ACCURATE_EXP, True)
        qf, sc = _quant_groups(y, 0, FP8_MAX, EPS, UE8M0, FMA_DIV, NAN_MAX, NAN_SELECT)  # a group: axis 0
        qf = tl.where(row_ok[None, :], qf, 0.0)
        tl.store(q_ptrs, qf.to(q_ptr.dtype.element_ty))
        tl.store(s_ptrs, tl.where(row_ok, sc, 0.0))
    else:
        # a block no expert owns: zeros, as silu_mul_quantize writes padding rows (no loads, no math)
        tl.store(q_ptrs, tl.zeros((GROUP, BLOCK_M), tl.float32).to(q_ptr.dtype.element_ty))
        tl.store(s_ptrs, tl.zeros((BLOCK_M,), tl.float32))
