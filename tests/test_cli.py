"""The ``fp8flow`` command: the numerics report is the main job until training lands."""

import json

import pytest
import torch

from megatron_fp8flow import cli, numerics


def test_numerics_report(tmp_path, capsys):
    out = tmp_path / "n.json"
    rc = cli.main(["numerics", "--m", "384", "--k", "256", "--groups", "4", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "SAT column" in text and "heavy-tailed" in text
    rows = json.loads(out.read_text())
    assert [r["kind"] for r in rows] == list(numerics.KINDS)
    for r in rows:
        assert r["sat_column_code_mismatches"] == 0 and r["sat_column_scale_mismatches"] == 0
        # FP8 E4M3 with 1x128 blocks: about 2-3% relative error, never zero on random data.
        assert 0.01 < r["rowwise_err"] < 0.05
        # pow2 requantization adds (almost) nothing; fp32 scales add a second rounding error.
        assert r["dqrq_pow2_added"] < 1e-3 * r["rowwise_err"] * 10
        assert r["dqrq_fp32_added"] > 0.3 * r["rowwise_err"]


def test_router_splits_are_skewed_and_sum():
    s = numerics.router_splits(1000, 8, seed=3)
    assert sum(s) == 1000 and s[0] == 0 and max(s) > 2 * (1000 / 8)


def test_bench_needs_gpu():
    if torch.cuda.is_available():
        pytest.skip("has a GPU; the benchmark itself is run by `fp8flow bench sat`")
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        cli.main(["bench", "sat"])
