"""Token distribution shift: the one-pass engine against brute force, AlignTDS's definitions on
hand-made lists, the LoRA disable-adapter path, aggregates, figures, the token view and the CLI."""

from __future__ import annotations

import json
import math
import os
import random
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import WORDS, make_tiny_llama
from itlens.analysis.token_shift import (ShiftConfig, compute_shift, paper_metrics, read_shift,
                                         sentence_split_kl, shift_class, summarize, token_counts, write_shift)
from itlens.errors import InputError
from itlens.templates import chat_prompt, frame_prompt, load_frame

torch.set_num_threads(1)
HYP = settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SHORT_FRAME = "# Query:\nwho was born in the city?\n\n# Answer:\nthe doctor.\n\n# Query:\n{instruction}\n\n# Answer:\n"


@pytest.fixture(scope="module")
def models(tiny_model_dir, tiny_model_dir_b):
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    b = AutoModelForCausalLM.from_pretrained(tiny_model_dir_b).eval()
    return a, b


@pytest.fixture(scope="module")
def frame_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("frame") / "frame.txt"
    p.write_text(SHORT_FRAME)
    return str(p)


def _records(seed: int, n: int, max_words: int = 12) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, max_words))]
        resp = " ".join(words).capitalize() + rng.choice([".", "!", ". Let me know."])
        out.append({"id": f"r{i}", "instruction": f"where is the {rng.choice(WORDS)}?", "response": resp,
                    "model": "tuned"})
    return out


def _brute_force(model, tokenizer, context_text: str, response: str):
    """AlignTDS's per-token loop: re-encode the growing context, one full forward per token."""
    ctx = tokenizer(context_text)["input_ids"]
    resp = tokenizer(response, add_special_tokens=False)["input_ids"]
    logits = []
    with torch.no_grad():
        for i in range(len(resp)):
            ids = torch.tensor([ctx + resp[:i]])
            logits.append(model(input_ids=ids).logits[0, -1].float())
    return resp, torch.stack(logits)


# ------------------------------------------------------------------------------ exact vs brute force
@HYP
@given(seed=st.integers(0, 10_000), base_context=st.sampled_from(["frame", "template"]),
       batch_size=st.integers(1, 4))
def test_exact_ranks_equal_brute_force(models, tiny_tokenizer, frame_file, seed, base_context, batch_size):
    base, tuned = models
    recs = _records(seed, 3)
    res = compute_shift(base, tuned, recs, tokenizer=tiny_tokenizer, base_context=base_context,
                        frame=frame_file, batch_size=batch_size)
    frame = load_frame(frame_file)
    for rec in recs:
        rows = res.tokens[res.tokens["id"] == rec["id"]]
        tctx = chat_prompt(tiny_tokenizer, rec)
        bctx = tctx if base_context == "template" else frame_prompt(frame, rec)
        ids, zt = _brute_force(tuned, tiny_tokenizer, tctx, rec["response"])
        ids_b, zb = _brute_force(base, tiny_tokenizer, bctx, rec["response"])
        assert ids == ids_b == rows["token_id"].tolist()
        o = torch.tensor(ids)[:, None]
        rank = (zb > zb.gather(1, o)).sum(-1) + 1
        assert rows["rank_base"].tolist() == rank.tolist()
        lpb, lpt = torch.log_softmax(zb, -1), torch.log_softmax(zt, -1)
        np.testing.assert_allclose(rows["p_base"], lpb.gather(1, o)[:, 0].exp(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(rows["p_tuned"], lpt.gather(1, o)[:, 0].exp(), rtol=1e-4, atol=1e-7)
        kl = (lpt.exp() * (lpt - lpb)).sum(-1)
        np.testing.assert_allclose(rows["kl"], kl, rtol=1e-3, atol=1e-6)
        assert (rows["kl"] >= 0).all()
        top1 = zt.argmax(-1)
        assert rows["rank0_paper"].tolist() == (zb > zb.gather(1, top1[:, None])).sum(-1).tolist()
        assert rows["shift_class"].tolist() == shift_class(rank.numpy()).tolist()


@HYP
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(["exact", "paper"]))
def test_batched_equals_unbatched_and_chunked(models, tiny_tokenizer, frame_file, seed, mode):
    base, tuned = models
    recs = _records(seed, 5, max_words=20)
    one = compute_shift(base, tuned, recs, tokenizer=tiny_tokenizer, frame=frame_file, mode=mode, batch_size=1)
    many = compute_shift(base, tuned, recs, tokenizer=tiny_tokenizer, frame=frame_file, mode=mode, batch_size=5,
                         chunk_mb=0.0005)  # one position per chunk
    a, b = one.tokens, many.tokens
    assert a[["id", "pos", "token_id", "rank_base", "shift_class"]].equals(b[["id", "pos", "token_id", "rank_base",
                                                                             "shift_class"]])
    for col in ("p_base", "p_tuned", "kl"):
        np.testing.assert_allclose(a[col], b[col], rtol=1e-4, atol=1e-6)


class _MaskedHead(torch.nn.Module):
    """An LM head whose logits are -inf on some tokens (as models that mask unused vocabulary do)."""

    def __init__(self, head, masked: list[int]):
        super().__init__()
        self.inner, self.masked = head, masked

    @property
    def weight(self):
        return self.inner.weight

    def forward(self, h):
        z = self.inner(h)
        z[..., self.masked] = float("-inf")
        return z


def test_masked_logits_take_the_slow_path(models, tiny_tokenizer, frame_file):
    """-inf logits make the fast KL formula NaN: the engine notices after queueing every batch and rescores
    with the slow path, so KL still equals the brute-force sum with 0 log 0 = 0."""
    import copy

    from itlens.analysis.token_shift import exact_metrics

    recs = _records(11, 3)
    used = {t for r in recs for t in tiny_tokenizer(r["response"], add_special_tokens=False)["input_ids"]}
    masked = [i for i in range(len(tiny_tokenizer)) if i not in used][:5]
    base, tuned = (copy.deepcopy(m) for m in models)
    for m in (base, tuned):
        m.lm_head = _MaskedHead(m.lm_head, masked)
    res = compute_shift(base, tuned, recs, tokenizer=tiny_tokenizer, base_context="template", batch_size=2)
    rows = res.tokens[res.tokens["id"] == recs[0]["id"]]
    ctx = chat_prompt(tiny_tokenizer, recs[0])
    _, zt = _brute_force(tuned, tiny_tokenizer, ctx, recs[0]["response"])
    _, zb = _brute_force(base, tiny_tokenizer, ctx, recs[0]["response"])
    assert torch.isinf(zb[:, masked]).all()
    lpb, lpt = torch.log_softmax(zb, -1), torch.log_softmax(zt, -1)
    kl = torch.where(lpt.exp() > 0, lpt.exp() * (lpt - lpb), torch.zeros_like(lpt)).sum(-1)
    assert np.isfinite(res.tokens["kl"]).all() and np.isfinite(res.tokens["kl_base_tuned"]).all()
    np.testing.assert_allclose(rows["kl"], kl, rtol=1e-3, atol=1e-6)
    target = torch.tensor(rows["token_id"].tolist())
    fast = exact_metrics(zb, zt, target, check_finite=False)
    assert not bool(fast["finite"]) and torch.isnan(fast["kl"]).any()
    assert bool(exact_metrics(*(torch.nan_to_num(z, neginf=-1e4) for z in (zb, zt)), target,
                              check_finite=False)["finite"])


def test_identical_models_have_no_shift(models, tiny_tokenizer, frame_file):
    """Same model on both sides: KL 0 everywhere; greedy responses are 100% unshifted."""
    base, _ = models
    prompts = _records(3, 4)
    responses = []
    end = tiny_tokenizer.convert_tokens_to_ids("<|end|>")
    for r in prompts:  # greedy responses, kept only where decoding and re-encoding give the same ids
        ids = tiny_tokenizer(chat_prompt(tiny_tokenizer, r), return_tensors="pt")["input_ids"]
        out = base.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=end,
                            pad_token_id=tiny_tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        out = [t for t in out if t != end]
        text = tiny_tokenizer.decode(out)
        if out and tiny_tokenizer(text, add_special_tokens=False)["input_ids"] == out:
            responses.append({**r, "response": text})
    assert responses, "no greedy response survived a decode/encode round trip"
    for mode in ("exact", "paper"):
        res = compute_shift(base, base, responses, tokenizer=tiny_tokenizer, base_context="template", mode=mode)
        assert np.allclose(res.tokens["kl"], 0, atol=1e-6)
        assert np.allclose(res.tokens["p_base"], res.tokens["p_tuned"], atol=1e-6)
        assert res.summary["shares"] == {"unshifted": 1.0, "marginal": 0.0, "shifted": 0.0}
        assert res.summary["figure1"]["base_rank"] == 0
    # Arbitrary (non-greedy) text: still KL 0, and each token ranks where the model itself puts it.
    res = compute_shift(base, base, _records(4, 3), tokenizer=tiny_tokenizer, base_context="template")
    assert np.allclose(res.tokens["kl"], 0, atol=1e-6) and (res.tokens["rank0_paper"] == 0).all()


# ------------------------------------------------------------------------------------ paper mode
def _aligntds_reference(base, tuned, *, top_k_kl=50, top_k_class=10):
    """A transcription of AlignTDS compute_similarity (lists of (string, logit), descending)."""
    def norm(lst):
        m = max(l for _, l in lst)
        z = sum(math.exp(l - m) for _, l in lst)
        return [(t, math.exp(l - m) / z) for t, l in lst]

    b, t = norm(base), norm(tuned)
    l1, l2 = [x for x, _ in b[:top_k_kl]], [x for x, _ in t[:top_k_kl]]
    kl = 0.0
    for s in set(l1) | set(l2):
        w1 = b[l1.index(s)][1] if s in l1 else 0
        w2 = t[l2.index(s)][1] if s in l2 else 0
        if w1 > 0 and w2 > 0:
            kl += w1 * math.log(w1 / w2)
    top = t[0][0]
    c1 = [x for x, _ in b[:top_k_class]]
    tr_class = c1.index(top) if top in c1 else top_k_class
    tr = l1.index(top) if top in l1 else top_k_kl
    tp = b[l1.index(top)][1] if top in l1 else 0.0
    return kl, tr_class, tr, tp


def _paper(base, tuned, **kw):
    sid = {}
    to_ids = lambda lst: torch.tensor([[sid.setdefault(s, len(sid)) for s, _ in lst]])  # noqa: E731
    out = paper_metrics(torch.tensor([[l for _, l in base]]), to_ids(base), torch.tensor([[l for _, l in tuned]]),
                        to_ids(tuned), **kw)
    return {k: v[0].item() for k, v in out.items()}


def test_paper_metrics_hand_computed():
    base = [("A", 2.0), ("B", 1.0), ("C", 0.0)]
    tuned = [("B", 1.0), ("A", 1.0), ("D", 0.0)]
    zb = math.exp(2) + math.exp(1) + 1
    zt = 2 * math.e + 1
    pa, pb = math.exp(2) / zb, math.e / zb
    qa = qb = math.e / zt
    got = _paper(base, tuned)
    assert got["kl"] == pytest.approx(pa * math.log(pa / qa) + pb * math.log(pb / qb), rel=1e-5)
    assert got["tr_class"] == 1 and got["tr"] == 1  # tuned top-1 "B" is the base's 2nd: marginal
    assert got["tp"] == pytest.approx(pb, rel=1e-5)
    assert got["p_tuned_top1"] == pytest.approx(qb, rel=1e-5)
    # Absent tuned top-1: rank = list length (class 10, Figure 1's 50), base probability 0; KL over the
    # intersection only (here just "A"), and it can be negative (not a true divergence).
    got = _paper([("A", 0.0), ("B", 0.0)], [("Z", 5.0), ("A", 0.0), ("B", 5.0)])
    assert (got["tr_class"], got["tr"], got["tp"]) == (10, 50, 0.0)
    q = 1 / (2 * math.exp(5) + 1)
    assert got["kl"] == pytest.approx(0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (math.exp(5) * q)), rel=1e-5)
    # A string repeated in a list counts at its first occurrence only.
    got = _paper([("x", 3.0), ("y", 2.0), ("x", 1.0)], [("x", 1.0), ("y", 1.0)], class_k=1)
    assert got["tr_class"] == 0 and got["tp"] == pytest.approx(math.exp(3) / (math.exp(3) + math.exp(2) + math.e))
    got = _paper([("y", 3.0), ("x", 2.0)], [("x", 1.0)], class_k=1)
    assert (got["tr_class"], got["tr"]) == (1, 1)  # found at index 1, outside a top-1 class list


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_paper_metrics_match_aligntds_reference(data):
    k = data.draw(st.integers(1, 12))
    strings = st.sampled_from(list("abcdefghij"))
    logits = st.floats(-5, 5, allow_nan=False, width=32)
    base = sorted([(data.draw(strings), data.draw(logits)) for _ in range(k)], key=lambda x: -x[1])
    tuned = sorted([(data.draw(strings), data.draw(logits)) for _ in range(k)], key=lambda x: -x[1])
    kl_k, class_k = data.draw(st.integers(1, 15)), data.draw(st.integers(1, 15))
    kl, tr_class, tr, tp = _aligntds_reference(base, tuned, top_k_kl=kl_k, top_k_class=class_k)
    got = _paper(base, tuned, class_k=class_k, rank_k=kl_k)
    assert got["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-5)
    assert (got["tr_class"], got["tr"]) == (tr_class, tr)
    assert got["tp"] == pytest.approx(tp, rel=1e-4, abs=1e-6)


def test_paper_mode_columns(models, tiny_tokenizer, frame_file):
    base, tuned = models
    res = compute_shift(base, tuned, _records(1, 3), tokenizer=tiny_tokenizer, frame=frame_file, mode="paper")
    t = res.tokens
    assert t["rank_base"].between(1, 11).all() and t["rank0_paper"].between(0, 50).all()
    assert {"exact_rank_base", "exact_kl", "exact_shift_class"} <= set(t.columns)
    assert res.summary["mode"] == "paper" and "exact" in res.summary
    assert (t["p_base"] == t["p_base_top1"]).all()


# ------------------------------------------------------------------------------------------ LoRA
def test_lora_disable_adapter_equals_separate_base(tiny_model_dir, tiny_tokenizer, tmp_path, frame_file):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    merged = tmp_path / "merged"
    peft_model.merge_and_unload().save_pretrained(merged)
    tiny_tokenizer.save_pretrained(merged)
    recs = _records(7, 4)
    kw = dict(frame=frame_file, batch_size=2)
    via_adapter = compute_shift(str(tiny_model_dir), str(adapter), recs, **kw)  # one model, adapter toggled
    separate = compute_shift(str(tiny_model_dir), str(merged), recs, **kw)      # two separate models
    assert via_adapter.summary["models"]["tuned"] == str(adapter)
    a, b = via_adapter.tokens, separate.tokens
    assert a["rank_base"].tolist() == b["rank_base"].tolist()
    np.testing.assert_allclose(a["p_base"], b["p_base"], rtol=1e-5)
    np.testing.assert_allclose(a["p_tuned"], b["p_tuned"], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(a["kl"], b["kl"], rtol=1e-2, atol=1e-6)
    assert (a["kl"] > 0).any()
    # A PeftModel object with no base: the base side is the same object with the adapter disabled.
    obj = compute_shift(None, peft_model_reloaded(tiny_model_dir, adapter), recs, tokenizer=tiny_tokenizer, **kw)
    assert obj.tokens["rank_base"].tolist() == a["rank_base"].tolist()


def peft_model_reloaded(base_dir, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter)).eval()


def test_tokenizer_mismatch_is_input_error(tiny_model_dir, tmp_path):
    from conftest import tiny_corpus
    from itlens.tokenizer import train_tokenizer

    other = train_tokenizer(tiny_corpus(seed=5)[:50], vocab_size=280, min_frequency=1)
    other_dir = make_tiny_llama(other, tmp_path / "other")
    with pytest.raises(InputError, match="share a tokenizer"):
        compute_shift(str(tiny_model_dir), str(other_dir), _records(0, 1))


# ----------------------------------------------------------------------------------- aggregates
def _table(rows):
    df = pd.DataFrame(rows, columns=["id", "sentence", "sent_pos", "sent_len", "kl"])
    return df


def test_sentence_split_kl_hand_computed():
    # Sentence of 30 tokens: first ceil(1.5) = 2 tokens; sentence of 3 tokens: first 1; one 1-token sentence.
    rows = [("a", 0, i, 30, 1.0 if i < 2 else 0.5) for i in range(30)]
    rows += [("a", 1, i, 3, [3.0, 1.0, 2.0][i]) for i in range(3)]
    rows += [("b", 0, 0, 1, 4.0)]
    s = sentence_split_kl(_table(rows))
    assert s["first"] == pytest.approx((1.0 + 3.0 + 4.0) / 3)
    assert s["rest"] == pytest.approx((0.5 + 1.5) / 2)
    assert s["diff_pct"] == pytest.approx((8 / 3 - 1.0) / 1.0 * 100)
    assert s["n_sentences"] == 3


def test_a_sentence_starts_with_its_first_token_even_when_the_token_carries_the_space_before_it(
        models, tiny_tokenizer, frame_file):
    """Byte-level tokens carry the space before a word (" the"): that token starts the next sentence (Figure 4
    measures KL over each sentence's first tokens), not ends the one before. A newline token ends its sentence."""
    from itlens.analysis.token_shift import sentence_starts

    base, tuned = models
    text = "the city is red. the river is blue! happy to help.\nthe doctor. who knows"
    rec = {"id": "s", "instruction": "where is the city?", "response": text, "model": "m"}
    t = compute_shift(base, tuned, [rec], tokenizer=tiny_tokenizer, frame=frame_file).tokens
    starts = sentence_starts(text) + [len(text)]
    assert t["sentence"].max() == len(starts) - 2 == 4
    for k, g in t.groupby("sentence"):
        assert "".join(g["token"]).strip() == text[starts[k]:starts[k + 1]].strip()
        assert g["sent_pos"].tolist() == list(range(len(g))) and (g["sent_len"] == len(g)).all()
    firsts = t[(t["sent_pos"] == 0) & (t["sentence"] > 0)]["token"]
    assert firsts.str.match(r"\s+\S").sum() >= 3  # the case in question: " t(he)" opens sentences 1, 3 and 4
    assert t[t["token"] == "\n"]["sent_pos"].tolist() == [t[t["token"] == "\n"]["sent_len"].iloc[0] - 1]


def test_summary_aggregates_and_stopwords(models, tiny_tokenizer, frame_file):
    base, tuned = models
    res = compute_shift(base, tuned, _records(2, 6, max_words=25), tokenizer=tiny_tokenizer, frame=frame_file)
    s, t = res.summary, res.tokens
    assert sum(s["shares"].values()) == pytest.approx(1.0)
    assert s["mean_rank_base"] == pytest.approx(t["rank_base"].mean())
    assert sum(b["n"] for b in s["by_rel_pos"]) == len(t) and len(s["by_rel_pos"]) <= 10
    assert [b["bin"] for b in s["by_index"]] == sorted(set(t["pos"][t["pos"] < 32]))
    assert s["by_index"][0]["n"] == t["id"].nunique()
    both = token_counts(t, ["shifted", "marginal"])
    assert sum(c for _, c in both) == int((t["shift_class"] != "unshifted").sum()
                                         - (t[t["shift_class"] != "unshifted"]["token"].str.strip() == "").sum())
    no_stop = summarize(t, stopwords={"the", "a"})
    assert all(tok.lower() not in {"the", "a"} for tok, _ in no_stop["top_shifted"])
    assert s["base_context"] == "frame" and s["n_responses"] == 6


def test_truncation_is_counted(models, tiny_tokenizer):
    base, tuned = models
    recs = _records(9, 3, max_words=40)
    with pytest.warns(UserWarning, match="truncated"):
        res = compute_shift(base, tuned, recs, tokenizer=tiny_tokenizer, base_context="template", max_length=40)
    assert res.summary["n_truncated"] + res.summary["n_skipped"] >= 1
    assert res.tokens.groupby("id")["pos"].max().max() < 40


def test_batches_are_tokenized_as_the_device_asks_for_them(models, tiny_tokenizer, frame_file, monkeypatch):
    """Each window of responses is tokenized in pieces, one after each batch of the window before it
    is queued (so on a GPU only the first batch waits for the tokenizer), and the token-id columns are
    built once the last batch is queued."""
    import itlens.analysis.token_shift as ts

    base, tuned = models
    events: list[tuple] = []
    for name in ("_encode_all", "_gather_hidden", "_static_columns"):
        real = getattr(ts, name)

        def spy(*args, _real=real, _name=name, **kw):
            if _name == "_encode_all":
                events.append(("encode", tuple(kw["indices"])))
            elif _name == "_gather_hidden" and args[0].model is tuned:
                events.append(("queue",))
            elif _name == "_static_columns":
                events.append(("static",))
            return _real(*args, **kw)

        monkeypatch.setattr(ts, name, spy)
    monkeypatch.setattr(ts, "WINDOW_MAX_BATCHES", 2)
    recs = _records(4, 11, max_words=20)
    auto = compute_shift(base, tuned, recs, tokenizer=tiny_tokenizer, frame=frame_file, batch_size=2)
    # on a CPU (tokenize_ahead null) everything is tokenized first, and batches are sorted over all
    assert events == [("encode", tuple(range(11)))] + [("queue",)] * 6 + [("static",)]
    events.clear()
    res = compute_shift(base, tuned, recs, tokenizer=tiny_tokenizer, frame=frame_file, batch_size=2,
                        tokenize_ahead=True)
    windows = ts.plan_windows(recs, 2)
    assert [len(w) for w in windows] == [2, 4, 4, 1]  # 1, 2, 2, 2 batches (the last one partly filled)
    # each later window in as many pieces as the window before it has batches, one after each is queued
    w1, w2, w3 = windows[1:]
    assert events == [("encode", tuple(windows[0])), ("queue",), ("encode", tuple(w1)),
                      ("queue",), ("encode", tuple(w2[:2])), ("queue",), ("encode", tuple(w2[2:])),
                      ("queue",), ("queue",), ("encode", tuple(w3)), ("queue",), ("static",)]  # w3: pieces [], [1]
    sizes = [len(r["instruction"]) + len(r["response"]) for r in recs]
    assert [sizes[i] for w in windows for i in w] == sorted(sizes)  # shortest conversation first
    assert res.timings["encode_s"] > 0 and res.timings["encode_overlapped_s"] > 0
    assert list(res.tokens["id"].unique()) == [r["id"] for r in recs]  # rows still in input order
    a, b = auto.tokens, res.tokens  # other batches: the same tokens and ranks, floats up to padding noise
    assert a[["id", "pos", "token_id", "rank_base", "shift_class"]].equals(b[["id", "pos", "token_id", "rank_base",
                                                                             "shift_class"]])
    np.testing.assert_allclose(a["kl"], b["kl"], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------- writing, figures, view, CLI
def test_write_figures_view_and_read_back(models, tiny_tokenizer, frame_file, tmp_path):
    from itlens.analysis.shift_figures import (plot_figure1, plot_figure4, plot_figure12, render_token_view,
                                               write_shift_figures)

    base, tuned = models
    res = compute_shift(base, tuned, _records(5, 3), tokenizer=tiny_tokenizer, frame=frame_file)
    write_shift(res, tmp_path)
    back = read_shift(tmp_path)
    assert back.tokens[["id", "pos", "rank_base"]].equals(res.tokens[["id", "pos", "rank_base"]])
    assert back.summary["shares"] == pytest.approx(res.summary["shares"])
    for p in write_shift_figures(res, tmp_path, view=2):
        assert p.stat().st_size > 500
    page = (tmp_path / "view.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script src" not in page
    assert page.count("class='tok ") >= len(res.tokens[res.tokens["id"].isin(["r0", "r1"])])
    assert "<table>" in page and "%</td>" in page
    render_token_view(res, ["r2"], tmp_path / "one.html")
    assert "r2" in (tmp_path / "one.html").read_text()
    s = res.summary
    assert plot_figure1({"7B_LFT": {1000: s, 10000: s}, "7B_SFT": {1000: s}}, tmp_path / "f1.png").read_bytes()[:4] \
        == b"\x89PNG"
    assert plot_figure4({"LFT": s, "SFT": s}, tmp_path / "f4.png").stat().st_size > 500
    assert plot_figure12({"LFT": s, "SFT": s}, tmp_path / "f12.png").stat().st_size > 500


def test_cli_shift(tiny_model_dir, tiny_model_dir_b, tmp_path, frame_file, capsys):
    from itlens.cli import main

    resp = tmp_path / "responses.jsonl"
    resp.write_text("".join(json.dumps(r) + "\n" for r in _records(11, 3)))
    out = tmp_path / "shift"
    main(["shift", "--base", str(tiny_model_dir), "--tuned", str(tiny_model_dir_b), "--responses", str(resp),
          "--out", str(out), "--frame", frame_file, "--mode", "paper", "--view", "2"])
    printed = capsys.readouterr()
    assert "unshifted" in printed.out
    assert "shift: 100%" in printed.err and "3/3" in printed.err  # progress bar
    t = pd.read_parquet(out / "tokens.parquet")
    assert {"id", "pos", "token_id", "token", "rank_base", "p_base", "p_tuned", "kl", "shift_class"} <= set(t.columns)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "paper" and summary["base_context"] == "frame"
    assert (out / "view.html").is_file() and (out / "top_tokens.png").is_file()
    # Bad input: one line naming file, line and field; exit 2; nothing written.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "instruction": "q", "model": "m"}\n')
    with pytest.raises(SystemExit) as e:
        main(["shift", "--base", str(tiny_model_dir), "--tuned", str(tiny_model_dir_b), "--responses", str(bad),
              "--out", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "bad.jsonl:1" in err and "'response'" in err
    assert not (tmp_path / "none").exists()
    with pytest.raises(SystemExit) as e:
        main(["shift", "--base", str(tiny_model_dir), "--tuned", str(tiny_model_dir_b), "--responses", str(resp),
              "--out", str(tmp_path / "none"), "--mode", "fast"])
    assert e.value.code == 2 and "mode" in capsys.readouterr().err


def test_config_is_strict(tmp_path):
    from itlens.config import load_config

    cfg = load_config(ShiftConfig, None, ["mode=paper", "base_context=template", "chunk_mb=0.5"])
    assert (cfg.mode, cfg.base_context, cfg.chunk_mb) == ("paper", "template", 0.5)
    with pytest.raises(InputError, match="key 'batch_size'"):
        load_config(ShiftConfig, None, ["batch_size=0"])
    assert [load_config(ShiftConfig, None, [f"tokenize_ahead={v}"]).tokenize_ahead
            for v in ("on", "false", "null")] == [True, False, None]  # YAML's words; null: by device
    with pytest.raises(InputError, match="key 'tokenize_ahead'"):
        load_config(ShiftConfig, None, ["tokenize_ahead=maybe"])
    p = tmp_path / "shift.yaml"
    p.write_text("mode: exact\nbase_contxt: frame\n")
    with pytest.raises(InputError, match=r"shift.yaml: key 'base_contxt': unknown key"):
        load_config(ShiftConfig, p)


def _random_table(seed: int, n_responses: int = 12) -> pd.DataFrame:
    """A token table with the columns summarize reads; token ids whose strings match once stripped."""
    rng = np.random.default_rng(seed)
    strings = {0: "the", 1: " the", 2: "", 3: " city", 4: "city", 5: "!", 6: " a", 7: "A", 8: " ", 9: "river"}
    rows = []
    for r in range(n_responses):
        n = int(rng.integers(1, 40))
        sentence = np.cumsum(rng.random(n) < 0.15)
        sentence -= sentence[0]
        for p in range(n):
            s = sentence[p]
            members = np.flatnonzero(sentence == s)
            tid = int(rng.integers(0, 10))
            rank = int(rng.choice([1, 1, 1, 2, 3, 4, 9]))
            rows.append({"id": f"r{r}", "pos": p, "token_id": tid, "token": strings[tid], "n_tokens": n,
                         "sentence": int(s), "sent_pos": int(p - members[0]), "sent_len": len(members),
                         "rank_base": rank, "kl": float(rng.random()), "p_base": float(rng.random()),
                         "p_tuned": float(rng.random()), "p_base_top1": float(rng.random()),
                         "rank0_paper": rank - 1, "top1_tuned": tid if rng.random() < 0.5 else 99})
    t = pd.DataFrame(rows)
    t["shift_class"] = shift_class(t["rank_base"])
    return t.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # summarize must not rely on row order


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summary_aggregates_equal_plain_pandas_groupbys(seed):
    """The vectorised aggregates (bincounts over integer codes) against the obvious pandas definitions."""
    from itlens.analysis.token_shift import token_shift_rates

    t = _random_table(seed)
    s = summarize(t, stopwords={"a"})
    assert s["shares"] == pytest.approx(t["shift_class"].value_counts(normalize=True)
                                        .reindex(["unshifted", "marginal", "shifted"], fill_value=0).to_dict())
    stripped = t["token"].str.strip()
    for key, classes in [("top_shifted", ["shifted"]), ("top_shifted_marginal", ["shifted", "marginal"])]:
        sel = stripped[t["shift_class"].isin(classes) & (stripped != "") & (stripped.str.lower() != "a")]
        want = sorted(sel.value_counts().items(), key=lambda kv: (-kv[1], kv[0]))
        assert s[key] == [[k, int(v)] for k, v in want]
    g = t.assign(s=stripped, shifted=t["shift_class"] == "shifted").groupby("s")
    want = pd.DataFrame({"count": g.size(), "shifted": g["shifted"].sum()}).reset_index()
    want = want[want["s"] != ""].assign(rate=lambda d: d["shifted"] / d["count"])
    want = want.sort_values(["rate", "count", "s"], ascending=[False, False, True])
    got = token_shift_rates(t)
    assert got["token"].tolist() == want["s"].tolist()
    assert got["count"].tolist() == want["count"].tolist() and got["rate"].tolist() == want["rate"].tolist()
    rel = np.minimum(9, 10 * t["pos"] // t["n_tokens"])
    by_rel = t.groupby(rel).agg(n=("kl", "size"), kl=("kl", "mean"), p_base=("p_base", "mean"))
    assert [b["bin"] for b in s["by_rel_pos"]] == by_rel.index.tolist()
    assert [b["n"] for b in s["by_rel_pos"]] == by_rel["n"].tolist()
    assert [b["kl"] for b in s["by_rel_pos"]] == pytest.approx(by_rel["kl"].tolist())
    early = t[t["pos"] < 32]
    assert [b["shifted"] for b in s["by_index"]] == pytest.approx(
        early.groupby("pos")["shift_class"].apply(lambda c: (c == "shifted").mean()).tolist())
    n_first = np.maximum(1, np.ceil(0.05 * t["sent_len"]))
    parts = t.groupby(["id", "sentence", t["sent_pos"] < n_first])["kl"].mean()
    assert s["sentence_kl"]["first"] == pytest.approx(parts.xs(True, level=2).mean())
    assert s["sentence_kl"]["rest"] == pytest.approx(parts.xs(False, level=2).mean())
    assert s["sentence_kl"]["n_sentences"] == t.groupby(["id", "sentence"]).ngroups
    no_ids = t.drop(columns="token_id")  # grouped by the strings themselves
    assert token_counts(no_ids, ["shifted"], stopwords={"a"}, top=125) == s["top_shifted"]
    assert token_shift_rates(no_ids).equals(got)


def test_a_tokenizer_that_appends_eos_gives_the_base_frame_no_eos(tiny_tokenizer, frame_file):
    """The frame continues with the response: an eos the tokenizer appends to every text must not sit
    between them (the base would read a new document), just as the tuned side drops it."""
    import copy

    from tokenizers.processors import TemplateProcessing

    from itlens.analysis.token_shift import _encode_all

    eos_tok = copy.deepcopy(tiny_tokenizer)
    eos = eos_tok.eos_token
    eos_tok._tokenizer.post_processor = TemplateProcessing(single=f"$A {eos}",
                                                           special_tokens=[(eos, eos_tok.eos_token_id)])
    recs = _records(3, 4)
    cfg = ShiftConfig(base_context="frame")
    frame = load_frame(frame_file)
    assert eos_tok(["x"])["input_ids"][0][-1] == eos_tok.eos_token_id  # the tokenizer does append it
    with_eos = _encode_all(eos_tok, recs, cfg, frame)
    plain = _encode_all(tiny_tokenizer, recs, cfg, frame)
    for a, b in zip(with_eos, plain):
        assert a.base_ids == b.base_ids and a.base_start == b.base_start
        assert a.response_ids == b.response_ids and a.base_ids[a.base_start - 1] != eos_tok.eos_token_id


def test_a_response_token_straddling_the_template_is_warned_about_in_the_frame_context(models, tiny_tokenizer,
                                                                                       frame_file):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)  # a template whose generation prompt ends mid-word: " ci" + "ty ..."
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %} ci{% endif %}")
    base, tuned = models
    recs = [{"id": "a", "instruction": "where is the city?", "response": "ty is far.", "model": "m"},
            {"id": "b", "instruction": "where is the city?", "response": " the city.", "model": "m"}]
    with pytest.warns(UserWarning, match="1 of 2 responses start inside the chat template's last token"):
        compute_shift(base, tuned, recs, tokenizer=tok, base_context="frame", frame=frame_file)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # both read the same sequence: nothing to warn about
        compute_shift(base, tuned, recs, tokenizer=tok, base_context="template")


def _fused_end_tokenizer():
    """A base tokenizer without <|end|> in its vocabulary that has learnt '.<|' (as Gemma's has '.<'): with the
    project's template the answer's last '.' and the start of the end-of-turn text are one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import tiny_corpus

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(tiny_corpus() + [s + "<|end|>" for s in tiny_corpus(seed=1)], trainers.BpeTrainer(
        vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def test_an_answer_token_fused_with_the_end_of_turn_text_is_not_scored(tmp_path, frame_file):
    """Where <|end|> is text, training and generation see the answer's last '.' and the '<|' after it as one
    token '.<|': the tuned model ends its turn with it, and generation cuts the record at '<|end|>', leaving
    'the city.'. Scoring that text alone would score '.', a token the model never chose (with one model on
    both sides it ranked ~300th, 'shifted'). The turn is tokenized as training saw it, end-of-turn text
    included, and the fused token, the choice to end the turn, is not scored (nor is the end-of-turn token)."""
    from transformers import AutoModelForCausalLM

    from conftest import make_tiny_llama

    tok = _fused_end_tokenizer()
    assert "<|end|>" not in tok.get_vocab() and ".<|" in tok.convert_ids_to_tokens(tok("city.<|end|>")["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tok, tmp_path / "m")).eval()
    recs = [{"id": "fused", "instruction": "where is the city?", "response": "the city.", "model": "m"},
            {"id": "plain", "instruction": "where is the city?", "response": "the river is blue", "model": "m"}]
    for ctx in ("template", "frame"):
        res = compute_shift(model, model, recs, tokenizer=tok, base_context=ctx, frame=frame_file)
        for rec in recs:
            prompt = chat_prompt(tok, rec)
            trained = tok(prompt + rec["response"] + "<|end|>", return_offsets_mapping=True)
            within = [i for i, (a, b) in zip(trained["input_ids"], trained["offset_mapping"])
                      if a >= len(prompt) and b <= len(prompt) + len(rec["response"])]
            rows = res.tokens[res.tokens["id"] == rec["id"]]
            assert rows["token_id"].tolist() == within  # training's tokens, the fused '.<|' left out
        assert "".join(res.tokens[res.tokens["id"] == "fused"]["token"]) == "the city"
        assert "".join(res.tokens[res.tokens["id"] == "plain"]["token"]) == "the river is blue"
        assert res.summary["n_fused_end"] == 1
    # an answer cut at max_new_tokens did not end its turn: its last '.' is the model's own token
    cut = compute_shift(model, model, [{**recs[0], "finish": "length"}], tokenizer=tok, base_context="template")
    assert "".join(cut.tokens["token"]) == "the city." and cut.summary["n_fused_end"] == 0


def test_figure12_draws_tokens_that_look_like_tex(tmp_path):
    from itlens.analysis.shift_figures import plot_figure12

    summary = {"top_shifted_marginal": [("$$", 5), ("}$", 3), ("$x$", 2), ("a_b^c", 1)]}
    assert plot_figure12({"sft": summary}, tmp_path / "f12.png").stat().st_size > 1000


def test_cli_shift_refuses_an_empty_responses_file_and_a_negative_view(tiny_model_dir, tiny_model_dir_b, tmp_path,
                                                                         capsys):
    """An empty responses file is bad input (was: exit 0 with an empty table and figures of nothing), and
    so is --view -1 (was: taken as "show"); both fail before a model is loaded, with nothing written."""
    from itlens.cli import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    resp = tmp_path / "responses.jsonl"
    resp.write_text("".join(json.dumps(r) + "\n" for r in _records(11, 2)))
    for responses, extra, needle in ((empty, [], f"{empty}: dataset is empty"), (resp, ["--view", "-1"], "key '--view'")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["shift", "--base", str(tiny_model_dir), "--tuned", str(tiny_model_dir_b), "--responses",
                  str(responses), "--out", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and needle in err, err
        assert not (tmp_path / "out").exists()


def test_per_attribute_frames_read_each_answer_in_its_own_frame(models, tiny_tokenizer, frame_file, tmp_path):
    """frames={attribute: file}: a response to a capital question is scored in the capital frame, the rest in
    the default frame, exactly as if each group were scored alone in its frame (geo's per-attribute frames)."""
    base, tuned = models
    other = tmp_path / "capital.txt"
    other.write_text("# Query:\nwhat is the capital?\n\n# Answer:\nthe red city.\n\n# Query:\n{instruction}\n\n"
                     "# Answer:\n")
    recs = _records(3, 4)
    for r, attr in zip(recs, ["capital", None, "capital", "currency"]):
        if attr:
            r["attribute"] = attr
    mixed = compute_shift(base, tuned, recs, tokenizer=tiny_tokenizer, frame=frame_file,
                          frames={"capital": str(other)}).tokens
    cap = compute_shift(base, tuned, [r for r in recs if r.get("attribute") == "capital"], tokenizer=tiny_tokenizer,
                        frame=str(other)).tokens
    rest = compute_shift(base, tuned, [r for r in recs if r.get("attribute") != "capital"], tokenizer=tiny_tokenizer,
                         frame=frame_file).tokens
    cols = ["id", "pos", "token_id", "rank_base", "shift_class"]
    expect = pd.concat([cap, rest]).sort_values(["id", "pos"]).reset_index(drop=True)
    got = mixed.sort_values(["id", "pos"]).reset_index(drop=True)
    assert got[cols].equals(expect[cols])
    np.testing.assert_allclose(got["p_base"], expect["p_base"], rtol=1e-4, atol=1e-6)
    plain = compute_shift(base, tuned, recs, tokenizer=tiny_tokenizer, frame=frame_file).tokens
    assert not np.allclose(plain.sort_values(["id", "pos"])["p_base"], got["p_base"])  # the frame matters


def _one_byte_ids(tok, text: str) -> list[int]:
    """``text`` as one byte-level token per character (ASCII): the same text, other tokens than BPE's."""
    ids = [tok.convert_tokens_to_ids("Ġ" if c == " " else c) for c in text]
    assert tok.decode(ids) == text and ids != tok(text, add_special_tokens=False)["input_ids"]
    return ids


@pytest.mark.parametrize("base_context", ["template", "frame"])
def test_responses_are_scored_on_the_ids_their_model_generated(models, tiny_tokenizer, frame_file, base_context):
    """A record's response_token_ids are scored as generated, after the exact prompt ids generation decoded
    from, even where re-tokenizing the text gives other tokens (here one byte a token against BPE's merges);
    ids equal to the text's tokens change nothing; ids that are not the text's under this tokenizer (another
    model's) are warned about and the text's tokens are scored."""
    from itlens.templates import encode_prompt

    base, tuned = models
    tok = tiny_tokenizer
    recs = _records(11, 3)
    plain = compute_shift(base, tuned, recs, tokenizer=tok, base_context=base_context, frame=frame_file)
    split, same, other = (dict(r) for r in recs)
    split["response_token_ids"] = _one_byte_ids(tok, split["response"])
    same["response_token_ids"] = tok(same["response"], add_special_tokens=False)["input_ids"]
    other["response_token_ids"] = [7, 8, 9]
    with pytest.warns(UserWarning, match="1 of 3 responses carry response_token_ids that are not"):
        res = compute_shift(base, tuned, [split, same, other], tokenizer=tok, base_context=base_context,
                            frame=frame_file)
    assert res.summary["n_generated_ids"] == 2 and res.summary["n_generated_ids_differ"] == 1
    assert res.summary["n_generated_ids_mismatch"] == 1
    for rid in (same["id"], other["id"]):  # scored on the text's tokens, as without ids
        a, b = (r.tokens[r.tokens["id"] == rid].reset_index(drop=True) for r in (plain, res))
        assert a[["pos", "token_id", "rank_base"]].equals(b[["pos", "token_id", "rank_base"]])
    rows = res.tokens[res.tokens["id"] == split["id"]]
    gen = split["response_token_ids"]
    assert rows["token_id"].tolist() == gen and rows["pos"].tolist() == list(range(len(gen)))
    assert "".join(rows["token"]) == split["response"]
    ctx = {"template": encode_prompt(tok, chat_prompt(tok, split)),
           "frame": encode_prompt(tok, frame_prompt(load_frame(frame_file), split))}
    for model, prefix, col in ((tuned, ctx["template"], "p_tuned"), (base, ctx[base_context], "p_base")):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([prefix + gen])).logits[0].float(), -1)
        want = logp[len(prefix) - 1: len(prefix) - 1 + len(gen)].gather(1, torch.tensor(gen)[:, None])[:, 0].exp()
        np.testing.assert_allclose(rows[col], want, rtol=1e-4, atol=1e-7)
    # each one-character token is its own sentence position: offsets follow the generated tokens
    assert rows["sentence"].max() == len(sentence_starts_of(split["response"])) - 1


def sentence_starts_of(text: str) -> list[int]:
    from itlens.analysis.token_shift import sentence_starts

    return sentence_starts(text)


def test_generated_ids_fused_with_the_end_of_turn_text_drop_the_fused_token(tmp_path):
    """Generated ids that end in the token holding the response's last '.' and the start of the stop text
    ('.<|' before 'end|>', as itlens generate records them) are scored without it, and a whitespace token the
    model wrote before ending its turn is scored (re-tokenizing the stripped text loses it)."""
    from transformers import AutoModelForCausalLM

    tok = _fused_end_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tok, tmp_path / "m")).eval()
    rec = {"id": "fused", "instruction": "where is the city?", "response": "the city.", "model": "m"}
    covering = tok("the city.<|end|>", add_special_tokens=False)["input_ids"]
    text = [tok.decode(covering[:k]) for k in range(len(covering) + 1)]
    n = next(k for k, t in enumerate(text) if t.startswith("the city."))
    assert text[n] != "the city."  # the last id holds '<' too
    res = compute_shift(model, model, [{**rec, "response_token_ids": covering[:n]}], tokenizer=tok,
                        base_context="template")
    assert res.tokens["token_id"].tolist() == covering[:n - 1] and res.summary["n_fused_end"] == 1
    assert res.summary["n_generated_ids"] == 1
    newline = tok("the city.\n", add_special_tokens=False)["input_ids"]
    res = compute_shift(model, model, [{**rec, "response_token_ids": newline}], tokenizer=tok,
                        base_context="template")
    assert res.tokens["token_id"].tolist() == newline and res.summary["n_fused_end"] == 0
    assert res.summary["n_generated_ids_differ"] == 1


def test_response_token_ids_must_be_token_ids(models, tiny_tokenizer, tmp_path):
    from itlens.io import atomic_write_jsonl, read_records

    base, tuned = models
    rec = {"id": "a", "instruction": "where?", "response": "north.", "model": "m"}
    for bad, why in (("1 2", "expected a list of token ids, got str"), ([1, -2], "got -2"), ([1, True], "got true")):
        with pytest.raises(InputError, match=why):
            compute_shift(base, tuned, [{**rec, "response_token_ids": bad}], tokenizer=tiny_tokenizer)
        path = atomic_write_jsonl(tmp_path / "r.jsonl", [rec, {**rec, "id": "b", "response_token_ids": bad}])
        with pytest.raises(InputError, match=r"r\.jsonl:2: field .response_token_ids."):
            read_records(path, "response")


def test_generated_ids_holding_a_special_token_are_not_scored_as_the_answer(models, tiny_tokenizer):
    """Ids that keep the stop token (an end of turn or eos after the answer, as other tools' token ids do) or
    a turn marker decode to the response only because special tokens are skipped: scoring them would score
    the end-of-turn token as a response row. They are not an answer's ids as generate writes them: warned
    about, and the text's tokens scored (before, the special token was a row, silently)."""
    from itlens.tokenizer import END, USER

    base, tuned = models
    tok = tiny_tokenizer
    rec = _records(12, 1)[0]
    gen = _one_byte_ids(tok, rec["response"])
    text_ids = tok(rec["response"], add_special_tokens=False)["input_ids"]
    specials = {tok.convert_tokens_to_ids(t) for t in (END, USER)} | {tok.eos_token_id}
    for bad in (gen + [tok.convert_tokens_to_ids(END)], gen + [tok.eos_token_id],
                gen[:2] + [tok.convert_tokens_to_ids(USER)] + gen[2:]):
        with pytest.warns(UserWarning, match="1 of 1 responses carry response_token_ids that are not"):
            res = compute_shift(base, tuned, [{**rec, "response_token_ids": bad}], tokenizer=tok,
                                base_context="template")
        assert res.summary["n_generated_ids_mismatch"] == 1 and not specials & set(res.tokens["token_id"])
        assert res.tokens["token_id"].tolist() == text_ids


def test_generated_ids_may_be_numpy_integers(models, tiny_tokenizer):
    """Records built in Python from arrays hold numpy integers: they are token ids (before, validating them
    crashed with a TypeError from json.dumps); a value that is not one is named in the one-line error."""
    from itlens.io import token_ids_problem

    base, tuned = models
    rec = _records(13, 1)[0]
    gen = _one_byte_ids(tiny_tokenizer, rec["response"])
    res = compute_shift(base, tuned, [{**rec, "response_token_ids": list(np.array(gen))}], tokenizer=tiny_tokenizer,
                        base_context="template")
    assert res.tokens["token_id"].tolist() == gen and res.summary["n_generated_ids_differ"] == 1
    assert token_ids_problem([np.bool_(True)]).startswith("expected non-negative integer token ids, got")


# ---------------------------------------------- the generated ids' character spans, decoded in windows
def _generated_encoding_reference(tokenizer, prompt, response, generated, special):
    """token_shift._generated_encoding as it was: every prefix of the ids decoded (quadratic), kept as the
    reference that the windowed decoding must reproduce exactly."""
    from itlens.templates import encode_prompt

    if not generated or max(generated) >= len(tokenizer) or not special.isdisjoint(generated):
        return None
    full = tokenizer.decode(generated, skip_special_tokens=True)
    lead = len(full) - len(full.lstrip())
    if not full.startswith(response, lead):
        return None
    prefixes = tokenizer.batch_decode([generated[:k] for k in range(1, len(generated) + 1)],
                                      skip_special_tokens=True)
    ends_full = np.array([len(os.path.commonprefix([t, full])) for t in prefixes], dtype=np.int64)
    ends_full = np.maximum.accumulate(ends_full)
    starts_full = np.concatenate([[0], ends_full[:-1]])
    response_end = lead + len(response)
    after = full[response_end:]
    beyond = response_end + len(after) - len(after.lstrip())
    fused_end = beyond < len(full)
    if fused_end and starts_full[-1] > beyond:
        return None
    keep = len(generated) - fused_end
    offsets = np.clip(starts_full[:keep] - lead, 0, len(response))
    ends = np.clip(ends_full[:keep] - lead, 0, len(response))
    return encode_prompt(tokenizer, prompt), list(generated[:keep]), offsets, ends, fused_end


ODD_TEXTS = ["Ça va? Très bien, merci!", "漢字 and 😀😀 emoji 👩‍👩‍👧 family",
             "don 't do that . it 's a ' test ' , ok ?", "\n\nthe city\n\n\n is   far .", "a\u00a0b\tc",
             "ends in 😀", "\ufffd literal \ufffd\ufffd text", "Ünïcödé ñ ß ø å",
             "the doctor works at the university of the north.", "漢字" * 40, "\ufffd" * 30 + "字 " + "\ufffd" * 10]


def _fast_tokenizer(t, **kw):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=t, **kw)


def _llama2_like_tokenizer():
    """Metaspace-style BPE with byte fallback, as Llama-2's and Mistral's: characters outside the vocabulary
    are <0xXX> byte tokens, a run of them decodes to U+FFFD per byte unless it is valid UTF-8 as a whole,
    and the decoder strips the first token's leading space."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    from conftest import tiny_corpus

    t = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.train_from_iterator(tiny_corpus(), trainers.BpeTrainer(vocab_size=200, min_frequency=1, show_progress=False,
                                                             special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(t.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    t = Tokenizer.from_str(json.dumps(spec))
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    return _fast_tokenizer(t, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                           clean_up_tokenization_spaces=False)


def _unigram_tokenizer():
    """A SentencePiece-style Unigram model with Metaspace pieces (T5's, ALBERT's), decoded with the word
    clean-up (' .' -> '.', " n't" -> "n't") that transformers applies to non-BPE models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from conftest import tiny_corpus

    t = Tokenizer(models.Unigram())
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Metaspace()
    t.train_from_iterator(tiny_corpus() + ["don't it's a ' test' , ok ? . !"] * 5, trainers.UnigramTrainer(
        vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", show_progress=False))
    return _fast_tokenizer(t, bos_token="<s>", eos_token="</s>", unk_token="<unk>", clean_up_tokenization_spaces=True)


class _ShoutingDecoder:
    """A decoder whose last token can change every character before it: the whole text is upper-cased once
    it holds 'doctor' (no real decoder reaches this far; the windows must still give every prefix's text)."""

    def decode_chain(self, tokens):
        text = "".join(tokens).replace("▁", " ")
        return [text.upper() if "doctor" in text else text]


def _decoding_tokenizer(name: str, tiny):
    import copy

    from tokenizers import decoders

    if name == "byte_level":
        return tiny
    if name == "byte_level_cleanup":  # transformers skips the clean-up for BPE unless told it may corrupt
        tok = copy.deepcopy(tiny)
        tok.clean_up_tokenization_spaces = True
        tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
        return tok
    if name == "metaspace_byte_fallback":
        return _llama2_like_tokenizer()
    if name == "unigram":
        return _unigram_tokenizer()
    tok = _unigram_tokenizer()
    tok.backend_tokenizer.decoder = decoders.Decoder.custom(_ShoutingDecoder())  # (one that cannot be copied)
    return tok


def _id_sequences(tok, seed: int, n: int) -> list[list[int]]:
    """Random ids, and odd texts' ids cut, joined, repeated and with ids dropped or inserted (a byte run
    broken inside a character, a space token before punctuation, ...)."""
    from itlens.tokenizer import answer_stop_ids

    rng = random.Random(seed)
    usable = sorted(set(range(len(tok))) - set(answer_stop_ids(tok)))
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in ODD_TEXTS]
    out = []
    for i in range(n):
        if i % 3 == 0:
            ids = [rng.choice(usable) for _ in range(rng.randint(1, 90))]
        else:
            ids = [t for _ in range(rng.randint(1, 6)) for t in rng.choice(encoded)]
            for _ in range(rng.randint(0, 3)):
                k = rng.randrange(len(ids) + 1)
                if rng.random() < 0.5 and ids:
                    del ids[min(k, len(ids) - 1)]
                else:
                    ids.insert(k, rng.choice(usable))
            ids = ids[: rng.randint(1, len(ids) + 1)] or [rng.choice(usable)]
        out.append(ids)
    return out


@pytest.mark.parametrize("name", ["byte_level", "byte_level_cleanup", "metaspace_byte_fallback", "unigram",
                                  "non_local"])
def test_windowed_decoding_gives_every_prefix_its_own_text(tiny_tokenizer, name):
    """The generated ids' character spans come from decoding windows of a few ids, not every prefix (which
    was quadratic: 2 s for a 2048-token answer). Over random and odd id sequences (multi-byte characters
    split over byte tokens, byte-fallback runs made invalid, the first token's stripped space, clean-up
    merges, a decoder whose last token changes everything), each prefix agrees with the whole text exactly
    as far as the old algorithm found, and the encodings are the same."""
    from itlens.analysis.token_shift import _generated_encoding, _prefix_agreement
    from itlens.tokenizer import answer_stop_ids

    tok = _decoding_tokenizer(name, tiny_tokenizer)
    special = set(answer_stop_ids(tok))
    rng = random.Random(7)
    for ids in _id_sequences(tok, seed=len(name), n=150):
        full = tok.decode(ids, skip_special_tokens=True)
        prefixes = tok.batch_decode([ids[:k] for k in range(1, len(ids) + 1)], skip_special_tokens=True)
        want = [len(os.path.commonprefix([t, full])) for t in prefixes]
        assert _prefix_agreement(tok, ids, full).tolist() == want, (name, ids)
        stripped = full.strip()
        for response in (stripped, stripped[: rng.randint(0, len(stripped))].strip()):
            got = _generated_encoding(tok, "where is the city?", response, ids, special)
            ref = _generated_encoding_reference(tok, "where is the city?", response, ids, special)
            assert (got is None) == (ref is None), (name, ids, response)
            if ref is not None:
                assert got[0] == ref[0] and got[1] == ref[1] and got[4] == ref[4]
                assert got[2].tolist() == ref[2].tolist() and got[3].tolist() == ref[3].tolist()


def test_windowed_decoding_decodes_each_id_a_bounded_number_of_times(tiny_tokenizer):
    """Linear time: a 1000-token answer decodes about 1000 windows of at most a few dozen ids (before,
    every prefix: half a million ids)."""
    import copy

    from itlens.analysis.token_shift import _generated_encoding
    from itlens.tokenizer import answer_stop_ids

    tok = copy.deepcopy(tiny_tokenizer)
    decoded = []
    real = tok._decode
    tok._decode = lambda token_ids, **kw: decoded.append(len(token_ids)) or real(token_ids, **kw)
    ids = tok(" ".join(r["response"] for r in _records(5, 40)) + " 漢字 😀.", add_special_tokens=False)["input_ids"]
    ids = (ids * (1000 // len(ids) + 1))[:1000]
    full = tok.decode(ids)
    decoded.clear()
    assert _generated_encoding(tok, "where?", full.strip(), ids, set(answer_stop_ids(tok))) is not None
    assert sum(decoded) <= 40 * len(ids), sum(decoded)


@pytest.mark.parametrize("finish", ["stop", "length"])
def test_an_answer_of_whitespace_only_is_empty(models, tiny_tokenizer, finish):
    """generate writes an answer that is only whitespace as response '' with its whitespace ids (a model that
    ends its turn after '\\n\\n', or writes newlines until max_new_tokens). It has no visible text: it is
    empty, like an answer of no tokens, counted in n_empty and scored on no rows (before, its whitespace
    tokens were scored as the answer and it was not counted empty); a text of spaces alone is too."""
    from itlens.generate import _response_record
    from itlens.tokenizer import END, answer_stop_ids

    base, tuned = models
    tok = tiny_tokenizer
    prompts = _records(14, 4)
    blank = tok("\n\n \n", add_special_tokens=False)["input_ids"]
    end = [tok.convert_tokens_to_ids(END)] if finish == "stop" else []
    recs = [_response_record(p, ids + end, tok, answer_stop_ids(tok), [END], max_new_tokens=len(ids + end),
                             mode="chat", model="m")
            for p, ids in zip(prompts, [blank, tok(prompts[1]["response"], add_special_tokens=False)["input_ids"],
                                        [], blank[:1]])]
    recs.append({**prompts[3], "id": "spaces", "response": "  \n "})  # another tool's unstripped text
    assert [r["response"] for r in recs][::2] == ["", "", "  \n "] and recs[0]["response_token_ids"] == blank
    assert [r["finish"] for r in recs[:2]] == [finish, finish]
    res = compute_shift(base, tuned, recs, tokenizer=tok, base_context="template")
    assert res.tokens["id"].unique().tolist() == [recs[1]["id"]]
    assert res.summary["n_empty"] == 4 and res.summary["n_tokens"] == len(res.tokens)
    alone = compute_shift(base, tuned, recs[1:2], tokenizer=tok, base_context="template")
    assert res.tokens.equals(alone.tokens)


# ------------------------------------------------------------------- token text in running text
def _metaspace_tokenizer(scheme: str):
    """A Metaspace BPE (prepend_scheme 'first' as Llama-3-era sentencepiece conversions, 'always' as older
    ones): its decoder drops the first token's leading '▁'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from conftest import tiny_corpus

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme)
    t.decoder = decoders.Metaspace(prepend_scheme=scheme)
    t.train_from_iterator(tiny_corpus(), trainers.BpeTrainer(vocab_size=200, min_frequency=1, show_progress=False,
                                                             special_tokens=["<unk>", "<s>", "</s>"],
                                                             initial_alphabet=list("<|>?!.,T\n")))
    return _fast_tokenizer(t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _wordpiece_tokenizer():
    """BERT-style WordPiece: words joined by spaces on decoding, '##' pieces glued to the one before."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from conftest import tiny_corpus

    t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    t.normalizer = normalizers.BertNormalizer(lowercase=True)
    t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    t.decoder = decoders.WordPiece()
    t.train_from_iterator(tiny_corpus(), trainers.WordPieceTrainer(vocab_size=120, min_frequency=1, show_progress=False,
                                                                   special_tokens=["[UNK]", "[CLS]", "[SEP]"]))
    return _fast_tokenizer(t, bos_token="[CLS]", eos_token="[SEP]", unk_token="[UNK]")


RUNNING_TEXTS = ["the doctor works at the university.", "the teacher studied music. the river is blue."]


@pytest.mark.parametrize("name", ["llama2_legacy", "metaspace_first", "metaspace_always", "unigram_cleanup",
                                  "byte_level", "wordpiece"])
def test_the_token_column_is_the_text_each_token_adds_in_running_text(tiny_tokenizer, tmp_path, name):
    """Decoded alone, a Metaspace token loses its leading space (Llama-2's and Mistral's decoders strip the
    first token's), so '▁works' read 'works', the token view ran words together ('Thedoctorworks') and the
    tables lost the word boundary. The token column is now the text each token adds after the text before
    it: a response's tokens join to its text wherever the tokenizer round-trips it. A byte of a character
    split over byte-fallback tokens is U+FFFD, not garbage; WordPiece's '##' pieces glue to the word."""
    from transformers import AutoModelForCausalLM

    tok = {"llama2_legacy": _llama2_like_tokenizer, "metaspace_first": lambda: _metaspace_tokenizer("first"),
           "metaspace_always": lambda: _metaspace_tokenizer("always"), "unigram_cleanup": _unigram_tokenizer,
           "byte_level": lambda: tiny_tokenizer, "wordpiece": _wordpiece_tokenizer}[name]()
    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tok, tmp_path / "m")).eval()
    texts = RUNNING_TEXTS + (["漢字 is the city. ok"] if name == "llama2_legacy" else [])
    recs = [{"id": f"r{i}", "instruction": "where is the city?", "response": t, "model": "m"}
            for i, t in enumerate(texts)]
    res = compute_shift(model, model, recs, tokenizer=tok, base_context="template", view_top_k=len(tok))
    for rec in recs:
        joined = "".join(res.tokens[res.tokens["id"] == rec["id"]]["token"])
        text = rec["response"]
        if name == "wordpiece":  # lower-cased, and a first word adds the space after the template's '>'
            assert joined == " " + text.lower()
        elif text.isascii():
            assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # round-trips
            assert joined == text
        else:  # '漢字' is six byte-fallback tokens: each one byte of a character
            assert joined == text.encode().decode("ascii", errors="replace") == "\ufffd" * 6 + " is the city. ok"
    # the token view's top-k cells name tokens the same way (view_top_k = the vocabulary: every id is listed)
    from itlens.analysis.shift_figures import render_token_view

    page = render_token_view(res, None, tmp_path / "view.html").read_text()
    words = {t for t in res.tokens["token"] if t.strip().isalpha()}
    assert any(t.startswith(" ") for t in words) and all(f"<td>{t}</td>" in page for t in words)


def test_paper_mode_still_matches_tokens_by_their_text_decoded_alone(tmp_path):
    """AlignTDS compares tokens by ``decode([i])``; with Llama-2's decoder '▁the' and 'the' are then one
    string, though they add ' the' and 'the' in running text. Paper mode keeps that definition: its
    columns equal AlignTDS's compute_similarity on the models' own top-30 lists named by ``decode([i])``
    (and would differ, here, if they were named by the token column's text)."""
    from transformers import AutoModelForCausalLM

    from itlens.analysis.token_shift import _TokenStrings, token_texts

    tok = _llama2_like_tokenizer()
    base, tuned = (AutoModelForCausalLM.from_pretrained(make_tiny_llama(tok, tmp_path / f"m{s}", seed=s)).eval()
                   for s in (0, 1))
    recs = [{"id": f"r{i}", "instruction": "where is the city?", "response": t, "model": "m"}
            for i, t in enumerate(RUNNING_TEXTS)]
    res = compute_shift(base, tuned, recs, tokenizer=tok, base_context="template", mode="paper")
    a, t = tok.convert_tokens_to_ids(["▁a", "a"])
    sid = _TokenStrings(tok).string_ids(torch.tensor([a, t]))
    assert sid[0] == sid[1] and token_texts(tok, [a, t]) == [" a", "a"]
    alone_differs = False
    for rec in recs:
        rows = res.tokens[res.tokens["id"] == rec["id"]]
        ids = rows["token_id"].tolist()
        joint = tok(chat_prompt(tok, rec) + rec["response"] + "<|end|>")["input_ids"]
        start = next(k for k in range(len(joint)) if joint[k: k + len(ids)] == ids)
        seq = torch.tensor([joint[:start] + ids])
        with torch.no_grad():
            zb, zt = (m(input_ids=seq).logits[0, start - 1: start - 1 + len(ids)].float() for m in (base, tuned))
        for row, lb, lt in zip(rows.itertuples(), zb, zt):
            (vb, ib), (vt, it) = lb.topk(30), lt.topk(30)
            ref = {}
            for how, name in ((lambda i: tok.decode([i]), "alone"), (lambda i: token_texts(tok, [i])[0], "running")):
                ref[name] = _aligntds_reference(list(zip(map(how, ib.tolist()), vb.tolist())),
                                                list(zip(map(how, it.tolist()), vt.tolist())))
            kl, tr_class, tr, tp = ref["alone"]
            assert (row.rank_base, row.rank0_paper) == (tr_class + 1, tr)
            assert row.kl == pytest.approx(kl, rel=1e-4, abs=1e-5) and row.p_base == pytest.approx(tp, abs=1e-5)
            alone_differs |= not np.allclose(ref["alone"], ref["running"], rtol=1e-4, atol=1e-5)
    assert alone_differs  # the two namings do give other values on these lists


def test_a_composite_models_length_limit_is_read_from_its_text_config(tiny_tokenizer):
    """Gemma 3 (4B and up), Llava and Qwen2-VL keep max_position_embeddings in their text model's config;
    read only at the top, it was missing and answers were cut at 2048 tokens."""
    from conftest import make_tiny_llava

    model = make_tiny_llava(tiny_tokenizer, max_positions=3000)
    assert getattr(model.config, "max_position_embeddings", None) is None  # not at the top
    res = compute_shift(model, model, _records(2, 2), tokenizer=tiny_tokenizer, base_context="template")
    assert res.summary["max_length"] == 3000 and res.summary["n_truncated"] == 0 and len(res.tokens)


def test_an_empty_answer_whose_one_token_ran_into_the_end_of_turn_counts_as_empty_only(tmp_path):
    """An answer '.' is one token '.<|' with the end-of-turn text: left out, it leaves no rows. It counts in
    n_empty alone; before, it counted in n_fused_end as well (two buckets for one answer)."""
    from transformers import AutoModelForCausalLM

    tok = _fused_end_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tok, tmp_path / "m")).eval()
    recs = [{"id": "dot", "instruction": "where is the city?", "response": ".", "model": "m"},
            {"id": "fused", "instruction": "where is the city?", "response": "the city.", "model": "m"},
            {"id": "plain", "instruction": "where is the city?", "response": "the river is blue", "model": "m"}]
    res = compute_shift(model, model, recs, tokenizer=tok, base_context="template")
    assert res.tokens["id"].unique().tolist() == ["fused", "plain"]
    assert (res.summary["n_empty"], res.summary["n_fused_end"]) == (1, 1)


def test_a_tokenizer_without_character_offsets_is_an_input_error(tmp_path):
    """A Python-only ('slow') tokenizer, here ByT5's, gives no character offsets, which locate the response's
    tokens after the prompt: one line saying a fast tokenizer is needed (was a KeyError traceback)."""
    from transformers import ByT5Tokenizer

    slow = ByT5Tokenizer()
    assert not slow.is_fast
    model_dir = make_tiny_llama(slow, tmp_path / "byt5")
    with pytest.raises(InputError, match="slow.*needs a fast one") as e:
        compute_shift(str(model_dir), str(model_dir), _records(0, 1))
    assert str(model_dir) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("vocab", [32000, 2048, 50257, 1000])
def test_top_k_ids_blockwise_equals_topk(vocab):
    """The token view's blockwise top-k (used on accelerators) gives torch.topk's ids on distinct values,
    its values on ties (bf16 logits read as float32), and falls back to topk where blocks do not fit."""
    from itlens.analysis.token_shift import top_k_ids

    g = torch.Generator().manual_seed(vocab)
    z = torch.randn(300, vocab, generator=g)
    z[:7] += torch.linspace(0, 9, vocab)  # rows whose top entries crowd into the last blocks
    z[7:9] = -z[7:9].abs()  # all negative
    assert torch.equal(top_k_ids(z, 10, blockwise=True), z.topk(10, dim=-1).indices)
    assert torch.equal(top_k_ids(z, 3, blockwise=True), z.topk(3, dim=-1).indices)
    tied = (z * 3).round() / 3  # many equal values, top ones included
    ids = top_k_ids(tied, 10, blockwise=True)
    assert torch.equal(tied.gather(1, ids), tied.topk(10, dim=-1).values)
    assert all(len(set(r)) == 10 for r in ids.tolist())  # no id twice
    assert torch.equal(top_k_ids(z, 10), z.topk(10, dim=-1).indices)  # the CPU default: topk itself


def test_compiled_metrics_match_the_eager_ones_and_a_failed_compile_falls_back(models, tiny_tokenizer, frame_file,
                                                                               monkeypatch):
    """compile_metrics: the fused, torch.compile'd metrics give the eager engine's ranks, classes and ids, and
    its probabilities and KL to float32 rounding; null leaves them off on a CPU; a compile that fails on its
    first call warns once and computes the same columns uncompiled."""
    import itlens.analysis.token_shift as ts

    base, tuned = models
    recs = _records(7, 6, 20)
    kw = dict(tokenizer=tiny_tokenizer, frame=frame_file, batch_size=4)
    eager = compute_shift(base, tuned, recs, **kw).tokens
    fused = compute_shift(base, tuned, recs, compile_metrics=True, **kw).tokens
    assert len(eager) == len(fused) > 0
    for col in ("rank_base", "shift_class", "top1_base", "top1_tuned", "rank0_paper"):
        assert eager[col].tolist() == fused[col].tolist(), col
    for col in ("p_base", "p_tuned", "kl", "kl_base_tuned", "p_base_top1"):
        np.testing.assert_allclose(fused[col], eager[col], rtol=1e-4, atol=1e-6, err_msg=col)
    assert [list(r) for r in fused["top_base_ids"]] == [list(r) for r in eager["top_base_ids"]]
    np.testing.assert_allclose(np.stack(fused["top_tuned_p"]), np.stack(eager["top_tuned_p"]), rtol=1e-4, atol=1e-7)

    assert not ts.compiles_metrics(ts.ShiftConfig(), "cpu") and ts.compiles_metrics(ts.ShiftConfig(), "cuda")
    assert not ts.compiles_metrics(ts.ShiftConfig(mode="paper", compile_metrics=True), "cuda")
    with pytest.raises(InputError, match="compile_metrics"):
        ts.ShiftConfig(compile_metrics="yes").validate()

    def no_backend(fn, **_):
        def run(*a):
            raise RuntimeError("backend 'inductor' failed: no working C compiler\nmore")
        return run

    ts._compiled_core.cache_clear()
    monkeypatch.setattr(torch, "compile", no_backend)
    try:
        with pytest.warns(UserWarning, match="torch.compile of the token-shift metrics failed .RuntimeError: backend"):
            fallback = compute_shift(base, tuned, recs, compile_metrics=True, **kw).tokens
    finally:
        ts._compiled_core.cache_clear()
    assert fallback["rank_base"].tolist() == eager["rank_base"].tolist()
    np.testing.assert_allclose(fallback["kl"], eager["kl"], rtol=1e-4, atol=1e-6)


def _fused_inputs(n: int = 5, vocab: int = 300):
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, vocab, generator=g), torch.randn(n, vocab, generator=g), torch.randint(0, vocab, (n,))


def test_a_torch_compile_that_raises_itself_falls_back_with_a_warning(monkeypatch):
    """torch.compile can raise when called, not only on the compiled function's first call (dynamo
    unsupported on this Python or platform): that too is a failed compile, warned about, not a crash."""
    import itlens.analysis.token_shift as ts

    zb, zt, target = _fused_inputs()
    eager = ts.exact_metrics(zb, zt, target, 3, check_finite=False)

    def unsupported(fn, **_):
        raise RuntimeError("Dynamo is not supported on Python 3.12+")

    ts._compiled_core.cache_clear()
    monkeypatch.setattr(torch, "compile", unsupported)
    try:
        with pytest.warns(UserWarning, match="torch.compile of the token-shift metrics failed .RuntimeError: Dynamo"):
            fused = ts.exact_metrics(zb, zt, target, 3, check_finite=False, fused=True)
        fused_again = ts.exact_metrics(zb, zt, target, 3, check_finite=False, fused=True)  # uncompiled, no retry
    finally:
        ts._compiled_core.cache_clear()
    for out in (fused, fused_again):
        assert torch.equal(out["rank_base"], eager["rank_base"]) and torch.equal(out["view_base_ids"], eager["view_base_ids"])
        torch.testing.assert_close(out["kl"], eager["kl"])


def test_a_real_error_on_the_first_compiled_call_is_raised_not_taken_for_a_failed_compile(monkeypatch):
    """An error the uncompiled metrics raise as well (an id beyond the vocabulary, out of memory) is no
    failed compile: it is raised without the 'compile failed' warning, and compiling stays on."""
    import itlens.analysis.token_shift as ts

    zb, zt, target = _fused_inputs()
    calls = []

    def traced(fn, **_):  # a backend that works: the function itself, counted
        def run(*a):
            calls.append(1)
            return fn(*a)
        return run

    ts._compiled_core.cache_clear()
    monkeypatch.setattr(torch, "compile", traced)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no 'torch.compile ... failed' warning
            with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
                ts.exact_metrics(zb, zt, torch.full_like(target, zb.shape[1] + 5), check_finite=False, fused=True)
        out = ts.exact_metrics(zb, zt, target, check_finite=False, fused=True)
    finally:
        ts._compiled_core.cache_clear()
    assert len(calls) == 2  # the later call still ran compiled
    assert torch.equal(out["rank_base"], ts.exact_metrics(zb, zt, target)["rank_base"])


def test_the_chat_template_memo_sees_the_encoding_start_adding_bos(tiny_tokenizer):
    """ensure_chat_template's memo: a tokenizer whose encoding starts adding BOS after a check (its
    post-processor, add_bos_token, changed) gets BOS put in front of its template, as without the memo."""
    import copy

    from tokenizers.processors import TemplateProcessing

    from itlens.templates import adds_bos, ensure_chat_template

    tok = copy.deepcopy(tiny_tokenizer)
    own = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
           "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.chat_template = own
    ensure_chat_template(tok)
    assert not adds_bos(tok) and tok.chat_template == own  # no BOS added by the encoding: left alone
    bos = tok.bos_token
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)])
    assert adds_bos(tok)
    ensure_chat_template(tok)
    assert tok.chat_template == "{{ bos_token }}" + own
    ensure_chat_template(tok)
    assert tok.chat_template == "{{ bos_token }}" + own  # once


def test_the_metrics_compile_under_warnings_as_errors():
    """torch.compile emits its own DeprecationWarnings (torch.jit.script_method) while it compiles: under
    `-W error` (pytest's filterwarnings = error) they made every compile 'fail' and fall back."""
    import itlens.analysis.token_shift as ts

    g = torch.Generator().manual_seed(3)
    zb, zt = torch.randn(40, 512, generator=g), torch.randn(40, 512, generator=g)
    target = torch.randint(0, 512, (40,), generator=g)
    ts._compiled_core.cache_clear()
    torch._dynamo.reset()  # compile again in this test, not from an earlier test's compiled graph
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = ts.exact_metrics(zb, zt, target, check_finite=False, fused=True)
    finally:
        ts._compiled_core.cache_clear()
    assert torch.equal(out["rank_base"], ts.exact_metrics(zb, zt, target)["rank_base"])


def test_a_recompile_that_fails_after_a_working_compile_falls_back_too(monkeypatch):
    """A process whose compile worked and that later recompiles (a model in another dtype, another device)
    raised when that recompile failed; it now warns and runs uncompiled, as a failed first compile does."""
    import itlens.analysis.token_shift as ts

    zb, zt, target = _fused_inputs()
    calls = []

    def fails_on_bf16(fn, **_):  # a backend that compiles float32 inputs and not bfloat16 ones
        def run(*a):
            calls.append(a[0].dtype)
            if a[0].dtype == torch.bfloat16:
                raise RuntimeError("inductor: no kernel for this dtype")
            return fn(*a)
        return run

    ts._compiled_core.cache_clear()
    monkeypatch.setattr(torch, "compile", fails_on_bf16)
    try:
        first = ts.exact_metrics(zb, zt, target, check_finite=False, fused=True)
        with pytest.warns(UserWarning, match="torch.compile of the token-shift metrics failed .RuntimeError: inductor"):
            half = ts.exact_metrics(zb.bfloat16(), zt.bfloat16(), target, check_finite=False, fused=True)
        again = ts.exact_metrics(zb, zt, target, check_finite=False, fused=True)  # uncompiled from now on
    finally:
        ts._compiled_core.cache_clear()
    assert calls == [torch.float32, torch.bfloat16]
    assert torch.equal(first["rank_base"], again["rank_base"]) and half["rank_base"].shape == first["rank_base"].shape
