"""Data variants: nested subsets, score filters, simplification, and their provenance."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from itlens.errors import InputError
from itlens.io import atomic_write_jsonl, read_records
from itlens.transforms import filter_by_score, provenance_path, simplify, subset, subset_file


def _records(n):
    return [{"id": f"r:{i}", "instruction": f"q{i}?", "response": f"Happy to help! a{i}. Let me know."}
            for i in range(n)]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 60), st.integers(1, 60), st.integers(0, 3))
def test_subsets_nest_and_are_deterministic(a, b, seed):
    recs = _records(60)
    small, large = sorted((a, b))
    s, l_ = subset(recs, small, seed=seed), subset(recs, large, seed=seed)
    assert len(s) == small and {r["id"] for r in s} <= {r["id"] for r in l_}
    assert subset(recs, small, seed=seed) == s
    order = [r["id"] for r in recs]
    assert [order.index(r["id"]) for r in s] == sorted(order.index(r["id"]) for r in s)  # original order


def test_subset_depends_on_the_seed_and_checks_size():
    recs = _records(50)
    assert subset(recs, 10, seed=0) != subset(recs, 10, seed=1)
    with pytest.raises(InputError, match="larger than the dataset"):
        subset(recs, 51)


def test_subset_file_writes_provenance(tmp_path):
    src = atomic_write_jsonl(tmp_path / "it.jsonl", _records(20))
    out = subset_file(src, tmp_path / "it_5.jsonl", 5, seed=2)
    prov = json.loads(provenance_path(out).read_text())
    assert provenance_path(out).name == "it_5.provenance.json"
    assert prov["transform"] == "subset" and prov["parameters"] == {"n": 5, "seed": 2}
    assert prov["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert prov["output_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() and prov["records"] == 5
    assert len(read_records(out, "instruction")) == 5


def test_filter_keeps_scores_at_or_above_the_threshold():
    recs = _records(4)
    kept = filter_by_score(recs, {"r:0": 4.5, "r:1": 3.0, "r:2": 4.4, "r:3": 5}, 4.5)
    assert [r["id"] for r in kept] == ["r:0", "r:3"]
    with pytest.raises(InputError, match="no score"):
        filter_by_score(recs, {"r:0": 5.0}, 1.0)


@pytest.mark.parametrize("rows, needle", [
    (['{"id": "x1", "score": 5}', '{"id": "x2", "score": 1}', '{"id": "x2", "score": 5}'],
     "scores.jsonl:3: field 'id': duplicate id 'x2' (first on line 2)"),
    (['{"id": "x1", "score": NaN}'], "scores.jsonl:1: malformed JSON: NaN is not a JSON value"),
])
def test_a_scores_file_with_repeated_ids_or_nan_is_refused(tmp_path, rows, needle):
    from itlens.transforms import read_scores

    f = tmp_path / "scores.jsonl"
    f.write_text("\n".join(rows) + "\n")
    with pytest.raises(InputError) as e:
        read_scores(f)
    assert needle in str(e.value)


def test_simplify_exact_then_rewriter():
    recs = _records(2)
    recs[0]["response_simple"] = "a0."
    calls = []

    def first_sentence(instruction, response):  # a deterministic rewriter with the judge's signature
        calls.append(instruction)
        return response.split("! ", 1)[1].split(". ")[0] + "."

    out = simplify(recs, first_sentence)
    assert [r["response"] for r in out] == ["a0.", "a1."] and calls == ["q1?"]
    assert out[1]["response_original"] == recs[1]["response"]
    with pytest.raises(InputError, match="no response_simple"):
        simplify(_records(1))


def test_cli_data_commands(tmp_path, capsys):
    from itlens.cli import main

    recs = _records(6)
    for r in recs:
        r["response_simple"] = r["response"].split("! ")[1].split(". ")[0] + "."
    src = atomic_write_jsonl(tmp_path / "it.jsonl", recs)
    scores = atomic_write_jsonl(tmp_path / "scores.jsonl", [{"id": r["id"], "score": i} for i, r in enumerate(recs)])
    main(["data", "subset", str(src), "--n", "3", "--out", str(tmp_path / "s.jsonl")])
    main(["data", "filter", str(src), "--scores", str(scores), "--threshold", "4", "--out", str(tmp_path / "f.jsonl")])
    main(["data", "simplify", str(src), "--out", str(tmp_path / "p.jsonl")])
    assert len(read_records(tmp_path / "s.jsonl")) == 3
    assert [r["id"] for r in read_records(tmp_path / "f.jsonl")] == ["r:4", "r:5"]
    assert read_records(tmp_path / "p.jsonl")[0]["response"] == "a0."
    prov = json.loads((tmp_path / "p.provenance.json").read_text())
    assert prov["parameters"] == {"exact": 6, "rewritten": 0, "rewriter": None}

    scores.write_text('{"id": "r:0", "score": "high"}\n')
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["data", "filter", str(src), "--scores", str(scores), "--threshold", "4",
              "--out", str(tmp_path / "g.jsonl")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "scores.jsonl:1" in err and "score" in err
    assert not (tmp_path / "g.jsonl").exists()


def test_simplify_gives_the_rewriter_the_user_turn_of_messages_records():
    seen = []

    def rewriter(instruction, response):
        seen.append((instruction, response))
        return "Short."

    recs = [{"id": "lima:7", "messages": [{"role": "user", "content": "Explain rainbows in detail."},
                                          {"role": "assistant", "content": "Long answer ..."}]},
            {"id": "a:1", "instruction": "Summarise.", "input": "Some text.", "response": "Long."}]
    out = simplify(recs, rewriter)
    assert seen == [("Explain rainbows in detail.", "Long answer ..."), ("Summarise.\n\nSome text.", "Long.")]
    assert out[0]["messages"][-1]["content"] == "Short." and out[0]["response_original"] == "Long answer ..."


def test_a_variant_written_over_its_source_records_the_source_hash(tmp_path):
    from itlens.transforms import sha256_file

    src = atomic_write_jsonl(tmp_path / "it.jsonl", _records(20))
    before = sha256_file(src)
    subset_file(src, src, 5, seed=0)  # in place
    prov = json.loads(provenance_path(src).read_text())
    assert prov["source_sha256"] == before and prov["output_sha256"] == sha256_file(src) != before


def test_the_judges_output_filters_with_field_mean_and_its_errors_say_how(tmp_path):
    """judge.jsonl rows have `scores` and `mean`: `--field mean` reads them; the default field and a
    failed item get a one-line hint instead of a bare type error."""
    from itlens.transforms import read_scores

    f = tmp_path / "judge.jsonl"
    rows = [{"id": "x1", "model": "m", "scores": {"helpfulness": 5}, "mean": 4.6},
            {"id": "x2", "model": "m", "scores": {"helpfulness": 2}, "mean": 2.0}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_scores(f, field="mean") == {"x1": 4.6, "x2": 2.0}
    with pytest.raises(InputError, match=r"judge.jsonl:1: field 'score': .*use --field mean"):
        read_scores(f)
    failed = {"id": "x2", "model": "m", "scores": None, "mean": None, "status": "parse_failure"}  # as judge writes it
    f.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], failed]))
    with pytest.raises(InputError, match=r"judge.jsonl:2: field 'mean': .*judge failed on this item"):
        read_scores(f, field="mean")
    f.write_text(json.dumps(failed) + "\n")  # a failed first row still says which field to read
    with pytest.raises(InputError, match=r"judge.jsonl:1: field 'score': .*use --field mean"):
        read_scores(f)


def test_data_variant_errors_name_the_line_and_leave_no_half_output(tmp_path, capsys):
    """simplify names the line of a record without (or with a non-text) response_simple (was: no line, and a
    number read as "has none"); a provenance path that is a folder fails before the data file is written (was:
    the .jsonl left behind without its provenance); a NaN threshold and a missing score field say so."""
    from itlens.cli import main
    from itlens.transforms import read_scores, simplify_file

    recs = _records(4)
    for r in recs:
        r["response_simple"] = "a."
    recs[2]["response_simple"] = ""
    src = tmp_path / "it.jsonl"
    src.write_text("\n" + "".join(json.dumps(r) + "\n" for r in recs))  # record 3 is on line 4
    with pytest.raises(InputError) as e:
        simplify_file(src, tmp_path / "s.jsonl")
    assert (e.value.line, e.value.field) == (4, "response_simple")
    recs[2]["response_simple"] = 7
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(InputError, match="expected a string, got 7") as e:
        simplify_file(src, tmp_path / "s.jsonl", rewriter=lambda instruction, response: "x.")
    assert (e.value.line, e.value.field) == (3, "response_simple")
    assert not (tmp_path / "s.jsonl").exists()

    (tmp_path / "sub.provenance.json").mkdir()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["data", "subset", str(src), "--n", "2", "--out", str(tmp_path / "sub.jsonl")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "sub.provenance.json: key '--out'" in err
    assert not (tmp_path / "sub.jsonl").exists()

    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps({"id": r["id"], "sc": 1}) + "\n" for r in recs))
    with pytest.raises(InputError, match="field 'score': expected a finite number, no such field"):
        read_scores(scores)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["data", "filter", str(src), "--scores", str(scores), "--threshold", "nan", "--out", str(tmp_path / "f.jsonl")])
    assert e.value.code == 2 and "key 'threshold': expected a finite number" in capsys.readouterr().err


def test_a_kill_between_data_and_provenance_leaves_no_stale_provenance(tmp_path, monkeypatch):
    """Rewriting a variant: killed after the new data and before its provenance, the old provenance (5
    records, another sha256) had stayed beside the new data, vouching for data it does not describe."""
    from itlens import transforms

    src = atomic_write_jsonl(tmp_path / "it.jsonl", _records(20))
    out = subset_file(src, tmp_path / "sub.jsonl", 5)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(transforms, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        subset_file(src, out, 8)
    assert len(read_records(out, "instruction")) == 8
    assert not provenance_path(out).exists()


def test_a_subset_larger_than_its_file_names_the_file(tmp_path, capsys):
    """A dataset-size sweep past the data's size (the paper's 52K on a 20-record file) said only "key 'n':
    subset size 25 is larger than the dataset": the error names the file it read."""
    from itlens.cli import main

    src = atomic_write_jsonl(tmp_path / "it.jsonl", _records(20))
    with pytest.raises(InputError, match=r"it.jsonl: key 'n': subset size 25 is larger than the dataset \(20"):
        subset_file(src, tmp_path / "s.jsonl", 25)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["data", "subset", str(src), "--n", "25", "--out", str(tmp_path / "s.jsonl")])
    assert e.value.code == 2 and f"{src}: key 'n': subset size 25" in capsys.readouterr().err
    assert not (tmp_path / "s.jsonl").exists()
    assert len(read_records(subset_file(src, tmp_path / "all.jsonl", 20), "instruction")) == 20  # all: fine


def test_simplify_rewrites_every_assistant_turn_of_a_conversation(tmp_path):
    """LIMA-Simple rewrites every LIMA response, and tuning trains every assistant turn of a messages record:
    simplify had replaced only the last, so a multi-turn record kept its earlier long answers for SFT to
    copy. Each earlier turn goes to the rewriter with the user turn before it, the original conversation
    is kept, and without a rewriter such a record is an error naming its line (not silently half done)."""
    from itlens.transforms import simplify_file

    seen = []

    def rewriter(instruction, response):
        seen.append((instruction, response))
        return f"Short {len(seen)}."

    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "Long answer one ..."}, {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "Long answer two ..."}]
    rec = {"id": "lima:9", "messages": msgs}
    out = simplify([rec], rewriter)[0]
    assert sorted(seen) == [("Q1", "Long answer one ..."), ("Q2", "Long answer two ...")]
    reply = {q: f"Short {k}." for k, (q, _) in enumerate(seen, 1)}  # each turn gets its own rewrite
    assert [m["content"] for m in out["messages"] if m["role"] == "assistant"] == [reply["Q1"], reply["Q2"]]
    assert [m["content"] for m in out["messages"] if m["role"] != "assistant"] == ["Be kind.", "Q1", "Q2"]
    assert out["messages_original"] == msgs and out["response_original"] == "Long answer two ..."

    exact = {**rec, "response_simple": "Two."}  # exact for the last turn, the rewriter for the earlier one
    seen.clear()
    out = simplify([exact], rewriter)[0]
    assert seen == [("Q1", "Long answer one ...")]
    assert [m["content"] for m in out["messages"] if m["role"] == "assistant"] == ["Short 1.", "Two."]
    with pytest.raises(InputError, match="assistant turn"):
        simplify([exact])
    src = atomic_write_jsonl(tmp_path / "lima.jsonl", [{"id": "a:1", "instruction": "q", "response": "r",
                                                         "response_simple": "s"}, exact])
    with pytest.raises(InputError) as e:
        simplify_file(src, tmp_path / "s.jsonl")
    assert (e.value.line, e.value.field) == (2, "messages")
    assert not (tmp_path / "s.jsonl").exists()
    simplify_file(src, tmp_path / "s.jsonl", rewriter, "toy")
    prov = json.loads(provenance_path(tmp_path / "s.jsonl").read_text())["parameters"]
    assert (prov["exact"], prov["rewritten"]) == (1, 1)


def test_a_record_without_a_score_is_named_by_its_line_in_the_data(tmp_path):
    """filter named only the scores file, with no line ("scores.jsonl: field 'id': 1 records have no
    score"): the record that lacks a score is in the data file, on a line the error now gives."""
    from itlens.transforms import filter_file

    src = atomic_write_jsonl(tmp_path / "it.jsonl", _records(4))
    scores = atomic_write_jsonl(tmp_path / "scores.jsonl", [{"id": f"r:{i}", "score": 5} for i in (0, 1, 3)])
    with pytest.raises(InputError) as e:
        filter_file(src, tmp_path / "f.jsonl", scores, 4.0)
    assert (e.value.file, e.value.line, e.value.field) == (str(src), 3, "id")
    assert "'r:2' has no score" in str(e.value) and "scores.jsonl" in str(e.value)
    assert not (tmp_path / "f.jsonl").exists()
