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
import warnings
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


def read_adapter_config(adapter: str | Path) -> dict:
    """An adapter dir's ``adapter_config.json``; a damaged one is an InputError naming it and its line."""
    cfg_file = Path(adapter) / "adapter_config.json"
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON: {e.msg} (column {e.colno})", file=cfg_file, line=e.lineno) from None
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text", file=cfg_file) from None
    if not isinstance(cfg, dict):
        raise InputError(f"expected a JSON object, got {type(cfg).__name__}", file=cfg_file)
    return cfg


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r} (expected one of {list(DTYPES)})", key="dtype")
    return "auto" if name == "auto" else getattr(torch, name)


def resolve_model(name_or_path: str | Path) -> str:
    """A local dir as an absolute path (so what records it, an adapter's ``base_model_name_or_path``
    among them, holds from any working folder); ``packaged:NAME`` (a model shipped in a PyPI package)
    from the itlens cache; a hub id (``org/name``, or ``org/name@REVISION`` for a branch, tag or
    commit) only when it is already in the local HF cache (``HF_HUB_CACHE``; no downloads)."""
    if str(name_or_path).startswith("packaged:"):
        from itlens.packaged_models import resolve_packaged

        return str(resolve_packaged(str(name_or_path)))
    if str(name_or_path).startswith("~"):  # a YAML config's `base: ~/models/x` (the shell expands it on a CLI)
        name_or_path = Path(name_or_path).expanduser()
    p = Path(name_or_path)
    if p.is_dir():
        if not (p / "config.json").is_file() and not is_adapter_dir(p):
            raise InputError("not a model directory (no config.json or adapter_config.json)", file=p)
        return str(p.resolve())
    name = str(name_or_path)
    if p.exists():
        raise InputError("is a file, expected a model directory", file=name)
    repo_id, _, revision = name.partition("@")  # a revision may hold slashes: a branch feature/x, refs/pr/1
    if name.startswith((".", "/")) or repo_id.count("/") > 1:
        raise InputError("model directory not found", file=name)
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision or None, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure here means "not available offline"
        at = f" --revision {revision}" if revision else ""
        raise InputError(f"no local model folder of that name, and no hub model {repo_id!r}"
                         f"{f' at revision {revision!r}' if revision else ''} in the local HF cache "
                         f"({constants.HF_HUB_CACHE}); itlens does not download models at run time: download "
                         f"it first (`hf download {repo_id}{at}`; a gated or private model needs a token: "
                         "`hf auth login`)", file=name) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _load_errors() -> tuple:
    """What transformers raises for a folder that is not a loadable model or tokenizer: a malformed or
    incomplete config.json (or one with a value of the wrong type), no weights, unreadable weights, no
    tokenizer files. Not RuntimeError: that is also out-of-memory, an internal error."""
    errors: tuple = (OSError, ValueError, KeyError)
    try:
        from safetensors import SafetensorError

        errors += (SafetensorError,)
    except ImportError:  # pragma: no cover
        pass
    try:
        from huggingface_hub.errors import StrictDataclassError

        errors += (StrictDataclassError,)
    except ImportError:  # pragma: no cover - older huggingface_hub
        pass
    return errors


def load_causal_lm(path: str | Path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` of a resolved model dir; a folder that is not a loadable
    model (damaged config.json, missing or truncated weights, an architecture that needs the model's own
    code, which itlens never runs) is an InputError naming it, not a traceback."""
    from transformers import AutoModelForCausalLM

    try:  # never a model's own Python code (auto_map): transformers would otherwise ask on stdin
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, **kwargs)
    except _load_errors() as e:
        raise InputError(f"cannot load the model: {_first_line(e)}", file=path) from None


def load_raw_tokenizer(path: str | Path):
    """``AutoTokenizer.from_pretrained`` of a resolved model dir, with the same error rule as :func:`load_causal_lm`."""
    from transformers import AutoTokenizer

    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not Path(path).is_dir():
        raise InputError("tokenizer folder not found", file=path)
    if not any((Path(path) / f).is_file() for f in files):
        raise InputError(f"no tokenizer in this folder (none of {', '.join(files)})", file=path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except _load_errors() as e:
        raise InputError(f"cannot load the tokenizer: {_first_line(e)}", file=path) from None


def load_tokenizer(path: str | Path):
    """The tokenizer of a model or adapter dir, with a chat template and left padding for generation."""
    tok = load_raw_tokenizer(resolve_model(path))
    ensure_chat_template(tok)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_fingerprint(model) -> str:
    """A short hash of a model's input embeddings (rounded to bf16 from their float32 values).

    Two bases of the same shape but different weights get different fingerprints, which is how an
    adapter made for another base is caught. ``itlens tune`` fingerprints the float32 base; a model
    loaded in float32 or bfloat16 gives the same hash (one rounding to bf16 either way). A model loaded
    in another dtype (float16) has lost the float32 values, so use :func:`base_fingerprint`, which reads
    the embeddings from the checkpoint instead.
    """
    return _fingerprint(model.get_input_embeddings().weight)


def _fingerprint(weight) -> str:
    import torch

    emb = weight.detach().to("cpu", torch.float32).to(torch.bfloat16).contiguous()
    h = hashlib.sha256(emb.view(torch.int16).numpy().tobytes())
    h.update(json.dumps(list(emb.shape)).encode())
    return h.hexdigest()[:16]


_EXACT_FINGERPRINT_DTYPES = ("float32", "bfloat16", "float64")


def base_fingerprint(model, base_path: str | Path | None = None) -> str | None:
    """The fingerprint ``itlens tune`` recorded for this base, whatever dtype ``model`` was loaded in.

    Weights in float32/bfloat16 (or float64) are hashed as they are. Otherwise (float16, quantised) the
    embedding tensor is read from the checkpoint at ``base_path`` (default: where the model was loaded
    from) and hashed from its stored values; None when that checkpoint cannot be read.
    """
    weight = model.get_input_embeddings().weight
    if str(weight.dtype).removeprefix("torch.") in _EXACT_FINGERPRINT_DTYPES:
        return _fingerprint(weight)
    stored = _checkpoint_embeddings(model, base_path or getattr(model, "name_or_path", None))
    return _fingerprint(stored) if stored is not None else None


def _checkpoint_embeddings(model, base_path):
    """The input-embedding tensor as stored in a safetensors checkpoint dir, or None."""
    if not base_path or not Path(base_path).is_dir():
        return None
    weight = model.get_input_embeddings().weight
    name = next((n for n, p in model.named_parameters(remove_duplicate=False) if p is weight), None)
    if name is None:
        return None
    from safetensors import safe_open

    base = Path(base_path)
    index = base / "model.safetensors.index.json"
    try:
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        elif (base / "model.safetensors").is_file():
            with safe_open(str(base / "model.safetensors"), framework="pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            return None
        parts = name.split(".")
        # the same tensor may be stored with fewer leading module names (base_model_prefix, wrappers)
        key = next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in weight_map), None)
        if key is None:
            return None
        with safe_open(str(base / weight_map[key]), framework="pt") as f:
            tensor = f.get_tensor(key)
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
    return tensor if tuple(tensor.shape) == tuple(weight.shape) else None


def read_tune_meta(path: str | Path) -> dict:
    f = Path(path) / TUNE_META
    if not f.is_file():
        return {}
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON: {e.msg} (column {e.colno})", file=f, line=e.lineno) from None
    return meta if isinstance(meta, dict) else {}


def relative_base(base: str | Path, model_dir: str | Path) -> str | None:
    """``base`` (a local model dir) relative to ``model_dir`` (a tuned model's folder), POSIX-style, as
    ``itlens tune`` records it (``base_relative``) so a folder moved together with its base still
    finds it; None when there is no such path (another drive)."""
    import os

    try:
        return Path(os.path.relpath(Path(base).resolve(), Path(model_dir).resolve())).as_posix()
    except ValueError:
        return None


def model_label(name_or_path: str | Path, path: str | Path) -> str:
    """What records call a model loaded from ``name_or_path`` (resolved to ``path``): the hub id as
    the user gave it for a hub model (``path`` is then a snapshot folder named by its hash), else the
    folder's name (a local dir, an adapter dir, a ``packaged:`` model)."""
    given = str(name_or_path)
    if not given.startswith("packaged:") and not Path(given).exists() and not Path(given).is_absolute():
        return given
    return Path(str(path)).name


def load_model(name_or_path: str | Path, *, adapter: str | Path | None = None, dtype: str = "float32",
               merge: bool = False, device: str = "cpu", name: str | None = None) -> LoadedModel:
    """Load a causal LM for inference (eval mode).

    ``name_or_path`` may itself be an adapter dir: its base is read from ``adapter_config.json``.
    ``adapter`` puts a LoRA adapter on the base; ``merge`` folds it in (``merge_and_unload``).
    """
    path = resolve_model(name_or_path)
    if adapter is None and is_adapter_dir(path):
        adapter, path = path, _adapter_base(path)
    with quiet_progress():
        model = load_causal_lm(path, dtype=torch_dtype(dtype))
    tok_src = adapter if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file() else path
    tokenizer = load_tokenizer(tok_src)
    if adapter is not None:
        model = attach_adapter(model, adapter, merge=merge, base_path=path)
    model.to(device).eval()
    label = name or (Path(str(adapter)).name if adapter is not None else model_label(name_or_path, path))
    return LoadedModel(model=model, tokenizer=tokenizer, name=label, path=path,
                       adapter=str(adapter) if adapter is not None else None)


def _adapter_base(adapter: str | Path) -> str:
    """The base an adapter dir names (``adapter_config.json``). When that path is gone (the study
    folder was moved, or an older itlens recorded a path relative to the folder it was run from), the
    base at the path ``itlens tune`` recorded relative to the adapter (``itlens_model.json``:
    ``base_relative``) is used; :func:`attach_adapter` then checks it by its fingerprint."""
    cfg_file = Path(adapter) / "adapter_config.json"
    cfg = read_adapter_config(adapter)
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise InputError("adapter does not name its base model; pass the base with --model and the adapter "
                         "with --adapter", file=cfg_file, field="base_model_name_or_path")
    if not Path(base).exists():
        rel = read_tune_meta(adapter).get("base_relative")
        if isinstance(rel, str) and rel and (Path(adapter) / rel).is_dir():
            return resolve_model(Path(adapter) / rel)
        if Path(base).is_absolute() or base.startswith(".") or base.count("/") > 1:  # a path, not a hub id
            raise InputError(f"the adapter's base model {base!r} is not found (moved?); pass the base with "
                             "--model and the adapter with --adapter", file=cfg_file, field="base_model_name_or_path")
    return resolve_model(base)


def attach_adapter(model, adapter: str | Path, *, merge: bool = False, base_path: str | Path | None = None):
    """Put a LoRA adapter on ``model``; an adapter trained on another base is an InputError.

    ``base_path``: the checkpoint ``model`` was loaded from (default: its ``name_or_path``); read only when
    the model is in a dtype that lost the float32 embeddings the fingerprint is made from.
    """
    from peft import PeftModel

    adapter = Path(adapter)
    if not is_adapter_dir(adapter):
        raise InputError("not a LoRA adapter directory (no adapter_config.json)", file=adapter)
    read_adapter_config(adapter)  # a damaged file is that, not "an adapter for another base"
    want = read_tune_meta(adapter).get("base_fingerprint")
    if want:
        have = base_fingerprint(model, base_path)
        if have is None:  # loaded in a lossy dtype from a checkpoint we cannot read: peft's shape check only
            warnings.warn(f"cannot check that {adapter} was trained on this base (its embeddings are "
                          f"{model.get_input_embeddings().weight.dtype} and the checkpoint is not a readable "
                          "safetensors dir); load it in float32 or bfloat16 to check", stacklevel=2)
        elif want != have:
            raise InputError(f"adapter was trained on another base model (base fingerprint {want} != {have})",
                             file=adapter)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"adapter does not fit this base model: {first[:200]}", file=adapter) from None
    return peft_model.merge_and_unload() if merge else peft_model
