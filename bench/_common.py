"""Shared benchmark plumbing: card name and results folder, environment line, measured copy bandwidth, timing,
random inputs, CSV/PNG output and the final table. Benchmarks only; the library never imports this.

Every figure is written with the card's name and the software versions: absolute times hold only for that card,
ratios only against baselines measured in the same run (shared/docs/ANCHORS.md).
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
if str(REPO_DIR) not in sys.path:  # `python bench/bench_x.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_DIR))

QUANTILES = [0.5, 0.2, 0.8]  # median, then the band the plots shade


def device() -> str:
    """The benchmark device: "cuda" when a GPU is there; "cpu" only for the scripts' ``--cpu-smoke`` dry runs (plumbing, not timings)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------ card, env, files
def card_name() -> str:
    """``torch.cuda.get_device_name()`` made into a folder name ("NVIDIA H100 80GB HBM3" -> "NVIDIA_H100_80GB_HBM3")."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_") or "unknown"


def results_dir(card: Optional[str] = None) -> Path:
    d = BENCH_DIR / "results" / (card or card_name())
    d.mkdir(parents=True, exist_ok=True)
    return d


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or "unknown"
    except Exception:  # no git on the machine, or not a checkout
        return "unknown"


def versions() -> Dict[str, str]:
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = "none"
    return {"card": card_name(), "torch": torch.__version__, "triton": triton_v,
            "cuda": str(torch.version.cuda), "git": git_rev()}


def env_line() -> str:
    v = versions()
    extra = ""
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        extra = f" sm={p.major}{p.minor} SMs={p.multi_processor_count} mem={p.total_memory / 2**30:.0f}GiB"
    return (f"card={v['card']} torch={v['torch']} triton={v['triton']} cuda={v['cuda']} git={v['git']}{extra} "
            f"date={time.strftime('%Y-%m-%d %H:%M')}")


# ------------------------------------------------------------------------------------------------ timing
def bench(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100, graph: bool = False,
          clean_flush: bool = False) -> List[float]:
    """``[median, p20, p80]`` milliseconds (``triton.testing.do_bench``; ``graph=True``: CUDA-graph replays,
    which removes launch gaps and is how a serving engine would run small batches; ``clean_flush=True``:
    do_bench's loop with an L2 flush that reads instead of writes, see ``bench_clean_flush``)."""
    if not torch.cuda.is_available():  # --cpu-smoke: a plain host timer, good enough to exercise the plumbing
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return [times[1], times[0], times[2]]
    import triton.testing as tt
    if clean_flush:
        if graph:
            raise ValueError("clean_flush times do_bench's loop: not with graph=True (graph replays have no flush)")
        return bench_clean_flush(fn, warmup=warmup, rep=rep)
    if graph:
        return list(tt.do_bench_cudagraph(fn, rep=rep, quantiles=QUANTILES))
    return list(tt.do_bench(fn, warmup=warmup, rep=rep, quantiles=QUANTILES))


def bench_clean_flush(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100,
                      flush_bytes: int = 256 * 2 ** 20) -> List[float]:
    """``[median, p20, p80]`` ms of ``triton.testing.do_bench``'s loop (flush, start event, one call, end event;
    as there, host launch time counts only where it outlasts the ~85 us flush queued ahead of the start event) with
    one difference: the flush *reads* ``flush_bytes`` instead of zeroing them. do_bench's zeroing leaves the L2
    full of dirty lines, which the timed call writes back to HBM as it evicts them: at 30-90 MB a call pays that on
    top of its own traffic (a copy of 88 MB reaches ~85% of the 2 GiB copy rate there; bench/diag/diag_flush_dram.py
    counts the bytes). After a read the lines are clean and the inputs still cold: the call's own traffic."""
    cache = torch.ones(flush_bytes // 4, dtype=torch.float32, device="cuda")
    fn()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(5):
        cache.amax()
        fn()
    t1.record()
    torch.cuda.synchronize()
    estimate = t0.elapsed_time(t1) / 5
    for _ in range(max(1, int(warmup / estimate))):
        fn()
    n = max(1, int(rep / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        cache.amax()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = torch.tensor([a.elapsed_time(b) for a, b in zip(starts, ends)], dtype=torch.float64)
    return torch.quantile(times, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()


@contextlib.contextmanager
def environ(env: Dict[str, Optional[str]]):
    """Set environment variables for a ``with`` block (a variant's switches; None unsets one), then restore them."""
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def host_us(fn: Callable[[], object], n: int = 300, rounds: int = 5) -> float:
    """Host time per call in microseconds: the best of ``rounds`` rounds of ``n`` back-to-back calls with no
    synchronisation inside a round (when the host is slower than the GPU, this is what a call costs)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
        torch.cuda.synchronize()
    return best


def profile_calls(fn: Callable[[], object], n: int, sort: str = "cumulative", top: int = 40) -> None:
    """cProfile ``n`` calls of ``fn`` and print the ``top`` entries by ``sort`` (where a launcher's host time goes)."""
    import cProfile
    import pstats
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats(sort).print_stats(top)


_COPY_CACHE: Dict[int, float] = {}


def copy_bandwidth(gib: float = 2.0) -> float:
    """Measured device copy bandwidth in GB/s (1e9 B/s): a ``gib`` GiB bf16 tensor copied to another, counting the
    bytes read plus the bytes written, median of ``do_bench``. The memory ceiling every memory-bound op is held to."""
    if not torch.cuda.is_available():
        gib = 1 / 16
    nbytes = int(gib * 2**30)
    if nbytes in _COPY_CACHE:
        return _COPY_CACHE[nbytes]
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device())
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))[0]
    del src, dst
    free_cuda()
    _COPY_CACHE[nbytes] = 2 * nbytes / (ms * 1e-3) / 1e9
    return _COPY_CACHE[nbytes]


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9 if ms and ms > 0 else float("nan")


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12 if ms and ms > 0 else float("nan")


def copy_of_bytes(nbytes: int, sm_kernel: bool = False) -> Callable[[], object]:
    """A device copy that reads ``nbytes/2`` and writes ``nbytes/2`` bytes: the ceiling for an op moving ``nbytes``.

    ``sm_kernel``: negate bf16 elements instead (the same bytes through an SM elementwise kernel). For CUDA-graph
    timings: a captured same-dtype ``copy_`` is a memcpy node, which ran at ~80% of the copy rate on an H100 for
    GB-size buffers (run f9ad68d), below the rate a kernel gets; a ceiling must be the faster of the two."""
    half = max(16, int(nbytes // 2) // 16 * 16)
    if sm_kernel:
        src = torch.randn(half // 2, dtype=torch.bfloat16, device=device())
        dst = torch.empty_like(src)
        return lambda: torch.neg(src, out=dst)
    src = torch.randint(0, 255, (half,), dtype=torch.uint8, device=device())
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


class Budget:
    """Wall-clock budget: benches skip what is left once it is spent, and still write what they measured."""

    def __init__(self, seconds: Optional[float]):
        self.t0 = time.time()
        self.seconds = seconds

    def left(self) -> float:
        return float("inf") if not self.seconds else self.seconds - (time.time() - self.t0)

    def spent(self, reserve: float = 0.0) -> bool:
        return self.left() <= reserve

    def elapsed(self) -> float:
        return time.time() - self.t0


# ------------------------------------------------------------------------------------------------ random inputs
def randn(shape, *, dtype=torch.bfloat16, std: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Gaussian data (never zeros: zeros hide unwritten outputs and can run faster than real data)."""
    g = torch.Generator(device=device())
    g.manual_seed(seed)
    t = torch.randn(shape, generator=g, device=device(), dtype=torch.float32)
    if std != 1.0:
        t.mul_(std)
    return t.to(dtype)


def random_routing(T: int, E: int, top_k: int, *, seed: int = 0):
    """Router-like routing: softmax of random logits, top-k, weights renormalised to sum to 1 (DeepSeek-V3 style).

    Returns ``topk_weights`` float32 ``(T, top_k)`` and ``topk_ids`` int32 ``(T, top_k)`` (distinct per token)."""
    g = torch.Generator(device=device())
    g.manual_seed(seed)
    logits = torch.randn(T, E, generator=g, device=device(), dtype=torch.float32)
    probs = torch.softmax(logits, dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return w.contiguous(), ids.to(torch.int32).contiguous()


def torch_routing_plan(topk_ids: torch.Tensor, num_experts: int, block_size: int = 128):
    """A ``RoutingPlan`` built from plain torch ops (a stand-in where ``fp8_deep.ops.align_routing`` is missing;
    same layout: per-expert segments padded to ``block_size``, stable order inside each expert)."""
    from fp8_deep.ops.plan import RoutingPlan, max_padded_rows
    T, k = topk_ids.shape
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    numel = flat.numel()
    rows = max_padded_rows(T, k, num_experts, block_size)
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    padded = (counts + block_size - 1) // block_size * block_size
    offsets = torch.cumsum(padded, 0) - padded
    order = torch.sort(flat, stable=True).indices
    sorted_e = flat[order]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(numel, device=dev) - starts[sorted_e]
    dest = offsets[sorted_e] + rank
    sorted_ids = torch.full((rows,), numel, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    m_indices = torch.full((rows,), -1, dtype=torch.int32, device=dev)
    m_indices[dest] = sorted_e.to(torch.int32)
    expert_ids = torch.full((rows // block_size,), -1, dtype=torch.int32, device=dev)
    seg_e = torch.repeat_interleave(torch.arange(num_experts, device=dev), padded // block_size)
    expert_ids[: seg_e.numel()] = seg_e.to(torch.int32)
    inv = torch.empty(numel, dtype=torch.int32, device=dev)
    inv[order] = dest.to(torch.int32)
    return RoutingPlan(sorted_token_ids=sorted_ids, expert_ids=expert_ids,
                       num_tokens_post_padded=padded.sum().to(torch.int32).reshape(1), m_indices=m_indices,
                       inv_perm=inv.view(T, k), expert_offsets=offsets.to(torch.int32),
                       expert_counts=counts.to(torch.int32), num_tokens=T, top_k=k, num_experts=num_experts,
                       block_size=block_size)


# ------------------------------------------------------------------------------------------------ output
class CsvLog:
    """Rows (dicts) written to ``path`` after every ``add``, so a run cut off by its timeout keeps what it measured.
    Every row carries the card and the software versions."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: List[Dict] = []
        self.meta = versions()

    def add(self, **row) -> Dict:
        full = {**row, **{k: v for k, v in self.meta.items() if k not in row}}
        self.rows.append(full)
        self.flush()
        return full

    def flush(self) -> None:
        if not self.rows:
            return
        cols: List[str] = []
        for r in self.rows:
            cols += [c for c in r if c not in cols]
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in self.rows:
                w.writerow({c: _fmt(r.get(c)) for c in cols})
        os.replace(tmp, self.path)


def _fmt(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def plot(path: Path, series: Dict[str, Sequence], x: Sequence, *, xlabel: str, ylabel: str, title: str,
         logx: bool = False, logy: bool = False, xticklabels: Optional[Sequence[str]] = None) -> Optional[Path]:
    """Line plot of ``series`` (name -> y values, NaN = not measured) over ``x``; PNG at ``path``.
    Returns None (with a note) when matplotlib is not importable."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"[note] matplotlib not importable: no plot {Path(path).name}")
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, ys in series.items():
        pts = [(xi, y) for xi, y in zip(x, ys) if y is not None and not (isinstance(y, float) and math.isnan(y))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    if xticklabels is not None:
        ax.set_xticks(list(x))
        ax.set_xticklabels(list(xticklabels), rotation=20, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\n{card_name()}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def run_bench(bench) -> int:
    """Drive a bench object (``marks()``, ``out_dir``, ``finish()``): its perf_report, then its summary, always."""
    try:
        run_mark(bench.marks(), bench.out_dir)
    finally:
        bench.finish()
    return 0


def run_mark(mark, save_dir: Path) -> None:
    """Run a ``triton.testing.perf_report`` mark; its own CSV/PNG (ms per provider) go to ``save_dir`` when pandas
    and matplotlib are importable, else the benchmark function is still driven over every point (our own CSV is
    written by the function itself either way)."""
    try:
        import matplotlib  # noqa: F401
        import pandas  # noqa: F401
        matplotlib.use("Agg")
        mark.run(print_data=False, save_path=str(save_dir))
        return
    except ImportError as exc:
        print(f"[note] {exc.name} not importable: perf_report's own CSV/PNG skipped")
    benches = mark.benchmarks if isinstance(mark.benchmarks, (list, tuple)) else [mark.benchmarks]
    for b in benches:
        for xv in b.x_vals:
            xv = xv if isinstance(xv, (list, tuple)) else [xv] * len(b.x_names)
            for line in b.line_vals:
                mark.fn(**dict(zip(b.x_names, xv)), **{b.line_arg: line}, **b.args)


def print_table(rows: Iterable[Dict], columns: Sequence[str], *, title: str = "", prefix: str = "") -> None:
    """Compact fixed-width table; ``prefix`` starts every line (e.g. "SUMMARY" so gpu_check.sh can grep them)."""
    rows = list(rows)

    def cell(v):
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    table = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(t[i]) for t in table]) for i, c in enumerate(columns)]
    pre = f"{prefix} " if prefix else ""
    if title:
        print(f"{pre}{title}")
    print(pre + "  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for t in table:
        print(pre + "  ".join(v.rjust(w) for v, w in zip(t, widths)))


def free_cuda() -> None:
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class ClockSampler:
    """``nvidia-smi`` sampling SM clock and power every ``period_ms`` in the background, so that a timing can be
    reported with the clock it ran at (an H100 at its 700 W cap moves its clock by +-10% under a GEMM: timings of
    power-bound kernels are only comparable together with it). ``window(t0, t1)`` -> (mean MHz, mean W, samples)
    over host times ``[t0, t1]`` (``time.time()``); NaN when nvidia-smi is missing or no sample fell inside."""

    def __init__(self, period_ms: int = 50):
        self.samples = []  # (host time, MHz, W)
        self._proc = None
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw", "--format=csv,noheader,nounits",
                 f"-lms={period_ms}", "-i", os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        except (OSError, ValueError):
            return
        import threading
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        from datetime import datetime
        for line in self._proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                # the sample's own time stamp (local time, as time.time() reads it): the pipe may deliver late
                t = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                self.samples.append((t, float(parts[1]), float(parts[2])))
            except (ValueError, IndexError):
                continue

    def window(self, t0: float, t1: float):
        inside = [(mhz, w) for t, mhz, w in list(self.samples) if t0 <= t <= t1]
        if not inside:
            return float("nan"), float("nan"), 0
        return (sum(m for m, _ in inside) / len(inside), sum(w for _, w in inside) / len(inside), len(inside))

    def close(self):
        if self._proc is not None:
            self._proc.terminate()
