"""How a prompt is put in front of a model: the chat template (tuned models) or the in-context frame
(base models, URIAL-style). Generation and token-shift analysis both call these, so the two always
see exactly the same text.
"""

from __future__ import annotations

import weakref

from itlens.errors import InputError
from itlens.io import to_messages
from itlens.resources import read_prompt
from itlens.tokenizer import default_chat_template

DEFAULT_FRAME = "base_frame.txt"


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own encoding starts every text with BOS (Gemma and Llama do; GPT-2 and the
    world's tokenizer do not). Such a model was trained with BOS first and reads text poorly without it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template (a base model's) the project's default one, which starts
    with BOS when the tokenizer's own encoding does (so TRL's training, generation and the token-shift
    analysis all read the BOS the model was pretrained with).

    A tokenizer with its own template that does not render BOS although its encoding adds it (zephyr /
    TinyLlama-Chat style) gets ``{{ bos_token }}`` put in front: TRL tokenizes the rendered chat without
    special tokens, while generation and the token-shift analysis add BOS to the prompt, so without it
    training and generation would read different ids. Calling this again changes nothing, and costs one
    tokenization of a letter while the template, BOS and whether the encoding adds BOS are those it last
    left (rendering a template to check it takes milliseconds, paid once per token-shift run on the GPU's
    critical path)."""
    template = getattr(tokenizer, "chat_template", None)
    # whether the encoding adds BOS is part of what was checked: a post-processor changed since
    # (add_bos_token set) must not be answered from the memo
    state = (template, getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None),
             adds_bos(tokenizer))
    try:
        if template and _CHECKED.get(tokenizer) == state:
            return
    except TypeError:  # not weak-referenceable or not hashable: check every time
        pass
    _ensure_chat_template(tokenizer, template)
    try:
        _CHECKED[tokenizer] = (tokenizer.chat_template, *state[1:])
    except TypeError:
        pass


_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Tokenizer -> (template, BOS token, BOS id, adds BOS) that ensure_chat_template last left it with."""


def _ensure_chat_template(tokenizer, template) -> None:
    if not template:
        template = default_chat_template()
        tokenizer.chat_template = ("{{ bos_token }}" + template) if adds_bos(tokenizer) else template
    elif isinstance(template, str) and adds_bos(tokenizer) and tokenizer.bos_token \
            and not _renders_bos_first(tokenizer):
        tokenizer.chat_template = "{{ bos_token }}" + template


def _renders_bos_first(tokenizer) -> bool:
    """Whether the chat template's text starts with the BOS token (True when it cannot be rendered
    with one user turn, so a template we cannot check is left as it is)."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template's own checks (raise_exception) or a jinja error
        return True
    return not isinstance(text, str) or text.startswith(tokenizer.bos_token)


def encode_prompts(tokenizer, texts: list[str], *, bos: bool | None = None) -> list[list[int]]:
    """Token ids of rendered prompts (chat template or frame), tokenized as one batch: each text's own
    tokens, with BOS first when the tokenizer's encoding adds it and the text does not already start
    with it. No other special token is added (a tokenizer that appends EOS must not end a prompt with
    it). ``bos``: :func:`adds_bos`, when the caller has it already."""
    if not texts:
        return []
    bos = adds_bos(tokenizer) if bos is None else bos
    first = tokenizer.bos_token_id
    return [[first] + ids if bos and (not ids or ids[0] != first) else ids
            for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def encode_prompt(tokenizer, text: str, *, bos: bool | None = None) -> list[int]:
    """:func:`encode_prompts` of one text."""
    return encode_prompts(tokenizer, [text], bos=bos)[0]


def chat_prompt(tokenizer, record: dict) -> str:
    """The user turn rendered with the tokenizer's chat template, ending where the answer starts.

    A template that refuses the record (its own ``raise_exception``: Gemma 2's "System role not supported",
    Mistral's strict alternation) is an input error naming the record, not a traceback."""
    from jinja2 import TemplateError

    ensure_chat_template(tokenizer)
    try:
        return tokenizer.apply_chat_template(to_messages(record, with_response=False), tokenize=False,
                                             add_generation_prompt=True)
    except TemplateError as e:
        raise InputError(f"the model's chat template refuses record {record.get('id')!r}: {e}",
                         field="messages" if "messages" in record else "instruction") from None


def end_of_turn_text(tokenizer) -> str:
    """The text the chat template writes right after an assistant turn's content (``<|end|>`` with the
    project's template, ``<|im_end|>\n`` with ChatML); '' when a template does not show it."""
    ensure_chat_template(tokenizer)
    sentinel = "\ue000itlens\ue001"  # private-use characters: no template changes them
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "a"},
                                              {"role": "assistant", "content": sentinel}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template's own checks (raise_exception) or a jinja error
        return ""
    at = text.find(sentinel) if isinstance(text, str) else -1
    return text[at + len(sentinel):] if at >= 0 else ""


def load_frame(frame: str | None = None) -> str:
    """The in-context frame text (a prompt file with one ``{instruction}`` placeholder). A leading UTF-8 BOM
    (Windows editors write one) is not text the model should read."""
    try:
        text = read_prompt(frame or DEFAULT_FRAME).removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text (byte {e.start})", file=frame or DEFAULT_FRAME) from None
    if "{instruction}" not in text:
        raise InputError("frame prompt must contain the placeholder {instruction}", file=frame or DEFAULT_FRAME)
    return text.rstrip("\n") + "\n"


def frame_prompt(frame_text: str, record: dict) -> str:
    """The in-context frame with the record's user turn inserted; the answer follows directly."""
    from itlens.io import user_text

    return frame_text.replace("{instruction}", user_text(record))


FRAME_STOP = "\n\n# Query"
"""Where a base model's answer in the frame ends (the start of the next exchange)."""
