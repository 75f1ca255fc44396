"""Batched greedy generation over evaluation prompts, writing CONTRACT response records.

A tuned model reads the prompt through its chat template and stops at the template's end of turn; a
base model reads it inside the in-context "# Query / # Answer" frame (URIAL-style) and stops where the
next exchange would begin. Prompts are sorted by length and left-padded into batches, decoded with the
KV cache, and written back in input order with every extra prompt field carried through.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from itlens.errors import InputError
from itlens.io import atomic_write_jsonl, read_records
from itlens.templates import FRAME_STOP, chat_prompt, frame_prompt, load_frame
from itlens.tokenizer import END, end_of_turn_ids


@dataclasses.dataclass
class GenerateConfig:
    """Decoding settings (greedy, so the only knobs are length, batching and the prompt format)."""

    mode: Literal["chat", "frame"] = dataclasses.field(default="chat", metadata={
        "help": "chat: the model's chat template (tuned models); frame: the in-context frame (base models)."})
    frame: str = dataclasses.field(default="", metadata={
        "help": "Frame prompt file for mode=frame (default prompts/base_frame.txt); one {instruction} slot."})
    max_new_tokens: int = dataclasses.field(default=128, metadata={"help": "Cap on generated tokens."})
    batch_size: int = dataclasses.field(default=16, metadata={"help": "Prompts decoded together."})
    dtype: str = dataclasses.field(default="float32", metadata={
        "help": "Weights dtype: float32 on CPU keeps greedy tokens equal to teacher-forced argmax."})
    device: str = dataclasses.field(default="auto", metadata={
        "help": "auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."})


def render_prompts(tokenizer, prompts: list[dict], *, mode: str = "chat", frame: str | None = None) -> list[str]:
    """The exact text each prompt is decoded from (shared with the token-shift analysis)."""
    if mode == "chat":
        return [chat_prompt(tokenizer, p) for p in prompts]
    if mode == "frame":
        frame_text = load_frame(frame or None)
        return [frame_prompt(frame_text, p) for p in prompts]
    raise InputError(f"unknown mode {mode!r} (expected chat or frame)", key="mode")


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate_responses(model, prompts: list[dict], *, mode: str = "chat", frame: str | None = None,
                       max_new_tokens: int = 128, batch_size: int = 16, model_name: str | None = None,
                       progress: bool = False) -> list[dict]:
    """Greedy answers to ``prompts`` (CONTRACT prompt records), as CONTRACT response records.

    ``model`` is a :class:`itlens.models.LoadedModel` or anything :func:`itlens.models.load_model`
    accepts. Each output is the prompt record plus ``response``, ``model``, ``mode``,
    ``n_tokens`` (generated tokens) and ``finish`` (``stop`` or ``length``).
    """
    import torch

    from itlens.models import LoadedModel, load_model

    lm = model if isinstance(model, LoadedModel) else load_model(model)
    tok, net = lm.tokenizer, lm.model
    tok.padding_side = "left"
    texts = render_prompts(tok, prompts, mode=mode, frame=frame)
    stop_ids = end_of_turn_ids(tok)
    stop_strings = [FRAME_STOP] if mode == "frame" else [END]
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    results: list[dict | None] = [None] * len(prompts)
    device = next(net.parameters()).device
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc=f"generate {lm.name}", unit="prompt")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = tok.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt").to(device)
        with torch.inference_mode():
            out = net.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                               pad_token_id=tok.pad_token_id, use_cache=True, num_beams=1,
                               **({"stop_strings": stop_strings, "tokenizer": tok} if mode == "frame" else {}))
        new = out[:, batch["input_ids"].shape[1]:]
        for row, i in enumerate(idx):
            ids = new[row].tolist()
            n = len(ids)
            for k, t in enumerate(ids):
                if t in stop_ids:
                    n = k
                    break
            text, stopped = _cut(tok.decode(ids[:n], skip_special_tokens=True), stop_strings)
            finish = "stop" if n < len(ids) or stopped or len(ids) < max_new_tokens else "length"
            results[i] = {**prompts[i], "response": text.strip(), "model": model_name or lm.name,
                          "mode": mode, "n_tokens": n, "finish": finish}
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


def generate_file(model: str, prompts_path: str | Path, out_path: str | Path, *, adapter: str | None = None,
                  cfg: GenerateConfig | None = None, model_name: str | None = None, progress: bool = True) -> Path:
    """``itlens generate``: read prompts, load the model (and adapter), write responses atomically."""
    from itlens.models import load_model

    cfg = cfg or GenerateConfig()
    prompts = read_records(prompts_path, "prompt")
    import torch

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    lm = load_model(model, adapter=adapter, dtype=cfg.dtype, name=model_name, device=device)
    rows = generate_responses(lm, prompts, mode=cfg.mode, frame=cfg.frame or None,
                              max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                              model_name=model_name, progress=progress)
    return atomic_write_jsonl(out_path, rows)
