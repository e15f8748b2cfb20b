"""Print the Triton code inductor generates for bench_quant's compiled baselines (run with TORCH_LOGS=output_code),
and time it beside ours in the same process: what to read when our kernel trails torch.compile."""
import argparse  # noqa: E402

if __name__ == "__main__":  # --help works without a GPU; the flags read below pass through
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_known_args()

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
import triton.testing as tt  # noqa: E402

import bench_quant as BQ  # noqa: E402
from fp8_deep import ops  # noqa: E402

w = torch.randn(32, 4096, 7168, device="cuda", dtype=torch.bfloat16)
x = torch.randn(4096, 7168, device="cuda", dtype=torch.bfloat16)
cases = [
    ("weight one layout", torch.compile(BQ.weight_ref_fast), lambda: ops.quantize_weight_blockwise(w), w),
    ("act row-major", torch.compile(BQ.act_ref_fast), lambda: ops.quantize_activation(x, backend="triton"), x),
]
for name, comp, ours, t in cases:
    comp(t)
    torch.cuda.synchronize()
    mc = tt.do_bench(lambda: comp(t), rep=200)
    mo = tt.do_bench(ours, rep=200)
    print(f"### {name}: compile {mc:.4f} ms, ours {mo:.4f} ms, ours/compile speed {mc / mo:.3f}", flush=True)

# the launch configuration inductor's autotuner kept for each kernel above (Triton's cache metadata)
import glob  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

cache = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
for path in sorted(glob.glob(os.path.join(cache, "*", "triton_*.json"))):
    meta = json.load(open(path))
    keep = {k: meta.get(k) for k in ("name", "num_warps", "num_stages", "shared", "constants") if k in meta}
    print("### inductor kernel:", keep, flush=True)
for path in glob.glob("/tmp/torchinductor_*/**/*.best_config", recursive=True):
    print("### best_config", path, open(path).read(), flush=True)
