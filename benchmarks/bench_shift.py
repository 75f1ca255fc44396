"""Benchmark the one-pass token-shift engine (itlens.analysis.token_shift) against AlignTDS's method.

In one run, on the same responses, it times:

- ``engine``: ``compute_shift`` (exact mode, default frame context), everything included;
- ``bare``: the two plain forward passes the engine cannot avoid (same batches, full logits, nothing else);
- ``per_token``: AlignTDS's loop: for every response token, a full forward pass of each model on the
  re-encoded growing context (no KV cache), then the exact rank from the last position's logits.

and checks that the per-token loop gives the engine's ranks exactly. Goals (issue 4): engine >= 100x
faster than the per-token loop at 512-token responses; engine <= 1.25x the bare passes.

CPU default (a small random Llama, a minute or two):
    .venv/bin/python benchmarks/bench_shift.py
GPU (a ~0.5B random Llama in bf16; --vocab 262144 also shows the chunked memory bound):
    python benchmarks/bench_shift.py --device cuda --dtype bfloat16 --hidden 1024 --layers 24 \
        --heads 16 --vocab 151936 --responses 16 --batch-size 16 --per-token-responses 2

Writes ``benchmarks/results/bench_shift_<device>.json`` and ``docs/figures/bench_shift_<device>.png``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

from itlens.env_info import machine, versions
from itlens.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the a of to and in is was born city works at studied river mountain north south red blue green "
         "happy help let me know anything else question answer what where when who which year field "
         "university company doctor teacher music science history").split()


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) + "." for _ in range(n)]


def make_model(tokenizer, args, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=max(args.vocab, len(tokenizer)), hidden_size=args.hidden,
                      intermediate_size=args.intermediate or 4 * args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=4096, tie_word_embeddings=False,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    with torch.device(args.device):  # initialise in place (fast for a 0.5B model on a GPU)
        model = LlamaForCausalLM(cfg).to(dtype=getattr(torch, args.dtype))
    return model.eval()


def make_responses(tokenizer, n: int, length: int, seed: int) -> list[dict]:
    """Responses of exactly ``length`` tokens (cut at a token boundary of a longer random text), carrying
    their ``response_token_ids`` as ``itlens generate`` records do (so the engine checks them, as in a study)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(length * 2)).capitalize() + "."
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        text = text[: enc["offset_mapping"][length - 1][1]]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == length
        out.append({"id": f"bench:{i}", "instruction": f"Tell me about the {rng.choice(WORDS)}.", "response": text,
                    "model": "random", "response_token_ids": ids})
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return out, time.perf_counter() - t, peak


def bare_passes(base, tuned, batches, pad: int, device: str) -> None:
    """The two forward passes alone: the engine's right-padded batches, full logits, no analysis."""
    with torch.no_grad():
        for batch in batches:
            for model, seqs in ((tuned, [e.tuned_ids for e in batch]), (base, [e.base_ids for e in batch])):
                width = max(map(len, seqs))
                ids = torch.full((len(seqs), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, s in enumerate(seqs):
                    ids[r, : len(s)] = torch.tensor(s)
                    mask[r, : len(s)] = 1
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()


def profile_once(fn, device: str, top: int = 15) -> dict:
    """One call of ``fn`` under torch.profiler: wall time, summed self time per operator (device and host).

    ``device_busy_ms`` (the sum of kernel self times) against ``wall_ms`` says whether the GPU sat idle
    waiting on the host: the split a plain timer cannot give.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t

    def dev_ms(e) -> float:
        return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) / 1e3

    events = prof.key_averages()
    # kernels are events of their own (device_type CUDA); operators (CPU) also carry their kernels' time
    kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
    ops = [e for e in events if e not in kernels]
    key = dev_ms if cuda else (lambda e: e.self_cpu_time_total / 1e3)
    rows = sorted(ops, key=key, reverse=True)[:top]
    return {"wall_ms": round(wall * 1e3, 2), "device_busy_ms": round(sum(dev_ms(e) for e in kernels), 2) if cuda else None,
            "kernels": len(kernels),
            "host_self_ms": round(sum(e.self_cpu_time_total for e in events) / 1e3, 2),
            "top": [{"op": e.key, "calls": e.count, "self_device_ms": round(dev_ms(e), 3),
                     "self_host_ms": round(e.self_cpu_time_total / 1e3, 3)} for e in rows]}


def sampled_positions(n: int, stride: int) -> list[int]:
    """Every ``stride``-th response position, centred in its stride (all of them for stride 1).

    The loop's cost at position i grows with the context (prompt + i tokens), so the mid-point of each
    stride makes ``stride`` x the sampled time an estimate of the whole loop's time.
    """
    return list(range(stride // 2, n, stride)) if stride > 1 else list(range(n))


def per_token_loop(base, tuned, encoded, device: str, stride: int = 1) -> dict[str, dict[int, int]]:
    """AlignTDS's logit_analysis: one full forward per token and model on the growing context.

    With ``stride`` > 1 only every stride-th position is run (a big model's full loop takes hours on a
    CPU); returns {response id: {position: base rank}}.
    """
    ranks = {}
    with torch.no_grad():
        for e in encoded:
            out = {}
            for i in sampled_positions(len(e.response_ids), stride):
                tok_id = e.response_ids[i]
                zt = tuned(input_ids=torch.tensor([e.tuned_ids[: e.tuned_start + i]], device=device),
                           use_cache=False).logits[0, -1].float()
                zb = base(input_ids=torch.tensor([e.base_ids[: e.base_start + i]], device=device),
                          use_cache=False).logits[0, -1].float()
                torch.log_softmax(zt, -1), torch.log_softmax(zb, -1)  # the probabilities AlignTDS saves
                out[i] = int((zb > zb[tok_id]).sum()) + 1
            ranks[e.id] = out
    return ranks


def run_length(args, tokenizer, base, tuned, length: int) -> dict:
    from itlens.analysis.token_shift import (ShiftConfig, _encode_all, compiles_metrics, compute_shift,
                                             plan_windows, shift_class, tokenizes_ahead, window_batches)
    from itlens.templates import load_frame

    recs = make_responses(tokenizer, args.responses, length, seed=length)
    cfg = ShiftConfig(batch_size=args.batch_size, device=args.device, view_top_k=args.view_top_k,
                      tokenize_ahead={"auto": None, "on": True, "off": False}[args.tokenize_ahead],
                      chunk_mb=args.chunk_mb or ShiftConfig.chunk_mb,
                      compile_metrics={"auto": None, "on": True, "off": False}[args.compile_metrics])
    compute_shift(base, tuned, recs[:1], tokenizer=tokenizer, config=cfg)  # warm-up
    encoded = _encode_all(tokenizer, recs, cfg, load_frame(None))
    ahead = tokenizes_ahead(cfg, torch.device(args.device).type)
    batches = [b for idx in plan_windows(recs, args.batch_size, ahead=ahead)  # the engine's batches
               for b in window_batches([encoded[i] for i in idx if encoded[i].response_ids], args.batch_size)]
    pad = tokenizer.pad_token_id
    runs = []  # interleaved repeats, best of each kept (shared machines are noisy)
    for _ in range(args.repeats):
        runs.append(("engine",) + timed(lambda: compute_shift(base, tuned, recs, tokenizer=tokenizer, config=cfg),
                                        args.device))
        runs.append(("bare",) + timed(lambda: bare_passes(base, tuned, batches, pad, args.device),
                                      args.device))
    result, t_engine, mem_engine = min((r[1:] for r in runs if r[0] == "engine"), key=lambda r: r[1])
    assert result.summary["n_generated_ids"] == len(recs) and not result.summary["n_generated_ids_differ"]
    _, t_bare, mem_bare = min((r[1:] for r in runs if r[0] == "bare"), key=lambda r: r[1])
    result.timings["score_s"] = min(r[1].timings["score_s"] for r in runs if r[0] == "engine")
    k = min(args.per_token_responses, len(encoded))
    stride = args.per_token_stride
    ranks, t_loop, _ = timed(lambda: per_token_loop(base, tuned, encoded[:k], args.device, stride), args.device)
    # the loop's cost is per response and (with a stride) per sampled position: scale to all of them
    n_sampled = sum(len(r) for r in ranks.values())
    n_all = sum(len(e.response_ids) for e in encoded[:k])
    t_loop_all = t_loop * (n_all / n_sampled) * len(encoded) / k if k else None
    mismatches = class_mismatches = 0
    worst = 0.0
    n_response = {e.id: len(e.response_ids) for e in encoded}
    for rid, r in ranks.items():
        all_mine = result.tokens.loc[result.tokens["id"] == rid, "rank_base"].tolist()
        if len(all_mine) != n_response[rid]:
            mismatches += 1
            continue
        mine, ref = [all_mine[i] for i in r], list(r.values())
        mismatches += sum(a != b for a, b in zip(mine, ref))
        class_mismatches += int((shift_class(mine) != shift_class(ref)).sum())
        worst = max([worst] + [abs(a - b) / b for a, b in zip(mine, ref)])
    n_tokens = len(result.tokens)
    # forward passes + metrics, and the tokenization of batches after the first (on a GPU it runs while
    # the device works; on a CPU it adds to the loop)
    t_scoring = result.timings["score_s"]
    row = {
        "response_tokens": length, "responses": len(recs), "tokens": n_tokens,
        "context_tokens_tuned": len(encoded[0].tuned_ids) - length, "context_tokens_base": len(encoded[0].base_ids) - length,
        "engine_s": t_engine, "engine_timings": result.timings, "engine_scoring_s": t_scoring,
        "bare_forward_s": t_bare, "per_token_s": t_loop_all,
        "per_token_measured_responses": k, "per_token_measured_s": t_loop, "per_token_stride": stride,
        "per_token_measured_positions": n_sampled,
        "speedup_vs_per_token": t_loop_all / t_engine if k else None, "overhead_vs_bare": t_engine / t_bare - 1,
        "scoring_overhead_vs_bare": t_scoring / t_bare - 1,
        "engine_tokens_per_s": n_tokens / t_engine,
        "rank_mismatches": mismatches, "class_mismatches": class_mismatches, "max_relative_rank_diff": worst,
        "ranks_compared": sum(len(r) for r in ranks.values()),
        "peak_mem_mib_engine": mem_engine, "peak_mem_mib_bare": mem_bare,
        "metrics_compiled": compiles_metrics(cfg, torch.device(args.device).type),
    }
    if args.profile:
        row["profile_engine"] = profile_once(
            lambda: compute_shift(base, tuned, recs, tokenizer=tokenizer, config=cfg), args.device)
        row["profile_bare"] = profile_once(
            lambda: bare_passes(base, tuned, batches, pad, args.device), args.device)
        for name in ("engine", "bare"):
            pr = row[f"profile_{name}"]
            print(f"  profile {name}: wall {pr['wall_ms']:.1f} ms, device busy {pr['device_busy_ms']} ms; top: "
                  + ", ".join(f"{o['op']} {o['self_device_ms'] if pr['device_busy_ms'] is not None else o['self_host_ms']:.1f}"
                              for o in pr["top"][:6]), flush=True)
    loop = f"per-token {t_loop_all:.1f}s (x{row['speedup_vs_per_token']:.0f}), " if k else ""
    mem = f", peak MiB engine {mem_engine:.0f} / bare {mem_bare:.0f}" if mem_engine is not None else ""
    print(f"T={length}: engine {t_engine:.3f}s (scoring {t_scoring:.3f}s), bare {t_bare:.3f}s (overhead "
          f"{100 * row['overhead_vs_bare']:+.1f}%, scoring {100 * row['scoring_overhead_vs_bare']:+.1f}%), "
          f"{loop}rank mismatches {mismatches}/{row['ranks_compared']} (class {class_mismatches}, max rel "
          f"{worst:.1e}){mem}", flush=True)
    return row


def plot(rows: list[dict], path: Path, title: str) -> None:
    from itlens.plotting import STYLE, save_fig, subplots
    import matplotlib

    with matplotlib.rc_context(STYLE):
        _plot(rows, path, title, save_fig, subplots)


def _plot(rows, path, title, save_fig, subplots) -> None:
    fig, (a1, a2) = subplots(1, 2, figsize=(9, 3.2))
    xs = [r["response_tokens"] for r in rows]
    for key, label in (("per_token_s", "per-token loop (AlignTDS)"), ("engine_s", "itlens one pass"),
                       ("bare_forward_s", "two bare forward passes")):
        a1.plot(xs, [r[key] for r in rows], marker="o", label=label)
    a1.set_yscale("log")
    a1.set_xlabel("response tokens")
    a1.set_ylabel("seconds (all responses)")
    a1.legend(fontsize=7)
    a2.bar([str(x) for x in xs], [r["speedup_vs_per_token"] or 0 for r in rows], color="#1f77b4")
    a2.axhline(100, color="#d62728", linestyle="--", linewidth=1)
    a2.set_xlabel("response tokens")
    a2.set_ylabel("speed-up vs per-token loop")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_fig(fig, path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=0, help="0: 4 x hidden")
    p.add_argument("--vocab", type=int, default=0, help="model vocabulary; rows beyond the tokenizer are never emitted (0: the tokenizer size)")
    p.add_argument("--lengths", default="128,512", help="response lengths in tokens, comma-separated")
    p.add_argument("--responses", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--per-token-responses", type=int, default=1, help="responses timed with the per-token loop "
                                                                      "(its time is scaled to all responses)")
    p.add_argument("--per-token-stride", type=int, default=1, help="time the per-token loop at every N-th "
                                                                    "position only and scale (for big models)")
    p.add_argument("--chunk-mb", type=float, default=0, help="ShiftConfig.chunk_mb (0: its default)")
    p.add_argument("--tokenize-ahead", default="auto", choices=["auto", "on", "off"],
                   help="ShiftConfig.tokenize_ahead: auto (null: windows on an accelerator, all at once on a "
                        "CPU), on (true), off (false)")
    p.add_argument("--view-top-k", type=int, default=0, help="ShiftConfig.view_top_k: the token view's top-k "
                   "columns (itlens's default is 10; 0, as in the recorded results, leaves them out)")
    p.add_argument("--compile-metrics", default="auto", choices=["auto", "on", "off"],
                   help="ShiftConfig.compile_metrics: the per-position metrics fused with torch.compile (compiled "
                        "during the warm-up call): auto (null: on for CUDA), on (true), off (false)")
    p.add_argument("--repeats", type=int, default=3, help="engine and bare passes: best of this many runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    p.add_argument("--profile", action="store_true", help="also run the engine and the bare passes once each under "
                                                          "torch.profiler and record the top operators and busy time")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_shift_<device>.json)")
    p.add_argument("--figure", default=None, help="PNG path (default docs/figures/bench_shift_<device>.png)")
    return p


def run(argv: list[str] | None = None) -> dict:
    """Run the benchmark with these command-line arguments; returns the result record (writes nothing)."""
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from itlens.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(corpus(2000), vocab_size=512, min_frequency=2)
    base, tuned = make_model(tokenizer, args, 0), make_model(tokenizer, args, 1)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"random Llama: {n_params / 1e6:.1f}M parameters, vocab {base.config.vocab_size}, {args.dtype} on "
          f"{args.device}", flush=True)
    rows = [run_length(args, tokenizer, base, tuned, int(n)) for n in args.lengths.split(",")]
    result = {
        "benchmark": "token shift: one-pass engine vs per-token loop vs bare forward passes",
        "model": {"params": n_params, "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                  "vocab": base.config.vocab_size, "dtype": args.dtype, "device": args.device},
        "batch_size": args.batch_size, "threads": args.threads, "per_token_stride": args.per_token_stride, "repeats": args.repeats, "chunk_mb": args.chunk_mb or None,
        "view_top_k": args.view_top_k, "tokenize_ahead": args.tokenize_ahead,
        "goals": {"speedup_vs_per_token_at_512": 100, "overhead_vs_bare_max": 0.25},
        "rows": rows, "machine": machine(), "versions": versions(),
    }
    return result


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    result = run(argv)
    rows, n_params = result["rows"], result["model"]["params"]
    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"bench_shift_{dev}.json"
    atomic_write_json(out, result)
    plot(rows, Path(args.figure) if args.figure else ROOT / "docs" / "figures" / f"bench_shift_{dev}.png",
         f"{n_params / 1e6:.1f}M-parameter random Llama, {args.dtype}, {args.device}")
    print(f"wrote {out}")
    return 1 if any(r["class_mismatches"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
