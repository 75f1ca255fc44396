"""Data variants of an instruction set: nested size subsets, score filters, simplified responses.

Each transform is a pure function on records plus a writer that saves the new dataset together with
``<name>.provenance.json`` (source file and its sha256, transform, parameters, output sha256), so every
tuned model can be traced back to the exact data it saw.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path
from typing import Callable

from itlens.errors import InputError
from itlens.io import (atomic_write_json, atomic_write_jsonl, iter_jsonl, read_records, response_text, user_text,
                       with_line_numbers)

Rewriter = Callable[[str, str], str]
"""``rewrite(instruction, response) -> simplified response`` (e.g. :class:`itlens.judge.Rewriter`)."""


def _rank_key(seed: int, rid: str) -> str:
    return hashlib.sha256(f"{seed}:{rid}".encode()).hexdigest()


def subset(records: list[dict], n: int, *, seed: int = 0) -> list[dict]:
    """The ``n`` records ranked first by a seeded hash of their id, in their original order.

    The ranking does not depend on ``n``, so with one seed the 1k subset lies inside the 10k one.
    """
    if n <= 0:
        raise InputError(f"subset size must be positive, got {n}", key="n")
    if n > len(records):
        raise InputError(f"subset size {n} is larger than the dataset ({len(records)} records)", key="n")
    chosen = set(sorted(range(len(records)), key=lambda i: _rank_key(seed, records[i]["id"]))[:n])
    return [r for i, r in enumerate(records) if i in chosen]


def read_scores(path: str | Path, field: str = "score") -> dict[str, float]:
    """``{id: score}`` from a JSONL of ``{"id", field}`` rows (the judge's ``judge.jsonl`` with ``field="mean"``)."""
    scores: dict[str, float] = {}
    first: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        rid, value = obj.get("id"), obj.get(field)
        if not isinstance(rid, str) or not rid:
            raise InputError("expected a non-empty string id", file=path, line=lineno, field="id")
        if rid in first:
            raise InputError(f"duplicate id {rid!r} (first on line {first[rid]})", file=path, line=lineno, field="id")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            got = "no such field" if field not in obj else f"got {value!r}"
            hint = ""
            if field not in obj and "scores" in obj and "mean" in obj:
                hint = " (this is the judge's judge.jsonl: use --field mean)"
            elif field == "mean" and value is None and obj.get("status") in ("parse_failure", "api_failure"):
                hint = " (the judge failed on this item; rerun itlens judge with the same --out to retry failures)"
            raise InputError(f"expected a finite number, {got}{hint}", file=path, line=lineno, field=field)
        first[rid], scores[rid] = lineno, float(value)
    return scores


def filter_by_score(records: list[dict], scores: dict[str, float], threshold: float) -> list[dict]:
    """Keep records whose score is at least ``threshold`` (AlpaGasus); every record must be scored."""
    missing = [r["id"] for r in records if r["id"] not in scores]
    if missing:
        raise InputError(f"{len(missing)} records have no score (first: {missing[0]!r})", field="id")
    return [r for r in records if scores[r["id"]] >= threshold]


def _earlier_assistant_turns(r: dict) -> list[int]:
    """Indices of a messages record's assistant turns before its last (final) response."""
    msgs = r.get("messages") or []
    return [i for i, m in enumerate(msgs[:-1]) if m.get("role") == "assistant"]


def _why_a_rewriter(r: dict) -> tuple[str, str] | None:
    """(what, field) when simplifying ``r`` calls the rewriter, else None: its final response has no
    ``response_simple``, or it is a conversation with earlier assistant turns (``response_simple`` gives only
    the final one). simplify and simplify_file both refuse a record that needs one when none is given."""
    simple = r.get("response_simple")
    if not (isinstance(simple, str) and simple.strip()):
        return "record has no response_simple", "response_simple"
    earlier = _earlier_assistant_turns(r)
    if earlier:
        return (f"a conversation with {len(earlier)} assistant turn(s) before its last: response_simple gives "
                "only the last, and every turn is simplified", "messages")
    return None


def _rewrite(rewriter: Rewriter, instruction: str, response: str, rid: str) -> str:
    simple = rewriter(instruction, response)
    if not isinstance(simple, str) or not simple.strip():
        raise InputError(f"the rewriter returned an empty response for record {rid!r}")
    return simple


def simplify(records: list[dict], rewriter: Rewriter | None = None) -> list[dict]:
    """Concise responses (the paper's LIMA-Simple, every response rewritten): ``response_simple`` when a
    record carries it (exact, as in the synthetic world), else ``rewriter(instruction, response)``, where the
    instruction is the user turn (:func:`itlens.io.user_text`: instruction plus input, or the last user
    message).

    A multi-turn ``messages`` record has every assistant turn simplified, not only the last (tuning trains
    each of them): the earlier ones by ``rewriter(the user turn before it, that turn)``, so such a record
    needs a rewriter even when it carries ``response_simple`` (which gives the final turn).

    The original response is kept as ``response_original``, and a messages record's whole original
    conversation as ``messages_original``.
    """
    out = []
    for r in records:
        simple = r.get("response_simple")
        earlier = _earlier_assistant_turns(r)
        why = _why_a_rewriter(r) if rewriter is None else None
        if why:
            raise InputError(f"{why[0]}, and no rewriter was given (pass an LLM rewriter for real data), "
                             f"record {r['id']!r}", field=why[1])
        if not isinstance(simple, str) or not simple.strip():
            simple = _rewrite(rewriter, user_text(r), response_text(r), r["id"])  # the user turn, for messages too
        new = {k: v for k, v in r.items() if k != "messages"}
        if "messages" in r:
            msgs = [dict(m) for m in r["messages"]]
            user = ""
            for i, m in enumerate(msgs[:-1]):
                if m["role"] == "user":
                    user = m["content"]
                elif i in earlier:
                    m["content"] = _rewrite(rewriter, user, m["content"], r["id"])
            msgs[-1]["content"] = simple
            new["messages"] = msgs
            new["messages_original"] = [dict(m) for m in r["messages"]]
        else:
            new["response"] = simple
        new["response_original"] = response_text(r)
        out.append(new)
    return out


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def provenance_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name.removesuffix('.jsonl')}.provenance.json")


def write_variant(records: list[dict], out: str | Path, *, source: str | Path, transform: str,
                  params: dict) -> Path:
    """Write the dataset and its provenance (both atomically; provenance last, so it vouches for the data).

    An earlier variant's provenance is removed first: a run killed between the two writes must leave new
    data with no provenance, not with one that describes the old data."""
    if not records:
        raise InputError(f"{transform} left no records", file=source)
    source_sha256 = sha256_file(source)  # before writing: the output may replace its own source
    provenance_path(out).unlink(missing_ok=True)
    out = atomic_write_jsonl(out, records)
    atomic_write_json(provenance_path(out), {
        "source": str(source), "source_sha256": source_sha256, "transform": transform,
        "parameters": params, "records": len(records), "output": out.name, "output_sha256": sha256_file(out)})
    return out


@contextlib.contextmanager
def _naming(path: str | Path):
    """An InputError raised inside without a file (a transform's own argument check) names ``path``."""
    try:
        yield
    except InputError as e:
        if e.file is None:
            e.file = str(path)
            e.args = (e.format(),)
        raise


def subset_file(src: str | Path, out: str | Path, n: int, seed: int = 0) -> Path:
    records = read_records(src, "instruction")
    with _naming(src):
        chosen = subset(records, n, seed=seed)
    return write_variant(chosen, out, source=src, transform="subset", params={"n": n, "seed": seed})


def filter_file(src: str | Path, out: str | Path, scores: str | Path, threshold: float,
                field: str = "score") -> Path:
    if not math.isfinite(threshold):  # NaN would keep nothing, inf nothing or everything
        raise InputError(f"expected a finite number, got {threshold}", key="threshold")
    records = read_records(src, "instruction")
    with _naming(scores):
        score_of = read_scores(scores, field)
    missing = [(lineno, r["id"]) for lineno, r in with_line_numbers(src, records) if r["id"] not in score_of]
    if missing:  # the record's own line, in the data file (the scores file has no line for it)
        raise InputError(f"record {missing[0][1]!r} has no score in {scores} ({len(missing)} of {len(records)} "
                         "records have none)", file=src, line=missing[0][0], field="id")
    kept = filter_by_score(records, score_of, threshold)
    return write_variant(kept, out, source=src, transform="filter",
                         params={"scores": str(scores), "scores_sha256": sha256_file(scores), "field": field,
                                 "threshold": threshold, "kept": len(kept), "of": len(records)})


def simplify_file(src: str | Path, out: str | Path, rewriter: Rewriter | None = None,
                  rewriter_name: str | None = None) -> Path:
    records = read_records(src, "instruction")
    for lineno, r in with_line_numbers(src, records):  # each record's own line, before any rewriter call
        simple = r.get("response_simple")
        if simple is not None and not isinstance(simple, str):
            raise InputError(f"expected a string, got {json.dumps(simple)[:40]}", file=src, line=lineno,
                             field="response_simple")
        why = _why_a_rewriter(r) if rewriter is None else None
        if why:
            raise InputError(f"{why[0]}, and no rewriter was given (pass --rewriter-config for an LLM rewriter)",
                             file=src, line=lineno, field=why[1])
    with _naming(src):
        simple = simplify(records, rewriter)
    exact = sum(_why_a_rewriter(r) is None for r in records)
    return write_variant(simple, out, source=src, transform="simplify",
                         params={"exact": exact, "rewritten": len(records) - exact, "rewriter": rewriter_name})
