"""The judge's one config: endpoint, model, decoding, retries, cache and aggregation (Python, CLI, YAML)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from itlens.errors import InputError

_SET_BY_THE_CLIENT = {"messages", "temperature", "max_tokens", "timeout", "stream", "n"}
"""Chat-completion arguments the judge sets itself (config fields, or what one parsed reply needs)."""


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
        "help": "Base URL of the OpenAI-compatible endpoint (openai backend), e.g. http://127.0.0.1:8000/v1."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "Name of the environment variable holding the API key ('' for endpoints without a key). "
                "The key itself is never read from a file or written anywhere."})
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature (the paper: 0)."})
    max_tokens: int = field(default=1024, metadata={"help": "Max tokens of each judge reply (just-eval: 1024)."})
    params: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Extra chat-completion parameters sent as-is (e.g. {seed: 0, top_p: 1}); part of the cache key."})
    timeout_s: float = field(default=120.0, metadata={"help": "Timeout of one HTTP request, seconds."})
    max_attempts: int = field(default=6, metadata={
        "help": "Attempts per request (first try included) on 429, 5xx, timeouts and connection errors."})
    backoff_initial_s: float = field(default=1.0, metadata={
        "help": "First retry delay; doubles on each further attempt (exponential backoff)."})
    backoff_max_s: float = field(default=60.0, metadata={"help": "Upper bound of one backoff delay, seconds."})
    max_retry_after_s: float = field(default=120.0, metadata={
        "help": "Upper bound on a server's Retry-After (429) that is honoured, seconds."})
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
        for key in ("timeout_s", "backoff_initial_s", "backoff_max_s", "max_retry_after_s", "temperature"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0 or (key == "timeout_s" and value == 0):
                raise InputError(f"expected a finite number {'> 0' if key == 'timeout_s' else '>= 0'}, got {value}",
                                 key=key)
        if not 0 < self.confidence < 1:
            raise InputError(f"expected a number in (0, 1), got {self.confidence}", key="confidence")
        if not self.model.strip():
            raise InputError("must not be empty", key="model")
        if self.api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            # most likely the key itself: never echo it (it would land in logs and config.resolved.yaml)
            raise InputError("expected the NAME of the environment variable that holds the API key (letters, "
                             "digits and '_'), not the key itself; the value given is not shown",
                             key="api_key_env")
        from itlens.judge.paper import paper_reference

        for label in self.paper_reference:
            paper_reference(label)  # unknown rows fail now, before any request is paid for
        if self.backend == "openai":
            url = urlsplit(self.base_url.strip())
            if url.scheme not in ("http", "https") or not url.hostname:
                # else every request fails as a connection error, retried, and each item is an api failure
                raise InputError("expected an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000/v1",
                                 key="base_url")
        for key in ("model", "api_key", "authorization"):
            if key in {k.lower() for k in self.params}:
                raise InputError(f"params may not set {key!r} (use the config field or the env var)",
                                 key=f"params.{key}")
        credential = _credential_in(self.params)
        if credential:
            raise InputError("params may not carry a credential: they are written to summary.json, "
                             "config.resolved.yaml and the cache; the key goes in the variable named by api_key_env",
                             key=credential)
        for key in self.params:
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
