"""How a prompt is put in front of a model: the chat template (tuned models) or the in-context frame
(base models, URIAL-style). Generation and token-shift analysis both call these, so the two always
see exactly the same text.
"""

from __future__ import annotations

from itlens.io import to_messages
from itlens.resources import read_prompt
from itlens.tokenizer import default_chat_template

DEFAULT_FRAME = "base_frame.txt"


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template (a base model's) the project's default one."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = default_chat_template()


def chat_prompt(tokenizer, record: dict) -> str:
    """The user turn rendered with the tokenizer's chat template, ending where the answer starts."""
    ensure_chat_template(tokenizer)
    return tokenizer.apply_chat_template(to_messages(record, with_response=False), tokenize=False,
                                         add_generation_prompt=True)


def load_frame(frame: str | None = None) -> str:
    """The in-context frame text (a prompt file with one ``{instruction}`` placeholder)."""
    text = read_prompt(frame or DEFAULT_FRAME)
    if "{instruction}" not in text:
        from itlens.errors import InputError

        raise InputError("frame prompt must contain the placeholder {instruction}", file=frame or DEFAULT_FRAME)
    return text.rstrip("\n") + "\n"


def frame_prompt(frame_text: str, record: dict) -> str:
    """The in-context frame with the record's user turn inserted; the answer follows directly."""
    from itlens.io import user_text

    return frame_text.replace("{instruction}", user_text(record))


FRAME_STOP = "\n\n# Query"
"""Where a base model's answer in the frame ends (the start of the next exchange)."""
