"""Re-probe a finished geo study's held-out facts with SliCK sampling and regrade its answers by category.

A greedy few-shot probe calls a fact Unknown when no frame's greedy answer is right; SliCK (Gekhman et
al. 2024) adds sampled answers, so facts the base knows only weakly become WeaklyKnown instead. This
asks how much of "tuned models answer Unknown facts" is the probe's miss: it re-probes the study's
eval facts with the study's own base and probe frames, then grades every model's saved answers by
the new category. Nothing of the study is rewritten; the result goes to --out (JSON).

    .venv/bin/python scripts/slick_regrade.py runs/gemma-geo --samples 6 --out runs/gemma-geo/slick.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import yaml


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished geo study folder (with geo/, gen-s<seed>-*/)")
    p.add_argument("--seed", type=int, default=0, help="study seed whose answers are graded")
    p.add_argument("--samples", type=int, default=6, help="sampled probe answers per fact (frames rotate)")
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    import torch

    from itlens.analysis.knowledge import accuracy_summary, grade_responses
    from itlens.geo import GeoFacts, probe_frame_files, probe_known
    from itlens.io import atomic_write_json, read_records
    from itlens.models import load_model
    from itlens.packaged_models import is_packaged, resolve_packaged

    torch.set_num_threads(args.threads)
    cfg = yaml.safe_load((args.run / "config.resolved.yaml").read_text())
    base = str(resolve_packaged(cfg["base"])) if is_packaged(cfg["base"]) else cfg["base"]
    geo = args.run / "geo"
    ev = read_records(geo / "eval.jsonl", "prompt")
    facts = [{"instruction": r["instruction"], "person": r["person"], "attribute": r["attribute"],
              "answers": r["answers"]} for r in ev]
    t0 = time.perf_counter()
    labels = probe_known(load_model(base), facts, probe_frame_files(geo), samples=args.samples,
                         temperature=args.temperature, seed=args.seed, batch_size=16)
    probe_s = time.perf_counter() - t0
    new = {r["id"]: labels[(r["person"], r["attribute"])]["category"] for r in ev}
    old = {r["id"]: r["category"] for r in ev}
    world = GeoFacts.load(geo)
    models = sorted(d.name.split("-", 2)[2] for d in args.run.glob(f"gen-s{args.seed}-*"))
    by_model = {}
    for m in models:
        rows = read_records(args.run / f"gen-s{args.seed}-{m}" / "responses.jsonl", "response")
        graded = grade_responses(ev, rows, world=world, categories=new)
        by_model[m] = {k: {"n": v["n"], "acc": v["acc"], "acc_low": v["acc_low"], "acc_high": v["acc_high"]}
                       for k, v in accuracy_summary(graded, seed=args.seed)["by_category"].items()}
    result = {"run": str(args.run), "base": cfg["base"], "facts": len(ev), "samples": args.samples,
              "temperature": args.temperature, "probe_s": probe_s,
              "greedy_categories": dict(Counter(old.values())), "slick_categories": dict(Counter(new.values())),
              "transitions": {f"{a}->{b}": n for (a, b), n in sorted(Counter((old[i], new[i]) for i in old).items())},
              "accuracy_by_slick_category": by_model,
              "labels": [{"id": r["id"], "person": r["person"], "attribute": r["attribute"], "greedy": old[r["id"]],
                          **labels[(r["person"], r["attribute"])]} for r in ev]}
    atomic_write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("accuracy_by_slick_category", "labels")},
                     indent=1))
    for m, cats in by_model.items():
        print(m, {c: f"{100 * v['acc']:.1f}% of {v['n']}" for c, v in cats.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
