"""One chat client for every judge call: an OpenAI-compatible endpoint or an in-process HF model.

Why not the openai client's own retries: its attempts and waits are not visible to us, so here its
retries are off and every request gets bounded attempts, exponential backoff, Retry-After honoured on
429 (capped), and a per-request timeout. Answers are cached on disk by a hash of what determines them
(messages, model, endpoint, decoding parameters), written atomically, so a rerun costs nothing and
replays exactly the same judge answers. The API key comes from an environment variable and is
redacted from every error message this module produces.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from itlens.errors import InputError
from itlens.io import atomic_write_json
from itlens.judge.config import JudgeConfig

log = logging.getLogger("itlens.judge")

CACHE_VERSION = 1


@dataclass
class Completion:
    """What one request ended with: the reply text, or why there is none after all attempts."""

    content: str | None
    error: str | None = None
    finish_reason: str | None = None
    attempts: int = 0
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.content is not None


class ChatClient:
    """``complete(messages) -> Completion``; ``complete_many`` runs requests concurrently, keeps order."""

    def __init__(self, cfg: JudgeConfig):
        cfg.validate()  # a config built in Python is checked too, before any request is paid for
        self.cfg = cfg
        self._openai = None
        self._local = None
        self._lock = threading.Lock()
        self._secret: str | None = None

    def __repr__(self) -> str:  # never shows the key
        return f"ChatClient(backend={self.cfg.backend!r}, model={self.cfg.model!r}, base_url={self.cfg.base_url!r})"

    # ------------------------------------------------------------------------------------ public
    def complete(self, messages: list[dict]) -> Completion:
        request = self._request(messages)
        key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
        cached = self._cache_get(key)
        if cached is not None:
            return Completion(content=cached["content"], finish_reason=cached.get("finish_reason"), cached=True)
        if self.cfg.backend == "local":
            done = self._complete_local(messages)
        else:
            done = self._complete_openai(messages)
        if done.ok:
            self._cache_put(key, request, done)
        return done

    def complete_many(self, batches: list[list[dict]]) -> list[Completion]:
        """Identical requests are sent once and share one answer: sent concurrently, they would each be
        paid for, get different answers, and race for the one cache entry that a rerun then replays."""
        if not batches:
            return []
        slot: dict[str, int] = {}
        unique: list[list[dict]] = []
        for messages in batches:
            key = json.dumps(messages, sort_keys=True)
            if key not in slot:
                slot[key] = len(unique)
                unique.append(messages)
        workers = 1 if self.cfg.backend == "local" else min(self.cfg.concurrency, len(unique))
        if workers == 1:
            done = [self.complete(m) for m in unique]
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="itlens-judge") as pool:
                done = list(pool.map(self.complete, unique))
        return [done[slot[json.dumps(m, sort_keys=True)]] for m in batches]

    def redact(self, text: str) -> str:
        """``text`` with the API key (if any) replaced, for messages that may echo request details."""
        if self._secret:
            text = text.replace(self._secret, "***")
        return text

    # ------------------------------------------------------------------------------------- cache
    def _request(self, messages: list[dict]) -> dict:
        cfg = self.cfg
        # float(): JudgeConfig(temperature=0) from Python must hit the answers cached by a YAML run (0.0)
        request = {"v": CACHE_VERSION, "backend": cfg.backend, "model": cfg.model, "messages": messages,
                   "temperature": float(cfg.temperature), "max_tokens": cfg.max_tokens, "params": cfg.params}
        if cfg.backend == "openai":
            request["base_url"] = cfg.base_url.rstrip("/")
        else:
            request["weights"] = _model_fingerprint(cfg.model)
        return request

    def _cache_path(self, key: str) -> Path:
        return Path(self.cfg.cache_dir).expanduser() / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> dict | None:
        if not self.cfg.cache:
            return None
        path = self._cache_path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("ignoring unreadable cache entry %s", path)
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            log.warning("ignoring unusable cache entry %s", path)
            return None
        return entry

    def _cache_put(self, key: str, request: dict, done: Completion) -> None:
        if self.cfg.cache:
            atomic_write_json(self._cache_path(key), {"request": request, "content": done.content,
                                                      "finish_reason": done.finish_reason})

    # ------------------------------------------------------------------------------------ openai
    def _openai_client(self):
        with self._lock:
            if self._openai is None:
                import openai

                env = self.cfg.api_key_env
                if env:
                    secret = os.environ.get(env)
                    if not secret:
                        # a name with lower-case letters may be a key pasted in its place: not echoed
                        named = env if re.fullmatch(r"[A-Z_][A-Z0-9_]*", env) else "named by api_key_env"
                        raise InputError(f"environment variable {named} is not set (it must hold the API key)",
                                         key="api_key_env")
                    self._secret = secret
                # Endpoints without auth (a local vLLM) still need a non-empty string for the client.
                self._openai = openai.OpenAI(api_key=self._secret or "none", base_url=self.cfg.base_url,
                                             max_retries=0, timeout=self.cfg.timeout_s)
            return self._openai

    def _complete_openai(self, messages: list[dict]) -> Completion:
        import openai

        client = self._openai_client()
        cfg = self.cfg
        error = "no attempt made"
        for attempt in range(1, cfg.max_attempts + 1):
            wait = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** (attempt - 1))
            try:
                resp = client.chat.completions.create(model=cfg.model, messages=messages,
                                                      temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                                                      timeout=cfg.timeout_s, **cfg.params)
                done = _chat_reply(resp, attempt)
                if isinstance(done, Completion):
                    return done
                error = done
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                if not cfg.api_key_env:  # no key was sent: "refused the key from $" would mislead
                    raise InputError(f"endpoint requires an API key (HTTP {e.status_code}); set api_key_env to "
                                     "the name of the environment variable that holds it", key="api_key_env") from None
                raise InputError(self.redact(f"endpoint refused the API key from ${cfg.api_key_env} "
                                             f"(HTTP {e.status_code})"), key="api_key_env") from None
            except openai.NotFoundError:  # no such model (or no such route) here: the same for every item
                raise InputError(self.redact(f"the endpoint has no model {cfg.model!r} (HTTP 404); check model "
                                             "and base_url (it usually ends in /v1)"), key="model") from None
            except openai.RateLimitError as e:
                error = "HTTP 429 rate limited"
                retry_after = _retry_after_s(e.response)
                if retry_after is not None:
                    wait = min(retry_after, cfg.max_retry_after_s)
            except (openai.InternalServerError, openai.APITimeoutError, openai.APIConnectionError) as e:
                error = _describe(e)
            except openai.APIStatusError as e:  # other 4xx: asking again will not help
                return Completion(content=None, error=self.redact(_describe(e)), attempts=attempt)
            except (openai.APIError, ValueError) as e:  # a reply that is not a chat completion
                error = f"unusable HTTP reply: {type(e).__name__}"
            if attempt < cfg.max_attempts:
                log.info("judge request failed (%s); attempt %d/%d, retrying in %.2fs",
                         self.redact(error), attempt, cfg.max_attempts, wait)
                time.sleep(wait)
        return Completion(content=None, error=self.redact(f"{error} (after {cfg.max_attempts} attempts)"),
                          attempts=cfg.max_attempts)

    # ------------------------------------------------------------------------------------- local
    def _complete_local(self, messages: list[dict]) -> Completion:
        with self._lock:
            if self._local is None:
                self._local = LocalChatModel(self.cfg.model)
            try:
                text, finish = self._local.generate(messages, max_new_tokens=self.cfg.max_tokens,
                                                    temperature=self.cfg.temperature)
            except (RuntimeError, ValueError) as e:  # e.g. a prompt longer than the model can take
                return Completion(content=None, error=f"local generation failed: {e}", attempts=1)
        return Completion(content=text, finish_reason=finish, attempts=1)


def _chat_reply(resp, attempt: int) -> "Completion | str":
    """The first choice of a chat completion, or what is wrong with the reply (the SDK does not validate it)."""
    choices = getattr(resp, "choices", None)
    if not choices:
        return "reply without choices"
    try:
        choice = choices[0]
        content, finish = choice.message.content, getattr(choice, "finish_reason", None)
    except (AttributeError, TypeError, IndexError, KeyError):
        return "unusable HTTP reply: not a chat completion"
    if content is not None and not isinstance(content, str):
        return f"unusable HTTP reply: message content is {type(content).__name__}, not text"
    return Completion(content=content or "", attempts=attempt, finish_reason=finish if isinstance(finish, str) else None)


class LocalChatModel:
    """An HF causal LM used as a chat model: the chat template, then greedy (or sampled) decoding."""

    def __init__(self, model: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from itlens.templates import ensure_chat_template

        from itlens.models import resolve_model

        try:
            model = resolve_model(model)  # a local dir or an offline hub id: no "cannot connect to the hub"
        except InputError as e:
            raise InputError(f"cannot load a local judge model: {e.message}", file=e.file, key="model") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        except OSError as e:
            raise InputError(f"cannot load a local judge model: {str(e).splitlines()[0]}", key="model") from None
        self.model.eval()
        ensure_chat_template(self.tokenizer)
        stops = {self.tokenizer.eos_token_id}
        end_id = self.tokenizer.convert_tokens_to_ids("<|end|>")
        if isinstance(end_id, int) and end_id != self.tokenizer.unk_token_id:
            stops.add(end_id)
        self.stop_ids = sorted(i for i in stops if i is not None)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.stop_ids[0]

    def generate(self, messages: list[dict], *, max_new_tokens: int, temperature: float) -> tuple[str, str]:
        import torch

        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids,
                                      pad_token_id=self.pad_id, **sampling)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        finish = "stop" if new and new[-1] in self.stop_ids else "length"
        return self.tokenizer.decode(new, skip_special_tokens=True), finish


# ---------------------------------------------------------------------------------------- helpers
def _describe(e: Exception) -> str:
    status = getattr(e, "status_code", None)
    return f"HTTP {status} {type(e).__name__}" if status else type(e).__name__


def _retry_after_s(response) -> float | None:
    """Seconds a 429 asks us to wait (``retry-after-ms``, ``retry-after`` as seconds or HTTP date)."""
    if response is None:
        return None
    headers = response.headers
    try:
        if headers.get("retry-after-ms"):
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if not value:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _model_fingerprint(model: str) -> str:
    """Local judges: a change of weights under the same path must not replay old cached answers."""
    path = Path(model)
    if not path.is_dir():
        return model
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return f"{path.resolve()}#{h.hexdigest()[:16]}"
