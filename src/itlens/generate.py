"""Batched greedy generation over evaluation prompts, writing CONTRACT response records.

A tuned model reads the prompt through its chat template and stops at the template's end of turn; a
base model reads it inside the in-context "# Query / # Answer" frame (URIAL-style) and stops where the
next exchange would begin. Prompts are sorted by length and left-padded into batches, decoded with the
KV cache, and written back in input order with every extra prompt field carried through.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from pathlib import Path
from typing import Literal

from itlens.errors import InputError
from itlens.io import atomic_write_jsonl, read_records
from itlens.templates import FRAME_STOP, chat_prompt, encode_prompts, frame_prompt, load_frame
from itlens.tokenizer import END, answer_stop_ids, end_of_turn_ids


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
    backend: Literal["transformers", "vllm"] = dataclasses.field(default="transformers", metadata={
        "help": "transformers (HF generate, the default) or vllm (an installed vLLM engine; same prompt "
                "token ids, greedy, same stop rules)."})
    vllm_args: dict = dataclasses.field(default_factory=dict, metadata={
        "help": "Extra keyword arguments for vllm.LLM (e.g. tensor_parallel_size, gpu_memory_utilization, "
                "max_model_len); backend=vllm only."})

    def validate(self) -> None:
        from itlens.models import DTYPES

        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"expected a positive integer, got {value!r}", key=name)
        if self.mode not in ("chat", "frame"):
            raise InputError(f"unknown mode {self.mode!r} (expected chat or frame)", key="mode")
        if self.backend not in ("transformers", "vllm"):
            raise InputError(f"unknown backend {self.backend!r} (expected transformers or vllm)", key="backend")
        if self.dtype not in DTYPES:
            raise InputError(f"unknown dtype {self.dtype!r} (expected one of {list(DTYPES)})", key="dtype")
        if not isinstance(self.vllm_args, dict):
            raise InputError("expected a mapping of vllm.LLM keyword arguments", key="vllm_args")


def render_prompts(tokenizer, prompts: list[dict], *, mode: str = "chat", frame: str | None = None) -> list[str]:
    """The exact text each prompt is decoded from (shared with the token-shift analysis)."""
    if mode == "chat":
        return [chat_prompt(tokenizer, p) for p in prompts]
    if mode == "frame":
        frame_text = load_frame(frame or None)
        return [frame_prompt(frame_text, p) for p in prompts]
    raise InputError(f"unknown mode {mode!r} (expected chat or frame)", key="mode")


def decoding_stop_strings(tokenizer, mode: str) -> list[str] | None:
    """Stop strings the decoder itself watches for (both backends), or None when the stop ids suffice.

    Frame mode always (the next ``# Query`` is several tokens). Chat mode when the default template's
    end of turn ``<|end|>`` is not one token of the vocabulary (Llama-2, Mistral, Gemma or GPT-2
    tokenizers given the project's template): the model writes it as several ordinary tokens, which no
    stop id catches, so without the string decoding would run on to max_new_tokens. Either way the
    record is cut at the string afterwards (:func:`_response_record`), so the text is the same; only
    fewer tokens are decoded.
    """
    if mode == "frame":
        return [FRAME_STOP]
    end_ids = tokenizer.encode(END, add_special_tokens=False)  # one id when it is a token (not get_vocab():
    if len(end_ids) == 1 and end_ids[0] in end_of_turn_ids(tokenizer):  # 262k entries built per call)
        return None
    return [END]


def _cut(text: str, stops: list[str], before: str = "") -> tuple[str, bool]:
    """``text`` up to its first stop string, and whether one was found. A stop string may begin in the
    prompt (``before``): a frame prompt ends with ``\n``, so an answer that opens with ``\n# Query`` ends
    at once. HF's stop-string check reads the prompt's last tokens too and stops there; cutting the same
    way keeps that answer empty (not ``# Query``), whichever backend decoded it."""
    found = []
    for s in stops:
        tail = before[max(0, len(before) - len(s) + 1):]  # too short to hold s by itself
        i = (tail + text).find(s)
        if i >= 0:
            found.append(max(0, i - len(tail)))
    cut = min(found, default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate_responses(model, prompts: list[dict], *, mode: str = "chat", frame: str | None = None,
                       max_new_tokens: int = 128, batch_size: int = 16, model_name: str | None = None,
                       progress: bool = False, shard: tuple[int, int] | None = None, temperature: float = 0.0,
                       seed: int = 0) -> list[dict]:
    """Greedy answers to ``prompts`` (CONTRACT prompt records), as CONTRACT response records.

    ``model`` is a :class:`itlens.models.LoadedModel` or anything :func:`itlens.models.load_model`
    accepts. Each output is the prompt record plus ``response``, ``model``, ``mode``,
    ``n_tokens`` (generated tokens), ``finish`` (``stop`` or ``length``) and ``response_token_ids`` (the
    generated ids of the answer). An answer ends at the end of turn, eos, any other special token (a
    turn marker such as ``<|user|>``: :func:`itlens.tokenizer.answer_stop_ids`) or a stop string. ``shard=(rank, world)``
    decodes only that process's batches (every world-th batch of the one-process plan, so each
    prompt meets the same batch-mates and padding as in one process) and returns just those records.
    ``temperature`` > 0 samples instead (full distribution, no top-k/top-p; SliCK probing), seeded per
    batch from ``seed`` so a rerun gives the same samples; those records also carry ``temperature``.
    """
    import torch

    from itlens.models import LoadedModel, load_model

    if temperature < 0:
        raise InputError(f"expected a temperature >= 0, got {temperature}", key="temperature")
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"expected a positive integer, got {value!r}", key=name)
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    tok, net = lm.tokenizer, lm.model
    tok.padding_side = "left"
    texts = render_prompts(tok, prompts, mode=mode, frame=frame)
    stop_ids = answer_stop_ids(tok)
    stop_strings = [FRAME_STOP] if mode == "frame" else [END]
    watch = decoding_stop_strings(tok, mode)  # stop strings generate itself stops at (else only stop ids)
    encoded = encode_prompts(tok, texts)  # BOS first for a tokenizer that starts texts with it
    _check_positions(net, prompts, encoded, max_new_tokens)
    batches = list(enumerate(batch_plan(encoded, batch_size)))  # (one-process batch number, prompt indices)
    if shard is not None:  # this process's share of the one-process batches (see itlens.sharding)
        batches = batches[shard[0]::shard[1]]
    results: list[dict | None] = [None] * len(prompts)
    device = next(net.parameters()).device
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(idx) for _, idx in batches), desc=f"generate {lm.name}", unit="prompt")
    decoding = plain_decoding(temperature)
    pad_id = padding_id(tok, stop_ids)
    for b, idx in batches:
        batch = left_padded([encoded[i] for i in idx], pad_id, device)
        # sampling seeds its own RNG stream per batch and leaves the caller's global RNG state as it was
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                    enabled=temperature > 0)
        with rng, torch.inference_mode():
            if temperature > 0:
                torch.manual_seed(seed * 1_000_003 + b)
            out = net.generate(**batch, **decoding, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                               pad_token_id=pad_id, use_cache=True, num_beams=1,
                               stop_strings=watch, **({"tokenizer": tok} if watch else {}))
        new = out[:, batch["input_ids"].shape[1]:]
        for row, i in enumerate(idx):
            results[i] = _response_record(prompts[i], new[row].tolist(), tok, stop_ids, stop_strings,
                                          max_new_tokens=max_new_tokens, mode=mode, model=model_name or lm.name,
                                          context=texts[i])
            if temperature > 0:
                results[i]["temperature"] = temperature
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return [r for r in results if r is not None]


PLAIN_DECODING = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": None, "bad_words_ids": None,
    "sequence_bias": None, "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "exponential_decay_length_penalty": None, "renormalize_logits": False,
    "remove_invalid_values": False, "guidance_scale": None, "watermarking_config": None, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None, "top_h": None, "max_time": None,
    "num_return_sequences": 1, "prompt_lookup_num_tokens": None, "assistant_early_exit": None}
"""What ``generate`` is told besides the decoding itself: none of the logits processors or stopping rules a
model's ``generation_config.json`` may set (Qwen2.5-Instruct's ``repetition_penalty`` 1.05, another's
``no_repeat_ngram_size`` or ``min_new_tokens``). transformers fills every setting a call leaves unset from
that file, so without these the "greedy" answer is not the argmax (which the token-shift analysis
assumes), and not vLLM's, which takes the sampling parameters it is given as they are."""


def plain_decoding(temperature: float = 0.0) -> dict:
    """The decoding every ``generate`` call of itlens passes (generation, knowledge probes, the local judge):
    greedy at temperature 0, else sampling from the full distribution at that temperature, with none of
    :data:`PLAIN_DECODING`'s settings taken from the model's ``generation_config.json``."""
    return {**_known_plain_decoding(), **({"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
                                          if temperature > 0 else {"do_sample": False})}


@functools.lru_cache(maxsize=1)
def _known_plain_decoding() -> dict:
    """:data:`PLAIN_DECODING`, less any setting the installed transformers does not know (which ``generate``
    would take for a model input and refuse)."""
    from transformers import GenerationConfig

    known = GenerationConfig()
    return {k: v for k, v in PLAIN_DECODING.items() if hasattr(known, k)}


def padding_id(tok, stop_ids: list[int]) -> int:
    """The id that pads a batch: the tokenizer's pad token, else a stop id (a tokenizer without a pad token,
    even without EOS), which ends an answer as padding does."""
    return tok.pad_token_id if tok.pad_token_id is not None else (stop_ids[0] if stop_ids else 0)


def left_padded(rows: list[list[int]], pad_id: int, device) -> dict:
    """Prompt ids left-padded into one batch with its attention mask. Not ``tokenizer.pad``, which refuses
    a tokenizer without a pad token; the padded positions are masked, so any id serves."""
    import torch

    width = max(len(r) for r in rows)
    ids = [[pad_id] * (width - len(r)) + r for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return {"input_ids": torch.tensor(ids, dtype=torch.long, device=device),
            "attention_mask": torch.tensor(mask, dtype=torch.long, device=device)}


def trained_positions(config) -> int | None:
    """A model config's ``max_position_embeddings``, or None where it names none. A composite model's config
    (Gemma 3 4B and up, Llava, Qwen2-VL) holds it in its text model's (``get_text_config()``), not at the top."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "max_position_embeddings", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _learned_positions(net, limit: int) -> bool:
    """Whether the model looks positions up in a learned table of ``limit`` rows (GPT-2, OPT, GPT-Neo; OPT
    keeps 2 more): it cannot read a position past them at all, where a rotary model decodes on."""
    import torch

    inputs = net.get_input_embeddings()
    return any(isinstance(m, torch.nn.Embedding) and m is not inputs and limit <= m.num_embeddings <= limit + 2
               for m in net.modules())


def _check_positions(net, prompts: list[dict], encoded: list[list[int]], max_new_tokens: int) -> None:
    """Refuse or warn when prompt + answer can pass the model's trained positions (max_position_embeddings).

    A model with learned position embeddings fails there with an index error (a device-side assert on a
    GPU), so such a prompt is an input error, as vLLM makes it. A rotary model decodes on regardless
    (answers degrade), which vLLM refuses, so a run could silently differ between the backends: a warning.
    """
    limit = trained_positions(getattr(net, "config", None))
    if limit is None:
        return
    over = [i for i, ids in enumerate(encoded) if len(ids) + max_new_tokens > limit]
    if over and _learned_positions(net, limit):
        first = over[0]
        raise InputError(f"prompt {prompts[first].get('id')!r} has {len(encoded[first])} tokens: with max_new_tokens "
                         f"{max_new_tokens} it passes the model's {limit} positions, which a model with learned "
                         f"position embeddings cannot read past ({len(over)} of {len(prompts)} prompts do; shorten "
                         "them or lower max_new_tokens)", key="max_new_tokens")
    if over:
        first = over[0]
        warnings.warn(f"{len(over)} of {len(prompts)} prompts (first: {prompts[first].get('id')!r}, "
                      f"{len(encoded[first])} tokens) can pass the model's {limit} positions with max_new_tokens "
                      f"{max_new_tokens}: transformers decodes past them (answers degrade; backend=vllm refuses)",
                      stacklevel=3)


def batch_plan(encoded: list[list[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices per decoding batch: longest first, so similar lengths share a batch (stable order)."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _response_record(prompt: dict, ids: list[int], tok, stop_ids, stop_strings, *, max_new_tokens: int,
                     mode: str, model: str, context: str = "") -> dict:
    """Generated ids -> a CONTRACT response record (cut at the first stop id, then at a stop string).

    Padding ends a row too (a row that stopped on a stop string is padded while its batch-mates go on),
    and ``n_tokens`` counts only the tokens of the kept answer (not a cut-off stop string), so a record
    is the same whether its prompt was decoded alone or in a batch. ``response_token_ids`` are those
    tokens, as generated: the token-shift analysis scores them rather than a re-tokenization of the text
    (which can split it differently, ``\n\n`` as two ``\n``). Where a stop string was cut, the last of
    them can hold its first characters too (``.<`` before ``|end|>``). ``context`` is the prompt's text: a
    stop string may begin there (:func:`_cut`).
    """
    pad = getattr(tok, "pad_token_id", None)
    ends = set(stop_ids) | ({pad} if pad is not None else set())
    n = len(ids)
    for k, t in enumerate(ids):
        if t in ends:
            n = k
            break
    text, stopped = _cut(tok.decode(ids[:n], skip_special_tokens=True), stop_strings, context)
    finish = "stop" if n < len(ids) or stopped or len(ids) < max_new_tokens else "length"
    if stopped:
        n = _tokens_covering(tok, ids[:n], text.rstrip())
    return {**prompt, "response": text.strip(), "model": model, "mode": mode, "n_tokens": n, "finish": finish,
            "response_token_ids": [int(t) for t in ids[:n]]}


def _tokens_covering(tok, ids: list[int], text: str) -> int:
    """The fewest leading ``ids`` whose decoded text begins with ``text`` (``len(ids)`` if none do)."""
    lo, hi = 0, len(ids)  # decoding a longer prefix only appends text, so a binary search finds the least
    while lo < hi:
        mid = (lo + hi) // 2
        if tok.decode(ids[:mid], skip_special_tokens=True).startswith(text):
            hi = mid
        else:
            lo = mid + 1
    return lo


def generate_file(model: str, prompts_path: str | Path, out_path: str | Path, *, adapter: str | None = None,
                  cfg: GenerateConfig | None = None, model_name: str | None = None, progress: bool = True) -> Path:
    """``itlens generate``: read prompts, load the model (and adapter), write responses atomically.

    Under ``accelerate launch`` with several processes each process decodes its share of the batches
    and the main process writes the merged file (the same as a one-process run; see itlens.sharding);
    every process returns once it is written.
    """
    from itlens.models import load_model
    from itlens.sharding import barrier, current_shard, gather_to_main, merge_records, report

    cfg = cfg or GenerateConfig()
    cfg.validate()
    prompts = read_records(prompts_path, "prompt")
    shard = current_shard()
    if cfg.backend == "vllm":
        if shard is not None:
            raise InputError("backend=vllm runs in one process (it spreads over GPUs itself: set "
                             "vllm_args.tensor_parallel_size); launch it without accelerate", key="backend")
        rows = generate_responses_vllm(model, prompts, adapter=adapter, mode=cfg.mode, frame=cfg.frame or None,
                                       max_new_tokens=cfg.max_new_tokens, dtype=cfg.dtype, model_name=model_name,
                                       engine_args=cfg.vllm_args)
        return atomic_write_jsonl(out_path, rows)
    import torch

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if shard is not None and cfg.device == "auto":
        device = shard.device  # one GPU per process
    lm = load_model(model, adapter=adapter, dtype=cfg.dtype, name=model_name, device=device)
    rows = generate_responses(lm, prompts, mode=cfg.mode, frame=cfg.frame or None,
                              max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                              model_name=model_name, progress=progress and (shard is None or shard.is_main),
                              shard=shard.spec if shard else None)
    if shard is None:
        return atomic_write_jsonl(out_path, rows)
    parts = gather_to_main(shard, rows)
    if shard.is_main:
        report("prompts", [len(part) for part in parts])
        atomic_write_jsonl(out_path, merge_records(parts, [p["id"] for p in prompts]))
    barrier(shard)  # every process returns the path once the file is there (not a missing or stale one)
    return Path(out_path)


def generate_responses_vllm(model: str, prompts: list[dict], *, adapter: str | None = None, mode: str = "chat",
                            frame: str | None = None, max_new_tokens: int = 128, dtype: str = "auto",
                            model_name: str | None = None, engine_args: dict | None = None, llm=None) -> list[dict]:
    """The same greedy answers through a vLLM engine (``backend: vllm``), as CONTRACT response records.

    vLLM gets the exact prompt token ids the transformers backend decodes from, temperature 0, and
    the same stop ids and strings; the records are built by the same code. ``llm`` reuses an engine.
    """
    from itlens.models import load_tokenizer, model_label, resolve_model

    try:
        import vllm
    except ImportError:
        raise InputError("vLLM is not installed (pip install vllm), use backend=transformers", key="backend") from None
    if adapter is not None:
        raise InputError("backend=vllm takes a full model dir: merge the LoRA adapter first "
                         "(itlens tune --set merge_adapter=true)", key="backend")
    path = resolve_model(model)
    tok = load_tokenizer(path)
    texts = render_prompts(tok, prompts, mode=mode, frame=frame)
    stop_ids = answer_stop_ids(tok)
    stop_strings = [FRAME_STOP] if mode == "frame" else [END]
    if llm is None:
        llm = vllm.LLM(model=path, dtype=dtype, seed=0, **(engine_args or {}))
    params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=list(stop_ids),
                                 stop=decoding_stop_strings(tok, mode), skip_special_tokens=True)
    inputs = [{"prompt_token_ids": ids} for ids in encode_prompts(tok, texts)]
    limit = getattr(getattr(llm, "model_config", None), "max_model_len", None)
    for p, x in zip(prompts, inputs):  # vLLM would stop short of max_new_tokens (or refuse); transformers not
        if limit and len(x["prompt_token_ids"]) + max_new_tokens > limit:
            raise InputError(f"prompt {p.get('id')!r} has {len(x['prompt_token_ids'])} tokens: with max_new_tokens "
                             f"{max_new_tokens} it passes the engine's max_model_len {limit} (raise "
                             f"vllm_args.max_model_len within the model's positions, or lower max_new_tokens)",
                             key="max_new_tokens")
    outputs = llm.generate(inputs, params, use_tqdm=False)
    name = model_name or model_label(model, path)
    return [_response_record(p, list(o.outputs[0].token_ids), tok, stop_ids, stop_strings,
                             max_new_tokens=max_new_tokens, mode=mode, model=name, context=t)
            for p, o, t in zip(prompts, outputs, texts)]
