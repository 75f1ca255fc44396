"""One chat client for every judge call: an OpenAI-compatible endpoint or an in-process HF model.

Why not the openai client's own retries: its attempts and waits are not visible to us, so here its
retries are off and every request gets bounded attempts, exponential backoff, Retry-After honoured on
429 (capped), and a per-request timeout. Answers are cached on disk by a hash of what determines them
(messages, model, endpoint, decoding parameters), written atomically, so a rerun costs nothing and
replays exactly the same judge answers. An empty (or whitespace-only) reply is never cached: it fails this
run and is asked again on the next. An error that ends the whole run (a refused key, no such model, HTTP 402
out of credits) stops the other requests of a batch too: none not yet sent is sent, and none waits out its
retries. The API key comes from an environment variable and is redacted from every error message this
module produces. It is sent as ``Authorization: Bearer``, or bare in the header named by ``api_key_header``
(Azure OpenAI: ``api-key``) with no Authorization header at all.
Headers the openai client takes from the environment (``OPENAI_ORG_ID``, ``OPENAI_PROJECT_ID``,
``OPENAI_CUSTOM_HEADERS``) reach OpenAI's own API only, and never replace the configured key.
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
from urllib.parse import urlsplit, urlunsplit

from itlens.errors import InputError
from itlens.io import atomic_write_json
from itlens.judge.config import DEFAULT_KEY_HEADER, MAX_TOKENS_PARAMS, JudgeConfig, base_url_query

log = logging.getLogger("itlens.judge")

CACHE_VERSION = 1

LOCAL_STOPS = "any special token"
"""What ends a local judge's answer, part of its requests' cache key: answers cached when only EOS and
``<|end|>`` ended one (it ran on past ``<|user|>``, and ended as "length") are not replayed as this rule's."""
LOCAL_DECODING = "plain"
"""A local judge decodes without its generation_config.json's logits processors (generate.plain_decoding):
in its answers' cache key, so answers cached before (with a model's repetition_penalty) are not replayed."""


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
        self._environment_headers: dict = {}  # name -> the client's omission marker (see _openai_client)

    def __repr__(self) -> str:  # never shows the key
        return f"ChatClient(backend={self.cfg.backend!r}, model={self.cfg.model!r}, base_url={self.cfg.base_url!r})"

    # ------------------------------------------------------------------------------------ public
    def complete(self, messages: list[dict], *, _stop: threading.Event | None = None) -> Completion:
        request = self._request(messages)
        key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
        cached = self._cache_get(key)
        if cached is not None:
            return Completion(content=cached["content"], finish_reason=cached.get("finish_reason"), cached=True)
        if self.cfg.backend == "local":
            done = self._complete_local(messages)
        else:
            done = self._complete_openai(messages, _stop)
        # an empty reply (cut at max_tokens before any text, withheld by a content filter) is a failure of this
        # request, not the judge's answer: cached, every rerun replayed it instead of asking again
        if done.ok and done.content.strip():
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
            done = self._complete_concurrently(unique, workers)
        return [done[slot[json.dumps(m, sort_keys=True)]] for m in batches]

    def _complete_concurrently(self, unique: list[list[dict]], workers: int) -> list[Completion]:
        """``complete`` on a thread pool. An error that ends the run (InputError: a refused key, no such model, out
        of credits) stops the rest: requests not yet sent are not sent, and those waiting to retry give up (was:
        every queued item was still sent, each refused the same way, before the error surfaced)."""
        stop = threading.Event()

        def one(messages: list[dict]) -> Completion | None:
            if stop.is_set():
                return None
            try:
                return self.complete(messages, _stop=stop)
            except BaseException:
                stop.set()
                raise

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="itlens-judge") as pool:
            futures = [pool.submit(one, m) for m in unique]
            try:
                done = [f.result() for f in futures]
            except BaseException:
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return done

    def redact(self, text: str) -> str:
        """``text`` with the API key (if any) replaced, for messages that may echo request details."""
        if self._secret:
            text = text.replace(self._secret, "***")
        return text

    # ------------------------------------------------------------------------------------- cache
    def _request(self, messages: list[dict]) -> dict:
        cfg = self.cfg
        # float(): JudgeConfig(temperature=0) from Python must hit the answers cached by a YAML run (0.0)
        temperature = None if cfg.temperature is None else float(cfg.temperature)
        request = {"v": CACHE_VERSION, "backend": cfg.backend, "model": cfg.model, "messages": messages,
                   "temperature": temperature, "max_tokens": cfg.max_tokens, "params": cfg.params}
        if cfg.max_tokens_param != "max_tokens":  # only then: the answers cached before it existed stay valid
            request["max_tokens_param"] = cfg.max_tokens_param
        if cfg.backend == "openai":
            request["base_url"] = cfg.base_url.rstrip("/")
        else:
            request["weights"], request["stops"] = _model_fingerprint(cfg.model), LOCAL_STOPS
            request["decoding"] = LOCAL_DECODING
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
        if not entry["content"].strip():  # an empty reply, cached by an older version: asked again
            log.info("not replaying the empty reply cached in %s", path)
            return None
        return entry

    def _cache_put(self, key: str, request: dict, done: Completion) -> None:
        if self.cfg.cache:
            atomic_write_json(self._cache_path(key), {"request": request, "content": done.content,
                                                      "finish_reason": done.finish_reason})

    # ------------------------------------------------------------------------------------ openai
    @property
    def _bare_key_header(self) -> str | None:
        """The header carrying the bare key, or None for the usual ``Authorization: Bearer``."""
        header = self.cfg.api_key_header
        return None if header.lower() == DEFAULT_KEY_HEADER.lower() or not self.cfg.api_key_env else header

    def _read_key(self) -> str | None:
        env = self.cfg.api_key_env
        if not env:
            return None
        # a name with lower-case letters may be a key pasted in its place: not echoed
        named = env if re.fullmatch(r"[A-Z_][A-Z0-9_]*", env) else "named by api_key_env"
        # surrounding whitespace is never part of a key: a trailing newline (a secret file, a CRLF .env) made
        # every request a connection error, retried, and every item an api failure
        secret = (os.environ.get(env) or "").strip()
        if not secret:
            raise InputError(f"environment variable {named} is not set (it must hold the API key)", key="api_key_env")
        if any(not 0x20 <= ord(c) < 0x7F for c in secret):
            raise InputError(f"the value of environment variable {named} cannot be sent in an HTTP header (it holds "
                             "a control or non-ASCII character); the value is not shown", key="api_key_env")
        if len(secret) >= 8:
            from itlens.config import to_dict

            for name, value in to_dict(self.cfg).items():  # the config is written to summary.json and the cache
                if secret in json.dumps(value, default=str):
                    raise InputError(f"holds the API key from ${named}: the config is written to summary.json, "
                                     "config.resolved.yaml and the cache; the key goes only in that variable",
                                     key=name)
        return secret

    def _openai_client(self):
        with self._lock:
            if self._openai is None:
                import openai

                self._secret = self._read_key()
                url = urlsplit(self.cfg.base_url.strip())
                base_url = urlunsplit(url._replace(query="", fragment=""))
                kwargs, bearer = {}, self._secret
                if self._bare_key_header:
                    # the key rides in a client-level header (never in per-request options, which the SDK logs at
                    # debug level), and the client's own api_key is a placeholder that each request omits (see
                    # _complete_openai). httpx drops only Authorization on a redirect to another host, so
                    # redirects are not followed: the key would go along to wherever the endpoint points.
                    kwargs["default_headers"] = {self._bare_key_header: self._secret}
                    kwargs["http_client"] = openai.DefaultHttpxClient(follow_redirects=False, timeout=self.cfg.timeout_s)
                    bearer = None
                else:  # given here, it wins over an Authorization in $OPENAI_CUSTOM_HEADERS (openai 3.x)
                    # Endpoints without auth (a local vLLM) still need a non-empty string for the client.
                    kwargs["default_headers"] = {DEFAULT_KEY_HEADER: f"Bearer {bearer or 'none'}"}
                self._openai = openai.OpenAI(api_key=bearer or "none", base_url=base_url,
                                             default_query=base_url_query(self.cfg.base_url) or None,
                                             max_retries=0, timeout=self.cfg.timeout_s, **kwargs)
                if not _openai_host(self.cfg.base_url):
                    self._environment_headers = {name: _omit() for name in _headers_from_environment(
                        self._openai.default_headers, own={DEFAULT_KEY_HEADER, self.cfg.api_key_header})}
            return self._openai

    def _complete_openai(self, messages: list[dict], stop: threading.Event | None = None) -> Completion:
        import openai

        client = self._openai_client()
        cfg = self.cfg
        params = {cfg.max_tokens_param: cfg.max_tokens, **cfg.params}
        if cfg.temperature is not None:  # null: not sent (reasoning models refuse any but their default)
            params["temperature"] = cfg.temperature
        headers = {**self._environment_headers, **(cfg.params.get("extra_headers") or {})}
        if self._bare_key_header:  # the key is in its own header: no "Authorization: Bearer none" beside it
            headers[DEFAULT_KEY_HEADER] = _omit()
        if headers:
            params["extra_headers"] = headers
        error = "no attempt made"
        for attempt in range(1, cfg.max_attempts + 1):
            if stop is not None and stop.is_set():  # another request ended the run: its error is the one raised
                return Completion(content=None, error="not asked: the run stopped", attempts=attempt - 1)
            wait = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** (attempt - 1))
            try:
                resp = client.chat.completions.create(model=cfg.model, messages=messages, timeout=cfg.timeout_s,
                                                      **params)
                done = _chat_reply(resp, attempt)
                if isinstance(done, Completion):
                    return done
                error = self.redact(done)
            except openai.AuthenticationError as e:
                raise self._key_refused(e) from None
            except openai.PermissionDeniedError as e:
                if not _flagged(e):
                    raise self._key_refused(e) from None
                # OpenRouter: "your input was flagged" by moderation is about this item, not the key
                return Completion(content=None, error=self.redact(_describe(e)), attempts=attempt)
            except openai.NotFoundError:  # no such model (or no such route) here: the same for every item
                raise InputError(self.redact(f"the endpoint has no model {cfg.model!r} (HTTP 404); check model "
                                             "and base_url (it usually ends in /v1)"), key="model") from None
            except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                    openai.APIConnectionError, openai.ConflictError) as e:
                error = "HTTP 429 rate limited" if isinstance(e, openai.RateLimitError) else self.redact(_describe(e))
                retry_after = _retry_after_s(getattr(e, "response", None))
                if retry_after is not None:
                    wait = min(retry_after, cfg.max_retry_after_s)
            except openai.APIStatusError as e:
                if e.status_code == 402:  # out of credits (OpenRouter): the same for every item still to come
                    raise self._payment_required(e) from None
                if e.status_code == 408:  # request timeout (OpenRouter): like a timeout of ours, worth another try
                    error = self.redact(_describe(e))
                    retry_after = _retry_after_s(e.response)
                    if retry_after is not None:
                        wait = min(retry_after, cfg.max_retry_after_s)
                elif 300 <= e.status_code < 400:  # redirects are not followed with api_key_header (see above)
                    why = f" (the key in {self._bare_key_header} is never sent to a redirect)" \
                        if self._bare_key_header else ""
                    raise InputError(f"the endpoint answers with a redirect (HTTP {e.status_code}"
                                     f"{_location(e.response)}); set base_url to the address it points to{why}",
                                     key="base_url") from None
                else:  # other 4xx: asking again will not help
                    return Completion(content=None, error=self.redact(_describe(e) + self._fix_for(e)),
                                      attempts=attempt)
            except (openai.APIError, ValueError) as e:  # a reply that is not a chat completion
                error = f"unusable HTTP reply: {type(e).__name__}"
            if attempt < cfg.max_attempts:
                log.info("judge request failed (%s); attempt %d/%d, retrying in %.2fs",
                         self.redact(error), attempt, cfg.max_attempts, wait)
                if stop is not None:
                    stop.wait(wait)  # cut short when another request ends the run
                else:
                    time.sleep(wait)
        return Completion(content=None, error=self.redact(f"{error} (after {cfg.max_attempts} attempts)"),
                          attempts=cfg.max_attempts)

    def _fix_for(self, e) -> str:
        """The config field that fixes a refused parameter (``Unsupported parameter: 'max_tokens'``, ``Unsupported
        value: 'temperature' does not support 0.0``: OpenAI's reasoning models), or ''."""
        cfg, rejected = self.cfg, _rejected_param(e)
        if rejected == cfg.max_tokens_param:
            fix = f"set max_tokens_param: {next(p for p in MAX_TOKENS_PARAMS if p != rejected)} in the judge config"
        elif rejected == "temperature" and cfg.temperature is not None:
            fix = "set temperature: null in the judge config (then it is not sent)"
        else:
            return ""
        if rejected in ("max_tokens", "temperature"):
            fix += (" (OpenAI's reasoning models, o-series and gpt-5, want max_tokens_param: max_completion_tokens "
                    "and temperature: null)")
        return f"; {fix}"

    def _key_refused(self, e) -> InputError:
        """HTTP 401/403 is the same for every item: one input error naming the variable and the header, never the
        key (nor the server's message on 401, which often quotes part of the key)."""
        cfg = self.cfg
        if not cfg.api_key_env:  # no key was sent: "refused the API key from $" would mislead
            return InputError(f"endpoint requires an API key (HTTP {e.status_code}); set api_key_env to the name of "
                              "the environment variable that holds it (and api_key_header, if the endpoint wants "
                              "it in a header other than Authorization: Bearer, such as Azure's api-key)",
                              key="api_key_env")
        if self._bare_key_header:
            sent = f"sent in the {self._bare_key_header} header"
        else:
            sent = ("sent as Authorization: Bearer; an endpoint that wants it in another header, such as Azure "
                    "OpenAI's api-key, needs api_key_header")
        why = f": {_server_message(e)}" if e.status_code == 403 and _server_message(e) else ""
        return InputError(self.redact(f"endpoint refused the API key from ${cfg.api_key_env} (HTTP {e.status_code}, "
                                      f"{sent}){why}"), key="api_key_env")

    def _payment_required(self, e) -> InputError:
        """HTTP 402 (OpenRouter: out of credits, or a key's credit limit reached) refuses every item still to come:
        one input error naming the endpoint (no query: it may carry more than a version) and the server's reason,
        never the key. The answers obtained before it are cached, so a rerun after topping up resumes."""
        why = _server_message(e)
        resume = "; answers obtained so far are cached, so a rerun resumes" if self.cfg.cache else ""
        return InputError(self.redact(f"the endpoint {_endpoint(self.cfg.base_url)} refused the request: payment "
                                      f"required (HTTP 402){f': {why}' if why else ''}; add credits (or raise the "
                                      f"key's credit limit) and run again{resume}"))

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
        # OpenRouter reports a failure of the upstream model as HTTP 200 with an "error" object
        why = _message_of(getattr(resp, "error", None))
        return f"reply without choices: {why}" if why else "reply without choices"
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

        from itlens.models import load_causal_lm, load_raw_tokenizer, resolve_model
        from itlens.templates import ensure_chat_template
        from itlens.tokenizer import answer_stop_ids

        try:  # a local dir or an offline hub id (no "cannot connect to the hub"), never the model's own code
            model = resolve_model(model)
            self.tokenizer = load_raw_tokenizer(model)
            self.model = load_causal_lm(model, dtype=torch.float32)
        except InputError as e:
            raise InputError(f"cannot load a local judge model: {e.message}", file=e.file, key="model") from None
        self.model.eval()
        ensure_chat_template(self.tokenizer)
        # an answer ends at any special token, as generation's do (was eos and <|end|> only: a judge writing
        # <|user|> went on past it)
        self.stop_ids = answer_stop_ids(self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.stop_ids[0]

    def generate(self, messages: list[dict], *, max_new_tokens: int, temperature: float) -> tuple[str, str]:
        import torch

        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        from itlens.generate import plain_decoding

        # as generation decodes: greedy is the argmax, sampling the full distribution at this temperature,
        # whatever the judge model's generation_config.json sets (Qwen2.5-Instruct: repetition_penalty, top_k)
        sampling = plain_decoding(temperature)
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids,
                                      pad_token_id=self.pad_id, **sampling)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        finish = "stop" if new and new[-1] in self.stop_ids else "length"
        return self.tokenizer.decode(new, skip_special_tokens=True), finish


# ---------------------------------------------------------------------------------------- helpers
def _omit():
    """The openai client's marker that drops a header it would send (its Bearer Authorization). Per request, not
    per client: openai 3.x refuses a client-level omission of Authorization ("Could not resolve authentication
    method"); openai 1.50 has the class only in openai._types."""
    try:
        from openai import Omit
    except ImportError:
        from openai._types import Omit
    return Omit()


def _message_of(body) -> str:
    """The server's own words in an error body (OpenAI, vLLM, Ollama, OpenRouter shapes), one line, short."""
    if isinstance(body, dict):
        body = body.get("message") or body.get("error") or body.get("detail") or ""
        if isinstance(body, dict):
            body = body.get("message") or ""
    if not isinstance(body, str):
        return ""
    line = " ".join(body.split())
    return line if len(line) <= 200 else line[:199] + "…"


def _server_message(e: Exception) -> str:
    return _message_of(getattr(e, "body", None))


def _describe(e: Exception) -> str:
    """``HTTP 400 BadRequestError: <the server's message>``: why a request failed, not just its status (was: a run
    of identical "HTTP 400 BadRequestError" api failures with the reason nowhere)."""
    status = getattr(e, "status_code", None)
    text = f"HTTP {status} {type(e).__name__}" if status else type(e).__name__
    why = _server_message(e) if status else ""
    return f"{text}: {why}" if why else text


def _rejected_param(e: Exception) -> str | None:
    """The request parameter a 4xx says is unsupported: the error's ``param`` (OpenAI, Azure), else a parameter the
    judge sends that the message names. A limit exceeded ("max_tokens is too large ... supports at most") is not."""
    message = _server_message(e)
    if not re.search(r"unsupported|not supported|does not support", message, re.IGNORECASE):
        return None
    body = getattr(e, "body", None)
    param = body.get("param") if isinstance(body, dict) else None
    if isinstance(param, str) and param:
        return param
    return next((p for p in (*MAX_TOKENS_PARAMS, "temperature") if re.search(rf"\b{p}\b", message)), None)


def _openai_host(base_url: str) -> bool:
    """OpenAI's own API (api.openai.com and its regional hosts such as eu.api.openai.com), over https: the endpoint
    that the openai client's OPENAI_ORG_ID, OPENAI_PROJECT_ID and OPENAI_CUSTOM_HEADERS are meant for."""
    url = urlsplit(base_url.strip())
    host = url.hostname or ""
    return url.scheme == "https" and (host == "api.openai.com" or host.endswith(".api.openai.com"))


def _headers_from_environment(default_headers: dict, own: set[str]) -> list[str]:
    """Names of the client's default headers that this config did not ask for: what the openai client read from
    the environment (OpenAI-Organization, OpenAI-Project, $OPENAI_CUSTOM_HEADERS). The client's own (Accept,
    Content-Type, User-Agent, X-Stainless-*) and the key's header stay."""
    keep = {"accept", "content-type", "user-agent"} | {h.lower() for h in own}
    omitted = type(_omit())
    return [name for name, value in default_headers.items() if not isinstance(value, omitted)
            and name.lower() not in keep and not name.lower().startswith("x-stainless-")]


def _flagged(e: Exception) -> bool:
    """A 403 that is a moderation verdict on this input (OpenRouter's "your input was flagged"), not the key."""
    body = getattr(e, "body", None)
    meta = body.get("metadata") if isinstance(body, dict) else None
    return (isinstance(meta, dict) and ("flagged_input" in meta or "reasons" in meta)) or \
        "flagged" in _server_message(e).lower()


def _endpoint(base_url: str) -> str:
    """``scheme://host[:port]/path`` of ``base_url``, for messages: no user info, query or fragment."""
    try:
        url = urlsplit(base_url.strip())
        port = url.port
    except ValueError:
        return "(base_url)"
    return f"{url.scheme}://{url.hostname or ''}{f':{port}' if port else ''}{url.path.rstrip('/')}"


def _location(response) -> str:
    """`` to https://host/path`` from a redirect's Location (no query, no user info: either may hold a secret)."""
    try:
        loc = urlsplit(response.headers.get("location") or "")
        host, port = loc.hostname, loc.port
    except (AttributeError, ValueError):
        return ""
    if not host:
        return ""
    return f" to {loc.scheme}://{host}{f':{port}' if port else ''}{loc.path}"


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
