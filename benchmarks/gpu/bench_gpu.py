"""GPU speed of itlens at ~1B parameters: full fine-tuning MFU, TRL tuning tokens/s, token-shift overhead.

On one GPU, with a random-weight Llama (default: hidden 2048, 16 layers, 16 heads, MLP 5632,
vocabulary 32,000 as Llama-2; 0.95 B parameters) in bf16 mixed precision, in one run:

1. **train**: full fine-tuning with a plain PyTorch loop (AdamW fused, bf16 autocast over fp32
   weights, SDPA attention, fixed-length sequences, no padding): tokens/s and model-FLOPs
   utilisation, MFU = 6 * N * tokens/s / the GPU's dense bf16 peak (N = parameters that do matrix
   work: all but the input embedding). Goal: >= 35% on an H100.
2. **tune**: ``itlens.tune`` (TRL SFTTrainer, full fine-tuning, bf16) on the same model and sequence
   length, tokens/s over the steps after the first two (TRL's own non-padding token count), and its MFU.
3. **shift**: ``benchmarks/bench_shift.py`` on the same architecture: the engine end to end, its
   scoring (forward passes + metrics), and the two bare forward passes. Goal: overhead <= 25%.

    python benchmarks/gpu/bench_gpu.py                  # on the GPU machine (a few minutes)
    .venv/bin/python benchmarks/gpu/bench_gpu.py --tiny # CPU smoke test of the same code (seconds)

Writes ``benchmarks/results/gpu_<gpu>.json`` (``--out``; ``--tiny`` writes to the temp folder), and a
copy into ``$OUT`` when it is set (the device tool's output folder).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from itlens.env_info import machine, versions  # noqa: E402
from itlens.io import atomic_write_json, atomic_write_jsonl  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets. Longest match first.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0,
                    "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0}


def peak_tflops(gpu_name: str | None) -> float | None:
    """Dense bf16 peak of a GPU named like ``torch.cuda.get_device_name`` ("NVIDIA L40" is not an L4)."""
    if not gpu_name:
        return None
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # longest first: "H100 PCIe" before "H100"
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", gpu_name):
            return PEAK_BF16_TFLOPS[key]
    return None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def llama_config(a, vocab: int, tok=None):
    from transformers import LlamaConfig

    ids = {} if tok is None else {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                                  "pad_token_id": tok.pad_token_id}
    return LlamaConfig(vocab_size=vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                       max_position_embeddings=max(4096, a.seq_len), tie_word_embeddings=False, **ids)


def matmul_params(model) -> int:
    """Parameters that take part in matrix products (all but the input embedding lookup)."""
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def mfu(n_params: int, tokens_per_s: float, peak: float | None) -> float | None:
    return 6 * n_params * tokens_per_s / (peak * 1e12) if peak else None


# ------------------------------------------------------------------------------------------ 1. train
def bench_train(a, device: str, peak: float | None) -> dict:
    """Full fine-tuning, plain PyTorch: the ceiling a trainer on this stack can reach."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(a, a.vocab))
    model.config.use_cache = False
    n_all, n_mm = sum(p.numel() for p in model.parameters()), matmul_params(model)
    step_fn_model = torch.compile(model) if a.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device.startswith("cuda"))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, a.vocab, (a.micro_batch, a.seq_len), generator=gen).to(device) for _ in range(2)]
    amp = a.dtype == "bfloat16"

    def step(ids):
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
            loss = step_fn_model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for i in range(a.warmup):
        step(batches[i % 2])
    sync(device)
    warmup_s = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(a.steps):
        loss = step(batches[i % 2])
    sync(device)
    dt = time.perf_counter() - t0
    tokens = a.steps * a.micro_batch * a.seq_len
    tps = tokens / dt
    attn_flops_per_token = 12 * a.layers * a.hidden * a.seq_len  # PaLM's attention term (non-causal count)
    out = {"params": n_all, "matmul_params": n_mm, "micro_batch": a.micro_batch, "seq_len": a.seq_len,
           "steps": a.steps, "warmup_steps": a.warmup, "warmup_s": round(warmup_s, 3), "compile": a.compile,
           "precision": "bf16 autocast, fp32 weights and AdamW (fused)" if amp else a.dtype,
           "seconds": round(dt, 3), "step_s": round(dt / a.steps, 4), "tokens_per_s": round(tps, 1),
           "mfu": mfu(n_mm, tps, peak),
           "mfu_with_attention": ((6 * n_mm + attn_flops_per_token) * tps / (peak * 1e12)) if peak else None,
           "final_loss": loss.item(), "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2**30
                                                       if device.startswith("cuda") else None)}
    del model, step_fn_model, opt, batches
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    print(f"train: {out['params'] / 1e9:.3f} B params, {tps:,.0f} tok/s, step {out['step_s']:.3f} s, "
          f"MFU {fmt_pct(out['mfu'])} (with attention {fmt_pct(out['mfu_with_attention'])})", flush=True)
    return out


# ------------------------------------------------------------------------------------------- 2. tune
def long_records(n: int, words: int, seed: int = 0) -> list[dict]:
    from _tiny import WORDS

    rng = random.Random(seed)
    return [{"id": f"gpu:{i}", "instruction": "Tell me about " + " ".join(rng.choice(WORDS) for _ in range(12)) + "?",
             "response": " ".join(rng.choice(WORDS) for _ in range(words)) + "."} for i in range(n)]


def bench_tune(a, device: str, peak: float | None, work: Path) -> dict:
    """``itlens.tune`` (TRL SFTTrainer) on the same architecture and sequence length."""
    import warnings

    from transformers import LlamaForCausalLM

    from itlens.tokenizer import train_tokenizer
    from itlens.tune import TuneConfig, tune

    recs = long_records(a.micro_batch * a.tune_steps, words=a.seq_len)  # longer than max_length: truncated
    tok = train_tokenizer([r["response"] for r in recs[:200]], vocab_size=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(a, a.vocab, tok))
    n_mm = matmul_params(model)
    model.save_pretrained(work / "base")
    tok.save_pretrained(work / "base")
    del model
    data = atomic_write_jsonl(work / "it.jsonl", recs)
    cfg = TuneConfig(base=str(work / "base"), data=str(data), method="full", epochs=1, max_steps=a.tune_steps,
                     learning_rate=1e-5, warmup=0, effective_batch_size=a.micro_batch,
                     per_device_batch_size=a.micro_batch, max_length=a.seq_len, bf16=a.dtype == "bfloat16",
                     save_steps=10**9, progress=False, num_threads=a.threads, torch_compile=a.tune_compile)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every record is truncated on purpose
        out = tune(cfg, work / "tuned")
    wall = time.perf_counter() - t0
    summary = json.loads((out / "train_summary.json").read_text())
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if x.strip()]
    # steady state: from the end of step 2 (CUDA/cuBLAS warm-up excluded) to the last step
    first, last = (log[min(2, len(log) - 2)], log[-1]) if len(log) >= 2 else ({"step": None}, {})
    steady = None
    if first.get("num_tokens") is not None and last.get("num_tokens") is not None \
            and last["elapsed_s"] > first["elapsed_s"]:
        steady = (last["num_tokens"] - first["num_tokens"]) / (last["elapsed_s"] - first["elapsed_s"])
    res = {"steps": summary["steps"], "tokens": summary["tokens"], "train_runtime_s": summary["train_runtime_s"],
           "tokens_per_s_trainer": summary["tokens_per_s"], "tokens_per_s_steady": round(steady, 1) if steady else None,
           "steady_from_step": first["step"], "wall_s": round(wall, 2), "matmul_params": n_mm,
           "mfu_steady": mfu(n_mm, steady, peak) if steady else None,
           "torch_compile": a.tune_compile, "mfu_trainer": mfu(n_mm, summary["tokens_per_s"], peak) if summary["tokens_per_s"] else None,
           "note": "TRL counts non-padding tokens; every example is truncated to max_length, so none are padding"}
    print(f"tune (itlens/TRL): {res['tokens_per_s_steady'] or 0:,.0f} tok/s steady "
          f"({summary['tokens_per_s'] or 0:,.0f} over train_runtime), MFU {fmt_pct(res['mfu_steady'])}", flush=True)
    return res


# ------------------------------------------------------------------------------------------ 3. shift
def bench_shift_overhead(a, device: str, view_top_k: int = 0) -> dict:
    import bench_shift

    argv = ["--view-top-k", str(view_top_k), "--device", device, "--dtype", a.dtype, "--hidden", str(a.hidden), "--layers", str(a.layers),
            "--heads", str(a.heads), "--intermediate", str(a.intermediate), "--vocab", str(a.vocab),
            "--lengths", str(a.shift_length), "--responses", str(a.shift_responses),
            "--batch-size", str(a.shift_batch), "--per-token-responses", "0", "--repeats", str(a.shift_repeats),
            "--threads", str(a.threads)] + (["--profile"] if a.profile else []) \
        + ["--compile-metrics", a.shift_compile_metrics]
    res = bench_shift.run(argv)
    row = res["rows"][0]
    out = {"argv": argv, "response_tokens": row["response_tokens"], "responses": row["responses"],
           "tokens": row["tokens"], "engine_s": row["engine_s"], "scoring_s": row["engine_scoring_s"],
           "bare_forward_s": row["bare_forward_s"], "engine_timings": row["engine_timings"],
           "profile_engine": row.get("profile_engine"), "profile_bare": row.get("profile_bare"),
           "overhead_end_to_end": row["overhead_vs_bare"], "overhead_scoring": row["scoring_overhead_vs_bare"],
           "engine_tokens_per_s": row["engine_tokens_per_s"],
           "peak_mem_mib_engine": row["peak_mem_mib_engine"], "peak_mem_mib_bare": row["peak_mem_mib_bare"],
           "model_params": res["model"]["params"], "view_top_k": view_top_k,
           "compile_metrics": a.shift_compile_metrics}
    return out


def fmt_pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (a smoke test of this script)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="timed training steps (plain loop)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile the model in the plain loop")
    p.add_argument("--tune-steps", type=int, default=8, help="optimizer steps of itlens.tune (TRL)")
    p.add_argument("--tune-compile", action="store_true", help="itlens.tune with torch_compile=True")
    p.add_argument("--shift-responses", type=int, default=64)
    p.add_argument("--shift-length", type=int, default=512)
    p.add_argument("--shift-batch", type=int, default=16)
    p.add_argument("--shift-repeats", type=int, default=3)
    p.add_argument("--shift-view-top-k", default="0,10", help="token-view top-k values to run the shift part with "
                   "(comma-separated): the first is stored as 'shift', the others as 'shift_view<k>' "
                   "(10 is itlens's default; 0 leaves the view columns out, as the first recorded runs did)")
    p.add_argument("--shift-compile-metrics", default="auto", choices=["auto", "on", "off"], help="the shift "
                   "part's ShiftConfig.compile_metrics (the metrics fused by torch.compile): auto (on for CUDA)")
    p.add_argument("--threads", type=int, default=8, help="torch CPU threads")
    p.add_argument("--parts", default="train,tune,shift")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the torch.profiler pass of the shift engine and the bare forward passes")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.tiny:
        a.device = a.device or "cpu"
        a.dtype = "float32"
        a.hidden, a.layers, a.heads, a.intermediate, a.vocab = 64, 2, 4, 128, 1024
        a.seq_len, a.micro_batch, a.steps, a.warmup, a.tune_steps = 64, 2, 2, 1, 3
        a.shift_responses, a.shift_length, a.shift_batch, a.shift_repeats, a.threads = 2, 32, 2, 1, 1
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(a.threads)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else None
    peak = peak_tflops(gpu)
    print(f"device {device}: {gpu or 'CPU'}; bf16 dense peak {peak or 'unknown'} TFLOP/s", flush=True)

    parts = a.parts.split(",")
    result = {"benchmark": "gpu: full-FT MFU, itlens.tune (TRL) tokens/s, token-shift overhead",
              "gpu": gpu, "peak_bf16_tflops": peak, "device": device, "tiny": a.tiny,
              "model": {"hidden": a.hidden, "layers": a.layers, "heads": a.heads, "intermediate": a.intermediate,
                        "vocab": a.vocab, "dtype": a.dtype},
              "goals": {"train_mfu_min_h100": 0.35, "shift_overhead_max": 0.25},
              "machine": machine(), "versions": versions()}
    slug = re.sub(r"[^a-z0-9]+", "_", (gpu or "cpu").lower().replace("nvidia", "")).strip("_")
    default = Path(tempfile.gettempdir()) / "gpu_tiny.json" if a.tiny else ROOT / "benchmarks" / "results" / f"gpu_{slug}.json"
    out = Path(a.out) if a.out else default  # a --tiny smoke test leaves the results folder alone

    def save(complete: bool) -> None:  # after every part, so a run cut short still leaves what it measured
        result["complete"] = complete
        atomic_write_json(out, result)
        if os.environ.get("OUT"):  # the device tool's folder of files to bring back (unless out is in it)
            copy = Path(os.environ["OUT"]) / out.name
            if not (copy.exists() and copy.samefile(out)):
                shutil.copy(out, copy)

    t_all = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_gpu."))
    try:
        views = [int(k) for k in a.shift_view_top_k.split(",")]
        steps = [("train", "train", lambda: bench_train(a, device, peak))]
        steps += [("shift", "shift" if i == 0 else f"shift_view{k}", lambda k=k: bench_shift_overhead(a, device, k))
                  for i, k in enumerate(views)]
        steps += [("tune", "tune", lambda: bench_tune(a, device, peak, work))]
        for part, key, fn in steps:
            if part in parts:
                result[key] = fn()
                save(False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if "train" in result and "tune" in result and result["tune"]["tokens_per_s_steady"]:
        result["tune_vs_plain_loop"] = result["tune"]["tokens_per_s_steady"] / result["train"]["tokens_per_s"]
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    save(True)
    print_summary(result)
    print(f"wrote {out}")
    return 0


def print_summary(r: dict) -> None:
    print(f"\n{r['gpu'] or 'CPU'} ({r['model']['dtype']})")
    if "train" in r:
        t = r["train"]
        print(f"  full FT, plain PyTorch : {t['tokens_per_s']:>12,.0f} tok/s  MFU {fmt_pct(t['mfu'])} (goal >= 35% on H100)")
    if "tune" in r:
        t = r["tune"]
        print(f"  full FT, itlens.tune   : {t['tokens_per_s_steady'] or 0:>12,.0f} tok/s  MFU {fmt_pct(t['mfu_steady'])}"
              + (f"  ({r['tune_vs_plain_loop']:.2f}x the plain loop)" if "tune_vs_plain_loop" in r else ""))
    for key in [k for k in r if k == "shift" or k.startswith("shift_view")]:
        s = r[key]
        print(f"  token shift, {s['responses']} x {s['response_tokens']} tokens, view top-k {s.get('view_top_k', 0)}: "
              f"engine {s['engine_s']:.3f} s, scoring {s['scoring_s']:.3f} s, bare passes {s['bare_forward_s']:.3f} s "
              f"-> overhead scoring {fmt_pct(s['overhead_scoring'])}, end to end {fmt_pct(s['overhead_end_to_end'])} "
              f"(goal <= 25%)")
        print("    engine stages (s): " + ", ".join(f"{k} {v:.3f}" for k, v in s["engine_timings"].items()))


if __name__ == "__main__":
    sys.exit(main())
