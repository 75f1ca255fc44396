"""Multi-aspect scoring (the paper's GPT-4 judge, §2.6): five aspects, 1-5, per item and aggregated.

Protocol: the project's own prompt asks for a JSON object ``{aspect: {"reason", "score"}}``; the
reply is validated against a JSON schema (integer scores 1-5; a numeric string such as "4" is
accepted, as just-eval's prompt asks for strings). A reply that does not validate is re-asked once,
quoting the problem; if the second reply fails too, the item is a *parse failure*: counted, shown,
and left out of every mean. Nothing is imputed (just-eval turns "N/A" into 5.0). A request that
fails after all retries is an *api failure*, counted the same way.

Aggregation: per generator (the records' ``model``), the mean of each aspect over scored items and,
as in Tables 16-17, per just-eval task type the mean over tagged items of the item's five-aspect
mean (an item with several tags counts toward each), all with bootstrap CIs.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from itlens.config import to_yaml
from itlens.errors import InputError
from itlens.io import atomic_dir, atomic_write_json, atomic_write_jsonl, atomic_write_text, user_text
from itlens.judge.client import ChatClient, Completion
from itlens.judge.config import PAPER_JUDGE_MODEL, JudgeConfig
from itlens.resources import read_prompt

ASPECTS = ("helpfulness", "clarity", "factuality", "depth", "engagement")
TASK_TYPES = ("coding", "info-seek", "math", "procedure", "reasoning", "role-play", "writing")

_SCORE = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 5},
                    {"type": "string", "pattern": r"^\s*[1-5]\s*$"}]}
MULTI_ASPECT_SCHEMA = {
    "type": "object",
    "required": list(ASPECTS),
    "properties": {a: {"type": "object", "required": ["score"],
                       "properties": {"score": _SCORE, "reason": {"type": "string"}}} for a in ASPECTS},
}


class JudgeParseError(ValueError):
    """A judge reply that does not validate; the message says why (it is quoted in the re-ask)."""


# ---------------------------------------------------------------------------------- prompts
def fill_prompt(template: str, **values: str) -> str:
    """Replace ``{name}`` placeholders in one pass (so braces inside the values stay untouched)."""
    missing = [k for k in values if "{" + k + "}" not in template]
    if missing:
        raise InputError(f"prompt lacks the placeholder(s) {', '.join('{' + k + '}' for k in missing)}")
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, values)) + r")\}")
    return pattern.sub(lambda m: values[m.group(1)], template)


def load_prompt(name: str, *placeholders: str) -> str:
    text = read_prompt(name)
    for p in placeholders:
        if "{" + p + "}" not in text:
            raise InputError(f"prompt must contain the placeholder {{{p}}}", file=name)
    return text


# ---------------------------------------------------------------------------------- parsing
def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A key given twice (two "depth" scores) is ambiguous: json.loads would silently keep the last."""
    obj: dict = {}
    for k, v in pairs:
        if k in obj:
            raise JudgeParseError(f"the key {json.dumps(k)[:60]} is given twice")
        obj[k] = v
    return obj


def extract_json_object(text: str) -> Any:
    """The JSON object in a reply: from the first ``{`` to the last ``}`` (code fences allowed)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise JudgeParseError("the reply contains no JSON object")
    try:
        return json.loads(text[start:end + 1], object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise JudgeParseError(f"the JSON object is malformed ({e.msg} at character {e.pos})") from None


def validate_json(obj: Any, schema: dict) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "the top level"
        if e.validator == "anyOf":
            raise JudgeParseError(f"at {where}: {json.dumps(e.instance)[:60]} is not an integer from 1 to 5")
        raise JudgeParseError(f"at {where}: {e.message[:200]}")


def parse_multi_aspect(text: str) -> dict:
    """``{"scores": {aspect: int}, "reasons": {aspect: str}}`` or :class:`JudgeParseError`."""
    obj = extract_json_object(text)
    validate_json(obj, MULTI_ASPECT_SCHEMA)
    return {"scores": {a: int(float(str(obj[a]["score"]).strip())) for a in ASPECTS},  # 4, "4", 4.0
            "reasons": {a: str(obj[a].get("reason", "")) for a in ASPECTS}}


# ------------------------------------------------------------------------- ask, validate, re-ask
@dataclass
class Verdict:
    """One judged prompt: the parsed value, or a counted failure (never a made-up value)."""

    status: str  # "ok" | "parse_failure" | "api_failure"
    value: Any = None
    error: str | None = None
    raw: list[str] = field(default_factory=list)
    attempts: int = 0  # HTTP attempts, retries included (0 when served from the cache)
    asked: int = 0  # prompts sent: 1, or 2 after a re-ask
    cached: bool = False

    def record(self) -> dict:
        return {"status": self.status, "error": self.error, "raw": self.raw, "attempts": self.attempts,
                "asked": self.asked, "cached": self.cached}


def ask_validated(client: ChatClient, cfg: JudgeConfig, batches: list[list[dict]],
                  parse: Callable[[str], Any]) -> list[Verdict]:
    """Send every message list; re-ask once (all failures concurrently) when a reply does not parse."""
    verdicts: list[Verdict] = []
    for done in client.complete_many(batches):
        verdicts.append(_verdict(done, parse, Verdict("api_failure")))
    if not cfg.reask:
        return verdicts
    reask_text = load_prompt(cfg.reask_prompt_file, "problem")
    redo = [i for i, v in enumerate(verdicts) if v.status == "parse_failure"]
    followups = [batches[i] + [{"role": "assistant", "content": verdicts[i].raw[-1]},
                               {"role": "user", "content": fill_prompt(reask_text, problem=verdicts[i].error)}]
                 for i in redo]
    for i, done in zip(redo, client.complete_many(followups)):
        verdicts[i] = _verdict(done, parse, verdicts[i])
    return verdicts


_FINISH_REASON_NOTES = {
    "length": " (the reply was cut off at max_tokens)",
    "content_filter": " (the endpoint's content filter withheld the reply: finish_reason content_filter)"}
"""Why a reply came back unusable, when the endpoint says so (Azure's content filter answers HTTP 200 with an empty
reply)."""


def _verdict(done: Completion, parse: Callable[[str], Any], before: Verdict) -> Verdict:
    v = Verdict(before.status, raw=list(before.raw), attempts=before.attempts + done.attempts,
                asked=before.asked + 1, cached=(before.cached or not before.asked) and done.cached)
    if not done.ok:
        v.status, v.error = "api_failure", done.error
        return v
    v.raw.append(done.content)
    try:
        v.value = parse(done.content)
        v.status, v.error = "ok", None
    except (JudgeParseError, ValueError, TypeError, KeyError, AttributeError) as e:  # any reply that does not validate
        v.status, v.error = "parse_failure", f"{e}{_FINISH_REASON_NOTES.get(done.finish_reason, '')}"
    return v


# ---------------------------------------------------------------------------------- scoring
def record_task_types(rec: dict, field_name: str) -> list[str]:
    tags = rec.get(field_name)
    if tags is None:
        return []
    if isinstance(tags, str):
        tags = [tags]
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise InputError(f"record {rec.get('id')!r}: expected a list of strings", field=field_name)
    return sorted({t.strip().lower() for t in tags if t.strip()})


def check_response_file(path: str | Path, cfg: JudgeConfig) -> None:
    """The judge's own fields of a responses file (task tags), each error with its file and line."""
    from itlens.io import iter_jsonl

    for lineno, rec in iter_jsonl(path):
        try:
            record_task_types(rec, cfg.task_types_field)
        except InputError as e:
            raise InputError("expected a string or a list of strings", file=path, line=lineno, field=e.field) from None


def _check_response(rec: dict, i: int) -> None:
    for name in ("id", "instruction", "response", "model"):
        if not isinstance(rec.get(name), str):
            raise InputError(f"record {i}: expected a string", field=name)


@dataclass
class JudgeResult:
    """Per-item verdicts (``judge.jsonl``) and their aggregate (``summary.json``)."""

    items: list[dict]
    summary: dict
    cfg: JudgeConfig

    def write(self, out_dir: str | Path) -> Path:
        """Write ``judge.jsonl``, ``summary.json``, ``config.resolved.yaml`` and the radar charts, atomically."""
        with atomic_dir(out_dir) as tmp:
            atomic_write_jsonl(tmp / "judge.jsonl", self.items)
            atomic_write_json(tmp / "summary.json", self.summary)
            atomic_write_text(tmp / "config.resolved.yaml", to_yaml(self.cfg))
            if self.cfg.figures:
                from itlens.judge.figures import write_judge_figures

                write_judge_figures(self.summary, tmp, self.cfg.paper_reference)
        return Path(out_dir)


def score_responses(responses: list[dict], cfg: JudgeConfig, *, client: ChatClient | None = None) -> JudgeResult:
    """Judge every response on the five aspects; every item ends scored or as a counted failure."""
    for i, rec in enumerate(responses):
        _check_response(rec, i)
    tags = [record_task_types(rec, cfg.task_types_field) for rec in responses]
    template = load_prompt(cfg.prompt_file, "instruction", "response")
    client = client or ChatClient(cfg)
    batches = [[{"role": "user", "content": fill_prompt(template, instruction=user_text(rec),
                                                         response=rec["response"])}] for rec in responses]
    verdicts = ask_validated(client, cfg, batches, parse_multi_aspect)
    items = []
    for rec, tt, v in zip(responses, tags, verdicts):
        scores = v.value["scores"] if v.status == "ok" else None
        items.append({"id": rec["id"], "model": rec["model"], "task_types": tt, "scores": scores,
                      "reasons": v.value["reasons"] if v.status == "ok" else None,
                      "mean": sum(scores.values()) / len(ASPECTS) if scores else None,
                      "response_words": len(rec["response"].split()), **v.record()})
    return JudgeResult(items=items, summary=summarize_scores(items, cfg, template), cfg=cfg)


def judge_info(cfg: JudgeConfig, template: str) -> dict:
    """What identifies the judge, so two summaries can be compared (or not); ``max_tokens_param`` only when it is not
    max_tokens, so that the summaries of judges configured before it existed stay as they were."""
    info = {"backend": cfg.backend, "model": cfg.model, "temperature": cfg.temperature,
            "max_tokens": cfg.max_tokens, "params": cfg.params,
            "base_url": cfg.base_url if cfg.backend == "openai" else None,
            "prompt_file": cfg.prompt_file, "prompt_sha256": hashlib.sha256(template.encode()).hexdigest()[:16],
            "paper_judge": cfg.model == PAPER_JUDGE_MODEL}
    if cfg.max_tokens_param != "max_tokens":
        info["max_tokens_param"] = cfg.max_tokens_param
    return info


def _failures(items: list[dict]) -> dict:
    return {"parse": sum(it["status"] == "parse_failure" for it in items),
            "api": sum(it["status"] == "api_failure" for it in items)}


def _ci(values: list[float], cfg: JudgeConfig) -> dict:
    from itlens.analysis.stats import bootstrap_ci

    return bootstrap_ci(values, confidence=cfg.confidence, n_resamples=cfg.bootstrap_samples, seed=cfg.seed)


def summarize_scores(items: list[dict], cfg: JudgeConfig, template: str) -> dict:
    """Per generator: aspect means, overall mean and task-type means, each ``{estimate, low, high, n}``."""
    models: dict[str, dict] = {}
    for name in sorted({it["model"] for it in items}):
        mine = [it for it in items if it["model"] == name]
        scored = [it for it in mine if it["status"] == "ok"]
        tagged = sorted({t for it in mine for t in it["task_types"]})
        models[name] = {
            "n_items": len(mine), "n_scored": len(scored), "failures": _failures(mine),
            "aspects": {a: _ci([it["scores"][a] for it in scored], cfg) for a in ASPECTS},
            "overall": _ci([it["mean"] for it in scored], cfg),
            "task_types": {t: _ci([it["mean"] for it in scored if t in it["task_types"]], cfg) for t in tagged},
            "task_type_failures": {t: _failures([it for it in mine if t in it["task_types"]]) for t in tagged},
            "mean_response_words": (sum(it["response_words"] for it in mine) / len(mine)) if mine else None,
        }
    return {"judge": judge_info(cfg, template), "n_items": len(items),
            "n_scored": sum(it["status"] == "ok" for it in items), "failures": _failures(items),
            "confidence": cfg.confidence, "models": models}
