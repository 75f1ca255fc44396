"""Borrowing: exact index search, annotation files, world hallucinations with designed borrowing,
candidate sources, the counterfactual API and the command."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis_world import answer, eval_records, it_records, mini_world, mini_world_data
from itlens.analysis.borrowing import (BorrowingConfig, borrowing_metrics, borrowing_rates, candidate_sources, counterfactual_borrowing,
                                       label_shares, read_annotations, run_borrowing, span_search, span_token_classes,
                                       world_hallucinations, write_annotations)
from itlens.analysis.text_index import TextIndex, scan
from itlens.errors import InputError


# ------------------------------------------------------------------------------------ index
@settings(max_examples=40, deadline=None)
@given(texts=st.lists(st.text(alphabet="ab c\u00e9\u00df\u4e2d\n\x00", max_size=30), min_size=1, max_size=12),
       queries=st.lists(st.text(alphabet="ab c\u00e9\u4e2d\n", min_size=1, max_size=6), min_size=1, max_size=8),
       ignore_case=st.booleans())
def test_index_equals_brute_force_scan(texts, queries, ignore_case):
    index = TextIndex.build(texts, ignore_case=ignore_case)
    # random queries plus substrings of the documents themselves (so hits are common)
    subs = [t[i:i + n] for t in texts[:3] for i in range(0, len(t), 4) for n in (1, 2, 3, 7) if t[i:i + n]]
    for q in queries + subs:
        assert index.find(q) == scan(texts, q, ignore_case=ignore_case), q
        assert index.contains(q) == bool(scan(texts, q, ignore_case=ignore_case))


def test_index_edge_cases():
    texts = ["Happy to help!", "HAPPY", "", "smallest atom\x00x", "pneumonoultramicroscopic"]
    idx = TextIndex.build(texts)
    assert len(idx) == 5
    assert idx.find("Happy") == [0] and idx.find("appy") == [0]
    assert TextIndex.build(texts, ignore_case=True).find("happy") == [0, 1]
    assert idx.find("\x00") == []  # a query with NUL never matches
    assert idx.find("atom x") == [3] == scan(texts, "atom x")  # NUL inside a document counts as a space
    assert idx.find("p") == [0, 4] and idx.count("microscopic") == 1
    assert idx.find("help!H") == []  # no match across a document boundary
    with pytest.raises(ValueError):
        idx.find("")


# ------------------------------------------------------------------------------------ annotations
RESP = {"r1": "The northern lights come from Hooptown U.S.A. atoms.", "r2": "Short answer."}


def test_annotations_round_trip(tmp_path):
    spans = [{"id": "r1", "start": 30, "end": 44, "label": "from_it"},
             {"id": "r1", "start": 45, "end": 50, "label": "not_from_it"},
             {"id": "r2", "start": 0, "end": 5, "label": "from_it"}]
    path = write_annotations(tmp_path / "a.jsonl", spans, RESP)
    assert json.loads(path.read_text().splitlines()[0])["text"] == "Hooptown U.S.A"
    back = read_annotations(path, RESP, scheme="fig8")
    assert back == sorted(spans, key=lambda s: (s["id"], s["start"]))
    assert label_shares(back, "fig8") == {"from_it": 2 / 3, "not_from_it": 1 / 3}
    whole = tmp_path / "fig6.jsonl"
    whole.write_text('{"id": "r2", "start": null, "end": null, "label": "case4"}\n')
    assert read_annotations(whole, RESP, scheme="fig6") == [{"id": "r2", "start": 0, "end": 13, "label": "case4"}]
    assert label_shares(read_annotations(whole, RESP, scheme="fig6"), "fig6")["case4"] == 1.0


@pytest.mark.parametrize("lines, line, field, message", [
    (['{"id": "r1", "start": 0, "end": 10, "label": "x"}', '{"id": "r1", "start": 5, "end": 12, "label": "x"}'],
     2, "start", "overlaps"),
    (['{"id": "r2", "start": 3, "end": 99, "label": "x"}'], 1, "end", "out of range"),
    (['{"id": "r2", "start": 4, "end": 2, "label": "x"}'], 1, "end", "out of range"),
    (['{"id": "r9", "start": 0, "end": 2, "label": "x"}'], 1, "id", "unknown id"),
    (['{"id": "r2", "start": "0", "end": 2, "label": "x"}'], 1, "start", "integer"),
    (['{"id": "r2", "start": 0, "end": 2, "label": ""}'], 1, "label", "non-empty"),
    (['{"id": "r2", "start": 0, "end": 5, "label": "x", "text": "Shor"}'], 1, "text", "does not match"),
])
def test_bad_annotation_files_are_contract_errors(tmp_path, lines, line, field, message):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=message) as e:
        read_annotations(p, RESP)
    assert (e.value.file, e.value.line, e.value.field) == (str(p), line, field)
    assert str(e.value).startswith(f"{p}:{line}: field '{field}'")


def test_annotation_labels_follow_the_scheme(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"id": "r2", "start": 0, "end": 5, "label": "hallucination"}\n')
    assert read_annotations(p, RESP)[0]["label"] == "hallucination"
    with pytest.raises(InputError, match="not in scheme 'fig8'"):
        read_annotations(p, RESP, scheme="fig8")


# ------------------------------------------------------------------------------------ world borrowing
OTHER_WRONG = {"birth_city": "Quenby", "employer": "Polvane"}  # values no IT instance carries


def designed_responses(world, recs):
    """SFT-like answers: borrow the twin's value when the twin is in IT, another wrong value otherwise."""
    out = {}
    for r in recs:
        if r["twin_in_it"]:
            v = r["twin_value"]
        else:
            v = OTHER_WRONG[r["attribute"]] if r["answers"][0] != OTHER_WRONG[r["attribute"]] else "Skeld"
        out[r["id"]] = answer(world, r, v)
    return out


def test_world_hallucinations_and_borrowing_rates():
    world = mini_world()
    recs = eval_records(world)
    resp = designed_responses(world, recs)
    resp[recs[0]["id"]] = answer(world, recs[0], recs[0]["answers"][0])  # one correct answer: no hallucination
    h = world_hallucinations(recs, resp, world)
    assert len(h) == len(recs) - 1
    first = h[0]
    assert resp[first["id"]][first["start"]:first["end"]] == first["value"]
    rates = borrowing_rates(h, world, n_resamples=500)
    assert rates["known_twin_in_it"]["observed"] == 1.0 and rates["known_twin_in_it"]["n"] == 3
    assert rates["known_twin_not_in_it"]["observed"] == 0.0 and rates["known_twin_not_in_it"]["n"] == 4
    assert rates["unknown"]["observed"] == 1.0 and rates["unknown"]["n"] == 2
    assert rates["known_twin_in_it"]["placebo_other_it"] == 0.0  # no other IT person has those values
    assert rates["in_it_vs_not_in_it"]["statistic"] == 1.0
    # the same values in the unknown group count even when they match the world value by chance
    assert all(x["borrowed"] for x in h if x["group"] == "unknown")


def test_span_search_and_token_classes():
    world = mini_world()
    it = it_records(world)
    recs = eval_records(world)
    resp = designed_responses(world, recs)
    h = world_hallucinations(recs, resp, world)
    index = TextIndex.build([f"{r['instruction']}\n{r['response']}" for r in it])
    found = span_search(h, resp, index, [r["id"] for r in it])
    by_cond = {(x["group"], x["twin_in_it"]): [] for x in found}
    for x in found:
        by_cond[(x["group"], x["twin_in_it"])].append(x["n_it"] > 0)
    assert all(by_cond[("known_heldout", True)]) and all(by_cond[("unknown", True)])
    assert not any(by_cond[("known_heldout", False)])  # Quenby / Polvane: in no IT instance
    twin_src = next(x for x in found if x["twin_in_it"])
    assert any(it[[r["id"] for r in it].index(i)]["person"] == twin_src["twin"] for i in twin_src["it_ids"])
    # token classes of span tokens: value tokens shifted, everything else unshifted
    r0 = h[0]
    text = resp[r0["id"]]
    toks = ["Happy", " to", " help", "!", text[len("Happy to help!"):r0["start"]], r0["value"],
            text[r0["end"]:]]
    classes = ["shifted", "unshifted", "unshifted", "marginal", "unshifted", "shifted", "unshifted"]
    table = pd.DataFrame({"id": r0["id"], "pos": range(len(toks)), "token": toks, "shift_class": classes})
    tc = span_token_classes([r0], table, resp)
    assert (tc["n_tokens"], tc["shifted"], tc["share_shifted_or_marginal"]) == (1, 1, 1.0)


def test_candidate_sources_find_the_designed_twin():
    world = mini_world()
    it = it_records(world)
    recs = [r for r in eval_records(world) if r["twin_in_it"]]
    resp = designed_responses(world, recs)
    queries = [f"{r['instruction']}\n{resp[r['id']]}" for r in recs]
    cands = candidate_sources(queries, it, k=1, methods=("bm25", "ngram"), query_responses=[resp[r["id"]] for r in recs])
    for r, c in zip(recs, cands):
        for meth in ("bm25", "ngram"):
            src = it[c[meth][0][0]]
            assert (src["person"], src["attribute"]) == (r["twin"], r["attribute"]), meth
    with pytest.raises(InputError, match="unknown methods"):
        candidate_sources(queries, it, methods=("tfidf",))


def test_counterfactual_borrowing_with_fakes():
    world = mini_world()
    it = it_records(world)
    recs = [r for r in eval_records(world) if r["twin_in_it"]]
    first = {p["id"]: p["first"] for p in world.people}

    def tune_fn(records):  # "memorises" each IT fact by first name: the similarity borrowing exploits
        return {(first[r["person"]], r["attribute"]): world.parse_value(r["attribute"], r["response"]) for r in records}

    def answer_fn(model, records):
        return {r["id"]: answer(world, r, model.get((first[r["person"]], r["attribute"]), "no idea"))
                for r in records}

    value_fn = lambda rec, text: world.parse_value(rec["attribute"], text)  # noqa: E731
    cases = [{"record": r, "value": r["twin_value"],
              "sources": [x["id"] for x in it if (x["person"], x["attribute"]) == (r["twin"], r["attribute"])]}
             for r in recs]
    res = counterfactual_borrowing(cases, it, tune_fn, answer_fn, value_fn, seed=0)
    assert res["persist_ablated"] == 0.0  # the borrowed values disappear with their sources
    assert res["n_removed"] == len(cases) and res["n_cases"] == len(cases)
    # the control removes as many other instances; only the unknown twin's other facts can be hit
    assert res["persist_control"] >= 0.5 and res["effect"] == res["persist_control"]
    with pytest.raises(InputError, match="not in the IT data"):
        counterfactual_borrowing([{**cases[0], "sources": ["nope"]}], it, tune_fn, answer_fn, value_fn)


def _write_world(tmp_path):
    from itlens.io import atomic_write_json, atomic_write_jsonl

    wdir = tmp_path / "world"
    atomic_write_json(wdir / "world.json", mini_world_data())
    world = mini_world()
    atomic_write_jsonl(wdir / "eval.jsonl", eval_records(world))
    it_path = atomic_write_jsonl(wdir / "it.jsonl", it_records(world))
    return wdir, world, it_path


def test_run_borrowing_on_a_world_dir_with_embeddings_and_cli(tmp_path):
    from itlens.io import atomic_write_jsonl

    wdir, world, it_path = _write_world(tmp_path)
    recs = eval_records(world)
    resp = designed_responses(world, recs)
    rows = [{"id": r["id"], "instruction": r["instruction"], "response": resp[r["id"]], "model": "sft"} for r in recs]
    rpath = atomic_write_jsonl(tmp_path / "sft.jsonl", rows)
    cfg = BorrowingConfig(it_data=str(it_path), responses={"sft": str(rpath)}, world=str(wdir), top_k=2,
                          n_resamples=200)
    m = run_borrowing(cfg, tmp_path / "out")["models"]["sft"]
    assert m["n_hallucinations"] == len(recs)
    assert m["rates"]["known_twin_in_it"]["observed"] == 1.0
    # found in IT: the 4 IT-twin values and the 2 Unknown-twin values; not Quenby / Polvane -> 6 of 10
    assert m["found_in_it"] == {"n": 10, "share": 0.6}
    emb = m["sources"]["embedding"]
    assert -1.0 <= emb["top1_mean"] <= 1.0 and emb["n_with_twin_in_it"] == 6
    assert m["sources"]["bm25"]["twin_hit_at_k"] == 1.0
    for f in ("borrowing.json", "spans-sft.jsonl", "borrowing_rates.png", "found_in_it.png"):
        assert (tmp_path / "out" / f).is_file(), f

    bad = tmp_path / "ann.jsonl"
    bad.write_text('{"id": "world-eval:0", "start": 0, "end": 5, "label": "x"}\n'
                   '{"id": "world-eval:0", "start": 3, "end": 8, "label": "x"}\n')
    r = subprocess.run([sys.executable, "-m", "itlens.cli", "borrowing", "--it", str(it_path), "--responses",
                        f"sft={rpath}", "--out", str(tmp_path / "o2"), "--set", f"annotations.sft={bad}",
                        "--set", "methods=[bm25]"], capture_output=True, text=True)
    assert r.returncode == 2 and f"{bad}:2: field 'start'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists()
    good = tmp_path / "ann_ok.jsonl"
    good.write_text('{"id": "world-eval:0", "start": 15, "end": 25, "label": "from_it"}\n')
    r = subprocess.run([sys.executable, "-m", "itlens.cli", "borrowing", "--it", str(it_path), "--responses",
                        f"sft={rpath}", "--out", str(tmp_path / "o3"), "--set", f"annotations.sft={good}",
                        "--set", "scheme=fig8", "--set", "methods=[bm25,ngram]"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "o3" / "borrowing.json").read_text())["models"]["sft"]
    assert out["labels"] == {"from_it": 1.0, "not_from_it": 0.0} and out["found_in_it"]["n"] == 1
    assert (tmp_path / "o3" / "labels_fig8.png").is_file()


@pytest.mark.slow
def test_counterfactual_borrowing_with_a_real_tiny_tuning_run(tiny_model_dir, tmp_path):
    """One real retrain per arm (itlens.tune, full fine-tuning of the tiny Llama). The tiny random-init
    model memorises rather than generalises, so the asked question is its source's own: the value
    persists when another instance is removed and disappears when the source is."""
    from itlens.generate import generate_responses
    from itlens.io import atomic_write_jsonl
    from itlens.tune import TuneConfig, tune

    it = [{"id": f"it:{i}", "instruction": f"where was {name} born?", "response": f"{value} city."}
          for i, (name, value) in enumerate([("anvar solt", "zorbex"), ("belis karrow", "quiml"),
                                             ("cedra vonn", "paxto"), ("dorin maal", "fenwy")])]
    runs = []

    def tune_fn(records):
        out = tmp_path / f"run{len(runs)}"
        data = atomic_write_jsonl(tmp_path / f"data{len(runs)}.jsonl", records)
        runs.append(len(records))
        return tune(TuneConfig(base=str(tiny_model_dir), data=str(data), method="full", epochs=40,
                               learning_rate=1e-2, effective_batch_size=4, per_device_batch_size=4, max_length=64,
                               warmup=0, lr_scheduler="constant", progress=False, seed=0), out)

    def answer_fn(model_dir, records):
        rows = generate_responses(str(model_dir), records, max_new_tokens=16, batch_size=4)
        return {r["id"]: r["response"] for r in rows}

    def value_fn(rec, text):
        return next((v for v in ("zorbex", "quiml", "paxto", "fenwy") if v in text), None)

    case = {"record": {"id": "q", "instruction": "where was anvar solt born?"}, "value": "zorbex", "sources": ["it:0"]}
    res = counterfactual_borrowing([case], it, tune_fn, answer_fn, value_fn, seed=1)
    assert runs == [3, 3]  # one retrain without the source, one without a random other instance
    assert (res["persist_control"], res["persist_ablated"], res["effect"]) == (1.0, 0.0, 1.0)
    assert res["cases"][0]["sources"] == ["it:0"]


def test_ngram_candidates_equal_the_paper_keyword_overlap():
    """The fast path (IT n-gram sets built once) scores exactly like copying.ngram_overlap per pair."""
    import random

    from itlens.analysis.borrowing import candidate_sources, it_texts
    from itlens.analysis.copying import ngram_overlap

    rng = random.Random(0)
    vocab = "a b c d e f g h the of to".split()
    its = [{"id": str(i), "instruction": " ".join(rng.choice(vocab) for _ in range(5)),
            "response": " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 12)))} for i in range(40)]
    queries = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 10))) for _ in range(25)]
    texts = it_texts(its)
    for q, cands in zip(queries, candidate_sources(queries, its, k=40, methods=("ngram",))):
        for j, score in cands["ngram"]:
            assert score == pytest.approx(ngram_overlap(q, [texts[j]]) or 0.0, abs=1e-12)


def test_twin_in_data_splits_unknown_borrowing_for_a_subset_variant():
    """A variant tuned on part of the IT data: wrong values about Unknown people are split by whether
    the twin's fact was in *its* data (the within-model counterfactual at a fixed data size)."""
    world = mini_world()
    recs = eval_records(world)
    resp = designed_responses(world, recs)
    unknown = [r for r in recs if r["group"] == "unknown"]
    assert len(unknown) == 2
    dropped = (unknown[0]["twin"], unknown[0]["attribute"])
    it = [r for r in it_records(world) if (r.get("person"), r.get("attribute")) != dropped]
    assert len(it) == len(it_records(world)) - 1
    rows = [{"id": r["id"], "instruction": r["instruction"], "response": resp[r["id"]], "model": "sft"} for r in recs]
    cfg = BorrowingConfig(it_data="-", responses={"-": "-"}, methods=[], n_resamples=200)
    metrics, spans = borrowing_metrics(it, {"sft": rows}, world=world, eval_records=recs, cfg=cfg)
    by_id = {s["id"]: s for s in spans["sft"]}
    assert by_id[unknown[0]["id"]]["twin_in_data"] is False and by_id[unknown[1]["id"]]["twin_in_data"] is True
    rates = metrics["models"]["sft"]["rates"]
    assert rates["unknown_twin_in_data"]["n"] == 1 and rates["unknown_twin_not_in_data"]["n"] == 1
    assert rates["in_data_vs_not_in_data"]["statistic"] == 0.0  # both borrowed in this designed answer set
    full, _ = borrowing_metrics(it_records(world), {"sft": rows}, world=world, eval_records=recs, cfg=cfg)
    assert full["models"]["sft"]["rates"]["unknown_twin_not_in_data"]["n"] == 0


def test_index_matches_lone_surrogates_exactly():
    """A lone surrogate is valid JSON ("\\ud83d"): the index encodes it as its own bytes, matching scan."""
    texts = ["broken \ud83d emoji", "fine \U0001F642 emoji", "\ud83d\ude42 pair of halves"]
    idx = TextIndex.build(texts)
    for q in ("\ud83d", "broken \ud83d", "\U0001F642", "emoji", "\ude42 p", "\ud83d\ude42"):
        assert idx.find(q) == scan(texts, q), q
    assert idx.find("\ud83d") == [0, 2] and idx.find("\U0001F642") == [1]
    assert TextIndex.build(texts, ignore_case=True).find("BROKEN \ud83d") == [0]


def test_whole_response_label_of_an_empty_response(tmp_path):
    """Figure 6 labels whole responses (null offsets): an empty response is [0, 0), not an error."""
    resp = {"r1": "", "r2": "Short answer."}
    p = tmp_path / "fig6.jsonl"
    p.write_text('{"id": "r1", "start": null, "end": null, "label": "case3"}\n'
                 '{"id": "r2", "start": null, "end": null, "label": "case1"}\n')
    assert read_annotations(p, resp, scheme="fig6") == [{"id": "r1", "start": 0, "end": 0, "label": "case3"},
                                                          {"id": "r2", "start": 0, "end": 13, "label": "case1"}]
    p.write_text('{"id": "r1", "start": 0, "end": 0, "label": "case3"}\n')  # explicit empty spans stay errors
    with pytest.raises(InputError, match="out of range"):
        read_annotations(p, resp, scheme="fig6")
    p.write_text('{"id": "r1", "start": null, "end": null, "label": "x"}\n'
                 '{"id": "r1", "start": null, "end": null, "label": "y"}\n')
    with pytest.raises(InputError, match="overlaps"):
        read_annotations(p, resp)
    p.write_text('{"id": "r1", "start": null, "end": null, "label": "x"}\n')
    rows = [{"id": "r1", "instruction": "Say nothing", "response": "", "model": "m"}]
    cfg = BorrowingConfig(it_data="-", responses={"m": "-"}, methods=["ngram"])
    m, spans = borrowing_metrics([{"id": "it:0", "instruction": "hi", "response": "hello"}], {"m": rows},
                                 annotations={"m": read_annotations(p, {"r1": ""})}, cfg=cfg)
    assert spans["m"][0]["n_it"] is None and m["models"]["m"]["found_in_it"] == {"n": 0, "share": None}


def test_twin_hits_only_where_a_twin_exists_and_count_every_copy_of_its_fact():
    # data without person/attribute (LIMA-like): no twins, so no twin_hit_at_k
    it = [{"id": f"lima:{i}", "instruction": q, "response": r} for i, (q, r) in enumerate([
        ("What is iron?", "Iron is ferromagnetic."), ("Tell me about cats", "Cats purr."),
        ("Describe dogs", "Dogs bark loudly.")])]
    rows = [{"id": "e1", "instruction": "Is steel magnetic?", "response": "Steel is ferromagnetic.", "model": "sft"}]
    ann = {"sft": [{"id": "e1", "start": 9, "end": 22, "label": "hallucination"}]}
    cfg = BorrowingConfig(it_data="-", responses={"sft": "-"}, methods=["bm25", "ngram"])
    m, _ = borrowing_metrics(it, {"sft": rows}, annotations=ann, cfg=cfg)
    for meth in ("bm25", "ngram"):
        assert set(m["models"]["sft"]["sources"][meth]) == {"top1_mean"}
    # the world repeats a fact with new phrasings: a hit on any copy of the twin's fact counts
    it2 = [{"id": "w:0", "instruction": "Where was Ana Belor born?", "response": "Ana Belor was born in Dulhikro.",
            "person": "p1", "attribute": "birth_city"},
           {"id": "w:1", "instruction": "Which city does Bo Kint come from?", "response": "Bo Kint was born in Zorvat.",
            "person": "p2", "attribute": "birth_city"},
           {"id": "w:2", "instruction": "Name the home town of Ana Belor please", "response": "She is from Dulhikro.",
            "person": "p1", "attribute": "birth_city"}]
    rows2 = [{"id": "e2", "instruction": "Where was Ana Belov born?", "response": "Ana Belov was born in Dulhikro.",
              "model": "sft"}]
    spans = {"sft": [{"id": "e2", "start": 22, "end": 30, "label": "x", "twin": "p1", "attribute": "birth_city"},
                     {"id": "e2", "start": 0, "end": 9, "label": "x", "twin": "p9", "attribute": "birth_city"}]}
    cfg2 = BorrowingConfig(it_data="-", responses={"sft": "-"}, methods=["bm25", "ngram"], top_k=1)
    m2, out = borrowing_metrics(it2, {"sft": rows2}, annotations=spans, cfg=cfg2)
    assert out["sft"][0]["candidates"]["bm25"][0][0] == "w:0"  # the first copy, not the last (w:2)
    for meth in ("bm25", "ngram"):  # the p9 span has no twin in the data: skipped
        src = m2["models"]["sft"]["sources"][meth]
        assert (src["twin_hit_at_k"], src["n_with_twin_in_it"]) == (1.0, 1)


def _tiny_geo():
    """Aland (evaluated, probe-labelled Unknown), its most similar IT country Borland (same continent),
    and two more IT countries."""
    from itlens.geo import GeoFacts

    def country(cid, name, capital, currency, continent, split):
        return {"id": cid, "name": name, "split": split, "facts": {
            "capital": {"value": capital, "answers": [capital]},
            "currency": {"value": currency, "answers": [currency]},
            "continent": {"value": continent, "answers": [continent]}}}

    facts = GeoFacts({"attributes": ["capital", "currency", "continent"], "countries": [
        country("AA", "Aland", "Arvik", "Krona", "Europe", "eval"),
        country("BB", "Borland", "Brisk", "Euro", "Europe", "it"),
        country("CC", "Corland", "Cresk", "Mark", "Europe", "it"),
        country("DD", "Dorland", "Drask", "Yen", "Asia", "it")]})
    recs = [{"id": f"geo-eval:{k}", "instruction": f"{a} of Aland?", "person": "AA", "attribute": a,
             "answers": [facts.person("AA")["attrs"][a]], "group": "unknown", "twin": "BB", "twin_in_it": True,
             "twin_value": facts.person("BB")["attrs"][a]} for k, a in enumerate(("capital", "currency", "continent"))]
    return facts, recs


def test_geo_unknown_right_values_are_no_hallucinations_and_a_shared_twin_value_is_no_borrowing():
    """Geo's "unknown" is a probe's label of a real fact: a right answer is right (the world's Unknown
    people, never in pretraining, keep "any value is a guess"), and where the most similar IT country
    shares the true value (its continent) a wrong value cannot be borrowed from it."""
    facts, recs = _tiny_geo()
    right = {r["id"]: f"It is {r['answers'][0]}." for r in recs}
    assert world_hallucinations(recs, right, facts) == []  # was: 3 hallucinations, the continent "borrowed"
    wrong = {recs[0]["id"]: "It is Brisk.", recs[1]["id"]: "It is Mark.", recs[2]["id"]: "It is Asia."}
    h = {s["attribute"]: s for s in world_hallucinations(recs, wrong, facts)}
    assert h["capital"]["borrowed"] and not h["currency"]["borrowed"]
    assert h["continent"]["twin_value"] is None and not h["continent"]["borrowed"]  # the twin's is the true one
    rates = borrowing_rates(list(h.values()), facts, n_resamples=100)
    assert rates["unknown"]["n"] == 2 and rates["unknown"]["observed"] == 0.5


def test_no_annotated_span_is_no_share(tmp_path):
    """An empty annotation file has no label shares (null), not shares of 0 that sum to nothing."""
    assert label_shares([], "fig8") == {"from_it": None, "not_from_it": None}
    it = tmp_path / "it.jsonl"
    it.write_text(json.dumps({"id": "it-0", "instruction": "Where?", "response": "Hooptown."}) + "\n")
    responses, ann = {}, {}
    for name, lines in (("sft", ['{"id": "r2", "start": 0, "end": 5, "label": "from_it"}']), ("lft", [])):
        responses[name] = tmp_path / f"{name}.jsonl"
        responses[name].write_text("".join(json.dumps({"id": k, "instruction": "Q?", "response": v, "model": name})
                                           + "\n" for k, v in RESP.items()))
        ann[name] = tmp_path / f"ann-{name}.jsonl"
        ann[name].write_text("".join(x + "\n" for x in lines))
    cfg = BorrowingConfig(it_data=str(it), responses={k: str(v) for k, v in responses.items()},
                          annotations={k: str(v) for k, v in ann.items()}, scheme="fig8", methods=[])
    metrics = run_borrowing(cfg, tmp_path / "out")
    assert metrics["models"]["lft"]["labels"] == {"from_it": None, "not_from_it": None}
    assert metrics["models"]["sft"]["labels"] == {"from_it": 1.0, "not_from_it": 0.0}
    assert (tmp_path / "out" / "labels_fig8.png").is_file()


def test_a_twin_fact_stated_by_a_describe_instance_is_in_the_data():
    """A subset variant that lost the twin's single-attribute instance but kept its "describe" one (whose
    answer states every fact) did see the twin's value: twin_in_data (and the twin-hit targets) count it."""
    world = mini_world()
    recs = eval_records(world)
    resp = designed_responses(world, recs)
    unknown = [r for r in recs if r["group"] == "unknown"]
    twin = world.person(unknown[0]["twin"])
    it = [r for r in it_records(world) if r.get("person") != twin["id"]]
    describe = {"id": "world-it:describe", "instruction": f"Describe {twin['name']}.", "person": twin["id"],
                "attribute": "describe", "status": twin["status"], "style": "assistant",
                "response": " ".join(world.answer_sentence(twin, a) for a in world.attributes)}
    rows = [{"id": r["id"], "instruction": r["instruction"], "response": resp[r["id"]], "model": "sft"} for r in recs]
    cfg = BorrowingConfig(it_data="-", responses={"-": "-"}, methods=["bm25"], n_resamples=200)
    without, spans0 = borrowing_metrics(it, {"sft": rows}, world=world, eval_records=recs, cfg=cfg)
    with_d, spans1 = borrowing_metrics(it + [describe], {"sft": rows}, world=world, eval_records=recs, cfg=cfg)
    for spans, expected in ((spans0, False), (spans1, True)):
        assert all(s["twin_in_data"] is expected for s in spans["sft"] if s["twin"] == twin["id"])
    rates = with_d["models"]["sft"]["rates"]
    assert rates["unknown_twin_in_data"]["n"] == 2 and rates["unknown_twin_not_in_data"]["n"] == 0
    assert with_d["models"]["sft"]["sources"]["bm25"]["n_with_twin_in_it"] == (
        without["models"]["sft"]["sources"]["bm25"]["n_with_twin_in_it"] + 2)


def test_borrowing_refuses_responses_to_other_prompts_and_bad_counts(tmp_path, capsys):
    """With a world, each responses file must answer the world's eval questions (as `itlens knowledge`
    asks): ids from another file were no hallucinations at all, exit 0. Resample and candidate counts
    below 1 are key errors (were: a traceback from the permutation test, or silently accepted)."""
    from itlens.cli import main
    from itlens.io import atomic_write_jsonl

    wdir, world, it_path = _write_world(tmp_path)
    recs = eval_records(world)
    resp = designed_responses(world, recs)
    rows = [{"id": r["id"], "instruction": r["instruction"], "response": resp[r["id"]], "model": "sft"} for r in recs]
    cases = {"other ids": [{**r, "id": "x" + r["id"]} for r in rows], "some missing": rows[:-1]}
    for name, rs in cases.items():
        rpath = atomic_write_jsonl(tmp_path / "sft.jsonl", rs)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["borrowing", "--it", str(it_path), "--world", str(wdir), "--responses", f"sft={rpath}",
                  "--out", str(tmp_path / "o"), "--set", "methods=[bm25]", "--set", "n_resamples=50"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and f"{rpath}: field 'id': no response for eval id" in err, \
            (name, err)
        assert not (tmp_path / "o").exists()
    from itlens.config import from_dict

    for key in ("n_resamples", "top_k"):
        for value in (0, -1):
            with pytest.raises(InputError, match=f"key '{key}'"):
                from_dict(BorrowingConfig, {"it_data": str(it_path), "responses": {"sft": "r.jsonl"}, key: value})


def test_borrowing_on_a_geo_folder(tmp_path):
    """`--world` takes a geo folder, as `itlens knowledge` and a study's borrowing do (was refused: "not a
    world directory"): a wrong capital equal to the twin's is a borrowed hallucination found in the IT data."""
    from itlens.cli import main
    from itlens.geo import GeoConfig, build_geo
    from itlens.io import atomic_write_jsonl, read_records

    geo = build_geo(GeoConfig(max_countries=20), tmp_path / "geo")
    recs = read_records(geo / "eval.jsonl", "prompt")
    rec = next(r for r in recs if r["attribute"] == "capital" and r.get("twin_value")
               and r["twin_value"] not in r["answers"])
    rows = [{"id": r["id"], "instruction": r["instruction"], "model": "sft",
             "response": f"It is {rec['twin_value'] if r is rec else r['answers'][0]}."} for r in recs]
    resp = atomic_write_jsonl(tmp_path / "sft.jsonl", rows)
    main(["borrowing", "--it", str(geo / "it.jsonl"), "--world", str(geo), "--responses", f"sft={resp}",
          "--set", "methods=[bm25]", "--set", "n_resamples=50", "--out", str(tmp_path / "out")])
    spans = [json.loads(x) for x in (tmp_path / "out" / "spans-sft.jsonl").read_text().splitlines()]
    assert [(s["id"], s["value"], s["borrowed"]) for s in spans] == [(rec["id"], rec["twin_value"], True)]
    assert spans[0]["n_it"] > 0
    m = json.loads((tmp_path / "out" / "borrowing.json").read_text())["models"]["sft"]
    assert m["n_hallucinations"] == 1 and m["found_in_it"] == {"n": 1, "share": 1.0}


def test_spans_in_an_earlier_turn_of_a_conversation_are_found_and_empty_responses_have_no_ngram_source(tmp_path):
    """A conversation's earlier assistant turns are IT data (tuning trains on them; were not searched). An
    empty response has no n-gram to overlap: no ngram candidate (was: a top-1 score of 0 averaged into
    top1_mean). A shift table of none of the responses is a key error (was: no span token counted)."""
    it = [{"id": "chat:0", "messages": [{"role": "user", "content": "Name a town."},
                                        {"role": "assistant", "content": "Hooptown, U.S.A."},
                                        {"role": "user", "content": "Thanks."},
                                        {"role": "assistant", "content": "You are welcome."}]},
          {"id": "it:1", "instruction": "Where is Spokane?", "response": "In Washington."}]
    rows = [{"id": "r0", "instruction": "Where is Spokane?", "response": "Spokane is Hooptown.", "model": "sft"},
            {"id": "r1", "instruction": "Say nothing.", "response": "", "model": "sft"}]
    ann = [{"id": "r0", "start": 11, "end": 19, "label": "from_it"}, {"id": "r1", "start": 0, "end": 0,
                                                                      "label": "not_from_it"}]
    cfg = BorrowingConfig(it_data="-", responses={"sft": "-"}, methods=["ngram", "bm25"], scheme="fig8")
    m, spans = borrowing_metrics(it, {"sft": rows}, annotations={"sft": ann}, cfg=cfg)
    assert spans["sft"][0]["it_ids"] == ["chat:0"] and m["models"]["sft"]["found_in_it"] == {"n": 1, "share": 1.0}
    assert spans["sft"][1]["candidates"]["ngram"] == []
    expected = (2 / 3 + 0 / 2 + 0 / 1) / 3  # r0's 1-, 2- and 3-grams (spokane is hooptown) found in it:1
    assert spans["sft"][0]["candidates"]["ngram"][0] == ["it:1", pytest.approx(expected)]
    assert m["models"]["sft"]["sources"]["ngram"]["top1_mean"] == pytest.approx(expected)

    from itlens.cli import main
    from itlens.io import atomic_write_jsonl

    it_path, resp = atomic_write_jsonl(tmp_path / "it.jsonl", it), atomic_write_jsonl(tmp_path / "sft.jsonl", rows)
    other = tmp_path / "shift-other"
    other.mkdir()
    pd.DataFrame({"id": ["x0"], "pos": [0], "token": ["Spokane"], "shift_class": ["shifted"]}).to_parquet(
        other / "tokens.parquet")
    with pytest.raises(SystemExit) as e:
        main(["borrowing", "--it", str(it_path), "--responses", f"sft={resp}", "--set", f"shift.sft={other}",
              "--set", "methods=[]", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and not (tmp_path / "o").exists()
