"""Routing kernels: align (token, choice) pairs into 128-row expert segments, permute the quantized rows.

Plan layout (``fp8_deep.ops.plan.RoutingPlan``): experts in ascending local id, each segment starting at a multiple
of ``BLOCK_SIZE``; inside a segment the choices keep ascending flat index ``t * top_k + j`` (stable), so the plan is a
pure function of ``topk_ids`` (no atomics decide an order). Choices whose expert is not local (``expert_map`` -1) or
out of range are dropped: no row, ``inv_perm`` -1.

How the stable placement is computed without a host sync and with few launches:

* every choice's destination is ``offset[e] + (choices of e in earlier chunks) + (rank inside its chunk)``;
* the rank inside a chunk is the count of the chunk's earlier choices of the same expert ([CHUNK, SUB] equality
  tiles: no sort, no atomics, stable by construction);
* padding rows (sentinel / -1) are written by the program owning their 128-row block, real rows by the program
  owning their chunk: the two sets are disjoint, so one launch needs no ordering between its programs.

Small problems (``align_fused_kernel``) take one launch: every program recomputes the histogram of all choices
(cheap below a few thousand). Large ones take three: per-chunk histogram + ranks, a column scan over chunks, and the
placement.
"""
import triton
import triton.language as tl

from .quant import _quant_routed_rows
from .pdl import pdl_prologue


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _local_expert(ids_ptr, map_ptr, flat, in_range, top_k, stride_t, stride_k, num_experts, num_global,
                  HAS_MAP: tl.constexpr):
    """Local expert of each flat choice index and whether the choice is kept (range checks in the id's own dtype)."""
    t = flat // top_k
    j = flat - t * top_k
    g = tl.load(ids_ptr + t.to(tl.int64) * stride_t + j.to(tl.int64) * stride_k, mask=in_range, other=-1)
    if HAS_MAP:
        g_ok = in_range & (g >= 0) & (g < num_global)
        e = tl.load(map_ptr + tl.where(g_ok, g, 0), mask=g_ok, other=-1).to(tl.int32)
        keep = g_ok & (e >= 0) & (e < num_experts)
    else:
        keep = in_range & (g >= 0) & (g < num_experts)
        e = tl.where(keep, g, 0).to(tl.int32)
    return tl.where(keep, e, 0), keep


@triton.jit
def _segments(counts, num_experts, BLOCK_SIZE: tl.constexpr, E_POW2: tl.constexpr):
    """Padded segment ends/offsets (exclusive prefix of align(count, BLOCK_SIZE)) and the rows in use."""
    ex = tl.arange(0, E_POW2)
    counts = tl.where(ex < num_experts, counts, 0)
    padded = (counts + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE
    ends = tl.cumsum(padded, 0)
    offs = ends - padded
    total = tl.sum(padded, 0)
    return counts, ends, offs, total


@triton.jit
def _chunk_rank(ids_ptr, map_ptr, e, keep, chunk_start, numel, top_k, stride_t, stride_k, num_experts, num_global,
                HAS_MAP: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr):
    """Stable rank of each choice of a chunk among the chunk's earlier choices of the same expert.

    A [CHUNK, SUB] equality count per step (the SUB-wide column slice is re-read: registers cannot be sliced);
    no sort, no atomics, so the order is the flat index order by construction."""
    lane = tl.arange(0, CHUNK)
    rank = tl.zeros([CHUNK], dtype=tl.int32)
    for j0 in range(0, CHUNK, SUB):
        jl = j0 + tl.arange(0, SUB)
        jf = chunk_start + jl
        ej, kj = _local_expert(ids_ptr, map_ptr, jf, jf < numel, top_k, stride_t, stride_k, num_experts, num_global,
                               HAS_MAP)
        same = (ej[None, :] == e[:, None]) & kj[None, :] & (jl[None, :] < lane[:, None])
        rank += tl.sum(same.to(tl.int32), 1)
    return rank


@triton.jit
def _place_chunk(e, keep, rank, base, flat, in_range, sorted_ptr, m_ptr, inv_ptr):
    """Real rows of a chunk: choice ``flat`` of expert ``e`` goes to row ``base[e] + rank``; dropped ones get
    ``inv_perm`` -1."""
    dest = tl.gather(base, e, 0) + rank
    tl.store(sorted_ptr + dest, flat, mask=keep)
    tl.store(m_ptr + dest, e, mask=keep)
    tl.store(inv_ptr + flat, tl.where(keep, dest, -1), mask=in_range)


@triton.jit
def _write_block(b, counts, ends, offs, total, sorted_ptr, expert_ids_ptr, m_ptr, numel, num_experts, num_rows,
                 BLOCK_SIZE: tl.constexpr, E_POW2: tl.constexpr):
    """Block ``b`` of BLOCK_SIZE rows: its expert id (or -1) and the padding rows in it (sentinel / -1)."""
    ex = tl.arange(0, E_POW2)
    row0 = b * BLOCK_SIZE
    used = row0 < total
    # segments are BLOCK_SIZE-aligned, so one expert owns the block: the first whose segment ends past row0
    owner = tl.sum(((ex < num_experts) & (ends <= row0)).to(tl.int32), 0)
    own_off = tl.sum(tl.where(ex == owner, offs, 0), 0)
    own_cnt = tl.sum(tl.where(ex == owner, counts, 0), 0)
    tl.store(expert_ids_ptr + b, tl.where(used, owner, -1))
    r = row0 + tl.arange(0, BLOCK_SIZE)
    # (vector comparisons only: the interpreter mis-types a scalar bool combined with a vector mask)
    pad = (r < num_rows) & ((r >= total) | (r - own_off >= own_cnt))
    tl.store(sorted_ptr + r, tl.zeros([BLOCK_SIZE], dtype=tl.int32) + numel, mask=pad)
    tl.store(m_ptr + r, tl.full([BLOCK_SIZE], -1, dtype=tl.int32), mask=pad)


@triton.jit
def _write_meta(counts, offs, total, offsets_ptr, counts_ptr, ntpp_ptr, num_experts, E_POW2: tl.constexpr):
    ex = tl.arange(0, E_POW2)
    tl.store(offsets_ptr + ex, offs, mask=ex < num_experts)
    tl.store(counts_ptr + ex, counts, mask=ex < num_experts)
    tl.store(ntpp_ptr, total)


@triton.jit
def _write_block_and_meta(pid, counts, ends, offs, total, sorted_ptr, expert_ids_ptr, m_ptr, offsets_ptr, counts_ptr,
                          ntpp_ptr, numel, num_experts, num_rows, BLOCK_SIZE: tl.constexpr, E_POW2: tl.constexpr):
    """Every program writes its own 128-row block's padding and expert id; program 0 also the per-expert meta."""
    if pid * BLOCK_SIZE < num_rows:
        _write_block(pid, counts, ends, offs, total, sorted_ptr, expert_ids_ptr, m_ptr, numel, num_experts,
                     num_rows, BLOCK_SIZE, E_POW2)
    if pid == 0:
        _write_meta(counts, offs, total, offsets_ptr, counts_ptr, ntpp_ptr, num_experts, E_POW2)


# ----------------------------------------------------------------------------------------------------------------------
# one launch (small T * top_k)
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def align_fused_kernel(
    # pointers
    ids_ptr, map_ptr,
    sorted_ptr, expert_ids_ptr, ntpp_ptr, m_ptr, inv_ptr, offsets_ptr, counts_ptr,
    # sizes
    numel, top_k, num_experts, num_global, num_rows,
    # strides
    stride_t, stride_k,
    # meta
    HAS_MAP: tl.constexpr, BLOCK_SIZE: tl.constexpr, E_POW2: tl.constexpr, TILE: tl.constexpr, CHUNK: tl.constexpr,
    SUB: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # wait for / release the neighbouring launches (kernels/pdl.py)
):
    """Grid: max(row blocks, chunks). Each program histograms all choices (and those before its chunk), places its
    chunk's real rows, and writes its row block's padding rows and expert id."""
    pdl_prologue(USE_PDL)
    pid = tl.program_id(0)
    chunk_start = pid * CHUNK
    dump = E_POW2 - 1  # E_POW2 >= num_experts + 1: a bin no expert uses, for dropped / masked choices
    hist = tl.zeros([E_POW2], dtype=tl.int32)
    before = tl.zeros([E_POW2], dtype=tl.int32)
    for start in range(0, numel, TILE):
        flat = start + tl.arange(0, TILE)
        e, keep = _local_expert(ids_ptr, map_ptr, flat, flat < numel, top_k, stride_t, stride_k, num_experts,
                                num_global, HAS_MAP)
        hist += tl.histogram(tl.where(keep, e, dump), E_POW2)
        before += tl.histogram(tl.where(keep & (flat < chunk_start), e, dump), E_POW2)
    counts, ends, offs, total = _segments(hist, num_experts, BLOCK_SIZE, E_POW2)

    if chunk_start < numel:
        flat = chunk_start + tl.arange(0, CHUNK)
        in_range = flat < numel
        e, keep = _local_expert(ids_ptr, map_ptr, flat, in_range, top_k, stride_t, stride_k, num_experts,
                                num_global, HAS_MAP)
        rank = _chunk_rank(ids_ptr, map_ptr, e, keep, chunk_start, numel, top_k, stride_t, stride_k, num_experts,
                           num_global, HAS_MAP, CHUNK, SUB)
        _place_chunk(e, keep, rank, offs + before, flat, in_range, sorted_ptr, m_ptr, inv_ptr)

    _write_block_and_meta(pid, counts, ends, offs, total, sorted_ptr, expert_ids_ptr, m_ptr, offsets_ptr, counts_ptr,
                          ntpp_ptr, numel, num_experts, num_rows, BLOCK_SIZE, E_POW2)


# ----------------------------------------------------------------------------------------------------------------------
# one launch for the plan and the quantized, permuted activations (decode-sized T * top_k)
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def align_quant_kernel(
    # pointers: the routing (as align_fused_kernel), x (T, K) high precision, q (num_rows, K) FP8, s (num_rows, G)
    ids_ptr, map_ptr, x_ptr,
    sorted_ptr, expert_ids_ptr, ntpp_ptr, m_ptr, inv_ptr, offsets_ptr, counts_ptr, q_ptr, s_ptr,
    # sizes
    numel, top_k, num_experts, num_global, num_rows, K,
    # strides
    stride_t, stride_k, stride_xm, stride_xk, stride_qm, stride_qk, stride_sm, stride_sg,
    # numerics (quant_permute_kernel's)
    FP8_MAX: tl.constexpr, EPS: tl.constexpr, UE8M0: tl.constexpr, FMA_DIV: tl.constexpr, NAN_MAX: tl.constexpr,
    NAN_SELECT: tl.constexpr,
    # meta
    HAS_MAP: tl.constexpr, BLOCK_SIZE: tl.constexpr, E_POW2: tl.constexpr, CHOICES: tl.constexpr,
    GROUP: tl.constexpr, GROUPS_PER_PROG: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # wait for / release the neighbouring launches (kernels/pdl.py)
):
    """``align_fused_kernel`` then ``quant_permute_kernel``, in one launch: the same plan, the same rows.

    Grid: (num_rows // BLOCK_SIZE, cdiv(G, GROUPS_PER_PROG)); every choice fits one tile (``CHOICES >= numel``).
    Program (b, g) owns row block b: from the histogram of all choices it knows the expert owning the block, and
    the rank of each choice among that expert's (a prefix count in flat order: the plan's stable order) tells
    which choices land in the block. Column slice 0 writes the block's plan entries (rows, expert, inverse
    permutation; block 0 also the per-expert meta and the -1 of dropped choices); every slice quantizes its
    GROUPS_PER_PROG groups of the block's rows from their tokens' rows of x (padding rows: q 0, scale 0). The
    routing is recomputed by every program: a few hundred ids from L2, no ordering between programs needed."""
    pdl_prologue(USE_PDL)
    b = tl.program_id(0)
    pid_g = tl.program_id(1)
    flat = tl.arange(0, CHOICES)
    in_range = flat < numel
    e, keep = _local_expert(ids_ptr, map_ptr, flat, in_range, top_k, stride_t, stride_k, num_experts, num_global,
                            HAS_MAP)
    hist = tl.histogram(tl.where(keep, e, E_POW2 - 1), E_POW2)
    counts, ends, offs, total = _segments(hist, num_experts, BLOCK_SIZE, E_POW2)
    ex = tl.arange(0, E_POW2)
    row0 = b * BLOCK_SIZE
    used = row0 < total
    # segments are BLOCK_SIZE-aligned, so one expert owns the block (as _write_block finds it)
    owner = tl.sum(((ex < num_experts) & (ends <= row0)).to(tl.int32), 0)
    own_off = tl.sum(tl.where(ex == owner, offs, 0), 0)
    mine = keep & (e == owner) & used
    dest = own_off + tl.cumsum(mine.to(tl.int32), 0) - 1
    r = row0 + tl.arange(0, BLOCK_SIZE)
    hit = mine[None, :] & (dest[None, :] == r[:, None])                    # [BLOCK_SIZE, CHOICES]
    real = tl.sum(hit.to(tl.int32), 1) > 0
    src = tl.sum(tl.where(hit, flat[None, :], 0), 1)
    if pid_g == 0:
        tl.store(expert_ids_ptr + b, tl.where(used, owner, -1))
        tl.store(sorted_ptr + r, tl.where(real, src, numel))
        tl.store(m_ptr + r, tl.where(real, owner, -1))
        tl.store(inv_ptr + src, r, mask=real)
        if b == 0:
            tl.store(inv_ptr + flat, tl.full([CHOICES], -1, dtype=tl.int32), mask=in_range & (keep == 0))
            _write_meta(counts, offs, total, offsets_ptr, counts_ptr, ntpp_ptr, num_experts, E_POW2)
    # quant_permute_kernel's tile on the block's rows (every row of the grid's blocks exists)
    _quant_routed_rows(x_ptr, q_ptr, s_ptr, src // top_k, real, r, r < num_rows, pid_g, K,
                       stride_xm, stride_xk, stride_qm, stride_qk, stride_sm, stride_sg,
                       FP8_MAX, EPS, UE8M0, FMA_DIV, NAN_MAX, NAN_SELECT, GROUP, GROUPS_PER_PROG, BLOCK_SIZE)


# ----------------------------------------------------------------------------------------------------------------------
# three launches (large T * top_k)
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def align_count_kernel(
    ids_ptr, map_ptr, keys_ptr, chunk_counts_ptr,
    numel, top_k, num_experts, num_global,
    stride_t, stride_k,
    HAS_MAP: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
):
    """Grid: chunks. Per-chunk expert histogram -> chunk_counts[c, :]; ``e * CHUNK + rank`` (-1 dropped) -> keys."""
    c = tl.program_id(0)
    flat = c * CHUNK + tl.arange(0, CHUNK)
    in_range = flat < numel
    e, keep = _local_expert(ids_ptr, map_ptr, flat, in_range, top_k, stride_t, stride_k, num_experts, num_global,
                            HAS_MAP)
    rank = _chunk_rank(ids_ptr, map_ptr, e, keep, c * CHUNK, numel, top_k, stride_t, stride_k, num_experts,
                       num_global, HAS_MAP, CHUNK, SUB)
    hist = tl.histogram(tl.where(keep, e, E_POW2 - 1), E_POW2)
    ex = tl.arange(0, E_POW2)
    tl.store(chunk_counts_ptr + c * E_POW2 + ex, tl.where(ex < num_experts, hist, 0))
    tl.store(keys_ptr + flat, tl.where(keep, e * CHUNK + rank, -1))


@triton.jit
def align_scan_kernel(
    chunk_counts_ptr, chunk_before_ptr, totals_ptr, num_chunks,
    E_POW2: tl.constexpr, EXPERTS_PER_PROG: tl.constexpr, CHUNK_TILE: tl.constexpr,
):
    """Grid: expert slabs. Exclusive scan of chunk_counts over chunks -> chunk_before; column sums -> totals."""
    ex = tl.program_id(0) * EXPERTS_PER_PROG + tl.arange(0, EXPERTS_PER_PROG)
    running = tl.zeros([EXPERTS_PER_PROG], dtype=tl.int32)
    for c0 in range(0, num_chunks, CHUNK_TILE):
        c = c0 + tl.arange(0, CHUNK_TILE)
        mask = (c[:, None] < num_chunks) & (ex[None, :] < E_POW2)
        ptrs = c[:, None] * E_POW2 + ex[None, :]
        tile = tl.load(chunk_counts_ptr + ptrs, mask=mask, other=0)
        tl.store(chunk_before_ptr + ptrs, running[None, :] + tl.cumsum(tile, 0) - tile, mask=mask)
        running += tl.sum(tile, 0)
    tl.store(totals_ptr + ex, running, mask=ex < E_POW2)


@triton.jit
def align_place_kernel(
    keys_ptr, chunk_before_ptr, totals_ptr,
    sorted_ptr, expert_ids_ptr, ntpp_ptr, m_ptr, inv_ptr, offsets_ptr, counts_ptr,
    numel, num_experts, num_rows, num_chunks,
    BLOCK_SIZE: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr,
):
    """Grid: max(row blocks, chunks). Real rows of chunk pid, padding rows and expert id of block pid."""
    pid = tl.program_id(0)
    ex = tl.arange(0, E_POW2)
    counts, ends, offs, total = _segments(tl.load(totals_ptr + ex), num_experts, BLOCK_SIZE, E_POW2)
    if pid < num_chunks:
        flat = pid * CHUNK + tl.arange(0, CHUNK)
        key = tl.load(keys_ptr + flat)
        keep = key >= 0
        e = tl.where(keep, key // CHUNK, 0)
        rank = key - e * CHUNK
        before = tl.load(chunk_before_ptr + pid * E_POW2 + ex)
        _place_chunk(e, keep, rank, offs + before, flat, flat < numel, sorted_ptr, m_ptr, inv_ptr)
    _write_block_and_meta(pid, counts, ends, offs, total, sorted_ptr, expert_ids_ptr, m_ptr, offsets_ptr, counts_ptr,
                          ntpp_ptr, numel, num_experts, num_rows, BLOCK_SIZE, E_POW2)


# ----------------------------------------------------------------------------------------------------------------------
# plan from vLLM's moe_align_block_size output (backend="vllm")
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def align_from_sorted_kernel(
    ids_ptr, map_ptr, v_sorted_ptr, v_expert_ids_ptr, v_ntpp_ptr,
    sorted_ptr, expert_ids_ptr, ntpp_ptr, m_ptr, inv_ptr, offsets_ptr, counts_ptr,
    numel, top_k, num_experts, num_global, num_rows, v_len, v_blocks,
    stride_t, stride_k,
    HAS_MAP: tl.constexpr, BLOCK_SIZE: tl.constexpr, CHUNK: tl.constexpr, MAX_BLOCKS_POW2: tl.constexpr,
):
    """Grid: max(row blocks, chunks of choices, experts). Copies vLLM's rows into the plan's buffers and derives
    m_indices / inv_perm (rows), inv_perm -1 for dropped choices (chunks), offsets / counts (one expert each)."""
    pid = tl.program_id(0)
    ntpp = tl.load(v_ntpp_ptr)
    # rows of block pid
    if pid * BLOCK_SIZE < num_rows:
        row0 = pid * BLOCK_SIZE
        r = row0 + tl.arange(0, BLOCK_SIZE)
        used = row0 < ntpp
        r_used = r < ntpp  # the whole block is used or not: ntpp is a multiple of BLOCK_SIZE
        s = tl.load(v_sorted_ptr + r, mask=r_used & (r < v_len), other=numel)
        eid = tl.load(v_expert_ids_ptr + pid, mask=used & (pid < v_blocks), other=-1)
        real = r_used & (s >= 0) & (s < numel) & ((tl.zeros_like(r) + eid) >= 0)
        tl.store(expert_ids_ptr + pid, tl.where(used, eid, -1))
        rmask = r < num_rows
        tl.store(sorted_ptr + r, tl.where(real, s, numel), mask=rmask)
        tl.store(m_ptr + r, tl.where(real, eid, -1), mask=rmask)
        tl.store(inv_ptr + tl.where(real, s, 0), r, mask=real & rmask)
    # dropped choices of chunk pid
    if pid * CHUNK < numel:
        flat = pid * CHUNK + tl.arange(0, CHUNK)
        in_range = flat < numel
        e, keep = _local_expert(ids_ptr, map_ptr, flat, in_range, top_k, stride_t, stride_k, num_experts,
                                num_global, HAS_MAP)
        tl.store(inv_ptr + flat, tl.full([CHUNK], -1, dtype=tl.int32), mask=in_range & ~keep)
    # offset and count of expert pid, from the block expert ids (segments are whole blocks)
    if pid < num_experts:
        b = tl.arange(0, MAX_BLOCKS_POW2)
        bused = (b * BLOCK_SIZE < ntpp) & (b < v_blocks)
        beid = tl.load(v_expert_ids_ptr + b, mask=bused, other=-1)
        mine = bused & (beid == pid)
        n_mine = tl.sum(mine.to(tl.int32), 0)
        n_lower = tl.sum((bused & (beid >= 0) & (beid < pid)).to(tl.int32), 0)
        first = tl.min(tl.where(mine, b, MAX_BLOCKS_POW2), 0)
        last = tl.max(tl.where(mine, b, -1), 0)
        offset = tl.where(n_mine > 0, first, n_lower) * BLOCK_SIZE
        lr = last * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        ls = tl.load(v_sorted_ptr + lr, mask=(lr >= 0) & (lr < v_len), other=numel)  # last = -1: no block
        n_last = tl.sum(((ls >= 0) & (ls < numel)).to(tl.int32), 0)
        cnt = tl.where(n_mine > 0, (n_mine - 1) * BLOCK_SIZE + n_last, 0)
        tl.store(offsets_ptr + pid, offset)
        tl.store(counts_ptr + pid, cnt)
    if pid == 0:
        tl.store(ntpp_ptr, ntpp)


# ----------------------------------------------------------------------------------------------------------------------
# permute the quantized hidden states into the plan's rows
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def permute_rows_kernel(
    # pointers
    q_ptr, s_ptr, sorted_ptr, q_out_ptr, s_out_ptr,
    # sizes
    numel, top_k, num_rows, K, G,
    # strides
    stride_qt, stride_qk, stride_st, stride_sg, stride_oqr, stride_oqk, stride_osr, stride_osg,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, G_POW2: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # wait for / release the neighbouring launches (kernels/pdl.py)
):
    """Grid: cdiv(num_rows, BLOCK_M). Row r <- q[sorted[r] // top_k] (its scales too); padding rows get zeros."""
    pdl_prologue(USE_PDL)
    pid = tl.program_id(0)
    r = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < num_rows
    s_id = tl.load(sorted_ptr + r, mask=rmask, other=numel)
    real = rmask & (s_id >= 0) & (s_id < numel)
    tok = (tl.where(real, s_id, 0) // top_k).to(tl.int64)
    r64 = r.to(tl.int64)
    # FP8 rows are moved as raw bytes (padding = 0x00 = +0.0)
    q_bytes = q_ptr.to(tl.pointer_type(tl.uint8))
    q_out_bytes = q_out_ptr.to(tl.pointer_type(tl.uint8))
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        v = tl.load(q_bytes + tok[:, None] * stride_qt + k[None, :] * stride_qk, mask=real[:, None] & kmask[None, :],
                    other=0)
        tl.store(q_out_bytes + r64[:, None] * stride_oqr + k[None, :] * stride_oqk, v,
                 mask=rmask[:, None] & kmask[None, :])
    g = tl.arange(0, G_POW2)
    gmask = g < G
    sv = tl.load(s_ptr + tok[:, None] * stride_st + g[None, :] * stride_sg, mask=real[:, None] & gmask[None, :],
                 other=0.0)
    tl.store(s_out_ptr + r64[:, None] * stride_osr + g[None, :] * stride_osg, sv, mask=rmask[:, None] & gmask[None, :])
