"""Pretrain the world's base model: a small Llama from scratch on the world corpus.

A plain PyTorch loop (AdamW, warmup + cosine, bf16 autocast where the CPU has bf16 units) is the
fastest thing on a 2-core CPU; the result is a normal HF model dir (model + tokenizer) that plain
``AutoModelForCausalLM.from_pretrained`` loads. Batches are packed windows of the corpus, whose
document order is reshuffled each epoch from the seed; window ``w`` is a pure function of (seed, w),
so a run resumed from a checkpoint sees exactly the batches an uninterrupted run would.

Outputs in ``out_dir``: the model and tokenizer, ``loss_log.jsonl`` (loss every ``log_every`` steps,
knowledge probes every ``probe_every``), and ``pretrain_summary.json`` (written last: its presence
means the run is complete) with wall time, tokens/s and the final probes under
``knowledge.base.{cloze_acc,qa_acc}``. ``out_dir/checkpoint/`` lets a killed run continue in the precision
and on the device it started with.
"""

from __future__ import annotations

import hashlib
import io
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from itlens.config import config_hash, load_section, to_dict
from itlens.errors import InputError
from itlens.io import atomic_write_bytes, atomic_write_json, atomic_write_jsonl
from itlens.world import KNOWN_ROLES, World

CODE_VERSION = 1
"""Bump when a change to this module changes what a config trains (it enters the resume/reuse hash)."""


@dataclass
class PretrainConfig:
    """The base model's architecture and its pretraining run. Defaults are the CPU mini world's."""

    seed: int = field(default=0, metadata={"help": "Seed of the weight init and the data order."})
    hidden_size: int = field(default=96, metadata={"help": "Model width (d_model)."})
    num_layers: int = field(default=4, metadata={"help": "Transformer blocks."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads (hidden_size must be divisible by it)."})
    intermediate_size: int = field(default=256, metadata={"help": "SwiGLU MLP width."})
    max_position_embeddings: int = field(default=1024, metadata={
        "help": "Longest sequence the model config allows (RoPE; the frame + a describe answer is ~250 tokens)."})
    steps: int = field(default=600, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per step."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per packed sequence."})
    lr: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate."})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "The cosine schedule ends at lr x this."})
    warmup_steps: int = field(default=60, metadata={"help": "Linear warmup steps."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only, not norms)."})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient-norm clip (0: off)."})
    precision: Literal["auto", "bf16", "fp32"] = field(default="auto", metadata={
        "help": "Training precision: bf16 autocast, fp32, or auto (bf16 where the CPU has native bf16 "
                "instructions or on a GPU that has (Ampere or later), else fp32). Probes and the saved "
                "weights are always fp32."})
    threads: int = field(default=1, metadata={
        "help": "torch CPU threads. Fixed, since results can differ bitwise across thread counts; on a busy shared "
                "CPU more threads were slower (oversubscription)."})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available, else cpu), cpu or cuda."})
    log_every: int = field(default=10, metadata={"help": "Steps between loss_log.jsonl rows."})
    probe_every: int = field(default=150, metadata={"help": "Steps between knowledge probes (0: only at the end)."})
    probe_people: int = field(default=40, metadata={
        "help": "Known people probed during training (a fixed subset, for speed); the final probe uses all."})
    save_every: int = field(default=100, metadata={"help": "Steps between resumable checkpoints (0: none)."})

    def validate(self) -> None:
        positive = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "steps", "batch_size", "seq_len",
                    "threads", "log_every", "max_position_embeddings")
        for key in positive:
            if getattr(self, key) < 1:
                raise InputError(f"expected a positive integer, got {getattr(self, key)}", key=key)
        for key in ("warmup_steps", "probe_every", "probe_people", "save_every"):
            if getattr(self, key) < 0:
                raise InputError(f"expected a non-negative integer, got {getattr(self, key)}", key=key)
        if self.warmup_steps > self.steps:  # the learning rate would never reach lr
            raise InputError(f"expected at most steps ({self.steps}) warm-up steps, got {self.warmup_steps}",
                             key="warmup_steps")
        if self.hidden_size % self.num_heads:
            raise InputError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}",
                             key="num_heads")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"expected a positive learning rate, got {self.lr}", key="lr")
        if not 0 <= self.beta2 < 1:
            raise InputError(f"expected 0 <= beta2 < 1, got {self.beta2}", key="beta2")
        for key in ("weight_decay", "grad_clip"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise InputError(f"expected a finite number >= 0, got {value}", key=key)
        if not 0 <= self.min_lr_ratio <= 1:
            raise InputError(f"expected a ratio in [0, 1], got {self.min_lr_ratio}", key="min_lr_ratio")
        if self.seq_len > self.max_position_embeddings:
            raise InputError("seq_len exceeds max_position_embeddings", key="seq_len")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InputError(f"expected auto, cpu or cuda, got {self.device!r}", key="device")


def load_pretrain_config(path: str | Path | None, overrides: list[str] | None = None) -> PretrainConfig:
    """A PretrainConfig from a file's ``pretrain:`` section (or the whole file), with ``--set`` overrides."""
    return load_section(PretrainConfig, path, "pretrain", overrides)


# ------------------------------------------------------------------------------------------ helpers
def cpu_has_bf16() -> bool:
    """Native bf16 instructions (AVX512-BF16 or AMX); without them bf16 autocast is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gpu_has_bf16() -> bool:
    """Native bf16 on the current CUDA GPU (compute capability 8.0 or later: Ampere, Hopper, ...). On a
    V100 or T4, bf16 autocast is emulated and slower than fp32, or fails."""
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def resolve_precision(precision: str, device_type: str) -> str:
    """'bf16' or 'fp32': what ``precision`` (auto, bf16, fp32) means on this device."""
    if precision != "auto":
        return precision
    native = gpu_has_bf16() if device_type == "cuda" else cpu_has_bf16()
    return "bf16" if native else "fp32"


def world_fingerprint(world_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("world.json", "corpus.jsonl"):
        h.update((world_dir / name).read_bytes())
    return h.hexdigest()[:16]


class PackedCorpus:
    """The corpus as packed windows: each epoch concatenates ``BOS + doc`` in a seeded random order and
    cuts it into ``seq_len`` windows (the remainder is dropped). Window ``w`` is deterministic."""

    def __init__(self, doc_ids: list[list[int]], seq_len: int, seed: int):
        import torch

        self.docs = [torch.tensor(d, dtype=torch.long) for d in doc_ids]
        self.seq_len = seq_len
        self.seed = seed
        self.per_epoch = sum(len(d) for d in doc_ids) // seq_len
        if self.per_epoch < 1:
            raise InputError(f"the corpus is shorter than one window of {seq_len} tokens", key="seq_len")
        self._epoch, self._stream = -1, None

    def window(self, w: int):
        import torch

        epoch, i = divmod(w, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.docs), generator=g).tolist()
            self._stream = torch.cat([self.docs[j] for j in order])
            self._epoch = epoch
        return self._stream[i * self.seq_len:(i + 1) * self.seq_len]

    def batch(self, step: int, batch_size: int):
        import torch

        return torch.stack([self.window(step * batch_size + b) for b in range(batch_size)])


def build_model(cfg: PretrainConfig, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from itlens.tokenizer import end_of_turn_ids

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=end_of_turn_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def probe_world(model, tokenizer, world: World, *, people: int | None = None) -> dict:
    """Cloze accuracy over Known people and few-shot QA accuracy over Known people without Q/A text
    (``people``: only a fixed, evenly spaced subset of that many Known people)."""
    from itlens.probes import cloze_accuracy, fewshot_qa_accuracy

    cloze = world.records("cloze")
    qa = world.qa_probe_records()
    if people:
        known = [p for p in world.people if p["status"] == "known"]
        keep = _spread(known, people)
        keep_qa = _spread([p for p in known if not p["qa_in_corpus"]], people)
        cloze = [r for r in cloze if r["person"] in keep]
        qa = [r for r in qa if r["person"] in keep_qa]
    c = cloze_accuracy(model, tokenizer, world, cloze)
    q = fewshot_qa_accuracy(model, tokenizer, world, qa, world.frame_text())
    return {"cloze_acc": c["acc"], "qa_acc": q["acc"], "cloze": c, "qa": q}


def _spread(people: list[dict], n: int) -> set[str]:
    """Ids of ``n`` people evenly spaced over ``people`` taken role by role. A stride through the
    family-ordered list aliases with the families of four (mini: a stride of 2 probed only qa_it and
    heldout people, never qa_only or control ones)."""
    rank = {role: i for i, role in enumerate(KNOWN_ROLES)}
    order = sorted(people, key=lambda p: rank.get(p["role"], len(rank)))  # stable: family order within a role
    n = min(n, len(order))
    return {order[k * len(order) // n]["id"] for k in range(n)}


def _save_checkpoint(path: Path, state: dict) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_checkpoint(path: Path, device, run_hash: str, precision: str) -> tuple[dict | None, str]:
    """The checkpoint state when it continues this run, else None and why not. The run hash holds
    ``precision``/``device`` as written (``auto``); the checkpoint also records what they resolved to,
    since steps taken in bf16 then fp32 (or on cpu then cuda) give weights no uninterrupted run gives."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # damaged, another torch's
        return None, f"it cannot be read ({type(e).__name__})"
    if not isinstance(state, dict) or state.get("hash") != run_hash:
        return None, "it is from another config or world"
    if "precision" not in state or "device" not in state:
        return None, "it does not record the precision and device it trained in (an older itlens wrote it)"
    if (state["precision"], state["device"]) != (precision, device.type):
        return None, (f"it trained in {state['precision']} on {state['device']}, this run trains in {precision} "
                      f"on {device.type}")
    return state, ""


# ------------------------------------------------------------------------------------------ training
def pretrain(cfg: PretrainConfig, world_dir: str | Path, out_dir: str | Path, *, progress: bool | None = None,
             log=print) -> Path:
    """Pretrain the world's base model into ``out_dir`` (resuming from ``out_dir/checkpoint`` when it
    matches); returns ``out_dir``. A finished run with the same config and world is reused as is."""
    import torch
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from itlens.env_info import machine, versions
    from itlens.models import load_raw_tokenizer

    cfg.validate()
    if cfg.device == "cuda" and not torch.cuda.is_available():  # was a traceback at the first .to(device)
        raise InputError("cuda is not available on this machine (use auto or cpu)", key="device")
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    world = World.load(world_dir)
    run_hash = config_hash(cfg, world_fingerprint(world_dir), CODE_VERSION)
    summary_path = out_dir / "pretrain_summary.json"
    ckpt_path = out_dir / "checkpoint" / "state.pt"
    if summary_path.is_file():
        import json

        if json.loads(summary_path.read_text()).get("hash") == run_hash:
            log(f"pretrain: reusing the finished run in {out_dir}")
            shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
            return out_dir
        summary_path.unlink()

    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    precision = resolve_precision(cfg.precision, device.type)
    use_bf16 = precision == "bf16"
    tokenizer = load_raw_tokenizer(world_dir / "tokenizer")
    docs = world.records("corpus")
    doc_ids = [[tokenizer.bos_token_id] + ids
               for ids in tokenizer([d["text"] for d in docs], add_special_tokens=False)["input_ids"]]
    data = PackedCorpus(doc_ids, cfg.seq_len, cfg.seed)

    model = build_model(cfg, tokenizer).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, cfg.beta2))
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps,
                                                            min_lr_rate=cfg.min_lr_ratio)
    step, train_s, log_rows, resumed_from = 0, 0.0, [], 0
    loss_sum, loss_n = 0.0, 0  # the loss of the steps since the last log row (a checkpoint keeps them)
    if ckpt_path.is_file():
        state, why_not = _load_checkpoint(ckpt_path, device, run_hash, precision)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step, train_s, log_rows = state["step"], state["train_s"], state["log"]
            loss_sum, loss_n = state.get("loss_sum", 0.0), state.get("loss_n", 0)
            resumed_from = step
            log(f"pretrain: resuming from step {step} ({ckpt_path}; {precision} on {device.type})")
        else:
            log(f"pretrain: ignoring the checkpoint {ckpt_path}: {why_not} (precision: {cfg.precision}, device: "
                f"{cfg.device}); training from step 0")
    out_dir.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = cfg.batch_size * cfg.seq_len

    def checkpoint() -> None:
        _save_checkpoint(ckpt_path, {"hash": run_hash, "precision": precision, "device": device.type,
                                     "step": step, "train_s": train_s, "log": log_rows,
                                     "loss_sum": loss_sum, "loss_n": loss_n,
                                     "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                     "scheduler": scheduler.state_dict()})

    def probe_row() -> dict:
        res = probe_world(model, tokenizer, world, people=cfg.probe_people or None)
        return {"step": step, "cloze_acc": res["cloze_acc"], "qa_acc": res["qa_acc"],
                "train_s": round(train_s, 2)}

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    show = sys.stderr.isatty() if progress is None else progress
    bar = Progress(TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), disable=not show, transient=False)
    model.train()
    with bar:
        task = bar.add_task("pretrain", total=cfg.steps, completed=step, info="")
        while step < cfg.steps:
            t0 = time.perf_counter()
            x = data.batch(step, cfg.batch_size).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            train_s += time.perf_counter() - t0
            if step % cfg.log_every == 0 or step == cfg.steps:
                log_rows.append({"step": step, "loss": round(loss_sum / loss_n, 5),
                                 "lr": scheduler.get_last_lr()[0], "tokens": step * tokens_per_step,
                                 "train_s": round(train_s, 2)})
                bar.update(task, info=f"loss {loss_sum / loss_n:.3f}")
                loss_sum, loss_n = 0.0, 0
                atomic_write_jsonl(out_dir / "loss_log.jsonl", log_rows)  # rows after a checkpoint are redone
            if cfg.probe_every and step % cfg.probe_every == 0 and step < cfg.steps:
                log_rows.append(probe_row())
                bar.update(task, info=f"cloze {log_rows[-1]['cloze_acc']:.2f} qa {log_rows[-1]['qa_acc']:.2f}")
            if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.steps):
                checkpoint()  # the last one too: a kill in the final probe or save redoes no training
            bar.update(task, completed=step)

    final = probe_world(model, tokenizer, world)
    log_rows.append({"step": step, "cloze_acc": final["cloze_acc"], "qa_acc": final["qa_acc"],
                     "train_s": round(train_s, 2), "final": True})
    atomic_write_jsonl(out_dir / "loss_log.jsonl", log_rows)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    losses = [r["loss"] for r in log_rows if "loss" in r]
    summary = {
        "hash": run_hash, "world": str(world_dir), "world_fingerprint": world_fingerprint(world_dir),
        "config": to_dict(cfg), "params": n_params, "steps": step, "tokens_seen": step * tokens_per_step,
        "corpus_tokens_per_epoch": data.per_epoch * cfg.seq_len,
        "epochs": round(step * cfg.batch_size / data.per_epoch, 2),
        "precision": precision, "device": device.type, "threads": cfg.threads,
        "train_s": round(train_s, 2), "wall_s": round(time.perf_counter() - t_start, 2),
        "tokens_per_s": round(step * tokens_per_step / max(train_s, 1e-9), 1),
        "resumed_from_step": resumed_from, "final_loss": losses[-1] if losses else None,
        "knowledge": {"base": final}, "machine": machine(), "versions": versions(),
    }
    atomic_write_json(summary_path, summary)
    shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
    log(f"pretrain: {step} steps in {train_s:.0f}s train time; cloze {final['cloze_acc']:.3f}, "
        f"few-shot QA {final['qa_acc']:.3f} -> {out_dir}")
    return out_dir
