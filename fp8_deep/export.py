"""From BF16 policy weights to block-FP8 tensors a rollout engine or a checkpoint reader takes: weight sync and export.

What a PPO step needs after every optimizer step, around ``fp8_deep.ops.quantize_weight_blockwise``:

* ``quantize_state_dict``: which tensors to quantize (linear and expert weights) and which to pass through in high
  precision (embeddings, ``lm_head``, norms, the router ``gate``, biases: DeepSeek-V3's recipe, section 3.3), the
  names (``<name>.weight`` FP8 + ``<name>.weight_scale_inv`` float32, as DeepSeek-V3 checkpoints, vLLM and
  transformers name them), the ``quantization_config`` of the checkpoint, buckets of bounded size for streaming
  weight sync, and ``out=`` to update an engine's FP8 parameters in place.
* ``quantize_tp_shard``: a tensor-parallel shard quantized exactly as the full tensor would have been.
* ``save_fp8_checkpoint`` / ``load_fp8_checkpoint``: safetensors shards + index + ``config.json``.
* ``fp8_expert_stacks``: one MoE layer's FP8 experts as the ``(E, 2I, H)`` / ``(E, H, I)`` stacks ``FP8MoE.load_fp8_``
  takes, from any of the naming schemes below.

Why batching (shared/docs/ANCHORS.md, "Weight sync, one Qwen3-30B-A3B decoder layer"): one quantizer launch per
tensor is host-bound (~46 us a tensor, 40x slower than the same bytes as stacked expert tensors). Tensors of one shape
and dtype are quantized together: each run of at least ``_MIN_RUN`` equally spaced views of one storage (experts kept
stacked, flat parameter buffers) as one ``(n, N, K)`` stack without a copy, the other tensors of the group (separate
allocations: per-expert parameters) by one launch that reads them through a device table of their addresses
(``ops.quantize_weights_grouped``), also without a copy. Outputs are written directly into the bucket's storage.

Scale convention: dequantization scales, ``w ~= q.float() * scale`` per 128x128 block (vLLM's ``weight_scale_inv``).
Ragged edges (N or K not a multiple of 128) follow the quantizer's contract: the edge block covers only real elements.
"""
from __future__ import annotations

import functools
import json
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .numerics import BLOCK, FP8_DTYPE, HIGH_PRECISION_DTYPES, SCALE_FMTS, cdiv
from .ops import GroupedWeightQuant, quantize_weight_blockwise

__all__ = ["quantize_state_dict", "QuantizedStateDict", "WeightSyncPlan", "default_skip", "is_quantized_name",
           "scale_name", "fp8_quantization_config", "quantize_tp_shard", "save_fp8_checkpoint", "load_fp8_checkpoint",
           "fp8_expert_stacks"]

NamedTensors = Union[Mapping, Iterable[Tuple[str, torch.Tensor]]]

# ------------------------------------------------------------------------------------------------ names
# Weights the recipe quantizes (2-D linears, 3-D expert stacks), by the names of the layouts in use:
#   *_proj.weight, *_proj_*.weight  every HF linear: q/k/v/o_proj, gate/up/down_proj (dense, shared and per-expert
#                                 experts.{e}.gate_proj.weight), DeepSeek's q_a_proj, kv_a_proj_with_mqa, ...
#   experts.{e}.w1/w2/w3.weight   Mixtral-style per-expert names
#   *.w13_weight, *.w2_weight     vLLM's FusedMoE stacks (E, 2I, H) / (E, H, I)
#   experts.gate_up_proj/down_proj  transformers 5's fused experts (3-D, no ".weight")
#   *.w13, *.w2                   fp8_deep.FP8MoE's master weights (3-D)
_QUANT_RE = re.compile(r"(_proj(_\w+)?\.weight"
                       r"|(^|\.)experts\.\d+\.w[123]\.weight"
                       r"|(^|\.)w(13|2)_weight"
                       r"|(^|\.)experts\.(gate_up_proj|down_proj)"
                       r"|(^|\.)w(13|2))$")
# Kept in high precision by the recipe whatever their names: embeddings, output head, norms, the MoE router (and
# its bias / shared-expert gate), biases
_SKIP_RE = re.compile(r"(embed|lm_head|(^|\.)output\.|norm|(^|\.)gate\.|(^|\.)router\.|shared_expert_gate"
                      r"|e_score_correction|(^|\.|_)bias$)")
_W13_RE = re.compile(r"(^|\.)(w13_weight|w13|gate_up_proj)$")
_DIGITS = str.maketrans("0123456789", "##########")


def default_skip(name: str) -> bool:
    """True for the tensors DeepSeek-V3's recipe keeps in high precision: embeddings, ``lm_head``, norms, the router
    ``gate`` (``*.gate.weight``, not ``gate_proj``), routers, biases."""
    return bool(_SKIP_RE.search(name))


def is_quantized_name(name: str, skip: Optional[Callable[[str], bool]] = default_skip) -> bool:
    """Whether ``quantize_state_dict`` quantizes a tensor of this name (its shape and dtype are checked then)."""
    return bool(_QUANT_RE.search(name)) and not (skip is not None and skip(name))


def scale_name(name: str) -> str:
    """The scale's name for a quantized weight's: ``x.weight`` -> ``x.weight_scale_inv``, ``experts.w13_weight`` ->
    ``experts.w13_weight_scale_inv`` (vLLM), ``experts.gate_up_proj`` -> ``experts.gate_up_proj_scale_inv``
    (transformers 5), ``mlp.w13`` -> ``mlp.w13_scale_inv``."""
    return name + "_scale_inv"


def _module_name(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def fp8_quantization_config(*, scale_fmt: str = "fp32", modules_to_not_convert: Optional[Sequence[str]] = None) -> dict:
    """The ``quantization_config`` of a DeepSeek-V3-style block-FP8 checkpoint (what vLLM and transformers'
    fine-grained FP8 integration read). ``scale_fmt="ue8m0"`` adds ``"scale_fmt": "ue8m0"`` (DeepSeek-V3.1's key;
    the scales stay float32 with power-of-two values). ``modules_to_not_convert``: modules left in high precision
    (transformers would otherwise turn every ``nn.Linear`` but ``lm_head`` into an FP8 linear, the router too)."""
    _check_scale_fmt(scale_fmt)
    cfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}
    if scale_fmt == "ue8m0":
        cfg["scale_fmt"] = "ue8m0"
    if modules_to_not_convert:
        cfg["modules_to_not_convert"] = list(modules_to_not_convert)
    return cfg


def _check_scale_fmt(scale_fmt):
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {list(SCALE_FMTS)}, got {scale_fmt!r}")


def _resolve_skip(skip) -> Optional[Callable[[str], bool]]:
    """``skip``: None (nothing beyond the name patterns), a callable ``name -> bool`` (used as is), or regular
    expressions (a string or a sequence) searched in the name *in addition to* ``default_skip``."""
    if skip is None or callable(skip):
        return skip
    pats = [skip] if isinstance(skip, str) else list(skip)
    if not all(isinstance(p, str) for p in pats):
        raise TypeError(f"skip must be a callable name -> bool or regular expression strings, got {skip!r}")
    compiled = [re.compile(p) for p in pats]
    return lambda n: default_skip(n) or any(c.search(n) for c in compiled)


# ------------------------------------------------------------------------------------------------ streaming
_ALIGN = 16  # byte alignment of every region in a bucket (the kernels' 16-byte pointer specialization, DMA)
_DEFAULT_WINDOW = 1 << 30  # bucket_bytes=None: tensors are still batched in windows of this many output bytes
_MAX_STACK = 65535  # the quantizer's limit on experts per call (CUDA grid)
# a shorter run of views joins the group's separate tensors (one address-table launch for all of them)
_MIN_RUN = 4


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class _Item:
    __slots__ = ("idx", "name", "t", "quant", "out_q", "out_s", "q", "s", "split", "_nbytes")

    def __init__(self, idx, name, t, quant, split=False):
        self.idx, self.name, self.t, self.quant, self.split = idx, name, t, quant, split
        self.out_q = self.out_s = self.q = self.s = None
        self._nbytes = None

    def scale_shape(self):
        *lead, N, K = self.t.shape
        nb = 2 * cdiv(N // 2, BLOCK) if self.split else cdiv(N, BLOCK)
        return (*lead, nb, cdiv(K, BLOCK))

    def out_bytes(self) -> int:
        """Payload bytes: FP8 values + scales, each region 16-byte aligned (a passed-through tensor: its bytes)."""
        if self._nbytes is None:
            if not self.quant:
                self._nbytes = self.t.numel() * self.t.element_size()
            else:
                n_s = 1
                for d in self.scale_shape():
                    n_s *= d
                self._nbytes = _align(self.t.numel()) + _align(4 * n_s)
        return self._nbytes


class QuantizedStateDict:
    """The iterable ``quantize_state_dict`` returns (iterate it once).

    Yields ``(name, tensor)`` pairs (``bucket_bytes=None``) or buckets: lists of pairs whose payload is at most
    ``bucket_bytes`` (a tensor larger than a bucket comes alone, in a bucket of its own size). A quantized weight
    yields ``(name, fp8)`` then ``(scale_name(name), scale)``; other tensors come through untouched (the caller's
    tensor itself, no copy). Order: input order.

    Attributes (complete once iterated): ``quantization_config`` (the checkpoint's dict, with
    ``modules_to_not_convert`` listing the 2-D+ weights passed through), ``stats`` (counts: tensors quantized /
    passed / written in place, quantizer launches, stacked launches, zero-copy stacks, address-table launches and the
    tensors they took, bucket bytes allocated).
    """

    def __init__(self, named_tensors, *, scale_fmt, skip, bucket_bytes, out, staging_bytes, reuse_buffers, batch):
        _check_scale_fmt(scale_fmt)
        if bucket_bytes is not None and (type(bucket_bytes) is not int or bucket_bytes <= 0):
            raise ValueError(f"bucket_bytes must be a positive int or None, got {bucket_bytes!r}")
        if staging_bytes is not None and (type(staging_bytes) is not int or staging_bytes < 0):
            raise ValueError(f"staging_bytes must be a non-negative int or None, got {staging_bytes!r}")
        if out is not None and not isinstance(out, Mapping):
            raise TypeError(f"out must be a mapping name -> tensor (e.g. dict(engine.named_parameters())), "
                            f"got {type(out).__name__}")
        if isinstance(named_tensors, torch.Tensor) or isinstance(named_tensors, (str, bytes)):
            raise TypeError("named_tensors must be a state dict or an iterable of (name, tensor) pairs, "
                            f"got {type(named_tensors).__name__}")
        self._src = named_tensors
        self.scale_fmt = scale_fmt
        self._skip = _resolve_skip(skip)
        self._cacheable = self._skip is None or self._skip is default_skip
        self._class_cache: Dict[str, tuple] = {}
        self.bucket_bytes = bucket_bytes
        self._window = bucket_bytes if bucket_bytes is not None else _DEFAULT_WINDOW
        # 0: one launch per tensor outside a zero-copy run (for comparison); otherwise unused (no staging copy since
        # the address-table launch), kept so that existing calls keep working
        self.staging_bytes = (self._window // 2) if staging_bytes is None else staging_bytes
        self._out = out
        self._reuse = bucket_bytes is not None if reuse_buffers is None else bool(reuse_buffers)
        self._batch = bool(batch)
        self._used = False
        self._not_converted: "OrderedDict[str, None]" = OrderedDict()
        self._buffers: Dict[torch.device, torch.Tensor] = {}
        self.stats = dict(quantized=0, passed=0, in_place=0, launches=0, stacked_launches=0, zero_copy_stacks=0,
                          table_launches=0, table_tensors=0, buckets=0, bucket_alloc_bytes=0, max_bucket_payload=0)
        # WeightSyncPlan's recording: every launch and in-place copy as a callable that repeats it (_ops), and per
        # yielded bucket (or pair list) the ops before it and what was yielded (_entries); None: not recording
        self._ops: Optional[List[Callable[[], object]]] = None
        self._entries: List[Tuple[List[Callable[[], object]], Optional[list]]] = []

    @property
    def quantization_config(self) -> dict:
        return fp8_quantization_config(scale_fmt=self.scale_fmt, modules_to_not_convert=list(self._not_converted))

    # -------------------------------------------------------------------- input
    def _items(self) -> Iterator[_Item]:
        src = self._src.items() if isinstance(self._src, Mapping) else self._src
        seen = set()
        for idx, pair in enumerate(src):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(f"named_tensors must yield (name, tensor) pairs, got {type(pair).__name__} "
                                f"at position {idx}")
            name, t = pair
            if not isinstance(name, str):
                raise TypeError(f"tensor names must be str, got {name!r} at position {idx}")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if name in seen:
                raise ValueError(f"{name}: the name appears twice in named_tensors")
            seen.add(name)
            quant, w13 = self._classify(name)
            if quant:
                t = t.detach()
                _check_quantizable(name, t)
            elif t.dim() >= 2 and name.endswith("weight"):
                self._not_converted[_module_name(name)] = None
            # a w13 whose gate/up edge is not a block edge: halves quantized separately, so that no block holds
            # both (vLLM's w13_weight_scale_inv has 2 * ceil(I / 128) block rows, gate's first)
            item = _Item(idx, name, t, quant, split=w13 and t.shape[-2] % 2 == 0 and (t.shape[-2] // 2) % BLOCK != 0)
            if self._out is not None:
                self._bind_out(item)
            item.out_bytes()  # computed once, while the tensor is at hand
            yield item

    def _classify(self, name: str):
        """(quantized?, a w13 stack?) of a name. Names of a model repeat but for their numbers: with the default
        skip rule (which no number decides) the answer is cached per digit-free template, ~1 us instead of ~5 us
        of regular expressions a tensor (a Qwen3-30B-A3B model has 18.6k per-expert weights)."""
        key = name.translate(_DIGITS) if self._cacheable else None
        hit = self._class_cache.get(key) if key is not None else None
        if hit is None:
            quant = bool(_QUANT_RE.search(name)) and not (self._skip is not None and self._skip(name))
            hit = (quant, quant and bool(_W13_RE.search(name)))
            if key is not None:
                self._class_cache[key] = hit
        return hit

    def _bind_out(self, item: _Item):
        name = item.name
        if not item.quant:
            if name in self._out:
                dst = self._out[name]
                if not isinstance(dst, torch.Tensor) or tuple(dst.shape) != tuple(item.t.shape):
                    raise ValueError(f"out[{name!r}] must be a tensor of shape {tuple(item.t.shape)}, got "
                                     f"{getattr(dst, 'shape', type(dst).__name__)}")
                item.out_q = dst
            return
        sname = scale_name(name)
        has_q, has_s = name in self._out, sname in self._out
        if has_q != has_s:
            missing = sname if has_q else name
            raise ValueError(f"out has {name if has_q else sname!r} but not {missing!r}: an FP8 weight is updated "
                             f"in place together with its scale")
        if not has_q:
            return
        q, s = self._out[name], self._out[sname]
        for what, buf, shape, dt in ((name, q, tuple(item.t.shape), FP8_DTYPE),
                                     (sname, s, item.scale_shape(), torch.float32)):
            if not isinstance(buf, torch.Tensor) or buf.dtype != dt or tuple(buf.shape) != tuple(shape):
                raise ValueError(f"out[{what!r}] must be a {dt} tensor of shape {tuple(shape)}, got "
                                 f"{getattr(buf, 'dtype', type(buf).__name__)} {tuple(getattr(buf, 'shape', ()))}")
            if buf.device != item.t.device:
                raise ValueError(f"out[{what!r}] is on {buf.device} but {name} is on {item.t.device}")
        item.out_q, item.out_s = q, s

    # -------------------------------------------------------------------- iteration
    def __iter__(self):
        if self._used:
            raise RuntimeError("a QuantizedStateDict is iterated once (its input may be a one-shot iterator); "
                               "call quantize_state_dict again for the next sync")
        self._used = True
        return self._run()

    def _run(self):
        # torch.no_grad() is applied around the quantization only: a generator's context would leak into the
        # consumer's code between yields (grad mode is thread state)
        pending: List[_Item] = []
        size = 0
        for item in self._items():
            if item.out_q is not None:  # written in place: never yielded, never in a bucket
                if item.quant:
                    pending.append(item)  # batched with its window's other in-place weights
                else:
                    self._write_in_place([item])
                continue
            nbytes = item._nbytes
            if pending and size + nbytes > self._window:
                yield from self._emit(pending)
                pending, size = [], 0
            pending.append(item)
            size += nbytes
        if pending:
            yield from self._emit(pending)

    def _emit(self, items: List[_Item]):
        in_place = [it for it in items if it.out_q is not None]
        rest = [it for it in items if it.out_q is None]
        if in_place:
            self._write_in_place(in_place)
        if not rest:
            return
        self._quantize_into_buffer(rest)
        pairs = []
        for it in rest:
            if it.quant:
                pairs += [(it.name, it.q), (scale_name(it.name), it.s)]
                self.stats["quantized"] += 1
            else:
                pairs.append((it.name, it.t))
                self.stats["passed"] += 1
        payload = sum(it._nbytes for it in rest)
        self.stats["buckets"] += 1
        self.stats["max_bucket_payload"] = max(self.stats["max_bucket_payload"], payload)
        for it in rest:  # drop references to the sources and outputs: the bucket holds them now
            it.t = it.q = it.s = None
        if self._ops is not None:
            self._entries.append((self._ops, pairs))
            self._ops = []
        if self.bucket_bytes is None:
            yield from pairs
        else:
            yield pairs

    # -------------------------------------------------------------------- quantization
    @torch.no_grad()
    def _write_in_place(self, items: List[_Item]):
        quant = [it for it in items if it.quant]
        for it in items:
            if not it.quant:
                it.out_q.copy_(it.t)
                self._record(it.out_q.copy_, it.t)
                self.stats["in_place"] += 1
        for key, group in _groups(quant).items():
            for chunk, w3 in self._chunks(group):
                if len(chunk) == 1:
                    self._quantize_one(chunk[0], chunk[0].out_q, chunk[0].out_s)
                    continue
                q3 = _uniform_stack([it.out_q for it in chunk], writable=True) if w3 is not None else None
                s3 = _uniform_stack([it.out_s for it in chunk], writable=True) if q3 is not None else None
                if s3 is not None:
                    self._quantize_stack(chunk, q3, s3, w3)
                else:  # separate sources or engine buffers of no common stack: through the address table
                    self._quantize_table(chunk, [it.out_q for it in chunk], [it.out_s for it in chunk], False)
        for it in quant:
            it.t = None
            self.stats["in_place"] += 1

    @torch.no_grad()
    def _quantize_into_buffer(self, items: List[_Item]):
        quant = [it for it in items if it.quant]
        by_device: Dict[torch.device, List[_Item]] = {}
        for it in quant:
            by_device.setdefault(it.t.device, []).append(it)
        for dev, dev_items in by_device.items():
            groups = _groups(dev_items)
            need = sum(it._nbytes for it in dev_items)
            buf = self._bucket_buffer(dev, need)
            off = 0
            for group in groups.values():
                # each group: its FP8 values then its scales, each one contiguous (n, ...) region of the buffer
                t0 = group[0]
                qn, sn = t0.t.numel(), 1
                for d in t0.scale_shape():
                    sn *= d
                q_all = buf[off: off + qn * len(group)].view(FP8_DTYPE).view(len(group), *t0.t.shape)
                off = _align(off + qn * len(group))
                s_all = buf[off: off + 4 * sn * len(group)].view(torch.float32).view(len(group), *t0.scale_shape())
                off = _align(off + 4 * sn * len(group))
                for it, q, s in zip(group, q_all.unbind(0), s_all.unbind(0)):
                    it.q, it.s = q, s
                # a chunk's outputs are its items' own slots: _chunks yields a zero-copy run as consecutive items
                # of the group, but the separate tensors (any positions) only after the runs
                slot = {id(it): k for k, it in enumerate(group)}
                for chunk, w3 in self._chunks(group):
                    n = len(chunk)
                    if n == 1:
                        self._quantize_one(chunk[0], chunk[0].q, chunk[0].s)
                    elif w3 is not None:
                        k = slot[id(chunk[0])]
                        self._quantize_stack(chunk, q_all[k: k + n], s_all[k: k + n], w3)
                    else:
                        self._quantize_table(chunk, [it.q for it in chunk], [it.s for it in chunk], True)
            assert off <= buf.numel()

    def _chunks(self, group: List[_Item]):
        """Pieces of a group quantized by one launch each, in group order: ``(items, w3)`` with ``w3`` an ``(n, N,
        K)`` view when the items are equally spaced views of one storage (no copy), else None (separate tensors: one
        address-table launch, see ``_quantize_table``). A group that spans two stacks (a bucket holding the end of
        one layer's experts and the start of the next) is cut into its runs, each still copy-free; runs shorter
        than ``_MIN_RUN`` join the separate tensors."""
        if not self._batch or len(group) == 1 or not _stackable(group[0]):
            yield from (([it], None) for it in group)
            return
        loose: List[_Item] = []
        for lo, hi, step in _uniform_runs([it.t for it in group]):
            if hi - lo < _MIN_RUN:
                loose += group[lo:hi]
                continue
            for i in range(0, hi - lo, _MAX_STACK):
                run = group[lo + i: min(hi, lo + i + _MAX_STACK)]
                t0 = run[0].t
                yield run, t0.as_strided((len(run), *t0.shape), (step, *t0.stride()), t0.storage_offset())
        if self.staging_bytes:  # one address-table launch (it splits itself at the grid limit)
            if loose:
                yield loose, None
        else:  # staging_bytes=0: one launch per separate tensor
            yield from (([it], None) for it in loose)

    def _quantize_stack(self, chunk: List[_Item], q3: torch.Tensor, s3: torch.Tensor, w3: torch.Tensor):
        """A zero-copy run: ``w3`` ``(n, N, K)`` over the items' sources, outputs ``q3``, ``s3`` likewise."""
        quantize_weight_blockwise(w3, scale_fmt=self.scale_fmt, out=(q3, s3))
        self._record(quantize_weight_blockwise, w3, scale_fmt=self.scale_fmt, out=(q3, s3))
        self.stats["zero_copy_stacks"] += 1
        self.stats["launches"] += 1
        self.stats["stacked_launches"] += 1

    def _quantize_table(self, chunk: List[_Item], qs: List[torch.Tensor], ss: List[torch.Tensor], fresh: bool):
        """Separate same-shape tensors into outputs ``qs``/``ss``: one address-table launch per layout (the sources'
        and the outputs' strides; a lone tensor of its layout gets its own launch). ``fresh``: the outputs are this
        bucket's own new views (their checks skipped), not a caller's buffers."""
        layouts: "OrderedDict[tuple, List[int]]" = OrderedDict()
        for k, it in enumerate(chunk):
            layouts.setdefault((it.t.stride(), qs[k].stride(), ss[k].stride()), []).append(k)
        for ks in layouts.values():
            if len(ks) == 1:
                self._quantize_one(chunk[ks[0]], qs[ks[0]], ss[ks[0]])
                continue
            group = GroupedWeightQuant([chunk[k].t for k in ks], scale_fmt=self.scale_fmt,
                                       out=([qs[k] for k in ks], [ss[k] for k in ks]), _fresh_out=fresh)
            group.run()
            self._record(group.run)
            self.stats["launches"] += 1
            self.stats["table_launches"] += 1
            self.stats["table_tensors"] += len(ks)

    def _quantize_one(self, it: _Item, q: torch.Tensor, s: torch.Tensor):
        w = it.t
        if not it.split:
            parts = [(w, q, s)]
        else:
            half, nb = w.shape[-2] // 2, cdiv(w.shape[-2] // 2, BLOCK)
            parts = [(w[..., lo: lo + half, :], q[..., lo: lo + half, :], s[..., slo: slo + nb, :])
                     for lo, slo in ((0, 0), (half, nb))]
        for wp, qp, sp in parts:
            quantize_weight_blockwise(wp, scale_fmt=self.scale_fmt, out=(qp, sp))
            self._record(quantize_weight_blockwise, wp, scale_fmt=self.scale_fmt, out=(qp, sp))
            self.stats["launches"] += 1

    def _record(self, fn, *args, **kwargs):
        if self._ops is not None:
            self._ops.append(functools.partial(fn, *args, **kwargs))

    def _bucket_buffer(self, dev, need: int) -> torch.Tensor:
        if need > self._window or not self._reuse:  # a tensor larger than a bucket, or buffers not reused
            self.stats["bucket_alloc_bytes"] += need
            return torch.empty(max(need, 1), dtype=torch.uint8, device=dev)
        buf = self._buffers.get(dev)
        if buf is None:
            buf = torch.empty(self._window, dtype=torch.uint8, device=dev)
            self._buffers[dev] = buf
            self.stats["bucket_alloc_bytes"] += self._window
        return buf


def _check_quantizable(name: str, t: torch.Tensor):
    if t.dtype in HIGH_PRECISION_DTYPES and t.dim() in (2, 3):  # the common case, first: ~0.3 us a tensor
        return
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or "float8" in str(t.dtype):
        raise TypeError(f"{name}: already FP8 ({t.dtype}); quantize_state_dict takes high-precision weights. Pass "
                        f"pre-quantized tensors through skip= or write them with save_fp8_checkpoint(quantize=False)")
    if t.dtype not in HIGH_PRECISION_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} cannot be quantized; expected one of "
                        f"{[str(d) for d in HIGH_PRECISION_DTYPES]}")
    if t.dim() not in (2, 3):
        raise ValueError(f"{name}: named as a linear/expert weight but has shape {tuple(t.shape)}; quantization "
                         f"needs (N, K) or (E, N, K). Name it so that skip= keeps it in high precision")


def _stackable(it: _Item) -> bool:
    """2-D weights are stacked with their group; 3-D ones are stacks already, split w13 halves go one by one."""
    return it.t.dim() == 2 and not it.split


def _groups(items: List[_Item]) -> "OrderedDict[tuple, List[_Item]]":
    """Items quantized together: same shape, dtype, device and gate/up split."""
    groups: "OrderedDict[tuple, List[_Item]]" = OrderedDict()
    for it in items:
        groups.setdefault((tuple(it.t.shape), it.t.dtype, it.t.device, it.split), []).append(it)
    return groups


def _uniform_runs(ts: Sequence[torch.Tensor]) -> List[Tuple[int, int, int]]:
    """``(lo, hi, step)``: ``[lo, hi)`` ranges covering ``ts`` in order, maximal runs of views of one storage with equal
    dtype, shape and strides whose offsets advance by the same ``step > 0`` elements (each a zero-copy stack), and
    single tensors between them (``step`` 0)."""
    def key(t):
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
            return None
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            return None
        # the storage's size too: two storages may start at one address (numpy views of different lengths)
        return (ptr, t.untyped_storage().nbytes(), t.dtype, t.shape, t.stride(), t.device)

    keys = [key(t) for t in ts]
    offs = [t.storage_offset() for t in ts]
    runs, lo, n = [], 0, len(ts)
    while lo < n:
        hi, step = lo + 1, 0
        if keys[lo] is not None and hi < n and keys[hi] == keys[lo] and offs[hi] > offs[lo]:
            step = offs[hi] - offs[lo]
            hi += 1
            while hi < n and keys[hi] == keys[lo] and offs[hi] - offs[hi - 1] == step:
                hi += 1
        runs.append((lo, hi, step))
        lo = hi
    return runs


def _uniform_stack(ts: Sequence[torch.Tensor], writable: bool = False) -> Optional[torch.Tensor]:
    """An ``(n, *shape)`` view over tensors that are equally spaced views of one storage with equal strides (the
    experts of a stacked parameter, a flat parameter buffer), else None. ``writable``: the views must not overlap."""
    t0 = ts[0]
    if len(ts) == 1:
        return t0.unsqueeze(0)
    try:
        base = (t0.untyped_storage().data_ptr(), t0.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return None
    for t in ts:
        if (type(t) not in (torch.Tensor, torch.nn.Parameter) or t.dtype != t0.dtype or t.shape != t0.shape
                or t.stride() != t0.stride() or t.device != t0.device
                or (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) != base):
            return None
    step = ts[1].storage_offset() - t0.storage_offset()
    if step <= 0 or any(t.storage_offset() != t0.storage_offset() + i * step for i, t in enumerate(ts)):
        return None
    if writable:
        span = sum((d - 1) * st for d, st in zip(t0.shape, t0.stride())) + 1
        if step < span:
            return None
    return t0.as_strided((len(ts), *t0.shape), (step, *t0.stride()), t0.storage_offset())


def quantize_state_dict(named_tensors: NamedTensors, *, scale_fmt: str = "fp32",
                        skip: Union[None, Callable[[str], bool], str, Sequence[str]] = default_skip,
                        bucket_bytes: Optional[int] = None, out: Optional[Mapping] = None,
                        staging_bytes: Optional[int] = None, reuse_buffers: Optional[bool] = None,
                        batch: bool = True) -> QuantizedStateDict:
    """Quantize a model's linear and expert weights to 128x128 block FP8 and pass the rest through.

    Args:
        named_tensors: a state dict or an iterable of ``(name, tensor)`` (``model.named_parameters()``), any devices.
        scale_fmt: ``"fp32"`` or ``"ue8m0"`` (power-of-two scales, stored as float32).
        skip: what stays in high precision besides names that are not linear/expert weights: ``default_skip``
            (embeddings, ``lm_head``, norms, router ``gate``, biases), a callable ``name -> bool`` used instead, regular
            expressions searched in addition to ``default_skip``, or None.
        bucket_bytes: None -> yield ``(name, tensor)`` pairs; an int -> yield buckets (lists of pairs) of at most
            that many payload bytes (FP8 + scales + passed-through tensors; a tensor larger than a bucket comes alone).
        out: ``name -> tensor`` (e.g. ``dict(engine_model.named_parameters())``): an FP8 weight whose name and scale
            name are both in ``out`` is written into those tensors in place (any strides; shapes and dtypes must
            match), a passed-through tensor in ``out`` is copied into it; neither is yielded.
        staging_bytes: 0 -> one launch per same-shape tensor that is not part of a run of views of one storage
            (for comparison); any other value: those tensors share one address-table launch (no staging copy; the
            size itself is no longer used).
        reuse_buffers: whether each bucket reuses the previous bucket's storage (default: True with
            ``bucket_bytes``). Then a bucket's tensors are valid until the next bucket is requested: consume
            (copy, send, ``load_weights``) a bucket before asking for the next one, on the current CUDA stream.
        batch: False -> one quantizer launch per tensor (for comparison; ~40x slower on many small tensors).

    Names: a quantized ``x.weight`` yields ``x.weight`` (float8_e4m3fn, shape of the input, contiguous) and
    ``x.weight_scale_inv`` (float32 ``(..., ceil(N/128), ceil(K/128))``); the name rule is ``scale_name``. A stacked
    ``w13`` whose halves are not 128-aligned has its gate and up halves quantized separately (scale rows
    ``2 * ceil(I/128)``, vLLM's layout).

    Memory: extra device memory is one bucket buffer (``bucket_bytes``), a few bytes of address tables and, for a
    tensor larger than a bucket, that tensor's outputs. Errors (raised while iterating, naming the tensor): a
    tensor named for quantization that is FP8, of another dtype than bf16/fp16/fp32, or not 2-D/3-D; duplicate
    names; ``out`` entries of the wrong shape/dtype/device or a weight without its scale.

    Returns a ``QuantizedStateDict``: iterate it once; its ``quantization_config`` (for ``config.json``) and
    ``stats`` are complete after that.
    """
    return QuantizedStateDict(named_tensors, scale_fmt=scale_fmt, skip=skip, bucket_bytes=bucket_bytes, out=out,
                              staging_bytes=staging_bytes, reuse_buffers=reuse_buffers, batch=batch)


class WeightSyncPlan:
    """A weight sync prepared once and replayed every optimizer step: ``quantize_state_dict``'s output, without its
    per-tensor host work.

    ``quantize_state_dict`` classifies, groups and checks every tensor on every call: ~7-10 us of Python a tensor,
    which bounds a model with per-expert parameters (18.6k expert tensors in Qwen3-30B-A3B) by the host, not by the
    bytes. The plan does that once: building it runs one sync (with ``quantize_state_dict``'s arguments), recording
    every launch (a stack view, an address table of separate tensors, an in-place copy) and every bucket it
    yielded. ``run()`` then repeats the launches and yields the same buckets: a few launches per bucket (one per
    shape group), the same output bytes as a fresh ``quantize_state_dict`` of the updated weights.

    The plan is bound to the tensors it was built from: they must stay alive and in place (an optimizer's in-place
    update keeps them). ``run()`` checks that every tensor still has its address (``check=True``, ~0.2 us a tensor;
    a reallocated parameter raises ``RuntimeError`` naming it: build a new plan). Outputs are rewritten by each
    ``run()``: a yielded bucket is valid until the next bucket (``reuse_buffers``, the default with buckets) and at
    the latest until the next ``run()``. The plan keeps the bucket buffer and the outputs of tensors larger than a
    bucket allocated between runs.

    Usage::

        plan = fp8_deep.WeightSyncPlan(policy.named_parameters(), bucket_bytes=1 << 30)   # once (a first sync)
        for step in ...:
            optimizer.step()
            for bucket in plan.run():       # the same names and buffers every step, the new weights' bytes
                engine.load_weights(bucket)
    """

    def __init__(self, named_tensors: NamedTensors, *, scale_fmt: str = "fp32",
                 skip: Union[None, Callable[[str], bool], str, Sequence[str]] = default_skip,
                 bucket_bytes: Optional[int] = None, out: Optional[Mapping] = None,
                 reuse_buffers: Optional[bool] = None, check: bool = True):
        if isinstance(named_tensors, Mapping):
            named = list(named_tensors.items())
        elif isinstance(named_tensors, torch.Tensor) or isinstance(named_tensors, (str, bytes)):
            named = named_tensors  # QuantizedStateDict raises its TypeError
        else:
            named = list(named_tensors)
        sync = QuantizedStateDict(named, scale_fmt=scale_fmt, skip=skip, bucket_bytes=bucket_bytes, out=out,
                                  staging_bytes=None, reuse_buffers=reuse_buffers, batch=True)
        sync._ops = []
        for _ in sync:  # the first sync: its launches and buckets are recorded (and its outputs computed)
            pass
        if sync._ops:  # in-place writes after the last yielded bucket
            sync._entries.append((sync._ops, None))
        sync._ops = None
        self._sync = sync
        self.bucket_bytes = bucket_bytes
        self.check = bool(check)
        self._watched = [(n, t, t.data_ptr()) for n, t in named if isinstance(t, torch.Tensor)]
        if out is not None:
            self._watched += [(f"out[{n!r}]", t, t.data_ptr()) for n, t in out.items() if isinstance(t, torch.Tensor)]
        self.stats = dict(sync.stats)
        self.stats["recorded_ops"] = sum(len(ops) for ops, _ in sync._entries)
        self.stats["runs"] = 0

    @property
    def quantization_config(self) -> dict:
        return self._sync.quantization_config

    def run(self):
        """One sync: yields what ``quantize_state_dict`` yields (pairs, or buckets with ``bucket_bytes``), each
        bucket's launches running as it is requested. A plan that yields nothing (every tensor written in place
        through ``out=``) does all its work in this call and returns an empty iterator."""
        if self.check:
            for name, t, ptr in self._watched:
                if t.data_ptr() != ptr:
                    raise RuntimeError(f"{name} has moved in memory since the WeightSyncPlan was built (reassigned "
                                       f"or reallocated): build a new plan")
        self.stats["runs"] += 1
        if all(pairs is None for _, pairs in self._sync._entries):
            with torch.no_grad():
                for ops, _ in self._sync._entries:
                    for op in ops:
                        op()
            return iter(())
        return self._replay()

    def _replay(self):
        # no_grad around the launches only: a generator's context would leak into the consumer between yields
        for ops, pairs in self._sync._entries:
            with torch.no_grad():
                for op in ops:
                    op()
            if pairs is None:
                continue
            if self.bucket_bytes is None:
                yield from pairs
            else:
                yield list(pairs)  # the consumer's list: changing it must not change the next run's


# ------------------------------------------------------------------------------------------------ tensor parallel
def quantize_tp_shard(name: str, shard: torch.Tensor, *, parallel: str, rank: int, world_size: int,
                      full_size: Optional[int] = None, offset: Optional[int] = None, scale_fmt: str = "fp32",
                      out=None):
    """Quantize one tensor-parallel shard exactly as the full tensor would have been quantized (bitwise).

    ``parallel="column"`` shards the output dim N (``shard`` is ``(..., N_r, K)``), ``"row"`` the input dim K.
    The shard covers ``[offset, offset + size)`` of the full dim, ``offset = rank * size`` for an even split (or
    given). Both edges must fall on 128 (or the end edge on the full tensor's end, where the quantizer's ragged edge
    applies); otherwise a 128x128 block straddles two ranks and the shard's scales could not equal the full
    tensor's, and a ``ValueError`` names the tensor. Returns ``(q, scale)`` equal to
    ``q_full[..., rows, :]`` and ``scale_full[..., offset // 128 : ceil((offset + size) / 128), :]`` (column).
    """
    if parallel not in ("column", "row"):
        raise ValueError(f"{name}: parallel must be 'column' or 'row', got {parallel!r}")
    _check_quantizable(name, shard)
    for v, what in ((rank, "rank"), (world_size, "world_size")):
        if type(v) is not int:
            raise TypeError(f"{name}: {what} must be an int, got {v!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"{name}: rank {rank} is not in [0, world_size={world_size})")
    dim = -2 if parallel == "column" else -1
    size = shard.shape[dim]
    start = rank * size if offset is None else offset
    full = size * world_size if full_size is None else full_size
    end = start + size
    if start < 0 or end > full:
        raise ValueError(f"{name}: shard [{start}, {end}) of dim {'N' if dim == -2 else 'K'} lies outside the full "
                         f"size {full}")
    if start % BLOCK or (end % BLOCK and end != full):
        raise ValueError(f"{name}: {parallel}-parallel shard [{start}, {end}) of {'N' if dim == -2 else 'K'}="
                         f"{full} (rank {rank} of {world_size}) does not start and end on multiples of {BLOCK}: a "
                         f"128x128 block would span two ranks, so the shard cannot be quantized as the full tensor "
                         f"is. Quantize the full tensor and slice, or shard on 128-multiples")
    return quantize_weight_blockwise(shard, scale_fmt=scale_fmt, out=out)


# ------------------------------------------------------------------------------------------------ checkpoint I/O
INDEX_NAME = "model.safetensors.index.json"


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as exc:
        raise ImportError("checkpoint I/O needs safetensors: pip install safetensors "
                          "(or pip install 'fp8_deep[export]')") from exc
    return st


def _config_dict(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"config must be a dict, an object with to_dict() (a transformers config) or None, "
                    f"got {type(config).__name__}")


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor owning its storage (safetensors refuses tensors that share memory; bucket outputs are views)."""
    t = t.detach()
    if t.device.type != "cpu":
        return t.to("cpu")
    return t.clone(memory_format=torch.contiguous_format)


def save_fp8_checkpoint(directory, named_tensors: NamedTensors, config=None, *, quantize: bool = True,
                        scale_fmt: str = "fp32", skip=default_skip, max_shard_bytes: int = 5 * 2 ** 30,
                        bucket_bytes: Optional[int] = None, quantization_config: Optional[dict] = None) -> dict:
    """Write a block-FP8 checkpoint: ``model-0000i-of-0000n.safetensors`` shards, ``model.safetensors.index.json``
    and ``config.json`` (``config`` plus ``quantization_config``), the layout transformers and vLLM load.

    ``named_tensors``: high-precision weights (quantized here through ``quantize_state_dict``, in buckets of
    ``bucket_bytes``, default ``min(max_shard_bytes, 1 GiB)``: device memory stays bounded), or, with
    ``quantize=False``, tensors written as given (e.g. a ``quantize_state_dict`` stream's pairs; then pass its
    ``quantization_config``). ``config``: a dict, a transformers config (``to_dict()``) or None.
    Returns the index dict (``metadata.total_size``, ``weight_map``). Needs ``safetensors``.
    """
    st = _safetensors()
    if type(max_shard_bytes) is not int or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    cfg = _config_dict(config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if quantize:
        stream = quantize_state_dict(named_tensors, scale_fmt=scale_fmt, skip=skip,
                                     bucket_bytes=bucket_bytes or min(max_shard_bytes, 1 << 30))
        pairs = (p for bucket in stream for p in bucket)
    else:
        stream = None
        pairs = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    for old in directory.glob("model-*-of-*.safetensors"):  # a previous export's shards would shadow nothing but
        old.unlink()                                          # stay behind: remove them
    shards: List[Path] = []
    weight_map: Dict[str, int] = {}
    current: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    cur_bytes, total = 0, 0

    def flush():
        nonlocal current, cur_bytes
        if not current:
            return
        path = directory / f".shard-{len(shards):05d}.tmp"
        st.save_file(current, str(path), metadata={"format": "pt"})
        shards.append(path)
        current, cur_bytes = OrderedDict(), 0

    for name, t in pairs:
        if name in weight_map or name in current:
            raise ValueError(f"{name}: the name appears twice")
        nbytes = t.numel() * t.element_size()
        if current and cur_bytes + nbytes > max_shard_bytes:
            flush()
        current[name] = _host_copy(t)
        weight_map[name] = len(shards)
        cur_bytes += nbytes
        total += nbytes
    flush()
    n = len(shards)
    names = []
    for i, tmp in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(tmp, directory / final)
        names.append(final)
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in weight_map.items()}}
    with open(directory / INDEX_NAME, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    if quantization_config is None:
        quantization_config = (stream.quantization_config if stream is not None
                               else fp8_quantization_config(scale_fmt=scale_fmt))
    cfg["quantization_config"] = quantization_config
    with open(directory / "config.json", "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return index


def load_fp8_checkpoint(directory, *, device: Union[str, torch.device] = "cpu") -> Tuple[Dict[str, torch.Tensor], dict]:
    """Read a checkpoint written by ``save_fp8_checkpoint`` (or any safetensors checkpoint with an index or a single
    ``model.safetensors``): ``(tensors, config)``, tensors in the index's name order on ``device``."""
    st = _safetensors()
    directory = Path(directory)
    index_path = directory / INDEX_NAME
    if index_path.exists():
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = list(OrderedDict.fromkeys(weight_map.values()))
    elif (directory / "model.safetensors").exists():
        weight_map, files = None, ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{directory}: neither {INDEX_NAME} nor model.safetensors found")
    tensors: Dict[str, torch.Tensor] = {}
    for fname in files:
        tensors.update(st.load_file(str(directory / fname), device=str(device)))
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"{directory}: tensors listed in the index but missing from the shards: {missing[:5]}")
        tensors = {k: tensors[k] for k in weight_map}
    config = {}
    if (directory / "config.json").exists():
        with open(directory / "config.json") as f:
            config = json.load(f)
    return tensors, config


# ------------------------------------------------------------------------------------------------ MoE stacks
def fp8_expert_stacks(tensors: Mapping, prefix: str):
    """One MoE layer's FP8 experts as ``(w13, w13_scale, w2, w2_scale)``, the stacks ``FP8MoE.load_fp8_`` takes:
    ``w13`` float8 ``(E, 2I, H)`` (gate rows first), ``w13_scale`` float32 ``(E, ceil(2I/128), ceil(H/128))``,
    ``w2`` ``(E, H, I)``, ``w2_scale``. ``prefix`` is the MoE module's name (``"model.layers.3.mlp"``); the experts
    may be stored as ``{prefix}.w13`` / ``.w2`` (FP8MoE), ``{prefix}.experts.w13_weight`` / ``w2_weight`` (vLLM),
    ``{prefix}.experts.gate_up_proj`` / ``down_proj`` (transformers 5) or per expert
    ``{prefix}.experts.{e}.gate_proj/up_proj/down_proj.weight`` (per-expert gate/up concatenated: needs
    ``I % 128 == 0``, else a block row would mix gate and up)."""
    for w13n, w2n in (("w13", "w2"), ("experts.w13_weight", "experts.w2_weight"),
                      ("experts.gate_up_proj", "experts.down_proj")):
        a, b = f"{prefix}.{w13n}", f"{prefix}.{w2n}"
        if a in tensors and b in tensors:
            return tensors[a], tensors[scale_name(a)], tensors[b], tensors[scale_name(b)]
    pat = re.compile(re.escape(prefix) + r"\.experts\.(\d+)\.gate_proj\.weight$")
    ids = sorted(int(m.group(1)) for m in (pat.match(k) for k in tensors) if m)
    if not ids:
        raise KeyError(f"no FP8 experts under {prefix!r} (looked for w13/w2, experts.w13_weight, experts.gate_up_proj "
                       f"and experts.{{e}}.gate_proj.weight)")
    if ids != list(range(len(ids))):
        raise KeyError(f"{prefix}: expert ids are not 0..{len(ids) - 1}: {ids[:8]}...")

    def get(e, proj):
        n = f"{prefix}.experts.{e}.{proj}.weight"
        if n not in tensors or scale_name(n) not in tensors:
            raise KeyError(f"{n} or its scale {scale_name(n)} is missing")
        return tensors[n], tensors[scale_name(n)]

    inter = get(0, "gate_proj")[0].shape[0]
    if inter % BLOCK:
        raise ValueError(f"{prefix}: intermediate size {inter} is not a multiple of {BLOCK}: per-expert gate and up "
                         f"cannot be concatenated into one block-FP8 w13 (a block row would mix them)")
    w13 = torch.stack([torch.cat([get(e, "gate_proj")[0], get(e, "up_proj")[0]]) for e in ids])
    w13_s = torch.stack([torch.cat([get(e, "gate_proj")[1], get(e, "up_proj")[1]]) for e in ids])
    w2 = torch.stack([get(e, "down_proj")[0] for e in ids])
    w2_s = torch.stack([get(e, "down_proj")[1] for e in ids])
    return w13, w13_s, w2, w2_s
