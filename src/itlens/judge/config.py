"""The judge's one config: endpoint, model, decoding, retries, cache and aggregation (Python, CLI, YAML)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from itlens.config import KEY_OMITS_DEFAULT
from itlens.errors import InputError

_SET_BY_THE_CLIENT = {"messages", "temperature", "max_tokens", "max_completion_tokens", "timeout", "stream", "n"}
"""Chat-completion arguments the judge sets itself (config fields, or what one parsed reply needs)."""

MAX_TOKENS_PARAMS = ("max_tokens", "max_completion_tokens")
"""The names an endpoint may want the reply's token limit under: OpenAI's reasoning models (o-series, gpt-5)
refuse max_tokens with HTTP 400 and want max_completion_tokens."""


PROMPT_PLACEHOLDERS = {"prompt_file": ("instruction", "response"),
                       "pairwise_prompt_file": ("instruction", "response_a", "response_b"),
                       "reask_prompt_file": ("problem",), "rewrite_prompt_file": ("instruction", "response")}
"""Each prompt field and the placeholders its file must contain."""


def _chat_completion_params() -> set[str]:
    """The keyword arguments of the openai client's ``chat.completions.create``."""
    import inspect

    from openai.resources.chat.completions import Completions

    return set(inspect.signature(Completions.create).parameters) - {"self"}

_CREDENTIAL_NAMES = ("authorization", "apikey", "secret", "password", "authtoken", "accesstoken")
_CREDENTIAL_EXACT = ("key", "token", "bearer", "auth")
"""Parts of (or whole) header and field names, in lower case without '-' and '_', that mark a credential."""


_QUERY_CREDENTIAL_EXACT = _CREDENTIAL_EXACT + ("sig", "signature", "code", "pass", "pwd", "passwd", "jwt", "sas")
_QUERY_CREDENTIAL_NAMES = _CREDENTIAL_NAMES + ("signature", "credential", "passwd")
"""The same for query parameters of base_url, plus the names signed URLs and gateways use (Azure SAS's sig,
Azure Functions' code, AWS's X-Amz-Signature); any name ending in "token" (access_token, id_token)."""


def _credential_query_name(name: str) -> bool:
    norm = re.sub(r"[-_.]", "", name.lower())
    return (norm in _QUERY_CREDENTIAL_EXACT or norm.endswith("token")
            or any(c in norm for c in _QUERY_CREDENTIAL_NAMES))


def base_url_query(base_url: str) -> dict[str, str]:
    """The query parameters of ``base_url`` (e.g. Azure's ``api-version``), which the client sends as its default
    query: left in the URL, the openai client would append the path after them (``/v1?x=1chat/completions``)."""
    return dict(parse_qsl(urlsplit(base_url.strip()).query, keep_blank_values=True))


_KEY_WHERE = ("the key goes in the environment variable named by api_key_env (and api_key_header names the "
              "header, when the endpoint wants it elsewhere than Authorization: Bearer)")


def _check_base_url(base_url: str) -> None:
    """No credential in base_url: it is written to summary.json, config.resolved.yaml and every cache entry.
    The messages never echo the URL (it holds the secret)."""
    try:
        url = urlsplit(base_url.strip())
        query = parse_qsl(url.query, keep_blank_values=True)
    except ValueError:
        raise InputError("expected an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000/v1 "
                         "(the value given is not shown)", key="base_url") from None
    written = "base_url is written to summary.json, config.resolved.yaml and the cache; "
    if "@" in url.netloc:
        raise InputError(f"may not carry credentials (user:password@ before the host): {written}{_KEY_WHERE}",
                         key="base_url")
    for name, _ in query:
        if _credential_query_name(name):
            raise InputError(f"may not carry a credential (the query parameter {name[:40]!r}): {written}{_KEY_WHERE}",
                             key="base_url")
    names = [name for name, _ in query]
    if len(set(names)) != len(names):
        raise InputError("a query parameter of base_url is given twice", key="base_url")
    if url.fragment or base_url.strip().endswith("#"):
        raise InputError("may not have a #fragment (it is never sent to the endpoint; the value is not shown)",
                         key="base_url")


DEFAULT_KEY_HEADER = "Authorization"
_CLIENT_HEADERS = {"accept", "accept-encoding", "content-type", "content-length", "content-encoding", "host",
                   "user-agent", "connection", "transfer-encoding", "te", "upgrade", "cookie", "idempotency-key",
                   "openai-organization", "openai-project", "proxy-authorization"}
"""Headers the client or HTTP itself sets (the key would clash with them), and Proxy-Authorization (which a proxy
consumes: the key would go to the proxy, not the endpoint)."""


def _check_key_header(name: str) -> None:
    """An HTTP header name in its common form (words of letters and digits joined by '-' or '_'). Never echoed:
    a value that fails is likely the key itself, pasted in place of the header's name."""
    if not (len(name) <= 64 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,23}(?:[-_][A-Za-z0-9]{1,24})*", name)):
        raise InputError("expected the NAME of an HTTP header, e.g. api-key (letters, digits, '-' and '_', in words "
                         "of at most 24 characters), not the key itself; the value given is not shown",
                         key="api_key_header")
    low = name.lower()
    if low in _CLIENT_HEADERS or low.startswith("x-stainless-"):
        raise InputError(f"{name!r} cannot carry the API key: the HTTP client sets it itself, or a proxy would "
                         f"consume it", key="api_key_header")


_CARRIERS = ("extra_headers", "extra_query", "extra_body")
"""The params whose entries are sent as headers, query fields or body fields of their own."""


def _credential_in(params: dict, prefix: str = "params") -> str | None:
    """The key path of a credential in ``params`` or in one of its headers, query or body fields (e.g.
    ``extra_headers.Authorization``): params are written to summary.json, config.resolved.yaml and every
    cache entry, so no key may travel there. Values deeper down (a JSON schema for guided decoding, whose
    properties may well be called "key" or "token") are not names of credentials and are not looked at."""
    for name, value in params.items():
        path = f"{prefix}.{name}"
        norm = re.sub(r"[-_]", "", str(name).lower())
        if norm in _CREDENTIAL_EXACT or any(c in norm for c in _CREDENTIAL_NAMES):
            return path
        if prefix == "params" and name in _CARRIERS and isinstance(value, dict):
            found = _credential_in(value, path)
            if found:
                return found
    return None


PAPER_JUDGE_MODEL = "gpt-4-1106-preview"


@dataclass
class JudgeConfig:
    """How responses are judged. The API key is never part of it: only the name of the variable."""

    backend: Literal["openai", "local"] = field(default="openai", metadata={
        "help": "'openai': any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, ...); "
                "'local': an HF causal LM loaded in this process (offline)."})
    model: str = field(default=PAPER_JUDGE_MODEL, metadata={
        "help": "Judge model: the endpoint's model name (openai) or an HF model dir / hub id (local). "
                "The paper used gpt-4-1106-preview."})
    base_url: str = field(default="https://api.openai.com/v1", metadata={
        "help": "Base URL of the OpenAI-compatible endpoint (openai backend), e.g. http://127.0.0.1:8000/v1. Query "
                "parameters (Azure's ?api-version=...) are sent with every request; no credentials (user:pass@, "
                "?key=, ?token=, ...): base_url is written to summary.json and the cache."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "Name of the environment variable holding the API key ('' for endpoints without a key). "
                "The key itself is never read from a file or written anywhere."})
    api_key_header: str = field(default=DEFAULT_KEY_HEADER, metadata={
        KEY_OMITS_DEFAULT: True,
        "help": "HTTP header that carries the key: 'Authorization' (any case) sends 'Authorization: Bearer <key>'; "
                "any other name (Azure OpenAI: api-key) sends the bare key in that header and no Authorization "
                "header at all. The value still comes only from the variable named by api_key_env."})
    temperature: float | None = field(default=0.0, metadata={
        "help": "Sampling temperature (the paper: 0). null: not sent, the endpoint's default (OpenAI's reasoning "
                "models, o-series and gpt-5, refuse any other value than their default)."})
    max_tokens: int = field(default=1024, metadata={"help": "Max tokens of each judge reply (just-eval: 1024)."})
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = field(default="max_tokens", metadata={
        KEY_OMITS_DEFAULT: True,
        "help": "The request parameter that carries max_tokens: 'max_tokens', or 'max_completion_tokens' for "
                "OpenAI's reasoning models (o-series, gpt-5), which refuse max_tokens; they count their hidden "
                "reasoning in it, so give them more than 1024."})
    params: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Extra chat-completion parameters sent as-is (e.g. {seed: 0, top_p: 1}); part of the cache key."})
    timeout_s: float = field(default=120.0, metadata={"help": "Timeout of one HTTP request, seconds."})
    max_attempts: int = field(default=6, metadata={
        "help": "Attempts per request (first try included) on 408, 409, 429, 5xx, timeouts, connection errors and "
                "replies that are not chat completions."})
    backoff_initial_s: float = field(default=1.0, metadata={
        "help": "First retry delay; doubles on each further attempt (exponential backoff)."})
    backoff_max_s: float = field(default=60.0, metadata={"help": "Upper bound of one backoff delay, seconds."})
    max_retry_after_s: float = field(default=120.0, metadata={
        "help": "Upper bound on a server's Retry-After (on 429, 503 or any retried reply) that is honoured, seconds."})
    concurrency: int = field(default=4, metadata={"help": "Requests in flight at once (openai backend)."})
    cache: bool = field(default=True, metadata={
        "help": "Cache every answer on disk by (messages, model, endpoint, parameters), so a rerun costs nothing."})
    cache_dir: str = field(default="~/.cache/itlens/judge", metadata={
        "help": "Folder of the answer cache (kept outside run folders, so killed runs reuse it)."})
    reask: bool = field(default=True, metadata={
        "help": "Ask once more, quoting the problem, when a reply does not validate; then count a parse failure."})
    prompt_file: str = field(default="judge_multi_aspect.txt", metadata={
        "help": "Multi-aspect prompt (prompts/ or a path); placeholders {instruction} and {response}."})
    pairwise_prompt_file: str = field(default="judge_pairwise.txt", metadata={
        "help": "Pairwise prompt; placeholders {instruction}, {response_a}, {response_b}."})
    reask_prompt_file: str = field(default="judge_reask.txt", metadata={
        "help": "Follow-up message sent after an unusable reply; placeholder {problem}."})
    rewrite_prompt_file: str = field(default="rewrite_simplify.txt", metadata={
        "help": "Rewriter prompt (LIMA-Simple style simplification); placeholders {instruction}, {response}."})
    task_types_field: str = field(default="task_types", metadata={
        "help": "Record field with just-eval task tags (a list or a string); items count toward each tag."})
    bootstrap_samples: int = field(default=2000, metadata={"help": "Bootstrap resamples for the 95% CIs."})
    confidence: float = field(default=0.95, metadata={"help": "Confidence level of the bootstrap intervals."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap (results are deterministic for a seed)."})
    paper_reference: list[str] = field(default_factory=list, metadata={
        "help": "Paper rows to overlay on the radar charts, as 'Model | Train set | Test set' "
                "(e.g. 'LLaMa-2 7B LFT | Alpaca 52K | just-eval-instruct 1k'); see itlens.judge.paper_rows()."})
    figures: bool = field(default=True, metadata={"help": "Write radar charts next to summary.json."})

    def validate(self) -> None:
        positive = {"max_tokens": self.max_tokens, "max_attempts": self.max_attempts,
                    "concurrency": self.concurrency, "bootstrap_samples": self.bootstrap_samples}
        for key, value in positive.items():
            if value < 1:
                raise InputError(f"expected an integer >= 1, got {value}", key=key)
        for key in ("timeout_s", "backoff_initial_s", "backoff_max_s", "max_retry_after_s"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0 or (key == "timeout_s" and value == 0):
                raise InputError(f"expected a finite number {'> 0' if key == 'timeout_s' else '>= 0'}, got {value}",
                                 key=key)
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"expected a finite number >= 0, or null (not sent), got {self.temperature}",
                             key="temperature")
        if self.max_tokens_param not in MAX_TOKENS_PARAMS:  # a config built in Python skips the YAML type check
            raise InputError(f"expected one of {list(MAX_TOKENS_PARAMS)}, got {self.max_tokens_param!r}",
                             key="max_tokens_param")
        if self.temperature is None and self.backend == "local":
            raise InputError("null (not sent) is for endpoints; the local backend needs a number (0: greedy)",
                             key="temperature")
        if not 0 < self.confidence < 1:
            raise InputError(f"expected a number in (0, 1), got {self.confidence}", key="confidence")
        if not self.model.strip():
            raise InputError("must not be empty", key="model")
        if self.api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            # most likely the key itself: never echo it (it would land in logs and config.resolved.yaml)
            raise InputError("expected the NAME of the environment variable that holds the API key (letters, "
                             "digits and '_'), not the key itself; the value given is not shown",
                             key="api_key_env")
        _check_key_header(self.api_key_header)
        _check_base_url(self.base_url)  # every backend: config.resolved.yaml carries it
        from itlens.judge.paper import paper_reference

        for label in self.paper_reference:
            paper_reference(label)  # unknown rows fail now, before any request is paid for
        if self.backend == "openai":
            url = urlsplit(self.base_url.strip())
            if url.scheme not in ("http", "https") or not url.hostname:
                # else every request fails as a connection error, retried, and each item is an api failure
                raise InputError("expected an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000/v1",
                                 key="base_url")
            if self.api_key_header.lower() != DEFAULT_KEY_HEADER.lower() and not self.api_key_env:
                raise InputError(f"names the header of the API key ({self.api_key_header}), but api_key_env is '' "
                                 "(no key); set api_key_env to the name of the variable that holds the key",
                                 key="api_key_header")
        for key in ("model", "api_key", "authorization"):
            if key in {k.lower() for k in self.params}:
                raise InputError(f"params may not set {key!r} (use the config field or the env var)",
                                 key=f"params.{key}")
        credential = _credential_in(self.params)
        if credential:
            raise InputError("params may not carry a credential: they are written to summary.json, "
                             "config.resolved.yaml and the cache; the key goes in the variable named by api_key_env",
                             key=credential)
        headers = self.params.get("extra_headers")
        if isinstance(headers, dict) and self.api_key_header.lower() in {str(h).lower() for h in headers}:
            # sent per request, it would replace the key (and a value there is written to summary.json)
            raise InputError(f"params.extra_headers may not set {self.api_key_header!r}: it is api_key_header, "
                             "filled from the variable named by api_key_env",
                             key=f"params.extra_headers.{self.api_key_header}")
        for key in self.params:
            if key in MAX_TOKENS_PARAMS:
                raise InputError(f"params may not set {key!r}: the token limit is max_tokens, and max_tokens_param "
                                 "names the parameter it is sent as", key=f"params.{key}")
            if key in _SET_BY_THE_CLIENT:
                raise InputError(f"params may not set {key!r}: it is a config field of its own or set by the client",
                                 key=f"params.{key}")
            if self.backend == "openai" and key not in _chat_completion_params():
                raise InputError("not a parameter of the chat-completions API; send endpoint-specific ones "
                                 "(vLLM's top_k, ...) as params.extra_body", key=f"params.{key}")
        from itlens.judge.scoring import load_prompt

        for key, placeholders in PROMPT_PLACEHOLDERS.items():
            try:  # a missing or wrong prompt fails now, not after the first requests are paid for
                load_prompt(getattr(self, key), *placeholders)
            except InputError as e:
                raise InputError(e.message, file=e.file, key=key) from None
