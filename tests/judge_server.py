"""A small OpenAI-compatible chat-completions server on 127.0.0.1 that misbehaves on request.

Tests start it in a thread and tell it, per item, what to do: answer 429 with Retry-After, 500, hang
past the client's timeout, return truncated or non-JSON content, out-of-range or non-numeric scores,
or a body that is not a chat completion at all. Items are picked out by a marker ``<<name>>`` in the
prompt; each further request for the same marker takes the next reply of its script (the last one
repeats), so "429 then OK" or "bad JSON, then bad JSON again after the re-ask" are easy to state.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

ASPECTS = ("helpfulness", "clarity", "factuality", "depth", "engagement")


@dataclass
class Reply:
    """One scripted answer: a chat completion with ``content``, an HTTP error, a hang, or a raw body (sent with
    ``status``)."""

    content: str = ""
    status: int = 200
    headers: dict = field(default_factory=dict)
    hang_s: float = 0.0
    raw_body: bytes | None = None
    finish_reason: str = "stop"


def scores_json(scores: dict | None = None, **overrides) -> str:
    """A valid multi-aspect reply (default score 4); ``overrides`` set single aspects (any JSON value)."""
    values = {a: 4 for a in ASPECTS}
    values.update(scores or {})
    values.update(overrides)
    return json.dumps({a: {"reason": f"{a} is fine", "score": values[a]} for a in ASPECTS})


def default_judge(body: dict) -> Reply:
    """Valid answers: multi-aspect scores from a ``<<score:N>>`` marker (else 4); pairwise: the longer answer;
    rewrite: the first sentence of the answer."""
    prompt = body["messages"][0]["content"]
    if "[Answer A]" in prompt:
        a = prompt.split("[Answer A]\n", 1)[1].split("\n\n[Answer B]", 1)[0]
        b = prompt.split("[Answer B]\n", 1)[1].split("\n\nReply with", 1)[0]
        winner = "tie" if len(a) == len(b) else ("A" if len(a) > len(b) else "B")
        return Reply(json.dumps({"reason": "longer is better", "winner": winner}))
    if "You edit answers" in prompt:
        answer = prompt.split("[Answer]\n", 1)[1].split("\n\nReply with", 1)[0]
        return Reply(answer.split(".")[0].strip() + ".")
    m = re.search(r"<<score:(\d)>>", prompt)
    n = int(m.group(1)) if m else 4
    return Reply(scores_json({a: n for a in ASPECTS}))


class ScriptedJudge:
    """Replies by marker script; everything else goes to ``default``."""

    def __init__(self, scripts: dict[str, list[Reply]] | None = None,
                 default: Callable[[dict], Reply] = default_judge):
        self.scripts = scripts or {}
        self.default = default
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, body: dict) -> Reply:
        prompt = body["messages"][0]["content"]
        for name, script in self.scripts.items():
            if f"<<{name}>>" in prompt:
                with self._lock:
                    k = self.counts.get(name, 0)
                    self.counts[name] = k + 1
                return script[min(k, len(script) - 1)]
        return self.default(body)


def reasoning_model_refusal(body: dict) -> dict | None:
    """The HTTP 400 error OpenAI's reasoning models (o-series, gpt-5) answer a request with ``max_tokens``, or with a
    ``temperature`` other than their default 1; None for a request they take."""
    if "max_tokens" in body:
        return {"message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                           "'max_completion_tokens' instead.", "type": "invalid_request_error",
                "param": "max_tokens", "code": "unsupported_parameter"}
    if body.get("temperature", 1) != 1:
        return {"message": f"Unsupported value: 'temperature' does not support {body['temperature']} with this "
                           "model. Only the default (1) value is supported.", "type": "invalid_request_error",
                "param": "temperature", "code": "unsupported_value"}
    return None


class JudgeServer:
    """``with JudgeServer(responder, api_key=...) as srv: srv.base_url`` -> ``http://127.0.0.1:PORT/v1``.

    With ``api_key`` the server wants ``Authorization: Bearer <key>``, or with ``api_key_header`` (Azure's
    ``api-key``) the bare key in that header, and answers 401 otherwise. With ``reasoning`` it refuses what
    OpenAI's reasoning models refuse (see ``reasoning_model_refusal``)."""

    def __init__(self, responder: Callable[[dict], Reply] | None = None, *, api_key: str | None = None,
                 api_key_header: str | None = None, reasoning: bool = False):
        self.responder = responder or ScriptedJudge()
        self.api_key = api_key
        self.api_key_header = api_key_header
        self.reasoning = reasoning
        self.requests: list[dict] = []  # {time, path, authorization, headers: [(name, value)], body}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.requests.append({"time": time.monotonic(), "path": self.path, "body": body,
                                            "authorization": self.headers.get("Authorization"),
                                            "headers": list(self.headers.items())})
                if server.api_key is not None:
                    if server.api_key_header:
                        ok = self.headers.get_all(server.api_key_header) == [server.api_key]
                    else:
                        ok = self.headers.get("Authorization") == f"Bearer {server.api_key}"
                    if not ok:  # like OpenAI's, the message quotes part of the key it got
                        got = self.headers.get(server.api_key_header or "Authorization") or ""
                        return self._send(401, {"error": {"message": f"Incorrect API key provided: {got[:12]}***",
                                                          "type": "auth"}})
                if not urlsplit(self.path).path.endswith("/chat/completions"):  # the query (api-version) aside
                    return self._send(404, {"error": {"message": "not found"}})
                refusal = reasoning_model_refusal(body) if server.reasoning else None
                if refusal:
                    return self._send(400, {"error": refusal})
                reply = server.responder(body)
                if reply.hang_s:
                    server._stop.wait(reply.hang_s)
                if reply.raw_body is not None:  # with its status: an error body of a given shape
                    return self._send(reply.status, reply.raw_body, reply.headers)
                if reply.status != 200:
                    return self._send(reply.status, {"error": {"message": f"scripted {reply.status}",
                                                               "type": "scripted"}}, reply.headers)
                return self._send(200, {
                    "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body.get("model"),
                    "choices": [{"index": 0, "finish_reason": reply.finish_reason,
                                 "message": {"role": "assistant", "content": reply.content}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _send(self, status, payload, headers=None):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # a client hanging up is not an error here
                pass

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def requests_with(self, marker: str) -> list[dict]:
        """Requests whose first message contains ``<<marker>>``."""
        with self._lock:
            return [r for r in self.requests if f"<<{marker}>>" in r["body"]["messages"][0]["content"]]

    def __enter__(self) -> "JudgeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
