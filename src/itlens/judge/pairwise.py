"""Pairwise comparison of two generators on the same prompts, judged in both orders.

Position bias: every pair is judged twice, A shown first and B shown first; the pair goes to a side
only when both orders agree, anything else is a tie (FastChat's rule). A failure in either order
makes the pair a counted failure, never a guess.

Length bias: besides the raw win rate, a length-controlled win rate in the spirit of alpaca_eval's:
a logistic regression of the preference for A (1 win, 0.5 tie, 0 loss, as fractional outcomes) on
``tanh((len_a - len_b) / sd)``, with an intercept (scipy BFGS on the binomial likelihood; a weak ridge on
the slope); the LC win rate is the predicted preference at zero length difference,
``sigmoid(intercept)``. Lengths are in characters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from itlens.config import to_yaml
from itlens.errors import InputError
from itlens.io import atomic_dir, atomic_write_json, atomic_write_jsonl, atomic_write_text, user_text
from itlens.judge.client import ChatClient
from itlens.judge.config import JudgeConfig
from itlens.judge.scoring import (_check_response, _ci, ask_validated, extract_json_object,
                                  fill_prompt, judge_info, load_prompt, validate_json)

PAIRWISE_SCHEMA = {"type": "object", "required": ["winner"],
                   "properties": {"winner": {"type": "string", "pattern": r"^\s*(?i:a|b|tie)\s*$"},
                                  "reason": {"type": "string"}}}
PREFERENCE = {"a": 1.0, "tie": 0.5, "b": 0.0}
LC_SLOPE_L2 = 0.01
"""A weak ridge on the length slope keeps the fit finite when length alone separates wins."""


def parse_pairwise(text: str) -> str:
    """``"A"``, ``"B"`` or ``"tie"`` (the position shown), or :class:`JudgeParseError`."""
    obj = extract_json_object(text)
    validate_json(obj, PAIRWISE_SCHEMA)
    w = obj["winner"].strip().lower()
    return "tie" if w == "tie" else w.upper()


@dataclass
class PairwiseResult:
    items: list[dict]
    summary: dict
    cfg: JudgeConfig

    def write(self, out_dir: str | Path) -> Path:
        with atomic_dir(out_dir) as tmp:
            atomic_write_jsonl(tmp / "pairwise.jsonl", self.items)
            atomic_write_json(tmp / "summary.json", self.summary)
            atomic_write_text(tmp / "config.resolved.yaml", to_yaml(self.cfg))
        return Path(out_dir)


def check_pairwise_files(path_a: str | Path, path_b: str | Path) -> None:
    """The two files answer the same instructions on every shared id (an error names B's file and line)."""
    from itlens.io import iter_jsonl

    first = {rec.get("id"): (lineno, user_text(rec)) for lineno, rec in iter_jsonl(path_a)}
    for lineno, rec in iter_jsonl(path_b):
        if rec.get("id") in first and first[rec["id"]][1] != user_text(rec):
            raise InputError(f"id {rec['id']!r} answers a different instruction than {path_a}:{first[rec['id']][0]}",
                             file=path_b, line=lineno, field="instruction")


def _pairs(responses_a: list[dict], responses_b: list[dict]) -> list[tuple[dict, dict]]:
    for rows in (responses_a, responses_b):
        for i, rec in enumerate(rows):
            _check_response(rec, i)
    by_id = {r["id"]: r for r in responses_b}
    pairs = [(a, by_id[a["id"]]) for a in responses_a if a["id"] in by_id]
    if not pairs:
        raise InputError("the two response files share no id", key="--pairwise")
    for a, b in pairs:
        if user_text(a) != user_text(b):
            raise InputError(f"id {a['id']!r}: the two files answer different instructions", field="instruction")
    return pairs


def pairwise_compare(responses_a: list[dict], responses_b: list[dict], cfg: JudgeConfig, *,
                     client: ChatClient | None = None) -> PairwiseResult:
    """Judge A against B on every shared id, in both orders; win rates raw and length-controlled."""
    pairs = _pairs(responses_a, responses_b)
    template = load_prompt(cfg.pairwise_prompt_file, "instruction", "response_a", "response_b")
    client = client or ChatClient(cfg)
    batches = []
    for a, b in pairs:
        for first, second in ((a, b), (b, a)):
            batches.append([{"role": "user", "content": fill_prompt(
                template, instruction=user_text(a), response_a=first["response"], response_b=second["response"])}])
    verdicts = ask_validated(client, cfg, batches, parse_pairwise)
    items = []
    for k, (a, b) in enumerate(pairs):
        v_ab, v_ba = verdicts[2 * k], verdicts[2 * k + 1]
        item = {"id": a["id"], "model_a": a["model"], "model_b": b["model"], "len_a": len(a["response"]),
                "len_b": len(b["response"]), "winner": None, "a_first": None, "b_first": None}
        statuses = {v_ab.status, v_ba.status}
        if statuses == {"ok"}:
            item["a_first"] = {"A": "a", "B": "b", "tie": "tie"}[v_ab.value]
            item["b_first"] = {"A": "b", "B": "a", "tie": "tie"}[v_ba.value]
            item["winner"] = item["a_first"] if item["a_first"] == item["b_first"] else "tie"
            item["status"], item["error"] = "ok", None
        else:
            item["status"] = "api_failure" if "api_failure" in statuses else "parse_failure"
            item["error"] = (v_ab if v_ab.status == item["status"] else v_ba).error  # the error of that status
        item["judgements"] = {"a_first": v_ab.record(), "b_first": v_ba.record()}
        items.append(item)
    return PairwiseResult(items=items, summary=summarize_pairwise(items, cfg, template), cfg=cfg)


def length_controlled_win_rate(pref: np.ndarray, len_a: np.ndarray, len_b: np.ndarray,
                               slope_l2: float = LC_SLOPE_L2) -> float:
    """Predicted preference for A at zero length difference (see the module docstring)."""
    from scipy.optimize import minimize
    from scipy.special import expit, log_expit

    pref = np.asarray(pref, dtype=float)
    delta = np.asarray(len_a, dtype=float) - np.asarray(len_b, dtype=float)
    sd = delta.std()
    if sd == 0 or (np.all(pref == pref[0]) and pref[0] in (0.0, 1.0)):
        return float(pref.mean())  # nothing to control for, or a clean sweep (the MLE is at the boundary)
    x = np.tanh(delta / sd)

    def loss(beta):  # binomial log-likelihood with fractional outcomes, weak ridge on the slope only
        z = beta[0] + beta[1] * x
        return -np.sum(pref * log_expit(z) + (1 - pref) * log_expit(-z)) + 0.5 * slope_l2 * beta[1] ** 2

    def grad(beta):
        r = expit(beta[0] + beta[1] * x) - pref
        return np.array([r.sum(), (r * x).sum() + slope_l2 * beta[1]])

    fit = minimize(loss, np.zeros(2), jac=grad, method="BFGS")
    return float(expit(fit.x[0]))


def summarize_pairwise(items: list[dict], cfg: JudgeConfig, template: str) -> dict:
    from itlens.analysis.stats import bootstrap_ci

    done = [it for it in items if it["status"] == "ok"]
    pref = np.array([PREFERENCE[it["winner"]] for it in done])
    len_a = np.array([it["len_a"] for it in done], dtype=float)
    len_b = np.array([it["len_b"] for it in done], dtype=float)

    def lc_stat(idx, axis=-1):
        idx = np.asarray(idx, dtype=int)
        rows = idx.reshape(-1, idx.shape[-1])
        out = np.array([length_controlled_win_rate(pref[r], len_a[r], len_b[r]) for r in rows])
        return out.reshape(idx.shape[:-1]) if idx.ndim > 1 else out[0]

    lc = bootstrap_ci(np.arange(len(done)), lc_stat, confidence=cfg.confidence,
                      n_resamples=cfg.bootstrap_samples, seed=cfg.seed) if done else \
        {"estimate": None, "low": None, "high": None, "n": 0}
    singles = [v for it in done for v in (it["a_first"], it["b_first"])]
    # Position bias: of the single-order verdicts with a side, how many chose the answer shown first.
    first_chosen = [(it["a_first"] == "a") for it in done if it["a_first"] != "tie"] + \
                   [(it["b_first"] == "b") for it in done if it["b_first"] != "tie"]
    longer = [(it["winner"] == "a") == (it["len_a"] > it["len_b"]) for it in done
              if it["winner"] != "tie" and it["len_a"] != it["len_b"]]
    models_a = sorted({it["model_a"] for it in items})
    models_b = sorted({it["model_b"] for it in items})
    return {
        "judge": judge_info(cfg, template), "model_a": models_a, "model_b": models_b,
        "n_pairs": len(items), "n_decided": len(done),
        "failures": {"parse": sum(it["status"] == "parse_failure" for it in items),
                     "api": sum(it["status"] == "api_failure" for it in items)},
        "wins_a": sum(it["winner"] == "a" for it in done), "wins_b": sum(it["winner"] == "b" for it in done),
        "ties": sum(it["winner"] == "tie" for it in done),
        "win_rate_a": _ci(list(pref), cfg),
        "lc_win_rate_a": lc,
        "order_consistency": (sum(it["a_first"] == it["b_first"] for it in done) / len(done)) if done else None,
        "first_position_chosen": (sum(first_chosen) / len(first_chosen)) if first_chosen else None,
        "single_order_ties": (sum(v == "tie" for v in singles) / len(singles)) if singles else None,
        "longer_wins": (sum(longer) / len(longer)) if longer else None,
        "confidence": cfg.confidence,
        "method": {"tie_rule": "both orders must agree, otherwise tie",
                   "win_rate": "mean preference for A (win 1, tie 0.5, loss 0)",
                   "length_control": "logistic regression of preference on tanh(delta_len/sd) with intercept; "
                                     "prediction at delta_len = 0 (lengths in characters)"},
    }
