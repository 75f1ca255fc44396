"""LLM judging: multi-aspect scores (§2.6 of the paper), pairwise comparison, and the rewriter (§2.9).

All three share one client (:class:`ChatClient`): an OpenAI-compatible endpoint or a local HF model,
with bounded retries, Retry-After, timeouts, concurrency and an on-disk answer cache. Unusable judge
output is counted as a failure, never imputed. See ``docs/judge.md``.
"""

from itlens.judge.client import ChatClient, Completion, LocalChatModel
from itlens.judge.config import PAPER_JUDGE_MODEL, JudgeConfig
from itlens.judge.pairwise import PairwiseResult, length_controlled_win_rate, pairwise_compare, parse_pairwise
from itlens.judge.paper import paper_reference, paper_rows
from itlens.judge.rewrite import RewriteError, Rewriter
from itlens.judge.scoring import (ASPECTS, TASK_TYPES, JudgeParseError, JudgeResult, parse_multi_aspect,
                                  score_responses)

__all__ = ["ASPECTS", "TASK_TYPES", "PAPER_JUDGE_MODEL", "ChatClient", "Completion", "JudgeConfig",
           "JudgeParseError", "JudgeResult", "LocalChatModel", "PairwiseResult", "RewriteError", "Rewriter",
           "length_controlled_win_rate", "pairwise_compare", "paper_reference", "paper_rows",
           "parse_multi_aspect", "parse_pairwise", "score_responses"]
