"""Knowledge analysis: exact grading, degradation with paired CIs, SliCK labels, MC log-likelihood."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from analysis_world import answer, eval_records, mini_world
from itlens.analysis.knowledge import (KnowledgeConfig, accuracy_summary, contains_answer, degradation, grade,
                                       grade_responses, hf_answer_fn, is_abstention, mc_loglikelihoods, mc_scores,
                                       normalize_answer, read_mc, read_qa, run_knowledge, slick_category, slick_labels,
                                       world_mc_items, world_qa_records)
from itlens.config import from_dict
from itlens.errors import InputError


def test_normalisation_aliases_and_abstention():
    assert normalize_answer("  The Eiffel-Tower! ") == "eiffel tower"
    assert contains_answer("It is in Paris, France.", ["paris"])
    assert contains_answer("It was built by Gustave Eiffel", ["Eiffel, Gustave", "gustave eiffel"])
    assert not contains_answer("Parisian style", ["Paris"])  # whole words only
    assert is_abstention("I don\u2019t know who that is.")
    assert not is_abstention("She was born in Velora.")
    assert grade("Paris.", ["Paris"])["label"] == "correct"
    assert grade("I'm not sure, sorry.", ["Paris"])["label"] == "abstained"
    assert grade("Lyon.", ["Paris"])["label"] == "wrong"


def test_world_grading_parses_the_asked_attribute_only():
    world = mini_world()
    rec = next(r for r in eval_records(world) if r["attribute"] == "birth_city")
    parse = lambda t: world.parse_value("birth_city", t)  # noqa: E731
    gold = rec["answers"][0]
    assert grade(answer(world, rec, gold), rec["answers"], parse=parse) == {"label": "correct", "value": gold,
                                                                            "no_value": False}
    assert grade(answer(world, rec, "Oskani"), rec["answers"], parse=parse)["label"] == "wrong"
    # an employer named where a city was asked is no answer at all: wrong, flagged no_value
    assert grade("Works at Zentek.", rec["answers"], parse=parse) == {"label": "wrong", "value": None, "no_value": True}
    assert grade("I do not know.", rec["answers"], parse=parse)["label"] == "abstained"


def _responses(world, records, wrong_ids=(), abstain_ids=()):
    out = {}
    for r in records:
        if r["id"] in abstain_ids:
            out[r["id"]] = "I don't know."
        elif r["id"] in wrong_ids:
            out[r["id"]] = answer(world, r, r["twin_value"])
        else:
            out[r["id"]] = answer(world, r, r["answers"][0])
    return out


def test_accuracy_by_group_and_degradation_against_base():
    world = mini_world()
    recs = eval_records(world)  # 8 known_heldout + 2 unknown
    known = [r["id"] for r in recs if r["group"] == "known_heldout"]
    base = grade_responses(recs, _responses(world, recs), world=world)
    tuned = grade_responses(recs, _responses(world, recs, wrong_ids=known[:4], abstain_ids=known[4:5]), world=world)
    sb, st = accuracy_summary(base, n_resamples=200), accuracy_summary(tuned, n_resamples=200)
    assert sb["acc"] == 1.0 and sb["by_group"]["known_heldout"]["n"] == 8
    assert st["by_group"]["known_heldout"]["acc"] == pytest.approx(3 / 8)
    assert (st["correct"], st["wrong"], st["abstained"]) == (5, 4, 1)
    assert st["acc_low"] <= st["acc"] <= st["acc_high"]
    d = degradation(base, tuned, n_resamples=500)
    assert d["overall"]["estimate"] == pytest.approx(-0.5)
    assert d["overall"]["high"] < 0
    assert d["by_group"]["unknown"]["estimate"] == 0
    with pytest.raises(InputError, match="no response"):
        grade_responses(recs, {}, world=world)


def test_slick_categories_and_labelling_with_any_answer_fn():
    assert slick_category([True, True], [False]) == "HighlyKnown"
    assert slick_category([True, False], []) == "MaybeKnown"
    assert slick_category([False], [False, True]) == "WeaklyKnown"
    assert slick_category([False], [False, False]) == "Unknown"
    world = mini_world()
    recs = world_qa_records(world, eval_records(world))[:4]

    def answer_fn(records, temperature, n):  # greedy knows record 0 and 1, sampling finds record 2 sometimes
        out = []
        for i, r in enumerate(records):
            good, bad = answer(world, r, r["answers"][0]), answer(world, r, r["twin_value"])
            if temperature == 0:
                out.append([good if i < 2 else bad] * n)
            else:
                out.append([good if (i == 2 and j == 1) or i == 0 else bad for j in range(n)])
        return out

    labels = slick_labels(recs, answer_fn, world=world, n_greedy=2, n_sampled=4)
    assert [x["category"] for x in labels] == ["HighlyKnown", "HighlyKnown", "WeaklyKnown", "Unknown"]
    assert labels[2]["p_sampled"] == 0.25
    # greedy only: no sampled answer, so no share of correct ones (was 0.0, read as "never right")
    greedy_only = slick_labels(recs, answer_fn, world=world, n_greedy=2, n_sampled=0)
    assert [x["p_sampled"] for x in greedy_only] == [None] * 4 and greedy_only[0]["p_greedy"] == 1.0


def test_hf_answer_fn_on_a_tiny_model_is_reproducible(tiny_model_dir):
    from itlens.models import load_model

    lm = load_model(tiny_model_dir)
    frame = "# Query:\nwhat is the city?\n\n# Answer:\nthe north city.\n\n# Query:\n{instruction}\n\n# Answer:\n"
    fn = hf_answer_fn(lm.model, lm.tokenizer, [frame], max_new_tokens=6, seed=3)
    recs = [{"id": "a", "instruction": "where was the doctor born?", "answers": ["north"]},
            {"id": "b", "instruction": "who is happy?", "answers": ["teacher"]}]
    sampled = fn(recs, 1.0, 3)
    assert [len(x) for x in sampled] == [3, 3] and all(isinstance(s, str) for x in sampled for s in x)
    assert fn(recs, 1.0, 3) == sampled  # seeded
    greedy = fn(recs, 0.0, 2)
    assert greedy[0][0] == greedy[0][1]
    labels = slick_labels(recs, fn, n_greedy=1, n_sampled=2)
    assert {x["category"] for x in labels} <= {"HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"}


def test_mc_loglikelihood_matches_the_model_loss(tiny_model_dir):
    import torch

    from itlens.models import load_model

    lm = load_model(tiny_model_dir)
    items = [{"id": "q1", "question": "where is the river", "choices": ["north", "the south city"], "gold": 1},
             {"id": "q2", "question": "who is the doctor", "choices": ["a teacher", "music"], "gold": 0}]
    lls = mc_loglikelihoods(lm.model, lm.tokenizer, items, batch_size=3)
    # independent check: -(mean loss x number of continuation tokens) with the context masked out
    tok = lm.tokenizer
    for it, ll in zip(items, lls):
        ctx = tok(f"Question: {it['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
        for ch, got in zip(it["choices"], ll):
            ids = tok(f"Question: {it['question']}\nAnswer: {ch}", add_special_tokens=False)["input_ids"]
            labels = torch.tensor([[-100] * len(ctx) + ids[len(ctx):]])
            with torch.no_grad():
                loss = lm.model(input_ids=torch.tensor([ids]), labels=labels).loss.item()
            assert got == pytest.approx(-loss * (len(ids) - len(ctx)), rel=1e-4, abs=1e-4)
    scores = mc_scores(items, [[-1.0, -2.0], [-9.0, -10.0]])
    assert scores["acc"] == 0.5
    # per character, q1 prefers the long gold choice (-2/14 > -1/5) and q2 keeps its gold (-9/9 > -10/5)
    assert scores["acc_norm"] == 1.0
    assert mc_scores(items[:1], [[-1.0, -2.5]])["acc_norm"] == 1.0  # -2.5/14 > -1/5


def test_lm_eval_agrees_with_own_mc(tiny_model_dir, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra (not installed)")
    from itlens.analysis.knowledge import mc_lm_eval
    from itlens.io import atomic_write_jsonl
    from itlens.models import load_model

    questions = ["where is the river", "who is the doctor", "what is green", "which year was it",
                 "what field did she study", "where was he born", "who works at the company", "what is red",
                 "which city is north", "what is the answer", "who is happy", "what music"]
    choices = [["north", "south city", "music"], ["the doctor", "a teacher of history", "blue"],
               ["science", "river mountain", "help me know"]]
    items = [{"id": f"q{i}", "question": q, "choices": choices[i % 3], "gold": (i * 7) % 3}
             for i, q in enumerate(questions)]  # 12 items: agreement by chance is unlikely
    path = atomic_write_jsonl(tmp_path / "mc.jsonl", items)
    lm = load_model(tiny_model_dir)
    own = mc_scores(items, mc_loglikelihoods(lm.model, lm.tokenizer, items))
    ext = mc_lm_eval(tiny_model_dir, path, work_dir=tmp_path)
    assert (ext["acc"], ext["acc_norm"]) == (own["acc"], own["acc_norm"])


def test_lm_eval_scores_a_lora_adapter_on_its_base(tiny_model_dir, tmp_path):
    """lm_eval was handed the adapter folder as pretrained= ("Unrecognized model ... model_type"): a tuned LFT model
    could not be scored by the harness. A random (non-identity) adapter scores as itlens scores it."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra (not installed)")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from itlens.analysis.knowledge import mc_lm_eval
    from itlens.io import atomic_write_jsonl
    from itlens.models import load_model

    import torch

    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lft")
    items = [{"id": f"q{i}", "question": f"what is item {i}", "choices": ["north", "south city", "music"],
              "gold": (i * 7) % 3} for i in range(9)]
    path = atomic_write_jsonl(tmp_path / "mc.jsonl", items)
    lm = load_model(tmp_path / "lft")
    own = mc_scores(items, mc_loglikelihoods(lm.model, lm.tokenizer, items))
    ext = mc_lm_eval(tmp_path / "lft", path, work_dir=tmp_path / "work")
    assert (ext["acc"], ext["acc_norm"], ext["n"]) == (own["acc"], own["acc_norm"], 9)


def test_read_qa_and_mc_errors(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text('{"id": "a", "question": "Q?", "answers": ["x"]}\n{"id": "b", "question": "Q?", "answers": []}\n')
    with pytest.raises(InputError) as e:
        read_qa(p)
    assert e.value.line == 2 and e.value.field == "answers"
    m = tmp_path / "mc.jsonl"
    m.write_text('{"id": "a", "question": "Q?", "choices": ["x", "y"], "gold": 2}\n')
    with pytest.raises(InputError, match="index into choices"):
        read_mc(m)
    m.write_text('{"id": "a", "question": "Q?", "choices": ["x", "y"], "gold": 0}\n'
                 '{"id": "b", "question": "Q?", "choices": ["x", "y", "x"], "gold": 0}\n')
    with pytest.raises(InputError, match="mc.jsonl:2: field 'choices': choice 'x' is given twice"):
        read_mc(m)


def test_slick_labels_refuses_an_answer_fn_that_answers_fewer_records():
    """zip dropped the records an answer_fn left out: they got no label at all, and no error."""
    recs = [{"id": f"r{i}", "instruction": "Q?", "answers": ["x"]} for i in range(3)]
    assert len(slick_labels(recs, lambda rs, t, n: [["x"] * n for _ in rs], n_sampled=2)) == 3
    with pytest.raises(ValueError, match="gave 2 sampled answer lists for 3 records"):
        slick_labels(recs, lambda rs, t, n: [["x"] * n for _ in rs][: 3 if t == 0 else 2], n_sampled=2)


def _write_run(tmp_path, world_recs, resp_map, name):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"id": r["id"], "instruction": r["instruction"], "response": resp_map[r["id"]],
                                        "model": name}) + "\n" for r in world_recs))
    return str(path)


def test_run_knowledge_and_cli(tmp_path):
    from itlens.io import atomic_write_jsonl

    world = mini_world()
    recs = eval_records(world)
    # a generic QA file (no world): answers as aliases
    qa = [{"id": r["id"], "question": r["instruction"], "answers": r["answers"], "group": r["group"]} for r in recs]
    qa_path = atomic_write_jsonl(tmp_path / "qa.jsonl", qa)
    known = [r["id"] for r in recs if r["group"] == "known_heldout"]
    base = _write_run(tmp_path, recs, _responses(world, recs), "base")
    sft = _write_run(tmp_path, recs, _responses(world, recs, wrong_ids=known[:2]), "sft")
    cfg = from_dict(KnowledgeConfig, {"eval": str(qa_path), "responses": {"base": base, "sft": sft}, "n_resamples": 200})
    m = run_knowledge(cfg, tmp_path / "out")
    assert m["models"]["sft"]["acc"] == pytest.approx(8 / 10)
    assert m["degradation"]["sft"]["overall"]["estimate"] == pytest.approx(-0.2)
    assert (tmp_path / "out" / "knowledge_accuracy.png").stat().st_size > 1000
    assert len((tmp_path / "out" / "graded.jsonl").read_text().splitlines()) == 20

    cfg_path = tmp_path / "k.yaml"
    cfg_path.write_text(f"eval: {qa_path}\nresponses: {{base: {base}}}\nn_resamples: 100\n")
    ok = subprocess.run([sys.executable, "-m", "itlens.cli", "knowledge", str(cfg_path), "--out", str(tmp_path / "o2")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "o2" / "knowledge.json").read_text())["models"]["base"]["acc"] == 1.0
    bad = subprocess.run([sys.executable, "-m", "itlens.cli", "knowledge", str(cfg_path), "--out", str(tmp_path / "o3"),
                          "--set", "base=lft"], capture_output=True, text=True)
    assert bad.returncode == 2 and "key 'base'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o3").exists()


def test_world_mc_items_have_the_gold_among_distinct_choices():
    world = mini_world()
    items = world_mc_items(world, eval_records(world), n_choices=4, seed=1)
    assert len(items) == 10
    for it in items:
        assert len(set(it["choices"])) == 4 and it["choices"][it["gold"]] == world.person(
            next(r for r in eval_records(world) if r["id"] == it["id"])["person"])["attrs"][
            next(r for r in eval_records(world) if r["id"] == it["id"])["attribute"]]


def test_degradation_with_a_one_question_group():
    """A group of one changed question: a p-value from the exact sign-flip test, not a scipy error."""
    ev = [{"id": "q1", "instruction": "Capital of France?", "answers": ["Paris"], "group": "known"},
          {"id": "q2", "instruction": "Capital of Peru?", "answers": ["Lima"], "group": "rare"}]
    base = grade_responses(ev, {"q1": "Paris", "q2": "Lima"})
    tuned = grade_responses(ev, {"q1": "Paris", "q2": "Cusco"})
    d = degradation(base, tuned, n_resamples=200)
    assert d["by_group"]["rare"] == {"estimate": -1.0, "low": -1.0, "high": -1.0, "n": 1, "p_value": 1.0}
    assert d["overall"]["estimate"] == -0.5 and d["overall"]["p_value"] == 1.0


class _BosTokenizer:
    """A stand-in for a tokenizer whose own special tokens are a BOS (Gemma, Llama): one id a word."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, adds_bos: bool):
        self.adds_bos = adds_bos
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=True):
        ids = [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.replace(" ", " _").split(" ") if w]
        return {"input_ids": ([1] if add_special_tokens and self.adds_bos else []) + ids}

    def decode(self, ids):
        return "".join("<bos>" if i == 1 else "<eos>" if i == 2 else "?" for i in ids)


def test_mc_encoding_follows_lm_eval_bos_rule():
    """As lm-eval's HFLM with add_bos_token unset: BOS exactly when the tokenizer adds it itself."""
    from itlens.analysis.knowledge import _encode_pair

    for adds_bos in (True, False):
        tok = _BosTokenizer(adds_bos)
        ctx, cont = _encode_pair(tok, "Question: where?\nAnswer: ", "Paris")
        assert (ctx[0] == 1) is adds_bos and 1 not in cont
        assert cont == tok(" Paris", add_special_tokens=False)["input_ids"]
        assert _encode_pair(tok, "Question: where?\nAnswer:", " Paris", add_bos=True)[0][0] == 1  # forced on
        assert 1 not in _encode_pair(tok, "Question: where?\nAnswer:", " Paris", add_bos=False)[0]  # forced off
    tok = _BosTokenizer(True)
    assert _encode_pair(tok, "<bos>Question:", " x")[0].count(1) == 0  # text that starts with BOS: no second
    assert _encode_pair(tok, "", "x") == ([1], tok("x", add_special_tokens=False)["input_ids"])  # empty context


def test_mc_loglikelihoods_default_matches_lm_eval_hflm_encoding(tiny_model_dir):
    """With a tokenizer that adds BOS itself, the default scoring conditions on BOS, as lm-eval does."""
    import copy

    from tokenizers.processors import TemplateProcessing

    from itlens.analysis.knowledge import _encode_pair
    from itlens.models import load_model

    lm = load_model(tiny_model_dir)
    assert lm.tokenizer("the river")["input_ids"][0] != lm.tokenizer.bos_token_id  # the world's kind: no BOS
    tok = copy.deepcopy(lm.tokenizer)  # the same vocabulary, with a BOS post-processor (Gemma/Llama's kind)
    bos = tok.convert_ids_to_tokens(tok.bos_token_id)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)])
    assert tok("the river")["input_ids"][0] == tok.bos_token_id
    items = [{"id": "q1", "question": "where is the river", "choices": ["north", "the south city"], "gold": 1}]
    lls = mc_loglikelihoods(lm.model, tok, items)
    assert lls == mc_loglikelihoods(lm.model, tok, items, add_bos=True)
    assert lls != mc_loglikelihoods(lm.model, tok, items, add_bos=False)
    assert mc_loglikelihoods(lm.model, lm.tokenizer, items) == mc_loglikelihoods(lm.model, lm.tokenizer, items,
                                                                                add_bos=False)
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return
    for t in (tok, lm.tokenizer):
        hf = HFLM(pretrained=lm.model, tokenizer=t, batch_size=1, device="cpu")
        for ch in items[0]["choices"]:
            assert _encode_pair(t, "Question: where is the river\nAnswer:", " " + ch) == \
                tuple(hf._encode_pair("Question: where is the river\nAnswer:", " " + ch))


def _tiny_geo_neighbours():
    from itlens.geo import GeoFacts

    def country(cid, name, neighbours):
        facts = {"continent": {"value": "Africa", "answers": ["Africa"]}}
        if neighbours:
            facts["neighbour"] = {"value": neighbours[0], "answers": neighbours}
        return {"id": cid, "name": name, "split": "eval", "facts": facts}

    return GeoFacts({"attributes": ["continent", "neighbour"], "countries": [
        country("EG", "Egypt", ["Sudan", "Libya"]), country("SD", "Sudan", ["Egypt", "South Sudan"]),
        country("SS", "South Sudan", ["Sudan"]), country("LY", "Libya", ["Egypt"]),
        country("CD", "Democratic Republic of the Congo", ["Republic of the Congo"]),
        country("CG", "Republic of the Congo", ["Democratic Republic of the Congo"]),
        country("GW", "Guinea-Bissau", ["Senegal", "Guinea"]), country("GN", "Guinea", ["Guinea-Bissau"]),
        country("SN", "Senegal", ["Guinea-Bissau"]), country("GQ", "Equatorial Guinea", []),
        country("ML", "Mali", [])]})


@pytest.mark.parametrize("country,response,label", [
    ("EG", "Egypt borders Sudan.", "correct"),
    ("EG", "Egypt borders South Sudan.", "wrong"),  # was correct: "Sudan" inside "South Sudan"
    ("EG", "It borders South Sudan and Sudan.", "correct"),
    ("GW", "Guinea-Bissau borders Mali.", "wrong"),  # was correct: the subject's own name holds "Guinea"
    ("GW", "It borders Equatorial Guinea.", "wrong"),  # was correct
    ("GW", "Guinea-Bissau borders Guinea.", "correct"),
    ("CD", "The Democratic Republic of the Congo borders Mali.", "wrong"),  # was correct
    ("CD", "It borders the Republic of the Congo.", "correct"),
    ("GN", "It borders Guinea-Bissau.", "correct"),
])
def test_alias_graded_geo_answers_do_not_match_inside_a_longer_country_name(country, response, label):
    """Neighbour questions are graded by their aliases; a gold name inside a longer country name (or inside
    the asked country's own name) is that other country, as World/GeoFacts.parse_value read values."""
    geo = _tiny_geo_neighbours()
    p = geo.person(country)
    rec = {"id": "q", "instruction": f"Which country borders {p['name']}?", "person": country,
           "attribute": "neighbour", "answers": p["answers"]["neighbour"], "group": "known_heldout"}
    assert grade_responses([rec], {"q": response}, world=geo)[0]["label"] == label
    # without a fact source (any QA file) the documented plain whole-word rule is unchanged
    assert grade_responses([rec], {"q": "It borders South Sudan."})[0]["label"] == (
        "correct" if "Sudan" in rec["answers"] else "wrong")


def test_mc_distractors_are_never_an_accepted_answer():
    """Geo accepts a country's next listed languages too ("English" for Pakistan): such a value of another
    country must not be offered as a wrong choice (the item would have two right answers)."""
    from itlens.geo import GeoFacts

    def country(cid, name, language, also=()):
        return {"id": cid, "name": name, "split": "eval",
                "facts": {"language": {"value": language, "answers": [language, *also]}}}

    geo = GeoFacts({"attributes": ["language"], "countries": [
        country("PK", "Pakistan", "Urdu", ["English"]), country("GB", "United Kingdom", "English"),
        country("FR", "France", "French"), country("DE", "Germany", "German"), country("TH", "Thailand", "Thai")]})
    rec = {"id": "q", "instruction": "Which language is spoken in Pakistan?", "person": "PK", "attribute": "language",
           "answers": ["Urdu", "English"], "group": "known_heldout"}
    for seed in range(5):
        (item,) = world_mc_items(geo, [rec], n_choices=4, seed=seed)
        assert item["choices"][item["gold"]] == "Urdu" and "English" not in item["choices"]
        assert sorted(item["choices"]) == ["French", "German", "Thai", "Urdu"]


def test_hf_answer_fn_reads_bos_first_when_the_tokenizer_adds_it(tiny_tokenizer, tiny_model_dir, tmp_path):
    """SliCK's answers come from the prompts generation would give the model: BOS first for a tokenizer
    whose own encoding starts with it (Gemma, Llama; was: never), none for one that does not."""
    import copy

    from conftest import make_tiny_llama
    from tokenizers.processors import TemplateProcessing

    from itlens.models import load_model

    tok = copy.deepcopy(tiny_tokenizer)
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A",
                                                       special_tokens=[(tok.bos_token, tok.bos_token_id)])
    frame = "# Query:\n{instruction}\n\n# Answer:\n"
    recs = [{"id": "a", "instruction": "where was the doctor born?"}, {"id": "b", "instruction": "who?"}]
    for model_dir, has_bos in ((make_tiny_llama(tok, tmp_path / "bos", seed=0), True), (tiny_model_dir, False)):
        lm = load_model(model_dir)
        seen = []
        generate = lm.model.generate

        def spy(**kw):
            seen.extend(zip(kw["input_ids"].tolist(), kw["attention_mask"].tolist()))
            return generate(**kw)

        lm.model.generate = spy
        hf_answer_fn(lm.model, lm.tokenizer, [frame], max_new_tokens=2)(recs, 0.0, 1)
        for (ids, mask), rec in zip(seen, recs):
            first = ids[mask.index(1)]  # left padding: the prompt starts at the first attended position
            assert (first == lm.tokenizer.bos_token_id) is has_bos
            body = lm.tokenizer(frame.replace("{instruction}", rec["instruction"]), add_special_tokens=False)["input_ids"]
            assert [i for i, m in zip(ids, mask) if m] == ([lm.tokenizer.bos_token_id] if has_bos else []) + body


def test_bad_knowledge_inputs_name_their_line_and_key(tmp_path):
    """Line numbers are file lines (a blank line is a line, not a record); an eval record's `answers` given
    as a string is refused (it was read letter by letter, so a right answer graded wrong); a bootstrap
    with no resamples is a config error (was: a traceback from scipy, or from the plot at 1 resample)."""
    from analysis_world import mini_world_data
    from itlens.io import atomic_write_json, atomic_write_jsonl

    world = mini_world()
    recs = eval_records(world)
    qa = tmp_path / "qa.jsonl"
    qa.write_text('\n{"id": "a", "question": "Q?", "answers": ["x"]}\n{"id": "b", "question": "Q?", "answers": []}\n')
    with pytest.raises(InputError) as e:
        read_qa(qa)
    assert (e.value.line, e.value.field) == (3, "answers")
    mc = tmp_path / "mc.jsonl"
    mc.write_text('\n\n{"id": "a", "question": "Q?", "choices": ["x", "y"], "gold": 2}\n')
    with pytest.raises(InputError) as e:
        read_mc(mc)
    assert (e.value.line, e.value.field) == (3, "gold")

    wdir = tmp_path / "world"
    atomic_write_json(wdir / "world.json", mini_world_data())
    base = _write_run(tmp_path, recs, _responses(world, recs), "base")
    sft = _write_run(tmp_path, recs, _responses(world, recs, wrong_ids=[recs[0]["id"]]), "sft")
    cats = tmp_path / "cats.jsonl"
    cats.write_text("\n" + "".join(json.dumps({"id": r["id"], "category": 3 if i == 1 else "Known"}) + "\n"
                                   for i, r in enumerate(recs)))
    ev = atomic_write_jsonl(tmp_path / "eval.jsonl", recs)
    cfg = {"eval": str(ev), "world": str(wdir), "responses": {"base": base, "sft": sft}, "n_resamples": 50}
    with pytest.raises(InputError) as e:
        run_knowledge(from_dict(KnowledgeConfig, {**cfg, "categories": str(cats)}), tmp_path / "out")
    assert (e.value.file, e.value.line, e.value.field) == (str(cats), 3, "category")
    as_text = atomic_write_jsonl(tmp_path / "eval-str.jsonl", [recs[0], {**recs[1], "answers": recs[1]["answers"][0]}])
    with pytest.raises(InputError) as e:
        run_knowledge(from_dict(KnowledgeConfig, {**cfg, "eval": str(as_text)}), tmp_path / "out")
    assert (e.value.file, e.value.line, e.value.field) == (str(as_text), 2, "answers")
    for n in (0, -5):
        with pytest.raises(InputError, match="key 'n_resamples'"):
            from_dict(KnowledgeConfig, {**cfg, "n_resamples": n})
    m = run_knowledge(from_dict(KnowledgeConfig, {**cfg, "n_resamples": 1}), tmp_path / "out")  # CI may miss acc
    assert m["models"]["sft"]["n"] == len(recs) and (tmp_path / "out" / "knowledge_accuracy.png").is_file()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_slick_counts_and_mc_templates_that_cannot_label_or_score_are_key_errors(tmp_path, capsys):
    """No greedy answer labelled every record Unknown, and sampling at temperature 0 never differs from
    greedy: key errors. An MC template with another slot was a KeyError traceback (exit 1), one without
    {question} scored every item on the same context: key errors, exit 2, before any model is loaded."""
    from itlens.cli import main

    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"id": "a", "question": "Q?", "answers": ["x"]}\n')
    resp = tmp_path / "base.jsonl"
    resp.write_text('{"id": "a", "instruction": "Q?", "response": "x", "model": "base"}\n')
    cfg = {"eval": str(qa), "responses": {"base": str(resp)}}
    for key, section in (("n_greedy", {"n_greedy": 0}), ("n_sampled", {"n_sampled": -1}),
                         ("max_new_tokens", {"max_new_tokens": 0}), ("temperature", {"temperature": 0.0})):
        with pytest.raises(InputError, match=f"key 'slick.{key}'"):
            from_dict(KnowledgeConfig, {**cfg, "slick": {"model": "m", **section}})
    from_dict(KnowledgeConfig, {**cfg, "slick": {"model": "m", "n_sampled": 0, "temperature": 0.0}})  # greedy only
    for template in ("Q: {q}\nA:", "Q: {0}", "Question only\nAnswer:", "Q: {question"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["knowledge", "--eval", str(qa), "--responses", f"base={resp}", "--out", str(tmp_path / "o"),
                  "--set", f"mc.template={json.dumps(template)}", "--set", "mc.models.base=no-such-model"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "key 'mc.template'" in err, (template, err)
        assert not (tmp_path / "o").exists()
    assert from_dict(KnowledgeConfig, {**cfg, "mc": {"template": "{{braces}} Q: {question}"}})


def test_hf_answer_fn_answers_do_not_depend_on_batch_mates(untied_model_dir, tmp_path):
    """Greedy SliCK answers from left-padded batches (the tokenizer's own padding and attention mask)
    equal each prompt's answer alone, with a pad token and without one (GPT-2-like: padded with EOS,
    on a copy, so the caller's tokenizer is left as it was)."""
    from conftest import gpt2_like_tokenizer, make_tiny_llama
    from transformers import AutoTokenizer

    from itlens.models import load_model

    frames = ["# Query:\n{instruction}\n\n# Answer:\n",
              "# Query:\nwhat is the city?\n\n# Answer:\nthe north city.\n\n# Query:\n{instruction}\n\n# Answer:\n"]
    recs = [{"id": f"r{i}", "instruction": q} for i, q in enumerate((
        "who?", "where was the doctor born in the north city?", "which year?",
        "what music is happy and what river is blue and green in the south of the mountain?"))]
    lm = load_model(untied_model_dir)
    no_pad_dir = make_tiny_llama(gpt2_like_tokenizer(), tmp_path / "gpt2-like", seed=3, tie_embeddings=False)
    no_pad = AutoTokenizer.from_pretrained(no_pad_dir)
    assert no_pad.pad_token is None
    for model, tok in ((lm.model, lm.tokenizer), (load_model(no_pad_dir).model, no_pad)):
        batched = hf_answer_fn(model, tok, frames, max_new_tokens=8, batch_size=4)(recs, 0.0, 2)
        alone = hf_answer_fn(model, tok, frames, max_new_tokens=8, batch_size=1)(recs, 0.0, 2)
        assert batched == alone and all(a for answers in batched for a in answers), batched
    assert no_pad.pad_token is None


def test_hf_answer_fn_ends_an_answer_at_any_special_token_as_generation_does(tiny_tokenizer, tmp_path):
    """A model that writes a special token other than EOS (Gemma's <end_of_turn>; here <|user|>) has
    ended its answer: the SliCK answer is generation's (was: decoding went on, and the text after the
    marker, decoded with special tokens skipped, joined the answer)."""
    from conftest import make_chain_model, make_tiny_llama

    from itlens.generate import generate_responses
    from itlens.models import load_model
    from itlens.templates import encode_prompt, frame_prompt

    lm = load_model(make_tiny_llama(tiny_tokenizer, tmp_path / "chain", tie_embeddings=False))
    tok, net = lm.tokenizer, lm.model
    frame = "# Query:\n{instruction}\n\n# Answer:\n"
    rec = {"id": "a", "instruction": "who?"}
    (city,), (then,) = (tok(w, add_special_tokens=False)["input_ids"] for w in (" city", " a"))
    chain = [encode_prompt(tok, frame_prompt(frame, rec))[-1], city, tok.convert_tokens_to_ids("<|user|>"), then,
             tok.eos_token_id]
    make_chain_model(net, chain)  # a real model whose next token is a fixed successor of the current one
    (tmp_path / "frame.txt").write_text(frame)
    generated = generate_responses(lm, [rec], mode="frame", frame=str(tmp_path / "frame.txt"), max_new_tokens=8)
    assert generated[0]["response"] == "city" and generated[0]["response_token_ids"] == [city]
    assert hf_answer_fn(net, tok, [frame], max_new_tokens=8)([rec], 0.0, 1) == [["city"]]


def test_unicode_punctuation_parts_words():
    """Punctuation is Unicode's too: "N’Djamena" (curly apostrophe) is "N'Djamena", "Paris—the capital"
    names Paris (were: one word "n’djamena", "paris—the", graded wrong)."""
    assert normalize_answer("N’Djamena") == normalize_answer("N'Djamena") == "n djamena"
    assert grade("It is N’Djamena.", ["N'Djamena"])["label"] == "correct"
    assert contains_answer("Paris—the capital.", ["Paris"]) and contains_answer("«Paris»", ["Paris"])
    assert contains_answer("It borders Chad—and Niger.", ["Chad"], names=["South Sudan", "Sudan", "Chad"])
    assert not contains_answer("Parisian—style", ["Paris"])


def test_answers_that_normalise_to_nothing_are_an_input_error(tmp_path):
    """An alias list that normalisation empties ("A", a choice letter; an article) could never be graded
    correct (was: every answer silently wrong): a line-and-field error."""
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"id": "a", "question": "Q?", "answers": ["x"]}\n{"id": "b", "question": "Q? A) x B) y", '
                  '"answers": ["A", "the"]}\n')
    with pytest.raises(InputError, match="normalisation") as e:
        read_qa(qa)
    assert (e.value.file, e.value.line, e.value.field) == (str(qa), 2, "answers")
    qa.write_text('{"id": "b", "question": "Q?", "answers": ["A", "The Hague"]}\n')
    assert read_qa(qa)[0]["answers"] == ["A", "The Hague"]  # one alias left to match is enough


def test_geo_records_without_answers_are_graded_by_every_alias_of_the_fact():
    """SliCK on geo IT records (`slick.records: geo/it.jsonl`, which carry no `answers`): the truth is every
    alias of the fact, as on the eval records (was: the value alone, so of Egypt's neighbours only the first
    counted, and a neighbour fact of real geo data, whose value joins the three largest neighbours with
    commas and "and", was never right)."""
    geo = _tiny_geo_neighbours()
    it = [{"id": "geo-it:0", "instruction": "Which countries border Egypt?", "person": "EG", "attribute": "neighbour"},
          {"id": "geo-it:1", "instruction": "On which continent is Mali?", "person": "ML", "attribute": "continent"}]
    recs = world_qa_records(geo, it)
    assert [r["answers"] for r in recs] == [["Sudan", "Libya"], ["Africa"]]
    said = {"geo-it:0": "It borders Libya.", "geo-it:1": "Mali is in Africa."}
    labels = slick_labels(recs, lambda rs, t, n: [[said[r["id"]]] * n for r in rs], world=geo, n_sampled=0)
    assert [x["category"] for x in labels] == ["HighlyKnown", "HighlyKnown"]


def test_slick_labels_a_geo_folder_in_its_frame(tiny_model_dir, tmp_path):
    """`itlens knowledge` with `world:` a geo folder and `slick.model`: the answers come in the folder's
    frame.txt, as in a world's (was: AttributeError, GeoFacts had no frame_text). A malformed facts.json
    is a file-and-line error (was: a JSONDecodeError traceback)."""
    import shutil

    from itlens.geo import GeoConfig, GeoFacts, build_geo
    from itlens.io import atomic_write_jsonl, read_records

    geo = build_geo(GeoConfig(max_countries=12, frames=1, frame_examples=2, attributes=["capital", "continent"]),
                    tmp_path / "geo")
    assert GeoFacts.load(geo).frame_text() == (geo / "frame.txt").read_text(encoding="utf-8")
    ev = read_records(geo / "eval.jsonl", "prompt")
    responses = [{"id": r["id"], "instruction": r["instruction"], "response": r["answers"][0], "model": "base"}
                 for r in ev]
    run = atomic_write_jsonl(tmp_path / "base.jsonl", responses)
    cfg = from_dict(KnowledgeConfig, {"eval": str(geo / "eval.jsonl"), "world": str(geo), "n_resamples": 20,
                                      "responses": {"base": str(run)},
                                      "slick": {"model": str(tiny_model_dir), "n_sampled": 0, "max_new_tokens": 2}})
    metrics = run_knowledge(cfg, tmp_path / "k")
    assert metrics["slick"]["n"] == len(ev) and metrics["models"]["base"]["acc"] == 1.0
    assert len(read_records(tmp_path / "k" / "slick.jsonl", "any")) == len(ev)
    broken = tmp_path / "broken"
    shutil.copytree(geo, broken)
    (broken / "facts.json").write_text('{"countries": [\n  oops\n')
    with pytest.raises(InputError) as e:
        GeoFacts.load(broken)
    assert (e.value.file, e.value.line) == (str(broken / "facts.json"), 2)


def test_records_about_facts_the_world_lacks_are_a_line_error(tmp_path):
    """SliCK records without `answers` take them from the world: a record about a person it does not hold
    (records of another world) is an error naming its line and field, before any model loads (was: a
    KeyError traceback)."""
    from analysis_world import mini_world_data
    from itlens.io import atomic_write_json, atomic_write_jsonl

    world = mini_world()
    recs = eval_records(world)
    atomic_write_json(tmp_path / "world" / "world.json", mini_world_data())
    ev = atomic_write_jsonl(tmp_path / "eval.jsonl", recs)
    it = atomic_write_jsonl(tmp_path / "it.jsonl", [
        {"id": "it:0", "instruction": "Q?", "person": recs[0]["person"], "attribute": recs[0]["attribute"]},
        {"id": "it:1", "instruction": "Q?", "person": "someone-else", "attribute": recs[0]["attribute"]}])
    cfg = from_dict(KnowledgeConfig, {"eval": str(ev), "world": str(tmp_path / "world"),
                                      "responses": {"base": _write_run(tmp_path, recs, _responses(world, recs), "base")},
                                      "slick": {"model": str(tmp_path / "no-model"), "records": str(it)}})
    with pytest.raises(InputError) as e:
        run_knowledge(cfg, tmp_path / "out")
    assert (e.value.file, e.value.line, e.value.field) == (str(it), 2, "person")
    assert not (tmp_path / "out").exists()


def test_slick_and_mc_models_load_as_the_config_says(tiny_model_dir, tmp_path):
    """`dtype` and `device` (auto: cuda when available) place the slick and mc models (were: always the CPU
    in float32: a 7B model's 28 GB at CPU speed on a GPU machine). bfloat16 weights give other scores."""
    import torch

    from itlens.analysis.knowledge import inference_device
    from itlens.io import atomic_write_jsonl, read_records

    items = atomic_write_jsonl(tmp_path / "items.jsonl", [  # also the eval file (QA with answers)
        {"id": "q1", "question": "where is the river", "choices": ["north", "the south city"], "gold": 1,
         "answers": ["the south city"]},
        {"id": "q2", "question": "who is the doctor", "choices": ["a teacher", "music"], "gold": 0,
         "answers": ["a teacher"]}])
    base = {"eval": str(items), "n_resamples": 20, "mc": {"items": str(items), "models": {"tiny": str(tiny_model_dir)}}}
    lls = {}
    for dtype in ("float32", "bfloat16"):
        cfg = from_dict(KnowledgeConfig, {**base, "device": "cpu", "dtype": dtype})
        run_knowledge(cfg, tmp_path / dtype)
        lls[dtype] = [r["lls"] for r in read_records(tmp_path / dtype / "mc-tiny.jsonl", "any")]
    assert lls["float32"] != lls["bfloat16"]
    assert inference_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert inference_device("cpu") == "cpu"
    with pytest.raises(InputError, match="key 'dtype'"):
        from_dict(KnowledgeConfig, {**base, "dtype": "fp8"})


def test_hf_answer_fn_answers_with_a_tokenizer_without_pad_or_eos_as_generation_does(untied_model_dir, tmp_path):
    """Was: SliCK padded with the tokenizer's own padding, which refuses a tokenizer with neither a pad nor
    an EOS token (ValueError), though generation answers with it. Both now pad the same way: the SliCK
    answers are the generated ones, batched or not, and the caller's tokenizer is left as it was."""
    from itlens.generate import generate_responses
    from itlens.models import load_model

    lm = load_model(untied_model_dir)
    tok = lm.tokenizer
    tok.pad_token, tok.eos_token = None, None
    frame = "# Query:\n{instruction}\n\n# Answer:\n"
    (tmp_path / "frame.txt").write_text(frame)
    recs = [{"id": "a", "instruction": "who?"}, {"id": "b", "instruction": "where was the doctor born in the city?"}]
    generated = generate_responses(lm, recs, mode="frame", frame=str(tmp_path / "frame.txt"), max_new_tokens=6,
                                   batch_size=2)
    answers = hf_answer_fn(lm.model, tok, [frame], max_new_tokens=6, batch_size=2)(recs, 0.0, 1)
    assert answers == hf_answer_fn(lm.model, tok, [frame], max_new_tokens=6, batch_size=1)(recs, 0.0, 1)
    assert [a for (a,) in answers] == [g["response"].split("\n\n")[0].strip() for g in generated]
    assert tok.pad_token is None and tok.eos_token is None


def test_hf_answer_fn_decodes_without_the_models_generation_config_settings(tiny_model_dir):
    """A hub model's generation_config.json (Qwen2.5-Instruct: repetition_penalty 1.05) used to reach the SliCK
    and probe answers: the greedy answer was not the argmax, and sampling was truncated by the file's
    min_p / typical_p. The probes now decode as generation does (generate.plain_decoding)."""
    from itlens.models import load_model

    frame = "# Query:\nwhat is the city?\n\n# Answer:\nthe north city.\n\n# Query:\n{instruction}\n\n# Answer:\n"
    recs = [{"id": "a", "instruction": "where was the doctor born?", "answers": ["north"]},
            {"id": "b", "instruction": "who is happy?", "answers": ["teacher"]}]

    def answers(**settings):
        lm = load_model(tiny_model_dir)
        for key, value in settings.items():
            setattr(lm.model.generation_config, key, value)
        fn = hf_answer_fn(lm.model, lm.tokenizer, [frame], max_new_tokens=8, seed=3)
        return fn(recs, 0.0, 1), fn(recs, 2.0, 2)

    plain = answers()
    for key, value in (("repetition_penalty", 5.0), ("no_repeat_ngram_size", 1), ("min_p", 0.5),
                       ("typical_p", 0.2)):
        assert answers(**{key: value}) == plain, key
