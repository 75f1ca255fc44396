"""The synthetic world: determinism, no leaks, twins as designed, IT/eval/cloze data, tokenizer, errors."""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from pathlib import Path

import pytest

from itlens.errors import InputError
from itlens.io import read_records
from itlens.world import DESCRIBE, STYLES, World, WorldConfig, build_world, load_world_config

MICRO = dict(n_families=6, n_unknown_pairs=3, n_bios=2, n_chatter=10, company_docs_per_employer=1, it_size=40,
             tokenizer_vocab_size=500)
FILES = ["world.json", "corpus.jsonl", "it.jsonl", "eval.jsonl", "cloze.jsonl", "frame.txt", "tokenizer/tokenizer.json",
         *[f"it_{s}.jsonl" for s in STYLES]]


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory) -> Path:
    return build_world(WorldConfig(**MICRO), tmp_path_factory.mktemp("world") / "w")


@pytest.fixture(scope="module")
def world(micro_dir) -> World:
    return World.load(micro_dir)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z]+", text))


def test_generator_is_deterministic_for_a_seed(micro_dir, tmp_path):
    again = build_world(WorldConfig(**MICRO), tmp_path / "again")
    for name in FILES:
        assert (micro_dir / name).read_bytes() == (again / name).read_bytes(), name
    other = build_world(WorldConfig(**{**MICRO, "seed": 1}), tmp_path / "other")
    assert (other / "world.json").read_bytes() != (micro_dir / "world.json").read_bytes()


def test_no_unknown_person_in_the_corpus(world):
    corpus_words = set().union(*(_words(d["text"]) for d in world.records("corpus")))
    unknown = [p for p in world.people if p["status"] == "unknown"]
    assert unknown
    for p in unknown:
        assert p["first"] not in corpus_words and p["last"] not in corpus_words, p["name"]
    known_names = {p["name"] for p in world.people if p["status"] == "known"}
    text = " ".join(d["text"] for d in world.records("corpus"))
    assert all(n in text for n in known_names)


def test_no_evaluation_person_in_the_it_data(world):
    eval_people = {r["person"] for r in world.records("eval")}
    assert eval_people == {p["id"] for p in world.people if p["in_eval"]}
    for style in STYLES:
        rows = world.records(f"it_{style}")
        assert not eval_people & {r["person"] for r in rows}
        text = " ".join(r["instruction"] + " " + r["response"] for r in rows)
        for pid in eval_people:
            assert world.person(pid)["name"] not in text
    assert all(not world.person(pid)["in_it"] for pid in eval_people)


def test_twins_are_placed_as_configured(world):
    heldout = [p for p in world.people if p["role"] == "heldout"]
    twins = [world.person(p["twin"]) for p in heldout]
    assert all(t["first"] == p["first"] and t["last"] != p["last"] and t["family"] != p["family"]
               for p, t in zip(heldout, twins))
    assert Counter(t["role"] for t in twins) == {"qa_it": 3, "qa_only": 3}  # heldout_twin_in_it_share 0.5 of 6
    assert all(p["twin_in_it"] == (t["role"] == "qa_it") == t["in_it"] for p, t in zip(heldout, twins))
    for p in [*heldout, *(q for q in world.people if q["role"] == "unknown_eval")]:
        t = world.person(p["twin"])
        assert t["twin"] == p["id"]
        assert all(p["attrs"][a] != t["attrs"][a] for a in world.attributes), "a borrowed value must be wrong"
    for p in world.people:
        if p["role"] == "unknown_eval":
            t = world.person(p["twin"])
            assert t["role"] == "unknown_it" and t["first"] == p["first"] and t["in_it"]
    # the only shared first names are the designed twins
    firsts = Counter(p["first"] for p in world.people)
    designed = {p["first"] for p in world.people if p["in_eval"]}
    assert {f for f, n in firsts.items() if n > 1} == designed and max(firsts.values()) == 2
    assert len({p["last"] for p in world.people if p["status"] == "unknown"}) == 6
    for r in world.records("eval"):
        t = world.person(r["twin"])
        assert r["twin_in_it"] == t["in_it"]
        if r["attribute"] != DESCRIBE:
            assert r["twin_value"] == t["attrs"][r["attribute"]] != r["answers"][0]


def test_twins_off_gives_unique_first_names(tmp_path):
    cfg = WorldConfig(**{**MICRO, "twins": False, "heldout_twin_in_it_share": 1.0})
    w = World.load(build_world(cfg, tmp_path / "w"))
    firsts = [p["first"] for p in w.people]
    assert len(firsts) == len(set(firsts)) and all(p["twin"] is None for p in w.people)


def test_it_data_sizes_styles_and_phrasings(world):
    rows = {s: world.records(f"it_{s}") for s in STYLES}
    assert [r["id"] for r in rows["assistant"]] == [r["id"] for r in rows["concise"]]
    assert [r["id"] for r in world.records("it")] == [r["id"] for r in rows["assistant"]]
    assert len(rows["assistant"]) == 40
    assert sum(r["status"] == "unknown" for r in rows["assistant"]) == round(40 / 3)
    assert {world.person(r["person"])["role"] for r in rows["assistant"]} == {"qa_it", "unknown_it"}
    opening, closing = world.style["opening"], world.style["closing"]
    for i, r in enumerate(rows["assistant"]):
        p, a = world.person(r["person"]), r["attribute"]
        simple = world.answer_sentence(p, a)
        assert r["response_simple"] == simple == rows["simplified"][i]["response"]
        assert r["response"] == f"{opening} {simple} {closing}"
        know = rows["knowledgeable"][i]["response"]
        assert know.startswith(f"{opening} {simple} ") and know.endswith(closing) and len(know) > len(r["response"])
        values = [p["attrs"][x] for x in world.attributes] if a == DESCRIBE else [p["attrs"][a]]
        assert all(v in rows["concise"][i]["response"] for v in values)
        assert p["name"] in r["instruction"]
    describe = [r for r in rows["assistant"] if r["attribute"] == DESCRIBE]
    assert describe and all(r["response_simple"].count(".") == len(world.attributes) for r in describe)
    # several phrasings per question
    phrasings = Counter(r["instruction"].replace(world.person(r["person"])["name"], "{name}")
                        for r in rows["assistant"])
    assert len(phrasings) >= 2 * (len(world.attributes) + 1)


def test_eval_cloze_and_frame(world, micro_dir):
    ev = read_records(micro_dir / "eval.jsonl", "prompt")
    assert {r["group"] for r in ev} == {"known_heldout", "unknown"}
    assert len(ev) == (6 + 3) * (len(world.attributes) + 1)
    for r in ev:
        p = world.person(r["person"])
        a = r["attribute"]
        gold = [p["attrs"][x] for x in world.attributes] if a == DESCRIBE else [p["attrs"][a]]
        assert r["answers"] == gold and r["id"].startswith("world-eval:")
    cloze = world.records("cloze")
    assert len(cloze) == 6 * 4 * len(world.attributes)
    for r in cloze:
        p = world.person(r["person"])
        assert world.answer_sentence(p, r["attribute"]) == f"{r['prompt']} {r['answers'][0]}."
    frame = world.frame_text()
    assert frame.count("{instruction}") == 1 and frame.endswith("# Query:\n{instruction}\n\n# Answer:\n")
    qa_only = [p for p in world.people if p["role"] == "qa_only"]
    assert sum(p["name"] in frame for p in qa_only) == 3
    assert not any(p["name"] in frame for p in world.people if p["in_eval"] or p["in_it"])
    # no twin's fact in the base's prompt: it would be borrowable in context
    assert not any(p["name"] in frame for p in world.people if p["twin"] is not None)
    # the corpus's Q/A documents use exactly the frame's format
    qa_docs = [d["text"] for d in world.records("corpus") if d["kind"] == "qa"]
    assert qa_docs and all(t.startswith("# Query:\n") and "\n\n# Answer:\n" in t for t in qa_docs)


def test_parse_value(world):
    city = world.vocab["birth_city"][0]
    other = world.vocab["birth_city"][1]
    assert world.parse_value("birth_city", f"Sure! X was born in {city.lower()}, not {other}.") == city
    assert world.parse_value("birth_city", f"born in {city}x") is None
    assert world.parse_value("birth_year", "in 1951 and 1960") == "1951"
    assert world.parse_value("field", "no idea") is None
    uni = world.vocab["university"][2]
    assert world.parse_value("university", f"graduated from {uni}.") == uni


def test_values_and_names_are_prefix_free(world):
    generated = [*world.vocab["birth_city"], *world.vocab["employer"],
                 *(u.split()[0] for u in world.vocab["university"]),
                 *{p["first"] for p in world.people}, *{p["last"] for p in world.people}]
    low = [g.lower() for g in generated]
    assert len(set(low)) == len(low)
    assert not [(a, b) for a in low for b in low if a != b and b.startswith(a)]


def test_tokenizer_round_trips_and_splits_names_alike(world, micro_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro_dir / "tokenizer")
    for d in world.records("corpus")[:50]:
        assert tok.decode(tok(d["text"], add_special_tokens=False)["input_ids"]) == d["text"]
    rec = world.records("it")[0]
    chat = tok.apply_chat_template([{"role": "user", "content": rec["instruction"]},
                                    {"role": "assistant", "content": rec["response"]}], tokenize=False)
    assert chat == f"<|user|>{rec['instruction']}<|end|><|assistant|>{rec['response']}<|end|>"
    assert tok.decode(tok(chat, add_special_tokens=False)["input_ids"]) == chat

    def n_tokens(status):
        return statistics.mean(len(tok(" " + p["name"], add_special_tokens=False)["input_ids"])
                               for p in world.people if p["status"] == status)

    known, unknown = n_tokens("known"), n_tokens("unknown")
    assert known >= 3 and abs(known - unknown) / known < 0.35, (known, unknown)
    # the probes tokenise prompt and value separately: that must equal the joint tokenisation
    for r in world.records("cloze"):
        joint = tok(r["prompt"] + " " + r["answers"][0], add_special_tokens=False)["input_ids"]
        parts = tok(r["prompt"], add_special_tokens=False)["input_ids"] + \
            tok(" " + r["answers"][0], add_special_tokens=False)["input_ids"]
        assert joint == parts


def test_scrambling_keeps_known_names_out_of_the_vocabulary(world, micro_dir, tmp_path):
    from transformers import AutoTokenizer

    scrambled = AutoTokenizer.from_pretrained(micro_dir / "tokenizer")
    plain_dir = build_world(WorldConfig(**{**MICRO, "scramble_names_for_tokenizer": False}), tmp_path / "plain")
    plain = AutoTokenizer.from_pretrained(plain_dir / "tokenizer")
    known = [p for p in world.people if p["status"] == "known"]

    def whole(tok):  # Known surnames that became a single token
        return sum(len(tok(" " + p["last"], add_special_tokens=False)["input_ids"]) == 1 for p in known)

    assert whole(plain) > whole(scrambled)


@pytest.mark.parametrize("text,needle", [
    ("world:\n  n_famlies: 3\n", "key 'world.n_famlies': unknown key"),
    ("world:\n  n_families: 1\n", "key 'world.n_families': expected at least 2"),
    ("world:\n  it_unknown_share: 1.5\n", "key 'world.it_unknown_share': expected a probability"),
    ("n_bios: many\n", "key 'n_bios': expected an integer"),
    ("world:\n  it_style: fancy\n", "key 'world.it_style': expected one of"),
    ("world: [1, 2]\n", "key 'world': expected a mapping"),
    ("world:\n  n_families: 2\n  frame_examples: 3\n", "key 'world.frame_examples': expected at most n_families"),
])
def test_bad_world_configs_are_input_errors(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(InputError) as ei:
        load_world_config(p)
    assert str(p) in str(ei.value) and needle in str(ei.value)


def test_bad_templates_file_is_an_input_error(tmp_path):
    from itlens.resources import prompt_path

    text = prompt_path("world_templates.yaml").read_text().replace('"{name} works at {value}."', '"{name} works."', 1)
    bad = tmp_path / "tpl.yaml"
    bad.write_text(text)
    with pytest.raises(InputError, match=r"tpl.yaml: key 'answer.employer'"):
        build_world(WorldConfig(**{**MICRO, "templates": str(bad)}), tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_cli_world_sections_overrides_and_exit_2(tmp_path, capsys):
    from itlens.cli import main

    cfg = tmp_path / "study.yaml"
    cfg.write_text("world:\n" + "".join(f"  {k}: {v}\n" for k, v in MICRO.items()) + "pretrain:\n  steps: 3\n")
    main(["world", str(cfg), "--out", str(tmp_path / "w"), "--set", "world.n_unknown_pairs=2"])
    data = json.loads((tmp_path / "w" / "world.json").read_text())
    assert data["counts"]["unknown"] == 4 and data["config"]["n_families"] == 6
    bad = tmp_path / "bad.yaml"
    bad.write_text("world:\n  n_families: -3\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        main(["world", str(bad), "--out", str(tmp_path / "nope")])
    assert ei.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.yaml" in err and "n_families" in err
    assert not (tmp_path / "nope").exists()


def test_an_empty_opening_and_closing_add_no_spaces(tmp_path):
    out = build_world(WorldConfig(**{**MICRO, "opening": "", "closing": ""}), tmp_path / "w")
    from itlens.world import World

    w = World.load(out)
    for style in ("assistant", "knowledgeable"):
        rows = w.records(f"it_{style}")
        assert rows and all(r["response"] == r["response"].strip() and "  " not in r["response"] for r in rows)


def test_frame_people_are_never_twins_even_when_every_qa_only_person_is_one(tmp_path):
    """With every held-out twin a placebo (qa_only), the frame falls back to qa_it people without a twin."""
    w = World.load(build_world(WorldConfig(**{**MICRO, "heldout_twin_in_it_share": 0.0}), tmp_path / "w"))
    frame = w.frame_text()
    in_frame = [p for p in w.people if p["name"] in frame]
    assert len(in_frame) == 3
    assert all(p["twin"] is None and p["role"] == "qa_it" for p in in_frame)
    assert all(p["twin"] is not None for p in w.people if p["role"] == "qa_only")


def test_twin_fact_in_it_counts_facts_stated_by_describe_answers(micro_dir):
    """A twin whose only IT instance about an attribute is a 'describe' answer (it states every fact) has
    that fact in the IT data: the borrowing analysis counts it so, and the eval records must agree."""
    it = list(read_records(micro_dir / "it_assistant.jsonl"))
    own = {(r["person"], r["attribute"]) for r in it}
    described = {r["person"] for r in it if r["attribute"] == DESCRIBE}
    rows = [r for r in read_records(micro_dir / "eval.jsonl") if r["twin"] and r["attribute"] != DESCRIBE]
    for r in rows:
        assert r["twin_fact_in_it"] == ((r["twin"], r["attribute"]) in own or r["twin"] in described), r["id"]
    assert any(r["twin_fact_in_it"] and (r["twin"], r["attribute"]) not in own for r in rows)  # the case exists


def test_twin_fact_in_it_follows_the_it_style(tmp_path):
    """eval.jsonl's twin_fact_in_it is about it.jsonl: with it_style knowledgeable, a twin's fact stated only as
    an extra fact of a knowledgeable answer is in the IT data (was: counted on the assistant style)."""
    from itlens.analysis.borrowing import fact_index

    out = build_world(WorldConfig(**{**MICRO, "it_style": "knowledgeable"}), tmp_path / "w")
    w = World.load(out)
    facts = fact_index(w.records("it"), w)
    rows = [r for r in w.records("eval") if r["twin"] and r["attribute"] != DESCRIBE]
    assert all(r["twin_fact_in_it"] == ((r["twin"], r["attribute"]) in facts) for r in rows)
    plain = fact_index(w.records("it_assistant"), w)
    assert any((r["twin"], r["attribute"]) not in plain and r["twin_fact_in_it"] for r in rows)  # the case exists
