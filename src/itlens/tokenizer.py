"""A small byte-level BPE tokenizer trained locally, saved as a normal HF tokenizer.

The synthetic world's base model needs its own tokenizer (no hub access). It carries the special
tokens of the project's default chat template (``prompts/chat_template.jinja``), so a tuned model's
tokenizer, its generations and the token-shift analysis all use exactly the same template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from itlens.resources import read_prompt

BOS = "<|endoftext|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
SPECIAL_TOKENS = [BOS, PAD, SYSTEM, USER, ASSISTANT, END]


def default_chat_template() -> str:
    """The project's default chat template (used for base models that have none)."""
    return read_prompt("chat_template.jinja").strip()


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    ``bos``/``eos`` are ``<|endoftext|>`` (document boundaries in pretraining); ``<|end|>`` closes a
    chat turn and is what generation stops at. Padding side is left (batched generation).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=BOS,
        pad_token=PAD,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT, END],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = default_chat_template()
    return hf


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the template's ``<|end|>`` when present, and eos."""
    ids = []
    for t in (END, "<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        i = tokenizer.convert_tokens_to_ids(t)
        # the id must map back to the token (not get_vocab(): Gemma's 262k entries were built per candidate)
        if isinstance(i, int) and i != tokenizer.unk_token_id and i >= 0 and tokenizer.convert_ids_to_tokens(i) == t:
            ids.append(i)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def answer_stop_ids(tokenizer) -> list[int]:
    """Token ids that end a generated answer: :func:`end_of_turn_ids` first, then every other special
    token of the tokenizer (``<|user|>``, ``<|start_header_id|>``, BOS, padding, ...).

    A model that writes a turn marker has begun a turn of its own. Decoding on would let the text
    (decoded with special tokens skipped) join the answer to what followed the marker, and the record
    would no longer be the tokens the model chose for its answer.
    """
    ids = end_of_turn_ids(tokenizer)
    seen = set(ids)
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    for i, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            special.add(int(i))
    return ids + sorted(i for i in special if isinstance(i, int) and i >= 0 and i not in seen)


def save_tokenizer(tokenizer, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
