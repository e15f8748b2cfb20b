"""Training parity: a small MoE language model trained with BF16 MoE layers and with fp8_deep's FP8 MoE layers.

The claim checked (shared/docs/ANCHORS.md, training numerics; DeepSeek-V3 technical report section 3.3, CONTRACTS.md
section 7): a model whose expert GEMMs run in FP8 (forward, dgrad and wgrad, DeepSeek-V3's recipe) ends within 0.25%
relative loss of the same model trained in BF16.

Pairs of runs, each pair from one initialisation (identical initial weights), every run on the same batches in the
same order, trained in lockstep (step i of every run in turn, on the same batch), so a time budget stops all of them
at the same step. ``--seeds`` pairs (default 3: one pair's gap moves by more than the 0.25% target from one
initialisation to the next on this small model, so the verdict is the mean over pairs). The two runs of a pair differ
only in the expert computation of the MoE layers, one module class for both:
  bf16  ``fp8_deep.testing.baselines.bf16_moe_train``: the BF16 baseline's function with autograd (routing sort,
        gather, ``torch._grouped_mm`` x2 + SwiGLU, float32 ``index_add_`` combine; a per-expert loop where
        ``_grouped_mm`` is not available), master weights cast to BF16 in the graph
  fp8   ``fp8_deep.moe_forward(h_bf16, w13_fp32, w2_fp32, topk_weights, topk_ids)``: FP8 forward and backward,
        the float32 master weights quantized 128x128 inside every call (one micro-batch per optimizer step)
Everything else stays as DeepSeek-V3 keeps it: embeddings, attention (``F.scaled_dot_product_attention``, causal),
RMSNorm, the router (float32 linear, softmax, top-k, renormalised) and its load-balancing loss, the LM head and the
loss in BF16 autocast / float32; float32 master parameters, AdamW, gradient clipping.

Model (defaults): byte vocabulary (256), d_model 512, 4 layers, 8 heads, learned positions, MoE FFN with 32
experts, top-4, expert intermediate 256; sequence 256, batch 16 (4096 tokens per step: 512 routed rows per expert).
Data: the Python sources of the installed ``torch`` package (sorted relative paths, concatenated bytes; every 20th
file held out for eval), recorded by version, size and sha256. Batches are random windows from a seeded generator.

Checks before training (exit 1 on failure): one MoE layer on a real batch, FP8 against BF16 (``calc_diff`` of the
output and of every gradient) and against ``fp8_deep.reference.moe_backward`` (the FP8 backward's executable spec);
the step-0 eval losses of the two (identical) models. During training: every logged loss finite (exit 1 otherwise).
At the end: per pair, the relative gap of the smoothed final training loss (mean of the last 100 steps) and of the
held-out loss, the BF16 runs' seed-to-seed spread, and the verdict: exit 2 when the mean paired gap of either
exceeds ``--max-rel-gap`` (default 0.25%, DeepSeek-V3's bound).

``--time-budget`` (default 400 s, under gpu_check.sh's 420 s stage) stops every run at the same step when the next
step and the final eval would not fit; the summary says so (the learning-rate schedule is then unfinished).
``--noise-floor`` (with ``--seeds 1``) adds a BF16 run from another initialisation on the same data: its gap to the
first BF16 run is the seed-to-seed yardstick for the FP8 gap (with several seeds the BF16 runs give it already). ``--runs`` adds ablations (FP8 forward with BF16 gradients, FP8 with
BF16 weight gradients, power-of-two scales, ...) and paired runs from other initialisations (``fp8_s1`` against
``bf16_s1``): every run is compared with ``bf16`` and, when it exists, with the BF16 run of its own initialisation.

Output: bench/results/<card>/train_parity.csv (per step: losses, aux losses, gradient norms, step times),
train_parity_eval.csv (eval losses), train_parity.png (curves and gap), a final ``SUMMARY`` block.

    python bench/train_parity.py                      # 3 pairs, 2000 steps each (~5.5 min on an H100)
    python bench/train_parity.py --seeds 1            # one pair (~2 min)
    python bench/train_parity.py --noise-floor        # + a BF16 run from another seed: the gap's yardstick
    python bench/train_parity.py --runs fp8_fwd,fp8_bf16wgrad,fp8_ue8m0,bf16_s1,fp8_s1   # ablations, 2nd seed
    python bench/train_parity.py --time-budget 280    # stop every run at the same step before 280 s
    python bench/train_parity.py --cpu-smoke          # tiny model, 5 steps each, on the CPU (FP8 kernels interpreted)
"""
from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv[1:]:
    # fp8_deep runs its Triton kernels on CPU tensors only through the interpreter, which must be chosen before
    # triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import hashlib  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py when run as a script

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import _common as C  # noqa: E402
from fp8_deep.testing import calc_diff  # noqa: E402
from fp8_deep.testing.baselines import bf16_moe_train, grouped_mm_available  # noqa: E402

IMPLS = ("bf16", "fp8")
# --runs: the two runs of the verdict plus ablations. "<impl>" or "<impl>_s<N>" (initialisation seed + N, same data).
VARIANTS = {
    "bf16": "BF16 experts (the baseline)",
    "fp8": "fp8_deep's FP8 forward and backward (scale_fmt from --scale-fmt)",
    "fp8_ue8m0": "fp8 with power-of-two (UE8M0) scales everywhere: the 1x128 -> 128x1 re-tiling is then exact",
    "fp8_fwd": "FP8 forward, BF16 backward (the BF16 path's gradients at the same inputs)",
    "fp8_bwd": "BF16 forward, FP8 backward (fp8_deep's gradients at the same inputs)",
    "fp8_bf16wgrad": "fp8, but the weight gradients from the BF16 path (at the same inputs)",
    "fp8_bf16dgrad": "fp8, but the gradients of x and of the router weights from the BF16 path",
}
NOISE = "bf16_s1"  # --noise-floor: BF16 from another initialisation
TARGET_REL_GAP = 0.0025  # DeepSeek-V3: FP8 training loss within 0.25% of BF16
# the layer check's bounds (exit 1 above them): "wrong", not "a little worse". On Gaussian data the FP8 MoE forward
# is ~2e-3 calc_diff from BF16 (four quantizations deep, ANCHORS.md); a broken kernel or a missing scale is ~1e-1-1.
# Against the FP8 backward's spec (same quantizations, float32 math) only accumulation order and FP8 rounding ties
# differ (~1e-5 and below).
MAX_DIFF_VS_BF16 = {"out": 1e-2, "grad_x": 2e-2, "grad_w13": 2e-2, "grad_w2": 2e-2, "grad_topk_weights": 2e-2}
MAX_DIFF_VS_SPEC = 1e-3
MAX_STEP0_EVAL_GAP = 0.01  # identical weights: only the FP8 forward's error separates the two eval losses
SMOOTH = 100  # steps averaged for the final training loss


@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 4
    n_heads: int = 8
    experts: int = 32
    top_k: int = 4
    inter: int = 256
    seq: int = 256
    batch: int = 16
    vocab: int = 256
    aux_coef: float = 0.01
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0
    init_std: float = 0.02


# ------------------------------------------------------------------------------------------------ data
def load_corpus(device, eval_every_nth: int = 20) -> Dict:
    """The installed torch package's Python sources as bytes: files sorted by relative path, every
    ``eval_every_nth``-th file held out. Returns uint8 tensors on ``device`` and what they are."""
    root = Path(torch.__file__).resolve().parent
    files = sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix())
    train, held = [], []
    for i, p in enumerate(files):
        (held if i % eval_every_nth == eval_every_nth - 1 else train).append(p.read_bytes())
    train_b, held_b = b"".join(train), b"".join(held)
    sha = hashlib.sha256(train_b + held_b).hexdigest()[:16]
    meta = dict(package=f"torch {torch.__version__}", files=len(files), train_files=len(train),
                eval_files=len(held), train_bytes=len(train_b), eval_bytes=len(held_b), sha256_16=sha)
    as_t = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).to(device)  # noqa: E731
    return dict(train=as_t(train_b), eval=as_t(held_b), meta=meta)


def batch_starts(n_bytes: int, seq: int, steps: int, batch: int, seed: int) -> torch.Tensor:
    """Every step's window starts (steps, batch), drawn once from a seeded CPU generator: the data order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_bytes - seq - 1, (steps, batch), generator=g)


def windows(data: torch.Tensor, starts: torch.Tensor, seq: int):
    """(inputs, targets) int64 ``(len(starts), seq)`` from the byte windows at ``starts`` (on ``data``'s device)."""
    idx = starts[:, None] + torch.arange(seq + 1, device=data.device)
    w = data[idx].long()
    return w[:, :-1], w[:, 1:]


# ------------------------------------------------------------------------------------------------ model
class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):  # float32 whatever autocast does around it
        xf = x.float()
        return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class MoE(nn.Module):
    """SwiGLU experts in vLLM's layout (``w13 (E, 2I, H)`` gate rows then up rows, ``w2 (E, H, I)``), float32 master
    weights, a float32 router (softmax, top-k, renormalised) and the Switch-Transformer load-balancing loss
    ``E * sum_e f_e * P_e``. ``impl`` picks the expert computation; nothing else differs between the runs."""

    def __init__(self, cfg: Config, impl: str, scale_fmt: str, backend: str):
        super().__init__()
        self.cfg, self.impl, self.scale_fmt, self.backend = cfg, impl, scale_fmt, backend
        E, H, inter = cfg.experts, cfg.d_model, cfg.inter
        self.gate = nn.Linear(H, E, bias=False)
        self.w13 = nn.Parameter(torch.empty(E, 2 * inter, H))
        self.w2 = nn.Parameter(torch.empty(E, H, inter))

    def route(self, h):
        with torch.autocast(device_type=h.device.type, enabled=False):
            probs = torch.softmax(F.linear(h.float(), self.gate.weight), dim=-1)
            w, ids = torch.topk(probs, self.cfg.top_k, dim=-1)
            w = w / w.sum(dim=-1, keepdim=True)
            # routed-row counts without a host sync (bincount on CUDA reads the max id back); exact in float32
            flat = ids.reshape(-1)
            ones = torch.ones_like(flat, dtype=torch.float32)
            counts = torch.zeros(self.cfg.experts, device=h.device).index_add_(0, flat, ones)
            frac = counts / flat.numel()
            aux = self.cfg.experts * (frac * probs.mean(0)).sum()
        return w, ids.to(torch.int32), aux

    def experts(self, hb, topk_weights, topk_ids, w13=None, w2=None):
        """The expert computation on bf16 ``hb (T, H)``; ``w13``/``w2`` default to the module's masters."""
        w13 = self.w13 if w13 is None else w13
        w2 = self.w2 if w2 is None else w2
        if self.impl == "bf16":
            return bf16_moe_train(hb, w13, w2, topk_weights, topk_ids)
        if self.impl in ("fp8", "fp8_ue8m0"):
            return self._fp8(hb, w13, w2, topk_weights, topk_ids)
        fp8, bf16 = self._fp8, bf16_moe_train
        mixed = {"fp8_fwd": (fp8, (bf16,) * 4), "fp8_bwd": (bf16, (fp8,) * 4),
                 "fp8_bf16wgrad": (fp8, (fp8, bf16, bf16, fp8)), "fp8_bf16dgrad": (fp8, (bf16, fp8, fp8, bf16))}
        if self.impl in mixed:
            out_fn, grad_fns = mixed[self.impl]
            return _Mixed.apply(out_fn, grad_fns, hb, w13, w2, topk_weights, topk_ids)
        raise ValueError(f"unknown expert implementation {self.impl!r}; one of {sorted(VARIANTS)}")

    def _fp8(self, hb, w13, w2, topk_weights, topk_ids):
        import fp8_deep
        fmt = "ue8m0" if self.impl == "fp8_ue8m0" else self.scale_fmt
        return fp8_deep.moe_forward(hb, w13, w2, topk_weights, topk_ids, scale_fmt=fmt, backend=self.backend)

    def forward(self, x):
        B, S, H = x.shape
        h = x.reshape(B * S, H)
        topk_weights, topk_ids, aux = self.route(h)
        with torch.autocast(device_type=h.device.type, enabled=False):  # the expert paths take bf16 explicitly
            out = self.experts(h.to(torch.bfloat16), topk_weights, topk_ids)
        return out.view(B, S, H), aux


class _Mixed(torch.autograd.Function):
    """The output of ``out_fn`` with each input's gradient from the function ``grad_fns`` names for it (for
    ``hb, w13, w2, topk_weights``), at the same inputs: an ablation of which part of the FP8 recipe moves the loss.
    Each gradient function's forward is re-run inside the backward, under autograd."""

    @staticmethod
    def forward(ctx, out_fn, grad_fns, hb, w13, w2, topk_weights, topk_ids):
        with torch.no_grad():
            out = out_fn(hb, w13, w2, topk_weights, topk_ids)
        ctx.grad_fns = grad_fns
        ctx.save_for_backward(hb, w13, w2, topk_weights, topk_ids)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        *inputs, topk_ids = ctx.saved_tensors
        need = ctx.needs_input_grad[2:6]
        grads = [None] * 4
        for fn in dict.fromkeys(ctx.grad_fns):
            mine = [i for i in range(4) if need[i] and ctx.grad_fns[i] is fn]
            if not mine:
                continue
            leaves = [t.detach().requires_grad_(i in mine) for i, t in enumerate(inputs)]
            with torch.enable_grad():
                out = fn(*leaves, topk_ids)
                for i, g in zip(mine, torch.autograd.grad(out, [leaves[i] for i in mine], grad_out)):
                    grads[i] = g
        return (None, None, *grads, None)


class Block(nn.Module):
    def __init__(self, cfg: Config, impl: str, scale_fmt: str, backend: str):
        super().__init__()
        self.norm1, self.attn = RMSNorm(cfg.d_model), Attention(cfg)
        self.norm2, self.moe = RMSNorm(cfg.d_model), MoE(cfg, impl, scale_fmt, backend)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        m, aux = self.moe(self.norm2(x))
        return x + m, aux


class MoELM(nn.Module):
    def __init__(self, cfg: Config, impl: str, scale_fmt: str = "fp32", backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Parameter(torch.empty(cfg.seq, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg, impl, scale_fmt, backend) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                nn.init.ones_(p)
            elif name.endswith("proj.weight") or name.endswith("moe.w2"):  # residual outputs (GPT-2's scaling)
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)

    def set_impl(self, impl: str):
        for b in self.blocks:
            b.moe.impl = impl
        return self

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        aux = 0.0
        for b in self.blocks:
            x, a = b(x)
            aux = aux + a
        return self.head(self.norm(x)), aux / len(self.blocks)


def lm_loss(logits, targets):
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ------------------------------------------------------------------------------------------------ one run
class Run:
    """One model, its optimizer and its per-step records (kept on the device; read at log points)."""

    def __init__(self, impl: str, model: MoELM, cfg: Config, steps: int, device):
        self.impl, self.model, self.cfg, self.device = impl, model, cfg, device
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        kw = dict(fused=True) if device.type == "cuda" else {}
        self.opt = torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay),
                                      dict(params=no_decay, weight_decay=0.0)], lr=cfg.lr, betas=(0.9, 0.95),
                                     eps=1e-8, **kw)
        self.loss = torch.full((steps,), float("nan"), device=device)
        self.aux = torch.full((steps,), float("nan"), device=device)
        self.gnorm = torch.full((steps,), float("nan"), device=device)
        self.events: List = []  # (start, end) CUDA events, or host seconds on the CPU
        self.evals: Dict[int, float] = {}

    def step(self, i: int, inp, tgt, lr: float):
        cuda = self.device.type == "cuda"
        if cuda:
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ev[0].record()
        else:
            t0 = time.perf_counter()
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
            logits, aux = self.model(inp)
        ce = lm_loss(logits, tgt)
        (ce + self.cfg.aux_coef * aux).backward()
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.opt.step()
        self.loss[i], self.aux[i], self.gnorm[i] = ce.detach(), aux.detach(), gn.detach()
        if cuda:
            ev[1].record()
            self.events.append(ev)
        else:
            self.events.append(time.perf_counter() - t0)

    @torch.no_grad()
    def evaluate(self, data: torch.Tensor, starts: torch.Tensor, batch: int) -> float:
        total, count = torch.zeros((), device=self.device, dtype=torch.float64), 0
        for j in range(0, starts.numel(), batch):
            inp, tgt = windows(data, starts[j:j + batch], self.cfg.seq)
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                logits, _ = self.model(inp)
            total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                     reduction="sum").double()
            count += tgt.numel()
        return float(total / count)

    def step_seconds(self) -> List[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in self.events]
        return list(self.events)


def lr_at(i: int, steps: int, cfg: Config) -> float:
    warm = min(cfg.warmup, max(1, steps // 10))
    if i < warm:
        return cfg.lr * (i + 1) / warm
    t = (i - warm) / max(1, steps - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# ------------------------------------------------------------------------------------------------ checks
class NumericsError(RuntimeError):
    pass


def layer_check(model: MoELM, inp: torch.Tensor, args) -> List[Dict]:
    """One MoE layer (the first block's, on the normalised hidden states of a real batch): the FP8 expert path
    against the BF16 one and against the FP8 backward's spec, output and every gradient. Raises NumericsError."""
    from fp8_deep import reference
    blk = model.blocks[0]
    with torch.no_grad(), torch.autocast(device_type=inp.device.type, dtype=torch.bfloat16):
        x = model.tok(inp) + model.pos[: inp.shape[1]]
        x = x + blk.attn(blk.norm1(x))
        h = blk.norm2(x).reshape(-1, model.cfg.d_model)
        topk_weights, topk_ids, _ = blk.moe.route(h)
    hb = h.to(torch.bfloat16)
    g = torch.Generator(device=hb.device).manual_seed(args.seed + 1)
    grad_out = torch.randn(hb.shape, generator=g, device=hb.device).to(torch.bfloat16)
    res = {}
    impl0 = blk.moe.impl
    try:
        for impl in IMPLS:  # leaf copies of every input: the module's parameters get no gradient here
            xs = hb.clone().requires_grad_(True)
            tw = topk_weights.clone().requires_grad_(True)
            w13 = blk.moe.w13.detach().clone().requires_grad_(True)
            w2 = blk.moe.w2.detach().clone().requires_grad_(True)
            blk.moe.impl = impl
            out = blk.moe.experts(xs, tw, topk_ids, w13, w2)
            out.backward(grad_out)
            res[impl] = dict(out=out.detach(), grad_x=xs.grad, grad_w13=w13.grad, grad_w2=w2.grad,
                             grad_topk_weights=tw.grad)
    finally:
        blk.moe.impl = impl0
    spec = dict(zip(("grad_x", "grad_w13", "grad_w2", "grad_topk_weights"),
                    reference.moe_backward(grad_out, hb, blk.moe.w13.detach(), blk.moe.w2.detach(), topk_weights,
                                           topk_ids, scale_fmt=args.scale_fmt)))
    spec["out"] = reference.moe_forward_fp8_emulated(hb, blk.moe.w13.detach(), blk.moe.w2.detach(), topk_weights,
                                                     topk_ids, scale_fmt=args.scale_fmt)
    rows, bad = [], []
    for name in ("out", "grad_x", "grad_w13", "grad_w2", "grad_topk_weights"):
        a, b, s = res["fp8"][name], res["bf16"][name], spec[name]
        if a is None or b is None:
            bad.append(f"{name}: no gradient ({'fp8' if a is None else 'bf16'})")
            rows.append(dict(tensor=name, dtype="-", vs_bf16=float("nan"), vs_spec=float("nan"), ok="NO"))
            continue
        finite = bool(torch.isfinite(a).all())
        d_bf16, d_spec = calc_diff(a.float(), b.float()), calc_diff(a.float(), s.float())
        ok = finite and d_bf16 <= MAX_DIFF_VS_BF16[name] and d_spec <= MAX_DIFF_VS_SPEC
        if not ok:
            bad.append(f"{name}: finite={finite} calc_diff vs bf16 {d_bf16:.2e} (max {MAX_DIFF_VS_BF16[name]:.0e}), "
                       f"vs spec {d_spec:.2e} (max {MAX_DIFF_VS_SPEC:.0e})")
        if name in ("grad_w13", "grad_w2") and a.dtype != blk.moe.w13.dtype:
            bad.append(f"{name}: dtype {a.dtype}, expected the master weight's {blk.moe.w13.dtype}")
            ok = False
        rows.append(dict(tensor=name, dtype=str(a.dtype).replace("torch.", ""), vs_bf16=d_bf16, vs_spec=d_spec,
                         ok="yes" if ok else "NO"))
    C.print_table([{**r, "vs_bf16": f"{r['vs_bf16']:.2e}", "vs_spec": f"{r['vs_spec']:.2e}"} for r in rows],
                  ["tensor", "dtype", "vs_bf16", "vs_spec", "ok"],
                  title=f"layer check, block 0's MoE on a real batch (T={hb.shape[0]}): calc_diff of fp8_deep against "
                        f"the BF16 path and against the spec (fp8_deep.reference: the FP8 recipe in float32 math)")
    if bad:
        raise NumericsError("FP8 MoE layer check failed: " + "; ".join(bad))
    return rows


# ------------------------------------------------------------------------------------------------ output
def moving_average(xs: List[float], n: int) -> List[float]:
    out, acc = [], 0.0
    for i, v in enumerate(xs):
        acc += v
        if i >= n:
            acc -= xs[i - n]
        out.append(acc / min(i + 1, n))
    return out


def write_csv(path: Path, rows: List[Dict]) -> None:
    log = C.CsvLog(path)
    log.rows = [{**r, **{k: v for k, v in log.meta.items() if k not in r}} for r in rows]
    log.flush()


def write_png(path: Path, steps: List[int], loss: Dict[str, List[float]], evals: Dict[str, Dict[int, float]],
              title: str) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"[note] matplotlib not importable: no plot {path.name} (the CSVs hold the curves)")
        return None
    n = max(1, min(50, len(steps) // 20))
    sm = {k: moving_average(v, n) for k, v in loss.items()}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, v in sm.items():
        ax1.plot(steps, v, label=f"{k} train (moving average of {n})", lw=1.2)
        ev = sorted(evals[k].items())
        if ev:
            ax1.plot([s for s, _ in ev], [e for _, e in ev], marker="o", ls="--", label=f"{k} held-out")
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy (nats/byte)")
    top = max([max(v) for v in sm.values()] + [e for k in evals for e in evals[k].values()])
    ax1.set_ylim(top=min(6.0, top + 0.05))
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize=8)
    for k in [k for k in sm if k != "bf16"]:
        line, = ax2.plot(steps, [100 * (f - b) / b for f, b in zip(sm[k], sm["bf16"])], lw=1.2,
                         label=f"{k} train, moving average of {n}")
        common = sorted(set(evals[k]) & set(evals["bf16"]))
        if common:
            ax2.plot(common, [100 * (evals[k][s] - evals["bf16"][s]) / evals["bf16"][s] for s in common], marker="o",
                     ls="--", color=line.get_color(), label=f"{k} held-out")
    for y in (100 * TARGET_REL_GAP, -100 * TARGET_REL_GAP):
        ax2.axhline(y, color="gray", ls=":", lw=1)
    ax2.set_xlabel("step")
    ax2.set_ylabel("(run - bf16) / bf16 loss, %")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(f"{title}\n{C.card_name()}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of each run (default 2000; 5 with "
                                                              "--cpu-smoke)")
    p.add_argument("--time-budget", type=float, default=400,
                   help="seconds for the whole script (default 400: under gpu_check.sh's 420 s parity stage; 0 = "
                        "none); every run stops at the same step before it would be exceeded, and the summary says so")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny model (d_model 128, 1 layer, E=4, seq 16, batch 2), 5 steps each, on the CPU; FP8 "
                        "kernels through Triton's interpreter. Plumbing only: no parity verdict")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 16)")
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (default 1e-3)")
    p.add_argument("--eval-every", type=int, default=500, help="held-out eval every N steps (and at 0 and the end)")
    p.add_argument("--eval-seqs", type=int, default=256, help="held-out sequences per eval (default 256)")
    p.add_argument("--log-every", type=int, default=100, help="print (and check finiteness) every N steps")
    p.add_argument("--scale-fmt", default="fp32", choices=["fp32", "ue8m0"], help="fp8_deep's scale format")
    p.add_argument("--fp8-backend", default="auto", choices=["auto", "triton", "deep_gemm"],
                   help="fp8_deep's grouped-GEMM backend (default auto)")
    p.add_argument("--max-rel-gap", type=float, default=TARGET_REL_GAP,
                   help="exit 2 when |FP8 - BF16| / BF16 of the final train or eval loss exceeds this (default 0.0025)")
    p.add_argument("--noise-floor", action="store_true",
                   help=f"with --seeds 1: a third run, {NOISE!r}, BF16 from another initialisation, same data; its "
                        f"gap to bf16 is the seed-to-seed yardstick for the FP8 gap (several seeds give it already)")
    p.add_argument("--seeds", type=int, default=None,
                   help="initialisations (default 3): runs bf16_sK and fp8_sK for K < seeds, and the verdict is the "
                        "mean of the paired gaps (fp8_sK vs bf16_sK); one pair's gap swings by more than the target "
                        "from one initialisation to the next on this model")
    p.add_argument("--runs", default=None,
                   help="comma-separated extra runs (the --seeds pairs always run): " +
                        "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()) + "; a suffix _s<N> starts that run from "
                        "initialisation seed + N (same data), e.g. bf16_s1,fp8_s1: a second paired sample of the gap")
    p.add_argument("--skip-layer-check", action="store_true", help="no FP8-vs-BF16/spec check of one layer first")
    a = p.parse_args(argv)
    if a.steps is None:
        a.steps = 5 if a.cpu_smoke else 2000
    if a.cpu_smoke:
        a.eval_every, a.log_every, a.eval_seqs = 10**9, 1, 4
        if "--time-budget" not in (argv if argv is not None else sys.argv[1:]):
            a.time_budget = None
    if a.steps < 1:
        p.error("--steps must be >= 1")
    if a.seeds is None:
        a.seeds = 1 if a.cpu_smoke else 3
    if a.seeds < 1:
        p.error("--seeds must be >= 1")
    runs = ["bf16", "fp8"] + [r for k in range(1, a.seeds) for r in (f"bf16_s{k}", f"fp8_s{k}")]
    runs += [r.strip() for r in (a.runs or "").split(",") if r.strip()]
    if a.noise_floor:
        runs.append(NOISE)
    try:  # one name per run: "bf16_s0" is "bf16", "fp8_s01" is "fp8_s1"
        a.runs = list(dict.fromkeys(run_name(*parse_run(r)) for r in runs))
    except ValueError as exc:
        p.error(str(exc))
    return a


def run_name(impl: str, off: int) -> str:
    return impl if off == 0 else f"{impl}_s{off}"


def parse_run(name: str):
    """``"fp8_fwd_s2"`` -> ``("fp8_fwd", 2)``: the expert implementation and the initialisation seed offset."""
    impl, _, tail = name.rpartition("_s")
    if impl and tail.isdigit() and impl in VARIANTS:
        return impl, int(tail)
    if name in VARIANTS:
        return name, 0
    raise ValueError(f"--runs: unknown run {name!r}; one of {sorted(VARIANTS)}, optionally with a seed suffix _s<N>")


def make_config(args) -> Config:
    cfg = Config()
    if args.cpu_smoke:
        cfg = Config(d_model=128, n_layers=1, n_heads=2, experts=4, top_k=2, inter=128, seq=16, batch=2, warmup=2)
    if args.batch:
        cfg.batch = args.batch
    if args.lr:
        cfg.lr = args.lr
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = C.Budget(args.time_budget)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("train_parity needs a CUDA GPU for the real run; --cpu-smoke for a dry run of the plumbing")
        return 0
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    cfg = make_config(args)
    out_dir = C.results_dir("cpu" if args.cpu_smoke else None)
    print(C.env_line())
    import fp8_deep
    rows_per_expert = cfg.batch * cfg.seq * cfg.top_k / cfg.experts
    print(f"model: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, MoE E={cfg.experts} "
          f"top-{cfg.top_k} I={cfg.inter}; seq {cfg.seq} x batch {cfg.batch} = {cfg.seq * cfg.batch} tokens/step, "
          f"{rows_per_expert:.0f} routed rows per expert on average; steps {args.steps}; lr {cfg.lr}; "
          f"fp8: scale_fmt={args.scale_fmt} backend={args.fp8_backend}; bf16 experts on "
          f"{'torch._grouped_mm' if grouped_mm_available(device) else 'a per-expert loop (no _grouped_mm here)'}",
          flush=True)

    t = time.time()
    data = load_corpus(device)
    m = data["meta"]
    corpus = (f"{m['package']} Python sources: {m['files']} files, train {m['train_bytes']:,} bytes "
              f"({m['train_files']} files), held out {m['eval_bytes']:,} bytes (every 20th file, {m['eval_files']}), "
              f"sha256[:16] {m['sha256_16']}")
    print(f"data: {corpus} ({time.time() - t:.1f} s)", flush=True)
    # on the device up front: a blocking host-to-device copy per step would drain the GPU's queue every step
    starts = batch_starts(data["train"].numel(), cfg.seq, args.steps, cfg.batch, args.seed).to(device)
    n_eval = max(cfg.batch, args.eval_seqs // cfg.batch * cfg.batch)
    eval_starts = torch.linspace(0, data["eval"].numel() - cfg.seq - 2, n_eval).long().to(device)

    torch.manual_seed(args.seed)
    base = MoELM(cfg, "bf16", args.scale_fmt, args.fp8_backend).to(device)
    n_params = sum(p.numel() for p in base.parameters())
    n_expert = sum(p.numel() for n, p in base.named_parameters() if n.endswith(("w13", "w2")))
    print(f"parameters: {n_params / 1e6:.1f} M ({n_expert / 1e6:.1f} M in experts), float32 masters", flush=True)
    inits = {0: base}
    models = {}
    for name in args.runs:  # the same initialisation for every run of one seed offset (copies of one model)
        impl, off = parse_run(name)
        if off not in inits:
            torch.manual_seed(args.seed + off)
            inits[off] = MoELM(cfg, "bf16", args.scale_fmt, args.fp8_backend).to(device)
        models[name] = copy.deepcopy(inits[off]).set_impl(impl)
    del inits, base
    names = list(models)

    status = "ok"
    layer_rows = []
    if not args.skip_layer_check:
        inp, _ = windows(data["train"], starts[0], cfg.seq)
        try:
            layer_rows = layer_check(models["fp8"], inp, args)
        except NumericsError as exc:
            print(f"[FAIL] {exc}", flush=True)
            return 1
        except Exception as exc:
            traceback.print_exc()
            print(f"[FAIL] the FP8 MoE layer could not run forward+backward: {type(exc).__name__}: {exc}", flush=True)
            return 1
        finally:
            models["fp8"].zero_grad(set_to_none=True)

    runs = {k: Run(k, models[k], cfg, args.steps, device) for k in names}

    def rel(a, b):
        return (a - b) / b

    def evaluate_all(step):
        for r in runs.values():
            r.evals[step] = r.evaluate(data["eval"], eval_starts, cfg.batch)
        b = runs["bf16"].evals[step]
        print(f"  eval step {step:5d}: " + "  ".join(f"{k} {runs[k].evals[step]:.5f}" for k in names) +
              "  gap " + "  ".join(f"{k} {100 * rel(runs[k].evals[step], b):+.3f}%" for k in names[1:]), flush=True)

    for r in runs.values():  # one batch first: kernel compiles stay out of the eval time the budget plans with
        r.evaluate(data["eval"], eval_starts[:cfg.batch], cfg.batch)
    t_eval = time.time()
    evaluate_all(0)
    eval_s = time.time() - t_eval
    b0, f0 = runs["bf16"].evals[0], runs["fp8"].evals[0]
    if not (math.isfinite(b0) and math.isfinite(f0)) or abs(rel(f0, b0)) > MAX_STEP0_EVAL_GAP:
        print(f"[FAIL] step-0 eval losses of the identical models differ by more than "
              f"{100 * MAX_STEP0_EVAL_GAP:.1f}%: bf16 {b0}, fp8 {f0}", flush=True)
        return 1

    print(f"training {args.steps} steps per run, lockstep (step i of {', '.join(names)} in turn, same batch)",
          flush=True)
    t_train = time.time()
    done = 0
    last_sync_t, last_sync_step = t_train, 0
    round_s = None  # seconds per lockstep round (one step of every run), measured between log points
    stopped_early = None
    for i in range(args.steps):
        # budget: this round, the final eval (~2x the last one) and writing the output
        if budget.seconds and round_s is not None and budget.left() < round_s + 2 * eval_s + 5:
            stopped_early = (f"time budget {args.time_budget:.0f} s: every run stopped after {done} of {args.steps} "
                             f"steps")
            print(f"[note] {stopped_early}", flush=True)
            break
        inp, tgt = windows(data["train"], starts[i], cfg.seq)
        lr = lr_at(i, args.steps, cfg)
        for k in names:
            try:
                runs[k].step(i, inp, tgt, lr)
            except Exception as exc:
                traceback.print_exc()
                print(f"[FAIL] {k} step {i}: {type(exc).__name__}: {exc}", flush=True)
                return 1
        done = i + 1
        if done % args.log_every == 0 or done == args.steps or done <= 2:
            vals = {k: (runs[k].loss[i].item(), runs[k].aux[i].item(), runs[k].gnorm[i].item()) for k in names}
            now = time.time()
            if done >= 2:  # not from step 1 alone: the first steps compile the training kernels
                round_s = (now - last_sync_t) / (done - last_sync_step)
            last_sync_t, last_sync_step = now, done
            print(f"  step {done:5d}  lr {lr:.2e}  loss " + " ".join(f"{k} {v[0]:.4f}" for k, v in vals.items()) +
                  "  aux " + "/".join(f"{v[1]:.3f}" for v in vals.values()) +
                  "  gnorm " + "/".join(f"{v[2]:.2f}" for v in vals.values()) +
                  (f"  {1 / round_s:.2f} rounds/s" if round_s else "") + f"  {budget.elapsed():.0f} s", flush=True)
            bad = [k for k in names if not torch.isfinite(runs[k].loss[: done]).all()]
            if bad:
                status = f"non-finite loss in {bad} by step {done}"
                print(f"[FAIL] {status}", flush=True)
                break
        if args.eval_every and done % args.eval_every == 0 and done != args.steps:
            t_eval = time.time()
            evaluate_all(done)
            eval_s = max(eval_s * 0.5, time.time() - t_eval)
    train_wall = time.time() - t_train
    if done == 0:
        print("[FAIL] no step ran (time budget too small?)")
        return 1
    if status == "ok" and done not in runs["bf16"].evals:
        evaluate_all(done)
    # the FP8-trained model's held-out loss with BF16 experts: what training in FP8 cost, apart from FP8 inference
    fp8_model_bf16_eval = float("nan")
    if status == "ok":
        runs["fp8"].model.set_impl("bf16")
        fp8_model_bf16_eval = runs["fp8"].evaluate(data["eval"], eval_starts, cfg.batch)
        runs["fp8"].model.set_impl("fp8")

    # ---- records
    host = {k: runs[k].loss[:done].tolist() for k in names}
    aux = {k: runs[k].aux[:done].tolist() for k in names}
    gn = {k: runs[k].gnorm[:done].tolist() for k in names}
    secs = {k: runs[k].step_seconds() for k in names}
    rows = []
    for i in range(done):
        r = dict(step=i + 1, lr=lr_at(i, args.steps, cfg))
        for col, src in (("loss", host), ("aux", aux), ("gnorm", gn)):
            r.update({f"{col}_{k}": src[k][i] for k in names})
        r.update({f"ms_{k}": 1e3 * secs[k][i] for k in names})
        rows.append(r)
    write_csv(out_dir / "train_parity.csv", rows)
    ev_steps = sorted(set.intersection(*(set(runs[k].evals) for k in names)))
    ev_rows = []
    for st in ev_steps:
        r = dict(step=st, **{f"eval_{k}": runs[k].evals[st] for k in names})
        r.update({f"rel_gap_{k}": rel(runs[k].evals[st], runs["bf16"].evals[st]) for k in names[1:]})
        ev_rows.append(r)
    write_csv(out_dir / "train_parity_eval.csv", ev_rows)
    png = write_png(out_dir / "train_parity.png", [r["step"] for r in rows], host, {k: runs[k].evals for k in names},
                    f"MoE LM parity: d{cfg.d_model} L{cfg.n_layers} E{cfg.experts} top-{cfg.top_k} I{cfg.inter}, "
                    f"{done} steps x {cfg.batch * cfg.seq} tokens")

    # ---- summary
    n_s = min(SMOOTH, done)
    smooth = {k: sum(host[k][-n_s:]) / n_s for k in names}
    final_eval = {k: runs[k].evals.get(ev_steps[-1], float("nan")) for k in names}
    gaps = {k: (rel(smooth[k], smooth["bf16"]), rel(final_eval[k], final_eval["bf16"])) for k in names[1:]}
    warm = min(10, max(0, done - 1))  # the first steps compile kernels: steps/s from the rest
    sps = {k: (done - warm) / max(1e-9, sum(secs[k][warm:])) for k in names}
    first = {k: sum(secs[k][:warm]) for k in names}
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    try:
        fp8_backend = fp8_deep.last_backend()
    except Exception:  # an fp8_deep without it: the summary says "?"
        fp8_backend = "?"
    table = [dict(run=k, final_train=f"{smooth[k]:.4f}", final_eval=f"{final_eval[k]:.4f}",
                  steps_per_s=f"{sps[k]:.2f}", step_ms=f"{1e3 / sps[k]:.1f}", first_steps_s=f"{first[k]:.1f}")
             for k in names]
    for k, (gt, ge) in gaps.items():
        table.append(dict(run=f"{k} vs bf16", final_train=f"{100 * gt:+.3f}%", final_eval=f"{100 * ge:+.3f}%",
                          steps_per_s=f"{sps[k] / sps['bf16']:.2f}x", step_ms="", first_steps_s=""))
    print()
    print(f"SUMMARY train_parity {C.env_line()}")
    print(f"SUMMARY train_parity data: {corpus}")
    print(f"SUMMARY train_parity model: {n_params / 1e6:.1f} M params ({n_expert / 1e6:.1f} M expert), "
          f"{asdict(cfg)}; fp8 backend {fp8_backend}, scale_fmt {args.scale_fmt}")
    if layer_rows:
        print("SUMMARY train_parity layer check (calc_diff fp8 vs bf16 / vs spec): " +
              ", ".join(f"{r['tensor']} {r['vs_bf16']:.2e}/{r['vs_spec']:.1e}" for r in layer_rows))
    C.print_table(table, ["run", "final_train", "final_eval", "steps_per_s", "step_ms", "first_steps_s"],
                  title=f"{done} steps each; final_train = mean loss of the last {n_s} steps, final_eval = held-out "
                        f"loss at step {ev_steps[-1]}; 'vs bf16' rows = (run - bf16) / bf16 and the speed ratio; "
                        f"steps_per_s after the first {warm} steps (first_steps_s, compiles included)",
                  prefix="SUMMARY train_parity")
    print(f"SUMMARY train_parity relative gap fp8 vs bf16: train {100 * gaps['fp8'][0]:+.3f}%, eval "
          f"{100 * gaps['fp8'][1]:+.3f}% (DeepSeek-V3 reports < {100 * TARGET_REL_GAP:.2f}%)" +
          (f"; BF16 seed-to-seed: train {100 * gaps[NOISE][0]:+.3f}%, eval {100 * gaps[NOISE][1]:+.3f}%"
           if NOISE in gaps else ""))
    # a run from seed offset N against the BF16 run from the same initialisation: more paired samples of each gap
    paired = {}
    for k in names:
        impl, off = parse_run(k)
        ref = "bf16" if off == 0 else f"bf16_s{off}"
        if impl != "bf16" and ref in smooth:
            paired.setdefault(impl, []).append((off, rel(smooth[k], smooth[ref]), rel(final_eval[k], final_eval[ref])))
    for impl, vals in paired.items():
        mt, me = (sum(v[i] for v in vals) / len(vals) for i in (1, 2))
        print(f"SUMMARY train_parity paired gap {impl} vs bf16 of the same initialisation: " +
              ", ".join(f"seed+{o}: train {100 * t:+.3f}% eval {100 * e:+.3f}%" for o, t, e in vals) +
              (f"; mean train {100 * mt:+.3f}% eval {100 * me:+.3f}%" if len(vals) > 1 else ""))
    bf16_runs = [k for k in names if parse_run(k)[0] == "bf16"]
    if len(bf16_runs) > 1:  # the yardstick: how far BF16 runs from different initialisations spread
        for what, src in (("train", smooth), ("eval", final_eval)):
            v = [src[k] for k in bf16_runs]
            mean = sum(v) / len(v)
            sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))
            print(f"SUMMARY train_parity BF16 seed-to-seed spread ({len(v)} initialisations), {what}: standard "
                  f"deviation {100 * sd / mean:.3f}% of the mean")
    verdict = paired["fp8"]
    gap_train = sum(v[1] for v in verdict) / len(verdict)
    gap_eval = sum(v[2] for v in verdict) / len(verdict)
    se = ""
    if len(verdict) > 1:  # the standard error of each mean: what the verdict can resolve
        ses = [math.sqrt(sum((v[i] - m) ** 2 for v in verdict) / (len(verdict) - 1) / len(verdict))
               for i, m in ((1, gap_train), (2, gap_eval))]
        se = f" (standard error {100 * ses[0]:.3f}% / {100 * ses[1]:.3f}%)"
    print(f"SUMMARY train_parity verdict gap (mean of {len(verdict)} paired fp8 - bf16 gap"
          f"{'s' if len(verdict) > 1 else ''}): train {100 * gap_train:+.3f}%, eval {100 * gap_eval:+.3f}%{se}")
    print(f"SUMMARY train_parity fp8-trained model evaluated with BF16 experts: {fp8_model_bf16_eval:.4f} "
          f"({100 * rel(fp8_model_bf16_eval, final_eval['bf16']):+.3f}% vs bf16): the training part of the gap")
    print(f"SUMMARY train_parity time: training {train_wall:.0f} s for {len(names)} runs "
          f"({done / train_wall:.2f} lockstep rounds/s), script {budget.elapsed():.0f} s, peak memory {peak:.1f} GiB")
    if stopped_early:
        print(f"SUMMARY train_parity note: {stopped_early}")
    print(f"SUMMARY train_parity files: {out_dir / 'train_parity.csv'}, train_parity_eval.csv"
          f"{', ' + png.name if png else ' (no PNG: matplotlib missing)'}")
    if status != "ok":
        print(f"SUMMARY train_parity FAILED: {status}")
        return 1
    if args.cpu_smoke:
        print("SUMMARY train_parity cpu-smoke: plumbing only (a few steps on a tiny model): no parity verdict")
        return 0
    worst = max(abs(gap_train), abs(gap_eval))
    if not math.isfinite(worst) or worst > args.max_rel_gap:
        print(f"SUMMARY train_parity PARITY MISSED: |gap| {100 * worst:.3f}% > {100 * args.max_rel_gap:.3f}%")
        return 2
    print(f"SUMMARY train_parity parity met: |gap| {100 * worst:.3f}% <= {100 * args.max_rel_gap:.3f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
