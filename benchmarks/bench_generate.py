"""Batched greedy generation against a one-prompt-at-a-time loop (goal: >= 4x at batch 16 on CPU).

Both decode the same prompts with :func:`itlens.generate.generate_responses` (greedy, KV cache,
fp32) on a random Llama of about 5 M parameters; the loop runs with ``batch_size=1``. A random model
never emits its end-of-turn token, so every prompt generates exactly ``--new-tokens`` tokens in both
runs and the work is identical; the outputs are checked to be equal.

    .venv/bin/python benchmarks/bench_generate.py [--prompts 32] [--new-tokens 64] [--threads 2]

Writes ``benchmarks/results/bench_generate.json``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiny import build_model, instruction_records  # noqa: E402

from itlens.env_info import machine, versions  # noqa: E402
from itlens.generate import generate_responses  # noqa: E402
from itlens.io import atomic_write_json  # noqa: E402
from itlens.models import load_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_generate.json"


def timed(lm, prompts, *, batch_size: int, new_tokens: int) -> tuple[float, list[dict]]:
    t0 = time.perf_counter()
    rows = generate_responses(lm, prompts, batch_size=batch_size, max_new_tokens=new_tokens)
    return time.perf_counter() - t0, rows


def run(*, prompts: int = 32, new_tokens: int = 64, batch_size: int = 16, threads: int = 2,
        device: str = "cpu") -> dict:
    """Time batched and one-at-a-time decoding of the same prompts; returns the result record."""
    import torch

    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_generate."))
    try:
        lm = load_model(build_model(tmp / "base"), device=device)
        recs = [{"id": r["id"], "instruction": r["instruction"]} for r in instruction_records(prompts)]
        timed(lm, recs[:2], batch_size=2, new_tokens=4)  # warm-up
        t_batched, batched = timed(lm, recs, batch_size=batch_size, new_tokens=new_tokens)
        t_single, single = timed(lm, recs, batch_size=1, new_tokens=new_tokens)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    same = sum(b["response"] == s["response"] for b, s in zip(batched, single))
    tokens = sum(r["n_tokens"] for r in batched)
    return {"benchmark": "batched_vs_single_generation", "goal_speedup": 4.0, "device": device,
            "prompts": prompts, "new_tokens": new_tokens, "batch_size": batch_size, "threads": threads,
            "tokens": tokens, "batched_s": round(t_batched, 3), "single_s": round(t_single, 3),
            "batched_tokens_per_s": round(tokens / t_batched, 1), "single_tokens_per_s": round(tokens / t_single, 1),
            "speedup": round(t_single / t_batched, 2), "identical_outputs": same, "machine": machine(),
            "versions": versions()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()

    result = run(prompts=a.prompts, new_tokens=a.new_tokens, batch_size=a.batch_size, threads=a.threads,
                 device=a.device)
    t_single, t_batched, tokens = result["single_s"], result["batched_s"], result["tokens"]
    print(f"{'mode':22} {'seconds':>8} {'tokens/s':>9}")
    print(f"{'one prompt at a time':22} {t_single:8.2f} {tokens / t_single:9.0f}")
    print(f"{f'batched ({a.batch_size})':22} {t_batched:8.2f} {tokens / t_batched:9.0f}")
    print(f"speedup {result['speedup']}x (goal >= 4x); identical outputs {result['identical_outputs']}/{a.prompts}")
    out = RESULTS if a.device == "cpu" else RESULTS.with_name(f"bench_generate_{a.device}.json")
    atomic_write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
