"""The benchmark scripts still run against the current code (they reach into the shift engine and
the tuner), on tiny sizes: the per-token loop agrees with the engine, and the GPU script's CPU smoke
mode writes every part. Speed itself is measured by the benchmarks, not here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.syspath_prepend(str(BENCH / "gpu"))


def test_bench_shift_engine_agrees_with_the_per_token_loop():
    import bench_shift

    res = bench_shift.run(["--lengths", "24", "--responses", "3", "--batch-size", "2", "--repeats", "1",
                           "--per-token-responses", "2", "--profile", "--tokenize-ahead", "on"])  # windows, as on a GPU
    row = res["rows"][0]
    assert row["ranks_compared"] == 2 * 24 and row["rank_mismatches"] == 0 and row["class_mismatches"] == 0
    assert row["tokens"] == 3 * 24 and row["engine_s"] > 0 and row["bare_forward_s"] > 0
    assert set(row["engine_timings"]) == {"encode_s", "encode_overlapped_s", "score_s", "table_s", "summary_s"}
    assert row["engine_timings"]["encode_overlapped_s"] > 0 and res["tokenize_ahead"] == "on"
    prof = row["profile_engine"]
    assert prof["wall_ms"] > 0 and prof["device_busy_ms"] is None and prof["top"]  # CPU: no device time


def test_peak_tflops_matches_whole_model_names():
    import bench_gpu

    peak = bench_gpu.peak_tflops
    assert (peak("NVIDIA L40"), peak("NVIDIA L40S"), peak("NVIDIA L4")) == (181.0, 362.0, 121.0)
    assert (peak("NVIDIA H100 80GB HBM3"), peak("NVIDIA H100 PCIe"), peak("NVIDIA GH200 480GB")) == (989.0, 756.0, 989.0)
    assert peak("NVIDIA H200") == 989.0 and peak("Tesla T4") is None and peak(None) is None


def test_bench_gpu_tiny_writes_every_part(tmp_path):
    import bench_gpu

    out = tmp_path / "gpu.json"
    assert bench_gpu.main(["--tiny", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["complete"] and r["device"] == "cpu" and r["gpu"] is None
    assert r["train"]["tokens_per_s"] > 0 and r["train"]["mfu"] is None  # no GPU peak to divide by
    assert r["tune"]["steps"] == 3 and r["tune"]["torch_compile"] is False
    assert r["shift"]["tokens"] == 2 * 32 and r["shift"]["profile_engine"]["top"]
    assert (r["shift"]["view_top_k"], r["shift_view10"]["view_top_k"]) == (0, 10)  # without and with the view
    assert r["shift_view10"]["tokens"] == 2 * 32
    assert "tune_vs_plain_loop" in r
