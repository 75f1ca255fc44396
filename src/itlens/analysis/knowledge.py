"""Knowledge analysis: does instruction tuning keep, add or destroy what the base model knew? (RQ1, F1)

The paper inferred knowledge loss from a GPT-4 factuality score; here it is measured exactly:

- closed-book QA: every answer is graded ``correct`` / ``wrong`` / ``abstained`` against gold answers
  (the world's facts through :meth:`World.parse_value`, or any JSONL of ``{id, question, answers}``
  with SQuAD-style normalisation; every entry of ``answers`` is an alias), split by eval ``group``;
- degradation: accuracy change against the base on the same questions, with a paired bootstrap 95% CI;
- SliCK (Gekhman et al. 2024): each QA instance labelled HighlyKnown / MaybeKnown / WeaklyKnown /
  Unknown relative to a model, from greedy and sampled few-shot answers (any ``answer_fn``; one on top
  of ``transformers`` generate with the world's frame is provided), so results split by category;
- multiple choice by log-likelihood (``acc``, ``acc_norm``), the lm-evaluation-harness recipe in a few
  lines, plus an optional path through ``lm_eval`` itself when it is installed.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import string
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

from itlens.analysis.stats import bootstrap_ci, paired_bootstrap
from itlens.errors import InputError
from itlens.io import atomic_write_json, atomic_write_jsonl, read_records, with_line_numbers
from itlens.plotting import styled

LABELS = ("correct", "wrong", "abstained")
SLICK_CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
ABSTAIN_PATTERNS = (
    r"\bi (?:do not|don't|dont) know\b", r"\bnot sure\b", r"\bi (?:am not|'m not) (?:sure|certain|aware)\b",
    r"\b(?:cannot|can't|can not|unable to) (?:answer|say|tell|find|provide|determine)\b",
    r"\bno (?:information|record|data)\b", r"\bunknown\b", r"\bi have no\b", r"\bnot (?:enough|sufficient) information\b",
)
AnswerFn = Callable[[list[dict], float, int], list[list[str]]]
"""``answer_fn(records, temperature, n)`` -> ``n`` answers per record (temperature 0: greedy)."""


# ------------------------------------------------------------------------------------ grading
def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (SQuAD's normalisation).

    Punctuation is Unicode's too, not only ASCII's: models write "N’Djamena" and "Paris—the capital",
    which must read as "N'Djamena" and "Paris - the capital" do."""
    text = text.lower()
    text = "".join(" " if ch in string.punctuation or unicodedata.category(ch).startswith("P") else ch
                   for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def contains_answer(response: str, answers: Sequence[str], *, names: Sequence[str] = ()) -> bool:
    """Does the normalised response contain any normalised gold answer as whole words?

    ``names``: the other names an answer of this kind may give (geo's neighbour questions: every
    country). The response is then read left to right, each match the longest gold answer or name
    starting there, so a gold answer inside a longer name is that name: "South Sudan" does not
    answer "Sudan", nor "Democratic Republic of the Congo" "Republic of the Congo".
    """
    resp = normalize_answer(response)
    gold = {a for a in (normalize_answer(x) for x in answers) if a}
    if not names:
        padded = f" {resp} "
        return any(f" {a} " in padded for a in gold)
    return bool(names_in(resp, frozenset(gold | {n for n in map(normalize_answer, names) if n})) & gold)


def names_in(text: str, names: frozenset) -> set[str]:
    """The ``names`` that a normalised ``text`` gives, read left to right as whole words, each match the
    longest name starting there (so "south sudan" gives "south sudan", not "sudan")."""
    return {m.group(0) for m in names_pattern(names).finditer(text)}


@functools.lru_cache(maxsize=256)
def names_pattern(names: frozenset) -> re.Pattern:
    """Whole-word matcher of ``names`` in normalised text (words separated by single spaces), longest
    name first; shared with :class:`itlens.geo.GeoFacts`' value parser. No names: it matches nothing."""
    keys = sorted((n for n in names if n), key=lambda k: (-len(k), k))
    if not keys:  # an empty alternation would match the empty string everywhere
        return re.compile(r"(?!x)x")
    return re.compile(r"(?<!\S)(?:" + "|".join(map(re.escape, keys)) + r")(?!\S)")


def is_abstention(response: str, patterns: Sequence[str] = ABSTAIN_PATTERNS) -> bool:
    text = response.lower().replace("\u2019", "'")
    return any(re.search(p, text) for p in patterns)


def grade(response: str, answers: Sequence[str], *, parse: Callable[[str], str | None] | None = None,
          patterns: Sequence[str] = ABSTAIN_PATTERNS, names: Sequence[str] = ()) -> dict:
    """Grade one answer: ``{label, value, no_value}``.

    With ``parse`` (the world: the first vocabulary value of the asked attribute) the extracted value
    must equal a gold answer; a response without any value is ``abstained`` when it says so and
    ``wrong`` (``no_value``) otherwise. Without ``parse``, any alias contained as whole words is correct
    (not inside a longer one of ``names``, see :func:`contains_answer`).
    """
    if parse is not None:
        value = parse(response)
        if value is None:
            abst = is_abstention(response, patterns)
            return {"label": "abstained" if abst else "wrong", "value": None, "no_value": not abst}
        ok = normalize_answer(value) in {normalize_answer(a) for a in answers}
        return {"label": "correct" if ok else "wrong", "value": value, "no_value": False}
    if contains_answer(response, answers, names=names):
        return {"label": "correct", "value": None, "no_value": False}
    if is_abstention(response, patterns):
        return {"label": "abstained", "value": None, "no_value": False}
    return {"label": "wrong", "value": None, "no_value": False}


def read_qa(path: str | Path) -> list[dict]:
    """QA records ``{id, question | instruction, answers: [str, ...]}``; the question lands in ``instruction``."""
    rows = read_records(path, "any")
    out = []
    for lineno, r in with_line_numbers(path, rows):
        q = r.get("question", r.get("instruction"))
        if not isinstance(q, str) or not q.strip():
            raise InputError("expected a non-empty string", file=path, line=lineno, field="question")
        _check_answers(r.get("answers"), path, lineno)
        out.append({**r, "instruction": q})
    return out


def _check_answers(ans, path: str | Path, lineno: int) -> None:
    if not isinstance(ans, list) or not ans or not all(isinstance(a, str) and a.strip() for a in ans):
        raise InputError("expected a non-empty list of non-empty strings", file=path, line=lineno, field="answers")
    if not any(normalize_answer(a) for a in ans):  # "A" (a choice letter), "The": nothing left to match
        raise InputError(f"no answer keeps a word after normalisation (articles and punctuation are dropped), "
                         f"so none could be graded correct: {ans}; for multiple-choice letters use mc.items",
                         file=path, line=lineno, field="answers")


def alias_names(world, attribute: str | None) -> tuple[str, ...]:
    """For an attribute of the fact source's ``alias_attributes`` (geo's several-valued ``neighbour``, graded
    by its aliases): every name such an answer may give, the entities' names and every entity's aliases
    of that attribute (see :func:`contains_answer`). Else ``()``."""
    if world is None or attribute not in getattr(world, "alias_attributes", ()):
        return ()
    return tuple(sorted({p["name"] for p in world.people if p.get("name")}
                        | {a for p in world.people for a in p.get("answers", {}).get(attribute, ())}))


def world_parser(world, record: dict) -> Callable[[str], str | None] | None:
    """The exact value parser for a world record (``attribute`` set and not ``describe``), else None."""
    attr = record.get("attribute")
    if world is None or not attr or attr not in world.attributes:
        return None
    return lambda text: world.parse_value(attr, text)


def grade_responses(eval_records: Sequence[dict], responses: Sequence[dict] | dict[str, str], *, world=None,
                    patterns: Sequence[str] = ABSTAIN_PATTERNS, categories: dict[str, str] | None = None,
                    source: str | None = None) -> list[dict]:
    """Grade each eval record's response; one row ``{id, group, label, correct, value, no_value, ...}``.

    ``responses``: response records or ``{id: text}``. Every eval id needs a response.
    ``categories``: optional ``{id: category}`` (e.g. SliCK labels) copied into each row.
    """
    by_id = responses if isinstance(responses, dict) else {r["id"]: r["response"] for r in responses}
    names = functools.lru_cache(maxsize=None)(lambda attr: alias_names(world, attr))
    rows = []
    for rec in eval_records:
        if rec["id"] not in by_id:
            raise InputError(f"no response for eval id {rec['id']!r}", file=source, field="id")
        text = by_id[rec["id"]]
        answers = rec.get("answers") or []
        g = grade(text, answers, parse=world_parser(world, rec), patterns=patterns,
                  names=names(rec.get("attribute")))
        row = {"id": rec["id"], "group": str(rec.get("group", "all")), "label": g["label"],
               "correct": int(g["label"] == "correct"), "value": g["value"], "no_value": g["no_value"]}
        for k in ("person", "attribute"):
            if k in rec:
                row[k] = rec[k]
        if categories is not None:
            row["category"] = categories.get(rec["id"], "unlabelled")
        rows.append(row)
    return rows


def _counts(rows: Sequence[dict], *, n_resamples: int, seed: int) -> dict:
    c = Counter(r["label"] for r in rows)
    n = len(rows)
    ci = bootstrap_ci([r["correct"] for r in rows], n_resamples=n_resamples, seed=seed)
    return {"n": n, "acc": ci["estimate"], "acc_low": ci["low"], "acc_high": ci["high"],
            **{lab: c.get(lab, 0) for lab in LABELS},
            **{f"{lab}_rate": (c.get(lab, 0) / n if n else None) for lab in LABELS},
            "no_value": sum(bool(r.get("no_value")) for r in rows)}


def accuracy_summary(graded: Sequence[dict], *, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Accuracy with a bootstrap CI and label counts, overall, ``by_group`` and ``by_category``."""
    out = _counts(graded, n_resamples=n_resamples, seed=seed)
    for key, parts in _split_by(graded, graded).items():
        out[f"by_{key}"] = {k: _counts(v, n_resamples=n_resamples, seed=seed) for k, v in parts.items()}
    return out


def _split_by(labelled: Sequence[dict], values: Sequence[Any]) -> dict[str, dict[str, list]]:
    """``{"group" | "category": {label: [values of the records with that label]}}``, labels sorted; a key
    no record carries is left out."""
    out: dict[str, dict[str, list]] = {}
    for key in ("group", "category"):
        parts: dict[str, list] = defaultdict(list)
        for r, v in zip(labelled, values):
            if key in r:
                parts[str(r[key])].append(v)
        if parts:
            out[key] = dict(sorted(parts.items()))
    return out


def degradation(base: Sequence[dict], tuned: Sequence[dict], *, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Accuracy change tuned - base on the questions both answered (paired bootstrap CI, p-value), by group."""
    b = {r["id"]: r for r in base}
    pairs = [(b[r["id"]], r) for r in tuned if r["id"] in b]
    out = {"overall": paired_bootstrap([x["correct"] for x, _ in pairs], [y["correct"] for _, y in pairs],
                                       n_resamples=n_resamples, seed=seed)}
    groups: dict[str, list] = defaultdict(list)
    for x, y in pairs:
        groups[x["group"]].append((x, y))
    out["by_group"] = {g: paired_bootstrap([x["correct"] for x, _ in ps], [y["correct"] for _, y in ps],
                                           n_resamples=n_resamples, seed=seed) for g, ps in sorted(groups.items())}
    return out


# ------------------------------------------------------------------------------------ SliCK
def slick_category(greedy_correct: Sequence[bool], sampled_correct: Sequence[bool]) -> str:
    """Gekhman et al.'s SliCK category from greedy (one per few-shot prompt) and sampled answers."""
    if greedy_correct and all(greedy_correct):
        return "HighlyKnown"
    if any(greedy_correct):
        return "MaybeKnown"
    if any(sampled_correct):
        return "WeaklyKnown"
    return "Unknown"


def world_qa_records(world, records: Sequence[dict]) -> list[dict]:
    """Single-attribute world records (IT or eval) with ``answers`` filled from the ground truth (every
    accepted alias where the source lists them, as geo's eval records carry them); also records of the
    source's ``alias_attributes`` (geo's several-valued ``neighbour``), graded by their answers."""
    out = []
    keep = set(world.attributes) | set(getattr(world, "alias_attributes", ()))
    for r in records:
        if r.get("attribute") in keep and r.get("person"):
            out.append({**r, "answers": r.get("answers") or _truth(world.person(r["person"]), r["attribute"])})
    return out


def _truth(person: dict, attribute: str) -> list[str]:
    return list(person.get("answers", {}).get(attribute) or [person["attrs"][attribute]])


def slick_labels(records: Sequence[dict], answer_fn: AnswerFn, *, world=None, n_greedy: int = 1,
                 n_sampled: int = 8, temperature: float = 0.5,
                 patterns: Sequence[str] = ABSTAIN_PATTERNS) -> list[dict]:
    """Label QA records (``instruction``, ``answers``) relative to the model behind ``answer_fn``.

    Returns ``{id, category, p_greedy, p_sampled}`` per record (P_correct of greedy and sampled answers;
    ``None`` without any, e.g. ``n_sampled=0``).
    """
    records = list(records)
    greedy = answer_fn(records, 0.0, n_greedy)
    sampled = answer_fn(records, temperature, n_sampled) if n_sampled > 0 else [[] for _ in records]
    for name, got in (("greedy", greedy), ("sampled", sampled)):  # zip would drop the records left over
        if len(got) != len(records):
            raise ValueError(f"answer_fn gave {len(got)} {name} answer lists for {len(records)} records")
    out = []
    alias = functools.lru_cache(maxsize=None)(lambda attr: alias_names(world, attr))
    for rec, gs, ss in zip(records, greedy, sampled):
        parse, names = world_parser(world, rec), alias(rec.get("attribute"))
        gc = [grade(a, rec["answers"], parse=parse, patterns=patterns, names=names)["label"] == "correct" for a in gs]
        sc = [grade(a, rec["answers"], parse=parse, patterns=patterns, names=names)["label"] == "correct" for a in ss]
        out.append({"id": rec["id"], "category": slick_category(gc, sc),
                    "p_greedy": sum(gc) / len(gc) if gc else None, "p_sampled": sum(sc) / len(sc) if sc else None})
    return out


def hf_answer_fn(model, tokenizer, frames: Sequence[str], *, max_new_tokens: int = 24, batch_size: int = 16,
                 seed: int = 0) -> AnswerFn:
    """An ``answer_fn`` for a causal LM answering inside few-shot frames ("# Query / # Answer").

    Draw ``j`` of a record uses ``frames[j % len(frames)]`` (Gekhman et al. vary the few-shot examples
    between greedy answers); sampling is seeded, so labels are reproducible, and leaves the caller's
    random state alone. Prompts are encoded as generation encodes them
    (:func:`itlens.templates.encode_prompts`): BOS first when the tokenizer's own encoding adds it (Gemma,
    Llama), as the model was pretrained; it decodes as generation does (:func:`itlens.generate.plain_decoding`:
    no repetition penalty or other setting of the model's ``generation_config.json``); batches are left-padded and masked as generation pads them
    (:func:`itlens.generate.left_padded`, a tokenizer without a pad token included), so an answer does not
    depend on its batch-mates. An answer ends, as in generation (:func:`itlens.tokenizer.answer_stop_ids`),
    at any special token (Gemma's ``<end_of_turn>`` as well as EOS), or where the next exchange begins.
    """
    import torch

    from itlens.generate import left_padded, padding_id, plain_decoding
    from itlens.templates import FRAME_STOP, adds_bos, encode_prompts, frame_prompt
    from itlens.tokenizer import answer_stop_ids

    if not frames:
        raise ValueError("need at least one frame")
    bos = adds_bos(tokenizer)
    stop_ids = answer_stop_ids(tokenizer)
    pad_id = padding_id(tokenizer, stop_ids)
    ends = set(stop_ids) | {pad_id}

    def text_of(ids: list[int]) -> str:
        n = next((k for k, t in enumerate(ids) if t in ends), len(ids))
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        for stop in (FRAME_STOP, "\n\n"):
            text = text.split(stop)[0]
        return text.strip()

    def answer(records: list[dict], temperature: float, n: int) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in records]
        model.eval()
        device = next(model.parameters()).device
        # as generation decodes: no logits processor of the model's generation_config.json (a hub model's
        # repetition_penalty) changes the greedy answer or truncates the sampled distribution
        kw = plain_decoding(temperature)
        for j in range(n):
            frame = frames[j % len(frames)]
            ids = encode_prompts(tokenizer, [frame_prompt(frame, r) for r in records], bos=bos)
            for start in range(0, len(ids), batch_size):
                batch = left_padded(ids[start:start + batch_size], pad_id, device)
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                        torch.inference_mode():
                    torch.manual_seed(seed * 1_000_003 + j * 7919 + start)
                    gen = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                         eos_token_id=stop_ids, **kw)
                for i, row in enumerate(gen[:, batch["input_ids"].shape[1]:].tolist()):
                    out[start + i].append(text_of(row))
        return out

    return answer


# ------------------------------------------------------------------------------------ multiple choice
def read_mc(path: str | Path) -> list[dict]:
    """Multiple-choice items ``{id, question, choices: [str, ...], gold: int}``."""
    rows = read_records(path, "any")
    for lineno, r in with_line_numbers(path, rows):
        if not isinstance(r.get("question"), str):
            raise InputError("expected a string", file=path, line=lineno, field="question")
        ch = r.get("choices")
        if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
            raise InputError("expected a list of at least 2 non-empty strings", file=path, line=lineno, field="choices")
        if len(set(ch)) < len(ch):  # two equal choices split one answer's score, and one of them is "wrong"
            dup = next(c for i, c in enumerate(ch) if c in ch[:i])
            raise InputError(f"choice {dup!r} is given twice", file=path, line=lineno, field="choices")
        g = r.get("gold")
        if not isinstance(g, int) or isinstance(g, bool) or not 0 <= g < len(ch):
            raise InputError(f"expected an index into choices (0..{len(ch) - 1})", file=path, line=lineno, field="gold")
    return rows


MC_TEMPLATE = "Question: {question}\nAnswer:"


def world_mc_items(world, records: Sequence[dict], *, n_choices: int = 4, seed: int = 0) -> list[dict]:
    """Multiple-choice items from single-attribute world records: the gold value and random distractors.

    A distractor is never a value that QA grading would accept for the record (geo: another country's
    language name that is also one of this country's accepted answers, e.g. "English" for India).
    """
    import random

    rng = random.Random(seed)
    items = []
    for r in world_qa_records(world, records):
        if r.get("attribute") not in world.vocab:  # no single value to choose (geo neighbours)
            continue
        gold = r["answers"][0]
        parse = world_parser(world, r)
        others = [v for v in world.vocab[r["attribute"]]
                  if v != gold and grade(v, r["answers"], parse=parse)["label"] != "correct"]
        choices = rng.sample(others, min(n_choices - 1, len(others))) + [gold]
        rng.shuffle(choices)
        items.append({"id": r["id"], "question": r["instruction"], "choices": choices, "gold": choices.index(gold),
                      "group": r.get("group", "all"), **({"category": r["category"]} if "category" in r else {})})
    return items


def _prefix_token_id(tokenizer) -> int:
    """lm-evaluation-harness's ``prefix_token_id``: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _encode(tokenizer, text: str, add_bos: bool | None) -> list[int]:
    if add_bos is None:  # lm-eval's HFLM.tok_encode with add_bos_token unset: the tokenizer's own special
        bos_str = tokenizer.decode([_prefix_token_id(tokenizer)])  # tokens, unless the text starts with BOS
        return tokenizer(text, add_special_tokens=not text.startswith(bos_str))["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [_prefix_token_id(tokenizer)] + ids if add_bos else ids


def _encode_pair(tokenizer, context: str, continuation: str, add_bos: bool | None = None
                 ) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: trailing spaces move to the continuation, the pair is encoded jointly.

    ``add_bos``: ``None`` (lm-eval's default rule) encodes with the tokenizer's own special tokens,
    so a tokenizer that adds BOS (Gemma, Llama) gets it and one that does not (GPT-2, the world's)
    does not; ``True``/``False`` force BOS on or off. An empty context is BOS (else EOS), as in lm-eval.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    if not context:
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        prefix = _prefix_token_id(tokenizer)
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    whole = _encode(tokenizer, context + continuation, add_bos)
    ctx = _encode(tokenizer, context, add_bos)
    return ctx, whole[len(ctx):]


def mc_loglikelihoods(model, tokenizer, items: Sequence[dict], *, template: str = MC_TEMPLATE,
                      delimiter: str = " ", add_bos: bool | None = None, batch_size: int = 16) -> list[list[float]]:
    """Sum of log-probabilities of each choice (``delimiter + choice``) after the templated question.

    Encoded as lm-evaluation-harness encodes it (``add_bos=None``: the tokenizer's own special tokens,
    i.e. BOS for Gemma and Llama, none for the world's tokenizer); ``True``/``False`` force BOS on/off.
    """
    import torch

    requests = []
    for it in items:
        ctx = template.format(question=it["question"])
        for ch in it["choices"]:
            requests.append(_encode_pair(tokenizer, ctx, delimiter + ch, add_bos))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lls: list[float] = []
    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(requests), batch_size):
            chunk = requests[start:start + batch_size]
            seqs = [c + k for c, k in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(seqs):
                ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            # normalise only the rows that predict a continuation token (a 262k vocabulary makes the
            # full [batch, length, vocab] log-softmax the dominant cost)
            rows = torch.cat([torch.full((len(k),), i) for i, (_, k) in enumerate(chunk)])
            cols = torch.cat([torch.arange(len(c) - 1, len(c) + len(k) - 1) for c, k in chunk])
            target = torch.tensor([t for _, k in chunk for t in k])
            lp = torch.log_softmax(logits[rows.to(device), cols.to(device)].float(), dim=-1) \
                .gather(1, target[:, None].to(device))[:, 0].cpu()
            sums = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, rows, lp.double())
            lls.extend(float(x) for x in sums)
    out, cursor = [], 0
    for it in items:
        out.append(lls[cursor:cursor + len(it["choices"])])
        cursor += len(it["choices"])
    return out


def mc_scores(items: Sequence[dict], lls: Sequence[Sequence[float]], *, n_resamples: int = 2000,
              seed: int = 0) -> dict:
    """``acc`` (argmax log-likelihood) and ``acc_norm`` (divided by the choice's length in characters),
    overall and, where items carry them, ``by_group`` and ``by_category`` (e.g. SliCK labels)."""
    import numpy as np

    acc, acc_norm, rows = [], [], []
    for it, ll in zip(items, lls):
        ll = np.asarray(ll)
        lens = np.array([float(len(c)) for c in it["choices"]])
        a, an = int(np.argmax(ll) == it["gold"]), int(np.argmax(ll / lens) == it["gold"])
        acc.append(a)
        acc_norm.append(an)
        rows.append({"id": it["id"], "acc": a, "acc_norm": an, "lls": ll.tolist()})
    ci = bootstrap_ci(acc, n_resamples=n_resamples, seed=seed)
    out = {"n": len(rows), "acc": ci["estimate"], "acc_low": ci["low"], "acc_high": ci["high"],
           "acc_norm": float(np.mean(acc_norm)) if acc_norm else None}
    for key, parts in _split_by(items, acc).items():
        cis = {k: bootstrap_ci(v, n_resamples=n_resamples, seed=seed) for k, v in parts.items()}
        out[f"by_{key}"] = {k: {"n": len(parts[k]), "acc": c["estimate"], "acc_low": c["low"], "acc_high": c["high"]}
                            for k, c in cis.items()}
    return {**out, "items": rows}


def mc_lm_eval(model_dir: str | Path, items_path: str | Path, *, template: str = MC_TEMPLATE,
               work_dir: str | Path, device: str = "cpu", dtype: str = "float32") -> dict:
    """Score the same items through lm-evaluation-harness (optional dependency) on a local task file.

    Returns ``{acc, acc_norm, n}``. Raises InputError when ``lm_eval`` is not installed.
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise InputError("lm-evaluation-harness is not installed (pip install lm_eval)", key="mc.backend") from None
    import yaml

    work_dir = Path(work_dir)
    task_dir = work_dir / "lm_eval_tasks"
    task_dir.mkdir(parents=True, exist_ok=True)
    jinja_q = template.replace("{question}", "{{question}}")
    (task_dir / "itlens_mc.yaml").write_text(yaml.safe_dump({
        "task": "itlens_mc", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(items_path).resolve())}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": jinja_q, "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}))
    from itlens.models import _adapter_base, is_adapter_dir, resolve_model

    path = resolve_model(model_dir)  # lm_eval's hf model reads an adapter as peft= beside its base, not as pretrained=
    weights = f"pretrained={_adapter_base(path)},peft={path}" if is_adapter_dir(path) else f"pretrained={path}"
    res = lm_eval.simple_evaluate(model="hf", model_args=f"{weights},dtype={dtype}", tasks=["itlens_mc"],
                                  task_manager=TaskManager(include_path=str(task_dir)), batch_size=8, device=device,
                                  log_samples=False)
    r = res["results"]["itlens_mc"]
    return {"acc": r["acc,none"], "acc_norm": r["acc_norm,none"], "n": res["n-samples"]["itlens_mc"]["effective"]}


# ------------------------------------------------------------------------------------ figure
@styled
def plot_accuracy(models: dict[str, dict], path: str | Path, *, by: str = "group") -> Path:
    """Grouped bars: QA accuracy (bootstrap 95% CI) per model and eval group (or SliCK category)."""
    import numpy as np

    from itlens.plotting import save_fig, subplots

    key = f"by_{by}"
    cats = sorted({c for m in models.values() for c in m.get(key, {})}) or ["all"]
    names = list(models)
    fig, ax = subplots(figsize=(max(4.0, 1.2 * len(names) * max(1, len(cats)) / 2 + 2), 3.2))
    width = 0.8 / len(cats)
    for j, c in enumerate(cats):
        vals, lo, hi = [], [], []
        for n in names:
            s = models[n].get(key, {}).get(c, models[n] if c == "all" else {})
            a = s.get("acc") or 0.0
            vals.append(a)
            lo.append(max(0.0, a - (s.get("acc_low") if s.get("acc_low") is not None else a)))  # a CI from few
            hi.append(max(0.0, (s.get("acc_high") if s.get("acc_high") is not None else a) - a))  # resamples may miss a
        ax.bar(np.arange(len(names)) + j * width - 0.4 + width / 2, vals, width, yerr=[lo, hi], capsize=2, label=c)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("QA accuracy")
    ax.set_title(f"Closed-book QA accuracy by model and {by}")
    ax.legend(fontsize=7)
    return save_fig(fig, path)


# ------------------------------------------------------------------------------------ the command
@dataclasses.dataclass
class SlickSettings:
    """Known/Unknown labelling of QA records relative to a model (off unless ``model`` is set)."""

    model: str = dataclasses.field(default="", metadata={"help": "Model dir to label against (usually the base)."})
    records: str = dataclasses.field(default="", metadata={
        "help": "QA records to label (JSONL; world IT or eval records, or {id, question, answers}). "
                "Default: the eval file."})
    n_greedy: int = dataclasses.field(default=1, metadata={
        "help": "Greedy answers per record, one per frame (frames rotate)."})
    n_sampled: int = dataclasses.field(default=8, metadata={"help": "Sampled answers per record."})
    temperature: float = dataclasses.field(default=0.5, metadata={"help": "Sampling temperature (Gekhman: 0.5)."})
    max_new_tokens: int = dataclasses.field(default=24, metadata={"help": "Answer length cap."})
    frames: list[str] = dataclasses.field(default_factory=list, metadata={
        "help": "Few-shot frame files ({instruction} slot). Default: the world's (or geo folder's) frame.txt, else "
                "prompts/base_frame.txt."})


@dataclasses.dataclass
class MCSettings:
    """Multiple-choice knowledge probes scored by log-likelihood (off unless ``models`` is set)."""

    items: str = dataclasses.field(default="", metadata={
        "help": "JSONL of {id, question, choices, gold}. Default with a world: built from the eval records."})
    models: dict[str, str] = dataclasses.field(default_factory=dict, metadata={
        "help": "Model name -> model dir (or LoRA adapter dir) to score."})
    template: str = dataclasses.field(default=MC_TEMPLATE, metadata={"help": "Context template, {question} slot."})
    backend: str = dataclasses.field(default="itlens", metadata={
        "help": "itlens (own implementation) or lm_eval (lm-evaluation-harness, when installed)."})


@dataclasses.dataclass
class KnowledgeConfig:
    """Closed-book QA accuracy per model, degradation against the base, SliCK labels and MC probes."""

    eval: str = dataclasses.field(default="", metadata={
        "help": "Eval QA file: the world's eval.jsonl or any JSONL of {id, question|instruction, answers}."})
    responses: dict[str, str] = dataclasses.field(default_factory=dict, metadata={
        "help": "Model name -> responses JSONL (CONTRACT response records with the eval ids)."})
    world: str = dataclasses.field(default="", metadata={
        "help": "World dir (or geo folder from `itlens geo`): answers are then parsed exactly per attribute."})
    base: str = dataclasses.field(default="base", metadata={
        "help": "The entry of `responses` that degradation is measured against."})
    categories: str = dataclasses.field(default="", metadata={
        "help": "JSONL of {id, category} (e.g. slick.jsonl from a previous run) to split accuracy by. "
                "Default: slick's labels when it runs on the eval set, else the eval records' own `category`."})
    abstain_patterns: list[str] = dataclasses.field(default_factory=lambda: list(ABSTAIN_PATTERNS), metadata={
        "help": "Regexes (on lower-cased text) that mark an answer as an abstention."})
    n_resamples: int = dataclasses.field(default=2000, metadata={"help": "Bootstrap resamples for CIs."})
    seed: int = dataclasses.field(default=0, metadata={"help": "Seed for resampling and sampling."})
    device: str = dataclasses.field(default="auto", metadata={
        "help": "Where the slick and mc models run: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."})
    dtype: str = dataclasses.field(default="float32", metadata={
        "help": "Weights dtype of the slick and mc models: float32, bfloat16, float16 or auto (the checkpoint's)."})
    slick: SlickSettings = dataclasses.field(default_factory=SlickSettings, metadata={"help": "SliCK labelling."})
    mc: MCSettings = dataclasses.field(default_factory=MCSettings, metadata={"help": "Multiple-choice probes."})

    def validate(self) -> None:
        from itlens.models import DTYPES

        if not self.eval:
            raise InputError("required: the eval QA file", key="eval")
        if not self.responses and not self.mc.models:
            raise InputError("required: at least one model's responses (or mc.models)", key="responses")
        if self.responses and self.base not in self.responses:
            raise InputError(f"base {self.base!r} is not one of the responses ({', '.join(self.responses)})",
                             key="base")
        if self.mc.backend not in ("itlens", "lm_eval"):
            raise InputError("expected itlens or lm_eval", key="mc.backend")
        if self.n_resamples < 1:
            raise InputError(f"expected an integer >= 1, got {self.n_resamples}", key="n_resamples")
        if self.dtype not in DTYPES:
            raise InputError(f"unknown dtype {self.dtype!r} (expected one of {list(DTYPES)})", key="dtype")
        if not isinstance(self.device, str) or not self.device:
            raise InputError("expected auto, cpu, cuda, cuda:1, ...", key="device")
        # SliCK's labels need a greedy answer (none labelled every record Unknown), sampling a temperature
        for key, low in (("n_greedy", 1), ("n_sampled", 0), ("max_new_tokens", 1)):
            if getattr(self.slick, key) < low:
                raise InputError(f"expected an integer >= {low}, got {getattr(self.slick, key)}", key=f"slick.{key}")
        if self.slick.n_sampled and not self.slick.temperature > 0:
            raise InputError(f"expected a temperature > 0 to sample with, got {self.slick.temperature}",
                             key="slick.temperature")
        try:  # the question must reach the context (else every item is scored on one context)
            filled = self.mc.template.format(question="\0")
        except (KeyError, IndexError, ValueError) as e:
            raise InputError(f"expected a template with one {{question}} slot ({type(e).__name__}: {e})",
                             key="mc.template") from None
        if "\0" not in filled:
            raise InputError("expected a template with a {question} slot", key="mc.template")


def inference_device(device: str) -> str:
    """``device`` with auto resolved to cuda when available: a real model on a GPU machine should not run
    on the CPU (the geo probe uses it too)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_fact_source(path: str | Path):
    """The exact ground truth behind a data folder: a synthetic world (world.json) or geo facts (facts.json)."""
    path = Path(path)
    if not (path / "world.json").is_file() and (path / "facts.json").is_file():
        from itlens.geo import GeoFacts

        return GeoFacts.load(path)
    from itlens.world import World

    return World.load(path)


def _read_categories(path: str) -> dict[str, str]:
    out = {}
    for lineno, r in with_line_numbers(path, read_records(path, "any")):
        if not isinstance(r.get("category"), str):
            raise InputError("expected a string", file=path, line=lineno, field="category")
        out[r["id"]] = r["category"]
    return out


def _read_eval(cfg: KnowledgeConfig, world) -> list[dict]:
    rows = read_records(cfg.eval, "any")
    if world is not None and all("attribute" in r for r in rows):
        return _world_qa_file(world, cfg.eval, rows)
    return read_qa(cfg.eval)


def _world_qa_file(world, path: str | Path, rows: list[dict]) -> list[dict]:
    """:func:`world_qa_records` of a file's records: the world fills in the answers a record leaves out,
    so a fact it does not hold (records of another world or geo folder) is an error at that line."""
    keep = set(world.attributes) | set(getattr(world, "alias_attributes", ()))
    for lineno, r in with_line_numbers(path, rows):
        if r.get("answers") is not None:
            _check_answers(r["answers"], path, lineno)
        elif r.get("person") and r.get("attribute") in keep:
            try:
                _truth(world.person(r["person"]), r["attribute"])
            except KeyError:
                raise InputError(f"the world holds no {r['attribute']} of {r['person']!r} (records of another "
                                 "world?)", file=path, line=lineno, field="person") from None
    return world_qa_records(world, rows)


def run_knowledge(cfg: KnowledgeConfig, out_dir: str | Path) -> dict:
    """``itlens knowledge``: writes ``graded.jsonl``, ``knowledge.json`` and figures; returns the metrics."""
    from itlens.io import atomic_dir

    world = load_fact_source(cfg.world) if cfg.world else None
    eval_records = _read_eval(cfg, world)
    categories = _read_categories(cfg.categories) if cfg.categories else None
    metrics: dict[str, Any] = {"base": cfg.base if cfg.responses else None, "models": {}, "degradation": {}}
    with atomic_dir(out_dir) as tmp:
        slick_rows = None
        if cfg.slick.model:
            slick_rows = _run_slick(cfg, world, eval_records)
            atomic_write_jsonl(tmp / "slick.jsonl", slick_rows)
            metrics["slick"] = {"n": len(slick_rows),
                                "counts": {c: sum(r["category"] == c for r in slick_rows) for c in SLICK_CATEGORIES}}
            if categories is None and not cfg.slick.records:
                categories = {r["id"]: r["category"] for r in slick_rows}
        if categories is None:  # labels the eval records carry (a probed geo folder)
            categories = {r["id"]: r["category"] for r in eval_records if isinstance(r.get("category"), str)} or None
        graded_all = {}
        for name, path in sorted(cfg.responses.items()):
            responses = read_records(path, "response")
            graded = grade_responses(eval_records, responses, world=world, patterns=cfg.abstain_patterns,
                                     categories=categories, source=path)
            graded_all[name] = graded
            metrics["models"][name] = accuracy_summary(graded, n_resamples=cfg.n_resamples, seed=cfg.seed)
        rows = [{"model": m, **r} for m, g in graded_all.items() for r in g]
        atomic_write_jsonl(tmp / "graded.jsonl", rows)
        for name, graded in graded_all.items():
            if name != cfg.base:
                metrics["degradation"][name] = degradation(graded_all[cfg.base], graded, n_resamples=cfg.n_resamples,
                                                           seed=cfg.seed)
        if cfg.mc.models:
            metrics["mc"] = _run_mc(cfg, world, eval_records, tmp)
        if metrics["models"]:
            plot_accuracy(metrics["models"], tmp / "knowledge_accuracy.png")
            if categories is not None:
                plot_accuracy(metrics["models"], tmp / "knowledge_by_category.png", by="category")
        atomic_write_json(tmp / "knowledge.json", metrics)
    return metrics


def _run_slick(cfg: KnowledgeConfig, world, eval_records: list[dict]) -> list[dict]:
    from itlens.models import load_model
    from itlens.templates import load_frame

    if cfg.slick.records:
        records = _world_qa_file(world, cfg.slick.records, read_records(cfg.slick.records, "any")) \
            if world is not None else read_qa(cfg.slick.records)
    else:
        records = eval_records
    if cfg.slick.frames:
        frames = [load_frame(f) for f in cfg.slick.frames]
    elif world is not None:
        frames = [world.frame_text()]
    else:
        frames = [load_frame()]
    lm = load_model(cfg.slick.model, dtype=cfg.dtype, device=inference_device(cfg.device))
    fn = hf_answer_fn(lm.model, lm.tokenizer, frames, max_new_tokens=cfg.slick.max_new_tokens, seed=cfg.seed)
    return slick_labels(records, fn, world=world, n_greedy=cfg.slick.n_greedy, n_sampled=cfg.slick.n_sampled,
                        temperature=cfg.slick.temperature, patterns=cfg.abstain_patterns)


def _run_mc(cfg: KnowledgeConfig, world, eval_records: list[dict], tmp: Path) -> dict:
    from itlens.io import atomic_write_jsonl as write
    from itlens.models import load_model

    if cfg.mc.items:
        items, items_path = read_mc(cfg.mc.items), Path(cfg.mc.items)
    elif world is not None:
        items = world_mc_items(world, eval_records, seed=cfg.seed)
        items_path = write(tmp / "mc_items.jsonl", items)
    else:
        raise InputError("multiple choice needs mc.items (or a world to build them from)", key="mc.items")
    out = {}
    for name, path in sorted(cfg.mc.models.items()):
        if cfg.mc.backend == "lm_eval":
            out[name] = mc_lm_eval(path, items_path, template=cfg.mc.template, work_dir=tmp / f"lm_eval-{name}",
                                   device=inference_device(cfg.device), dtype=cfg.dtype)
            continue
        lm = load_model(path, dtype=cfg.dtype, device=inference_device(cfg.device))
        res = mc_scores(items, mc_loglikelihoods(lm.model, lm.tokenizer, items, template=cfg.mc.template),
                        n_resamples=cfg.n_resamples, seed=cfg.seed)
        write(tmp / f"mc-{name}.jsonl", res.pop("items"))
        out[name] = res
    return out
