"""Token distribution shift (TDS): where does a tuned model's answer rank under its base model?

The study (Ghosh et al. 2024, Figures 1, 4, 12; after Lin et al.'s AlignTDS) walks along a tuned
model's response and, at every position, compares the base and tuned next-token distributions given
the same prefix. This engine does it with ONE teacher-forced forward pass per model per batch: each
context (chat template for the tuned model; chat template or the in-context frame for the base) is
followed by the same response token ids, and every response position is scored at once.

Two definitions (``mode``):

- ``exact``: the emitted token's rank over the full vocabulary (1 + number of tokens with a strictly
  greater base logit), its full-softmax probabilities, and KL(p_tuned || p_base) over the vocabulary.
- ``paper``: AlignTDS's own definitions: top-30 lists per side renormalised, tokens matched by their
  decoded strings, KL(base || tuned) over the intersection, the base rank of the tuned model's top-1
  inside the base top-10 (classes) or top-50 list (Figure 1's mean rank; absent = 50).

Full-vocabulary logits are never materialised for a whole batch: the backbone's last hidden states
are gathered at response positions and pushed through the LM head in chunks of positions.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import io
import itertools
import math
import re
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np

from itlens.config import KEY_OMITS_DEFAULT
from itlens.errors import InputError

CLASSES = ("unshifted", "marginal", "shifted")
POSITION_BINS = 10
STOPWORDS_FILE = Path(__file__).with_name("stopwords_en.txt")


# ------------------------------------------------------------------------------------------ config
@dataclass
class ShiftConfig:
    """How token distribution shift is measured (``itlens shift``; the ``shift`` stage of a study)."""

    mode: Literal["exact", "paper"] = field(default="exact", metadata={
        "help": "exact: full-vocabulary rank/probabilities/KL(tuned||base) of the emitted token; "
                "paper: AlignTDS's top-k string-matched definitions (top-30 renormalised, KL(base||tuned) "
                "over the intersection, rank of the tuned top-1 in the base top-10)."})
    base_context: Literal["frame", "template"] = field(default="frame", metadata={
        "help": "What the base model reads before the response: 'frame' (the in-context '# Query / # Answer' "
                "frame that makes a base model answer, as AlignTDS did) or 'template' (the tuned model's chat "
                "template, the same sequence as the tuned model)."})
    frame: str | None = field(default=None, metadata={
        "help": "Frame prompt file for base_context=frame (a path or a name in prompts/); default "
                "prompts/base_frame.txt. Use the synthetic world's frame.txt for world models."})
    frames: dict[str, str] | None = field(default=None, metadata={
        KEY_OMITS_DEFAULT: True,
        "help": "Per-attribute frame files for base_context=frame: a response whose record has that "
                "``attribute`` is read in its frame, others in ``frame`` (geo data: the base answers each "
                "question in its attribute's probe frame, so the shift reads its answers in the same one)."})
    batch_size: int = field(default=8, metadata={"help": "Responses per forward pass."})
    max_length: int = field(default=0, metadata={
        "help": "Longest sequence (context + response) scored; 0 = the models' max_position_embeddings. "
                "Longer responses are truncated (counted in summary.json)."})
    chunk_mb: float = field(default=1024.0, metadata={
        "help": "Memory budget (MiB) for the full-vocabulary tensors of one chunk of positions."})
    device: str = field(default="auto", metadata={"help": "'cpu', 'cuda', or 'auto' (cuda when available)."})
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = field(default="float32", metadata={
        "help": "Weights dtype when loading models from paths (metrics are always computed in float32)."})
    paper_top_k: int = field(default=30, metadata={"help": "paper mode: tokens saved per position and side "
                                                           "(AlignTDS --top_k)."})
    paper_class_k: int = field(default=10, metadata={"help": "paper mode: list length for the class rank "
                                                             "(AlignTDS generate_html top_k=10)."})
    paper_rank_k: int = field(default=50, metadata={"help": "paper mode: list length for KL, base probability "
                                                            "and Figure 1's mean rank; absent tokens rank this."})
    view_top_k: int = field(default=10, metadata={"help": "Top-k tokens per side kept for the HTML token view "
                                                          "(0 = none)."})
    index_max: int = field(default=32, metadata={"help": "Shares by token index are reported for indices "
                                                         "0..index_max-1."})
    top_tokens: int = field(default=125, metadata={"help": "Most frequent shifted/marginal tokens kept in the "
                                                           "summary (Figure 12 shows 125)."})
    stopwords: bool = field(default=False, metadata={"help": "Drop English stop words from the most-frequent "
                                                             "token lists (AlignTDS's optional NLTK filter)."})
    tokenize_ahead: bool | None = field(default=None, metadata={
        KEY_OMITS_DEFAULT: True,
        "help": "Tokenize the responses in growing windows while the device runs the batches before them, "
                "so that only the first batch waits for the tokenizer (batches are then sorted by length "
                "within each window, not over all responses: scores differ by padding noise only). null "
                "(default): on for a GPU or other accelerator, off on a CPU, which runs the two one after "
                "the other anyway and would only pay for the extra tokenizer calls; true/false force it."})
    compile_metrics: bool | None = field(default=None, metadata={
        KEY_OMITS_DEFAULT: True,
        "help": "exact mode: fuse the per-position metrics with torch.compile. They are otherwise about 20 "
                "passes over each [positions x vocabulary] chunk, which at a large vocabulary (152k) cost "
                "as much as the forward passes on a GPU; fused, they read the logits a few times, in the "
                "model's dtype. The first batch pays for the compile (about 15-30 s). Ranks, classes and "
                "top-1 ids are identical; probabilities and KL may differ in the last float32 digits. null "
                "(default): on for a CUDA GPU, off elsewhere (on a CPU the compile costs more than it saves "
                "on a study's runs); true/false force it. If the compile fails (no Triton, no C compiler), "
                "a warning says so and the metrics are computed uncompiled."})

    def validate(self) -> None:
        if self.chunk_mb <= 0:
            raise InputError(f"must be > 0, got {self.chunk_mb}", key="chunk_mb")
        for name in ("batch_size", "paper_top_k", "paper_class_k", "paper_rank_k", "index_max"):
            if getattr(self, name) < 1:
                raise InputError(f"must be >= 1, got {getattr(self, name)}", key=name)
        for name in ("max_length", "view_top_k", "top_tokens"):
            if getattr(self, name) < 0:
                raise InputError(f"must be >= 0, got {getattr(self, name)}", key=name)
        if self.compile_metrics not in (None, True, False):
            raise InputError(f"expected true, false or null, got {self.compile_metrics!r}", key="compile_metrics")
        if self.tokenize_ahead not in (None, True, False):
            raise InputError(f"expected true, false or null, got {self.tokenize_ahead!r}", key="tokenize_ahead")


@dataclass
class ShiftResult:
    """Per-token rows (``tokens``, the CONTRACT columns and more) and the aggregates (``summary``)."""

    tokens: Any  # pandas.DataFrame
    summary: dict
    records: dict = field(default_factory=dict, repr=False)
    """Response records by id (for the token view)."""
    tokenizer: Any = field(default=None, repr=False)
    timings: dict = field(default_factory=dict)
    """Seconds spent encoding, scoring (forward passes + metrics), building the table, summarising."""


# -------------------------------------------------------------------------------------- models
class _Scorer:
    """One side of the comparison: backbone hidden states, then the LM head on chosen positions.

    For a PeftModel the base side is the same object with its adapter disabled (no second copy).
    """

    def __init__(self, model, *, adapter_off: bool = False):
        self.model = model
        self.adapter_off = adapter_off
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.backbone = causal_lm.base_model
        self.head = causal_lm.get_output_embeddings()
        self.softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
        self.full_forward = self.backbone is causal_lm or self.head is None  # no separable head
        self.device = next(model.parameters()).device
        self._checked = False

    def _ctx(self):
        return self.model.disable_adapter() if self.adapter_off else contextlib.nullcontext()

    def hidden(self, ids, mask):
        """Last hidden states [B, T, H] (or full logits [B, T, V] when the head is not separable)."""
        import torch

        with torch.no_grad(), self._ctx():
            if not self._checked:
                self._check_head(ids[:1, : min(ids.shape[1], 8)])
            if self.full_forward:
                return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            return self.backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    def logits(self, h, *, upcast: bool = True):
        """Logits of the chosen positions: float32, or with ``upcast=False`` the model's own dtype
        (float32 all the same when the logits are soft-capped)."""
        import torch

        if self.full_forward:
            return h.float() if upcast else h
        with torch.no_grad(), self._ctx():
            z = self.head(h)
        if self.softcap:
            return torch.tanh(z.float() / self.softcap) * self.softcap
        return z.float() if upcast else z

    def _check_head(self, ids) -> None:
        """Backbone + head must reproduce the model's own logits (else use plain forward passes)."""
        import torch

        self._checked = True
        if self.full_forward:
            return
        key = (id(self.model), self.adapter_off)
        if key in _HEAD_CHECKED and _HEAD_CHECKED[key][0]() is self.model:
            self.full_forward = _HEAD_CHECKED[key][1]
            return
        ref = self.model(input_ids=ids, use_cache=False).logits.float()
        got = self.head(self.backbone(input_ids=ids, use_cache=False).last_hidden_state).float()
        if self.softcap:
            got = torch.tanh(got / self.softcap) * self.softcap
        if not torch.allclose(ref, got, rtol=1e-3, atol=1e-3 * (1 + ref.abs().max().item())):
            self.full_forward = True
        _HEAD_CHECKED[key] = (weakref.ref(self.model), self.full_forward)


_HEAD_CHECKED: dict = {}
"""(id(model), adapter_off) -> (weak ref to the model, full_forward): the head check runs once per model."""


def _load_models(base, tuned, cfg: ShiftConfig, tokenizer):
    """Resolve ``base``/``tuned`` (loaded models or paths) to two scorers and one shared tokenizer."""
    from itlens.models import (attach_adapter, is_adapter_dir, load_causal_lm, load_tokenizer, resolve_model,
                               torch_dtype)

    device = _device(cfg.device)
    names = {"base": _model_name(base), "tuned": _model_name(tuned)}

    def load(path):
        return load_causal_lm(resolve_model(path), dtype=torch_dtype(cfg.dtype))

    tok_base = tok_tuned = None
    if isinstance(base, (str, Path)):
        tok_base = load_tokenizer(base)
        base = load(base).to(device).eval()
    if isinstance(tuned, (str, Path)):
        tok_tuned = load_tokenizer(tuned) if _has_tokenizer(tuned) else tok_base
        if is_adapter_dir(resolve_model(tuned)):
            if base is None:
                from itlens.models import load_model

                loaded = load_model(tuned, dtype=cfg.dtype, device=str(device))
                tuned, tok_tuned = loaded.model, tok_tuned or loaded.tokenizer
            else:
                tuned = attach_adapter(base, resolve_model(tuned))
        else:
            tuned = load(tuned).to(device).eval()
    if tuned is None:
        raise InputError("a tuned model is required", key="tuned")
    peft_tuned = hasattr(tuned, "disable_adapter") and hasattr(tuned, "get_base_model")
    if base is None or (peft_tuned and base is tuned.get_base_model()):
        if not peft_tuned:
            raise InputError("a base model is required unless the tuned model is a LoRA adapter", key="base")
        base_scorer = _Scorer(tuned, adapter_off=True)
        names["base"] = names["base"] or f"{names['tuned']} (adapter disabled)"
    else:
        base_scorer = _Scorer(base)
    tuned_scorer = _Scorer(tuned)

    tokenizer = tokenizer or tok_tuned or tok_base
    if tokenizer is None:
        src = getattr(tuned, "name_or_path", None) or getattr(getattr(tuned, "config", None), "name_or_path", None)
        if not src:
            raise InputError("pass tokenizer= when the models are given as objects", key="tokenizer")
        tokenizer = load_tokenizer(src)
    if not getattr(tokenizer, "is_fast", False):  # the response tokens are located by character offsets
        raise InputError(f"{type(tokenizer).__name__} is a Python-only ('slow') tokenizer, which gives no character "
                         "offsets: token shift needs a fast one (the tokenizers library's, saved as tokenizer.json)",
                         file=getattr(tokenizer, "name_or_path", None) or None, key="tokenizer")
    if tok_base is not None and tok_base is not tokenizer and tok_base.get_vocab() != tokenizer.get_vocab():
        raise InputError("base and tuned models do not share a tokenizer (vocabularies differ); token shift "
                         "compares distributions token by token, so both must use the same one", key="tuned")
    vb = base_scorer.head.weight.shape[0] if base_scorer.head is not None else None
    vt = tuned_scorer.head.weight.shape[0] if tuned_scorer.head is not None else None
    if vb is not None and vt is not None and vb != vt:
        raise InputError(f"base and tuned models have different vocabulary sizes ({vb} vs {vt}); they must "
                         "share a tokenizer", key="tuned")
    return base_scorer, tuned_scorer, tokenizer, names


def _has_tokenizer(path) -> bool:
    from itlens.models import resolve_model

    p = Path(resolve_model(path))
    return (p / "tokenizer_config.json").is_file() or (p / "tokenizer.json").is_file()


def _model_name(m) -> str | None:
    if m is None:
        return None
    if isinstance(m, (str, Path)):
        return str(m)
    return getattr(m, "name_or_path", None) or type(m).__name__


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _max_length(*configs) -> int:
    """The longest sequence every model reads: the least ``max_position_embeddings`` (2048 if none says).

    A composite model's config (Gemma 3 4B and up, Llava, Qwen2-VL) holds it in its text model's config
    (``get_text_config()``), not at the top: read there, long answers are not cut at 2048 tokens.
    """
    from itlens.generate import trained_positions

    lengths = [n for n in map(trained_positions, configs) if n is not None]
    return min(lengths) if lengths else 2048


# ------------------------------------------------------------------------------------ encoding
@dataclass
class _Encoded:
    index: int
    id: str
    tuned_ids: list[int]
    tuned_start: int
    base_ids: list[int]
    base_start: int
    response_ids: list[int]
    offsets: np.ndarray  # start character of each response token in the response text
    ends: np.ndarray  # end character (exclusive) of each response token in the response text
    response: str  # the response text (its sentences are found while the device works: _sentence_index)
    straddles: bool = False  # the first response token also holds the end of the chat template's text
    fused_end: bool = False  # the last response token also held the start of the end-of-turn text (dropped)
    token_ids: str = "text"  # where response_ids come from: the text's tokens ("text"); the record's
    # response_token_ids, which its tokens equal ("generated"), or differ from ("generated_differ"); or the
    # text's tokens because the record's ids are not those of its text under this tokenizer ("mismatch")


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def sentence_starts(text: str) -> list[int]:
    """Start characters of the sentences of ``text`` (split after . ! ? + whitespace, and at newlines)."""
    starts = [0]
    for m in _SENTENCE_END.finditer(text):
        if m.end() < len(text):
            starts.append(m.end())
    return starts


def _add_special(tokenizer, text: str) -> bool:
    """Let the tokenizer add BOS unless the rendered text already starts with it (chat templates often do)."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


def tokenizes_ahead(cfg: ShiftConfig, device_type: str) -> bool:
    """Whether ``cfg.tokenize_ahead`` (null: by device) has the engine tokenize in windows on this device."""
    return device_type != "cpu" if cfg.tokenize_ahead is None else bool(cfg.tokenize_ahead)


WINDOW_MAX_BATCHES = 32
"""The most batches tokenized together (see plan_windows)."""


def plan_windows(records: list[dict], batch_size: int, *, ahead: bool = True) -> list[list[int]]:
    """Indices of ``records`` in the windows that are tokenized together, shortest conversation first
    (by characters, which need no tokenizer); the windows hold 1, 2, 4, ... batches, at most
    WINDOW_MAX_BATCHES. Without ``ahead`` (ShiftConfig.tokenize_ahead), one window holds them all.

    Within a window the responses are sorted by tokens and cut into batches (:func:`window_batches`).
    So only the first window, one batch, is tokenized while the device waits: each later window is
    tokenized piece by piece while the device runs the batches of the window before it. Characters
    order conversations only roughly by tokens: on about 3,000 generated responses each of the mini
    study and gemma-geo (batches of 8-32), batches planned by characters alone padded the tuned
    contexts by 7-27%, sorted by tokens overall by 0.1-1.4%, and these windows by 0.5-2.0%.
    """
    from itlens.io import to_messages

    if not ahead:
        return [list(range(len(records)))] if records else []
    size = [sum(len(str(m.get("content", ""))) for m in to_messages(r)) for r in records]
    order = sorted(range(len(records)), key=lambda i: (size[i], i))
    windows, start, n = [], 0, 1
    while start < len(order):
        windows.append(order[start: start + n * batch_size])
        start, n = start + n * batch_size, min(2 * n, WINDOW_MAX_BATCHES)
    return windows


def window_batches(window: list[_Encoded], batch_size: int) -> list[list[_Encoded]]:
    """A tokenized window's responses in scoring batches: sorted by tuned-context length (then input
    order), so that each batch pads little."""
    ranked = sorted(window, key=lambda e: (len(e.tuned_ids), e.index))
    return [ranked[b: b + batch_size] for b in range(0, len(ranked), batch_size)]


def _encode_all(tokenizer, records: list[dict], cfg: ShiftConfig, frame_text: str | dict | None,
                indices: list[int] | None = None, end_text: str | None = None,
                special: set[int] | None = None) -> list[_Encoded]:
    """Tokenize each tuned context and response together; give the base its own context + the same ids.

    The tokenizer runs once per side on the whole list (batched in Rust for fast tokenizers).
    ``indices``: each record's index in the run's input (default: its place in ``records``).
    ``end_text``: the template's end-of-turn text (default: :func:`itlens.templates.end_of_turn_text`,
    which renders the template; a caller encoding in windows passes it once). ``special``: the ids that end
    a generated answer (default: :func:`itlens.tokenizer.answer_stop_ids`, looked up when a record's
    generated ids need the slow path; a caller encoding in windows passes it once).
    """
    from itlens.io import response_text
    from itlens.templates import chat_prompt, encode_prompts, end_of_turn_text, frame_prompt
    from itlens.tokenizer import answer_stop_ids

    if not records:
        return []
    prompts = [chat_prompt(tokenizer, r) for r in records]
    responses = [response_text(r) for r in records]
    # The turn is tokenized as the template writes it, end-of-turn text included (as training saw it and
    # the tuned model generated it): where that text is not one token (<|end|> in a vocabulary without it,
    # such as Gemma's) the answer's last token can take its first characters ('.<'). Generation cut the record
    # there, so the plain text would score '.', a token the model never chose. An answer cut at
    # max_new_tokens (finish: length) never ended its turn and gets no end-of-turn text.
    suffix = end_of_turn_text(tokenizer) if end_text is None else end_text
    joint = _tokenize(tokenizer, [p + r + ("" if rec.get("finish") == "length" else suffix)
                                  for p, r, rec in zip(prompts, responses, records)], prompts, offsets=True)
    base_prefixes = None
    if cfg.base_context == "frame":
        frames = [frame_prompt(frame_text.get(r.get("attribute"), frame_text[None]) if isinstance(frame_text, dict)
                               else frame_text, r) for r in records]
        base_prefixes = encode_prompts(tokenizer, frames)  # BOS as the tokenizer adds it; never an appended eos
    out = []
    for i, (rec, prompt, response) in enumerate(zip(records, prompts, responses)):
        ids = joint["input_ids"][i]
        spans = np.fromiter(itertools.chain.from_iterable(joint["offset_mapping"][i]), dtype=np.int64,
                            count=2 * len(ids)).reshape(-1, 2)
        # The first token that ends inside the response starts it (a token straddling the boundary is
        # predicted from the prompt alone, so it belongs to the response rows); the last one that starts
        # inside it ends them (an appended eos, zero characters wide, and the end-of-turn text are not the
        # response's). A last token that runs on into the end-of-turn text is the model's choice to end
        # the turn, fused with the answer's last characters: not scored, as the end-of-turn token is not.
        response_end = len(prompt) + len(response)
        inside = (spans[:, 1] > len(prompt)) & (spans[:, 1] > spans[:, 0]) & (spans[:, 0] < response_end)
        start = int(inside.argmax()) if inside.any() else len(ids)
        start = max(start, 1)  # the first response token needs at least one token of context
        end = max(start, int(np.flatnonzero(inside)[-1]) + 1 if inside.any() else start)
        fused_end = bool(end > start and spans[end - 1, 1] > response_end)
        as_trained = list(ids[start:end])  # the answer's tokens as training tokenized the turn, fused one too
        end -= fused_end
        ids = list(ids[:end])
        response_ids = ids[start:]
        offsets = np.maximum(0, spans[start:end, 0] - len(prompt))
        ends = np.maximum(0, spans[start:end, 1] - len(prompt))
        straddles = bool(start < len(spans) and spans[start, 0] < len(prompt))
        source = "text"
        generated = rec.get("response_token_ids")
        if generated is not None:  # the ids the model generated: scored as they are (see _generated_encoding)
            generated = [int(t) for t in generated]  # numpy's integers too (records built in Python)
            if generated == as_trained and not straddles:
                source = "generated"  # the text's tokens are the generated ones: nothing to redo
            else:
                if special is None:  # looked up once, and only when needed
                    special = set(answer_stop_ids(tokenizer))
                exact = _generated_encoding(tokenizer, prompt, response, generated, special)
                if exact is None:
                    source = "mismatch"
                else:
                    source = "generated_differ"
                    prompt_ids, response_ids, offsets, ends, fused_end = exact
                    ids, start, straddles = prompt_ids + response_ids, len(prompt_ids), False
        if not response.strip():  # no visible text (generate writes "" for an answer of whitespace): empty,
            ids, response_ids = ids[:start], []  # as the other empty answers, whatever whitespace ids it had
            offsets, ends = offsets[:0], ends[:0]
        if base_prefixes is None:
            base_ids, base_start = list(ids), start
        else:
            base_ids, base_start = list(base_prefixes[i]) + response_ids, len(base_prefixes[i])
        out.append(_Encoded(i if indices is None else indices[i], rec["id"], ids, start, base_ids, base_start,
                            response_ids, offsets, ends, response, straddles=straddles, fused_end=fused_end,
                            token_ids=source))
    return out


def _generated_encoding(tokenizer, prompt: str, response: str, generated: list[int], special: set[int]):
    """The tuned sequence of a response scored on the ids its model generated, where re-tokenizing its text
    gives other tokens (a GPT-2-style tokenizer reads a generated ``\n``, ``\n`` as one ``\n\n``).

    Returns (prompt ids, response ids, start and end character of each response token in ``response``,
    whether a last token fused with the stop text was dropped), or None when ``generated`` is not
    ``response`` under this tokenizer (decoded and stripped, as generation writes it) or hold a ``special``
    token. Generation ends an answer at each; an end-of-turn or eos id kept by another tool would be
    scored as a response token, unseen by the decoding that matched the text. The prompt ids are the ones
    generation decoded from (:func:`itlens.templates.encode_prompt`). A last token that runs past the
    response into non-whitespace text is the one that began the stop text (``.<`` of ``<|end|>``): left
    out, as in the text path.
    """
    from itlens.templates import encode_prompt

    if not generated or max(generated) >= len(tokenizer) or not special.isdisjoint(generated):
        return None
    full = tokenizer.decode(generated, skip_special_tokens=True)
    lead = len(full) - len(full.lstrip())
    if not full.startswith(response, lead):
        return None
    # a token ends where the text decoded up to it stops agreeing with the whole (a prefix cut inside a
    # multi-byte character decodes to U+FFFD there)
    ends_full = np.maximum.accumulate(_prefix_agreement(tokenizer, generated, full))
    starts_full = np.concatenate([[0], ends_full[:-1]])
    response_end = lead + len(response)
    after = full[response_end:]
    beyond = response_end + len(after) - len(after.lstrip())  # the first non-space character past the response
    fused_end = beyond < len(full)
    if fused_end and starts_full[-1] > beyond:
        return None  # text past the response that the last token does not hold: not what generation writes
    keep = len(generated) - fused_end
    offsets = np.clip(starts_full[:keep] - lead, 0, len(response))
    ends = np.clip(ends_full[:keep] - lead, 0, len(response))
    return encode_prompt(tokenizer, prompt), list(generated[:keep]), offsets, ends, fused_end


DECODE_WINDOW = 8
"""Ids a window of :func:`_prefix_agreement` keeps when it moves on (it tries to at twice as many)."""
DECODE_MARGIN = 8
"""Characters at the start of such a window that a new token must leave as they are."""


def _prefix_agreement(tokenizer, ids: list[int], full: str) -> np.ndarray:
    """For each k, the length of the common prefix of ``full`` (the text of all ``ids``) and the text of
    ``ids[:k + 1]`` (``tokenizer.decode``, special tokens skipped), in time linear in ``len(ids)``.

    Decoding every prefix is quadratic (1.5-4 s for a 2048-token answer, against 0.02-0.05 s here).
    Each prefix's text is taken as ``full[:done]`` followed by the text of a window of its last ids decoded alone,
    since what a decoder does to a token depends on its neighbours only (a character split over byte
    tokens, a run of byte-fallback tokens, the space a first token loses, the clean-up of spaces). That
    is checked, not assumed: the window moves on only to a start whose text ends the text so far, with
    no U+FFFD in its first DECODE_MARGIN characters (a cut inside a character or byte run), and only
    past text that ``full`` has too (not a byte run a later token turns invalid). A new token that changes
    the window's first DECODE_MARGIN characters may have changed the text before it: the window then
    starts again at the first id. So a text that is mostly U+FFFD (invalid bytes) is decoded prefix by
    prefix, as slowly as before.
    """
    agreement = np.empty(len(ids), dtype=np.int64)
    done, start, window = 0, 0, ""  # the text of ids[:k] is full[:done] + window, window = ids[start:k]'s
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[start:k], skip_special_tokens=True)
        if start and _common_prefix_len(text, window) < DECODE_MARGIN:
            done, start = 0, 0
            text = tokenizer.decode(ids[:k], skip_special_tokens=True)
        agreement[k - 1] = done + _common_prefix_len(text, full, done)
        window = text
        if k - start >= 2 * DECODE_WINDOW:
            later = (start + k) // 2
            tail = tokenizer.decode(ids[later:k], skip_special_tokens=True)
            left = len(text) - len(tail)
            if (len(tail) >= DECODE_MARGIN and "\ufffd" not in tail[:DECODE_MARGIN] and text.endswith(tail)
                    and full.startswith(text[:left], done)):
                done, start, window = done + left, later, tail
    return agreement


def _common_prefix_len(text: str, other: str, at: int = 0) -> int:
    """Length of the common prefix of ``text`` and ``other[at:]`` (by slice comparisons, not per character)."""
    if other.startswith(text, at):
        return len(text)
    lo, hi = 0, max(0, min(len(text), len(other) - at))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if other.startswith(text[:mid], at):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _sentence_index(e: _Encoded) -> np.ndarray:
    """Sentence number of each response token: the sentence of its first non-whitespace character.

    Byte-level BPE tokens carry the space before a word (" The"), so their first character lies in
    the whitespace that ends the sentence before; a sentence's first token is still that sentence's.
    A token of whitespace only (a newline) stays with the sentence it ends.
    """
    starts_list = sentence_starts(e.response)
    starts = np.asarray(starts_list)
    sentence = np.searchsorted(starts, e.offsets, side="right") - 1
    if len(starts_list) > 1:
        # only a token that reaches past the next sentence's start can belong to a later sentence (few: one
        # per sentence at most), so the first non-space character is looked for in those alone
        following = np.minimum(sentence + 1, len(starts) - 1)
        cross = np.flatnonzero((sentence + 1 < len(starts)) & (starts[following] < e.ends))
        for i, a, b in zip(cross.tolist(), e.offsets[cross].tolist(), e.ends[cross].tolist()):
            text = e.response[a:b]
            lead = len(text) - len(text.lstrip())
            if lead < len(text):
                sentence[i] = bisect.bisect_right(starts_list, a + lead) - 1
    return np.maximum(sentence, 0).astype(np.int64)


def _tokenize(tokenizer, texts: list[str], prompts: list[str], *, offsets: bool = False) -> dict:
    """Batch-tokenize; BOS is added unless a text's prompt already starts with it (see _add_special)."""
    flags = [_add_special(tokenizer, p) for p in prompts]
    if all(flags) or not any(flags):
        return tokenizer(texts, add_special_tokens=flags[0] if flags else True, return_offsets_mapping=offsets)
    parts = [tokenizer([t], add_special_tokens=f, return_offsets_mapping=offsets) for t, f in zip(texts, flags)]
    return {k: [p[k][0] for p in parts] for k in parts[0]}


def _truncate(e: _Encoded, max_length: int) -> str:
    """Drop response tokens that do not fit; returns 'ok', 'truncated' or 'skipped'."""
    keep = min(len(e.response_ids), max_length - e.tuned_start, max_length - e.base_start)
    if keep >= len(e.response_ids):
        return "ok"
    keep = max(keep, 0)
    e.response_ids, e.offsets, e.ends = e.response_ids[:keep], e.offsets[:keep], e.ends[:keep]
    e.tuned_ids = e.tuned_ids[: e.tuned_start + keep]
    e.base_ids = e.base_ids[: e.base_start + keep]
    return "truncated" if keep > 0 else "skipped"


# ---------------------------------------------------------------------------------- the metrics
def exact_metrics(z_base, z_tuned, target, view_k: int = 0, *, check_finite: bool = True,
                  fused: bool = False) -> dict:
    """Full-vocabulary metrics for a chunk of positions (logits [n, V] float32, emitted ids [n]).

    rank_base: 1 + #tokens with a strictly greater base logit than the emitted one. kl: KL(p_tuned||p_base);
    kl_base_tuned: the reverse. rank0_top1: 0-based base rank of the tuned model's top-1 (Figure 1);
    p_base_top1: its base probability. Few passes over the [n, V] tensors: this is the engine's hot loop.

    The fast KL formula is NaN where logits are -inf (masked tokens). ``check_finite`` then recomputes
    it the slow way, which costs a host-device sync per chunk; with ``check_finite=False`` the result
    instead carries ``finite`` (a 0-d bool tensor) and the caller redoes the chunk if it is False.
    ``fused`` (with ``check_finite=False``): the same columns from :func:`_fused_core` under
    torch.compile; the logits may then be in the model's dtype.
    """
    import torch

    if fused and not check_finite:
        out = _compiled_core()(z_base, z_tuned, target)
        lse_b, lse_t = out.pop("lse_base"), out.pop("lse_tuned")
        if view_k:
            k = min(view_k, z_base.shape[-1])
            ib, it = top_k_ids(z_base, k), top_k_ids(z_tuned, k)
            out.update(view_base_ids=ib, view_base_p=(z_base.gather(1, ib).float() - lse_b[:, None]).exp(),
                       view_tuned_ids=it, view_tuned_p=(z_tuned.gather(1, it).float() - lse_t[:, None]).exp())
        return out
    pb, lse_b, top1_base = _softmax_lse(z_base)
    pt, lse_t, top1_tuned = _softmax_lse(z_tuned)
    diff = z_tuned - z_base  # log p_t - log p_b = diff - lse_t + lse_b
    kl = torch.linalg.vecdot(pt, diff) - lse_t + lse_b
    kl_rev = lse_t - lse_b - torch.linalg.vecdot(pb, diff)
    finite = torch.isfinite(kl).all() & torch.isfinite(kl_rev).all()
    if check_finite and not finite:  # -inf logits (masked tokens)
        kl = _kl(pt, torch.log_softmax(z_tuned, -1), torch.log_softmax(z_base, -1))
        kl_rev = _kl(pb, torch.log_softmax(z_base, -1), torch.log_softmax(z_tuned, -1))
    zb_t = z_base.gather(1, target[:, None])
    zb_top1 = z_base.gather(1, top1_tuned[:, None])
    out = {
        "rank_base": _count_greater(z_base, zb_t) + 1,
        "p_base": (zb_t[:, 0] - lse_b).exp(),
        "p_tuned": (z_tuned.gather(1, target[:, None])[:, 0] - lse_t).exp(),
        "kl": kl.clamp_min(0),
        "kl_base_tuned": kl_rev.clamp_min(0),
        "top1_base": top1_base,
        "top1_tuned": top1_tuned,
        "rank0_top1": _count_greater(z_base, zb_top1),
        "p_base_top1": (zb_top1[:, 0] - lse_b).exp(),
    }
    if view_k:
        k = min(view_k, z_base.shape[-1])
        ib, it = top_k_ids(z_base, k), top_k_ids(z_tuned, k)
        out.update(view_base_ids=ib, view_base_p=pb.gather(1, ib), view_tuned_ids=it, view_tuned_p=pt.gather(1, it))
    if not check_finite:
        out["finite"] = finite
    return out


def _fused_core(z_base, z_tuned, target) -> dict:
    """exact_metrics' columns written as reductions over the logits, for torch.compile to fuse.

    Each column reads the [n, V] logits (in any dtype, upcast inside) without writing a tensor of that
    size: two reductions per side for the log-sum-exp, one per KL direction, one per rank count.
    """
    import torch

    z_base, z_tuned = z_base.float(), z_tuned.float()
    mb, top1_base = z_base.max(-1)
    mt, top1_tuned = z_tuned.max(-1)
    lse_b = mb + (z_base - mb[:, None]).exp().sum(-1).log()
    lse_t = mt + (z_tuned - mt[:, None]).exp().sum(-1).log()
    diff = z_tuned - z_base
    kl = ((z_tuned - lse_t[:, None]).exp() * diff).sum(-1) - lse_t + lse_b
    kl_rev = lse_t - lse_b - ((z_base - lse_b[:, None]).exp() * diff).sum(-1)
    zb_t = z_base.gather(1, target[:, None])[:, 0]
    zb_top1 = z_base.gather(1, top1_tuned[:, None])[:, 0]
    return {
        "rank_base": (z_base > zb_t[:, None]).sum(-1) + 1,
        "p_base": (zb_t - lse_b).exp(),
        "p_tuned": (z_tuned.gather(1, target[:, None])[:, 0] - lse_t).exp(),
        "kl": kl.clamp_min(0),
        "kl_base_tuned": kl_rev.clamp_min(0),
        "top1_base": top1_base,
        "top1_tuned": top1_tuned,
        "rank0_top1": (z_base > zb_top1[:, None]).sum(-1),
        "p_base_top1": (zb_top1 - lse_b).exp(),
        "finite": torch.isfinite(kl).all() & torch.isfinite(kl_rev).all(),
        "lse_base": lse_b, "lse_tuned": lse_t,
    }


def compiles_metrics(cfg: ShiftConfig, device_type: str) -> bool:
    """Whether the metrics are fused by torch.compile (``compile_metrics``; null: on for CUDA)."""
    if cfg.mode != "exact":
        return False
    return device_type == "cuda" if cfg.compile_metrics is None else bool(cfg.compile_metrics)


@functools.lru_cache(maxsize=1)
def _compiled_core():
    """:func:`_fused_core` under torch.compile, compiled once per process (any number of positions).

    A compile that fails (no Triton for this GPU, no C compiler, ``torch.compile`` itself refusing this
    Python or platform, or a recompile for a new dtype or device failing later on) is reported once, and
    the same function then runs uncompiled. An error that the uncompiled function raises too (a bad
    input, out of memory) is no failed compile: it is raised as the uncompiled function gives it, with no
    warning, and the next call compiles again.
    """
    import torch

    compiled: list = []
    failed: list[bool] = []

    def run(*args):
        if failed:
            return _fused_core(*args)
        try:
            # torch's own deprecation warnings while compiling must not fail it under -W error (pytest's)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                if not compiled:  # inside the try: torch.compile itself raises where dynamo is unsupported
                    compiled.append(torch.compile(_fused_core, dynamic=True))
                return compiled[0](*args)
        except Exception as exc:  # noqa: BLE001 - torch.compile's backends raise many kinds
            out = _fused_core(*args)  # a real error raises here too, and is not taken for a failed compile
            failed.append(True)
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"torch.compile of the token-shift metrics failed ({type(exc).__name__}: {first}); "
                          "they are computed uncompiled (set shift.compile_metrics: false to skip the attempt)",
                          stacklevel=2)
            return out

    return run


def top_k_ids(z, k: int, *, blockwise: bool | None = None):
    """Ids of each row's ``k`` largest entries, largest first: ``z.topk(k).indices`` [n, k].

    On an accelerator (``blockwise`` None: any device but the CPU) a wide row is read once, in blocks:
    each block's maximum, the ``k`` blocks with the largest maxima, then ``torch.topk`` over those
    blocks' entries alone. Every one of the k largest entries lies in one of those blocks (a block left
    out has k chosen blocks whose maxima are at least its own), so the values are exactly topk's, and
    so are the ids unless entries tie at equal values (topk's order among ties is unspecified anyway).
    On an H200 ``torch.topk`` over [16k, 32000] float32 rows took about as long as the rest of the
    token view together (29 ms of device time for 64 x 512 tokens).
    """
    import torch

    n, vocab = z.shape
    if blockwise is None:
        blockwise = z.device.type != "cpu"
    block = next((b for b in (128, 256, 64, 512) if vocab % b == 0), None)
    if not blockwise or block is None or vocab < 8 * k * block:
        return z.topk(k, dim=-1).indices
    best = z.reshape(n, vocab // block, block).amax(-1).topk(k, dim=-1).indices  # [n, k] blocks
    cand = (best[:, :, None] * block + torch.arange(block, device=z.device)).reshape(n, k * block)
    return cand.gather(1, z.gather(1, cand).topk(k, dim=-1).indices)


def _softmax_lse(z):
    """Softmax probabilities, log-sum-exp and argmax of each row, in four passes."""
    m, top1 = z.max(dim=-1)
    p = (z - m[:, None]).exp_()
    total = p.sum(-1)
    p.div_(total[:, None])
    return p, m + total.log(), top1


def _count_greater(z, threshold):
    """Per row, how many entries of ``z`` are strictly greater than ``threshold`` [n, 1] (int64)."""
    import torch

    return torch.gt(z, threshold).view(torch.uint8).sum(-1, dtype=torch.int32).long()


def _kl(p, logp, logq):
    """KL(p || q) per row with 0 * log 0 = 0 (the slow path for rows with -inf log-probabilities)."""
    import torch

    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def paper_metrics(base_logits, base_sid, tuned_logits, tuned_sid, *, class_k: int = 10, rank_k: int = 50) -> dict:
    """AlignTDS's per-position metrics from saved top-k lists (``compute_similarity`` semantics).

    Inputs are [n, K] tensors in descending logit order: the saved logits and a string id per entry
    (tokens are matched by decoded string; a repeated string counts at its first occurrence).
    Probabilities are re-softmaxed over the K saved logits. Returns:
    ``kl`` = sum over strings in both lists (first ``rank_k`` entries) of p_b * log(p_b / p_t);
    ``tr_class`` = 0-based index of the tuned top-1 string in the base's first ``class_k`` entries, or
    ``class_k``; ``tr`` = the same within ``rank_k`` (Figure 1's base rank); ``tp`` = the base probability
    of the tuned top-1 within ``rank_k`` entries, or 0; ``p_tuned_top1``.
    """
    import torch

    n, k = base_sid.shape
    pb = torch.softmax(base_logits.float(), dim=-1)
    pt = torch.softmax(tuned_logits.float(), dim=-1)

    def first_occurrence(sid):  # entry i counts if no earlier entry has its string and i < rank_k
        m = sid.shape[1]
        idx = torch.arange(m, device=sid.device)
        earlier = idx[None, :] < idx[:, None]
        same = sid[:, :, None] == sid[:, None, :]
        return ~(same & earlier[None]).any(-1) & (idx < rank_k)[None]

    first_b, first_t = first_occurrence(base_sid), first_occurrence(tuned_sid)
    match = (base_sid[:, :, None] == tuned_sid[:, None, :]) & first_t[:, None, :]
    w2 = (match.float() * pt[:, None, :]).sum(-1)
    both = match.any(-1) & first_b & (pb > 0) & (w2 > 0)
    kl = torch.where(both, pb * (torch.log(pb) - torch.log(w2.clamp_min(1e-45))), torch.zeros_like(pb)).sum(-1)
    idx = torch.arange(k, device=base_sid.device)
    hit = base_sid == tuned_sid[:, :1]
    first_hit = torch.where(hit, idx[None, :].expand(n, k), torch.full_like(base_sid, k)).min(-1).values
    tr_class = torch.where(first_hit < min(class_k, k), first_hit, torch.full_like(first_hit, class_k))
    found = first_hit < min(rank_k, k)
    tr = torch.where(found, first_hit, torch.full_like(first_hit, rank_k))
    tp = torch.where(found, pb.gather(1, first_hit.clamp_max(k - 1)[:, None])[:, 0], torch.zeros_like(kl))
    return {"kl": kl, "tr_class": tr_class, "tr": tr, "tp": tp, "p_tuned_top1": pt[:, 0]}


def shift_class(rank_base) -> np.ndarray:
    """unshifted (rank 1), marginal (2-3), shifted (> 3), from 1-based ranks."""
    r = np.asarray(rank_base)
    return np.where(r <= 1, "unshifted", np.where(r <= 3, "marginal", "shifted"))


def token_texts(tokenizer, ids: Iterable[int]) -> list[str]:
    """The text each token id adds in running text (the table's ``token``, the token view's top-k).

    Decoded alone, a token can lose what it writes: Metaspace (sentencepiece) decoders, Llama-2's and
    Mistral's, strip the first token's leading space, so ``▁work`` would read ``work`` and the token
    view would run words together. Each id is decoded after a fixed anchor token (``a``), whose text is
    then removed. The clean-up of spaces (`` .`` -> ``.``) is left out: it rewrites a text by a token's
    neighbours, not the token's own text. A byte that is part of a character decodes to U+FFFD, as
    decoded alone; an id whose text does not follow the anchor's keeps its text decoded alone.
    """
    ids = [int(i) for i in ids]
    plain = functools.partial(tokenizer.decode, clean_up_tokenization_spaces=False)
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
    lead = plain(anchor) if anchor else ""
    after = (tokenizer.batch_decode([anchor + [i] for i in ids], clean_up_tokenization_spaces=False)
             if lead else [""] * len(ids))
    return [t[len(lead):] if lead and t.startswith(lead) else plain([i]) for i, t in zip(ids, after)]


class _TokenStrings:
    """Two texts of each token id, cached: the text it adds in running text (:func:`token_texts`), and
    its text decoded alone, by which AlignTDS matches tokens (paper mode: ``string_ids``)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.running: dict[int, str] = {}
        self.alone: dict[int, str] = {}
        self.sid: dict[str, int] = {}

    def text(self, ids: Iterable[int]) -> list[str]:
        """Each id's text in running text (:func:`token_texts`)."""
        ids = [int(i) for i in ids]
        missing = [i for i in dict.fromkeys(ids) if i not in self.running]
        if missing:
            self.running.update(zip(missing, token_texts(self.tokenizer, missing)))
        return [self.running[i] for i in ids]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Each id decoded alone (``decode([i])``): AlignTDS's strings."""
        out = []
        for i in ids:
            i = int(i)
            s = self.alone.get(i)
            if s is None:
                s = self.alone[i] = self.tokenizer.decode([i])
            out.append(s)
        return out

    def string_ids(self, ids) -> Any:
        import torch

        flat = ids.reshape(-1).tolist()
        sids = [self.sid.setdefault(s, len(self.sid)) for s in self.decode(flat)]
        return torch.tensor(sids, dtype=torch.long).reshape(ids.shape)


# ---------------------------------------------------------------------------------- the engine
def compute_shift(base, tuned, responses, *, config: ShiftConfig | None = None, tokenizer=None,
                  shard: tuple[int, int] | None = None, progress: bool = False, **overrides) -> ShiftResult:
    """Token distribution shift of ``responses`` between ``base`` and ``tuned``.

    ``base``/``tuned``: loaded causal LMs or paths (HF dir, hub id in the local cache; ``tuned`` may
    be a LoRA adapter dir or a PeftModel, whose base distribution then comes from the same model
    with the adapter disabled; ``base`` may then be None). ``responses``: CONTRACT response records
    (a list of dicts or a JSONL path). Keyword overrides set :class:`ShiftConfig` fields
    (``mode=``, ``base_context=``, ``frame=``, ``batch_size=``, ...). ``shard=(rank, world)`` scores
    only every world-th batch of the one-process plan (:func:`plan_windows`), starting at ``rank`` (the
    rows of those responses; the summary's counts still cover all); :func:`merge_shards` joins the parts.
    ``progress``: a progress bar on stderr, advanced as each batch's results come back from the device.
    """
    import torch

    t_start = time.perf_counter()
    cfg = dataclasses.replace(config or ShiftConfig(), **overrides)
    cfg.validate()
    records = _read_responses(responses)
    base_s, tuned_s, tok, names = _load_models(base, tuned, cfg, tokenizer)
    from itlens.templates import end_of_turn_text, ensure_chat_template, load_frame

    ensure_chat_template(tok)
    frame_text = load_frame(cfg.frame) if cfg.base_context == "frame" else None
    if frame_text is not None and cfg.frames:  # one frame per attribute, the default for the rest
        frame_text = {None: frame_text, **{a: load_frame(f) for a, f in sorted(cfg.frames.items())}}
    max_length = cfg.max_length or _max_length(base_s.model.config, tuned_s.model.config)
    strings = _TokenStrings(tok)

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    vocab = (tuned_s.head.weight.shape[0] if tuned_s.head is not None else len(tok))
    chunk = max(1, int(cfg.chunk_mb * 2**20) // (vocab * 4 * 8))  # ~8 float32 [n, V] tensors live at once
    # Responses are tokenized a window at a time (plan_windows), as the scoring loop asks for batches:
    # the first window while the device waits (encode_s), each later one in pieces, one after each
    # batch of the window before it is queued (encode_overlapped_s, inside score_s). On a CPU
    # (tokenize_ahead null) one window holds every response, and batches are sorted over all of them.
    # Batches are numbered across windows; a shard (which tokenizes every window, to know the batches)
    # scores every world-th one. The columns that need only the token ids are built once every batch
    # is queued.
    timings = {"encode_s": 0.0, "encode_overlapped_s": 0.0, "static_s": 0.0}
    status = {"ok": 0, "truncated": 0, "skipped": 0, "empty": 0, "straddles": 0, "fused_end": 0, "text": 0,
              "generated": 0, "generated_differ": 0, "mismatch": 0}
    end_text = end_of_turn_text(tok)  # once, not once per window
    from itlens.tokenizer import answer_stop_ids

    special = set(answer_stop_ids(tok)) if any(r.get("response_token_ids") is not None for r in records) else None
    batches: list[list[_Encoded]] = []

    def encode(idx: list[int]) -> list[_Encoded]:
        t = time.perf_counter()
        kept = []
        for e in _encode_all(tok, [records[i] for i in idx], cfg, frame_text, indices=idx, end_text=end_text,
                             special=special):
            status[e.token_ids] += 1
            if not e.response_ids:  # empty, whether or not its one token ran on into the end of turn
                status["empty"] += 1
                continue
            status["fused_end"] += int(e.fused_end)
            fit = _truncate(e, max_length)
            status[fit] += 1
            status["straddles"] += int(e.straddles and cfg.base_context == "frame")
            if fit != "skipped":
                kept.append(e)
        timings["encode_overlapped_s" if batches else "encode_s"] += time.perf_counter() - t
        return kept

    ahead = tokenizes_ahead(cfg, tuned_s.device.type)

    def encoded_batches():
        windows, number = plan_windows(records, cfg.batch_size, ahead=ahead), 0
        window = encode(windows[0]) if windows else []
        for w in range(len(windows)):
            upcoming = windows[w + 1] if w + 1 < len(windows) else []
            scheduled = window_batches(window, cfg.batch_size)
            # the next window is tokenized in as many pieces as this one has batches, one piece after
            # each batch is queued, so that the host never holds the device up for a whole window
            m = max(len(scheduled), 1)
            pieces = [upcoming[k * len(upcoming) // m: (k + 1) * len(upcoming) // m] for k in range(m)]
            window = []
            for k in range(m):
                if k < len(scheduled):
                    if shard is None or number % shard[1] == shard[0]:
                        batches.append(scheduled[k])
                        yield scheduled[k]
                    number += 1
                if pieces[k]:
                    window += encode(pieces[k])

    timings["setup_s"] = time.perf_counter() - t_start  # reading, checks, templates: before any device work
    queue = encoded_batches()
    first = next(queue, None)  # the one tokenization the device waits for
    static: dict = {}

    def build_static() -> None:
        t = time.perf_counter()
        static.update(_static_columns([e for batch in batches for e in batch], strings))
        timings["static_s"] = time.perf_counter() - t  # inside score_s, while the last batches run

    from tqdm import tqdm

    bar = tqdm(total=len(records) if shard is None else None, unit="response", disable=not progress, desc="shift")
    t0 = time.perf_counter()
    scored = _score_batches(itertools.chain([first] if first else [], queue), base_s, tuned_s, cfg, chunk,
                            strings, pad, check_finite=False, while_queued=build_static, on_done=bar.update)
    if bar.total is not None:
        bar.update(bar.total - bar.n)  # empty responses (never scored) are done too
    bar.close()
    if not all(bool(f.all()) for f in scored.pop("finite", [])):  # -inf logits somewhere: redo the slow way
        scored = _score_batches(batches, base_s, tuned_s, cfg, chunk, strings, pad, check_finite=True)
    dynamic = {k: (np.concatenate(v) if isinstance(v[0], np.ndarray) else torch.cat(v).numpy()) if v else np.zeros(0)
               for k, v in scored.items()}
    timings["score_s"] = time.perf_counter() - t0
    if status["truncated"] or status["skipped"]:
        warnings.warn(f"{status['truncated'] + status['skipped']} of {len(records)} responses did not fit in "
                      f"{max_length} tokens and were truncated ({status['skipped']} left with no tokens)",
                      stacklevel=2)
    if status["mismatch"]:
        warnings.warn(f"{status['mismatch']} of {len(records)} responses carry response_token_ids that are not their "
                      "response's under this tokenizer (generated by another model, or holding a special token "
                      "such as the end of turn?): those are scored on the response text's own tokens", stacklevel=2)
    if status["straddles"]:
        warnings.warn(f"{status['straddles']} of {len(records)} responses start inside the chat template's last "
                      "token (a response with leading whitespace after a template ending in whitespace): that "
                      "token is a response row, and in the frame context the base reads it whole, template "
                      "characters included. Strip the responses (itlens generate does) to avoid it.", stacklevel=2)

    t0 = time.perf_counter()
    tokens = _build_frame(static, dynamic, cfg)
    timings["table_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = summarize(tokens, cfg, stopwords=load_stopwords() if cfg.stopwords else None)
    timings["summary_s"] = time.perf_counter() - t0
    summary.update({
        "mode": cfg.mode, "base_context": cfg.base_context,
        "frame": (str(cfg.frame) if cfg.frame else "base_frame.txt") if cfg.base_context == "frame" else None,
        **({"frames": dict(sorted(cfg.frames.items()))} if cfg.frames and cfg.base_context == "frame" else {}),
        "models": names, "n_responses": len(records), "n_truncated": status["truncated"],
        "n_skipped": status["skipped"], "n_empty": status["empty"], "n_fused_end": status["fused_end"],
        "n_generated_ids": status["generated"] + status["generated_differ"],
        "n_generated_ids_differ": status["generated_differ"], "n_generated_ids_mismatch": status["mismatch"],
        "max_length": max_length,
        "head": {"base": "full_forward" if base_s.full_forward else "chunked",
                 "tuned": "full_forward" if tuned_s.full_forward else "chunked"},
    })
    return ShiftResult(tokens=tokens, summary=summary, records={r["id"]: r for r in records}, tokenizer=tok,
                       timings=timings)


def merge_shards(parts: list[tuple[Any, dict]], records: list[dict], cfg: ShiftConfig | None = None) -> ShiftResult:
    """Join the (tokens, summary) of every shard of one run into the one-process result.

    Rows are put in input order (``records``), and the aggregates are recomputed from the joined
    table; the run-level fields (models, counts of truncated or empty responses) are the shards' own.
    """
    import pandas as pd

    cfg = cfg or ShiftConfig()
    tables = [t for t, _ in parts if len(t)] or [parts[0][0]]
    tokens = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]
    index = {r["id"]: i for i, r in enumerate(records)}
    order = np.lexsort((tokens["pos"].to_numpy(), tokens["id"].map(index).to_numpy()))
    tokens = tokens.iloc[order].reset_index(drop=True)
    summary = summarize(tokens, cfg, stopwords=load_stopwords() if cfg.stopwords else None)
    run_level = {k: v for k, v in parts[0][1].items() if k not in summary}
    summary.update(run_level)
    return ShiftResult(tokens=tokens, summary=summary, records={r["id"]: r for r in records})


def _to_device(t, device):
    """Host tensor -> ``device`` without waiting for the device's queue (pinned memory on CUDA).

    A copy from ordinary (pageable) host memory is synchronous: it would stall the host until every
    queued kernel has run, so the next batch could not be queued behind the current one.
    """
    if getattr(device, "type", str(device)).startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _gather_hidden(scorer: _Scorer, seqs: list[tuple[list[int], int]], pad: int):
    """Right-pad, run one forward pass, and keep the states that predict each response token."""
    import torch

    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, (s, _) in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    h = scorer.hidden(_to_device(ids, scorer.device), _to_device(mask, scorer.device))
    rows = torch.cat([torch.full((len(s) - start,), r) for r, (s, start) in enumerate(seqs)])
    cols = torch.cat([torch.arange(start - 1, len(s) - 1) for s, start in seqs])
    return h[_to_device(rows, h.device), _to_device(cols, h.device)]


PIPELINE_DEPTH = 2
"""Batches queued on the device ahead of the one whose results the host reads (its copy back, queued
right behind its kernels, has finished by then, so reading it rarely waits)."""


def _score_batches(batches, base_s: _Scorer, tuned_s: _Scorer, cfg: ShiftConfig, chunk: int, strings,
                   pad: int, *, check_finite: bool, while_queued=None, on_done=None) -> dict[str, list]:
    """Forward passes and per-position metrics of every batch: {column: [per-batch host tensors]}.

    In exact mode the host never waits for the batch it has just queued: a batch's results are copied
    to the host (on CUDA: queued right behind its kernels, into pinned memory) and read only once
    PIPELINE_DEPTH later batches are queued behind it, so the device always has work,
    and ``batches`` (any iterable) may produce batch k+1 on the host while the device runs batch k.
    ``while_queued`` runs once, after the last batch is queued and before the results still on the
    device are copied back (host work to overlap with them). ``on_done(n)`` is called as each batch of
    n responses has been copied back.
    ``finite`` lists one flag per chunk unless ``check_finite``. The token view's top-k columns come
    back as object arrays of per-position numpy rows (the table's cells), made while later batches run.
    """
    import torch

    fused = compiles_metrics(cfg, tuned_s.device.type) and not check_finite
    cols: dict[str, list] = {}
    pending: list[tuple[int, dict, Any]] = []  # (responses in the batch, its results, their copy's event)

    def copy_back(results: dict) -> tuple[dict, Any]:
        """Queue the copy of a batch's results to the host right behind its kernels.

        On CUDA into pinned memory, without waiting, and with an event to wait on later. A plain
        ``.cpu()`` issued later would sit in the stream behind every batch queued since, so the host
        would wait for the whole queue and the device would then idle while the host caught up.
        """
        device = next(iter(results.values())).device if results else None
        if device is None or device.type != "cuda":
            return results, None
        host = {k_: v.to("cpu", non_blocking=True) for k_, v in results.items()}
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return host, event

    def to_host(item: tuple[int, dict, Any]) -> None:
        n, done, event = item
        if event is not None:
            event.synchronize()  # this batch's copies (queued right behind its kernels), not the queue since
        for k_, v in done.items():
            if k_.startswith("view_"):  # an object array of rows: the table's cells
                rows = v.cpu().numpy().astype(np.int64 if k_.endswith("_ids") else np.float64)
                cols.setdefault(k_, []).append(np.fromiter(rows, dtype=object, count=len(rows)))
            else:
                cols.setdefault(k_, []).append(v.cpu())
        if on_done is not None:
            on_done(n)

    for batch in batches:
        h_tuned = _gather_hidden(tuned_s, [(e.tuned_ids, e.tuned_start) for e in batch], pad)
        h_base = _gather_hidden(base_s, [(e.base_ids, e.base_start) for e in batch], pad)
        target = _to_device(torch.tensor([t for e in batch for t in e.response_ids]), h_tuned.device)
        on_device: dict[str, list] = {}
        for c in range(0, len(target), chunk):
            zt = tuned_s.logits(h_tuned[c: c + chunk].to(tuned_s.device), upcast=not fused)
            zb = base_s.logits(h_base[c: c + chunk].to(base_s.device), upcast=not fused).to(zt.device)
            out = exact_metrics(zb, zt, target[c: c + chunk], cfg.view_top_k, check_finite=check_finite,
                                fused=fused)
            if "finite" in out:
                out["finite"] = out["finite"].reshape(1)
            if cfg.mode == "paper":
                k = min(cfg.paper_top_k, zb.shape[-1])
                vb, ib = zb.topk(k, dim=-1)
                vt, it = zt.topk(k, dim=-1)
                pm = paper_metrics(vb.cpu(), strings.string_ids(ib.cpu()), vt.cpu(), strings.string_ids(it.cpu()),
                                   class_k=cfg.paper_class_k, rank_k=cfg.paper_rank_k)
                out.update({f"paper_{k_}": v for k_, v in pm.items()})
            for k_, v in out.items():
                on_device.setdefault(k_, []).append(v.detach())
        pending.append((len(batch), *copy_back({k_: torch.cat([x.to(v[0].device) for x in v])
                                                for k_, v in on_device.items()})))
        if len(pending) > PIPELINE_DEPTH:
            to_host(pending.pop(0))
    if while_queued is not None:
        while_queued()
    for done in pending:
        to_host(done)
    return cols


def _static_columns(scored: list[_Encoded], strings: _TokenStrings) -> dict:
    """The token table's columns that follow from the token ids alone, already in the table's row order
    (input order, then position), plus ``_order``: that permutation of the scoring order."""
    import pandas as pd

    n = np.array([len(e.response_ids) for e in scored], dtype=np.int64)
    total = int(n.sum())
    index = np.array([e.index for e in scored], dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(n)[:-1]]) if len(n) else np.zeros(0, dtype=np.int64)
    row_index = np.repeat(index, n)
    token_id = np.fromiter((t for e in scored for t in e.response_ids), dtype=np.int64, count=total)
    sentence = np.concatenate([_sentence_index(e) for e in scored]) if scored else np.zeros(0, dtype=np.int64)
    pos = np.arange(total, dtype=np.int64) - np.repeat(first, n)
    n_tokens = np.repeat(n, n)
    # runs of one sentence of one response (sentence indices never decrease along a response)
    new_run = np.ones(total, dtype=bool)
    new_run[1:] = (row_index[1:] != row_index[:-1]) | (sentence[1:] != sentence[:-1])
    run_start = np.flatnonzero(new_run)
    run_len = np.diff(np.append(run_start, total))
    uniq, inverse = np.unique(token_id, return_inverse=True)
    ids = np.array([e.id for e in scored], dtype=object)
    order = np.lexsort((pos, row_index))
    cols = {"id": np.repeat(ids, n), "pos": pos, "token_id": token_id,
            "token": np.array(strings.text(uniq.tolist()), dtype=object)[inverse.reshape(-1)],
            "n_tokens": n_tokens, "sentence": sentence,
            "sent_pos": pos - pos[np.repeat(run_start, run_len)] if total else pos,
            "sent_len": np.repeat(run_len, run_len)}
    out = {k: v[order] for k, v in cols.items()}
    for k in ("id", "token"):  # the string columns as pandas makes them (its inference costs time: done here)
        out[k] = pd.Series(out[k])
    out["_order"] = order
    return out


_FLOAT_COLUMNS = ("p_base", "p_tuned", "kl", "kl_base_tuned", "p_base_top1", "paper_tp", "paper_p_tuned_top1",
                  "paper_kl")


def _build_frame(static: dict, dynamic: dict, cfg: ShiftConfig):
    """The token table (CONTRACT columns first), rows in input order and then position."""
    import pandas as pd

    s, order = static, static["_order"]  # the static columns are already in this order
    d = {k: v[order] for k, v in dynamic.items()}
    if not len(order):  # no response tokens at all: an empty table with every column
        d = {k: (np.zeros(0) if k in _FLOAT_COLUMNS else np.zeros(0, dtype=np.int64))
             for k in ("rank_base", "top1_base", "top1_tuned", "rank0_top1", "paper_tr_class", "paper_tr")
             + _FLOAT_COLUMNS}
    exact = {"rank_base": d["rank_base"].astype(np.int64), "p_base": d["p_base"].astype(np.float64),
             "p_tuned": d["p_tuned"].astype(np.float64), "kl": d["kl"].astype(np.float64)}
    cols = {"id": s["id"], "pos": s["pos"], "token_id": s["token_id"], "token": s["token"]}
    if cfg.mode == "paper":
        cols.update(rank_base=d["paper_tr_class"].astype(np.int64) + 1, p_base=d["paper_tp"].astype(np.float64),
                    p_tuned=d["paper_p_tuned_top1"].astype(np.float64), kl=d["paper_kl"].astype(np.float64))
    else:
        cols.update(exact)
    cols["shift_class"] = shift_class(cols["rank_base"])
    cols["n_tokens"] = s["n_tokens"]
    cols["rel_pos"] = s["pos"] / np.maximum(s["n_tokens"], 1)
    cols.update(sentence=s["sentence"], sent_pos=s["sent_pos"], sent_len=s["sent_len"],
                top1_base=d["top1_base"].astype(np.int64), top1_tuned=d["top1_tuned"].astype(np.int64))
    if cfg.mode == "paper":
        cols.update(rank0_paper=d["paper_tr"].astype(np.int64), p_base_top1=d["paper_tp"].astype(np.float64))
        cols.update({f"exact_{k}": v for k, v in exact.items()})
        cols["exact_shift_class"] = shift_class(exact["rank_base"])
    else:
        cols.update(rank0_paper=d["rank0_top1"].astype(np.int64), p_base_top1=d["p_base_top1"].astype(np.float64),
                    kl_base_tuned=d["kl_base_tuned"].astype(np.float64))
    if cfg.view_top_k and "view_base_ids" in d:
        for side in ("base", "tuned"):
            cols[f"top_{side}_ids"] = d[f"view_{side}_ids"]  # object arrays of numpy rows (see _score_batches)
            cols[f"top_{side}_p"] = d[f"view_{side}_p"]
    return pd.DataFrame(cols)


def _read_responses(responses) -> list[dict]:
    from itlens.io import read_records, token_ids_problem

    if isinstance(responses, (str, Path)):
        return read_records(responses, "response", allow_empty_file=True)
    records, seen = [], set()
    for i, r in enumerate(responses):
        for f in ("id", "instruction", "response"):
            if not isinstance(r.get(f) if isinstance(r, dict) else None, str):
                raise InputError(f"response record {i}: expected a string", field=f)
        if r["id"] in seen:
            raise InputError(f"response record {i}: duplicate id {r['id']!r}", field="id")
        problem = token_ids_problem(r.get("response_token_ids"))
        if problem:
            raise InputError(f"response record {i}: {problem}", field="response_token_ids")
        seen.add(r["id"])
        records.append(r)
    return records


# --------------------------------------------------------------------------------- aggregation
def load_stopwords(path: str | Path | None = None) -> set[str]:
    """A small English stop-word list (one word a line, '#' comments), lower-cased."""
    lines = Path(path or STOPWORDS_FILE).read_text(encoding="utf-8").splitlines()
    return {w.strip().lower() for w in lines if w.strip() and not w.startswith("#")}


def _class_codes(column) -> np.ndarray:
    """Index into CLASSES of each row's class string (-1 for anything else): one pass over the column."""
    import pandas as pd

    codes, uniques = pd.factorize(column)
    lookup = np.array([CLASSES.index(u) if u in CLASSES else -1 for u in uniques] + [-1], dtype=np.int64)
    return lookup[codes]  # a missing value's code -1 picks the final -1


def _shares(codes) -> dict:
    n = len(codes)
    counts = np.bincount(codes[codes >= 0], minlength=len(CLASSES))
    return {c: (float(counts[i]) / n if n else None) for i, c in enumerate(CLASSES)}


def _mean(x) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    return float(x.mean()) if x.size else None


def sentence_split_kl(tokens, first_frac: float = 0.05) -> dict:
    """Figure 4: per sentence, mean KL over its first max(1, ceil(0.05 n)) tokens and over the rest,
    averaged over all sentences; Diff% = (first - rest) / rest * 100. Sentences with one token have
    no rest and count only in ``first``."""
    import pandas as pd

    if not len(tokens):
        return {"first": None, "rest": None, "diff_pct": None, "n_sentences": 0}
    n_first = np.maximum(1, np.ceil(first_frac * tokens["sent_len"].to_numpy())).astype(np.int64)
    is_first = tokens["sent_pos"].to_numpy() < n_first
    sentence = tokens["sentence"].to_numpy().astype(np.int64)
    response = pd.factorize(tokens["id"])[0].astype(np.int64)
    # one integer key per (response, sentence, first part or rest); the mean KL of each such group
    key = (response * (int(sentence.max()) + 1) + sentence) * 2 + is_first
    groups, inverse = np.unique(key, return_inverse=True)
    inverse = inverse.reshape(-1)
    per_group = np.bincount(inverse, weights=tokens["kl"].to_numpy(dtype=np.float64)) / np.bincount(inverse)
    first_part = (groups % 2) == 1
    f, r = _mean(per_group[first_part]), _mean(per_group[~first_part])
    diff = (f - r) / r * 100 if f is not None and r not in (None, 0.0) else None
    return {"first": f, "rest": r, "diff_pct": diff, "n_sentences": int(first_part.sum())}


def _token_groups(tokens) -> tuple[np.ndarray, np.ndarray]:
    """(string group of each row, the groups' stripped token strings, sorted).

    Rows are grouped by token id when the table has one (a token id always decodes to the same string),
    else by the string itself; ids whose strings are equal once stripped share a group.
    """
    if "token_id" in tokens and len(tokens):
        ids = tokens["token_id"].to_numpy().astype(np.int64)
        row_of = np.zeros(int(ids.max()) + 1, dtype=np.int64)
        row_of[ids] = np.arange(len(ids))  # a row of each id (any: an id always has the same string)
        present = np.flatnonzero(np.bincount(ids))
        slot = np.zeros(len(row_of), dtype=np.int64)
        slot[present] = np.arange(len(present))
        first, inverse = row_of[present], slot[ids]
    else:
        _, first, inverse = np.unique(tokens["token"].astype(str).to_numpy(), return_index=True,
                                      return_inverse=True)
    stripped = np.array([str(t).strip() for t in tokens["token"].take(first)], dtype=object)
    if not len(stripped):
        return np.zeros(0, dtype=np.int64), stripped
    text, to_string = np.unique(stripped, return_inverse=True)
    return to_string.reshape(-1)[inverse.reshape(-1)], text


def token_counts(tokens, classes: Iterable[str], *, stopwords: set[str] | None = None, top: int | None = None,
                 groups: tuple | None = None, codes: np.ndarray | None = None):
    """Most frequent emitted tokens (stripped strings) among positions of the given classes.

    ``groups``, ``codes``: :func:`_token_groups` and :func:`_class_codes` of ``tokens``, when the caller
    already has them.
    """
    inverse, text = groups or _token_groups(tokens)
    codes = _class_codes(tokens["shift_class"]) if codes is None else codes
    selected = np.isin(codes, [CLASSES.index(c) for c in classes if c in CLASSES])
    counts = np.bincount(inverse[selected], minlength=len(text))
    keep = (counts > 0) & (text != "")
    if stopwords:
        keep &= np.array([t.lower() not in stopwords for t in text], dtype=bool)
    rows = np.flatnonzero(keep)
    rows = rows[np.lexsort((rows, -counts[rows]))][:top or None]  # count descending, then the (sorted) string
    return [[str(text[i]), int(counts[i])] for i in rows]


def token_shift_rates(tokens, *, min_count: int = 1, groups: tuple | None = None, codes: np.ndarray | None = None):
    """Per token string: occurrences, shifted count and the shift rate (AlignTDS ``shift_ratio``)."""
    import pandas as pd

    inverse, text = groups or _token_groups(tokens)
    codes = _class_codes(tokens["shift_class"]) if codes is None else codes
    size = np.bincount(inverse, minlength=len(text))
    shifted = np.bincount(inverse[codes == CLASSES.index("shifted")], minlength=len(text))
    keep = np.flatnonzero((size >= max(min_count, 1)) & (text != ""))
    rate = shifted[keep] / size[keep]
    order = np.lexsort((keep, -size[keep], -rate))  # rate, count descending; then the (sorted) string
    keep, rate = keep[order], rate[order]
    return pd.DataFrame({"token": pd.array(text[keep].astype(str), dtype=tokens["token"].dtype),
                         "count": size[keep].astype(np.int64), "shifted": shifted[keep].astype(np.int64),
                         "rate": rate})


def _group_stats(bins, codes, kl, p_base) -> list[dict]:
    """Class shares, mean KL and mean base probability per integer bin (vectorised with bincount)."""
    bins = np.asarray(bins, dtype=np.int64)
    if not bins.size:
        return []
    n = np.bincount(bins)
    sums = [np.bincount(bins[codes == i], minlength=len(n)) for i in range(len(CLASSES))]
    kl = np.bincount(bins, weights=kl)
    pb = np.bincount(bins, weights=p_base)
    return [{"bin": int(b), "n": int(n[b]), **{c: float(sums[i][b] / n[b]) for i, c in enumerate(CLASSES)},
             "kl": float(kl[b] / n[b]), "p_base": float(pb[b] / n[b])} for b in np.flatnonzero(n)]


def summarize(tokens, cfg: ShiftConfig | None = None, *, stopwords: set[str] | None = None) -> dict:
    """Every aggregate of a token table: class shares, means, position curves, Figure 4 and 12 data."""
    cfg = cfg or ShiftConfig()
    codes = _class_codes(tokens["shift_class"])
    pos = tokens["pos"].to_numpy()
    rel_bin = np.minimum(POSITION_BINS - 1, POSITION_BINS * pos // np.maximum(tokens["n_tokens"].to_numpy(), 1))
    early = pos < cfg.index_max
    kl, p_base = tokens["kl"].to_numpy(dtype=np.float64), tokens["p_base"].to_numpy(dtype=np.float64)
    groups = _token_groups(tokens)
    counts = functools.partial(token_counts, tokens, stopwords=stopwords, top=cfg.top_tokens, groups=groups,
                               codes=codes)
    s = {
        "n_tokens": int(len(tokens)),
        "shares": _shares(codes),
        "mean_kl": _mean(tokens["kl"]),
        "mean_p_base": _mean(tokens["p_base"]),
        "mean_p_tuned": _mean(tokens["p_tuned"]),
        "mean_rank_base": _mean(tokens["rank_base"]),
        "median_rank_base": float(np.median(tokens["rank_base"])) if len(tokens) else None,
        # Figure 1 averages, with the paper's definitions (tuned top-1; rank 0-based).
        "figure1": {"kl": _mean(tokens["kl"]), "base_prob": _mean(tokens["p_base_top1"]),
                    "base_rank": _mean(tokens["rank0_paper"])},
        "emitted_is_tuned_top1": _mean(tokens["token_id"] == tokens["top1_tuned"]),
        "by_rel_pos": _group_stats(rel_bin, codes, kl, p_base),
        "by_index": _group_stats(pos[early], codes[early], kl[early], p_base[early]),
        "sentence_kl": sentence_split_kl(tokens),
        "top_shifted": counts(["shifted"]),
        "top_marginal": counts(["marginal"]),
        "top_shifted_marginal": counts(["shifted", "marginal"]),
        "stopwords_filtered": bool(stopwords),
        "shift_rates": token_shift_rates(tokens, min_count=3, groups=groups, codes=codes)
        .head(cfg.top_tokens).to_dict("records"),
    }
    if "exact_shift_class" in tokens:
        s["exact"] = {"shares": _shares(_class_codes(tokens["exact_shift_class"])),
                      "mean_kl": _mean(tokens["exact_kl"]), "mean_rank_base": _mean(tokens["exact_rank_base"])}
    return s


# ------------------------------------------------------------------------------------- writing
def write_shift(result: ShiftResult, out_dir: str | Path) -> Path:
    """Write ``tokens.parquet`` and ``summary.json`` (each atomically; the summary last)."""
    from itlens.io import atomic_write_bytes, atomic_write_json

    out_dir = Path(out_dir)
    buf = io.BytesIO()
    result.tokens.to_parquet(buf, index=False)
    atomic_write_bytes(out_dir / "tokens.parquet", buf.getvalue())
    atomic_write_json(out_dir / "summary.json", _json_safe(result.summary))
    return out_dir


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    return obj


def read_shift(out_dir: str | Path) -> ShiftResult:
    """Load a written result back (tokens table and summary)."""
    import json

    import pandas as pd

    out_dir = Path(out_dir)
    return ShiftResult(tokens=pd.read_parquet(out_dir / "tokens.parquet"),
                       summary=json.loads((out_dir / "summary.json").read_text(encoding="utf-8")))
