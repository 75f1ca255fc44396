"""Loading models by name: a local HF dir, a hub id already in the local cache, or a LoRA adapter dir.

Everything that reads a model (generation, token shift, probes) goes through :func:`load_model`, so an
adapter is always put on the base it was trained for, offline failures read as one clear line, and the
dtype is chosen in one place (fp32 on CPU by default, so teacher-forced argmax matches greedy tokens).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from itlens.errors import InputError
from itlens.templates import ensure_chat_template

DTYPES = ("float32", "bfloat16", "float16", "auto")
TUNE_META = "itlens_model.json"
"""Written by ``itlens tune`` into every tuned model dir: the base and its fingerprint."""


@dataclasses.dataclass
class LoadedModel:
    """A causal LM ready for inference, with the tokenizer and the names that go into records."""

    model: Any
    tokenizer: Any
    name: str
    """What response records call this model (``model`` field)."""
    path: str
    adapter: str | None = None


@contextlib.contextmanager
def quiet_progress():
    """Silence the datasets/transformers progress bars of loading, saving and data preparation."""
    import datasets
    from transformers.utils import logging as hf_logging

    was_on = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on[0]:
            datasets.enable_progress_bars()
        if was_on[1]:
            hf_logging.enable_progress_bar()


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r} (expected one of {list(DTYPES)})", key="dtype")
    return "auto" if name == "auto" else getattr(torch, name)


def resolve_model(name_or_path: str | Path) -> str:
    """A local dir as is; ``packaged:NAME`` (a model shipped in a PyPI package) from the itlens cache;
    a hub id only when it is already in the local HF cache (no downloads)."""
    if str(name_or_path).startswith("packaged:"):
        from itlens.packaged_models import resolve_packaged

        return str(resolve_packaged(str(name_or_path)))
    p = Path(name_or_path)
    if p.is_dir():
        if not (p / "config.json").is_file() and not is_adapter_dir(p):
            raise InputError("not a model directory (no config.json or adapter_config.json)", file=p)
        return str(p)
    name = str(name_or_path)
    if p.exists() or name.startswith((".", "/")) or name.count("/") > 1:
        raise InputError("model directory not found", file=name)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure here means "not available offline"
        raise InputError("model not found locally, and itlens does not download from the hub at run time "
                         "(put the model in a local directory or the HF cache first)", file=name) from None


def load_tokenizer(path: str | Path):
    """The tokenizer of a model or adapter dir, with a chat template and left padding for generation."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(path))
    ensure_chat_template(tok)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_fingerprint(model) -> str:
    """A short hash of a model's input embeddings (rounded to bf16, so it survives dtype changes).

    Two bases of the same shape but different weights get different fingerprints, which is how an
    adapter made for another base is caught.
    """
    import torch

    emb = model.get_input_embeddings().weight.detach().to("cpu", torch.bfloat16).contiguous()
    h = hashlib.sha256(emb.view(torch.int16).numpy().tobytes())
    h.update(json.dumps(list(emb.shape)).encode())
    return h.hexdigest()[:16]


def read_tune_meta(path: str | Path) -> dict:
    f = Path(path) / TUNE_META
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}


def load_model(name_or_path: str | Path, *, adapter: str | Path | None = None, dtype: str = "float32",
               merge: bool = False, device: str = "cpu", name: str | None = None) -> LoadedModel:
    """Load a causal LM for inference (eval mode).

    ``name_or_path`` may itself be an adapter dir: its base is read from ``adapter_config.json``.
    ``adapter`` puts a LoRA adapter on the base; ``merge`` folds it in (``merge_and_unload``).
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model(name_or_path)
    if adapter is None and is_adapter_dir(path):
        adapter, path = path, _adapter_base(path)
    with quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    tok_src = adapter if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file() else path
    tokenizer = load_tokenizer(tok_src)
    if adapter is not None:
        model = attach_adapter(model, adapter, merge=merge)
    model.to(device).eval()
    label = name or Path(str(adapter if adapter is not None else path)).name
    return LoadedModel(model=model, tokenizer=tokenizer, name=label, path=path,
                       adapter=str(adapter) if adapter is not None else None)


def _adapter_base(adapter: str | Path) -> str:
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise InputError("adapter does not name its base model; pass the base with --model and the adapter "
                         "with --adapter", file=Path(adapter) / "adapter_config.json", field="base_model_name_or_path")
    return resolve_model(base)


def attach_adapter(model, adapter: str | Path, *, merge: bool = False):
    """Put a LoRA adapter on ``model``; an adapter trained on another base is an InputError."""
    from peft import PeftModel

    adapter = Path(adapter)
    if not is_adapter_dir(adapter):
        raise InputError("not a LoRA adapter directory (no adapter_config.json)", file=adapter)
    want = read_tune_meta(adapter).get("base_fingerprint")
    if want and want != model_fingerprint(model):
        raise InputError("adapter was trained on another base model (base fingerprint "
                         f"{want} != {model_fingerprint(model)})", file=adapter)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"adapter does not fit this base model: {first[:200]}", file=adapter) from None
    return peft_model.merge_and_unload() if merge else peft_model
