"""Pattern copying: how much of a tuned model's output imitates the IT data (RQ2, F2).

Two kinds, as in the paper (§4):

- tone imitation: of the words that *start* with a shifted (resp. marginal) token in the token-shift
  table, the share that occur in the IT dataset (paper: 81.2% / 66.7%); words starting with an
  unshifted token are the control;
- style imitation: response length in tokens and characters, IT data vs outputs (Table 11); reuse of
  the IT data's opening and closing phrases; list / markdown structure; n-gram overlap with the IT
  responses nearest to each prompt (BM25 over IT instructions) against random IT responses.
"""

from __future__ import annotations

import dataclasses
import random
import re
import bisect
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from itlens.analysis.stats import paired_bootstrap
from itlens.errors import InputError
from itlens.io import atomic_write_json, atomic_write_text, read_records, response_text, user_text
from itlens.plotting import styled

WORD_RE = re.compile(r"\w+(?:['\u2019]\w+)*")
SENTENCE_RE = re.compile(r"(?<=[.!?])\s+|\n+")
CLASSES = ("shifted", "marginal", "unshifted")
PAPER = {"tone_shifted_in_it": 0.812, "tone_marginal_in_it": 0.667}


# ------------------------------------------------------------------------------------ words and tokens
def words(text: str) -> list[str]:
    return [w.casefold() for w in WORD_RE.findall(text)]


def trained_turns(rec: dict) -> list[tuple[str, str]]:
    """``(user turn, assistant turn)`` of every response tuning trains on: a record's one pair, or every
    assistant turn of a conversation that follows a user turn, with the user turn before it (as
    ``itlens.tune.to_prompt_completion`` trains them; an assistant turn that opens a conversation is not)."""
    if "messages" not in rec:
        return [(user_text(rec), response_text(rec))]
    pairs, asked = [], None
    for m in rec["messages"]:
        if m["role"] == "user":
            asked = m["content"]
        elif m["role"] == "assistant" and asked is not None:
            pairs.append((asked, m["content"]))
    return pairs


def instance_text(rec: dict, fields: str = "all") -> str:
    """What of an IT instance counts as "the IT dataset": the response, or instruction + response. Of a
    conversation, every turn, or every trained assistant turn (not only the last one)."""
    if "messages" in rec:
        if fields == "response":
            return "\n".join(response for _, response in trained_turns(rec))
        return "\n".join(m["content"] for m in rec["messages"])
    return response_text(rec) if fields == "response" else f"{user_text(rec)}\n{response_text(rec)}"


def _byte_run_spans(tokens: Sequence[str], text: str, cur: int) -> tuple[list[tuple[int, int]], int] | None:
    """Char spans of a run of tokens that decode with U+FFFD (parts of multi-byte characters), from ``cur``.

    Each token is given the byte length whose decoding (``errors="replace"``, as tokenizers decode a
    partial character) equals the token, such that the run ends on a character boundary (a depth-first
    search; the first consistent split). A token's span is the characters its bytes touch, so the
    bytes of one character split over three tokens give all three that character. ``None`` when no
    split is consistent with ``text``.
    """
    max_bytes = [len(t.replace("\ufffd", "").encode("utf-8", "surrogatepass")) + 3 * t.count("\ufffd")
                 for t in tokens]
    window = text[cur:cur + sum(max_bytes)]
    char_of_byte: list[int] = []
    for k, ch in enumerate(window):
        char_of_byte.extend([k] * len(ch.encode("utf-8", "surrogatepass")))
    data = window.encode("utf-8", "surrogatepass")
    char_of_byte.append(len(window))  # the end
    failed: set = set()  # (token, byte offset) from which no split reaches a character boundary

    def options(i: int, p: int):
        t = tokens[i]
        lo = len(t.replace("\ufffd", "").encode("utf-8", "surrogatepass")) + t.count("\ufffd")
        return (n for n in range(max(lo, 1), min(max_bytes[i], len(data) - p) + 1)
                if data[p:p + n].decode("utf-8", "replace") == t)

    frames = [[0, options(0, 0), 0]]  # per token: its byte offset, its untried lengths, its length
    while frames:  # depth-first, without recursion (a run can be thousands of tokens long)
        frame, i = frames[-1], len(frames) - 1
        n = next(frame[1], None)
        if n is None:
            failed.add((i, frame[0]))
            frames.pop()
            continue
        frame[2] = n
        q = frame[0] + n
        if i + 1 == len(tokens):  # the run must end where a character starts
            if q == len(data) or (data[q] & 0xC0) != 0x80:
                break
        elif (i + 1, q) not in failed:
            frames.append([q, options(i + 1, q), 0])
    if not frames:
        return None
    lengths = [f[2] for f in frames]
    spans, p = [], 0
    for n in lengths:
        spans.append((cur + char_of_byte[p], cur + char_of_byte[p + n - 1] + 1))
        p += n
    return spans, cur + char_of_byte[p]


def token_char_spans(tokens: Sequence[str], text: str) -> list[tuple[int, int]]:
    """Character span of each decoded token in ``text`` (tokens decoded one by one, in order).

    A multi-byte character split over tokens decodes as U+FFFD in each part: such a run of tokens is
    aligned with ``text`` byte by byte, and every token gets the characters its bytes touch (so the
    spans of a run can overlap; the first token holds the character's first byte). Tokens that do
    not match where expected (a stripped leading space) are matched after skipping whitespace, else
    get an empty span.
    """
    spans, cur, i = [], 0, 0
    while i < len(tokens):
        t = tokens[i]
        if t and text.startswith(t, cur):
            spans.append((cur, cur + len(t)))
            cur += len(t)
            i += 1
            continue
        if "\ufffd" in t:
            j = i
            while j < len(tokens) and "\ufffd" in tokens[j]:
                j += 1
            run = _byte_run_spans(tokens[i:j], text, cur)
            if run is not None:
                spans.extend(run[0])
                cur = run[1]
                i = j
                continue
        core = t.strip()
        j = text.find(core, cur, cur + len(t) + 8) if core and "\ufffd" not in core else -1
        if j >= 0:
            spans.append((j, j + len(core)))
            cur = j + len(core)
        else:
            step = 1 if "\ufffd" in t and cur < len(text) else 0
            spans.append((cur, cur + step))
            cur += step
        i += 1
    return spans


def word_starts(tokens: Sequence[str], text: str) -> list[tuple[int, str]]:
    """``(token index, word)`` for every token whose first non-space character starts a word."""
    spans = token_char_spans(tokens, text)
    starts = [s for s, _ in spans]
    out = []
    for m in WORD_RE.finditer(text):
        i = bisect.bisect_right(starts, m.start()) - 1
        while i >= 0 and spans[i][1] <= m.start() and spans[i][0] == m.start():  # skip empty spans
            i -= 1
        while i > 0 and spans[i - 1][0] <= m.start() < spans[i - 1][1]:  # a split character: its first token
            i -= 1
        if i >= 0 and spans[i][0] <= m.start() < spans[i][1] and not text[spans[i][0]:m.start()].strip():
            out.append((i, m.group(0)))
    return out


# ------------------------------------------------------------------------------------ tone
def tone_imitation(tokens, responses: dict[str, str], it_records: Sequence[dict], *, fields: str = "all",
                   top: int = 30) -> dict:
    """Share of words starting with a shifted / marginal / unshifted token that occur in the IT data.

    ``tokens``: the token-shift table (CONTRACT columns ``id, pos, token, shift_class``);
    ``responses``: ``{id: response text}`` the table was computed on. Words are compared case-folded.
    Also the most frequent shifted+marginal word-initial tokens (the paper's Figure 12).
    """
    it_words = {w for r in it_records for w in words(instance_text(r, fields))}
    stats = {c: [0, 0] for c in CLASSES}
    freq: Counter = Counter()
    for rid, g in tokens.sort_values(["id", "pos"]).groupby("id", sort=True):
        if rid not in responses:
            continue
        toks, classes = g["token"].tolist(), g["shift_class"].tolist()
        for i, word in word_starts(toks, responses[rid]):
            c = classes[i]
            stats[c][0] += 1
            stats[c][1] += word.casefold() in it_words
            if c != "unshifted":
                freq[toks[i].strip()] += 1
    out: dict[str, Any] = {c: {"n_words": n, "n_in_it": k, "share_in_it": (k / n if n else None)}
                           for c, (n, k) in stats.items()}
    out["top_shifted_marginal_tokens"] = [[t, n] for t, n in sorted(freq.items(), key=lambda x: (-x[1], x[0]))[:top]]
    return out


# ------------------------------------------------------------------------------------ style
def length_stats(texts: Sequence[str], tokenizer=None) -> dict:
    """Mean and median length in tokens (the tokenizer's, else words) and characters (Table 11)."""
    if not texts:
        return {"n": 0, "tokens_mean": None, "tokens_median": None, "chars_mean": None, "chars_median": None,
                "token_unit": "none"}
    if tokenizer is not None:
        n_tok = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    else:
        n_tok = [len(t.split()) for t in texts]
    chars = [len(t) for t in texts]
    return {"n": len(texts), "tokens_mean": float(np.mean(n_tok)), "tokens_median": float(np.median(n_tok)),
            "chars_mean": float(np.mean(chars)), "chars_median": float(np.median(chars)),
            "token_unit": "tokenizer" if tokenizer is not None else "words"}


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_RE.split(text.strip()) if s.strip()]


def phrase_reuse(it_texts: Sequence[str], outputs: Sequence[str], *, min_share: float = 0.05, top: int = 5) -> dict:
    """Reuse of the IT data's opening and closing sentences.

    ``frequent``: the IT data's openings (closings) that start (end) at least ``min_share`` of its
    responses; ``output_share_frequent``: outputs whose first (last) sentence is one of them;
    ``output_share_any``: outputs whose first (last) sentence opens (closes) any IT response.
    """
    out = {}
    for name, pick in (("opening", 0), ("closing", -1)):
        it_phr = Counter(s[pick] for s in map(sentences, it_texts) if s)
        n_it = max(1, sum(it_phr.values()))
        frequent = {p for p, c in it_phr.items() if c / n_it >= min_share}
        outs = [s[pick] for s in map(sentences, outputs) if s]
        out[name] = {
            "it_top": [[p, c / n_it] for p, c in sorted(it_phr.items(), key=lambda x: (-x[1], x[0]))[:top]],
            "it_share_frequent": sum(c for p, c in it_phr.items() if p in frequent) / n_it,
            "output_share_frequent": (sum(o in frequent for o in outs) / len(outputs)) if outputs else None,
            "output_share_any": (sum(o in it_phr for o in outs) / len(outputs)) if outputs else None,
        }
    return out


STRUCTURE = {
    "bullet_list": re.compile(r"^\s*[-*\u2022]\s+\S", re.M),
    "numbered_list": re.compile(r"^\s*\d+[.)]\s+\S", re.M),
    "header": re.compile(r"^\s*#{1,6}\s+\S", re.M),
    "bold": re.compile(r"\*\*[^*\n]+\*\*"),
    "code_block": re.compile(r"```"),
    "paragraphs": re.compile(r"\n\s*\n"),
}


def structure_stats(texts: Sequence[str]) -> dict:
    """Share of texts with each markdown/list feature (``paragraphs``: more than one paragraph)."""
    n = len(texts)
    return {k: (sum(bool(rx.search(t)) for t in texts) / n if n else None) for k, rx in STRUCTURE.items()}


def ngrams(ws: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)}


def ngram_overlap(text: str, references: Sequence[str], ns: Sequence[int] = (1, 2, 3)) -> float | None:
    """Mean over n of the share of ``text``'s n-grams that occur in any reference (the paper's keyword overlap)."""
    ws = words(text)
    ref_words = [words(r) for r in references]
    shares = []
    for n in ns:
        mine = ngrams(ws, n)
        if not mine:
            continue
        theirs = set().union(*(ngrams(r, n) for r in ref_words)) if ref_words else set()
        shares.append(len(mine & theirs) / len(mine))
    return float(np.mean(shares)) if shares else None


class BM25Retriever:
    """BM25 (rank_bm25) over IT instances: which training examples look most like a prompt."""

    def __init__(self, texts: Sequence[str]):
        from rank_bm25 import BM25Okapi

        self._bm25 = BM25Okapi([words(t) or ["\u2205"] for t in texts])
        self.n = len(texts)

    def scores(self, query: str) -> np.ndarray:
        return np.asarray(self._bm25.get_scores(words(query)), dtype=float)

    def top(self, query: str, k: int) -> list[tuple[int, float]]:
        s = self.scores(query)
        idx = np.lexsort((np.arange(len(s)), -s))[:k]  # ties broken by position: deterministic
        return [(int(i), float(s[i])) for i in idx]


def nearest_vs_random_overlap(outputs: Sequence[dict], it_records: Sequence[dict], *, k: int = 5, seed: int = 0,
                              n_resamples: int = 2000) -> dict:
    """n-gram overlap of each output with the responses of its k BM25-nearest IT instances (by
    instruction) against k random IT responses; the paired difference with a bootstrap CI. An instance
    is a trained turn: a conversation gives one per assistant turn, searched by the user turn before it."""
    pairs = [pair for r in it_records for pair in trained_turns(r)]
    if not outputs or not pairs:
        return {"n": 0, "nearest_mean": None, "random_mean": None, "difference": None}
    retr = BM25Retriever([asked for asked, _ in pairs])
    it_resp = [response for _, response in pairs]
    rng = random.Random(seed)
    near, rand = [], []
    for o in outputs:
        top = [i for i, _ in retr.top(user_text(o), k)]
        others = rng.sample(range(len(pairs)), min(k, len(pairs)))
        a = ngram_overlap(o["response"], [it_resp[i] for i in top])
        b = ngram_overlap(o["response"], [it_resp[i] for i in others])
        if a is not None and b is not None:
            near.append(a)
            rand.append(b)
    return {"n": len(near), "k": k, "nearest_mean": float(np.mean(near)) if near else None,
            "random_mean": float(np.mean(rand)) if rand else None,
            "difference": paired_bootstrap(rand, near, n_resamples=n_resamples, seed=seed)}


# ------------------------------------------------------------------------------------ figures and tables
def table11_markdown(lengths: dict[str, dict]) -> str:
    """The Table 11 analogue: mean length of the IT data's responses and of each model's outputs."""
    lines = ["| Responses | n | mean tokens | mean chars |", "|---|---|---|---|"]
    for name, s in lengths.items():
        if s["n"]:
            lines.append(f"| {name} | {s['n']} | {s['tokens_mean']:.1f} | {s['chars_mean']:.1f} |")
    return "\n".join(lines) + "\n"


@styled
def plot_lengths(lengths: dict[str, dict], path: str | Path) -> Path:
    from itlens.plotting import save_fig, subplots

    names = [n for n, s in lengths.items() if s["n"]]
    fig, axes = subplots(1, 2, figsize=(8, 3))
    for ax, key, label in ((axes[0], "tokens_mean", "mean length (tokens)"), (axes[1], "chars_mean", "mean length (chars)")):
        ax.barh(names, [lengths[n][key] for n in names], color=["#7f7f7f" if n == "IT data" else "#1f77b4" for n in names])
        ax.set_xlabel(label)
        ax.invert_yaxis()
    fig.suptitle("Response length: IT data vs outputs (Table 11)")
    return save_fig(fig, path)


@styled
def plot_tone(tone: dict[str, dict], path: str | Path) -> Path:
    """Share of words starting with shifted / marginal / unshifted tokens found in the IT data, per model."""
    from itlens.plotting import CLASS_COLORS, save_fig, subplots

    names = list(tone)
    fig, ax = subplots(figsize=(max(4, 1.5 * len(names) + 1), 3))
    w = 0.27
    for j, c in enumerate(CLASSES):
        vals = [tone[n][c]["share_in_it"] or 0.0 for n in names]
        ax.bar(np.arange(len(names)) + (j - 1) * w, vals, w, label=c, color=CLASS_COLORS[c])
    ax.axhline(PAPER["tone_shifted_in_it"], color=CLASS_COLORS["shifted"], ls=":", lw=1, label="paper: shifted 81.2%")
    ax.axhline(PAPER["tone_marginal_in_it"], color=CLASS_COLORS["marginal"], ls=":", lw=1, label="paper: marginal 66.7%")
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("words found in the IT data")
    ax.legend(fontsize=7, loc="lower right")
    return save_fig(fig, path)


# ------------------------------------------------------------------------------------ the command
@dataclasses.dataclass
class CopyingConfig:
    """Tone and style imitation of an IT dataset by tuned models."""

    it_data: str = dataclasses.field(default="", metadata={"help": "The IT dataset (CONTRACT JSONL) the models saw."})
    responses: dict[str, str] = dataclasses.field(default_factory=dict, metadata={
        "help": "Model name -> responses JSONL (CONTRACT response records)."})
    shift: dict[str, str] = dataclasses.field(default_factory=dict, metadata={
        "help": "Model name -> token-shift output dir (tokens.parquet) of that model's responses (tone)."})
    tokenizer: str = dataclasses.field(default="", metadata={
        "help": "Tokenizer dir for lengths in tokens (e.g. the world's tokenizer/); default: words."})
    it_fields: str = dataclasses.field(default="all", metadata={
        "help": "What of an IT instance is searched for tone words: all (instruction + response) or response."})
    phrase_min_share: float = dataclasses.field(default=0.05, metadata={
        "help": "An IT opening/closing sentence is 'frequent' when it starts/ends at least this share of responses."})
    nearest_k: int = dataclasses.field(default=5, metadata={"help": "IT instances per prompt for the n-gram overlap."})
    top_tokens: int = dataclasses.field(default=30, metadata={"help": "Most frequent shifted+marginal tokens kept."})
    n_resamples: int = dataclasses.field(default=2000, metadata={"help": "Bootstrap resamples."})
    seed: int = dataclasses.field(default=0, metadata={"help": "Seed for the random baseline and resampling."})

    def validate(self) -> None:
        if not self.it_data:
            raise InputError("required: the IT dataset", key="it_data")
        if not self.responses:
            raise InputError("required: at least one model's responses", key="responses")
        if self.it_fields not in ("all", "response"):
            raise InputError("expected all or response", key="it_fields")
        unknown = sorted(set(self.shift) - set(self.responses))
        if unknown:
            raise InputError(f"no responses for {unknown}", key="shift")
        for key in ("nearest_k", "top_tokens", "n_resamples"):
            if getattr(self, key) < 1:
                raise InputError(f"expected an integer >= 1, got {getattr(self, key)}", key=key)
        if not 0 < self.phrase_min_share <= 1:
            raise InputError(f"expected a share in (0, 1], got {self.phrase_min_share}", key="phrase_min_share")


def copying_metrics(it_records: Sequence[dict], outputs: dict[str, list[dict]], *, tokens: dict[str, Any] | None = None,
                    cfg: CopyingConfig | None = None, tokenizer=None) -> dict:
    """All copying metrics for in-memory data (what ``itlens copying`` and the study report)."""
    cfg = cfg or CopyingConfig(it_data="-", responses={"-": "-"})
    it_texts = [response for r in it_records for _, response in trained_turns(r)]  # every trained response
    m: dict[str, Any] = {"paper": PAPER, "it": {"length": length_stats(it_texts, tokenizer),
                                                 "structure": structure_stats(it_texts)}, "models": {}}
    for name, rows in sorted(outputs.items()):
        texts = [r["response"] for r in rows]
        mm = {"length": length_stats(texts, tokenizer), "structure": structure_stats(texts),
              "phrases": phrase_reuse(it_texts, texts, min_share=cfg.phrase_min_share),
              "overlap": nearest_vs_random_overlap(rows, it_records, k=cfg.nearest_k, seed=cfg.seed,
                                                   n_resamples=cfg.n_resamples)}
        if tokens and name in tokens:
            mm["tone"] = tone_imitation(tokens[name], {r["id"]: r["response"] for r in rows}, it_records,
                                        fields=cfg.it_fields, top=cfg.top_tokens)
        m["models"][name] = mm
    return m


def read_shift_tokens(d: str | Path, *, key: str, responses: Sequence[dict] | None = None):
    """The token table of an ``itlens shift`` output dir (or its ``tokens.parquet``): the columns the tone
    and span analyses read. A missing, damaged or foreign file is an InputError naming it and ``key``, and
    so are a shift class other than the three and a table of none of ``responses`` (another model's run:
    its tokens would all be skipped)."""
    import pandas as pd

    path = Path(d) / "tokens.parquet" if Path(d).is_dir() else Path(d)
    if not path.is_file():
        raise InputError("no tokens.parquet (run `itlens shift` first)", file=path, key=key)
    try:
        table = pd.read_parquet(path, columns=["id", "pos", "token", "shift_class"])
    except (OSError, ValueError, KeyError) as e:  # pyarrow's ArrowInvalid is a ValueError
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise InputError(f"not a token table written by `itlens shift` ({first})", file=path, key=key) from None
    classes = set(table["shift_class"].tolist())
    if classes - set(CLASSES):  # a hand-written or foreign table: tone would fail on the first such row
        shown = sorted(map(repr, classes - set(CLASSES)))[0]
        raise InputError(f"expected {', '.join(CLASSES)}, got {shown}", file=path, key=key, field="shift_class")
    if responses is not None and len(table) and not set(table["id"]) & {r["id"] for r in responses}:
        raise InputError(f"no token of these responses (ids such as {sorted(set(table['id']))[0]!r}): was "
                         "`itlens shift` run on this model's responses file?", file=path, key=key)
    return table


def run_copying(cfg: CopyingConfig, out_dir: str | Path) -> dict:
    """``itlens copying``: writes ``copying.json``, ``table11.md`` and figures; returns the metrics."""
    from itlens.io import atomic_dir

    it_records = read_records(cfg.it_data, "instruction")
    outputs = {n: read_records(p, "response") for n, p in cfg.responses.items()}
    tokens = {name: read_shift_tokens(d, key=f"shift.{name}", responses=outputs[name]) for name, d in cfg.shift.items()}
    tokenizer = None
    if cfg.tokenizer:
        from itlens.models import load_raw_tokenizer, load_tokenizer

        folder = Path(cfg.tokenizer)  # a tokenizer folder (the world's tokenizer/ has no model config.json)
        has_files = folder.is_dir() and any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer = load_raw_tokenizer(folder) if has_files else load_tokenizer(cfg.tokenizer)
    m = copying_metrics(it_records, outputs, tokens=tokens, cfg=cfg, tokenizer=tokenizer)
    with atomic_dir(out_dir) as tmp:
        lengths = {"IT data": m["it"]["length"], **{n: s["length"] for n, s in m["models"].items()}}
        atomic_write_text(tmp / "table11.md", table11_markdown(lengths))
        plot_lengths(lengths, tmp / "table11_lengths.png")
        tone = {n: s["tone"] for n, s in m["models"].items() if "tone" in s}
        if tone:
            plot_tone(tone, tmp / "tone_imitation.png")
        atomic_write_json(tmp / "copying.json", m)
    return m

