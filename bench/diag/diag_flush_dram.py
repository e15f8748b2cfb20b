"""What the L2 flush ahead of a timed call puts into that call's DRAM traffic: activation quantization at M >= 4096.

Question (issue 2, run 055c4f4): under ``triton.testing.do_bench`` the activation quantizer reaches 79-81% of the
2 GiB copy rate at M=4096, K=7168 (88 MB of minimal traffic), and a same-bytes copy only 83-85%; after a flush that
*reads* 256 MiB instead of zeroing it, the same kernel reaches 94-98%. Hypothesis: do_bench's ``zero_`` leaves the
L2 full of dirty lines, and the timed call writes them back to HBM as it allocates lines for its own reads, so its
DRAM traffic is ~its own bytes plus up to one L2 (50 MB on an H100). This measures the bytes instead of inferring them.

Three parts, each per M, flush (``zero``: do_bench's 256 MB ``zero_``; ``read``: a 256 MiB read, as in
``bench_quant --clean-flush``; ``none``) and op (ours with row-major / TMA-aligned scales, torch.compile of the
reference, a bf16 -> fp8 cast of the same tensor (the same reads and writes but the scales, through an SM kernel),
and a bf16 negation of the op's byte count):

1. ``time``: the flush then one call between two events, as do_bench does, median of ``REPS_TIME`` calls.
2. ``kernel``: Nsight Compute, one kernel at a time after its flush (``--cache-control none``, ``--clock-control
   none``: no cache flush of its own, the card's clocks as found): DRAM bytes read and written by the kernel.
   ncu stops the GPU between the flush and the profiled kernel; the L2 keeps its dirty lines over that gap only if
   the hardware does not clean them when idle, which the ``zero`` rows show.
3. ``range``: ncu range replay (``cudaProfilerStart/Stop`` around flush + op and around the flush alone, no gap):
   the pair's DRAM bytes minus the flush's alone are what the timed call moved, write-backs of the flush included.

Outcome (H100, run 055c4f4; docs/performance-log.md): at M=4096 the kernel reads 58.7 MB and writes 34.1 MB
back after the zeroing flush (34.2 us), 15.9 MB after the reading flush (29.0 us). After the zeroing flush the call
writes back about its own output; after the reading flush about half of it is still in L2 at the end. Under the
zeroing flush the kernel and a copy kernel both move DRAM bytes at 2.7 TB/s, so the M=4096 shortfall is in the
window, not the kernel. Range replay counts write-backs through the range's end, so it gives totals only.

    python bench/diag/diag_flush_dram.py            # GPU machine (gpu_check.sh stage proto, PROTO=bench/diag/diag_flush_dram.py)
    DFD_M=4096,8192 DFD_OPS=act_row,cast DFD_MODES=time,kernel python bench/diag/diag_flush_dram.py
"""
import argparse  # noqa: E402

if __name__ == "__main__":  # --help works without a GPU; the flags read below pass through
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_known_args()

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# a private inductor cache: after this script had compiled act_ref_fast for two M in one process, a later
# bench_quant process on the same machine timed its M=4096 compile baseline at 0.143 ms instead of 0.037 (run 055c4f4,
# run 055c4f4; likely torch.compile's cached record that M turned dynamic); static compiles in a private cache keep
# the runs apart
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="diag_flush_dram_inductor_"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from fp8_deep import ops  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common as C  # noqa: E402
from bench_quant import act_nbytes, act_ref_fast  # noqa: E402

K = 7168
FLUSHES = ("zero", "read", "none")
OPS = ("act_row", "act_tma", "compile", "cast", "neg")
# the kernel each op launches, by a substring of its name (ncu rows are matched to the manifest in launch order)
KERNEL_NAME = {"act_row": "quant_act", "act_tma": "quant_act", "compile": "triton", "cast": "elementwise",
               "neg": "elementwise"}
REPS_TIME = 200
REPS_NCU = 2
METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum", "gpu__time_duration.sum")


def env_list(name, default):
    v = os.environ.get(name)
    return tuple(s for s in v.split(",") if s) if v else tuple(default)


def minimal_bytes(M):
    """The op's own traffic at M rows (bench_quant's count)."""
    return act_nbytes(M * K)


class Setup:
    """Inputs, flushes and ops for one M; every op warmed (compiled) before anything is measured."""

    def __init__(self, M):
        g = torch.Generator(device="cuda").manual_seed(0)
        self.x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
        self.zero_buf = torch.empty(int(256e6 // 4), dtype=torch.int, device="cuda")  # do_bench's flush buffer
        self.read_buf = torch.ones(256 * 2**20 // 4, dtype=torch.float32, device="cuda")
        self.q = torch.empty(M, K, device="cuda", dtype=torch.float8_e4m3fn)
        half = minimal_bytes(M) // 4  # bf16 elements read (and written) by a negation moving the op's bytes
        self.neg_src = torch.randn(half, device="cuda", dtype=torch.bfloat16, generator=g)
        self.neg_dst = torch.empty_like(self.neg_src)
        compiled = torch.compile(act_ref_fast, dynamic=False)
        self.ops = {
            "act_row": lambda: ops.quantize_activation(self.x, backend="triton"),
            "act_tma": lambda: ops.quantize_activation(self.x, backend="triton", scale_layout="tma_aligned"),
            "compile": lambda: compiled(self.x),
            "cast": lambda: self.q.copy_(self.x),
            "neg": lambda: torch.neg(self.neg_src, out=self.neg_dst),
        }
        self.flushes = {"zero": self.zero_buf.zero_, "read": self.read_buf.amax, "none": lambda: None}
        for fn in self.ops.values():
            for _ in range(3):
                fn()
        torch.cuda.synchronize()


def time_rows(ms, ops_, flushes):
    """do_bench's loop per (flush, op): flush, start event, call, end event; the median in us."""
    rows = []
    for M in ms:
        s = Setup(M)
        for flush in flushes:
            for op in ops_:
                f, fn = s.flushes[flush], s.ops[op]
                starts = [torch.cuda.Event(enable_timing=True) for _ in range(REPS_TIME)]
                ends = [torch.cuda.Event(enable_timing=True) for _ in range(REPS_TIME)]
                for a, b in zip(starts, ends):
                    f()
                    a.record()
                    fn()
                    b.record()
                torch.cuda.synchronize()
                us = statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends)) * 1e3
                rows.append(dict(M=M, flush=flush, op=op, us=us))
        del s
        C.free_cuda()
    return rows


def child(mode, ms, ops_, flushes, manifest_path):
    """Run under ncu with --profile-from-start off: each profiled kernel (kernel mode) or range (range mode) sits
    between cudaProfilerStart/Stop; the manifest lists them in order."""
    manifest = []
    prof = torch.cuda.profiler
    for M in ms:
        s = Setup(M)
        for flush in flushes:
            if mode == "range" and flush != "none":  # the flush alone, the pair's baseline
                for rep in range(REPS_NCU):
                    prof.start()
                    s.flushes[flush]()
                    prof.stop()
                    manifest.append(dict(M=M, flush=flush, op="flush_only", rep=rep))
            for op in ops_:
                for rep in range(REPS_NCU):
                    if mode == "kernel":
                        s.flushes[flush]()
                        prof.start()
                        s.ops[op]()
                        prof.stop()
                    else:
                        prof.start()
                        s.flushes[flush]()
                        s.ops[op]()
                        prof.stop()
                    manifest.append(dict(M=M, flush=flush, op=op, rep=rep))
        torch.cuda.synchronize()
        del s
        C.free_cuda()
    Path(manifest_path).write_text(json.dumps(manifest))


def parse_ncu_csv(path):
    """Rows of ncu's raw page (``--csv --page raw --print-units base``): name and metric values, units row dropped."""
    text = Path(path).read_text()
    start = text.find('"ID"')
    if start < 0:
        raise RuntimeError(f"no CSV in ncu's log:\n{text[-3000:]}")
    rows = list(csv.DictReader(text[start:].splitlines()))
    out = []
    for r in rows:
        try:
            vals = {m: float(r[m].replace(",", "")) for m in METRICS if r.get(m) not in (None, "", "n/a")}
        except ValueError:  # the units row
            continue
        if not vals:
            continue
        out.append(dict(name=r.get("Kernel Name", r.get("Range Name", "?")), **vals))
    return out


def run_ncu(mode, ms, ops_, flushes, tmp):
    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    manifest = Path(tmp) / f"manifest_{mode}.json"
    log = Path(tmp) / f"ncu_{mode}.csv"
    cmd = [ncu, "--cache-control", "none", "--clock-control", "none", "--metrics", ",".join(METRICS), "--csv",
           "--page", "raw", "--print-units", "base", "--log-file", str(log)]
    # range replay takes each cudaProfilerStart/Stop pair as a range (and refuses --profile-from-start)
    cmd += ["--replay-mode", "range"] if mode == "range" else ["--profile-from-start", "off"]
    cmd += [sys.executable, __file__, "--child", mode, ",".join(map(str, ms)), ",".join(ops_), ",".join(flushes),
            str(manifest)]
    print("$", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        print(p.stdout[-3000:], p.stderr[-3000:], sep="\n", flush=True)
        raise RuntimeError(f"ncu ({mode}) exited {p.returncode}")
    rows = parse_ncu_csv(log)
    man = json.loads(manifest.read_text())
    if len(rows) != len(man) or any(mode == "kernel" and KERNEL_NAME[m["op"]] not in r["name"]
                                    for m, r in zip(man, rows)):
        for r in rows:  # what was profiled, for the next try
            print(f"  {mode} row: {r}", flush=True)
        raise RuntimeError(f"ncu {mode}: {len(rows)} profiled rows do not match the {len(man)} manifest entries "
                           "one for one")
    for m, r in zip(man, rows):
        m.update(read_mb=r.get(METRICS[0], float("nan")) / 1e6, write_mb=r.get(METRICS[1], float("nan")) / 1e6,
                 ncu_us=r.get(METRICS[2], float("nan")) / 1e3, name=r["name"])
    return man


def med(rows, key, **match):
    vals = [r[key] for r in rows if all(r[k] == v for k, v in match.items())]
    return statistics.median(vals) if vals else float("nan")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, ms, ops_, flushes, manifest = sys.argv[2:7]
        child(mode, [int(m) for m in ms.split(",")], ops_.split(","), flushes.split(","), manifest)
        return
    ms = [int(m) for m in env_list("DFD_M", ("4096", "8192"))]
    ops_ = env_list("DFD_OPS", OPS)
    flushes = env_list("DFD_FLUSHES", FLUSHES)
    modes = env_list("DFD_MODES", ("time", "kernel", "range"))
    print(C.env_line(), flush=True)
    copy = C.copy_bandwidth()
    print(f"copy bandwidth (2 GiB): {copy:.0f} GB/s", flush=True)
    timed = time_rows(ms, ops_, flushes) if "time" in modes else []
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("kernel", "range"):
            if mode in modes:
                try:
                    res[mode] = run_ncu(mode, ms, ops_, flushes, tmp)
                except Exception as e:  # one mode failing leaves the others' figures
                    print(f"ncu {mode} failed: {e}", flush=True)
    # raw rows first (every rep), then the table
    for mode, rows in res.items():
        for r in rows:
            print(f"  {mode:6s} M={r['M']:<6d} {r['flush']:5s} {r['op']:10s} rep {r['rep']}: read {r['read_mb']:8.1f} MB "
                  f"write {r['write_mb']:8.1f} MB  {r['ncu_us']:8.1f} us  {r['name'][:60]}")
    print("\nmedians: time = do_bench-style us; kernel = ncu DRAM MB of the kernel alone after its flush (ncu gap "
          "between); range = ncu DRAM MB of flush + op minus the flush alone; rate = range MB / time")
    hdr = (f"{'M':>6s} {'flush':5s} {'op':8s} {'own MB':>7s} {'time us':>8s} {'%copy':>6s} {'k.read':>7s} "
           f"{'k.write':>7s} {'r.read':>7s} {'r.write':>7s} {'rate GB/s':>9s}")
    print(hdr)
    for M in ms:
        own = minimal_bytes(M) / 1e6
        for flush in flushes:
            for op in ops_:
                us = med(timed, "us", M=M, flush=flush, op=op)
                k = res.get("kernel", [])
                kr, kw = med(k, "read_mb", M=M, flush=flush, op=op), med(k, "write_mb", M=M, flush=flush, op=op)
                rg = res.get("range", [])
                rr = med(rg, "read_mb", M=M, flush=flush, op=op)
                rw = med(rg, "write_mb", M=M, flush=flush, op=op)
                if flush != "none":
                    rr -= med(rg, "read_mb", M=M, flush=flush, op="flush_only")
                    rw -= med(rg, "write_mb", M=M, flush=flush, op="flush_only")
                rate = (rr + rw) * 1e6 / (us * 1e-6) / 1e9 if us == us else float("nan")
                print(f"{M:6d} {flush:5s} {op:8s} {own:7.1f} {us:8.1f} {100 * own * 1e3 / us / copy:6.1f} "
                      f"{kr:7.1f} {kw:7.1f} {rr:7.1f} {rw:7.1f} {rate:9.0f}")


if __name__ == "__main__":
    main()
