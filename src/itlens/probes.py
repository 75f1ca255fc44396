"""Knowledge probes of a model against the synthetic world's ground truth, by teacher forcing.

A probe is a prompt and a gold value. The model reads ``BOS + prompt + " " + value`` in one forward pass;
the probe is correct iff the argmax at every position of the value equals the gold token. Because each
gold token is what greedy decoding would have emitted at that point, this is exactly "greedy decoding
continues the prompt with the value" (the value's first token included), at the cost of one batched
forward pass instead of a decoding loop.

- Cloze: the prompt is the canonical sentence up to the value, as in the corpus ("Ana Belor was born in").
- Few-shot QA: the world's in-context frame (a few "# Query / # Answer" exchanges) with the question,
  then the canonical answer's lead-in (the same sentence start); the value must follow. The lead-in is
  teacher-forced: the probe checks the knowledge, not the choice of answer wording.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

from itlens.templates import frame_prompt
from itlens.world import DESCRIBE, World


def teacher_forced_hits(model, tokenizer, items: Iterable[tuple[str, str]], *, batch_size: int = 32) -> list[bool]:
    """For each (prompt, target) text pair: does greedy decoding after ``BOS + prompt`` produce ``target``?

    ``target`` must start at a pre-token boundary (e.g. with a space), so that tokenising prompt and
    target separately gives the same ids as tokenising their concatenation.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    pairs = [(bos + ids(p), ids(t)) for p, t in items]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return argmax_matches(model, pairs, pad_id=pad, batch_size=batch_size)


def argmax_matches(model, pairs: list[tuple[list[int], list[int]]], *, pad_id: int = 0,
                   batch_size: int = 32) -> list[bool]:
    """For each (prompt ids, target ids): is the argmax at every target position the target token?

    One batched forward pass per ``batch_size`` pairs (right padding, so positions stay 0..n-1).
    """
    import torch

    hits: list[bool] = []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start:start + batch_size]
                width = max(len(p) + len(t) for p, t in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, (p, t) in enumerate(chunk):
                    ids[i, : len(p) + len(t)] = torch.tensor(p + t)
                    mask[i, : len(p) + len(t)] = 1
                pred = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.argmax(-1).cpu()
                for i, (p, t) in enumerate(chunk):
                    hits.append(pred[i, len(p) - 1: len(p) + len(t) - 1].tolist() == list(t))
    finally:
        model.train(was_training)
    return hits


def _summarise(records: list[dict], hits: list[bool]) -> dict[str, Any]:
    by_attr: dict[str, list[bool]] = defaultdict(list)
    by_group: dict[str, list[bool]] = defaultdict(list)
    for r, h in zip(records, hits):
        by_attr[r["attribute"]].append(h)
        by_group[str(r.get("group", "all"))].append(h)

    def acc(xs: list[bool]) -> float:
        return sum(xs) / len(xs) if xs else 0.0

    return {"acc": acc(hits), "n": len(hits),
            "by_attribute": {k: acc(v) for k, v in sorted(by_attr.items())},
            "by_group": {k: acc(v) for k, v in sorted(by_group.items())}}


def cloze_accuracy(model, tokenizer, world: World, cloze_records: list[dict], *, batch_size: int = 32,
                   return_hits: bool = False) -> dict:
    """Share of cloze probes (``cloze.jsonl`` rows) whose gold value greedy decoding would produce.

    ``return_hits`` adds ``hits`` (one bool per probe) for paired tests between models."""
    items = [(r["prompt"], " " + r["answers"][0]) for r in cloze_records]
    hits = teacher_forced_hits(model, tokenizer, items, batch_size=batch_size)
    out = _summarise(cloze_records, hits)
    if return_hits:
        out["hits"] = hits
    return out


def fewshot_qa_accuracy(model, tokenizer, world: World, records: list[dict], frame_text: str, *,
                        batch_size: int = 16) -> dict:
    """Few-shot QA accuracy in the "# Query / # Answer" frame (single-attribute records; describe ones are
    skipped). Records need ``instruction``, ``person``, ``attribute`` and ``answers``."""
    records = [r for r in records if r["attribute"] != DESCRIBE]
    items = []
    for r in records:
        person = world.person(r["person"])
        items.append((frame_prompt(frame_text, r) + world.answer_prefix(person, r["attribute"]),
                      " " + r["answers"][0]))
    return _summarise(records, teacher_forced_hits(model, tokenizer, items, batch_size=batch_size))
