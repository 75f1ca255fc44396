"""`itlens study` end to end on a micro config: artifacts, cache, kill/resume, determinism, report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MICRO = Path(__file__).parent / "configs" / "micro.yaml"
KILL_POINTS = ["world", "base-s0", "tuned-s0-lft", "tuned-s0-sft", "gen-s0-sft", "shift-s0-sft-frame",
               "analysis-s0"]


def run_cli(args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "itlens.cli", *args], capture_output=True, text=True, env=e,
                          timeout=timeout)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "micro"
    r = run_cli(["study", str(MICRO), "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "report:" in r.stdout
    return out


def test_micro_study_writes_the_contract_artifacts(micro_run):
    out = micro_run
    for name in ("config.resolved.yaml", "metrics.json", "report.html"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    for key in ("world", "models", "shift", "knowledge", "copying", "borrowing", "findings"):
        assert key in m, key
    assert set(m["models"]) == {"base", "lft", "sft", "neftune", "sft-cf"}
    # the counterfactual variant's IT data lacks exactly the eval people's designed twins
    world = json.loads((out / "world" / "world.json").read_text())
    sources = {p["twin"] for p in world["people"] if p.get("in_eval") and p.get("twin")}
    full = [json.loads(x) for x in (out / "tuned-s0-sft" / "data.jsonl").read_text().splitlines()]
    cf = [json.loads(x) for x in (out / "tuned-s0-sft-cf" / "data.jsonl").read_text().splitlines()]
    assert sources and any(r["person"] in sources for r in full)
    assert [r for r in full if r["person"] not in sources] == cf
    assert [f["id"] for f in m["findings"]] == ["F1", "F2", "F3", "F4"]
    for f in m["findings"]:
        assert f["holds"] in (True, False, None) and f["claim"] and "evidence" in f
    # F2 is not configured in the micro study: it must say so rather than guess
    assert m["findings"][1]["holds"] is None
    resolved = (out / "config.resolved.yaml").read_text()
    assert "tune_resolved" in resolved and "learning_rate" in resolved
    # a stage folder per model and analysis
    assert (out / "tuned-s0-lft" / "model" / "adapter_config.json").is_file()
    assert (out / "shift-s0-sft-frame" / "tokens.parquet").is_file()
    assert (out / "shift-s0-sft-template" / "summary.json").is_file()
    idx = json.loads((out / "figures" / "index.json").read_text())
    assert len(idx) >= 6 and all((out / "figures" / f["file"]).is_file() for f in idx)


def test_rerun_reuses_every_stage_and_is_byte_identical(micro_run):
    before = (micro_run / "metrics.json").read_bytes()
    drawn = {p: p.stat().st_mtime_ns for p in [*(micro_run / "figures").rglob("*.png"), *(micro_run / "views").iterdir()]}
    assert drawn
    r = run_cli(["study", str(MICRO), "--out", str(micro_run)])
    assert r.returncode == 0, r.stderr[-2000:]
    # the figures and views were drawn from the same inputs: not redrawn (that was most of a warm rerun's time)
    assert {p: p.stat().st_mtime_ns for p in drawn} == drawn
    gone = next(iter(drawn))
    gone.unlink()  # a figure deleted by hand: all are drawn again
    assert run_cli(["study", str(MICRO), "--out", str(micro_run)]).returncode == 0 and gone.is_file()
    t = json.loads((micro_run / "timings.json").read_text())
    assert all(t["cached"].values()) and t["stages"] == {}
    assert r.stdout.count("[cached] ") == len(t["cached"])  # the tags (rich read them as markup and dropped them)
    assert (micro_run / "metrics.json").read_bytes() == before
    dry = run_cli(["study", str(MICRO), "--out", str(micro_run), "--dry-run"])
    assert dry.returncode == 0 and "to run" not in dry.stdout and dry.stdout.count("cached") >= 10


@pytest.mark.parametrize("kind", ["shift", "tune"])
def test_a_stage_version_bump_reruns_that_kind_and_what_is_downstream_only(micro_run, monkeypatch, kind):
    from itlens import study
    from itlens.stages import StageRunner

    def plan() -> tuple[dict[str, bool], dict[str, list[str]]]:
        p, runner = study.plan_study(study.load_study_config(MICRO), micro_run), StageRunner(micro_run, log=lambda m: None)
        return {st.name: runner.plan(st) for st in p.stages}, {st.name: st.deps for st in p.stages}

    cached, deps = plan()
    assert all(cached.values())
    monkeypatch.setitem(study.STAGE_VERSIONS, kind, study.STAGE_VERSIONS[kind] + 1)
    cached, _ = plan()
    prefix = {"shift": "shift-", "tune": "tuned-"}[kind]
    stale = {n for n in deps if n.startswith(prefix)}
    while True:  # and everything downstream of them
        more = {n for n, d in deps.items() if stale & set(d)} - stale
        if not more:
            break
        stale |= more
    assert stale and {n for n, c in cached.items() if not c} == stale
    assert any(n.startswith("analysis-") for n in stale) and cached["world"] and cached["base-s0"]


def test_two_runs_with_one_seed_are_byte_identical_and_a_killed_run_resumes(micro_run, tmp_path):
    """SIGKILL at the worst moment of each kind of stage (work finished, not yet committed), rerun, and
    compare with the uninterrupted run."""
    out = tmp_path / "killed"
    for stage in KILL_POINTS:
        r = run_cli(["study", str(MICRO), "--out", str(out)], env={"ITLENS_TEST_KILL_AFTER": stage})
        assert r.returncode == -9, (stage, r.returncode, r.stderr[-2000:])
        assert not (out / "metrics.json").exists()
        assert (out / f".{stage}.work").is_dir()
    r = run_cli(["study", str(MICRO), "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list(out.glob(".*.work"))
    assert (out / "metrics.json").read_bytes() == (micro_run / "metrics.json").read_bytes()


def test_report_renders_in_headless_chromium_without_console_errors(micro_run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("Debian's chromium is not installed (make test installs it when it can)")
    html = (micro_run / "report.html").read_text()
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
    n_figs = len(json.loads((micro_run / "figures" / "index.json").read_text()))
    assert html.count("<img") == n_figs
    # Load the page, then count the images that decoded (naturalWidth > 0) and collect console errors.
    probe = tmp_path / "probe.html"
    probe.write_text(
        "<!doctype html><html><body><script>"
        "window.onerror=function(m){document.title='ERR '+m};"
        "</script><iframe id=f src='" + (micro_run / "report.html").as_uri() + "' style='width:1200px;height:900px'>"
        "</iframe><script>document.getElementById('f').onload=function(){var d=this.contentDocument;"
        "var imgs=[].slice.call(d.images);var ok=imgs.filter(function(i){return i.complete&&i.naturalWidth>0});"
        "document.title='IMAGES '+ok.length+'/'+imgs.length;};</script></body></html>")
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                        "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom",
                        probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert f"IMAGES {n_figs}/{n_figs}" in r.stdout, r.stdout[-500:] + r.stderr[-1500:]
    console_errors = [ln for ln in r.stderr.splitlines() if "CONSOLE" in ln and "ERROR" in ln.upper()]
    assert not console_errors, console_errors


def test_report_and_compare_commands(micro_run, tmp_path):
    (micro_run / "report.html").unlink()
    r = run_cli(["report", str(micro_run)])
    assert r.returncode == 0 and (micro_run / "report.html").is_file()
    other = tmp_path / "other"
    shutil.copytree(micro_run, other)
    m = json.loads((other / "metrics.json").read_text())
    m["models"]["sft"]["qa_acc_known"] = 0.5
    m["findings"][0]["holds"] = not m["findings"][0]["holds"]
    (other / "metrics.json").write_text(json.dumps(m))
    r = run_cli(["compare", str(micro_run), str(other)])
    assert r.returncode == 0
    assert "models.sft.qa_acc_known" in r.stdout and "F1" in r.stdout and "changed" in r.stdout
    r = run_cli(["compare", str(micro_run), str(tmp_path / "nope")])
    assert r.returncode == 2 and "metrics.json" in r.stderr


def test_recognised_unknown_pools_facts_the_probe_missed():
    """QA outcomes on held-out 'unknown' facts that the base picks right by multiple choice, per question
    averaged over the seeds that recognise it; only where labels come from a probe (items with a SliCK
    category)."""
    from itlens.study import _recognised_unknown

    def seed(qa_lft, mc_base, category=True):
        cat = {"category": "Unknown"} if category else {}
        return {"qa": {"base": [{"id": i, "group": g, "correct": 0} for i, g, _ in qa_lft],
                       "lft": [{"id": i, "group": g, "correct": c} for i, g, c in qa_lft]},
                "mc": {"base": [{"id": i, "group": g, "correct": c, **cat} for i, g, c in mc_base]}}

    s0 = seed([("a", "unknown", 1), ("b", "unknown", 0), ("c", "known_heldout", 1), ("d", "unknown", 1)],
              [("a", "unknown", 1), ("b", "unknown", 1), ("c", "known_heldout", 1), ("d", "unknown", 0)])
    s1 = seed([("a", "unknown", 0)], [("a", "unknown", 1)])
    out = _recognised_unknown({0: s0, 1: s1}, ["base", "lft"])
    assert out == {"base": [0.0, 0.0], "lft": [0.5, 0.0]}  # a (seeds 0 and 1, averaged), b (seed 0)
    assert _recognised_unknown({0: seed([("a", "unknown", 1)], [("a", "unknown", 1)], category=False)},
                               ["base", "lft"]) == {}  # world data: unknown by construction
    assert _recognised_unknown({0: {"qa": s0["qa"]}}, ["base", "lft"]) == {}  # no multiple choice


def test_report_renders_nested_evidence_as_tables_not_json():
    from itlens.report import _finding_html

    f = {"id": "F1", "claim": "c", "holds": False,
         "evidence": {"test": "t", "summary": "s", "paper": "p",
                      "sft_minus_lft": {"estimate": 0.1, "low": -0.1, "high": 0.3, "p_value": 0.4, "n": 9},
                      "recognised_unknown": {"n": 76, "lft": 0.711, "sft_minus_lft": {
                          "estimate": -0.092, "low": -0.197, "high": 0.013, "p_value": 0.18, "n": 76}},
                      "by_category": {"Unknown": {"n": 210, "base": 0.01}}}}
    page = _finding_html(f)
    assert "{" not in page and '"n"' not in page  # no raw JSON
    assert "<td>recognised_unknown</td><td><table>" in page and "<td>Unknown</td><td><table>" in page
    assert "<td>lft</td><td>0.711</td>" in page and "<td>76</td>" in page and "-0.197" in page


def test_a_stage_run_in_a_worker_is_reported_as_run_not_reused(tmp_path):
    """workers > 1: the seed chains run in other processes, then the main pass finds their stages done;
    timings.json must still say they ran (the worker's flags win over the main pass's cache hit)."""
    from itlens.stages import Stage, StageRunner
    from itlens.study import _stage_seed

    st = Stage("gen-s0-base", {"k": 1}, lambda work: (work / "x").write_text("x"))
    worker = StageRunner(tmp_path, log=lambda m: None)
    worker.run(st)
    main = StageRunner(tmp_path, log=lambda m: None)
    main.cached.update({k: v for k, v in worker.cached.items() if _stage_seed(k) == 0})
    main.run(st)
    assert main.cached == {"gen-s0-base": False}
    again = StageRunner(tmp_path, log=lambda m: None)  # a later study run: now it is reused
    again.run(st)
    assert again.cached == {"gen-s0-base": True}


def test_cache_keys_follow_file_contents_not_their_spelling_nor_display_options(tmp_path, tiny_model_dir,
                                                                               monkeypatch):
    """Editing the IT data, the eval prompts or the frame reruns what reads them; spelling a path another
    way, changing shift.views or dropping a context reruns nothing."""
    import yaml

    from itlens.stages import StageRunner
    from itlens.study import load_study_config, plan_study

    monkeypatch.chdir(tmp_path)
    (tmp_path / "it.jsonl").write_text("".join(json.dumps({"id": f"x:{i}", "instruction": f"q{i}",
                                                           "response": f"a{i}"}) + "\n" for i in range(3)))
    (tmp_path / "eval.jsonl").write_text(json.dumps({"id": "e:0", "instruction": "q"}) + "\n")
    (tmp_path / "frame.txt").write_text("# Query:\n{instruction}\n# Answer:\n")
    base = {"name": "real", "seeds": [0], "base": str(tiny_model_dir), "it_data": "it.jsonl",
            "eval_data": "eval.jsonl", "frame": "frame.txt", "variants": {"lft": {"method": "lora"}}}

    def hashes(**over) -> dict[str, str]:
        path = tmp_path / "study.yaml"
        path.write_text(yaml.safe_dump({**base, **over}))
        runner = StageRunner(tmp_path / "out", log=lambda m: None)
        for st in plan_study(load_study_config(path), tmp_path / "out").stages:
            runner.plan(st)
        return runner.hashes

    def changed(a: dict, b: dict) -> set[str]:
        return {k for k in a if k in b and a[k] != b[k]}

    ref = hashes()
    assert changed(ref, hashes(it_data=str(tmp_path / "it.jsonl"), eval_data=str(tmp_path / "eval.jsonl"),
                               frame=str(tmp_path / "frame.txt"))) == set()
    assert changed(ref, hashes(shift={"views": 7})) == set()
    only_frame = hashes(shift={"base_contexts": ["frame"]})
    assert set(only_frame) < set(ref) and changed(ref, only_frame) == {"analysis-s0"}  # reads every context
    with (tmp_path / "it.jsonl").open("a") as f:
        f.write(json.dumps({"id": "x:9", "instruction": "q9", "response": "a9"}) + "\n")
    assert changed(ref, hashes()) == {k for k in ref if k != "gen-s0-base"}  # the base never saw the IT data
    ref = hashes()
    (tmp_path / "frame.txt").write_text("Q: {instruction}\nA:\n")
    assert changed(ref, hashes()) == {"gen-s0-base", "shift-s0-lft-frame", "analysis-s0"}
    ref = hashes()
    (tmp_path / "eval.jsonl").write_text(json.dumps({"id": "e:0", "instruction": "another q"}) + "\n")
    assert changed(ref, hashes()) == {k for k in ref if k.startswith(("gen-", "shift-", "analysis-"))}
    from itlens.study import load_study_config as load, plan_study as plan

    (tmp_path / "it.jsonl").write_text(json.dumps({"id": "m:0", "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]}) + "\n")
    hashes()  # writes study.yaml
    tune_key = next(st.key for st in plan(load(tmp_path / "study.yaml"), tmp_path / "out").stages
                    if st.name == "tuned-s0-lft")
    assert tune_key["turns"] == "all"  # every assistant turn is trained (earlier: only the last)


def test_the_resolved_config_runs_again_from_the_same_cache(micro_run, tmp_path):
    """config.resolved.yaml is a config: read back, it plans the very same stages (all cached); its
    tune_resolved is a record, and an edited one is refused rather than silently ignored."""
    import yaml

    from itlens.errors import InputError
    from itlens.stages import StageRunner
    from itlens.study import load_study_config, plan_study

    resolved = micro_run / "config.resolved.yaml"
    runner = StageRunner(micro_run, log=lambda m: None)
    assert all(runner.plan(st) for st in plan_study(load_study_config(resolved), micro_run).stages)
    data = yaml.safe_load(resolved.read_text())
    name = next(iter(data["variants"]))
    data["variants"][name]["tune_resolved"]["learning_rate"] = 0.5
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match=f"variants.{name}.tune_resolved"):
        load_study_config(edited)


def test_compare_lists_values_per_seed_and_item():
    from itlens.report import compare_metrics

    a = {"f": {"by_seed": [0.1, 0.2], "n": 3, "seeds": [0, 1]}, "x": [{"acc": 0.5}]}
    b = {"f": {"by_seed": [0.1, 0.3], "n": 3, "seeds": [0, 1, 2]}, "x": [{"acc": 0.6}]}
    assert compare_metrics(a, b) == [("f.by_seed[1]", 0.2, 0.3), ("f.seeds", [0, 1], [0, 1, 2]), ("x[0].acc", 0.5, 0.6)]
    assert compare_metrics(a, a) == []


# ------------------------------------------------------------------------------------ findings (unit level)
def _qa(group: str = "known_heldout", **models: list[int]) -> dict:
    return {"qa": {m: [{"id": f"q{i:03d}", "group": group, "correct": c} for i, c in enumerate(v)]
                   for m, v in models.items()}}


def _findings(items: dict, **findings) -> dict:
    import dataclasses

    from itlens.study import decide_findings, load_study_config

    cfg = load_study_config(MICRO)
    cfg = dataclasses.replace(cfg, seeds=sorted(items), findings=dataclasses.replace(cfg.findings, **findings))
    return {f["id"]: f for f in decide_findings(cfg, items, {})}


def test_identical_seeds_add_no_evidence():
    """The question is the unit: three seeds that answer exactly alike give the one-seed intervals and
    p-values (pooling answers as new questions made them about sqrt(3) narrower)."""
    import random

    rng = random.Random(0)
    models = {m: [int(rng.random() < p) for _ in range(60)] for m, p in
              (("base", 0.8), ("lft", 0.7), ("sft", 0.6), ("neftune", 0.65))}
    one, three = _findings({0: _qa(**models)}), _findings({s: _qa(**models) for s in (0, 1, 2)})
    for fid, key in (("F1", "sft_minus_lft"), ("F1", "sft_minus_base"), ("F4", "neftune_minus_lft")):
        assert three[fid]["evidence"][key] == one[fid]["evidence"][key]
        assert one[fid]["evidence"][key]["n"] == 60
    # seeds that disagree give per-question means, still 60 questions
    other = {m: [1 - c for c in v] for m, v in models.items()}
    mixed = _findings({0: _qa(**models), 1: _qa(**other)})
    assert mixed["F1"]["evidence"]["sft_minus_lft"]["n"] == 60
    assert mixed["F1"]["evidence"]["sft_minus_lft"]["estimate"] == 0.0


def test_f1_needs_sft_below_the_base_and_lft_not_below_it():
    lft, sft = [1] * 40, [1] * 28 + [0] * 12  # SFT 30 pp below LFT, significant
    holds = _findings({0: _qa(base=[1] * 40, lft=lft, sft=sft, neftune=lft)})["F1"]
    assert holds["holds"] is True
    # SFT above a weak base: it did not degrade what the base knew
    weak_base = _findings({0: _qa(base=[1] * 20 + [0] * 20, lft=lft, sft=sft, neftune=lft)})["F1"]
    assert weak_base["holds"] is False and weak_base["evidence"]["sft_minus_lft"]["high"] < 0
    # LFT itself far below the base: it did not keep it
    lft_loses = _findings({0: _qa(base=[1] * 40, lft=[1] * 34 + [0] * 6, sft=[1] * 14 + [0] * 26,
                                  neftune=lft)})["F1"]
    assert lft_loses["holds"] is False and lft_loses["evidence"]["sft_minus_base"]["high"] < 0


def test_the_no_change_halves_of_f1_and_f4_must_be_shown_within_the_margin():
    """'LFT keeps' and 'improvements do not beat LFT' are non-inferiority / non-superiority tests: a small
    significant loss inside findings.margin still keeps, and a study too small to tell does not pass."""
    n = 400
    base, sft = [1] * n, [1] * 300 + [0] * 100
    lft = [1] * 392 + [0] * 8  # 2 pp below the base, significantly (p < 0.05), well inside 5 pp
    f1 = _findings({0: _qa(base=base, lft=lft, sft=sft, neftune=lft)})["F1"]
    assert f1["evidence"]["lft_minus_base"]["p_value"] < 0.05 and f1["holds"] is True
    assert f1["evidence"]["margin"] == 0.05
    assert _findings({0: _qa(base=base, lft=lft, sft=sft, neftune=lft)}, margin=0.01)["F1"]["holds"] is False
    # F4: NEFTune and LFT disagree on 24 of 400 questions, net zero: shown within 5 pp
    lft4 = [1] * 12 + [0] * 12 + [1] * 376
    nef4 = [0] * 12 + [1] * 12 + [1] * 376
    big = _findings({0: _qa(base=base, lft=lft4, sft=sft, neftune=nef4)})["F4"]
    assert big["evidence"]["neftune_minus_lft"]["estimate"] == 0 and big["holds"] is True
    # the same disagreement on 20 questions: no better, but the CI reaches far past 5 pp, so it is not shown
    small = _findings({0: _qa(base=[1] * 20, lft=[1] * 5 + [0] * 5 + [1] * 10, sft=[0] * 20,
                              neftune=[0] * 5 + [1] * 5 + [1] * 10)})["F4"]
    assert small["evidence"]["neftune_minus_lft"]["p_value"] > 0.05 and small["holds"] is False
    assert "not shown within +5% of LFT: neftune" in small["evidence"]["summary"]


def test_findings_with_nothing_to_test_are_not_measured():
    """Evaluation data without a known_heldout group: F1, F2 and F4 say null, not yes or no."""
    items = _qa(group="all", base=[1, 0], lft=[1, 1], sft=[0, 0], neftune=[1, 0])
    items["facts"] = {m: [{"id": "q000", "group": "all", "has_wrong": 1, "stated": 1}] for m in ("lft", "sft")}
    f = _findings({0: items}, style_long="sft", style_simple="lft")
    assert (f["F1"]["holds"], f["F2"]["holds"], f["F4"]["holds"]) == (None, None, None)


def test_f3_counts_twins_in_the_models_own_data_and_needs_sft_above_lft():
    def spans(n_borrowed: int, n: int, in_data: bool = True) -> list[dict]:
        return [{"id": f"e{i}", "group": "known_heldout", "attribute": "city", "value": f"v{i}" if i >= n_borrowed
                 else f"t{i}", "twin_value": f"t{i}", "twin_in_it": True, "twin_in_data": in_data,
                 "borrowed": i < n_borrowed} for i in range(n)]

    qa = _qa(base=[1], lft=[1], sft=[1], neftune=[1])
    # SFT borrows 20 of 20 where its data held the twin; 40 more spans whose twin it never saw don't count
    items = {0: {**qa, "borrowing": {"sft": spans(20, 20) + spans(0, 40, in_data=False), "lft": spans(1, 20),
                                     "base": spans(1, 20)}}}
    f3 = _findings(items)["F3"]
    assert f3["evidence"]["n_sft"] == 20 and f3["evidence"]["rate_sft"] == 1.0 and f3["holds"] is True
    # LFT borrows as much: above chance, but not the paper's contrast
    items[0]["borrowing"]["lft"] = spans(20, 20)
    f3 = _findings(items)["F3"]
    assert f3["evidence"]["sft"]["p_value"] < 0.05 and f3["holds"] is False
    # the same answers under three seeds are the same questions: the SFT-vs-LFT test does not tighten
    items[0]["borrowing"] = {"sft": spans(8, 20), "lft": spans(4, 20), "base": spans(1, 20)}
    one = _findings(items)["F3"]["evidence"]["sft_vs_lft"]
    three = _findings({s: items[0] for s in (0, 1, 2)})["F3"]["evidence"]["sft_vs_lft"]
    assert three["p_value"] == one["p_value"] > 0.05 and three["n_x"] == 3 * one["n_x"]


def test_a_changed_config_removes_the_old_results_before_any_stage_runs(micro_run, tmp_path, monkeypatch):
    """A run of a changed config that dies leaves no metrics.json or report.html of the old config."""
    from itlens import study
    from itlens.stages import StageRunner

    out = tmp_path / "copy"
    shutil.copytree(micro_run, out)
    cfg = study.load_study_config(MICRO)

    def die(self, st):
        raise RuntimeError("killed")

    monkeypatch.setattr(StageRunner, "run", die)
    with pytest.raises(RuntimeError):  # the same config: the old results still describe it
        study.run_study(cfg, out, log=lambda m: None)
    assert (out / "metrics.json").is_file() and (out / "report.html").is_file()
    import dataclasses

    with pytest.raises(RuntimeError):
        study.run_study(dataclasses.replace(cfg, findings=dataclasses.replace(cfg.findings, alpha=0.001)), out,
                        log=lambda m: None)
    assert not (out / "metrics.json").exists() and not (out / "report.html").exists()
    assert "alpha: 0.001" in (out / "config.resolved.yaml").read_text()


def test_study_inference_runs_on_generate_device(micro_run, tmp_path, monkeypatch):
    """generate.device (auto: cuda when available) is where the study's generation loads its models; the
    stage's output is the same (here the 'cuda' load is redirected to the CPU)."""
    import dataclasses

    import torch

    from itlens import models, study
    from itlens.generate import GenerateConfig

    seen = []
    real = models.load_model

    def load(*args, device="cpu", **kwargs):
        seen.append(device)
        return real(*args, device="cpu", **kwargs)

    monkeypatch.setattr(models, "load_model", load)
    cfg = study.load_study_config(MICRO)
    cfg = dataclasses.replace(cfg, generate={**(cfg.generate or {}), "device": "cuda"})
    plan = study.plan_study(cfg, micro_run)
    for name in ("gen-s0-base", "gen-s0-lft"):
        work = tmp_path / name
        work.mkdir()
        next(st for st in plan.stages if st.name == name).run(work)
        assert (work / "responses.jsonl").read_bytes() == (micro_run / name / "responses.jsonl").read_bytes()
    assert seen and set(seen) == {"cuda"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert study._inference_device(GenerateConfig()) == "cuda"
    assert study._inference_device(GenerateConfig(device="cpu")) == "cpu"


def test_a_world_study_refuses_its_own_data_files_and_a_broken_base_tokenizer(tmp_path, tiny_model_dir):
    """it_data/eval_data beside a world section were silently ignored; a base folder whose tokenizer does
    not load was a traceback from the cache key (now one line naming the folder)."""
    import yaml

    from itlens.errors import InputError
    from itlens.study import _bos_key, load_study_config

    data = yaml.safe_load(MICRO.read_text())
    data["it_data"] = "mine.jsonl"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match="it_data.*'world' builds the IT and eval data"):
        load_study_config(bad)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    for f in broken.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(InputError, match="no tokenizer in this folder"):
        _bos_key(str(broken))


def test_a_study_with_a_judge_scores_every_model_and_keeps_no_stage_the_endpoint_failed(micro_run, tmp_path):
    """The study's judge stages against a real HTTP endpoint on loopback: an endpoint that fails every request
    is one error line, exit 2, and no judge stage is kept (it was kept with no scores, and a rerun reused it);
    run again when it answers, the other stages are reused and every model is scored."""
    import yaml

    from judge_server import JudgeServer, Reply, ScriptedJudge

    out = tmp_path / "micro"
    shutil.copytree(micro_run, out)
    cfg = yaml.safe_load(MICRO.read_text())
    judge = {"model": "judge-test", "api_key_env": "", "max_attempts": 1, "timeout_s": 10, "concurrency": 4,
             "cache_dir": str(tmp_path / "judge-cache"), "bootstrap_samples": 100}
    with JudgeServer(ScriptedJudge(default=lambda body: Reply(status=500))) as down:
        cfg["judge"] = {**judge, "base_url": down.base_url}
        (tmp_path / "j.yaml").write_text(yaml.safe_dump(cfg))
        r = run_cli(["study", str(tmp_path / "j.yaml"), "--out", str(out)])
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("itlens: error:")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "key 'judge': the judge endpoint failed on all" in lines[0] and "HTTP 500" in lines[0], lines[0]
    assert not any((p / "stage.json").exists() for p in out.glob("judge-s0-*"))
    with JudgeServer() as up:
        cfg["judge"] = {**judge, "base_url": up.base_url}
        (tmp_path / "j.yaml").write_text(yaml.safe_dump(cfg))
        r = run_cli(["study", str(tmp_path / "j.yaml"), "--out", str(out)])
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(up.requests) > 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["judge"]) == {"base", "lft", "sft", "neftune", "sft-cf"}
    for name, per_seed in m["judge"].items():
        s = per_seed["0"]
        assert s["n_items"] > 0 and s["n_scored"] == s["n_items"], (name, s["failures"])
    assert "judge" in (out / "report.html").read_text().lower()
    radar = next(f for f in json.loads((out / "figures" / "index.json").read_text())
                 if f["file"] == "judge-lft/radar_aspects.png")
    assert radar["caption"].startswith("lft's answers as the judge scored them: mean score"), radar  # was 'radar_aspects'


def test_the_figure_index_takes_files_inside_the_figures_folder_only(tmp_path):
    """The judge's radars are in a folder per model (judge-lft/radar.png): the index check refused every study
    with a judge. A name that leaves the folder stays refused."""
    from itlens.errors import InputError
    from itlens.report import _read_figure_index

    path = tmp_path / "index.json"
    path.write_text(json.dumps([{"file": "shift.png"}, {"file": "judge-lft/radar.png"}]))
    assert [f["file"] for f in _read_figure_index(path)] == ["shift.png", "judge-lft/radar.png"]
    for bad in ("../secret.png", "/etc/x.png", "judge/../../x.png", ".hidden.png", "a//b.png", "a\\b.png", ""):
        path.write_text(json.dumps([{"file": bad}]))
        with pytest.raises(InputError, match="inside the figures folder"):
            _read_figure_index(path)


def test_real_data_without_gold_answers_decides_nothing_and_its_counterfactual_drops_the_twins(tmp_path,
                                                                                              untied_model_dir):
    """Own files, no fact source: eval questions without gold `answers` were graded wrong, so F1 said 'does not
    hold' and F4 'holds' on accuracy nobody measured; drop_twin_sources was silently ignored (the counterfactual
    equalled its plain variant), and a file without twins to drop is refused up front."""
    import yaml

    from itlens.errors import InputError
    from itlens.study import load_study_config

    it = [{"id": f"it:{i}", "instruction": f"q{i}", "response": f"a{i}", "person": f"p{i}"} for i in range(8)]
    ev = [{"id": f"e:{i}", "instruction": f"q{10 + i}", "group": "known_heldout", "twin": f"p{i}"} for i in range(4)]
    (tmp_path / "it.jsonl").write_text("".join(json.dumps(r) + "\n" for r in it))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ev))
    cfg = {"name": "real", "seeds": [0], "base": str(untied_model_dir), "it_data": str(tmp_path / "it.jsonl"),
           "eval_data": str(tmp_path / "eval.jsonl"), "threads": 1,
           "tune": {"epochs": 1, "effective_batch_size": 4, "per_device_batch_size": 4, "max_length": 64},
           "variants": {"lft": {"method": "lora"}, "sft": {"method": "full"}, "neftune": {"method": "neftune"},
                        "sft-cf": {"method": "full", "drop_twin_sources": True}},
           "generate": {"max_new_tokens": 4}, "shift": {"views": 1}, "findings": {"n_boot": 50},
           "analyses": {"borrowing": False}}
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    r = run_cli(["study", str(path), "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    f = {x["id"]: x for x in m["findings"]}
    assert f["F1"]["holds"] is None and f["F4"]["holds"] is None, (f["F1"], f["F4"])
    assert "gold answers" in f["F4"]["evidence"]["test"]
    assert m["models"]["sft"]["qa_acc_known"] is None
    kept = [json.loads(x)["person"] for x in (out / "tuned-s0-sft-cf" / "data.jsonl").read_text().splitlines()]
    assert sorted(kept) == ["p4", "p5", "p6", "p7"]
    # the token views name the top-k tokens by their text and show each response's prompt (were: bare ids, and
    # no prompt, since a shift read back has neither its tokenizer nor its answers)
    view = (out / "views" / "sft.html").read_text(encoding="utf-8")
    assert "class='tok " in view and "<i>id " not in view and "<b>e:0</b>: q10" in view, view[:3000]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({**r, "twin": ""}) + "\n" for r in ev))
    with pytest.raises(InputError, match="variants.sft-cf.drop_twin_sources.*name a 'twin'"):
        load_study_config(path)


def test_the_resolved_config_gives_the_same_metrics(micro_run):
    """config.resolved.yaml carries each variant's tune_resolved (a record): its metrics.json listed it under
    study.variants, so rerunning the resolved config changed 140 'metrics' for nothing."""
    from itlens.study import aggregate_metrics, load_study_config, plan_study

    cfg = load_study_config(micro_run / "config.resolved.yaml")
    assert aggregate_metrics(cfg, plan_study(cfg, micro_run)) == json.loads((micro_run / "metrics.json").read_text())


def test_not_measured_findings_name_what_is_missing():
    """With the roles set but the knowledge analysis off, F2 and F4 blamed the variants."""
    f = _findings({0: {}}, style_long="sft", style_simple="lft")
    assert "exact facts" in f["F2"]["evidence"]["test"] and "knowledge analysis" in f["F4"]["evidence"]["test"]
    assert _findings({0: {}})["F2"]["evidence"]["test"].startswith("needs findings.style_long")
    f = _findings({0: {"qa": {m: [] for m in ("base", "lft", "sft", "neftune")}}})  # no gold answers
    assert f["F1"]["holds"] is None and "gold answers" in f["F1"]["evidence"]["test"]


def test_a_second_study_in_the_same_folder_stops_before_writing_anything(tmp_path):
    """While a study runs in OUT, another `itlens study ... --out OUT` is one line, exit 2, and leaves the first
    one's files alone (it rewrote config.resolved.yaml and dropped metrics.json before a stage lock stopped it)."""
    from itlens.stages import hold_lock

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.resolved.yaml").write_text("name: the first study\n")
    (out / "metrics.json").write_text("{}")
    with hold_lock(out / ".study.lock", "a study in this folder"):
        r = run_cli(["study", str(MICRO), "--out", str(out)])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "another itlens process is running a study in this folder" in lines[0], lines[0]
    assert (out / "config.resolved.yaml").read_text() == "name: the first study\n"
    assert (out / "metrics.json").read_text() == "{}"
    assert sorted(p.name for p in out.iterdir()) == ["config.resolved.yaml", "metrics.json"]  # lock file removed


def test_the_resolved_config_is_written_for_a_study_with_a_shared_tune_section():
    """_resolved checked the shared tune a second time with a `file` it does not have: every study whose config
    has a `tune:` section (micro, mini, gemma-geo) stopped with NameError before its first stage."""
    from itlens.study import _resolved, load_study_config

    cfg = load_study_config(MICRO)
    assert cfg.tune
    d = _resolved(cfg)
    assert {v["tune_resolved"]["max_length"] for v in d["variants"].values()} == {cfg.tune["max_length"]}


def test_redo_reruns_the_named_stages_and_what_reads_them(micro_run, tmp_path):
    """`itlens study --redo PATTERN`: those stages and every stage downstream run again (the dry run says so
    first), the rest is reused, and the results are the same; a pattern naming no stage is one line, exit 2."""
    out = tmp_path / "copy"
    shutil.copytree(micro_run, out)
    r = run_cli(["study", str(MICRO), "--out", str(out), "--dry-run", "--redo", "shift-s0-lft-*"])
    assert r.returncode == 0, r.stderr[-2000:]
    to_run = sorted(line.split()[2] for line in r.stdout.splitlines() if line.startswith("to run"))
    assert to_run and all(n.startswith("shift-s0-lft-") or n.startswith("analysis-s0") for n in to_run), to_run
    assert any(n.startswith("analysis-s0") for n in to_run)
    before = {p.name: (p / "stage.json").stat().st_mtime_ns for p in out.iterdir() if (p / "stage.json").is_file()}
    r = run_cli(["study", str(MICRO), "--out", str(out), "--redo", "shift-s0-lft-*"])
    assert r.returncode == 0, r.stderr[-2000:]
    after = {n: (out / n / "stage.json").stat().st_mtime_ns for n in before}
    assert sorted(n for n in before if after[n] != before[n]) == to_run
    assert (out / "metrics.json").read_bytes() == (micro_run / "metrics.json").read_bytes()
    r = run_cli(["study", str(MICRO), "--out", str(out), "--redo", "gen-s9-*"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "'gen-s9-*' names no stage of this study" in lines[0], r.stderr
