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
    assert set(row["engine_timings"]) == {"setup_s", "encode_s", "encode_overlapped_s", "score_s", "static_s", "table_s", "summary_s"}
    assert row["engine_timings"]["encode_overlapped_s"] > 0 and res["tokenize_ahead"] == "on"
    prof = row["profile_engine"]
    assert prof["wall_ms"] > 0 and prof["device_busy_ms"] is None and prof["top"]  # CPU: no device time


def test_peak_tflops_matches_whole_model_names():
    import bench_gpu

    peak = bench_gpu.peak_tflops
    assert (peak("NVIDIA L40"), peak("NVIDIA L40S"), peak("NVIDIA L4")) == (181.0, 362.0, 121.0)
    assert (peak("NVIDIA H100 80GB HBM3"), peak("NVIDIA H100 PCIe"), peak("NVIDIA GH200 480GB")) == (989.0, 756.0, 989.0)
    assert peak("NVIDIA H200") == 989.0 and peak("Tesla T4") is None and peak(None) is None


def test_bench_gpu_tiny_writes_every_part(tmp_path, monkeypatch):
    import bench_gpu

    out = tmp_path / "gpu.json"
    monkeypatch.setenv("OUT", str(tmp_path))  # the device tool's folder, --out inside it: no copy onto itself
    assert bench_gpu.main(["--tiny", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["complete"] and r["device"] == "cpu" and r["gpu"] is None
    assert r["train"]["tokens_per_s"] > 0 and r["train"]["mfu"] is None  # no GPU peak to divide by
    assert r["tune"]["steps"] == 3 and r["tune"]["torch_compile"] is False
    assert r["shift"]["tokens"] == 2 * 32 and r["shift"]["profile_engine"]["top"]
    assert (r["shift"]["view_top_k"], r["shift_view10"]["view_top_k"]) == (0, 10)  # without and with the view
    assert r["shift_view10"]["tokens"] == 2 * 32
    assert "tune_vs_plain_loop" in r


def _shift_record(class_mismatches: int = 0, rank_mismatches: int = 0) -> dict:
    return {"rows": [{"response_tokens": 64, "per_token_s": 2.0, "engine_s": 0.1, "bare_forward_s": 0.05,
                      "engine_scoring_s": 0.06, "speedup_vs_per_token": 20.0, "ranks_compared": 64,
                      "rank_mismatches": rank_mismatches, "class_mismatches": class_mismatches}]}


def _study_record(identical: bool = True, reused: int = 12) -> dict:
    return {"cold_s": 20.0, "warm_s": 5.0, "speedup": 4.0, "warm_metrics_identical": identical,
            "warm_stages_reused": reused, "stages": 12}


def test_the_table_says_what_each_speed_was_checked_against():
    """Was: the shift row hid the per-token loop's rank check, and the study row claimed 'warm reuses every
    stage' without counting: a warm run that reran stages read as a cache speed-up."""
    import run_all

    loop = run_all.table_rows("shift", _shift_record(rank_mismatches=3))[0]
    assert "ranks equal 61/64" in loop["measure"] and loop["ratio"] == 20.0
    (study,) = run_all.table_rows("study", _study_record(reused=11))
    assert "11/12 stages reused" in study["measure"] and study["ratio"] == 4.0


def test_results_that_fail_their_own_checks_fail_the_run():
    """Was: run_all exited 0 with a speed-up over wrong results (bench_shift alone exits 1 on a class
    mismatch); now each benchmark's correctness check is an error in all.json and the exit status."""
    import run_all

    ok = {"shift": _shift_record(rank_mismatches=2), "study": _study_record(),  # ranks a few places apart: fp noise
          "generate": {"identical_outputs": 16, "prompts": 16}, "index": {"scan_mismatches": 0, "scan_checked": 50}}
    assert all(run_all.failed_checks(name, r) == [] for name, r in ok.items())
    bad = {"shift": _shift_record(class_mismatches=1), "study": _study_record(identical=False, reused=11),
           "generate": {"identical_outputs": 15, "prompts": 16}, "index": {"scan_mismatches": 2, "scan_checked": 50}}
    problems = {name: run_all.failed_checks(name, r) for name, r in bad.items()}
    assert [len(p) for p in problems.values()] == [1, 2, 1, 1], problems
    assert "reran 1 of 12 stages" in problems["study"][1]


def test_the_warm_study_record_counts_reused_stages_and_the_study_s_own_threads(tmp_path):
    """The study runs in its own process: its threads are its config's (was: the benchmark process's, 2
    where micro.yaml runs 1)."""
    import run_all

    (tmp_path / "timings.json").write_text(json.dumps({"stages": {"world": 0.1, "base-s0": 2.0, "analysis-s0": 1.0},
                                                       "cached": {"world": True, "base-s0": True,
                                                                  "analysis-s0": False}}))
    (tmp_path / "config.resolved.yaml").write_text("name: micro\nthreads: 1\nworkers: 1\n")
    assert run_all.last_study_run(tmp_path) == {"warm_stages_reused": 2, "stages": 3, "threads": 1}


def test_bench_top_k_checks_blockwise_against_topk(capsys):
    import bench_top_k

    assert bench_top_k.main(["--device", "cpu", "--rows", "64", "--vocabs", "32000,1000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("values equal True" in line for line in lines)
