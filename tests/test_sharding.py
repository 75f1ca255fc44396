"""Sharded token shift and generation: two CPU processes under accelerate give the one-process output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from itlens.cli import main as cli_main
from itlens.io import atomic_write_jsonl

torch.set_num_threads(1)  # the launched processes run with one thread each; same kernels, same numbers
REPO = Path(__file__).resolve().parents[1]


def _launch(commands: list[list[str]], port: int) -> subprocess.CompletedProcess:
    """``accelerate launch`` two CPU processes (gloo) running the itlens CLI commands one after another."""
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [a for i, c in enumerate(commands) for a in ((["---"] if i else []) + c)]
    return subprocess.run([str(accelerate), "launch", "--config_file", str(REPO / "configs/accelerate/cpu_ddp_2proc.yaml"),
                           "--num_processes", "2", "--main_process_port", str(port),
                           str(REPO / "tests" / "cli_sequence.py"), *args],
                          capture_output=True, text=True, env=env, timeout=240)


@pytest.mark.slow
def test_two_processes_give_the_one_process_shift_and_generations(tiny_model_dir, tiny_model_dir_b, it_records,
                                                                  untied_model_dir, tmp_path):
    import pandas as pd

    # 11 responses of varied length (one empty) at batch 2: 5 full batches + 1 partial, split 3 / 3.
    responses = [{"id": r["id"], "instruction": r["instruction"], "model": "b",
                  "response": r["response"] + " the city" * (i % 4)} for i, r in enumerate(it_records[:10])]
    responses.insert(4, {"id": "toy:empty", "instruction": "what?", "response": "", "model": "b"})
    rfile = atomic_write_jsonl(tmp_path / "responses.jsonl", responses)
    pfile = atomic_write_jsonl(tmp_path / "prompts.jsonl",
                               [{"id": r["id"], "instruction": r["instruction"] + " north" * (i % 3), "extra": i}
                                for i, r in enumerate(it_records[:7])])
    shift = ["shift", "--base", str(tiny_model_dir), "--tuned", str(tiny_model_dir_b), "--responses", str(rfile),
             "--batch-size", "2", "--view", "0", "--base-context", "template"]
    gen = ["generate", "--model", str(untied_model_dir), "--prompts", str(pfile), "--set", "batch_size=3",
           "--set", "max_new_tokens=6"]

    cli_main([*shift, "--out", str(tmp_path / "shift1")])
    cli_main([*gen, "--out", str(tmp_path / "gen1.jsonl")])
    two = _launch([[*shift, "--out", str(tmp_path / "shift2")], [*gen, "--out", str(tmp_path / "gen2.jsonl")]], 29547)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "sharded over 2 processes: 6 + 4 responses scored" in two.stderr  # 5 batches, round-robin
    assert "sharded over 2 processes: 4 + 3 prompts" in two.stderr  # batches of 3, 3, 1

    one_t = pd.read_parquet(tmp_path / "shift1" / "tokens.parquet")
    two_t = pd.read_parquet(tmp_path / "shift2" / "tokens.parquet")
    assert one_t["id"].nunique() == 10 and len(one_t) > 100
    pd.testing.assert_frame_equal(one_t, two_t, check_exact=True)
    one_s = json.loads((tmp_path / "shift1" / "summary.json").read_text())
    assert one_s == json.loads((tmp_path / "shift2" / "summary.json").read_text())
    assert one_s["n_empty"] == 1 and one_s["n_responses"] == 11

    one_g = (tmp_path / "gen1.jsonl").read_text()
    assert (tmp_path / "gen2.jsonl").read_text() == one_g
    assert [json.loads(x)["id"] for x in one_g.splitlines()] == [f"toy:{i}" for i in range(7)]
    assert all(json.loads(x)["response_token_ids"] for x in one_g.splitlines())  # answers, not empty ones


@pytest.mark.parametrize("ahead", [None, True])
def test_a_shard_scores_only_its_batches(tiny_model_dir, tiny_model_dir_b, untied_model_dir, it_records, ahead):
    """The in-process half of sharding: shards partition the rows, and merging restores the whole
    (with every response tokenized first, as on a CPU, and tokenized in windows, as on a GPU)."""
    import pandas as pd

    from itlens.analysis.token_shift import compute_shift, merge_shards
    from itlens.generate import generate_responses
    from itlens.models import load_model

    recs = [{**r, "model": "b"} for r in it_records[:5]]
    opts = {"batch_size": 2, "view_top_k": 0, "base_context": "template", "tokenize_ahead": ahead}
    whole = compute_shift(str(tiny_model_dir), str(tiny_model_dir_b), recs, **opts)
    parts = [compute_shift(str(tiny_model_dir), str(tiny_model_dir_b), recs, shard=(r, 2), **opts) for r in range(2)]
    ids = [set(p.tokens["id"]) for p in parts]
    assert ids[0].isdisjoint(ids[1]) and len(ids[0]) == 3 and len(ids[1]) == 2  # batches 0, 2 | 1
    merged = merge_shards([(p.tokens, p.summary) for p in parts], recs)
    pd.testing.assert_frame_equal(merged.tokens, whole.tokens, check_exact=True)
    assert merged.summary == whole.summary

    # each shard counts the empty and truncated responses of the whole run (it tokenizes every window)
    recs2 = recs + [{"id": "toy:empty", "instruction": "what?", "response": "", "model": "b"}]
    opts2 = {**opts, "max_length": 40}
    with pytest.warns(UserWarning, match="truncated"):
        whole = compute_shift(str(tiny_model_dir), str(tiny_model_dir_b), recs2, **opts2)
        parts = [compute_shift(str(tiny_model_dir), str(tiny_model_dir_b), recs2, shard=(r, 2), **opts2)
                 for r in range(2)]
    assert whole.summary["n_empty"] == 1 and whole.summary["n_truncated"] == 5
    assert all((p.summary["n_truncated"], p.summary["n_empty"]) == (5, 1) for p in parts)
    merged = merge_shards([(p.tokens, p.summary) for p in parts], recs2)
    pd.testing.assert_frame_equal(merged.tokens, whole.tokens, check_exact=True)
    assert merged.summary == whole.summary

    lm = load_model(untied_model_dir)
    prompts = [{"id": r["id"], "instruction": r["instruction"]} for r in it_records[:5]]
    rows = [generate_responses(lm, prompts, max_new_tokens=4, batch_size=2, shard=(r, 2)) for r in range(2)]
    assert [len(x) for x in rows] == [3, 2]
    one = {r["id"]: r for r in generate_responses(lm, prompts, max_new_tokens=4, batch_size=2)}
    assert {r["id"]: r for x in rows for r in x} == one and all(r["response"] for r in one.values())


def test_merge_records_refuses_lost_or_duplicated_records():
    """A record returned by two shards used to pass: the id map had already folded it."""
    from itlens.sharding import merge_records

    a, b, c = ({"id": i, "v": i} for i in "abc")
    assert merge_records([[b], [a, c]], ["a", "b", "c"]) == [a, b, c]
    for parts, order in (([[a, b], [a]], ["a", "b"]), ([[a], [b], [b, c]], ["a", "b", "c"]), ([[a], []], ["a", "b"])):
        with pytest.raises(RuntimeError, match="lost or duplicated"):
            merge_records(parts, order)


def test_the_index_benchmark_row_compares_phrase_scans_with_phrase_queries():
    """The brute-force baseline of the phrase-query ratio is the phrase scans only (single-word scans,
    a different workload, used to be averaged in)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from run_all import table_rows

    r = {"n_instances": 10, "scan_mismatches": 0, "scan_ms_mean": 30.0, "scan_ms_phrase_mean": 10.0,
         "query_ms_mean": 0.5, "build_s": 1.0}
    row = table_rows("index", r)[0]
    assert (row["baseline"], row["itlens"], row["ratio"]) == (10.0, 0.5, 20.0)


def test_more_shards_than_batches_leave_some_empty_and_still_merge_to_the_one_process_output(
        tiny_model_dir, tiny_model_dir_b, untied_model_dir, it_records):
    import pandas as pd

    from itlens.analysis.token_shift import compute_shift, merge_shards
    from itlens.generate import generate_responses
    from itlens.models import load_model
    from itlens.sharding import merge_records

    recs = [{**r, "model": "b"} for r in it_records[:3]]  # 2 batches over 3 processes
    opts = {"batch_size": 2, "view_top_k": 0, "base_context": "template"}
    whole = compute_shift(str(tiny_model_dir), str(tiny_model_dir_b), recs, **opts)
    parts = [compute_shift(str(tiny_model_dir), str(tiny_model_dir_b), recs, shard=(r, 3), **opts) for r in range(3)]
    assert [p.tokens["id"].nunique() for p in parts] == [2, 1, 0]
    for order in (parts, parts[::-1]):  # the empty table first or last
        merged = merge_shards([(p.tokens, p.summary) for p in order], recs)
        pd.testing.assert_frame_equal(merged.tokens, whole.tokens, check_exact=True)
        assert merged.summary == whole.summary

    lm = load_model(untied_model_dir)
    prompts = [{"id": r["id"], "instruction": r["instruction"]} for r in it_records[:3]]
    rows = [generate_responses(lm, prompts, max_new_tokens=3, batch_size=2, shard=(r, 3)) for r in range(3)]
    assert [len(x) for x in rows] == [2, 1, 0]
    one = generate_responses(lm, prompts, max_new_tokens=3, batch_size=2)
    assert merge_records(rows, [p["id"] for p in prompts]) == one



def test_every_process_returns_from_a_sharded_generate_only_once_the_merged_file_is_written(
        untied_model_dir, it_records, tmp_path, monkeypatch):
    """A process other than the main one used to return the output path at once, while the main process was
    still merging: whatever it did next with the file (read it, start the next command on it) found it
    missing, or a stale one from an earlier run. Now every process waits for the main one to write it."""
    import itlens.sharding as sharding
    from itlens.generate import GenerateConfig, generate_file, generate_responses

    prompts = [{"id": r["id"], "instruction": r["instruction"]} for r in it_records[:3]]
    pfile = atomic_write_jsonl(tmp_path / "prompts.jsonl", prompts)
    out = tmp_path / "r.jsonl"
    seen = []

    class State:  # accelerate.PartialState's barrier: records whether the output was there when it was reached
        def wait_for_everyone(self):
            seen.append(out.exists())

    def gather(shard, rows):  # what gather_object brings the main process: its rows and rank 1's (batch 1)
        if not shard.is_main:
            return None
        return [rows, generate_responses(str(untied_model_dir), prompts, max_new_tokens=3, batch_size=2,
                                         shard=(1, 2))]

    monkeypatch.setattr(sharding, "gather_to_main", gather)
    cfg = GenerateConfig(max_new_tokens=3, batch_size=2, device="cpu")
    for rank in (1, 0):
        shard = sharding.Shard(rank=rank, world=2, device="cpu", state=State())
        monkeypatch.setattr(sharding, "current_shard", lambda shard=shard: shard)
        assert generate_file(str(untied_model_dir), pfile, out, cfg=cfg, progress=False) == out
    assert seen == [False, True]  # rank 1 waited (rank 0 had not written yet); rank 0 wrote, then waited
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [f"toy:{i}" for i in range(3)]
