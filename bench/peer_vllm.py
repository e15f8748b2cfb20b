"""Peer harness (issue 24, item 1): vLLM's block-FP8 fused-MoE Triton kernel against ``fp8_deep.moe_forward``.

Where the kernel comes from
    The installed ``vllm`` when it imports (``vllm.model_executor.layers.fused_moe.fused_moe.fused_moe_kernel``, its
    tuned configs beside it); otherwise ``.vllm/fused_moe.py`` from ``tools/fetch_vllm_moe.sh`` (git-ignored, carried
    to the GPU machine). That file imports vLLM internals, so it is never imported: ``fused_moe_kernel`` and the
    ``@triton.jit`` helpers it calls (``write_zeros_to_output``) are cut out with ``ast`` and executed in a namespace
    holding only ``triton`` and ``tl``, at their original line numbers and under the file's own name (Triton reads
    a kernel's source back with ``inspect``; tracebacks point into the fetched file).

How vLLM launches it (read in vLLM 0.34.0's ``fused_experts_impl``, ``_prepare_expert_assignment``,
``invoke_fused_moe_triton_kernel``, ``try_get_optimal_moe_config``, ``get_default_config``; reproduced here)
    * Config: the tuned JSON ``E={E},N={I},device_name={card},dtype=fp8_w8a8,block_shape=[128,128].json`` (N is
      ``w2.shape[2]``; card = ``torch.cuda.get_device_name()`` with runs of spaces/slashes made ``_``, any H200 named
      ``NVIDIA_H200``; ``VLLM_TUNED_CONFIG_FOLDER`` is searched first), entry with the batch-size key closest to
      M = T tokens (first of equals in file order); without a file, ``get_default_config``'s block-FP8 branch
      (``default_config``). The same config serves both GEMMs. ``BLOCK_SIZE_K`` is capped at 128.
    * Routing: ``moe_align_block_size`` (``moe_align_block_size`` below, plain torch: it is not timed) -- except when
      ``T * top_k * 4 <= E`` (no expert map), where vLLM skips the alignment ("naive block assignment": one
      BLOCK_SIZE_M block per routed pair, ``sorted_token_ids=None``, ``expert_ids = topk_ids.view(-1)``,
      ``num_tokens_post_padded = T * top_k * BLOCK_SIZE_M``).
    * Grid ``cdiv(EM, BLOCK_SIZE_M) * cdiv(N, BLOCK_SIZE_N)``; EM = ``sorted_token_ids.numel()``, cut to
      ``rows * top_k * BLOCK_SIZE_M`` when the GEMM's A has fewer rows than BLOCK_SIZE_M; naive: ``T*k*BLOCK_SIZE_M``.
    * SWAP_AB (``fused_moe/utils.py: enable_swap_ab``, copied by hand: that file is not fetched): compute capability
      exactly 9.0 and ``BLOCK_SIZE_M < 64`` and ``BLOCK_SIZE_N >= 64``.
    * TMA for B (``USE_TMA_B``): the config's ``USE_TMA`` (default true) and CUDA capability 9.x or 10.x and B
      contiguous with ``N % BLOCK_SIZE_N == 0`` and ``K % BLOCK_SIZE_K == 0``: a host ``TensorDescriptor`` of block
      ``[1, BLOCK_SIZE_N, BLOCK_SIZE_K]`` over ``(E, N, K)``, built at every launch as vLLM does, with vLLM's torch
      allocator set. A kernel without a ``b_desc`` parameter (0.26.0's has none) has no TMA path: it is then off.
    * Not reproduced: ``USE_TD`` (tensor-descriptor gather; vLLM turns it on only on XPU or by env, never for
      quantized weights) and the sorted-A path of ``TritonExperts`` (``experts/triton_moe.py``: GEMM1 writes rows
      in sorted order, a fused SiLU+quant kernel, GEMM2 loads A by TMA with the ``*_down.json`` tiles), which vLLM
      takes only on capability 9.0 with DeepGEMM's UE8M0 scales in use, a ``_down.json`` entry with ``USE_TMA`` for
      the shape (0.34.0 ships them for E=256, N=256/512, H200 only) and ``H >= 4096``: it is a different
      activation format (power-of-two scales) from the float32 one compared here. ``expert_map`` is not supported.
    ``launch_logic_note()`` fingerprints the fetched file's launch functions and says when they differ from 0.34.0's.

Triton versions: 0.34.0's kernel indexes a scalar as ``b_scale[None, :]`` / ``b_scale[:, None]`` (its per-block
weight scale when ``BLOCK_SIZE_N`` divides 128, i.e. always here). Triton 3.6 (the GPU machine's) makes both a
``[1]`` tensor; Triton 3.9 rejects them ("too many indices for tensor of rank 0"; ``expand_dims`` of a scalar at
axis 1: "invalid axis 1"). ``triton_getitem_compat`` gives ``tensor.__getitem__`` 3.6's rule back, only while
a vLLM launch (and its compilation) runs and only on a Triton that has the check: the same IR as on 3.6.

What runs between the two launches (plain torch, not timed)
    ``per_token_group_quant_fp8`` semantics: 1x128 groups, ``s = max(amax, 1e-10) / 448`` (float32, row-major
    ``(M, K/128)``), ``q = fp8(clamp(x / s, -448, 448))``; SwiGLU ``silu(gate).to(bf16) * up`` (gate = first I
    columns of GEMM1's ``(T*top_k, 2I)`` output); GEMM2 multiplies the routing weight in its epilogue
    (``MUL_ROUTED_WEIGHT``) into ``(T, top_k, H)``; the output is its sum over top_k (vLLM's ``ops.moe_sum``).

Timing: ``VllmPeer.gemms_fn()`` is the two launches on pre-built buffers (what vLLM's kernel costs); it is timed
against the complete ``fp8_deep.moe_forward`` (quantization, routing, both GEMMs, SwiGLU, combine), eager and
CUDA-graph replayed: ``ratio = vLLM ms / ours ms`` (> 1: ours is faster while doing more); and against our two
grouped-GEMM launches alone on the operands our forward prepares (``ours_gemms_fn``): ``ratio_gemms``, GEMM for GEMM.

    python bench/peer_vllm.py --check                          # peer output vs fp8_deep.moe_forward (CPU: interpreter)
    python bench/peer_vllm.py --bench --time-budget 420        # GPU: issue 24's shapes, T = 1..8192
    python bench/peer_vllm.py --bench --shapes dsv3-tp8 --T 1,256
"""
from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import hashlib
import importlib
import importlib.util
import json
import math
import os
import time
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py when run as a script

import torch  # noqa: E402

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import _common as C  # noqa: E402

VLLM_DIR = C.REPO_DIR / ".vllm"
FETCH_HINT = "run `bash tools/fetch_vllm_moe.sh` (needs network) and carry .vllm/ to the GPU machine, or install vllm"
LAUNCH_LOGIC_VERSION = "0.34.0"  # the vLLM whose launch code this module reproduces (see the module docstring)
KERNEL_NAME = "fused_moe_kernel"
BLOCK_SHAPE = (128, 128)
DTYPE_STR = "fp8_w8a8"
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
ACT_EPS = 1e-10  # per_token_group_quant_fp8's eps
# syntax-tree fingerprints (comments/formatting/Python-version-insensitive) of the launch functions in vLLM 0.34.0's fused_moe.py
LAUNCH_FUNCTIONS_0_34_0 = {
    "invoke_fused_moe_triton_kernel": "5b3bf321966536b1",
    "get_default_config": "a8d77fb797f3c060",
    "_prepare_expert_assignment": "9a19551a8e343f03",
    "try_get_optimal_moe_config": "92960998c249afa6",
    "_get_configured_moe_config": "97c9785180046756",
    "get_config_file_name": "010cbc9375df14e6",
}


# ----------------------------------------------------------------------------------------------------------------------
# the kernel: installed vllm, or cut out of .vllm/fused_moe.py
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class VllmKernel:
    kernel: object          # the @triton.jit fused_moe_kernel
    version: str
    origin: str             # where it came from, for the notes and the CSV
    configs_dir: Path       # vLLM's tuned-config folder (.vllm/configs or the installed package's)
    source: str             # the text of fused_moe.py
    params: Tuple[str, ...] = ()

    @property
    def has_tma(self) -> bool:
        return "b_desc" in self.params and "USE_TMA_B" in self.params


def _fetched_version(vllm_dir: Path) -> str:
    try:
        for line in (vllm_dir / "VERSION").read_text().splitlines():
            if line.startswith("version="):
                return line.split("=", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _is_triton_jit(dec: ast.expr) -> bool:
    """``@triton.jit`` or ``@triton.jit(...)`` (or ``@jit``)."""
    node = dec.func if isinstance(dec, ast.Call) else dec
    return (isinstance(node, ast.Attribute) and node.attr == "jit") or (isinstance(node, ast.Name) and node.id == "jit")


def _free_names(fn: ast.FunctionDef) -> List[str]:
    """Names a function reads that it neither takes as a parameter nor assigns (its globals), in order of use."""
    a = fn.args
    bound = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}
    bound |= {x.arg for x in (a.vararg, a.kwarg) if x is not None}
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
    out: List[str] = []
    body = ast.Module(body=fn.body, type_ignores=[])
    for node in ast.walk(body):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in bound \
                and node.id not in out and not hasattr(builtins, node.id):
            out.append(node.id)
    return out


def extract_jit_functions(source: str, filename: str, names: Sequence[str] = (KERNEL_NAME,)) -> Dict[str, object]:
    """Cut the ``@triton.jit`` functions ``names`` and every ``@triton.jit`` function they call out of ``source``
    (module text) and execute them in a namespace with ``triton`` and ``tl`` only. Lines keep their numbers and
    ``filename`` is the code's file name, so ``inspect.getsource`` (which Triton uses) reads them back from the
    file. Raises ValueError when a function needs any other global (the file would have to be imported)."""
    import triton
    import triton.language as tl
    tree = ast.parse(source)
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    jitted = {k for k, n in defs.items() if any(_is_triton_jit(d) for d in n.decorator_list)}
    provided = {"triton", "tl"}
    keep: List[str] = []
    todo = list(names)
    while todo:
        name = todo.pop(0)
        if name in keep:
            continue
        if name not in jitted:
            raise ValueError(f"{filename} has no @triton.jit function {name!r} (has: {sorted(jitted)})")
        keep.append(name)
        for g in _free_names(defs[name]):
            if g in jitted:
                todo.append(g)
            elif g not in provided:
                raise ValueError(f"{name} in {filename} reads the global {g!r}, which is not a @triton.jit function "
                                 f"of the file nor triton/tl: this harness cannot run it without importing vLLM")
    lines = source.splitlines(keepends=True)
    out = ["\n"] * len(lines)
    for name in keep:
        node = defs[name]
        start = min([d.lineno for d in node.decorator_list] + [node.lineno])
        out[start - 1:node.end_lineno] = lines[start - 1:node.end_lineno]
    ns = {"triton": triton, "tl": tl, "__name__": "fp8_deep_peer_vllm_fused_moe", "__file__": filename}
    exec(compile("".join(out), filename, "exec"), ns)
    return {name: ns[name] for name in keep}


def _kernel_params(kernel) -> Tuple[str, ...]:
    names = getattr(kernel, "arg_names", None)
    if names is None:
        import inspect
        names = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)
    return tuple(names)


_KERNELS: Dict[str, VllmKernel] = {}


def vllm_importable() -> bool:
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def load_vllm_kernel(source: str = "auto", vllm_dir: Path = VLLM_DIR) -> VllmKernel:
    """vLLM's ``fused_moe_kernel``. ``source``: ``"installed"`` (import vllm), ``"fetched"`` (``.vllm/``), or
    ``"auto"`` (installed when ``vllm`` is importable, else fetched). Raises ImportError naming the fix."""
    if source not in ("auto", "installed", "fetched"):
        raise ValueError(f"source must be 'auto', 'installed' or 'fetched', got {source!r}")
    key = f"{source}:{Path(vllm_dir).resolve()}"
    if key in _KERNELS:
        return _KERNELS[key]
    errors = []
    if source in ("auto", "installed") and vllm_importable():
        try:
            mod = importlib.import_module("vllm.model_executor.layers.fused_moe.fused_moe")
            import vllm
            path = Path(mod.__file__)
            k = VllmKernel(kernel=getattr(mod, KERNEL_NAME), version=str(getattr(vllm, "__version__", "unknown")),
                           origin=f"installed vllm ({path})", configs_dir=path.parent / "configs",
                           source=path.read_text())
        except Exception as exc:  # a vllm that does not import on this machine (wrong torch, no CUDA build)
            if source == "installed":
                raise ImportError(f"vllm is installed but its fused_moe does not import: {exc!r}") from exc
            errors.append(f"installed vllm did not import ({type(exc).__name__}: {str(exc)[:160]})")
        else:
            k.params = _kernel_params(k.kernel)
            _KERNELS[key] = k
            return k
    elif source == "installed":
        raise ImportError("vllm is not importable (source='installed'); " + FETCH_HINT)
    path = Path(vllm_dir) / "fused_moe.py"
    if not path.is_file():
        errors.append(f"{path} is missing")
        raise ImportError("vLLM's fused-MoE kernel is not available: " + "; ".join(errors) + "; " + FETCH_HINT)
    text = path.read_text()
    fns = extract_jit_functions(text, str(path.resolve()))
    k = VllmKernel(kernel=fns[KERNEL_NAME], version=_fetched_version(Path(vllm_dir)),
                   origin=f"{path} (cut out with ast)" + (f"; {errors[0]}" if errors else ""),
                   configs_dir=Path(vllm_dir) / "configs", source=text)
    k.params = _kernel_params(k.kernel)
    _KERNELS[key] = k
    return k


def _fingerprint(node: ast.FunctionDef) -> str:
    """A hash of the function's syntax tree (arguments and body): blind to comments, formatting and the Python
    version (tokens are not: 3.12 splits f-strings into several tokens; 3.13's ``ast.dump`` hides empty fields
    unless ``show_empty``)."""
    kw = {"show_empty": True} if sys.version_info >= (3, 13) else {}
    dump = ast.dump(node.args, **kw) + "".join(ast.dump(b, **kw) for b in node.body)
    return hashlib.sha256(dump.encode()).hexdigest()[:16]


def launch_fingerprints(source: str) -> Dict[str, Optional[str]]:
    """Version-independent hashes of the launch functions this module reproduces."""
    tree = ast.parse(source)
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    return {name: (_fingerprint(defs[name]) if name in defs else None) for name in LAUNCH_FUNCTIONS_0_34_0}


def launch_logic_note(k: VllmKernel) -> str:
    """Empty when the kernel's file has vLLM 0.34.0's launch functions, else which ones differ (re-read them)."""
    fp = launch_fingerprints(k.source)
    diff = [n for n, h in fp.items() if h != LAUNCH_FUNCTIONS_0_34_0[n]]
    if not diff:
        return ""
    return (f"vLLM {k.version}'s {', '.join(diff)} differ from {LAUNCH_LOGIC_VERSION}'s, whose launch logic this "
            f"harness reproduces: re-read them ({k.origin})")


def _getitem_has_rank_check(fn) -> bool:
    import inspect
    try:
        return "too many indices" in inspect.getsource(inspect.unwrap(fn))
    except (OSError, TypeError):
        return False


def _getitem_triton36():
    """``tensor.__getitem__`` with Triton 3.6's rule: ``None`` inserts a unit dimension, a full slice ``:`` passes
    (so a scalar's ``[None, :]`` and ``[:, None]`` are both ``[1]``); anything else is refused."""
    from triton.language import core

    @core.builtin
    def __getitem__(self, slices, _semantic=None):
        if isinstance(slices, (builtins.slice, core.slice, core.constexpr)) or slices is None:
            slices = [slices]
        if isinstance(slices, core.tuple):
            slices = slices.values
        ret = self
        for dim, sl in enumerate(slices):
            if core._unwrap_if_constexpr(sl) is None:
                # 3.6's expand_dims inserted past the end of a scalar's empty shape (list.insert): same as axis 0
                ret = _semantic.expand_dims(ret, dim if ret.type.is_block() else 0)
            elif not (isinstance(sl, (builtins.slice, core.slice))
                      and all(core._unwrap_if_constexpr(a) is None for a in (sl.start, sl.stop, sl.step))):
                raise ValueError(f"unsupported tensor index: {sl}")
        return ret
    return __getitem__


@contextlib.contextmanager
def triton_getitem_compat():
    """While it is open, a Triton whose ``tensor.__getitem__`` refuses a scalar's ``[None, :]`` (3.9) indexes with
    Triton 3.6's rule instead (see the module docstring); a no-op on a Triton without that check."""
    from triton.language import core
    orig = core.tensor.__dict__["__getitem__"]
    if not _getitem_has_rank_check(orig):
        yield
        return
    core.tensor.__getitem__ = _getitem_triton36()
    try:
        yield
    finally:
        core.tensor.__getitem__ = orig


# ----------------------------------------------------------------------------------------------------------------------
# vLLM's host-side launch decisions
# ----------------------------------------------------------------------------------------------------------------------
def card_file_name(raw: str) -> str:
    """A card's name as vLLM's config files spell it: runs of spaces/slashes -> ``_``
    (``get_device_name_as_file_name``), any H200 -> ``NVIDIA_H200`` (``get_config_file_name``)."""
    name = re.sub(r"[\s/]+", "_", raw)
    return "NVIDIA_H200" if "H200" in name.split("_") else name


def device_file_name(device: Optional[torch.device] = None) -> str:
    """``card_file_name`` of this CUDA device ("cpu" without one: no tuned file matches)."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return "cpu"
    return card_file_name(torch.cuda.get_device_name(device))


def config_file_name(E: int, N: int, device_name: str) -> str:
    bn, bk = BLOCK_SHAPE
    return f"E={E},N={N},device_name={device_name},dtype={DTYPE_STR},block_shape=[{bn},{bk}].json"


def tuned_configs(configs_dir: Path, E: int, N: int, device_name: str) -> Tuple[Optional[Dict[int, dict]], str]:
    """vLLM's ``get_moe_configs``: the tuned table (batch size -> config) and its file, or (None, "")."""
    fname = config_file_name(E, N, device_name)
    folders = [os.environ["VLLM_TUNED_CONFIG_FOLDER"]] if os.environ.get("VLLM_TUNED_CONFIG_FOLDER") else []
    for folder in folders + [str(configs_dir)]:
        path = Path(folder) / fname
        if path.is_file():
            table = json.loads(path.read_text())
            table.pop("triton_version", None)
            return {int(m): cfg for m, cfg in table.items()}, str(path)
    return None, ""


def default_config(M: int) -> dict:
    """``get_default_config``'s block-FP8 branch (CUDA; vLLM 0.34.0), M = tokens."""
    if M <= 8 and BLOCK_SHAPE[0] % 64 == 0:
        block_n, num_stages = 64, (4 if M <= 4 else 3)
    else:
        block_n, num_stages = BLOCK_SHAPE[0], 3
    return {"BLOCK_SIZE_M": 16 if M <= 64 else 64, "BLOCK_SIZE_N": block_n, "BLOCK_SIZE_K": BLOCK_SHAPE[1],
            "GROUP_SIZE_M": 1 if M <= 16 else 32, "SPLIT_K": 1, "num_warps": 4, "num_stages": num_stages}


def select_config(E: int, N: int, M: int, configs_dir: Path, device_name: str) -> Tuple[dict, str]:
    """``try_get_optimal_moe_config``: (config, where it came from). N = I (``w2.shape[2]``), M = T."""
    table, path = tuned_configs(configs_dir, E, N, device_name)
    if table:
        key = min(table.keys(), key=lambda m: abs(m - M))
        return dict(table[key]), f"tuned {Path(path).name} [{key}]"
    return default_config(M), "default"


def enable_swap_ab(block_m: int, block_n: int, device: torch.device) -> bool:
    """``fused_moe/utils.py: enable_swap_ab`` (0.26.0-0.34.0): capability exactly 9.0, BLOCK_M < 64, BLOCK_N >= 64."""
    if torch.device(device).type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) == (9, 0) and block_m < 64 and block_n >= 64


def _tma_capable(device: torch.device) -> bool:
    """``is_device_capability_family(90)`` or ``(100)`` on CUDA."""
    return torch.device(device).type == "cuda" and torch.cuda.get_device_capability(device)[0] in (9, 10)


def moe_align_block_size(topk_ids: torch.Tensor, block_size: int, num_experts: int):
    """vLLM's ``moe_align_block_size`` (no expert map), in plain torch: ``sorted_token_ids`` int32 of vLLM's size
    ``numel + E*(block_size-1)`` (``min(.., numel*block_size)`` when ``numel < E``), flat choice indices grouped by
    expert, each expert's run padded to a multiple of ``block_size`` with the sentinel ``numel``; ``expert_ids``
    int32 per block (-1 past the used ones); ``num_tokens_post_padded`` int32 (1,). Inside an expert the choices
    keep ascending order (vLLM's op orders them by atomics; the rows are the same set, so the GEMM outputs are too)."""
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    numel = flat.numel()
    max_padded = numel + num_experts * (block_size - 1)
    if numel < num_experts:
        max_padded = min(numel * block_size, max_padded)
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    padded = (counts + block_size - 1) // block_size * block_size
    offsets = torch.cumsum(padded, 0) - padded
    order = torch.sort(flat, stable=True).indices
    sorted_e = flat[order]
    rank = torch.arange(numel, device=dev) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    sorted_ids = torch.full((max_padded,), numel, dtype=torch.int32, device=dev)
    sorted_ids[offsets[sorted_e] + rank] = order.to(torch.int32)
    expert_ids = torch.full((-(-max_padded // block_size),), -1, dtype=torch.int32, device=dev)
    blocks = torch.repeat_interleave(torch.arange(num_experts, device=dev), padded // block_size)
    expert_ids[:blocks.numel()] = blocks.to(torch.int32)
    return sorted_ids, expert_ids, padded.sum().to(torch.int32).reshape(1)


# ----------------------------------------------------------------------------------------------------------------------
# the glue between the launches (plain torch)
# ----------------------------------------------------------------------------------------------------------------------
def per_token_group_quant_fp8(x: torch.Tensor, group_size: int = 128, ue8m0: bool = False):
    """vLLM's ``per_token_group_quant_fp8`` (row-major scales): ``(M, K)`` -> FP8 ``(M, K)``, float32 ``(M, K/g)``."""
    M, K = x.shape
    if K % group_size:
        raise ValueError(f"vLLM's activation quantization needs K % {group_size} == 0, got K={K}")
    xg = x.float().view(M, K // group_size, group_size)
    s = xg.abs().amax(dim=-1).clamp(min=ACT_EPS) / FP8_MAX
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    q = (xg / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(M, K)
    return q, s.contiguous()


def silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    """vLLM's ``silu_and_mul``: ``silu(gate)`` rounded to the input dtype, times ``up``; gate = first half."""
    inter = h.shape[-1] // 2
    gate, up = h[..., :inter], h[..., inter:]
    return torch.nn.functional.silu(gate.float()).to(h.dtype) * up


# ----------------------------------------------------------------------------------------------------------------------
# the peer
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Launch:
    """One GEMM launch as ``invoke_fused_moe_triton_kernel`` sets it up."""
    name: str
    config: dict            # kernel meta-parameters (BLOCK_SIZE_M/N, GROUP_SIZE_M, SPLIT_K, num_warps, num_stages)
    block_k: int
    swap_ab: bool
    use_tma_b: bool
    em: int
    grid: Tuple[int]
    top_k: int
    num_valid: int
    mul_routed_weight: bool


class VllmPeer:
    """vLLM's block-FP8 fused MoE (two ``fused_moe_kernel`` launches) on fp8_deep's weight layout.

    Args:
        w13: FP8 ``(E, 2I, H)`` (gate rows ``[0, I)``, up rows ``[I, 2I)``), contiguous; w13_scale float32
            ``(E, ceil(2I/128), ceil(H/128))`` (dequantization scales, ``weight_scale_inv``).
        w2: FP8 ``(E, H, I)``; w2_scale float32 ``(E, ceil(H/128), ceil(I/128))``.
        topk_ids: ``(T, top_k)`` int32/int64 (local ids in ``[0, E)``); topk_weights ``(T, top_k)`` float32.
        config: a fixed kernel config (vLLM's keys) instead of vLLM's pick; swap_ab / use_tma / naive: force vLLM's
            SWAP_AB, TMA-for-B, or naive-block-assignment decision (None: vLLM's rule on this device).
        device_name: the card name used for the tuned-config lookup (default: this device's, as vLLM names it).
        ue8m0: power-of-two activation scales (vLLM with DeepGEMM's E8M0 mode); compare with ``scale_fmt="ue8m0"``.
        kernel / source: a ``VllmKernel`` or where to load it from (``load_vllm_kernel``).
    """

    def __init__(self, w13, w13_scale, w2, w2_scale, topk_ids, topk_weights, *, config: Optional[dict] = None,
                 swap_ab: Optional[bool] = None, use_tma: Optional[bool] = None, naive: Optional[bool] = None,
                 device_name: Optional[str] = None, ue8m0: bool = False, kernel: Optional[VllmKernel] = None,
                 source: str = "auto"):
        self.k = kernel or load_vllm_kernel(source)
        E, two_i, H = w13.shape
        inter = two_i // 2
        if w13.dtype != FP8 or w2.dtype != FP8:
            raise TypeError(f"w13/w2 must be {FP8} (quantize with fp8_deep.ops.quantize_weight_blockwise), got "
                            f"{w13.dtype}/{w2.dtype}")
        if tuple(w2.shape) != (E, H, inter):
            raise ValueError(f"w2 must be (E, H, I) = {(E, H, inter)}, got {tuple(w2.shape)}")
        for name, s, w in (("w13_scale", w13_scale, w13), ("w2_scale", w2_scale, w2)):
            want = (E, -(-w.shape[1] // 128), -(-w.shape[2] // 128))
            if s.dtype != torch.float32 or tuple(s.shape) != want:
                raise ValueError(f"{name} must be float32 {want}, got {s.dtype} {tuple(s.shape)}")
        if topk_ids.dim() != 2 or tuple(topk_weights.shape) != tuple(topk_ids.shape):
            raise ValueError(f"topk_ids/topk_weights must both be (T, top_k), got {tuple(topk_ids.shape)} and "
                             f"{tuple(topk_weights.shape)}")
        if H % 128 or inter % 128:
            raise ValueError(f"vLLM's activation quantization needs H and I multiples of 128, got H={H}, I={inter}")
        self.w13, self.w13_scale, self.w2, self.w2_scale = w13, w13_scale, w2, w2_scale
        self.E, self.H, self.I = E, H, inter
        self.T, self.top_k = topk_ids.shape
        self.device = w13.device
        self.ue8m0 = ue8m0
        self.topk_ids = topk_ids
        self.topk_weights = topk_weights.contiguous()  # vLLM: "topk_weights must be contiguous"
        self.device_name = device_name or device_file_name(self.device)
        if config is None:
            self.config, self.config_source = select_config(E, inter, self.T, self.k.configs_dir, self.device_name)
        else:
            self.config, self.config_source = dict(config), "given"
        bm = self.config["BLOCK_SIZE_M"]
        # _prepare_expert_assignment: no alignment when the routed pairs touch few of the experts
        self.naive = (self.T * self.top_k * 4 <= E) if naive is None else bool(naive)
        if self.naive:
            self.sorted_token_ids = None
            self.expert_ids = topk_ids.reshape(-1)
            self.num_tokens_post_padded = torch.full((1,), topk_ids.numel() * bm, dtype=torch.int32,
                                                     device=self.device)
        else:
            self.sorted_token_ids, self.expert_ids, self.num_tokens_post_padded = moe_align_block_size(topk_ids, bm, E)
        M2 = self.T * self.top_k
        self.cache1 = torch.empty((self.T, self.top_k, two_i), dtype=torch.bfloat16, device=self.device)
        self.cache3 = torch.empty((self.T, self.top_k, H), dtype=torch.bfloat16, device=self.device)
        self.launch1 = self._plan("gemm1", w13, a_rows=self.T, top_k=self.top_k, mul=False, swap_ab=swap_ab,
                                  use_tma=use_tma)
        self.launch2 = self._plan("gemm2", w2, a_rows=M2, top_k=1, mul=True, swap_ab=swap_ab, use_tma=use_tma)
        self._prepared = None

    # ---- invoke_fused_moe_triton_kernel's host side
    def _plan(self, name, B, *, a_rows, top_k, mul, swap_ab, use_tma) -> Launch:
        cfg = dict(self.config)
        cfg["SPLIT_K"] = 1
        block_k = min(cfg.pop("BLOCK_SIZE_K"), min(BLOCK_SHAPE))
        want_tma = bool(cfg.pop("USE_TMA", True))
        bm, bn = cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"]
        sab = enable_swap_ab(bm, bn, self.device) if swap_ab is None else bool(swap_ab)
        shape_ok = B.is_contiguous() and B.size(1) % bn == 0 and B.size(2) % block_k == 0
        if use_tma is None:
            tma = want_tma and self.k.has_tma and _tma_capable(self.device) and shape_ok
        else:
            tma = bool(use_tma)
            if tma and not (self.k.has_tma and shape_ok):
                raise ValueError(f"use_tma=True needs a kernel with a TMA path (vLLM {self.k.version}: "
                                 f"{self.k.has_tma}) and B contiguous with N % BLOCK_SIZE_N == 0 and "
                                 f"K % BLOCK_SIZE_K == 0")
        num_valid = a_rows * top_k
        if self.sorted_token_ids is not None:
            em = self.sorted_token_ids.numel()
            if a_rows < bm:  # "optimize for small batch_size"
                em = min(em, a_rows * top_k * bm)
        else:
            em = num_valid * bm
        grid = (-(-em // bm) * -(-B.size(1) // bn),)
        return Launch(name=name, config=cfg, block_k=block_k, swap_ab=sab, use_tma_b=tma, em=em, grid=grid,
                      top_k=top_k, num_valid=num_valid, mul_routed_weight=mul)

    def _launch(self, L: Launch, A, A_scale, B, B_scale, Cbuf):
        import triton.language as tl
        b_desc = None
        if L.use_tma_b:
            from triton.tools.tensor_descriptor import TensorDescriptor
            _set_triton_allocator(B.device)
            b_desc = TensorDescriptor.from_tensor(B, [1, L.config["BLOCK_SIZE_N"], L.block_k])
        kw = dict(
            a_ptr=A, b_ptr=B, b_desc=b_desc, c_ptr=Cbuf, b_bias_ptr=None, a_scale_ptr=A_scale, b_scale_ptr=B_scale,
            topk_weights_ptr=self.topk_weights if L.mul_routed_weight else None,
            sorted_token_ids_ptr=self.sorted_token_ids, expert_ids_ptr=self.expert_ids,
            num_tokens_post_padded_ptr=self.num_tokens_post_padded, a_desc=None,
            N=B.size(1), K=B.size(2), EM=L.em, num_valid_tokens=L.num_valid,
            stride_am=A.stride(0), stride_ak=A.stride(1), stride_be=B.stride(0), stride_bk=B.stride(2),
            stride_bn=B.stride(1), stride_cm=Cbuf.stride(1), stride_cn=Cbuf.stride(2),
            stride_asm=A_scale.stride(0), stride_ask=A_scale.stride(1), stride_bse=B_scale.stride(0),
            stride_bsk=B_scale.stride(2), stride_bsn=B_scale.stride(1) if B_scale.size(1) > 1 else 0,
            stride_bbe=0, stride_bbn=0, group_n=BLOCK_SHAPE[0], group_k=BLOCK_SHAPE[1],
            naive_block_assignment=self.sorted_token_ids is None, MUL_ROUTED_WEIGHT=L.mul_routed_weight,
            top_k=L.top_k, compute_type=tl.bfloat16, use_fp8_w8a8=True, use_int8_w8a8=False,
            use_int8_w8a16=False, per_channel_quant=False, HAS_BIAS=False, BLOCK_SIZE_K=L.block_k,
            SWAP_AB=L.swap_ab, USE_TD=False, USE_TMA_B=L.use_tma_b, USE_TMA_A=False, C_IS_SORTED=False,
        )
        params = set(self.k.params)
        optional = {"b_desc", "a_desc", "USE_TD", "USE_TMA_B", "USE_TMA_A", "C_IS_SORTED"}
        missing = [p for p in self.k.params if p not in kw and p not in L.config]
        if missing:
            raise TypeError(f"vLLM {self.k.version}'s {KERNEL_NAME} takes {missing}, which this harness (written "
                            f"for {LAUNCH_LOGIC_VERSION}) does not pass; update bench/peer_vllm.py")
        unknown = [p for p in kw if p not in params and p not in optional]
        if unknown:
            raise TypeError(f"vLLM {self.k.version}'s {KERNEL_NAME} has no parameters {unknown}; update "
                            f"bench/peer_vllm.py")
        kw = {p: v for p, v in kw.items() if p in params}
        with triton_getitem_compat():
            self.k.kernel[L.grid](**kw, **L.config)

    def gemm1(self, qx, sx):
        """``(T, H)`` FP8 + ``(T, H/128)`` scales -> ``cache1 (T, top_k, 2I)`` bf16."""
        self._launch(self.launch1, qx, sx, self.w13, self.w13_scale, self.cache1)
        return self.cache1

    def gemm2(self, a2, sa2):
        """``(T*top_k, I)`` FP8 + scales -> ``cache3 (T, top_k, H)`` bf16, scaled by the routing weights."""
        self._launch(self.launch2, a2, sa2, self.w2, self.w2_scale, self.cache3)
        return self.cache3

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The complete MoE output ``(T, H)`` bf16 (the glue in plain torch)."""
        if tuple(hidden.shape) != (self.T, self.H):
            raise ValueError(f"hidden must be (T, H) = {(self.T, self.H)}, got {tuple(hidden.shape)}")
        qx, sx = per_token_group_quant_fp8(hidden, ue8m0=self.ue8m0)
        h = self.gemm1(qx, sx).view(self.T * self.top_k, 2 * self.I)
        a2, sa2 = per_token_group_quant_fp8(silu_and_mul(h), ue8m0=self.ue8m0)
        self._prepared = (qx, sx, a2, sa2)
        return self.gemm2(a2, sa2).sum(dim=1).to(hidden.dtype)

    def gemms_fn(self, hidden: Optional[torch.Tensor] = None) -> Callable[[], torch.Tensor]:
        """A callable doing only vLLM's two launches on buffers prepared here (from one ``forward(hidden)``, so GEMM2
        reads the real intermediate): what to time. Returns ``cache3``."""
        if hidden is not None or self._prepared is None:
            if hidden is None:
                raise ValueError("gemms_fn needs hidden states once (to prepare both GEMMs' inputs)")
            self.forward(hidden)
        qx, sx, a2, sa2 = self._prepared

        def run():
            self.gemm1(qx, sx)
            return self.gemm2(a2, sa2)
        return run

    def describe(self) -> Dict[str, object]:
        c = self.config
        return dict(vllm_config=f"M{c['BLOCK_SIZE_M']}N{c['BLOCK_SIZE_N']}K{self.launch1.block_k}"
                                f"G{c.get('GROUP_SIZE_M', 1)}w{c.get('num_warps', '')}s{c.get('num_stages', '')}",
                    config_source=self.config_source, swap_ab=int(self.launch1.swap_ab),
                    tma_b=f"{int(self.launch1.use_tma_b)}/{int(self.launch2.use_tma_b)}", naive=int(self.naive),
                    vllm_version=self.k.version)


def _set_triton_allocator(device):
    """vLLM's ``set_triton_allocator`` (called at every TMA launch there too): Triton scratch memory from torch."""
    import triton

    def alloc_fn(size: int, alignment: int, stream):
        return torch.empty(size, device=device, dtype=torch.int8)

    triton.set_allocator(alloc_fn)


def vllm_moe_forward(hidden, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, **kw) -> torch.Tensor:
    """vLLM's block-FP8 fused MoE output (for the check); ``kw`` as ``VllmPeer``."""
    return VllmPeer(w13, w13_scale, w2, w2_scale, topk_ids, topk_weights, **kw).forward(hidden)


def vllm_gemms_fn(hidden, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, **kw) -> Callable[[], torch.Tensor]:
    """A callable doing only vLLM's two GEMM launches on pre-built buffers (for timing)."""
    return VllmPeer(w13, w13_scale, w2, w2_scale, topk_ids, topk_weights, **kw).gemms_fn(hidden)


# ----------------------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------------------
# model: (E, H, I, top_k) -- issue 24's shapes
SHAPES = {
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "dsv3-tp8": (256, 7168, 256, 8),     # DeepSeek-V3, one TP8 shard of every expert
    "dsv3-ep8": (32, 7168, 2048, 8),     # DeepSeek-V3, the experts of one EP8 rank
    "dsv3-tp1": (256, 7168, 2048, 8),
    "mixtral-8x7b": (8, 4096, 14336, 2),
    "tiny": (4, 256, 256, 2),            # CPU plumbing
}
T_LIST = [1, 16, 256, 2048, 8192]


def make_weights(E, H, inter, device, *, seed=0, chunk=8, scale_fmt="fp32"):
    """FP8 ``w13 (E, 2I, H)``, ``w2 (E, H, I)`` and their 128x128 scales through
    ``fp8_deep.ops.quantize_weight_blockwise``, from Gaussian BF16 weights (std 1/sqrt(fan-in)) drawn a few experts
    at a time (no BF16 copy of the whole stack)."""
    from fp8_deep import ops
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for N, K in ((2 * inter, H), (H, inter)):
        q = torch.empty((E, N, K), dtype=FP8, device=device)
        s = torch.empty((E, -(-N // 128), -(-K // 128)), dtype=torch.float32, device=device)
        for e in range(0, E, chunk):
            n = min(chunk, E - e)
            w = torch.randn((n, N, K), generator=g, device=device, dtype=torch.bfloat16).div_(K ** 0.5)
            ops.quantize_weight_blockwise(w, scale_fmt=scale_fmt, out=(q[e:e + n], s[e:e + n]))
        out += [q, s]
    return tuple(out)


def make_routing(T, E, k, device, *, seed=0, empty_experts=()):
    """Softmax-top-k routing (distinct experts per token, weights renormalised); ``empty_experts`` get no tokens."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(T, E, generator=g, device=device)
    for e in empty_experts:
        logits[:, e] -= 1e4
    w, ids = torch.softmax(logits, -1).topk(k, dim=-1)
    return (w / w.sum(-1, keepdim=True)).contiguous(), ids.to(torch.int32).contiguous()


def compare(hidden, q13, s13, q2, s2, tw, tid, *, scale_fmt="fp32", **peer_kw):
    """(peer output, ours, calc_diff, max |diff|, the peer) at one routing."""
    import fp8_deep
    from fp8_deep.testing import calc_diff
    peer = VllmPeer(q13, s13, q2, s2, tid, tw, ue8m0=scale_fmt == "ue8m0", **peer_kw)
    theirs = peer.forward(hidden)
    ours = fp8_deep.moe_forward(hidden, q13, q2, tw, tid, w13_scale=s13, w2_scale=s2, scale_fmt=scale_fmt)
    d = calc_diff(theirs.float(), ours.float())
    return theirs, ours, d, float((theirs.float() - ours.float()).abs().max()), peer


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------
def _check_cases(on_gpu: bool):
    """(label, E, H, I, k, T, empty experts, VllmPeer overrides)"""
    cases = [
        ("random", 4, 256, 256, 2, 8, (), {}),
        ("T=1", 4, 256, 256, 2, 1, (), {}),
        ("empty expert 2", 4, 256, 256, 2, 8, (2,), {}),
        ("naive blocks (T*k*4 <= E)", 8, 256, 256, 2, 1, (), {}),
        ("SWAP_AB forced", 4, 256, 256, 2, 8, (1,), {"swap_ab": True}),
    ]
    if on_gpu:
        cases += [
            ("dsv3-tp8 T=1", 256, 7168, 256, 8, 1, (), {}),
            ("dsv3-tp8 T=64", 256, 7168, 256, 8, 64, (), {}),
            ("dsv3-tp8 T=512", 256, 7168, 256, 8, 512, (), {}),
            ("qwen3 T=16", 128, 2048, 768, 8, 16, (), {}),
            ("qwen3 T=2048", 128, 2048, 768, 8, 2048, (), {}),
            ("qwen3 T=16 no TMA, no SWAP_AB", 128, 2048, 768, 8, 16, (), {"use_tma": False, "swap_ab": False}),
        ]
    return cases


def run_check(args) -> int:
    dev = C.device()
    k = load_vllm_kernel(args.source)
    print(f"[peer_vllm] vLLM {k.version} kernel from {k.origin}; {C.env_line()}", flush=True)
    note = launch_logic_note(k)
    if note:
        print(f"[note] {note}", flush=True)
    fails = 0
    weights = {}
    for label, E, H, inter, topk, T, empty, kw in _check_cases(dev == "cuda"):
        if (E, H, inter) not in weights:
            weights.clear()
            C.free_cuda()
            weights[(E, H, inter)] = make_weights(E, H, inter, dev, seed=E + H + inter)
        q13, s13, q2, s2 = weights[(E, H, inter)]
        tw, tid = make_routing(T, E, topk, dev, seed=T, empty_experts=empty)
        hidden = torch.randn(T, H, generator=torch.Generator(device=dev).manual_seed(T + 1), device=dev).to(
            torch.bfloat16)
        try:
            _, _, d, mx, peer = compare(hidden, q13, s13, q2, s2, tw, tid, kernel=k, **kw)
            ok = d < 1e-3 and math.isfinite(d)
            info = peer.describe()
            print(f"  {'ok  ' if ok else 'FAIL'} {label:32s} E={E} H={H} I={inter} k={topk} T={T}: calc_diff {d:.2e}, "
                  f"max|diff| {mx:.3g} [{info['vllm_config']} {info['config_source']}, swap_ab={info['swap_ab']}, "
                  f"tma_b={info['tma_b']}, naive={info['naive']}]", flush=True)
        except Exception as exc:
            ok = False
            print(f"  FAIL {label}: {type(exc).__name__}: {exc}", flush=True)
            if args.verbose:
                traceback.print_exc()
        fails += not ok
    print(f"SUMMARY peer_vllm check: {'all passed' if not fails else f'{fails} FAILED'} (vLLM {k.version}, {dev})")
    return 1 if fails else 0


def host_us(fn, n: int = 30) -> float:
    """Microseconds of host time per ``fn()`` call, warm, averaged over ``n`` calls issued back to back."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t0
    torch.cuda.synchronize()
    return dt / n * 1e6


# the forward's fusions switched off (the A/B column ours_unfused_graph_ms)
UNFUSED_ENV = {"FP8_DEEP_FUSED_QUANT_PERMUTE": "0", "FP8_DEEP_FUSED_SWIGLU": "0", "FP8_DEEP_FUSED_ALIGN_QUANT": "0"}


def ours_gemms_fn(hidden, q13, s13, q2, s2, topk_weights, topk_ids, backend: str) -> Callable[[], torch.Tensor]:
    """Our two grouped-GEMM launches alone, as ``fp8_deep.moe_forward`` makes them (same backend choice, tiles,
    routing plan and operands, prepared once here by one forward): the like-for-like peer of ``gemms_fn``. Our
    forward's time minus this one is what our glue (routing, quantization, permutation, SwiGLU, combine) costs."""
    from fp8_deep.moe.forward import moe_forward_impl
    from fp8_deep.ops.backend import select_grouped_gemm
    picked = {}

    def select(**shape):
        picked["gemm"] = select_grouped_gemm(backend, **shape)
        return picked["gemm"]

    _, st = moe_forward_impl(hidden, q13, q2, topk_weights, topk_ids, select_gemm=select, w13_scale=s13,
                             w2_scale=s2, return_stages=True)
    g, plan = picked["gemm"], st["plan"]

    def run():
        g.gemm(st["a1"], st["sa1"], q13, s13, plan, out=st["h"])
        return g.gemm(st["a2"], st["sa2"], q2, s2, plan, out=st["o"])
    run.stages = st  # the forward's intermediates it reads and rewrites (tests)
    return run


def _activation_bytes(T, H, inter, topk) -> int:
    """Rough peak of the per-T buffers of both MoEs plus the torch glue's float32 temporaries."""
    rows = T * topk
    return int(rows * (2 * inter * (2 + 4 + 4) + inter * 4 + H * (2 + 2 + 4)) * 2 + T * H * 8)


def run_bench(args) -> int:
    import fp8_deep
    from fp8_deep.moe import plan as forward_plans
    from fp8_deep.testing import calc_diff
    dev = C.device()
    k = load_vllm_kernel(args.source)
    note = launch_logic_note(k)
    print(f"[peer_vllm] vLLM {k.version} kernel from {k.origin}", flush=True)
    print(f"[peer_vllm] {C.env_line()}", flush=True)
    if note:
        print(f"[note] {note}", flush=True)
    if dev != "cuda":
        print("[note] no CUDA device: CPU plumbing run (interpreter, host timer, no CUDA graphs); not timings")
    budget = C.Budget(args.time_budget)
    out_dir = C.results_dir()
    log = C.CsvLog(out_dir / f"peer_vllm{args.tag}.csv")
    rows = []
    for model in args.shapes:
        E, H, inter, topk = SHAPES[model]
        if budget.spent(reserve=20):
            print(f"[skip] {model}: time budget spent", flush=True)
            continue
        wbytes = E * 3 * inter * H
        if dev == "cuda" and wbytes * 1.1 > torch.cuda.mem_get_info()[0]:
            print(f"[skip] {model}: FP8 weights {wbytes / 2**30:.1f} GiB do not fit", flush=True)
            log.add(model=model, E=E, H=H, I=inter, topk=topk, status="skipped: weights do not fit")
            continue
        weights = make_weights(E, H, inter, dev, seed=inter)
        q13, s13, q2, s2 = weights
        for T in args.T:
            if budget.spent(reserve=15):
                print(f"[skip] {model} T={T}: time budget spent", flush=True)
                continue
            base = dict(model=model, E=E, H=H, I=inter, topk=topk, T=T)
            if dev == "cuda" and _activation_bytes(T, H, inter, topk) > 0.9 * torch.cuda.mem_get_info()[0]:
                print(f"[skip] {model} T={T}: activations would not fit", flush=True)
                log.add(**base, status="skipped: would not fit")
                continue
            try:
                tw, tid = C.random_routing(T, E, topk, seed=T + 1)
                hidden = C.randn((T, H), seed=T)
                peer = VllmPeer(q13, s13, q2, s2, tid, tw, kernel=k, device_name=args.config_card)
                theirs = peer.forward(hidden)
                ours_fn = lambda: fp8_deep.moe_forward(hidden, q13, q2, tw, tid, w13_scale=s13,  # noqa: E731
                                                       w2_scale=s2, backend=args.ours_backend)
                seen = dict(forward_plans.ForwardPlan.refusals)  # the first calls of this signature record it
                d = calc_diff(theirs.float(), ours_fn().float())
                ours_backend = fp8_deep.last_backend()
                ours_path = forward_path_of(hidden, tid, E, H, inter, args.ours_backend)
                vllm_fn = peer.gemms_fn()
                gemms_fn = ours_gemms_fn(hidden, q13, s13, q2, s2, tw, tid, args.ours_backend)
                res = dict(calc_diff=d)
                for mode in ("eager", "graph"):
                    if mode == "graph" and dev != "cuda":
                        continue
                    res[f"vllm_{mode}_ms"] = C.bench(vllm_fn, rep=args.rep, graph=mode == "graph")[0]
                    res[f"ours_{mode}_ms"] = C.bench(ours_fn, rep=args.rep, graph=mode == "graph")[0]
                    res[f"ours_gemms_{mode}_ms"] = C.bench(gemms_fn, rep=args.rep, graph=mode == "graph")[0]
                    res[f"ratio_{mode}"] = res[f"vllm_{mode}_ms"] / res[f"ours_{mode}_ms"]
                    res[f"ratio_gemms_{mode}"] = res[f"vllm_{mode}_ms"] / res[f"ours_gemms_{mode}_ms"]
                new = [w for w, n in forward_plans.ForwardPlan.refusals.items() if n > seen.get(w, 0)]
                res["plan"] = ("refused: " + "; ".join(new))[:160] if new else "replayed"
                if dev == "cuda":
                    # A/B in the same process: our forward without its fusions (quantize+permute, GEMM1+SwiGLU)
                    with C.environ(UNFUSED_ENV):
                        res["ours_unfused_graph_ms"] = C.bench(ours_fn, rep=args.rep, graph=True)[0]
                    res["fused_gain"] = res["ours_unfused_graph_ms"] / res["ours_graph_ms"]
                    # one fusion off at a time (--ab): gain_<name> = its time without that fusion / ours
                    for name, env in args.ab:
                        with C.environ(env):
                            res[f"gain_{name}"] = C.bench(ours_fn, rep=args.rep, graph=True)[0] / res["ours_graph_ms"]
                    # host time of one eager call (no sync inside the loop: the GPU queue absorbs the work), with
                    # the forward's launch plan (a replay) and without (FP8_DEEP_FORWARD_PLANS=0)
                    res["ours_host_us"] = host_us(ours_fn)
                    with C.environ({"FP8_DEEP_FORWARD_PLANS": "0"}):
                        res["ours_host_noplan_us"] = host_us(ours_fn)
                flops = 2.0 * T * topk * 3 * inter * H
                res["vllm_graph_tflops"] = C.tflops(flops, res.get("vllm_graph_ms", float("nan")))
                res["ours_graph_tflops"] = C.tflops(flops, res.get("ours_graph_ms", float("nan")))
                status = "ok" if d < 1e-3 else f"CHECK FAILED (calc_diff {d:.2e})"
                row = log.add(**base, **res, **peer.describe(), config_card=peer.device_name,
                              ours_backend=ours_backend, ours_path=ours_path, vllm_origin=k.origin, status=status)
                rows.append(row)
                print(f"  {model:14s} T={T:5d} vllm {res.get('vllm_graph_ms', res['vllm_eager_ms']):8.3f} ms  "
                      f"ours {res.get('ours_graph_ms', res['ours_eager_ms']):8.3f} ms (GEMMs "
                      f"{res.get('ours_gemms_graph_ms', res['ours_gemms_eager_ms']):.3f})  ratio(graph) "
                      f"{res.get('ratio_graph', float('nan')):.2f}  eager {res['ratio_eager']:.2f}  "
                      f"calc_diff {d:.1e}  path {ours_path}  [{row['vllm_config']} {row['config_source']} "
                      f"swap_ab={row['swap_ab']} "
                      f"tma_b={row['tma_b']} naive={row['naive']}]", flush=True)
                del peer, theirs, vllm_fn, gemms_fn
            except torch.cuda.OutOfMemoryError as exc:
                print(f"[skip] {model} T={T}: out of memory ({str(exc)[:120]})", flush=True)
                log.add(**base, status="skipped: out of memory")
            except Exception as exc:
                print(f"[error] {model} T={T}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                if args.verbose:
                    traceback.print_exc()
                log.add(**base, status=f"error: {type(exc).__name__}: {str(exc)[:120]}")
            C.free_cuda()
        del weights, q13, s13, q2, s2
        C.free_cuda()
    print()
    if note:
        print(f"SUMMARY peer_vllm note: {note}")
    table = [{**r, "calc_diff": f"{r['calc_diff']:.1e}"} for r in rows]
    C.print_table(table, ["model", "T", "vllm_graph_ms", "ours_graph_ms", "ratio_graph", "ours_gemms_graph_ms",
                          "ratio_gemms_graph", "ours_unfused_graph_ms", "fused_gain",
                          *(f"gain_{name}" for name, _ in args.ab), "ours_host_us",
                          "ours_host_noplan_us", "plan", "vllm_eager_ms", "ours_eager_ms", "ratio_eager", "calc_diff",
                          "vllm_config", "swap_ab", "tma_b", "ours_backend", "ours_path"],
                  title=f"peer_vllm ({C.card_name()}; vLLM {k.version} two GEMM launches vs fp8_deep.moe_forward "
                        f"complete, and vs our two GEMM launches alone (ratio_gemms); ratio = vLLM ms / ours ms, "
                        f"> 1: ours faster)", prefix="SUMMARY peer_vllm")
    print(f"[done] {len(rows)} points in {budget.elapsed():.0f} s -> {log.path}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def forward_path_of(hidden, topk_ids, E, H, inter, backend) -> str:
    """Which way our forward computes this call (``fp8_deep.moe.forward.forward_path``: decode, routed, gather or
    the regular chain), with the backend ``moe_forward`` would select."""
    from fp8_deep.moe.forward import forward_path
    from fp8_deep.ops.backend import select_grouped_gemm
    P = topk_ids.numel()
    gemm = select_grouped_gemm(backend, device=hidden.device, rows_per_expert=P / E, hidden=H, inter=inter,
                               num_experts=E)
    return forward_path(P, E, H, inter, hidden, gemm)


def parse_ab_env(spec: str) -> dict:
    """``"FP8_DEEP_A=1,FP8_DEEP_B=BLOCK_N=64,num_stages=6"`` -> ``{"FP8_DEEP_A": "1", "FP8_DEEP_B":
    "BLOCK_N=64,num_stages=6"}``: a comma starts a new variable only before an ``FP8_DEEP_`` / ``TRITON_`` name, so
    a config string's or an integer list's own commas stay in its value (the first piece may name any variable).
    Raises ValueError when the first piece assigns nothing."""
    env = {}
    for piece in spec.split(","):
        key, eq, value = piece.partition("=")
        if eq and (not env or key.startswith(("FP8_DEEP_", "TRITON_"))):
            env[key] = value
        elif env:  # the previous value's own comma (a config string, a list of integers)
            last = next(reversed(env))
            env[last] += "," + piece
        else:
            raise ValueError(f"--ab: {piece!r} in {spec!r} is not ENV=VALUE")
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="peer output vs fp8_deep.moe_forward (calc_diff < 1e-3)")
    p.add_argument("--bench", action="store_true", help="time vLLM's two launches vs fp8_deep.moe_forward")
    p.add_argument("--shapes", default=None, help=f"comma-separated, of {', '.join(SHAPES)} (default: all but "
                                                  f"tiny on a GPU, tiny on the CPU)")
    p.add_argument("--T", default=None, help="comma-separated token counts (default 1,16,256,2048,8192; CPU: 1,8)")
    p.add_argument("--rep", type=int, default=50, help="do_bench rep (ms)")
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds; what is left is skipped")
    p.add_argument("--source", default="auto", choices=("auto", "installed", "fetched"),
                   help="where vLLM's kernel comes from (auto: installed vllm if importable, else .vllm/)")
    p.add_argument("--config-card", default=None,
                   help="card name for vLLM's tuned-config lookup instead of this device's (e.g. NVIDIA_H200: its "
                        "tuned tiles on an H100, which vLLM itself would not pick); recorded in the CSV")
    p.add_argument("--ours-backend", default="auto", choices=("auto", "triton", "deep_gemm"),
                   help="fp8_deep.moe_forward's grouped-GEMM backend (the one that ran is recorded)")
    p.add_argument("--tag", default="", help="suffix of the CSV name")
    p.add_argument("--ab", action="append", default=[], metavar="NAME:ENV=V[,ENV=V]",
                   help="an extra graph timing of our forward under these environment values, reported as "
                        "gain_NAME = that time / ours (e.g. swiglu:FP8_DEEP_FUSED_SWIGLU=0: what the fused GEMM1 + "
                        "SwiGLU gains); a value may hold commas (a config string: d6:FP8_DEEP_DECODE_CONFIG="
                        "BLOCK_N=64,num_stages=6), a new variable starts at FP8_DEEP_ / TRITON_; repeatable")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    try:
        args.ab = [(name, parse_ab_env(spec)) for name, spec in (a.split(":", 1) for a in args.ab)]
    except ValueError:
        p.error("--ab takes NAME:ENV=VALUE[,ENV=VALUE...]")
    if not (args.check or args.bench):
        p.error("give --check and/or --bench")
    gpu = torch.cuda.is_available()
    args.shapes = (args.shapes.split(",") if args.shapes else
                   [s for s in SHAPES if s != "tiny"] if gpu else ["tiny"])
    bad = [s for s in args.shapes if s not in SHAPES]
    if bad:
        p.error(f"unknown shapes {bad}; known: {list(SHAPES)}")
    args.T = [int(t) for t in args.T.split(",")] if args.T else (T_LIST if gpu else [1, 8])
    try:
        load_vllm_kernel(args.source)
    except ImportError as exc:
        print(f"[skip] {exc}")
        return 0 if args.source == "auto" else 1
    rc = 0
    if args.check:
        rc |= run_check(args)
    if args.bench:
        rc |= run_bench(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
