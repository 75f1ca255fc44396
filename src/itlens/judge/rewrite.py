"""The paper's response simplification (LIMA -> LIMA-Simple, §2.9) over the judge's chat client.

``Rewriter(cfg)`` is a callable ``(instruction, response) -> str``, which is what the ``simplify``
data transform takes; the same cache, retries and backends as the judge apply.
"""

from __future__ import annotations

from itlens.judge.client import ChatClient
from itlens.judge.config import JudgeConfig
from itlens.judge.scoring import fill_prompt, load_prompt


class RewriteError(RuntimeError):
    """No usable rewrite (the endpoint failed after all retries, or the reply was empty)."""


class Rewriter:
    """Rewrites a response with an LLM; ``rewrite`` raises :class:`RewriteError` rather than return junk."""

    def __init__(self, cfg: JudgeConfig | None = None, *, client: ChatClient | None = None):
        self.cfg = cfg or JudgeConfig()
        self.client = client or ChatClient(self.cfg)
        self.template = load_prompt(self.cfg.rewrite_prompt_file, "instruction", "response")

    def _messages(self, instruction: str, response: str) -> list[dict]:
        return [{"role": "user", "content": fill_prompt(self.template, instruction=instruction, response=response)}]

    @staticmethod
    def _check(done, instruction: str) -> str:
        if not done.ok:
            raise RewriteError(f"rewrite of {instruction[:40]!r} failed: {done.error}")
        text = done.content.strip()
        if done.finish_reason == "content_filter":
            raise RewriteError(f"rewrite of {instruction[:40]!r}: the endpoint's content filter withheld the reply")
        if not text:
            raise RewriteError(f"rewrite of {instruction[:40]!r}: the model returned an empty reply")
        if done.finish_reason == "length":
            raise RewriteError(f"rewrite of {instruction[:40]!r} was cut off at max_tokens")
        return text

    def rewrite(self, instruction: str, response: str) -> str:
        return self._check(self.client.complete(self._messages(instruction, response)), instruction)

    __call__ = rewrite

    def rewrite_many(self, pairs: list[tuple[str, str]]) -> list[str]:
        """Rewrite many (instruction, response) pairs concurrently; order kept."""
        done = self.client.complete_many([self._messages(i, r) for i, r in pairs])
        return [self._check(d, i) for d, (i, _) in zip(done, pairs)]
