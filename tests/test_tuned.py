"""Per-card tuned tables (fp8_deep/ops/_tuned.py): keys, nearest-entry lookup, malformed tables, and the grouped
GEMM launcher taking a table's config (same bytes as its heuristic: tables change speed, never results)."""
import json

import pytest
import torch

from fp8_deep.numerics import FP8_DTYPE
from fp8_deep.ops import _tuned
from fp8_deep.ops import grouped_gemm as gg
from fp8_deep.testing import assert_bitwise_equal


def test_card_key():
    assert _tuned.card_key("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert _tuned.card_key("NVIDIA H200") == _tuned.card_key("NVIDIA H200 NVL") == "NVIDIA_H200"
    assert _tuned.card_key("Some/Card  X") == "Some_Card_X"


TABLE = {"op": "grouped_gemm", "card": "X", "entries": [
    {"E": 256, "N": 4096, "K": 7168, "rows": 16, "config": "A"},
    {"E": 256, "N": 4096, "K": 7168, "rows": 256, "config": "B"},
    {"E": 32, "N": 4096, "K": 7168, "rows": 256, "config": "C"},
    {"E": 256, "N": 7168, "K": 2048, "rows": 64, "config": "D"},
]}


@pytest.mark.parametrize("E,N,K,rows,want", [
    (256, 4096, 7168, 12, "A"), (256, 4096, 7168, 150, "B"),  # log2 distance: 150 is nearer 256 than 16
    (32, 4096, 7168, 300, "C"), (64, 4096, 7168, 256, "C"),  # same rows: nearest E
    (256, 7168, 2048, 48, "D"), (256, 512, 7168, 16, None),  # an (N, K) the table lacks: the heuristic
    (256, 7168, 2048, 1, None), (256, 4096, 7168, 2048, None),  # farther than 2x from every entry: the heuristic
])
def test_lookup_nearest(E, N, K, rows, want):
    assert _tuned.lookup(TABLE, E=E, N=N, K=K, rows=rows) == want
    assert _tuned.lookup(None, E=E, N=N, K=K, rows=rows) is None


def test_load_table_and_malformed(tmp_path, monkeypatch):
    monkeypatch.setattr(_tuned, "TABLE_DIR", tmp_path)
    _tuned.load_table.cache_clear()
    (tmp_path / "op").mkdir()
    (tmp_path / "op" / "good.json").write_text(json.dumps(TABLE))
    (tmp_path / "op" / "bad.json").write_text(json.dumps({"entries": [{"E": 0, "N": 1, "K": 1, "rows": 1,
                                                                       "config": "A"}]}))
    try:
        assert _tuned.load_table("op", "good")["entries"][0]["config"] == "A"
        assert _tuned.load_table("op", "missing") is None
        with pytest.raises(ValueError, match="malformed"):
            _tuned.load_table("op", "bad")
        assert _tuned.tuned_config("op", torch.device("cpu"), E=1, N=1, K=1, rows=1) is None  # CUDA only
        assert _tuned.lookup(_tuned.load_table("op", "good"), E=256, N=4096, K=7168, rows=20) == "A"
    finally:
        _tuned.load_table.cache_clear()


def test_table_entries_that_change_numerics_are_refused():
    assert gg._table_config("BLOCK_M=64,BLOCK_N=128,num_warps=4").BLOCK_M == 64
    for bad, match in (("ACC_K=32", "change the numerics"), ("UPCAST=1", "change the numerics"),
                       ("BLOCK_X=1", "invalid config")):
        with pytest.raises(ValueError, match=match):
            gg._table_config(bad)


def test_grouped_gemm_takes_the_tables_config(monkeypatch, device):
    """The launcher asks the table with the call's sizes and runs its config; the bytes equal the heuristic's."""
    E, N, K, rows = 3, 192, 256, 20
    g = torch.Generator().manual_seed(3)
    a = torch.randn(E * 32, K, generator=g).to(FP8_DTYPE).to(device)
    a_scale = (torch.rand(E * 32, K // 128, generator=g) + 0.5).to(device)
    b = torch.randn(E, N, K, generator=g).to(FP8_DTYPE).to(device)
    b_scale = (torch.rand(E, 2, K // 128, generator=g) + 0.5).to(device)
    offsets = torch.tensor([0, 32, 64], dtype=torch.int32, device=device)
    counts = torch.tensor([rows, 0, 31], dtype=torch.int32, device=device)
    monkeypatch.delenv(gg.CONFIG_ENV, raising=False)
    asked = []
    table_cfg = "BLOCK_M=32,BLOCK_N=64,GROUP_M=1,SWAP_AB=1,PERSISTENT=1,num_warps=4,num_stages=2"

    def fake(op, dev, **kw):
        asked.append((op, kw))
        return table_cfg

    monkeypatch.setattr(gg, "tuned_config", lambda op, dev, **kw: None)
    base = gg.grouped_gemm_fp8(a, a_scale, b, b_scale, offsets, counts, expected_m=rows)
    monkeypatch.setattr(gg, "tuned_config", fake)
    got = gg.grouped_gemm_fp8(a, a_scale, b, b_scale, offsets, counts, expected_m=rows)
    from fp8_deep.numerics import use_triton
    if use_triton(a):  # (the CPU without Triton computes in torch and never picks tiles)
        assert asked == [("grouped_gemm", dict(E=E, N=N, K=K, rows=rows))]
    for lo, n in ((0, rows), (64, 31)):
        assert_bitwise_equal(got[lo:lo + n], base[lo:lo + n], "table config vs heuristic")


def test_auto_backend_follows_the_measured_table():
    from fp8_deep.ops.backend import AUTO_DEEP_GEMM_MIN_ROWS_PER_EXPERT, auto_prefers_deep_gemm
    assert auto_prefers_deep_gemm(8, "deep_gemm") and not auto_prefers_deep_gemm(4096, "triton")
    assert auto_prefers_deep_gemm(AUTO_DEEP_GEMM_MIN_ROWS_PER_EXPERT, None)  # no entry: the threshold
    assert not auto_prefers_deep_gemm(AUTO_DEEP_GEMM_MIN_ROWS_PER_EXPERT - 1, None)


def test_tuner_tables_load_back(tmp_path, monkeypatch):
    """A table as the tuners write it (merged, atomic) is what the launchers' lookup reads."""
    from conftest import bench_module
    with bench_module("tune_grouped_gemm") as tuner:
        path = tmp_path / "moe_backend" / "X.json"
        old = [dict(E=128, N=1536, K=2048, rows=1, config="triton"), dict(E=128, N=1536, K=2048, rows=16,
                                                                            config="triton")]
        tuner.write_table(path, "X", old, [dict(E=128, N=1536, K=2048, rows=16, config="deep_gemm", T=256)],
                          op="moe_backend")
    monkeypatch.setattr(_tuned, "TABLE_DIR", tmp_path)
    _tuned.load_table.cache_clear()
    try:
        table = _tuned.load_table("moe_backend", "X")
        assert table["op"] == "moe_backend" and len(table["entries"]) == 2  # the re-measured point replaced
        assert _tuned.lookup(table, E=128, N=1536, K=2048, rows=20) == "deep_gemm"
        assert _tuned.lookup(table, E=128, N=1536, K=2048, rows=1) == "triton"
    finally:
        _tuned.load_table.cache_clear()


# ---------------------------------------------------------------------------------------------- quantizer tables
def test_quant_config_parse_and_validation():
    from fp8_deep.ops.quant import ActQuantConfig, WeightQuantConfig
    assert WeightQuantConfig.parse("STACK=0,TCHUNK=64,num_warps=16,BLOCKS_K=1,HINTS=3").TCHUNK == 64
    assert str(WeightQuantConfig.parse("STACK=1")).startswith("STACK=1,")
    assert ActQuantConfig.parse("FLAT=0,BLOCK_M=16,GROUPS_PER_PROG=2,num_warps=4").as_choice(True) == \
        ("tile", 16, 2, 4)
    assert ActQuantConfig.parse("FLAT=1,BLOCK_G=32,num_warps=8").as_choice(False)[0] == "tile"
    for bad, match in (("TCHUNK=8", "TCHUNK"), ("num_warps=3", "num_warps"), ("BLOCKS_K=3", "BLOCKS_K"),
                       ("HINTS=4", "HINTS"), ("WARPS=4", "unknown weight quantizer config key")):
        with pytest.raises(ValueError, match=match):
            WeightQuantConfig.parse(bad)
    with pytest.raises(ValueError, match="BLOCK_G"):
        ActQuantConfig.parse("BLOCK_G=48")


@pytest.mark.parametrize("with_transpose", [False, True])
def test_weight_quantizer_takes_the_tables_config(monkeypatch, with_transpose, device):
    """The weight quantizer asks its table (one layout or both) with the call's sizes, runs the entry's tile
    configuration, and writes the bytes of its built-in choice; a both-layouts entry naming the stack kernel is
    refused."""
    from fp8_deep import ops
    from fp8_deep.ops import quant
    w = (torch.randn(2, 256, 384) * 3).to(torch.bfloat16).to(device)
    for env in (quant.WEIGHT_CONFIG_ENV, quant.WEIGHT_HINTS_ENV):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(quant, "tuned_config", lambda op, dev, **kw: None)
    base = ops.quantize_weight_blockwise(w, with_transpose=with_transpose)
    asked = []
    spec = "TCHUNK=32,num_warps=4,BLOCKS_K=1,HINTS=0" if with_transpose else "TCHUNK=32,num_warps=4,BLOCKS_K=2,HINTS=2"

    def fake(op, dev, **kw):
        asked.append((op, kw))
        return spec
    monkeypatch.setattr(quant, "tuned_config", fake)
    got = ops.quantize_weight_blockwise(w, with_transpose=with_transpose)
    from fp8_deep.numerics import use_triton
    if use_triton(w):
        assert asked == [(quant.weight_quant_op(with_transpose), dict(E=2, N=256, K=384, rows=2))]
    for g, b in zip(got, base):
        assert_bitwise_equal(g, b)
    monkeypatch.setattr(quant, "tuned_config", lambda op, dev, **kw: quant.BUILTIN)  # the built-in choice won
    for g, b in zip(ops.quantize_weight_blockwise(w, with_transpose=with_transpose), base):
        assert_bitwise_equal(g, b)
    if with_transpose and use_triton(w):
        monkeypatch.setattr(quant, "tuned_config", lambda op, dev, **kw: "STACK=1")
        with pytest.raises(ValueError, match="weight_quant_t"):
            ops.quantize_weight_blockwise(w, with_transpose=True)


@pytest.mark.parametrize("layout", ["row_major", "tma_aligned"])
def test_activation_quantizer_takes_the_tables_config(monkeypatch, layout, device):
    from fp8_deep import ops
    from fp8_deep.ops import quant
    x = (torch.randn(40, 512) * 5).to(torch.bfloat16).to(device)
    monkeypatch.delenv(quant.ACT_CONFIG_ENV, raising=False)
    monkeypatch.setattr(quant, "tuned_config", lambda op, dev, **kw: None)
    base = ops.quantize_activation(x, scale_layout=layout, backend="triton")
    asked = []
    for spec in ("FLAT=1,BLOCK_G=8,num_warps=2", "FLAT=0,BLOCK_M=16,GROUPS_PER_PROG=4,num_warps=4"):
        def fake(op, dev, **kw):
            asked.append((op, kw))
            return spec
        monkeypatch.setattr(quant, "tuned_config", fake)
        got = ops.quantize_activation(x, scale_layout=layout, backend="triton")
        assert_bitwise_equal(got[0], base[0])
        assert_bitwise_equal(got[1].contiguous(), base[1].contiguous())
    from fp8_deep.numerics import use_triton
    if use_triton(x):
        assert asked[0] == (quant.act_quant_op(layout == "tma_aligned"), dict(E=1, N=1, K=512, rows=40))


def test_quant_tuner_plumbing(monkeypatch, capsys):
    """bench/tune_quant.py on the CPU (interpreter, tiny shapes): every candidate it keeps wrote the built-in
    choice's bytes through the launcher's table path, and the launch-plan caches are left empty."""
    from conftest import bench_module
    from fp8_deep.ops import quant
    with bench_module("tune_quant") as tuner:
        monkeypatch.setattr(tuner, "act_candidates", lambda: [quant.ActQuantConfig(FLAT=False, BLOCK_M=8,
                                                                                     GROUPS_PER_PROG=1, num_warps=2)])
        assert tuner.main(["--cpu-smoke", "--ops", "act_quant_row", "act_quant_tma"]) == 0
    out = capsys.readouterr().out
    assert "SUMMARY act_quant_row " in out and "SUMMARY act_quant_tma " in out and "other bytes" not in out
    assert len(quant._WEIGHT_PLANS) == 0 and len(quant._ACT_PLANS) == 0
    monkeypatch.setenv(quant.ACT_CONFIG_ENV, "8,1,2")
    with bench_module("tune_quant") as tuner:
        assert tuner.main(["--cpu-smoke", "--ops", "act_quant_row"]) == 2  # a pinned kernel: refused


def test_decode_tuner_smoke(capsys):
    """bench/tune_decode.py end to end on a tiny layer (interpreter): each candidate checked bit for bit against the
    heuristic's pick and timed; the grid covers every model, the decode pair within its bound, the routed pair and
    the gathered GEMM1 above it; each forward path against the chain."""
    from conftest import bench_module
    from fp8_deep.numerics import interpreter_active
    with bench_module("tune_decode") as tuner:
        assert tuner.main(["--dry-run"]) == 0
        # 6 models x T = 1, 4, 16, 64, 256, 2048: 2 GEMMs within the bound (T * top_k <= 128: three T per model,
        # four for Mixtral's top-2), 4 above (the routed pair, the gather path's pair), 2 past 128 rows per expert
        # (the gather pair alone: T=2048 on four of the six models)
        assert "98 grid points" in capsys.readouterr().out
        if not interpreter_active():
            pytest.skip("the smoke run times the interpreter (a GPU run tunes for real: the tuned stage)")
        assert tuner.main(["--cpu-smoke"]) == 0
    out = capsys.readouterr().out
    assert "NOT bitwise" not in out and "failed" not in out
    rows = [line.split() for line in out.splitlines() if line.startswith("SUMMARY smoke")]
    assert [r[2] for r in rows[:6]] == ["gemm1", "gemm2", "gemm1", "gemm2", "gather", "gather2"]
    fwd = rows[6:]
    assert len(fwd) == 2  # T=2 (decode) and T=70 (routed, gather), each against the chain
    assert fwd[0][5] == "decode" and fwd[1][5] == "routed" and fwd[1][8] == "gather"
    for r in fwd:
        assert r[-1] in r[5::3] + ["chain"]

def test_apply_tables(tmp_path, capsys):
    """tools/apply_tables.py puts a returned ``<card>_<op>_table.json`` at ``configs/<op>/<card>.json`` (where the
    launchers read it), says what changed, and refuses a file that is not a table."""
    import importlib.util
    import json
    from pathlib import Path

    from fp8_deep.ops import _tuned
    spec = importlib.util.spec_from_file_location(
        "apply_tables", Path(__file__).resolve().parent.parent / "tools" / "apply_tables.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    results, configs = tmp_path / "results", tmp_path / "configs"
    results.mkdir()
    entry = dict(E=128, N=1536, K=2048, rows=16384, config="gather", chain_ms=0.47)
    table = dict(op="moe_decode", card="NVIDIA_H100_80GB_HBM3", entries=[entry])
    (results / "NVIDIA_H100_80GB_HBM3_moe_decode_table.json").write_text(json.dumps(table))
    (results / "broken_table.json").write_text(json.dumps(dict(op="x", card="y", entries=[dict(E=0)])))
    assert tool.apply([results], configs, dry_run=True) == 1
    assert not (configs / "moe_decode").exists()
    assert tool.apply([results], configs) == 1
    out = capsys.readouterr().out
    assert "refused" in out and "broken_table.json" in out and "1 new or changed" in out
    written = json.loads((configs / "moe_decode" / "NVIDIA_H100_80GB_HBM3.json").read_text())
    assert _tuned.lookup(written, E=128, N=1536, K=2048, rows=16000) == "gather"
    assert tool.apply([results / "NVIDIA_H100_80GB_HBM3_moe_decode_table.json"], configs) == 0
    assert "0 new or changed" in capsys.readouterr().out
