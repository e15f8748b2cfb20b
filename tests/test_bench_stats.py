"""The benchmark's paired ratio (bench/bench_quant.py): what the quantizer figures in README.md rest on."""
import pytest

from conftest import bench_module


@pytest.fixture(scope="module")
def bench_quant():
    with bench_module("bench_quant") as m:
        yield m


def test_paired_ratio_cancels_a_bias_of_position(bench_quant):
    # provider B is truly 1% faster than the baseline A; whoever runs second in a round gets 0.5% longer times.
    # Forward rounds run A then B, reversed rounds B then A: per-round ratios alternate 1.01/1.005 and 1.01*1.005.
    true, bias, rounds = 1.01, 1.005, 6
    base, other = [], []
    for r in range(rounds):
        a, b = 1.0, 1.0 / true
        if r % 2 == 0:
            b *= bias
        else:
            a *= bias
        base.append(a)
        other.append(b)
    ratios = bench_quant.paired_ratios(base, other)
    assert len(ratios) == rounds // 2
    assert all(r == pytest.approx(true, rel=1e-12) for r in ratios)
    # unpaired, the bias shows: half the rounds say 1.005, half 1.015
    assert min(a / b for a, b in zip(base, other)) == pytest.approx(true / bias)


def test_odd_rounds_rejected(bench_quant):
    with pytest.raises(SystemExit):
        bench_quant.parse_args(["--rounds", "5"])


def test_clean_flush_not_with_graph_timings(bench_quant):
    for mode in ("--graph", "--rotate"):
        with pytest.raises(SystemExit):
            bench_quant.parse_args(["--clean-flush", mode])
    assert bench_quant.parse_args(["--clean-flush"]).clean_flush


@pytest.mark.gpu
def test_clean_flush_timing_gpu(bench_quant):
    """do_bench's loop with a reading flush: median and band ordered, the timed call's result intact, and no
    combination with graph replays."""
    import torch
    import _common as C
    x = torch.randn(1 << 22, device="cuda")
    y = torch.empty_like(x)
    med, lo, hi = C.bench(lambda: torch.neg(x, out=y), rep=20, clean_flush=True)
    assert 0 < lo <= med <= hi
    assert torch.equal(y, -x)
    with pytest.raises(ValueError, match="graph"):
        C.bench(lambda: None, graph=True, clean_flush=True)
