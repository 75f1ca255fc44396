"""Benchmark the exact-substring index (itlens.analysis.text_index) at the paper's largest IT size.

Builds the index over 326k synthetic instruction + response instances (Tulu-V2-Mix 326k is the
largest IT set in the paper), times queries shaped like hallucinated phrases (2-6 words taken from
random instances, every fifth altered so that it does not occur; single words are timed apart), and checks every result of a sample of
queries against a brute-force scan. Targets (issue 5): build <= 60 s, <= 5 ms per query.

    .venv/bin/python benchmarks/bench_index.py [--n 326000] [--queries 2000] [--scan 200]

Writes ``benchmarks/results/bench_index.json``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import numpy as np

from itlens.analysis.text_index import TextIndex, scan
from itlens.env_info import machine, versions
from itlens.io import atomic_write_json

SYLLABLES = ("ka lo mi ne ru ta vi so pe da gu fo li ma ro te ni sa bo ke zu ha yo ri an el "
             "or is un th st ch sh qu").split()


def synthetic_instances(n: int, seed: int = 0) -> list[str]:
    """English-like word frequencies (Zipf-Mandelbrot, p(r) ~ 1/(r + 2.7), 50k syllable words)."""
    rng = np.random.default_rng(seed)
    vocab_size = 50_000
    syl = np.array(SYLLABLES)
    lens = rng.integers(1, 4, size=vocab_size)
    parts = rng.integers(0, len(syl), size=(vocab_size, 3))
    vocab = ["".join(syl[parts[i, :lens[i]]]) for i in range(vocab_size)]
    vocab[:10] = ["the", "of", "and", "to", "a", "in", "is", "that", "for", "it"]
    n_instr = rng.integers(5, 15, size=n)
    n_resp = rng.integers(15, 60, size=n)
    weights = 1.0 / (np.arange(vocab_size) + 2.7)
    words = rng.choice(vocab_size, size=int(n_instr.sum() + n_resp.sum()), p=weights / weights.sum())
    texts, cursor = [], 0
    for a, b in zip(n_instr, n_resp):
        w = [vocab[i] for i in words[cursor:cursor + a + b]]
        cursor += a + b
        texts.append(" ".join(w[:a]).capitalize() + "?\n" + " ".join(w[a:]).capitalize() + ".")
    return texts


def make_queries(texts: list[str], n: int, seed: int = 1, words_per_query: tuple[int, int] = (2, 6)) -> list[str]:
    """Phrases like the hallucinated spans annotators mark: 2-6 words of a random instance."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = texts[int(rng.integers(len(texts)))].split()
        k = int(rng.integers(words_per_query[0], words_per_query[1] + 1))
        s = int(rng.integers(0, max(1, len(words) - k)))
        q = " ".join(words[s:s + k])
        if i % 5 == 4:  # an altered phrase that usually does not occur anywhere
            q = q + " zq" + str(int(rng.integers(1000)))
        out.append(q)
    return out


def run(*, n: int = 326_000, queries: int = 2000, scan_checked: int = 200) -> dict:
    """Build the index over ``n`` synthetic instances, time the queries, check a sample; the result record."""
    args = argparse.Namespace(n=n, queries=queries, scan=scan_checked)
    t0 = time.perf_counter()
    texts = synthetic_instances(args.n)
    gen_s = time.perf_counter() - t0
    total_bytes = sum(len(t.encode()) for t in texts)

    t0 = time.perf_counter()
    index = TextIndex.build(texts)
    build_s = time.perf_counter() - t0

    queries = make_queries(texts, args.queries)
    lat, hits = [], []
    for q in queries:
        t0 = time.perf_counter()
        found = index.find(q)
        lat.append((time.perf_counter() - t0) * 1000)
        hits.append(len(found))

    single_words = make_queries(texts, 200, seed=2, words_per_query=(1, 1))
    lat_words = []
    for q in single_words:
        t0 = time.perf_counter()
        index.find(q)
        lat_words.append((time.perf_counter() - t0) * 1000)

    mismatches, scan_ms = 0, []
    for q in queries[:args.scan] + single_words[:20]:
        t0 = time.perf_counter()
        ref = scan(texts, q)
        scan_ms.append((time.perf_counter() - t0) * 1000)
        mismatches += ref != index.find(q)

    lat_sorted = sorted(lat)
    result = {
        "n_instances": args.n, "total_bytes": total_bytes, "generate_s": round(gen_s, 2),
        "build_s": round(build_s, 2), "index_mb": round(index.nbytes / 2**20, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "n_queries": len(queries), "query_ms_mean": round(statistics.fmean(lat), 3),
        "query_ms_median": round(statistics.median(lat), 3),
        "query_ms_p95": round(lat_sorted[int(0.95 * (len(lat) - 1))], 3), "query_ms_max": round(lat_sorted[-1], 3),
        "share_queries_found": round(sum(h > 0 for h in hits) / len(hits), 3),
        "median_docs_per_hit": statistics.median([h for h in hits if h] or [0]),
        "single_word_ms_mean": round(statistics.fmean(lat_words), 3),
        "single_word_ms_median": round(statistics.median(lat_words), 3),
        "scan_checked": len(scan_ms), "scan_mismatches": mismatches,
        "scan_ms_mean": round(statistics.fmean(scan_ms), 2) if scan_ms else None,
        # the phrase queries alone: the baseline for query_ms_mean (the same workload)
        "scan_ms_phrase_mean": round(statistics.fmean(scan_ms[:min(args.scan, len(queries))]), 2)
        if scan_ms[:min(args.scan, len(queries))] else None,
        "targets": {"build_s": 60, "query_ms_mean": 5},
        "pass": bool(build_s <= 60 and statistics.fmean(lat) <= 5 and mismatches == 0),
        "machine": machine(), "versions": {k: versions()[k] for k in ("python", "numpy", "itlens")},
    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=326_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--scan", type=int, default=200, help="queries checked against the brute-force scan")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_index.json"))
    args = ap.parse_args()
    result = run(n=args.n, queries=args.queries, scan_checked=args.scan)
    atomic_write_json(args.out, result)
    for k in ("n_instances", "total_bytes", "build_s", "index_mb", "peak_rss_mb", "query_ms_mean", "query_ms_median",
              "query_ms_p95", "query_ms_max", "single_word_ms_mean", "share_queries_found", "scan_mismatches", "scan_ms_mean", "pass"):
        print(f"{k}: {result[k]}")


if __name__ == "__main__":
    main()
