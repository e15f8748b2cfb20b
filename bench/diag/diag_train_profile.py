"""Where the FP8 MoE training step's time goes: one layer's forward + backward under torch.profiler, GPU time per
kernel (top rows), next to BF16 autograd of the same layer.

    python bench/diag/diag_train_profile.py [--E 32 --H 7168 --I 2048 --rows 1024]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--E", type=int, default=32)
    p.add_argument("--H", type=int, default=7168)
    p.add_argument("--I", type=int, default=2048)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--top", type=int, default=18)
    a = p.parse_args()
    import torch
    import fp8_deep
    from torch.profiler import ProfilerActivity, profile

    E, H, I, k = a.E, a.H, a.I, 8
    T = a.rows * E // k
    dev = "cuda"
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16).requires_grad_()
    w13 = (torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) / H ** 0.5).requires_grad_()
    w2 = (torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) / I ** 0.5).requires_grad_()
    ids = ((torch.arange(T, device=dev)[:, None] * k + torch.arange(k, device=dev)[None, :]) % E).to(torch.int32)
    tw = torch.full((T, k), 1.0 / k, device=dev).requires_grad_()
    gy = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    fw = fp8_deep.quantize_moe_weights(w13, w2)

    def step():
        for t in (x, w13, w2, tw):
            t.grad = None
        fp8_deep.moe_forward(x, w13, w2, tw, ids, fp8_weights=fw, backend="triton").backward(gy)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"PROFILE E={E} H={H} I={I} rows={a.rows} T={T}: 3 steps")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=a.top, max_name_column_width=60))
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(5):
        step()
    ev[1].record()
    torch.cuda.synchronize()
    print(f"PROFILE fp8 fwd+bwd {ev[0].elapsed_time(ev[1]) / 5:.3f} ms per step (events, host launch included)")


if __name__ == "__main__":
    main()
