"""Pure-torch reference of every fp8_deep op: the executable spec, and the CPU path where Triton cannot run.

Numerics (see ``shared/docs/CONTRACTS.md``):

* Scales are *dequantization* scales, ``x ~= q.float() * s``.
* Weights, 128x128 blocks, DeepGEMM's ``per_block_cast_to_fp8``: ``amax = max(|w_block|)`` over the block's real
  elements, clamped to 1e-4; ``s = amax / 448`` (IEEE division); optionally rounded *up* to a power of two (UE8M0);
  ``q = fp8(w_f32 * (1 / s))`` -- a reciprocal multiply, as the reference does, not a division. Every division
  here is IEEE round-to-nearest (torch's CUDA division by a Python scalar is not: see ``_ieee_div``). No clamp is needed:
  ``|w| * (1/s) <= 448 * (1 + 2^-23)`` which rounds to 448.
* Activations, 1x``group_size`` groups, vLLM's ``per_token_group_quant_fp8``: ``amax = max(max|x|, eps)``,
  ``s = amax / 448`` (optionally UE8M0: ``max(s, 1e-10)`` rounded up, the floor vLLM's CUDA op applies),
  ``q = fp8(clamp(x / s, -448, 448))`` -- a true division and an explicit clamp, as vLLM does.
* UE8M0 rounding is exact bit arithmetic (keep the exponent, add one when the mantissa is non-zero), not
  ``exp2(ceil(log2(s)))``, whose approximate ``log2`` can miss at exact powers of two.
* Non-finite policy: a weight block or an activation group holding any NaN or +-Inf gets scale NaN and every one of
  its FP8 values NaN, so a poisoned block never dequantizes to finite-looking numbers. (torch's own float32 -> FP8
  cast saturates on the CPU and returns NaN on the GPU past 464; this policy makes both devices and the Triton
  kernels agree.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .numerics import ACT_EPS, BLOCK, FP8_DTYPE, FP8_MAX, UE8M0_ACT_SCALE_FLOOR, WEIGHT_AMAX_EPS, cdiv

__all__ = [
    "round_up_ue8m0",
    "quantize_weight_blockwise",
    "quantize_activation",
    "dequantize_blockwise",
    "dequantize_activation",
    "block_scaled_matmul",
    "grouped_gemm_fp8",
    "silu_mul",
    "silu_mul_quantize",
    "permute_rows",
    "moe_align_block_size",
    "moe_combine",
    "moe_forward_bf16",
    "moe_forward_fp8_emulated",
    "kept_local_ids",
    "moe_decode_gemm1",
    "moe_decode_gemm2",
    "quantize_gate_up",
    "dequantize_gate_up",
    "quantize_activation_t",
    "silu_mul_backward",
    "k_grouped_gemm_fp8",
    "moe_forward_float",
    "moe_backward",
]


def round_up_ue8m0(s: torch.Tensor) -> torch.Tensor:
    """Round positive float32 scales up to the next power of two (exact; NaN and +Inf pass through)."""
    bits = s.float().contiguous().view(torch.int32)
    exp = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    up = torch.where(mant != 0, exp + 1, exp) << 23  # 0xFE + 1 -> +Inf: rounding up past FLT_MAX
    out = up.view(torch.float32)
    return torch.where(torch.isfinite(s), out, s.float())


def _ieee_div(a: torch.Tensor, b) -> torch.Tensor:
    """Correctly rounded ``a / b``. torch's CUDA ``tensor / python_scalar`` multiplies by the scalar's reciprocal
    (``amax / 448`` then differs from IEEE division in the last bit for about half the blocks); a tensor divisor
    keeps the true division on every device."""
    return a / torch.as_tensor(b, dtype=a.dtype, device=a.device).expand_as(a).contiguous()


def _scale_from_amax(amax: torch.Tensor, scale_fmt: str, ue8m0_floor: float = 0.0) -> torch.Tensor:
    s = _ieee_div(amax, FP8_MAX)
    return round_up_ue8m0(s.clamp(min=ue8m0_floor)) if scale_fmt == "ue8m0" else s


def quantize_weight_blockwise(w: torch.Tensor, block_size=(BLOCK, BLOCK), scale_fmt: str = "fp32"):
    """Reference 128x128 weight quantization.

    w: ``(N, K)`` or ``(E, N, K)``, bf16/fp16/fp32, any strides.
    Returns ``q`` float8_e4m3fn, same shape, contiguous; ``s`` float32 ``(..., ceil(N/bn), ceil(K/bk))`` contiguous.
    """
    bn, bk = block_size
    squeeze = w.dim() == 2
    w3 = w.unsqueeze(0) if squeeze else w
    E, N, K = w3.shape
    nb, kb = cdiv(N, bn), cdiv(K, bk)
    wf = w3.float()
    # Pad with zeros: a zero never raises |amax|, so the edge block's amax covers only its real elements.
    padded = torch.zeros(E, nb * bn, kb * bk, dtype=torch.float32, device=w.device)
    padded[:, :N, :K] = wf
    blocks = padded.view(E, nb, bn, kb, bk)
    a = blocks.abs()
    bad = ~torch.isfinite(a).all(dim=4).all(dim=2)  # (E, nb, kb)
    amax = a.nan_to_num(0.0, 0.0, 0.0).amax(dim=(2, 4)).clamp(min=WEIGHT_AMAX_EPS)
    s = _scale_from_amax(amax, scale_fmt)
    s = torch.where(bad, torch.full_like(s, float("nan")), s)
    inv = _ieee_div(torch.ones_like(s), s)
    qf = blocks * inv[:, :, None, :, None]
    qf = torch.where(bad[:, :, None, :, None], torch.full_like(qf, float("nan")), qf)
    q = qf.reshape(E, nb * bn, kb * bk)[:, :N, :K].to(FP8_DTYPE).contiguous()
    if squeeze:
        return q[0], s[0].contiguous()
    return q, s.contiguous()


def quantize_activation(x: torch.Tensor, group_size: int = BLOCK, scale_fmt: str = "fp32", eps: float = ACT_EPS):
    """Reference 1 x group_size activation quantization (vLLM ``per_token_group_quant_fp8``).

    x: ``(..., K)``; ``K`` need not divide by ``group_size`` (the last group covers what is left).
    Returns ``q`` float8_e4m3fn ``(..., K)`` contiguous and row-major float32 scales ``(..., ceil(K/group_size))``.
    """
    K = x.shape[-1]
    G = cdiv(K, group_size)
    lead = x.shape[:-1]
    xf = x.reshape(-1, K).float()
    M = xf.shape[0]
    padded = torch.zeros(M, G * group_size, dtype=torch.float32, device=x.device)
    padded[:, :K] = xf
    g = padded.view(M, G, group_size)
    a = g.abs()
    bad = ~torch.isfinite(a).all(dim=2)
    amax = a.nan_to_num(0.0, 0.0, 0.0).amax(dim=2).clamp(min=eps)
    s = _scale_from_amax(amax, scale_fmt, UE8M0_ACT_SCALE_FLOOR)
    s = torch.where(bad, torch.full_like(s, float("nan")), s)
    qf = (g / s[:, :, None]).clamp(-FP8_MAX, FP8_MAX)
    qf = torch.where(bad[:, :, None], torch.full_like(qf, float("nan")), qf)
    q = qf.reshape(M, G * group_size)[:, :K].to(FP8_DTYPE)
    return q.reshape(*lead, K).contiguous(), s.reshape(*lead, G).contiguous()


def dequantize_blockwise(q: torch.Tensor, s: torch.Tensor, block_size=(BLOCK, BLOCK)) -> torch.Tensor:
    """``q * s`` with each scale broadcast over its ``block_size`` block; float32 out, shape of ``q``.

    ``block_size=(1, 128)`` dequantizes 1x128 activation groups.
    """
    bn, bk = block_size
    N, K = q.shape[-2], q.shape[-1]
    s_full = s.float().repeat_interleave(bn, dim=-2)[..., :N, :].repeat_interleave(bk, dim=-1)[..., :K]
    return q.float() * s_full


def dequantize_activation(q: torch.Tensor, s: torch.Tensor, group_size: int = BLOCK) -> torch.Tensor:
    K = q.shape[-1]
    return q.float() * s.float().repeat_interleave(group_size, dim=-1)[..., :K]


ACCUMULATE = ("fp32", "tensor_core")


def block_scaled_matmul(a, a_scale, b, b_scale, accumulate: str = "fp32") -> torch.Tensor:
    """``deq(a) @ deq(b).T`` in float32, ``(M, N)``: a FP8 ``(M, K)`` with 1x128 scales ``(M, ceil(K/128))``, b FP8
    ``(N, K)`` with 128x128 scales ``(ceil(N/128), ceil(K/128))``.

    ``accumulate="fp32"``: dequantize and multiply in float32 -- the recipe's math, and what the kernels compute
    under the Triton interpreter. ``"tensor_core"`` (CUDA, SM89+): the GPU kernels' arithmetic -- each 128-wide K
    block's raw FP8 product from the FP8 tensor cores (``torch._scaled_mm``, unit scales), which keep only ~14 bits
    while accumulating inside the block (H100: 1.5-3e-4 of the row's magnitude off the exact product), then scaled
    and added in float32 block after block: the FP32 promotion every 128 of K of DeepSeek-V3, DeepGEMM and ours.
    """
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate must be one of {ACCUMULATE}, got {accumulate!r}")
    if accumulate == "fp32":
        return dequantize_activation(a, a_scale) @ dequantize_blockwise(b, b_scale).t()
    if not a.is_cuda:
        raise ValueError("accumulate='tensor_core' models the GPU's FP8 tensor cores: it needs CUDA tensors")
    M, K = a.shape
    N = b.shape[0]
    kb = cdiv(K, BLOCK)
    # cuBLAS FP8 wants dims in multiples of 16; zero rows/columns and a zero K tail add exact zeros (as the kernels'
    # masked loads do)
    a_p = torch.zeros(cdiv(M, 16) * 16, kb * BLOCK, dtype=FP8_DTYPE, device=a.device)
    b_p = torch.zeros(cdiv(N, 16) * 16, kb * BLOCK, dtype=FP8_DTYPE, device=a.device)
    a_p[:M, :K] = a
    b_p[:N, :K] = b
    one = torch.ones((), device=a.device)
    sb = b_scale.float().repeat_interleave(BLOCK, dim=0)[:N]  # (N, kb)
    acc = torch.zeros(M, N, dtype=torch.float32, device=a.device)
    for k in range(kb):
        ks = slice(k * BLOCK, (k + 1) * BLOCK)
        part = torch._scaled_mm(a_p[:, ks].contiguous(), b_p[:, ks].contiguous().t(), scale_a=one, scale_b=one,
                                out_dtype=torch.float32, use_fast_accum=True)[:M, :N]
        acc = acc + part * (a_scale[:, k, None].float() * sb[None, :, k])
    return acc


def grouped_gemm_fp8(a, a_scale, b, b_scale, m_indices, out_dtype=torch.bfloat16, accumulate: str = "fp32"):
    """FP8-emulated grouped GEMM (DeepGEMM contiguous layout semantics), float32 math (``accumulate``: see
    ``block_scaled_matmul``).

    a: FP8 ``(M, K)``, a_scale float32 ``(M, ceil(K/128))`` (any strides); b: FP8 ``(E, N, K)``,
    b_scale float32 ``(E, ceil(N/128), ceil(K/128))``; m_indices int ``(M,)``, expert of each row, -1 = padding.
    Returns ``(M, N)`` in ``out_dtype``: ``out[i] = dequant(a[i]) @ dequant(b[m_indices[i]]).T``; padding rows are 0.
    """
    M, N = a.shape[0], b.shape[1]
    out = torch.zeros(M, N, dtype=torch.float32, device=a.device)
    for e in torch.unique(m_indices).tolist():
        if e < 0:
            continue
        rows = (m_indices == e).nonzero().flatten()
        out[rows] = block_scaled_matmul(a[rows], a_scale[rows], b[e], b_scale[e], accumulate)
    return out.to(out_dtype)


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """SwiGLU on ``h = [gate | up]`` ``(M, 2I)``: ``silu(gate).to(h.dtype) * up`` (vLLM's rounding), ``(M, I)``."""
    inter = h.shape[-1] // 2
    gate, up = h[..., :inter], h[..., inter:]
    return F.silu(gate.float()).to(h.dtype) * up


def silu_mul_quantize(h: torch.Tensor, group_size: int = BLOCK, scale_fmt: str = "fp32", eps: float = ACT_EPS):
    """SwiGLU then 1 x group_size requantization: ``quantize_activation(silu_mul(h))`` -> (q, row-major scales)."""
    return quantize_activation(silu_mul(h), group_size, scale_fmt, eps)


def permute_rows(q: torch.Tensor, scale: torch.Tensor, sorted_token_ids: torch.Tensor, top_k: int):
    """Rows of the quantized hidden states in the plan's order: row ``r`` holds token ``sorted_token_ids[r] // top_k``;
    padding rows (sentinel ``>= T * top_k``) are zero bytes with zero scales. Returns (q_perm, row-major scales)."""
    T = q.shape[0]
    ids = sorted_token_ids.long()
    pad = ids >= T * top_k
    tok = torch.where(pad, torch.zeros_like(ids), ids // top_k)
    qp = torch.where(pad[:, None], torch.zeros_like(q.view(torch.uint8)[tok]), q.view(torch.uint8)[tok])
    sp = torch.where(pad[:, None], torch.zeros_like(scale[tok]), scale[tok].float())
    return qp.view(FP8_DTYPE), sp


def moe_align_block_size(topk_ids: torch.Tensor, block_size: int, num_experts: int, expert_map=None):
    """vLLM ``moe_align_block_size`` semantics with a stable (deterministic) order inside each expert.

    Returns int32 ``(sorted_token_ids, expert_ids, num_tokens_post_padded)``; buffers are sized for the worst case
    ``numel + num_experts * (block_size - 1)`` (rounded to ``block_size``), sentinel ``topk_ids.numel()`` for
    padding, ``expert_ids`` -1 past the used blocks. With ``expert_map`` the ids are global and mapped to local ids;
    choices routed to experts mapped to -1 are dropped.
    """
    flat = topk_ids.flatten().long()
    numel = flat.numel()
    if expert_map is not None:
        flat = torch.where(flat >= 0, expert_map.long()[flat.clamp(min=0)], flat)
    cap = cdiv(numel + num_experts * (block_size - 1), block_size) * block_size
    sorted_ids = torch.full((cap,), numel, dtype=torch.int32, device=topk_ids.device)
    expert_ids = torch.full((cap // block_size,), -1, dtype=torch.int32, device=topk_ids.device)
    pos = 0
    for e in range(num_experts):
        idx = (flat == e).nonzero().flatten()
        n = idx.numel()
        if n == 0:
            continue
        sorted_ids[pos:pos + n] = idx.to(torch.int32)
        nblk = cdiv(n, block_size)
        expert_ids[pos // block_size: pos // block_size + nblk] = e
        pos += nblk * block_size
    return sorted_ids, expert_ids, torch.tensor([pos], dtype=torch.int32, device=topk_ids.device)


def moe_combine(expert_out: torch.Tensor, inv_perm: torch.Tensor, topk_weights: torch.Tensor, out_dtype=None):
    """``out[t] = sum_k topk_weights[t, k] * expert_out[inv_perm[t, k]]`` in float32, k ascending; rows -1 skipped."""
    T, k = inv_perm.shape
    acc = torch.zeros(T, expert_out.shape[-1], dtype=torch.float32, device=expert_out.device)
    for j in range(k):
        rows = inv_perm[:, j].long()
        valid = rows >= 0
        contrib = topk_weights[:, j].float()[:, None] * expert_out[rows.clamp(min=0)].float()
        acc += torch.where(valid[:, None], contrib, torch.zeros_like(contrib))
    return acc.to(out_dtype or expert_out.dtype)


def kept_local_ids(topk_ids: torch.Tensor, num_experts: int, expert_map=None) -> torch.Tensor:
    """Local expert of each choice, -1 where the choice is dropped: the alignment kernel's rule (a global id outside
    ``expert_map``, a map entry -1 or outside ``[0, num_experts)``, an id outside ``[0, num_experts)`` without a map).
    int64, the shape of ``topk_ids``."""
    ids = topk_ids.long()
    if expert_map is not None:
        g_ok = (ids >= 0) & (ids < expert_map.numel())
        ids = torch.where(g_ok, expert_map.long()[ids.clamp(0, expert_map.numel() - 1)], torch.full_like(ids, -1))
    return torch.where((ids >= 0) & (ids < num_experts), ids, torch.full_like(ids, -1))


def _moe(hidden, topk_weights, topk_ids, expert_map, num_experts, expert_fn):
    T, H = hidden.shape
    ids = kept_local_ids(topk_ids, num_experts, expert_map)
    acc = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
    per_choice = torch.zeros(T, ids.shape[1], H, dtype=torch.float32, device=hidden.device)
    for e in range(num_experts):
        t_idx, k_idx = (ids == e).nonzero(as_tuple=True)
        if t_idx.numel() == 0:
            continue
        per_choice[t_idx, k_idx] = expert_fn(e, t_idx).float()
    for j in range(ids.shape[1]):
        acc += topk_weights[:, j].float()[:, None] * per_choice[:, j]
    return acc.to(hidden.dtype)


def moe_forward_bf16(hidden, w13, w2, topk_weights, topk_ids, expert_map=None):
    """BF16 MoE: per expert ``h = x @ w13[e].T`` (bf16 out), ``silu_mul``, ``o = a @ w2[e].T`` (bf16), f32 combine."""
    dt = hidden.dtype

    def expert(e, t_idx):
        h = hidden[t_idx] @ w13[e].to(dt).t()
        return silu_mul(h) @ w2[e].to(dt).t()

    return _moe(hidden, topk_weights, topk_ids, expert_map, w13.shape[0], expert)


def moe_forward_fp8_emulated(hidden, w13, w2, topk_weights, topk_ids, *, w13_scale=None, w2_scale=None,
                             expert_map=None, scale_fmt="fp32", accumulate="fp32"):
    """The FP8 recipe with float32 math: the same quantizations as the kernels, nothing else approximated.

    Activations 1x128 (``scale_fmt``), weights 128x128 (quantized here when given in high precision), GEMM outputs
    rounded to the hidden dtype as the kernels store them, SwiGLU as ``silu_mul`` then re-quantized 1x128.
    ``accumulate``: the GEMMs' arithmetic, see ``block_scaled_matmul`` (``"tensor_core"`` models the GPU's
    in-block FP8 accumulation, which moves ``h`` by up to ~3e-4 relative and so which intermediate values cross an
    FP8 rounding boundary in the re-quantization).
    """
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate must be one of {ACCUMULATE}, got {accumulate!r}")
    dt = hidden.dtype
    if w13.dtype != FP8_DTYPE:
        w13, w13_scale = quantize_weight_blockwise(w13, scale_fmt=scale_fmt)
        w2, w2_scale = quantize_weight_blockwise(w2, scale_fmt=scale_fmt)
    qx, sx = quantize_activation(hidden, scale_fmt=scale_fmt)

    def expert(e, t_idx):
        h = block_scaled_matmul(qx[t_idx], sx[t_idx], w13[e], w13_scale[e], accumulate).to(dt)
        qa, sa = quantize_activation(silu_mul(h), scale_fmt=scale_fmt)
        return block_scaled_matmul(qa, sa, w2[e], w2_scale[e], accumulate).to(dt)

    return _moe(hidden, topk_weights, topk_ids, expert_map, w13.shape[0], expert)


def moe_decode_gemm1(hidden, topk_ids, w13, w13_scale, *, expert_map=None, scale_fmt="fp32", eps=ACT_EPS,
                     accumulate="fp32"):
    """The decode forward's first GEMM (``fp8_deep.kernels.decode``): row ``p = t * top_k + j`` of ``h (P, 2I)``
    bfloat16 is ``quantize_activation(hidden)[t]`` times the choice's expert ``w13[e]`` (block-scaled, float32
    promotion), rows of dropped choices 0; and ``inv (T, top_k)`` int32, ``p`` or -1 (dropped), the combine's map."""
    T, k = topk_ids.shape
    ids = kept_local_ids(topk_ids, w13.shape[0], expert_map).reshape(-1)
    qx, sx = quantize_activation(hidden, scale_fmt=scale_fmt, eps=eps)
    flat = torch.arange(T * k, device=hidden.device)
    h = grouped_gemm_fp8(qx[flat // k], sx[flat // k], w13, w13_scale, ids, accumulate=accumulate)
    return h, torch.where(ids >= 0, flat, -1).view(T, k).int()


def moe_decode_gemm2(h, topk_ids, w2, w2_scale, *, expert_map=None, scale_fmt="fp32", eps=ACT_EPS,
                     accumulate="fp32"):
    """The decode forward's second GEMM: row ``p`` of ``o (P, H)`` bfloat16 is ``silu_mul_quantize(h)[p]`` times
    ``w2[e]`` of the choice's expert; rows of dropped choices 0."""
    ids = kept_local_ids(topk_ids, w2.shape[0], expert_map).reshape(-1)
    qa, sa = silu_mul_quantize(h, scale_fmt=scale_fmt, eps=eps)
    return grouped_gemm_fp8(qa, sa, w2, w2_scale, ids, accumulate=accumulate)


# ------------------------------------------------------------------------------------------------ training (backward)
# The backward of the FP8 MoE follows DeepSeek-V3's recipe (technical report, section 3.3): every GEMM reads FP8 with
# FP32 promotion every 128 of K -- dgrad with the gradient quantized in 1x128 groups along its row and the weights'
# transposed 128x128 blocks, wgrad with both operands in 128x1 tiles (groups of 128 consecutive rows of an expert
# segment, per column: the reduction runs over tokens) -- and the SwiGLU input is cached in FP8 and SwiGLU is
# recomputed. The functions below are the executable spec of each step; ``moe_backward`` composes them.


def quantize_gate_up(h: torch.Tensor, group_size: int = BLOCK, scale_fmt: str = "fp32", eps: float = ACT_EPS):
    """FP8 cache of the SwiGLU input ``h = [gate | up]`` ``(M, 2I)``: each half quantized in 1 x group_size groups
    on its own (a group never straddles gate and up, whatever I is).

    Returns ``q`` float8_e4m3fn ``(M, 2I)`` contiguous and row-major float32 scales ``(M, 2G)``, ``G = ceil(I /
    group_size)``: columns ``[0, G)`` are the gate's groups, ``[G, 2G)`` the up projection's."""
    inter = h.shape[-1] // 2
    qg, sg = quantize_activation(h[..., :inter], group_size, scale_fmt, eps)
    qu, su = quantize_activation(h[..., inter:], group_size, scale_fmt, eps)
    return torch.cat([qg, qu], -1).contiguous(), torch.cat([sg, su], -1).contiguous()


def dequantize_gate_up(q: torch.Tensor, s: torch.Tensor, group_size: int = BLOCK) -> torch.Tensor:
    """Inverse of ``quantize_gate_up``: float32 ``(M, 2I)``."""
    inter = q.shape[-1] // 2
    G = s.shape[-1] // 2
    return torch.cat([dequantize_activation(q[..., :inter], s[..., :G], group_size),
                      dequantize_activation(q[..., inter:], s[..., G:], group_size)], -1)


def quantize_activation_t(x: torch.Tensor, x_scale=None, group_size: int = BLOCK, scale_fmt: str = "fp32",
                          eps: float = ACT_EPS):
    """128x1 tiles for a wgrad operand: ``x`` ``(M, C)`` -- high precision, or FP8 with 1 x group_size row scales
    ``x_scale`` ``(M, ceil(C/group_size))`` (any strides), which is dequantized first (``q * s`` in float32: the
    re-tiling of a cached FP8 activation) -- quantized in groups of ``group_size`` consecutive rows per column.

    Returns ``q_t`` float8_e4m3fn ``(C, M)`` contiguous (``x``'s transpose: rows become the K-major reduction axis)
    and float32 ``s_t`` ``(C, ceil(M/group_size))`` (row-major here; kernels may write any strides). Math per group:
    ``quantize_activation``'s (``amax = max(max|x|, eps)``, ``s = amax / 448``, ``q = fp8(clamp(x / s))``)."""
    xf = dequantize_activation(x, x_scale, group_size) if x_scale is not None else x.float()
    return quantize_activation(xf.t(), group_size, scale_fmt, eps)


def silu_mul_backward(h: torch.Tensor, grad_a: torch.Tensor):
    """Backward of ``a = silu(gate) * up`` in float32: ``h = [gate | up]`` ``(M, 2I)``, ``grad_a`` ``(M, I)``.

    Returns float32 (float64 for float64 input) ``(grad_h (M, 2I), a (M, I))`` with ``grad_gate = grad_a * up * sig(g) * (1 + g * (1 - sig(g)))``,
    ``grad_up = grad_a * silu(g)`` and the recomputed ``a``."""
    inter = h.shape[-1] // 2
    f = torch.promote_types(h.dtype, torch.float32)  # float64 stays float64 (gradcheck of the exact math)
    g, u = h[..., :inter].to(f), h[..., inter:].to(f)
    sig = torch.sigmoid(g)
    silu = g * sig
    ga = grad_a.to(f)
    return torch.cat([ga * u * (sig * (1 + g * (1 - sig))), ga * silu], -1), silu * u


def k_grouped_gemm_fp8(a_t, a_t_scale, b_t, b_t_scale, expert_offsets, expert_counts, group_size: int = BLOCK):
    """The wgrad GEMM, grouped along K (= the rows of the expert segments), float32 math.

    a_t: FP8 ``(P, M)``, b_t: FP8 ``(Q, M)`` (K-major: M contiguous), scales float32 ``(P, ceil(M/128))`` and
    ``(Q, ceil(M/128))`` (any strides) of 128x1 tiles, i.e. of ``group_size`` consecutive rows of M per column;
    expert_offsets / expert_counts int ``(E,)``: expert ``e`` owns columns ``[off_e, off_e + count_e)`` of M
    (segments start at multiples of ``group_size``, so no group straddles two experts).

    Returns float32 ``(E, P, Q)``: ``out[e] = deq(a_t)[:, seg_e] @ deq(b_t)[:, seg_e].T`` (zeros for empty experts)."""
    A = dequantize_activation(a_t, a_t_scale, group_size)
    B = dequantize_activation(b_t, b_t_scale, group_size)
    E = expert_offsets.numel()
    out = torch.zeros(E, A.shape[0], B.shape[0], dtype=torch.float32, device=a_t.device)
    for e, (off, cnt) in enumerate(zip(expert_offsets.tolist(), expert_counts.tolist())):
        if cnt > 0:
            out[e] = A[:, off:off + cnt] @ B[:, off:off + cnt].t()
    return out


def _silu_mul_exact(h):
    inter = h.shape[-1] // 2
    return F.silu(h[..., :inter]) * h[..., inter:]


def moe_forward_float(hidden, w13, w2, topk_weights, topk_ids, expert_map=None):
    """The MoE in the inputs' own precision with no rounding between steps (float64 inputs: the exact function the
    FP8 recipe approximates; differentiable with autograd, for ``torch.autograd.gradcheck``)."""
    ids = kept_local_ids(topk_ids, w13.shape[0], expert_map)
    out = torch.zeros_like(hidden)
    for e in range(w13.shape[0]):
        t_idx, k_idx = (ids == e).nonzero(as_tuple=True)
        if t_idx.numel():
            o = _silu_mul_exact(hidden[t_idx] @ w13[e].t()) @ w2[e].t()
            out = out.index_add(0, t_idx, topk_weights[t_idx, k_idx][:, None].to(o.dtype) * o)
    return out


def moe_backward(grad_out, hidden, w13, w2, topk_weights, topk_ids, *, expert_map=None, scale_fmt="fp32",
                 quantize=True, out_dtype=None):
    """Gradients of the MoE layer ``(grad_hidden, grad_w13, grad_w2, grad_topk_weights)``, step by step as the FP8
    training path computes them (``quantize=True``), or the exact float math (``quantize=False``: every quantization
    and rounding is the identity; with float64 inputs this is the analytic gradient of ``moe_forward_float``).

    The recipe, per expert ``e`` with its rows in ascending flat choice order ``t * top_k + j`` (the routing plan's):
      forward (recomputed here): ``x_q = deq(q_1x128(x))``, ``W = deq(q_128x128(w))``, ``h = rnd(x_q @ W13^T)``,
        cached as ``h_c = dequantize_gate_up(quantize_gate_up(h))``;
      ``dy_q = deq(q_1x128(grad_out))`` per token; ``g = rnd(dy_q[rows] @ W2)`` (dgrad of GEMM2 on the *unweighted*
        gradient rows); ``(dh_raw, a) = silu_mul_backward(h_c, g)`` with the row weight ``w`` applied first:
        ``grad_topk_weights = sum_i g * a`` (float32), ``dh = silu_mul_backward(h_c, w * g)``;
      ``grad_x`` rows ``= rnd(deq(q_1x128(dh)) @ W13)``, summed over each token's choices in float32, j ascending;
      ``grad_w2[e] = deq(q_t(dy_q[rows])) @ deq(q_t(w * a)).T``, ``grad_w13[e] = deq(q_t(dh)) @ deq(q_t(x_q[rows])).T``
        with ``q_t`` = ``quantize_activation_t`` (128x1 tiles along the segment's rows).
    ``rnd`` rounds to ``hidden.dtype`` (GEMM outputs are stored in it). Weight gradients are float32 here
    (``out_dtype`` casts them); ``grad_hidden`` is in ``hidden.dtype``, ``grad_topk_weights`` float32."""
    dt = hidden.dtype
    T, H = hidden.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    ids = kept_local_ids(topk_ids, E, expert_map)
    f32 = torch.float32 if quantize else torch.promote_types(dt, torch.float32)

    if quantize:
        def q1x128(t):  # quantize 1x128 along rows, dequantize
            return dequantize_activation(*quantize_activation(t, scale_fmt=scale_fmt))

        def qt(t):  # 128x1 tiles along the rows, dequantized and transposed back to (C, n)
            return dequantize_activation(*quantize_activation_t(t, scale_fmt=scale_fmt))

        def rnd(t):
            return t.to(dt).to(f32)

        def cache_h(h):
            return dequantize_gate_up(*quantize_gate_up(h.to(dt), scale_fmt=scale_fmt))

        W13 = dequantize_blockwise(*quantize_weight_blockwise(w13, scale_fmt=scale_fmt)) \
            if w13.dtype != FP8_DTYPE else None
        W2 = dequantize_blockwise(*quantize_weight_blockwise(w2, scale_fmt=scale_fmt)) \
            if w2.dtype != FP8_DTYPE else None
    else:
        def q1x128(t):
            return t.to(f32)

        def qt(t):
            return t.to(f32).t()

        rnd = cache_h = q1x128
        W13, W2 = w13.to(f32), w2.to(f32)
    if W13 is None or W2 is None:
        raise TypeError("moe_backward needs the high-precision master weights (the gradients are theirs)")
    x_q = q1x128(hidden)
    dy_q = q1x128(grad_out)
    tw = topk_weights.to(f32)

    g_x = torch.zeros(T, ids.shape[1], H, dtype=f32, device=hidden.device)
    g_w13 = torch.zeros(E, two_i, H, dtype=f32, device=hidden.device)
    g_w2 = torch.zeros(E, H, inter, dtype=f32, device=hidden.device)
    g_tw = torch.zeros(T, ids.shape[1], dtype=f32, device=hidden.device)
    for e in range(E):
        t_idx, k_idx = (ids == e).nonzero(as_tuple=True)
        if t_idx.numel() == 0:
            continue
        xe = x_q[t_idx]
        h_c = cache_h(rnd(xe @ W13[e].t()))
        g = rnd(dy_q[t_idx] @ W2[e])
        w = tw[t_idx, k_idx][:, None]
        _, a = silu_mul_backward(h_c, g)
        g_tw[t_idx, k_idx] = (g * a.to(f32)).sum(-1)
        dh, _ = silu_mul_backward(h_c, w * g)
        dh = dh.to(f32)
        g_x[t_idx, k_idx] = rnd(q1x128(dh) @ W13[e])
        g_w2[e] = qt(dy_q[t_idx]) @ qt(w * a.to(f32)).t()
        g_w13[e] = qt(dh) @ qt(xe).t()
    gx = torch.zeros(T, H, dtype=f32, device=hidden.device)
    for j in range(ids.shape[1]):
        gx = gx + g_x[:, j]
    wdt = out_dtype or f32
    return gx.to(dt), g_w13.to(wdt), g_w2.to(wdt), g_tw
