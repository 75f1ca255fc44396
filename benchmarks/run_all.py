"""Every benchmark in one run (``make bench``): a table of ratios measured side by side, and one JSON file.

Runs the per-feature benchmarks (token shift, tuning, generation, substring index) through their
``run()`` functions, and the end-to-end micro study twice: cold (an empty folder) and warm (the same
command again, which reuses every finished stage). Each row compares two things measured in this run
on this machine (itlens against a baseline, or one mode against another), so the ratios travel
between machines and the absolute times do not. The machine is recorded with the results.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only shift,tune,generate,index,study]

``--quick`` uses small sizes (a few minutes on a shared 2-core CPU); the default sizes are each
benchmark's own (tens of minutes). Writes ``benchmarks/results/all.json`` (``--out`` to change). Exits 1
when a benchmark fails or its results fail its own checks (ranks against the per-token loop, batched
against one-at-a-time answers, the index against a scan, the warm study reusing every stage with the
same metrics): the speed of a wrong result is not reported as a success.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bench_generate  # noqa: E402
import bench_index  # noqa: E402
import bench_shift  # noqa: E402
import bench_tune  # noqa: E402

from itlens.env_info import machine, versions  # noqa: E402
from itlens.io import atomic_write_json  # noqa: E402

BENCHMARKS = ("shift", "tune", "generate", "index", "study")
SIZES = {  # quick / full arguments of each benchmark's run()
    "shift": {"quick": ["--lengths", "64,128", "--responses", "2", "--batch-size", "2", "--repeats", "2"],
              "full": []},
    "tune": {"quick": {"records": 64, "rounds": 1}, "full": {}},
    "generate": {"quick": {"prompts": 16, "new_tokens": 32}, "full": {}},
    "index": {"quick": {"n": 30_000, "queries": 300, "scan_checked": 30}, "full": {}},
    "study": {"quick": {"config": "tests/configs/micro.yaml"}, "full": {"config": "tests/configs/micro.yaml"}},
}


def last_study_run(run_dir: Path) -> dict:
    """What the last ``itlens study`` run into ``run_dir`` did: the stages it took from the cache (its
    timings.json) out of all, and the torch threads it ran with (its resolved config, not this process's)."""
    cached = json.loads((run_dir / "timings.json").read_text(encoding="utf-8"))["cached"]
    threads = yaml.safe_load((run_dir / "config.resolved.yaml").read_text(encoding="utf-8"))["threads"]
    return {"warm_stages_reused": sum(bool(v) for v in cached.values()), "stages": len(cached), "threads": threads}


def study_cold_warm(config: str, threads: int | None = None) -> dict:
    """``itlens study CONFIG`` into an empty folder, then the same command again (every stage reused)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_study."))
    cmd = [sys.executable, "-m", "itlens.cli", "study", str(ROOT / config), "--out", str(tmp / "run")]
    if threads:
        cmd += ["--set", f"threads={threads}"]
    metrics, times = [], []
    try:
        for _ in ("cold", "warm"):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            times.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                raise RuntimeError(f"itlens study exited {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}")
            metrics.append((tmp / "run" / "metrics.json").read_bytes())
        warm = last_study_run(tmp / "run")  # the ratio means nothing if the warm run reran a stage
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    same = metrics[0] == metrics[1]
    return {"benchmark": "study_cold_vs_warm", "config": config, "cold_s": round(times[0], 2),
            "warm_s": round(times[1], 2), "speedup": round(times[0] / times[1], 2),
            "warm_metrics_identical": same, "warm_stages_reused": warm["warm_stages_reused"],
            "stages": warm["stages"], "threads": warm["threads"],
            "machine": {**machine(), "torch_threads": warm["threads"]}}


def run_one(name: str, quick: bool, threads: int | None) -> dict:
    size = SIZES[name]["quick" if quick else "full"]
    if name == "shift":
        return bench_shift.run(size + (["--threads", str(threads)] if threads else []))
    if name == "study":
        return study_cold_warm(**size, threads=threads)
    kwargs = dict(size, **({"threads": threads} if threads and name in ("tune", "generate") else {}))
    return {"tune": bench_tune.run, "generate": bench_generate.run, "index": bench_index.run}[name](**kwargs)


def table_rows(name: str, r: dict) -> list[dict]:
    """(what is compared, baseline, itlens, ratio, goal) rows of one benchmark's result."""
    def row(measure, baseline, ours, ratio, goal=""):
        return {"benchmark": name, "measure": measure, "baseline": baseline, "itlens": ours,
                "ratio": round(ratio, 3) if ratio is not None else None, "goal": goal}

    if name == "shift":
        out = []
        for x in r["rows"]:
            t = x["response_tokens"]
            if x["per_token_s"]:
                equal = x["ranks_compared"] - x["rank_mismatches"]
                out.append(row(f"T={t}: engine vs per-token loop (s; ranks equal {equal}/{x['ranks_compared']})",
                               round(x["per_token_s"], 3), round(x["engine_s"], 3), x["speedup_vs_per_token"],
                               ">= 100x at T=512"))
            out.append(row(f"T={t}: engine / bare forward passes (s)", round(x["bare_forward_s"], 3),
                           round(x["engine_s"], 3), x["engine_s"] / x["bare_forward_s"], "<= 1.25"))
            out.append(row(f"T={t}: scoring (fwd+metrics) / bare (s)", round(x["bare_forward_s"], 3),
                           round(x["engine_scoring_s"], 3), x["engine_scoring_s"] / x["bare_forward_s"], "<= 1.25"))
        return out
    if name == "tune":
        return [row(f"{m}: itlens tune vs plain TRL (tok/s)", round(x["trl"]["tokens_per_s"]),
                    round(x["itlens"]["tokens_per_s"]), x["ratio"], ">= 0.95") for m, x in r["results"].items()]
    if name == "generate":
        return [row(f"batch {r['batch_size']} vs one at a time (tok/s; {r['identical_outputs']}/{r['prompts']} "
                    "identical)", r["single_tokens_per_s"], r["batched_tokens_per_s"], r["speedup"], ">= 4x")]
    if name == "index":
        return [row(f"phrase query vs brute-force scan (ms; {r['n_instances']} instances, "
                    f"{r['scan_mismatches']} mismatches)", r["scan_ms_phrase_mean"], r["query_ms_mean"],
                    r["scan_ms_phrase_mean"] / r["query_ms_mean"] if r["query_ms_mean"] and r["scan_ms_phrase_mean"]
                    else None, ""),
                row("build (s)", None, r["build_s"], None, "<= 60 s at 326k")]
    if name == "study":
        return [row(f"micro study: warm vs cold (s; {r['warm_stages_reused']}/{r['stages']} stages reused, "
                    f"metrics identical: {r['warm_metrics_identical']})",
                    r["cold_s"], r["warm_s"], r["speedup"], "warm reuses every stage")]
    return []


def failed_checks(name: str, r: dict) -> list[str]:
    """What a benchmark's own correctness checks found wrong: a speed measured on wrong results is no result."""
    if name == "shift":
        return [f"T={x['response_tokens']}: {x['class_mismatches']} shift classes differ from the per-token loop"
                for x in r["rows"] if x["class_mismatches"]]
    if name == "generate" and r["identical_outputs"] != r["prompts"]:
        return [f"batched and one-at-a-time answers differ for {r['prompts'] - r['identical_outputs']} prompts"]
    if name == "index" and r["scan_mismatches"]:
        return [f"{r['scan_mismatches']} of {r['scan_checked']} queries differ from the brute-force scan"]
    if name == "study":
        problems = [] if r["warm_metrics_identical"] else ["the warm run's metrics.json differs from the cold run's"]
        if r["warm_stages_reused"] != r["stages"]:
            problems.append(f"the warm run reran {r['stages'] - r['warm_stages_reused']} of {r['stages']} stages")
        return problems
    return []


def print_table(rows: list[dict]) -> None:
    fmt = lambda v: "" if v is None else (f"{v:,.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    head = ("benchmark", "measure", "baseline", "itlens", "ratio", "goal")
    cells = [head] + [tuple(fmt(r[k]) for k in head) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    for i, c in enumerate(cells):
        print("  ".join(v.ljust(w) if j < 2 or j == 5 else v.rjust(w) for j, (v, w) in enumerate(zip(c, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (minutes, not tens of minutes)")
    ap.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of " + ",".join(BENCHMARKS))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: each benchmark's default)")
    ap.add_argument("--out", default=str(HERE / "results" / "all.json"))
    a = ap.parse_args(argv)
    names = [n for n in a.only.split(",") if n]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; expected some of {list(BENCHMARKS)}")

    results, errors, rows, seconds = {}, {}, [], {}
    for name in names:
        print(f"== {name} ({'quick' if a.quick else 'full'})", flush=True)
        t0 = time.perf_counter()
        try:
            results[name] = run_one(name, a.quick, a.threads or None)
            rows += table_rows(name, results[name])
            problems = failed_checks(name, results[name])
            if problems:
                errors[name] = "; ".join(problems)
        except Exception as e:  # one broken benchmark must not hide the others' numbers
            traceback.print_exc()
            errors[name] = f"{type(e).__name__}: {e}"
        seconds[name] = round(time.perf_counter() - t0, 1)

    print()
    print_table(rows)
    for name, err in errors.items():
        print(f"{name}: FAILED: {err}")
    atomic_write_json(a.out, {"benchmark": "all", "quick": a.quick, "machine": machine(), "versions": versions(),
                              "seconds": seconds, "table": rows, "results": results, "errors": errors,
                              "note": "ratios compare two things measured in this run on this machine; "
                                      "absolute times depend on the machine and its load"})
    print(f"wrote {a.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
