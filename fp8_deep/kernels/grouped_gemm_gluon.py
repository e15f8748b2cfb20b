"""FP8 block-scaled grouped GEMM in Gluon (Hopper, SM90): the TMA kernel of ``grouped_gemm.py`` with the per-128-K
FP32 promotion overlapped with the tensor cores. Launched by ``fp8_deep.ops.grouped_gemm`` (``GemmConfig(GLUON=1)``);
``bench/gluon_compile_check.py`` compiles every configuration for sm_90 on a CPU machine (registers, spills, PTX).

Operands (same contract as ``_grouped_gemm_fp8_tma_kernel``):

* ``a_desc``: host TensorDescriptor over ``a`` float8_e4m3fn ``(M, K)`` row-major, block ``[BLOCK_M, 128]``.
* ``as_ptr``: float32 ``(M, cdiv(K, 128))`` dequantization scales of ``a`` (1x128 groups), any strides (usually
  MN-major: strides ``(1, align(M, 4))``).
* ``b_desc``: host TensorDescriptor over ``b`` float8_e4m3fn ``(E, N, K)`` contiguous, viewed as ``(E * N, K)``,
  block ``[BLOCK_N, 128]``.
* ``bs_ptr``: float32 ``(E, cdiv(N, 128), cdiv(K, 128))`` scales of ``b`` (128x128 blocks), any strides.
* ``out_ptr``: bf16 / fp16 / fp32 ``(M, N)``, any strides.
* ``offsets_ptr``, ``counts_ptr``: int32 ``(E,)``: expert ``e`` owns rows ``[offsets[e], offsets[e] + counts[e])``
  (negative counts count as 0). Rows outside every segment are never written.

``out[r, n] = sum_kb dot(a[r, kb], b[e, n, kb]) * a_scale[r, kb] * b_scale[e, n // 128, kb]`` (scales are
dequantization scales, ``x ~= q * s``); every 128-K block is one wgmma chain into a fresh float32 tile (Triton's sm90
default ``max_num_imprecise_acc``, as ``tl.dot`` in the Triton kernels), promoted into a float32 accumulator;
the output is rounded once. K need not be a multiple of 128 (TMA zero-fills past K and past the tensors' ends);
N need not be a multiple of BLOCK_N (stores are masked). Deterministic: fixed K order per output element.

Scheduling: one program per tile of the flat tile space ``(global m-tile, n-tile)`` in grouped order, the expert of
an m-tile found from an in-kernel prefix sum of ``cdiv(counts, BLOCK_M)`` (``_locate_tile`` of the Triton kernel);
the grid is a host-side bound and programs past the real tile count exit. No host synchronisation.

Why Gluon: in ``tl.dot`` + ``acc += part * sa * sb`` form, Triton must wait for each block's wgmma to finish
(``wgmma.wait_group 0``) before the promotion reads it, so the tensor cores idle during the FMAs (H100: ~806
TFLOP/s vs ~1140 for DeepGEMM). Here the wgmma of block k is issued asynchronously first, then
``warpgroup_mma_wait(num_outstanding=1)`` waits only for block k-1, whose promotion then runs on the CUDA cores while
block k runs on the tensor cores (two partial tiles, ping-pong). K blocks go in pairs so that no wgmma result is in
flight across the loop's back edge (see the K loop: ptxas would serialise every wgmma); each pair ends with one
``wait_group 0``. The stage a block used is refilled with the block NUM_STAGES later as soon as its wgmma is known
complete. The other warpgroup reads the same B stage: the compiler's shared-memory hazard analysis (membar) puts a
CTA barrier before each TMA copy, which is what makes the refill safe for both warpgroups (and also keeps them in
step, a cost a producer-warp design with empty barriers would avoid).

Registers: per thread the accumulator and the two partial tiles are ``3 * BLOCK_M * BLOCK_N / (32 * num_warps)``
float32: 192 for 128x128 with 8 warps (ptxas sm_90: 255 registers, no or ~1 spill); 128x256 (384) cannot fit;
64x256 with 8 warps (two warpgroups side by side along N) has the same 192 but spills its per-column weight scales.

Warp-specialized variant (``_grouped_gemm_fp8_gluon_ws_kernel``, ``GemmConfig(GLUON=1, WS=1)``), the structure of
DeepGEMM / CUTLASS's ``KernelTmaWarpSpecialized``: three ``gl.warp_specialize`` partitions share the TMA ring. A
producer (1 warp) waits ``empty[stage]`` and issues the loads; two consumer warpgroups (the default partition and a
4-warp worker, 64 rows of the tile each) wait ``ready[stage]``, run the same ping-pong per warpgroup, and arrive on
``empty[stage]`` (count 2) once a ``wgmma.wait_group`` proves their wgmma on it complete. No CTA barrier remains in
the consumers' K loop (only mbarriers synchronise the partitions), so the two warpgroups drift out of phase and one's
promotion overlaps the other's wgmma. The tile loop ``range(program_id, tiles, num_programs)`` serves one tile per
program and a persistent grid (``PERSISTENT=1``: #SMs programs; the ring's counters run on across tiles, so the
producer loads the next tile while the consumers store the current one). Registers: 4 + 4 + 1 warps pad to three
warpgroups (168 per thread at launch); ``setmaxnreg`` gives the producer 40 and each consumer 232 (no spills,
Triton 3.6 and 3.9). Same numerics, bit for bit.

Row scales through the ring (``SCALES_TMA``, chosen by the launcher when ``as`` is MN-major with a 16-byte aligned
base, the layout the MoE hands over): the producer's TMA also loads the tile's 128 row scales of each K block into
the stage (a 1-D box over the flat scale run), so a consumer reads them from shared memory, NUM_STAGES blocks after
they were requested, instead of waiting on a global load issued one wgmma earlier (H100: +3.6-7.2% on both DeepSeek-V3
GEMMs, docs/performance-log.md run ce5d751). Otherwise (row-major scales) the consumers load them from global memory.
"""
try:  # Gluon is experimental: importing this module must not fail on a Triton without it.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    GLUON_AVAILABLE = True
except Exception:  # noqa: BLE001 - any import-time failure means "no Gluon here"
    GLUON_AVAILABLE = False

if GLUON_AVAILABLE:
    # Triton 3.6 names the TMA load tma.async_copy_global_to_shared; Triton >= 3.7 renamed it tma.async_load (the old
    # name still exists there but raises), so prefer the new name when it exists. Same arguments in both.
    _tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared

    @gluon.constexpr_function
    def _warps_per_cta(BLOCK_M, num_warps):
        # wgmma's atom is one warpgroup (4 warps) over 64 rows; stack warpgroups along M while rows remain, then put
        # the rest side by side along N (so 64-row tiles with 8 warps split N between the two warpgroups).
        wm = 4
        while wm * 2 <= num_warps and wm * 2 * 16 <= BLOCK_M:
            wm *= 2
        return [wm, num_warps // wm]

    @gluon.constexpr_function
    def _instr_n(BLOCK_N, warps_n):
        # One wgmma per warpgroup covers its whole N range (up to 256): fewest instructions per 128-K block.
        n = BLOCK_N // warps_n
        assert n % 8 == 0 and n <= 256, f"wgmma N={n} unsupported"
        return n

    @gluon.jit
    def _add_i32(x, y):
        return x + y

    # ---- tile map (every partition computes it; layouts sized to the partition's warps) -------------------------
    @gluon.jit
    def _tile_table(counts_ptr, E, BLOCK_M: gl.constexpr, BLOCK_E: gl.constexpr, e_layout: gl.constexpr):
        """Per-expert m-tile counts and their inclusive prefix sum (``BLOCK_E`` lanes in ``e_layout``)."""
        offs_e = gl.arange(0, BLOCK_E, layout=e_layout)
        counts = gl.maximum(gl.load(counts_ptr + offs_e, mask=offs_e < E, other=0), 0)
        m_tiles = (counts + BLOCK_M - 1) // BLOCK_M
        cum_tiles = gl.associative_scan(m_tiles, 0, _add_i32)  # inclusive prefix sum (no gl.cumsum in Triton 3.6)
        return offs_e, counts, m_tiles, cum_tiles, gl.sum(m_tiles, 0)

    @gluon.jit
    def _locate(tile_id, offs_e, counts, m_tiles, cum_tiles, total_m, num_n, offsets_ptr, E,
                GROUP_M: gl.constexpr, BLOCK_M: gl.constexpr):
        """Tile ``tile_id`` of the flat grouped order -> (expert, first row, n-tile, segment start, segment rows).
        Total (in-bounds loads, no division by zero) for any ``tile_id``, also with no tiles at all; the result is
        meaningful for ``tile_id < total_m * num_n`` only."""
        tiles_per_group = GROUP_M * num_n
        first_m = (tile_id // tiles_per_group) * GROUP_M
        group_rows = gl.maximum(gl.minimum(total_m - first_m, GROUP_M), 1)
        tm = first_m + (tile_id % tiles_per_group) % group_rows
        tn = (tile_id % tiles_per_group) // group_rows
        e = gl.minimum(gl.sum((cum_tiles <= tm).to(gl.int32), 0), E - 1)
        tiles_before = gl.sum(gl.where(offs_e < e, m_tiles, 0), 0)
        count = gl.sum(gl.where(offs_e == e, counts, 0), 0)
        seg_start = gl.load(offsets_ptr + e)
        row0 = seg_start + (tm - tiles_before) * BLOCK_M
        return e, row0, tn, seg_start, count

    @gluon.jit
    def _load_scales(as_ptrs, bs_ptrs, kb, stride_ask, stride_bsk):
        """Scales of K block ``kb``: a per-row vector and a scalar (or a per-column vector when BLOCK_N > 128)."""
        return gl.load(as_ptrs + kb * stride_ask), gl.load(bs_ptrs + kb * stride_bsk)

    @gluon.jit
    def _promote(acc, part, sa, sb, BLOCK_N: gl.constexpr):
        """``acc += part * sa[row] * sb[col]`` with the scale product formed first when ``sb`` is one scalar
        (one FMA per element, as ``_promote`` in the Triton kernel)."""
        if BLOCK_N <= 128:
            res = acc + part * gl.expand_dims(sa * sb, 1)
        else:
            res = acc + part * gl.expand_dims(sa, 1) * gl.expand_dims(sb, 0)
        return res

    @gluon.jit
    def _store_rows(acc, out_ptr, row0, tn, seg_start, count, M, N, stride_om, stride_on, ROWS: gl.constexpr,
                    BLOCK_N: gl.constexpr, out_layout: gl.constexpr):
        """Round ``acc`` (ROWS x BLOCK_N from row ``row0``, n-tile ``tn``) once and store the rows of the segment
        ``[seg_start, seg_start + count)`` only, through ``out_layout`` (16-byte vectors per thread)."""
        res = gl.convert_layout(acc.to(out_ptr.dtype.element_ty), out_layout)
        out_rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, out_layout))
        out_cols = tn * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out_layout))
        row_ok = ((out_rows - seg_start) < count) & (out_rows < M)
        col_ok = out_cols < N
        o_ptrs = (out_ptr + gl.expand_dims(out_rows.to(gl.int64) * stride_om, 1)
                  + gl.expand_dims(out_cols.to(gl.int64) * stride_on, 0))
        gl.store(o_ptrs, res, mask=gl.expand_dims(row_ok, 1) & gl.expand_dims(col_ok, 0))

    @gluon.jit
    def _issue_loads(a_desc, b_desc, a_smem, b_smem, bars, stage, kb, row0, b_row0, nk,
                     BLOCK_K: gl.constexpr, TILE_BYTES: gl.constexpr):
        """TMA loads of K block ``kb`` into ``stage`` (skipped past the last block: ``pred``)."""
        pred = kb < nk
        bar = bars.index(stage)
        mbarrier.expect(bar, TILE_BYTES, pred=pred)
        _tma_load(a_desc, [row0, kb * BLOCK_K], bar, a_smem.index(stage), pred=pred)
        _tma_load(b_desc, [b_row0, kb * BLOCK_K], bar, b_smem.index(stage), pred=pred)

    @gluon.jit
    def _issue_mma(a_smem, b_smem, bars, kb, zero, as_ptrs, bs_ptrs, stride_ask, stride_bsk,
                   NUM_STAGES: gl.constexpr):
        """Wait for K block ``kb``'s tiles, issue its wgmma asynchronously (fresh accumulator: ``use_acc=False``,
        ``zero`` only names the result's registers) and load its scales; they are used one step later, after the
        wgmma, so their global-load latency hides behind it."""
        s = kb % NUM_STAGES
        mbarrier.wait(bars.index(s), (kb // NUM_STAGES) & 1)
        part = warpgroup_mma(a_smem.index(s), b_smem.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
        sa, sb = _load_scales(as_ptrs, bs_ptrs, kb, stride_ask, stride_bsk)
        return part, sa, sb

    @gluon.jit
    def _grouped_gemm_fp8_gluon_kernel(
        a_desc,           # TensorDescriptor over a (M, K) float8, block [BLOCK_M, BLOCK_K]
        as_ptr,           # float32 (M, cdiv(K, 128)), any strides
        b_desc,           # TensorDescriptor over b viewed as (E * N, K) float8, block [BLOCK_N, BLOCK_K]
        bs_ptr,           # float32 (E, cdiv(N, 128), cdiv(K, 128)), any strides
        out_ptr,          # bf16/fp16/fp32 (M, N), any strides
        offsets_ptr,      # int32 (E,)
        counts_ptr,       # int32 (E,)
        M, N, K, E,
        stride_asm, stride_ask,
        stride_bse, stride_bsn, stride_bsk,
        stride_om, stride_on,
        BLOCK_M: gl.constexpr,     # 64 or 128 (one or two warpgroups along M)
        BLOCK_N: gl.constexpr,     # divides 128, or 256 (then the weight scale is a per-column vector)
        BLOCK_K: gl.constexpr,     # must be 128: one promotion per scale block
        GROUP_M: gl.constexpr,     # m-tiles sharing one sweep of n-tiles (L2 reuse of the weight tiles)
        BLOCK_E: gl.constexpr,     # next power of two >= E (per-expert tile counts live in registers)
        NUM_STAGES: gl.constexpr,  # TMA ring depth (>= 2: one stage feeds the MMA in flight, one is refilled)
        num_warps: gl.constexpr,
    ):
        gl.static_assert(BLOCK_K == 128, "BLOCK_K must equal the 128-wide scale block")
        gl.static_assert(NUM_STAGES >= 2, "the ping-pong keeps two K blocks' stages busy")
        gl.static_assert(BLOCK_N <= 128 or BLOCK_N % 128 == 0, "BLOCK_N must divide 128 or be a multiple of it")

        WARPS: gl.constexpr = _warps_per_cta(BLOCK_M, num_warps)
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=WARPS, instr_shape=[16, _instr_n(BLOCK_N, WARPS[1]), 32])
        row_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
        col_layout: gl.constexpr = gl.SliceLayout(0, mma_layout)
        e_layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        # Stores from the wgmma layout would write 2 columns (4 bytes) per thread and row; a blocked layout with 8
        # consecutive columns per thread writes whole 16-byte vectors (one layout conversion per tile, in the epilogue).
        TPW_N: gl.constexpr = 32 if BLOCK_N >= 256 else BLOCK_N // 8
        out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_N, TPW_N], [num_warps, 1], [1, 0])

        # ---- tile -> (expert, m-tile, n-tile), as _locate_tile in grouped_gemm.py -------------------------------
        offs_e, counts, m_tiles, cum_tiles, total_m = _tile_table(counts_ptr, E, BLOCK_M, BLOCK_E, e_layout)
        num_n = gl.cdiv(N, BLOCK_N)
        tile_id = gl.program_id(0)
        if tile_id >= total_m * num_n:
            return
        e, row0, tn, seg_start, count = _locate(tile_id, offs_e, counts, m_tiles, cum_tiles, total_m, num_n,
                                                offsets_ptr, E, GROUP_M, BLOCK_M)
        b_row0 = e * N + tn * BLOCK_N
        nk = gl.cdiv(K, BLOCK_K)

        # Scale pointers. Rows past the segment (other experts' rows or padding) are computed but never stored, so
        # their scale loads are only clamped inside [0, M) rather than masked.
        rows = row0 + gl.arange(0, BLOCK_M, layout=row_layout)
        as_ptrs = as_ptr + gl.minimum(gl.maximum(rows, 0), M - 1).to(gl.int64) * stride_asm
        bs_base = bs_ptr + e.to(gl.int64) * stride_bse
        if BLOCK_N <= 128:
            bs_ptrs = bs_base + ((tn * BLOCK_N) // 128) * stride_bsn
        else:
            cols_mma = tn * BLOCK_N + gl.arange(0, BLOCK_N, layout=col_layout)
            bs_ptrs = bs_base + (gl.minimum(cols_mma, N - 1) // 128) * stride_bsn

        # ---- TMA ring ---------------------------------------------------------------------------------------------
        a_smem = gl.allocate_shared_memory(a_desc.dtype, [NUM_STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
        b_smem = gl.allocate_shared_memory(b_desc.dtype, [NUM_STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(bars.index(i), count=1)
        fence_async_shared()  # barrier initialisation visible to the async proxy (TMA) before its first use
        TILE_BYTES: gl.constexpr = (BLOCK_M + BLOCK_N) * BLOCK_K  # FP8: one byte per element; OOB boxes count too
        for i in gl.static_range(NUM_STAGES):
            _issue_loads(a_desc, b_desc, a_smem, b_smem, bars, i, i, row0, b_row0, nk, BLOCK_K, TILE_BYTES)

        # ---- K loop: wgmma of block k in flight while block k-1 is promoted --------------------------------------
        # ptxas serialises every wgmma of the kernel (advisories C7514/C7515: each wait_group 1 silently becomes a
        # wait_group 0) as soon as any other instruction reads or writes the registers of an in-flight wgmma. A
        # wgmma result carried in flight across the loop's back edge or into an if/else is such a case: the
        # phi / out-of-SSA copies read it. So no wgmma stays in flight across a basic-block boundary: the loop
        # handles blocks in pairs (k, k+1), promoting k-1 under k and k under k+1, and ends each pair with
        # wait_group 0; the next pair's first wgmma is issued before the promotion of k+1, so the tensor cores
        # only pause for one issue latency per pair (and the other warpgroup's wgmma can fill that gap).
        zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
        p_0, sa_prev, sb_prev = _issue_mma(a_smem, b_smem, bars, 0, zero, as_ptrs, bs_ptrs, stride_ask, stride_bsk,
                                           NUM_STAGES)
        d_prev = warpgroup_mma_wait(num_outstanding=0, deps=[p_0])
        for k in range(1, nk - 1, 2):
            p_x, sa_x, sb_x = _issue_mma(a_smem, b_smem, bars, k, zero, as_ptrs, bs_ptrs, stride_ask, stride_bsk,
                                         NUM_STAGES)
            acc = _promote(acc, d_prev, sa_prev, sb_prev, BLOCK_N)       # block k-1 under block k
            _issue_loads(a_desc, b_desc, a_smem, b_smem, bars, (k - 1) % NUM_STAGES, k - 1 + NUM_STAGES, row0,
                         b_row0, nk, BLOCK_K, TILE_BYTES)
            p_y, sa_prev, sb_prev = _issue_mma(a_smem, b_smem, bars, k + 1, zero, as_ptrs, bs_ptrs, stride_ask,
                                               stride_bsk, NUM_STAGES)
            d_x = warpgroup_mma_wait(num_outstanding=1, deps=[p_x])       # block k done, k+1 still running
            acc = _promote(acc, d_x, sa_x, sb_x, BLOCK_N)                 # block k under block k+1
            _issue_loads(a_desc, b_desc, a_smem, b_smem, bars, k % NUM_STAGES, k + NUM_STAGES, row0, b_row0, nk,
                         BLOCK_K, TILE_BYTES)
            d_prev = warpgroup_mma_wait(num_outstanding=0, deps=[p_y])
        # d_prev is block nk-1 (nk odd) or nk-2 (nk even, block nk-1 left); every load is issued already.
        if nk % 2 == 0:
            p_x, sa_x, sb_x = _issue_mma(a_smem, b_smem, bars, nk - 1, zero, as_ptrs, bs_ptrs, stride_ask,
                                         stride_bsk, NUM_STAGES)
            acc = _promote(acc, d_prev, sa_prev, sb_prev, BLOCK_N)
            d_x = warpgroup_mma_wait(num_outstanding=0, deps=[p_x])
            acc = _promote(acc, d_x, sa_x, sb_x, BLOCK_N)
        else:
            acc = _promote(acc, d_prev, sa_prev, sb_prev, BLOCK_N)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(bars.index(i))

        # ---- epilogue: round once, store the segment's rows only -------------------------------------------------
        _store_rows(acc, out_ptr, row0, tn, seg_start, count, M, N, stride_om, stride_on, BLOCK_M, BLOCK_N,
                    out_layout)

    CONSUMER_WARPS = gl.constexpr(4)  # one warpgroup per consumer partition of the warp-specialized kernel
    CONSUMER_ROWS = gl.constexpr(64)  # rows of its tile per consumer warpgroup (one m64 wgmma)

    # ---- producer partition: 1 warp, TMA only -------------------------------------------------------------------
    @gluon.jit
    def _producer(a_desc, b_desc, a_smem, b_smem, ready, empty, offsets_ptr, counts_ptr, N, K, E,
                  as_desc, as_smem, stride_ask,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr,
                  BLOCK_E: gl.constexpr, NUM_STAGES: gl.constexpr, SCALES_TMA: gl.constexpr):
        e_layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        offs_e, counts, m_tiles, cum_tiles, total_m = _tile_table(counts_ptr, E, BLOCK_M, BLOCK_E, e_layout)
        num_n = gl.cdiv(N, BLOCK_N)
        nk = gl.cdiv(K, BLOCK_K)
        # FP8: one byte per element (+ the BLOCK_M float32 row scales with SCALES_TMA); OOB boxes count too
        TILE_BYTES: gl.constexpr = (BLOCK_M + BLOCK_N) * BLOCK_K + (4 * BLOCK_M if SCALES_TMA else 0)
        it = 0  # K blocks loaded so far (all tiles): stage = it % NUM_STAGES, ring pass = it // NUM_STAGES
        for tile_id in range(gl.program_id(0), total_m * num_n, gl.num_programs(0)):
            e, row0, tn, seg_start, count = _locate(tile_id, offs_e, counts, m_tiles, cum_tiles, total_m, num_n,
                                                    offsets_ptr, E, GROUP_M, BLOCK_M)
            b_row0 = e * N + tn * BLOCK_N
            for kb in range(nk):
                s = it % NUM_STAGES
                # Pass p of the ring waits for the consumers' release of pass p - 1; a fresh mbarrier counts as
                # having completed the phase before its first, so pass 0 waits on parity 1 and goes through.
                mbarrier.wait(empty.index(s), ((it // NUM_STAGES) & 1) ^ 1)
                bar = ready.index(s)
                mbarrier.expect(bar, TILE_BYTES)
                _tma_load(a_desc, [row0, kb * BLOCK_K], bar, a_smem.index(s))
                _tma_load(b_desc, [b_row0, kb * BLOCK_K], bar, b_smem.index(s))
                if SCALES_TMA:  # the flat MN-major scales: K block kb's rows start at kb * stride_ask
                    _tma_load(as_desc, [kb * stride_ask + row0], bar, as_smem.index(s))
                it += 1

    # ---- consumer partitions: one warpgroup each, wgmma + promotion + epilogue ---------------------------------
    @gluon.jit
    def _mma(a_smem, b_smem, ready, it, zero, HALF: gl.constexpr, NUM_STAGES: gl.constexpr):
        """Wait for the stage of global K block ``it`` and issue this warpgroup's wgmma chain on its 64-row slice of
        ``a`` asynchronously (fresh accumulator: ``use_acc=False``; ``zero`` only names the result's registers)."""
        s = it % NUM_STAGES
        mbarrier.wait(ready.index(s), (it // NUM_STAGES) & 1)
        a_view = a_smem.index(s).slice(HALF * CONSUMER_ROWS, CONSUMER_ROWS)
        return warpgroup_mma(a_view, b_smem.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)

    @gluon.jit
    def _issue_ws(a_smem, b_smem, as_smem, ready, it, zero, as_ptrs, bs_ptrs, kb, stride_ask, stride_bsk,
                  HALF: gl.constexpr, NUM_STAGES: gl.constexpr, SCALES_TMA: gl.constexpr, row_layout: gl.constexpr):
        """``_mma`` of global block ``it`` (the tile's block ``kb``), then its scales, used one step later: the row
        scales from the same stage (SCALES_TMA: the producer's TMA brought them with the tiles, and they are read
        before the stage is released) or from global memory, the weight scale from global memory (its latency hides
        behind the wgmma)."""
        part = _mma(a_smem, b_smem, ready, it, zero, HALF, NUM_STAGES)
        if SCALES_TMA:
            sa = as_smem.index(it % NUM_STAGES).slice(HALF * CONSUMER_ROWS, CONSUMER_ROWS).load(row_layout)
            sb = gl.load(bs_ptrs + kb * stride_bsk)
        else:
            sa, sb = _load_scales(as_ptrs, bs_ptrs, kb, stride_ask, stride_bsk)
        return part, sa, sb

    @gluon.jit
    def _release(empty, it, NUM_STAGES: gl.constexpr):
        """This warpgroup's wgmma on the stage of global K block ``it`` is complete: one arrival (thread 0 of the
        partition) of the two the producer waits for."""
        mbarrier.arrive(empty.index(it % NUM_STAGES), count=1)

    @gluon.jit
    def _consumer(a_smem, b_smem, ready, empty, as_ptr, bs_ptr, out_ptr, offsets_ptr, counts_ptr, M, N, K, E,
                  stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk, stride_om, stride_on,
                  HALF: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                  GROUP_M: gl.constexpr, BLOCK_E: gl.constexpr, NUM_STAGES: gl.constexpr, as_smem,
                  SCALES_TMA: gl.constexpr):
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[CONSUMER_WARPS, 1],
                                                             instr_shape=[16, BLOCK_N, 32])
        row_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
        e_layout: gl.constexpr = gl.BlockedLayout([1], [32], [CONSUMER_WARPS], [0])
        # Stores from the wgmma layout write 2 columns (4 bytes) per thread and row; a blocked layout with 8
        # consecutive columns per thread writes 16-byte vectors (one layout conversion per tile).
        TPW_N: gl.constexpr = BLOCK_N // 8
        out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_N, TPW_N], [CONSUMER_WARPS, 1], [1, 0])

        offs_e, counts, m_tiles, cum_tiles, total_m = _tile_table(counts_ptr, E, BLOCK_M, BLOCK_E, e_layout)
        num_n = gl.cdiv(N, BLOCK_N)
        nk = gl.cdiv(K, BLOCK_K)
        zero = gl.zeros([CONSUMER_ROWS, BLOCK_N], gl.float32, mma_layout)
        it = 0  # K blocks consumed so far (all tiles), in step with the producer's counter
        for tile_id in range(gl.program_id(0), total_m * num_n, gl.num_programs(0)):
            e, row0, tn, seg_start, count = _locate(tile_id, offs_e, counts, m_tiles, cum_tiles, total_m, num_n,
                                                    offsets_ptr, E, GROUP_M, BLOCK_M)
            row0 = row0 + HALF * CONSUMER_ROWS
            # Rows past the segment are computed but never stored: their scale loads are only clamped to [0, M).
            rows = row0 + gl.arange(0, CONSUMER_ROWS, layout=row_layout)
            as_ptrs = as_ptr + gl.minimum(gl.maximum(rows, 0), M - 1).to(gl.int64) * stride_asm
            bs_ptrs = bs_ptr + e.to(gl.int64) * stride_bse + ((tn * BLOCK_N) // 128) * stride_bsn

            acc = gl.zeros([CONSUMER_ROWS, BLOCK_N], gl.float32, mma_layout)
            # Block k's wgmma runs while block k-1 is promoted; pairs (k, k+1) so that no wgmma result is in flight
            # across a basic-block boundary (see the one-partition kernel).
            p_0, sa_prev, sb_prev = _issue_ws(a_smem, b_smem, as_smem, ready, it, zero, as_ptrs, bs_ptrs, 0,
                                              stride_ask, stride_bsk, HALF, NUM_STAGES, SCALES_TMA, row_layout)
            d_prev = warpgroup_mma_wait(num_outstanding=0, deps=[p_0])
            _release(empty, it, NUM_STAGES)
            for k in range(1, nk - 1, 2):
                p_x, sa_x, sb_x = _issue_ws(a_smem, b_smem, as_smem, ready, it + k, zero, as_ptrs, bs_ptrs, k,
                                            stride_ask, stride_bsk, HALF, NUM_STAGES, SCALES_TMA, row_layout)
                acc = _promote(acc, d_prev, sa_prev, sb_prev, BLOCK_N)             # block k-1 under block k
                p_y, sa_prev, sb_prev = _issue_ws(a_smem, b_smem, as_smem, ready, it + k + 1, zero, as_ptrs, bs_ptrs,
                                                  k + 1, stride_ask, stride_bsk, HALF, NUM_STAGES, SCALES_TMA,
                                                  row_layout)
                d_x = warpgroup_mma_wait(num_outstanding=1, deps=[p_x])   # block k done, k+1 still running
                _release(empty, it + k, NUM_STAGES)
                acc = _promote(acc, d_x, sa_x, sb_x, BLOCK_N)                      # block k under block k+1
                d_prev = warpgroup_mma_wait(num_outstanding=0, deps=[p_y])
                _release(empty, it + k + 1, NUM_STAGES)
            # d_prev is block nk-1 (nk odd) or nk-2 (nk even, block nk-1 left).
            if nk % 2 == 0:
                p_x, sa_x, sb_x = _issue_ws(a_smem, b_smem, as_smem, ready, it + nk - 1, zero, as_ptrs, bs_ptrs,
                                            nk - 1, stride_ask, stride_bsk, HALF, NUM_STAGES, SCALES_TMA, row_layout)
                acc = _promote(acc, d_prev, sa_prev, sb_prev, BLOCK_N)
                d_x = warpgroup_mma_wait(num_outstanding=0, deps=[p_x])
                _release(empty, it + nk - 1, NUM_STAGES)
                acc = _promote(acc, d_x, sa_x, sb_x, BLOCK_N)
            else:
                acc = _promote(acc, d_prev, sa_prev, sb_prev, BLOCK_N)
            it += nk

            # Epilogue: round once, store this warpgroup's rows of the segment only.
            _store_rows(acc, out_ptr, row0, tn, seg_start, count, M, N, stride_om, stride_on, CONSUMER_ROWS, BLOCK_N,
                        out_layout)

    @gluon.jit
    def _grouped_gemm_fp8_gluon_ws_kernel(
        # the operands of _grouped_gemm_fp8_gluon_kernel, in the same order
        a_desc, as_ptr, b_desc, bs_ptr, out_ptr, offsets_ptr, counts_ptr, M, N, K, E,
        stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk, stride_om, stride_on,
        BLOCK_M: gl.constexpr,        # must be 128: two consumer warpgroups of 64 rows
        BLOCK_N: gl.constexpr,        # divides 128 (one weight scale per tile and K block), multiple of 8
        BLOCK_K: gl.constexpr,        # must be 128: one promotion per scale block
        GROUP_M: gl.constexpr,        # m-tiles sharing one sweep of n-tiles (L2 reuse of the weight tiles)
        BLOCK_E: gl.constexpr,        # power of two >= max(E, 128) (per-expert tile counts live in registers)
        NUM_STAGES: gl.constexpr,     # TMA ring depth
        num_warps: gl.constexpr,      # must be 4: the default partition is consumer warpgroup 0
        as_desc=None,                       # SCALES_TMA: 1-D descriptor over the MN-major row scales, block BLOCK_M
        SCALES_TMA: gl.constexpr = False,   # row scales through the TMA ring (MN-major, 16-byte aligned)
        PRODUCER_REGS: gl.constexpr = 40,   # setmaxnreg of the producer's warpgroup
        CONSUMER_REGS: gl.constexpr = 232,  # setmaxnreg of consumer warpgroup 1 (warpgroup 0 gets the rest)
    ):
        gl.static_assert(BLOCK_K == 128, "BLOCK_K must equal the 128-wide scale block")
        gl.static_assert(BLOCK_M == 2 * CONSUMER_ROWS, "BLOCK_M must be 128: two consumer warpgroups of 64 rows")
        gl.static_assert(num_warps == CONSUMER_WARPS, "num_warps must be 4: the default partition is one warpgroup")
        gl.static_assert(BLOCK_N <= 128 and 128 % BLOCK_N == 0, "BLOCK_N must divide 128")
        gl.static_assert(NUM_STAGES >= 2, "at least two stages")

        a_smem = gl.allocate_shared_memory(a_desc.dtype, [NUM_STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
        b_smem = gl.allocate_shared_memory(b_desc.dtype, [NUM_STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
        if SCALES_TMA:
            as_smem = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, BLOCK_M], as_desc.layout)
        else:  # a placeholder the partitions never touch
            as_smem = gl.allocate_shared_memory(gl.float32, [1, 1], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=1)   # the producer's expect (+ the TMA bytes)
            mbarrier.init(empty.index(i), count=2)   # one arrival per consumer warpgroup
        fence_async_shared()  # barrier initialisation visible to the async proxy (TMA) before its first use

        gl.warp_specialize([
            (_consumer, (a_smem, b_smem, ready, empty, as_ptr, bs_ptr, out_ptr, offsets_ptr, counts_ptr, M, N, K, E,
                         stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk, stride_om, stride_on,
                         0, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, BLOCK_E, NUM_STAGES, as_smem, SCALES_TMA)),
            (_consumer, (a_smem, b_smem, ready, empty, as_ptr, bs_ptr, out_ptr, offsets_ptr, counts_ptr, M, N, K, E,
                         stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk, stride_om, stride_on,
                         1, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, BLOCK_E, NUM_STAGES, as_smem, SCALES_TMA)),
            (_producer, (a_desc, b_desc, a_smem, b_smem, ready, empty, offsets_ptr, counts_ptr, N, K, E,
                         as_desc, as_smem, stride_ask, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, BLOCK_E, NUM_STAGES,
                         SCALES_TMA)),
        ], [CONSUMER_WARPS, 1], [CONSUMER_REGS, PRODUCER_REGS])
