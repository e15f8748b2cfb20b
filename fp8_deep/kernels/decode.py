"""Decode-sized MoE forward: two GEMM launches that find their own rows (no routing plan, no permuted copies); and
the routed path's GEMMs, which take their rows from the routing plan and form their operands the same way.

With few (token, choice) pairs, launches rather than bytes bound the forward: the regular chain (quantize-permute,
align, GEMM1, SwiGLU, GEMM2, combine) spends more in and between its four glue kernels than in its two GEMMs. Here
the glue folds into the GEMMs:

* Slots. Flat choice ``p = t * top_k + j`` is kept when its expert is local (``_local_expert``: the alignment
  kernel's rule). Program ``(slot s, n-tile)`` takes the s-th distinct kept expert in order of first appearance, and
  as its rows that expert's kept choices in ascending ``p``: the rows, in order, of that expert's segment in the
  routing plan. Every program derives this from ``topk_ids`` itself (``P_POW2 x P_POW2`` compares; the launcher
  bounds P), so nothing is computed between launches. Programs past the last slot exit.
* GEMM1 (``moe_decode_gemm_kernel``) quantizes each row's token of ``x`` in 1x128 groups as it loads each K block
  (``_quant_groups``, the activation quantizer's math) and writes ``h[p] = x_q[t] @ w13[e].T`` (bf16, row p).
* GEMM2 (the same kernel, ``SWIGLU``) applies SwiGLU and the 1x128 requantization to each K block of ``h[p]`` as it
  loads it (``_silu_mul`` then ``_quant_groups``: ``silu_mul_quant_kernel``'s math) and writes ``o[p] = ... @
  w2[e].T`` (bf16); then the last program of each column tile sums each token's rows (``FUSE_COMBINE``), or the
  combine kernel does.
* The routed GEMMs (``moe_routed_gemm_kernel``) take the routing plan's rows and blocks instead of slots, with the
  same on-load operands (``_onload_tile``).

Each GEMM's per-row arithmetic is ``_acc_block`` with the swap-AB orientation, the weight rows on the MMA's M side,
K blocks in order: for finite inputs, the bytes of the regular chain (its GEMMs' swap-AB tiles, its quantizers).
"""
import triton
import triton.language as tl

from .combine import combine_rows
from .grouped_gemm import _acc_block, _block_map_tile, _load_b, _weight_scale_ptrs, _zero_acc
from .pdl import pdl_prologue
from .quant import _quant_groups
from .routing import _local_expert
from .swiglu import _silu_mul


@triton.jit
def _decode_slot(ids_ptr, map_ptr, slot, P, top_k, stride_t, stride_k, num_experts, num_global,
                 HAS_MAP: tl.constexpr, P_POW2: tl.constexpr):
    """-> (``e``: the slot's local expert, ``member`` (P_POW2,): its choices, ``mrank``: each member's row within the
    slot, ``count``: its rows, ``live``: whether the slot has an expert, ``keep`` (P_POW2,): the kept choices)."""
    offs_p = tl.arange(0, P_POW2)
    ev, keep = _local_expert(ids_ptr, map_ptr, offs_p, offs_p < P, top_k, stride_t, stride_k, num_experts,
                             num_global, HAS_MAP)
    key = tl.where(keep, ev, -1)
    # a kept choice leads its expert when no earlier choice has the same expert
    earlier = (key[:, None] == key[None, :]) & (offs_p[None, :] < offs_p[:, None])
    leader = keep & (tl.sum(earlier.to(tl.int32), axis=1) == 0)
    rank = tl.cumsum(leader.to(tl.int32), 0) - 1
    live = slot < tl.sum(leader.to(tl.int32), 0)
    e = tl.sum(tl.where(leader & (rank == slot), ev, 0), 0)
    member = keep & (ev == e) & live
    mrank = tl.cumsum(member.to(tl.int32), 0) - 1
    count = tl.sum(member.to(tl.int32), 0)
    return e, member, mrank, count, live, keep


@triton.jit
def _decode_rows(member, mrank, count, m0, BLOCK_M: tl.constexpr, P_POW2: tl.constexpr):
    """Rows ``m0 .. m0 + BLOCK_M`` of a slot -> (their choices ``p`` (BLOCK_M,), valid rows). Past ``count``: the
    slot's first choice, a row every operand has written (``h`` holds no row for a dropped choice), computed and
    never stored."""
    offs_p = tl.arange(0, P_POW2)
    want = m0 + tl.arange(0, BLOCK_M)
    hit = member[None, :] & (mrank[None, :] == tl.where(want < count, want, 0)[:, None])
    pairs = tl.sum(tl.where(hit, offs_p[None, :], 0), axis=1)
    return pairs, want < count


@triton.jit
def _decode_tile_ptrs(b_ptr, bs_ptr, e, tn, N, offs_k, stride_be, stride_bn, stride_bse, stride_bsn,
                      BLOCK_N: tl.constexpr, TMA_B: tl.constexpr):
    """The slot's weight tile at K = 0: (pointers or the descriptor, first descriptor row, scale pointers, columns,
    column mask)."""
    e64 = e.to(tl.int64)
    cols = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_ld = tl.minimum(cols, N - 1).to(tl.int64)
    bs_ptrs = _weight_scale_ptrs(bs_ptr, e64, tn, cols_ld, stride_bse, stride_bsn, BLOCK_N)
    if TMA_B:
        b_tile = b_ptr
    else:
        b_tile = b_ptr + e64 * stride_be + cols_ld[:, None] * stride_bn + offs_k[None, :]
    return b_tile, e * N + tn * BLOCK_N, bs_ptrs, cols.to(tl.int64), cols < N


@triton.jit
def _onload_tile(a_ptr, c_ptr, a_rows, c_rows, row_ok, b_tile, b_row0, bs_ptrs, cols64, col_ok, K, up_off,
                 stride_ar, stride_ak, stride_bsk, stride_cp, stride_cn,
                 FP8_MAX: tl.constexpr, EPS: tl.constexpr, UE8M0: tl.constexpr, FMA_DIV: tl.constexpr,
                 NAN_MAX: tl.constexpr, NAN_SELECT: tl.constexpr, SWIGLU: tl.constexpr, ACCURATE_EXP: tl.constexpr,
                 IS_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 ACC_K: tl.constexpr, UPCAST: tl.constexpr, TMA_B: tl.constexpr):
    """One BLOCK_M-row tile times the weight tile: ``c[c_rows, cols] = A @ b_tile.T`` (stored where ``row_ok``),
    K blocks in order. Row i's operand is row ``a_rows[i]`` of ``a`` (a real row of ``a`` even where not
    ``row_ok``), formed as each K block is loaded: its 1x128 group quantized (GEMM1: the tokens), or with ``SWIGLU``
    SwiGLU of the group's gate columns and the up columns ``up_off`` further, then quantized (GEMM2:
    ``silu_mul_quant_kernel``'s math)."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_ar + offs_k[None, :] * stride_ak
    b_ptrs = b_tile
    acc = _zero_acc(BLOCK_M, BLOCK_N, True)
    for k0 in range(0, K, BLOCK_K):
        if SWIGLU:
            a = _silu_mul(tl.load(a_ptrs).to(tl.float32), tl.load(a_ptrs + up_off * stride_ak).to(tl.float32),
                          ACCURATE_EXP, IS_BF16)
        else:
            a = tl.load(a_ptrs).to(tl.float32)
        aq, sa = _quant_groups(a, 1, FP8_MAX, EPS, UE8M0, FMA_DIV, NAN_MAX, NAN_SELECT)
        b = _load_b(b_ptrs, b_row0, k0, offs_k, K - k0, True, TMA_B)
        sb = tl.load(bs_ptrs + (k0 // BLOCK_K) * stride_bsk)
        acc = _acc_block(acc, aq.to(b.dtype), b, sa, sb, BLOCK_N, True, ACC_K, UPCAST)
        a_ptrs += BLOCK_K * stride_ak
        if not TMA_B:
            b_ptrs += BLOCK_K
    c_ptrs = c_ptr + c_rows.to(tl.int64)[None, :] * stride_cp + cols64[:, None] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=col_ok[:, None] & row_ok[None, :])


@triton.jit
def moe_decode_gemm_kernel(
    a_ptr,            # GEMM1: (T, K) bf16/fp16/fp32 tokens; SWIGLU (GEMM2): (P, 2I) GEMM1's output ([gate | up]); any
                      # strides, unit along K
    ids_ptr,          # int32/int64 (T, top_k) router choices (global ids with map_ptr), any strides
    map_ptr,          # int32 (num_global,) global -> local expert or -1 (HAS_MAP)
    b_ptr,            # float8 (E, N, K) weights, unit stride along K; or a descriptor over them as (E * N, K) (TMA_B)
    bs_ptr,           # float32 (E, cdiv(N, 128), K / 128) 128x128 dequantization scales, any strides
    c_ptr,            # (P, N) output, row p = t * top_k + j; rows of dropped choices are not written
    inv_ptr,          # int32 (P,): p where the choice is kept, else -1 (the combine's row map). GEMM1's program 0
                      # writes it; FUSE_COMBINE reads it
    cnt_ptr,          # int32 (num_cnt,) arrival counters: GEMM1's program 0 zeroes them, FUSE_COMBINE counts on them
                      # (each column tile's last program sets its counter back to zero)
    w_ptr,            # FUSE_COMBINE: (T, top_k) float32/bf16/fp16 combine weights, any strides
    out_ptr,          # FUSE_COMBINE: (T, N) the MoE output, any strides
    P, top_k, N, K, E, num_global, num_cnt,
    stride_ar, stride_ak, stride_it, stride_ik, stride_be, stride_bn, stride_bse, stride_bsn, stride_bsk,
    stride_cp, stride_cn, stride_wt, stride_wk, stride_ot, stride_oh,
    FP8_MAX: tl.constexpr, EPS: tl.constexpr, UE8M0: tl.constexpr, FMA_DIV: tl.constexpr, NAN_MAX: tl.constexpr,
    NAN_SELECT: tl.constexpr, SWIGLU: tl.constexpr, ACCURATE_EXP: tl.constexpr, IS_BF16: tl.constexpr,
    HAS_MAP: tl.constexpr, P_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, ACC_K: tl.constexpr, UPCAST: tl.constexpr, TMA_B: tl.constexpr,
    FUSE_COMBINE: tl.constexpr, TOP_K: tl.constexpr, OUT_BF16: tl.constexpr, COMBINE_T: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # wait for / release the neighbouring launches (kernels/pdl.py)
):
    """Both decode GEMMs. Grid: (slots * cdiv(N, BLOCK_N),), program = slot * num_n + n-tile; K a multiple of 128.
    GEMM1 (not SWIGLU): row p's operand is its token's row of ``a``, quantized on load. GEMM2 (SWIGLU): row p of
    ``a`` (= h), SwiGLU of each K block's gate columns and the up columns K further, requantized on load.

    ``FUSE_COMBINE`` (GEMM2): the last program to finish an n-tile (every slot's program counts itself in on the
    tile's counter once its rows are stored, a release; the one that sees ``slots - 1`` acquires) sums that tile's
    columns for every token (``combine_rows``, the combine kernel's math and order, COMBINE_T tokens per step,
    reading the rows through L2), so the MoE's output comes out of this launch. Deterministic: the sum's order is
    fixed, only who runs it varies."""
    pdl_prologue(USE_PDL)
    tl.static_assert(BLOCK_K == 128, "BLOCK_K must equal the 128-wide scale block")
    num_n = tl.cdiv(N, BLOCK_N)
    tn = tl.program_id(0) % num_n
    e, member, mrank, count, live, keep = _decode_slot(ids_ptr, map_ptr, tl.program_id(0) // num_n, P, top_k,
                                                       stride_it, stride_ik, E, num_global, HAS_MAP, P_POW2)
    if not SWIGLU:
        if tl.program_id(0) == 0:
            offs_p = tl.arange(0, P_POW2)
            tl.store(inv_ptr + offs_p, tl.where(keep, offs_p, -1), mask=offs_p < P)
            for c0 in range(0, num_cnt, 128):
                offs_c = c0 + tl.arange(0, 128)
                tl.store(cnt_ptr + offs_c, tl.zeros((128,), tl.int32), mask=offs_c < num_cnt)
    if live:
        b_tile, b_row0, bs_ptrs, cols64, col_ok = _decode_tile_ptrs(b_ptr, bs_ptr, e, tn, N, tl.arange(0, BLOCK_K),
                                                                    stride_be, stride_bn, stride_bse, stride_bsn,
                                                                    BLOCK_N, TMA_B)
        for m0 in range(0, count, BLOCK_M):
            pairs, row_ok = _decode_rows(member, mrank, count, m0, BLOCK_M, P_POW2)
            if SWIGLU:
                a_rows = pairs
            else:
                a_rows = pairs // top_k
            _onload_tile(a_ptr, c_ptr, a_rows, pairs, row_ok, b_tile, b_row0, bs_ptrs, cols64, col_ok, K, K,
                         stride_ar, stride_ak, stride_bsk, stride_cp, stride_cn, FP8_MAX, EPS, UE8M0, FMA_DIV,
                         NAN_MAX, NAN_SELECT, SWIGLU, ACCURATE_EXP, IS_BF16, BLOCK_M, BLOCK_N, BLOCK_K, ACC_K, UPCAST,
                         TMA_B)
    if FUSE_COMBINE:
        tl.debug_barrier()  # every thread's rows are stored before the counter's release
        arrived = tl.atomic_add(cnt_ptr + tn, 1, sem="acq_rel", scope="gpu")
        if arrived == tl.num_programs(0) // num_n - 1:
            cols = (tn * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[None, :]
            T = P // TOP_K
            for t0 in range(0, T, COMBINE_T):  # COMBINE_T tokens at a time: their rows' loads in flight together
                t = (t0 + tl.arange(0, COMBINE_T)).to(tl.int64)[:, None]
                combine_rows(c_ptr, inv_ptr, w_ptr, out_ptr, t, cols, t < T, cols < N, stride_cp, stride_cn, TOP_K,
                             1, stride_wt, stride_wk, stride_ot, stride_oh, TOP_K, OUT_BF16, ".cg")
            tl.store(cnt_ptr + tn, 0)  # every program of the tile has arrived: back to zero for the next launch


@triton.jit
def moe_routed_gemm_kernel(
    a_ptr,            # GATHER: (T, K) tokens, any strides; else (M, 2I) GEMM1's output h in the plan's rows
    sorted_ptr,       # int32 (M,) the plan's sorted_token_ids (read with GATHER)
    block_expert_ptr,  # int32 (M // MAP_BLOCK,) the plan's expert of each MAP_BLOCK-row block, -1 unused
    m_idx_ptr,        # int32 (M,) the plan's expert of each row, -1 on padding
    b_ptr,            # float8 (E, N, K) weights, unit stride along K; or a descriptor over (E * N, K) (TMA_B)
    bs_ptr,           # float32 (E, cdiv(N, 128), K / 128)
    c_ptr,            # (M, N) output in the plan's rows; padding rows and unused blocks are not written
    M, N, K, E, numel, top_k, up_off,
    stride_ar, stride_ak, stride_be, stride_bn, stride_bse, stride_bsn, stride_bsk, stride_cp, stride_cn,
    FP8_MAX: tl.constexpr, EPS: tl.constexpr, UE8M0: tl.constexpr, FMA_DIV: tl.constexpr, NAN_MAX: tl.constexpr,
    NAN_SELECT: tl.constexpr, SWIGLU: tl.constexpr, ACCURATE_EXP: tl.constexpr, IS_BF16: tl.constexpr,
    GATHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, MAP_BLOCK: tl.constexpr, ACC_K: tl.constexpr, UPCAST: tl.constexpr, TMA_B: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # wait for / release the neighbouring launches (kernels/pdl.py)
):
    """The routed path's GEMMs: the routing plan's rows and tiles (``_grouped_gemm_fp8_blockmap_kernel``'s
    scheduling, swap-AB), each operand formed as it is loaded (``_onload_tile``). GEMM1 (``GATHER``): row r's operand
    is its token's row of ``x`` (``sorted_token_ids[r] // top_k``) quantized in 1x128 groups, so neither the
    quantized tokens nor their permuted copy are written. GEMM2 (``SWIGLU``): row r of ``h``, SwiGLU then
    requantized. The bytes of ``quantize_permute`` + ``grouped_gemm_fp8`` and of ``silu_mul_quantize`` +
    ``grouped_gemm_fp8`` for the real rows. Grid: ((M // BLOCK_M) * cdiv(N, BLOCK_N),)."""
    pdl_prologue(USE_PDL)
    tl.static_assert(BLOCK_K == 128, "BLOCK_K must equal the 128-wide scale block")
    tl.static_assert(MAP_BLOCK % BLOCK_M == 0, "a tile must not straddle two experts' segments")
    num_n = tl.cdiv(N, BLOCK_N)
    tm, tn = _block_map_tile(tl.program_id(0), M // BLOCK_M, num_n, GROUP_M)
    row0 = tm * BLOCK_M
    e = tl.load(block_expert_ptr + row0 // MAP_BLOCK)
    if (e >= 0) & (e < E):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = tl.load(m_idx_ptr + rows) == e
        if GATHER:
            sid = tl.load(sorted_ptr + rows)
            a_rows = tl.where(row_ok & (sid >= 0) & (sid < numel), sid, 0) // top_k
        else:
            # padding rows read their map block's first row (real: segments pad at their end), never unwritten
            # memory, also where a tile is shorter than the plan's blocks
            a_rows = tl.where(row_ok, rows, (row0 // MAP_BLOCK) * MAP_BLOCK)
        b_tile, b_row0, bs_ptrs, cols64, col_ok = _decode_tile_ptrs(b_ptr, bs_ptr, e, tn, N, tl.arange(0, BLOCK_K),
                                                                    stride_be, stride_bn, stride_bse, stride_bsn,
                                                                    BLOCK_N, TMA_B)
        _onload_tile(a_ptr, c_ptr, a_rows, rows, row_ok, b_tile, b_row0, bs_ptrs, cols64, col_ok, K, up_off,
                     stride_ar, stride_ak, stride_bsk, stride_cp, stride_cn, FP8_MAX, EPS, UE8M0, FMA_DIV, NAN_MAX,
                     NAN_SELECT, SWIGLU, ACCURATE_EXP, IS_BF16, BLOCK_M, BLOCK_N, BLOCK_K, ACC_K, UPCAST, TMA_B)
