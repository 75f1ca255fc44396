"""`itlens tune` against a plain TRL SFT script with the same settings (goal: >= 0.95x its tokens/s).

Both runs train the same random Llama (about 5 M parameters) on the same instruction records, as
conversational prompt-completion data with completion-only loss, for one epoch with a checkpoint at
the epoch end. Runs alternate (baseline, itlens, baseline, itlens, ...) so that load on the shared
machine hits both alike; the table shows the median of each. Tokens/s is TRL's own token count
(non-padding tokens) over the trainer's ``train_runtime``; "end to end" also counts loading, data
preparation and saving.

    .venv/bin/python benchmarks/bench_tune.py [--records 512] [--rounds 3] [--threads 2]

Writes ``benchmarks/results/bench_tune.json``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiny import build_model, instruction_records  # noqa: E402

from itlens.env_info import machine, versions  # noqa: E402
from itlens.io import atomic_write_json, atomic_write_jsonl  # noqa: E402
from itlens.tune import TuneConfig, tune  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_tune.json"


def plain_trl(cfg: TuneConfig, records: list[dict], work: Path) -> dict:
    """What a user would write with TRL directly: the same hyper-parameters, nothing else."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    t0 = time.perf_counter()
    set_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(cfg.base)
    model = AutoModelForCausalLM.from_pretrained(cfg.base, dtype=torch.float32)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["instruction"]}],
                               "completion": [{"role": "assistant", "content": r["response"]}]} for r in records])
    args = SFTConfig(output_dir=str(work), num_train_epochs=cfg.epochs, learning_rate=cfg.learning_rate,
                     lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup,
                     per_device_train_batch_size=cfg.per_device_batch_size,
                     gradient_accumulation_steps=cfg.effective_batch_size // cfg.per_device_batch_size,
                     max_length=cfg.max_length, seed=cfg.seed, data_seed=cfg.seed, use_cpu=True, bf16=False,
                     gradient_checkpointing=False, logging_steps=1, report_to="none", save_strategy="epoch",
                     save_total_limit=1, disable_tqdm=True)
    peft_config = None
    if cfg.method == "lora":
        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_config)
    result = trainer.train()
    trainer.save_model(str(work / "final"))
    wall = time.perf_counter() - t0
    tokens = trainer._total_train_tokens
    return {"tokens": tokens, "train_runtime_s": result.metrics["train_runtime"], "wall_s": wall}


def itlens_tune(cfg: TuneConfig, work: Path) -> dict:
    import json

    t0 = time.perf_counter()
    out = tune(cfg, work / "out")
    wall = time.perf_counter() - t0
    s = json.loads((out / "train_summary.json").read_text())
    return {"tokens": s["tokens"], "train_runtime_s": s["train_runtime_s"], "wall_s": wall}


def run(*, records: int = 512, rounds: int = 3, threads: int = 2, methods: str = "full,lora") -> dict:
    """Alternate plain-TRL and itlens runs per method; returns the result record (medians and ratios)."""
    import torch

    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_tune."))
    try:
        base = build_model(tmp / "base")
        recs = instruction_records(records)
        data = atomic_write_jsonl(tmp / "it.jsonl", recs)
        rows = {}
        for method in methods.split(","):
            cfg = TuneConfig(base=str(base), data=str(data), method=method, epochs=1,
                             learning_rate=1e-3 if method == "lora" else 1e-4, effective_batch_size=8,
                             per_device_batch_size=8, max_length=256, progress=False)
            runs: dict[str, list[dict]] = {"trl": [], "itlens": []}
            for i in range(rounds):
                for name, fn in (("trl", lambda w: plain_trl(cfg, recs, w)),
                                 ("itlens", lambda w: itlens_tune(cfg, w))):
                    work = tmp / f"{method}-{name}-{i}"
                    runs[name].append(fn(work))
                    shutil.rmtree(work, ignore_errors=True)
            med = {name: {"tokens_per_s": statistics.median(r["tokens"] / r["train_runtime_s"] for r in rs),
                          "end_to_end_tokens_per_s": statistics.median(r["tokens"] / r["wall_s"] for r in rs),
                          "tokens": rs[0]["tokens"], "runs": rs} for name, rs in runs.items()}
            assert med["trl"]["tokens"] == med["itlens"]["tokens"], "both must train on the same tokens"
            med["ratio"] = med["itlens"]["tokens_per_s"] / med["trl"]["tokens_per_s"]
            med["ratio_end_to_end"] = med["itlens"]["end_to_end_tokens_per_s"] / med["trl"]["end_to_end_tokens_per_s"]
            rows[method] = med
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"benchmark": "tune_vs_plain_trl", "goal_ratio": 0.95, "records": records, "rounds": rounds,
            "threads": threads, "results": rows, "machine": machine(), "versions": versions()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="full,lora")
    a = ap.parse_args()

    result = run(records=a.records, rounds=a.rounds, threads=a.threads, methods=a.methods)
    print(f"{'method':8} {'TRL tok/s':>10} {'itlens tok/s':>13} {'ratio':>6} {'e2e ratio':>10}  (goal >= 0.95)")
    for m, r in result["results"].items():
        print(f"{m:8} {r['trl']['tokens_per_s']:10.0f} {r['itlens']['tokens_per_s']:13.0f} {r['ratio']:6.3f} "
              f"{r['ratio_end_to_end']:10.3f}")
    atomic_write_json(RESULTS, result)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
