"""Instruction tuning: LoRA (LFT), full fine-tuning (SFT) and NEFTune, on TRL's ``SFTTrainer``.

This is the only module that touches TRL, so its API churn stays here. The data go in as
conversational prompt-completion pairs: TRL renders the prompt with the tokenizer's chat template
(exactly :func:`itlens.templates.chat_prompt`) and the completion as the assistant turn, including the
template's end-of-turn token, and puts the loss on the completion tokens only.

Defaults follow the paper (3 epochs, lr 5e-5, effective batch 32, LoRA rank 8). What the paper does
not state is taken from LLaMA-Factory (LoRA alpha 16, dropout 0, all linear layers) and the Alpaca
recipe (cosine schedule, 3 % warm-up, no weight decay); ``docs/tuning.md`` lists every assumption.

A run writes checkpoints to a work folder beside the output (``.NAME.work``) and moves the finished
model into place only at the end, so a killed run leaves no half-written model and resumes from its
last checkpoint when started again with the same config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Literal

from itlens.config import KEY_OMITS_DEFAULT, config_hash, key_dict, to_yaml
from itlens.errors import InputError
from itlens.io import atomic_dir, atomic_write_json, read_records, response_text, to_messages
from itlens.models import quiet_progress as _quiet_progress

METHODS = ("lora", "full", "neftune")


@dataclasses.dataclass
class LoraSettings:
    r: int = dataclasses.field(default=8, metadata={"help": "LoRA rank (paper: 8)."})
    alpha: int = dataclasses.field(default=16, metadata={
        "help": "LoRA alpha; scaling is alpha/r. Unstated in the paper: LLaMA-Factory's default 2*r."})
    dropout: float = dataclasses.field(default=0.0, metadata={
        "help": "Dropout on the LoRA input. Unstated in the paper: LLaMA-Factory's default 0."})
    target_modules: str | list[str] = dataclasses.field(default="all-linear", metadata={
        "help": "Modules to adapt: 'all-linear' (LLaMA-Factory's 'all'; every linear layer but the output "
                "head) or a list of module names such as [q_proj, v_proj]."})
    use_rslora: bool = dataclasses.field(default=False, metadata={"help": "Scale by alpha/sqrt(r) (rsLoRA)."})


@dataclasses.dataclass
class EqualFitSettings:
    enabled: bool = dataclasses.field(default=False, metadata={
        "help": "Train until the IT data is fit to `target` (checked at each epoch end), at most `max_epochs`, "
                "instead of a fixed number of epochs; so methods can be compared at matched memorisation."})
    metric: Literal["token_accuracy", "loss"] = dataclasses.field(default="token_accuracy", metadata={
        "help": "Fit measure, averaged over the epoch's logged steps: teacher-forced token accuracy on the "
                "response tokens (reached when >= target) or the training loss (reached when <= target)."})
    target: float = dataclasses.field(default=0.95, metadata={"help": "Fit level that ends training."})
    max_epochs: float = dataclasses.field(default=30.0, metadata={
        "help": "Cap on epochs; the learning-rate schedule spans the cap (use lr_scheduler=constant to make "
                "the stopping epoch independent of it)."})


@dataclasses.dataclass
class TuneConfig:
    """Everything that decides a tuned model; saved as ``tune_config.yaml`` beside it."""

    base: str = dataclasses.field(default="", metadata={
        "help": "Base model: a local HF model dir or a hub id already in the local HF cache."})
    data: str = dataclasses.field(default="", metadata={
        "help": "Instruction data: CONTRACT JSONL, a JSON list of such records, or a HF dataset id "
                "available offline (rows with instruction/input/response or messages)."})
    data_split: str = dataclasses.field(default="train", metadata={"help": "Split, for a HF dataset id."})
    output_dir: str = dataclasses.field(default="", metadata={"help": "Where the tuned model goes (--out)."})
    method: Literal["lora", "full", "neftune"] = dataclasses.field(default="lora", metadata={
        "help": "lora (LFT: PEFT LoRA), full (SFT: all parameters), neftune (full + NEFTune noise)."})
    epochs: float = dataclasses.field(default=3.0, metadata={"help": "Training epochs (paper: 3)."})
    learning_rate: float = dataclasses.field(default=5e-5, metadata={
        "help": "Peak learning rate (paper: 5e-5 for every method; on a tiny base LoRA needs ~10x the full "
                "fine-tuning rate, so the world configs set calibrated values)."})
    effective_batch_size: int = dataclasses.field(default=32, metadata={
        "help": "Examples per optimizer step over all processes (paper: 32); reached with gradient "
                "accumulation over per_device_batch_size."})
    per_device_batch_size: int = dataclasses.field(default=8, metadata={
        "help": "Most examples per forward pass on one process (what fits in memory); lowered to the largest "
                "divisor of effective_batch_size / processes so every optimizer step sees exactly "
                "effective_batch_size examples (train_summary.json records what was used)."})
    max_length: int = dataclasses.field(default=512, metadata={
        "help": "Max tokens of prompt + response; longer examples are truncated (counted, with a warning)."})
    lr_scheduler: str = dataclasses.field(default="cosine", metadata={
        "help": "transformers scheduler name (cosine, linear, constant, ...). Unstated in the paper: Alpaca's."})
    warmup: float = dataclasses.field(default=0.03, metadata={
        "help": "Warm-up: a fraction of the steps if < 1, else a number of steps (Alpaca: 0.03)."})
    weight_decay: float = dataclasses.field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = dataclasses.field(default=1.0, metadata={"help": "Gradient clipping norm."})
    max_steps: int = dataclasses.field(default=-1, metadata={
        "help": "Stop after this many optimizer steps (-1: run the epochs). For smoke tests and benchmarks."})
    seed: int = dataclasses.field(default=42, metadata={"help": "Seed for init, data order and noise."})
    bf16: bool = dataclasses.field(default=False, metadata={
        "help": "bf16 autocast (faster on CPUs with avx512_bf16 and on GPUs); fp32 otherwise."})
    gradient_checkpointing: bool = dataclasses.field(default=False, metadata={
        "help": "Recompute activations in the backward pass (saves memory on large models, costs ~30% time)."})
    torch_compile: bool = dataclasses.field(default=False, metadata={
        KEY_OMITS_DEFAULT: True,
        "help": "torch.compile the model (transformers' torch_compile): full fine-tuning of a 0.95B Llama went "
                "from 31% to 42% MFU on an H200 (40% on an H100). Pays a compile at the start and on new "
                "batch shapes."})
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings, metadata={"help": "LoRA settings."})
    merge_adapter: bool = dataclasses.field(default=False, metadata={
        "help": "LoRA: also save the adapter merged into the base (the output dir then holds the merged "
                "model; the adapter stays under adapter/). Recorded in train_summary.json."})
    neftune_alpha: float = dataclasses.field(default=5.0, metadata={
        "help": "NEFTune noise alpha (method neftune; the NEFTune paper's default 5). Training only."})
    equal_fit: EqualFitSettings = dataclasses.field(default_factory=EqualFitSettings, metadata={
        "help": "Train to a matched fit of the IT data instead of a fixed epoch count."})
    save_steps: int = dataclasses.field(default=0, metadata={
        "help": "Checkpoint every N optimizer steps for resuming (0: at every epoch end)."})
    resume: bool = dataclasses.field(default=True, metadata={
        "help": "Resume from the last checkpoint of an interrupted run with the same config."})
    keep_checkpoints: bool = dataclasses.field(default=False, metadata={
        "help": "Keep the work folder with checkpoints after a successful run."})
    num_threads: int = dataclasses.field(default=0, metadata={"help": "torch CPU threads (0: leave as is)."})
    progress: bool = dataclasses.field(default=True, metadata={"help": "Show a progress bar (loss, tokens/s)."})

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r} (expected one of {list(METHODS)})", key="method")
        for name in ("epochs", "learning_rate", "effective_batch_size", "per_device_batch_size", "max_length"):
            if getattr(self, name) <= 0:
                raise InputError("must be positive", key=name)
        if self.lora.r <= 0:
            raise InputError("must be positive", key="lora.r")
        if self.lora.alpha <= 0:  # scaling alpha/r of 0: the adapter's B never gets a gradient, nothing trains
            raise InputError("must be positive", key="lora.alpha")
        if isinstance(self.lora.target_modules, list) and not self.lora.target_modules:
            raise InputError("names no module (give 'all-linear' or module names such as [q_proj, v_proj])",
                             key="lora.target_modules")
        if self.method == "neftune" and self.neftune_alpha <= 0:  # alpha 0 adds no noise: plain full fine-tuning
            raise InputError("must be positive for method neftune (no noise would make it method full)",
                             key="neftune_alpha")
        if not 0 <= self.lora.dropout < 1:
            raise InputError(f"expected 0 <= dropout < 1, got {self.lora.dropout}", key="lora.dropout")
        for name in ("warmup", "weight_decay", "max_grad_norm", "save_steps", "num_threads", "neftune_alpha"):
            if getattr(self, name) < 0:
                raise InputError("must not be negative", key=name)
        if self.max_steps < -1 or self.max_steps == 0:  # transformers runs every epoch for max_steps 0
            raise InputError(f"expected -1 (run the epochs) or a positive number of steps, got {self.max_steps}",
                             key="max_steps")
        if self.equal_fit.max_epochs <= 0:
            raise InputError("must be positive", key="equal_fit.max_epochs")
        fit = self.equal_fit
        if fit.enabled and fit.metric == "token_accuracy" and not 0 < fit.target <= 1:
            raise InputError(f"a token accuracy target is in (0, 1], got {fit.target} (one above 1 is never "
                             "reached: every run would train max_epochs)", key="equal_fit.target")
        if fit.enabled and fit.metric == "loss" and fit.target <= 0:
            raise InputError(f"a loss target must be positive, got {fit.target} (the loss never reaches it: every "
                             "run would train max_epochs)", key="equal_fit.target")
        if self.lr_scheduler in COMMON_SCHEDULERS:
            return
        from transformers import SchedulerType  # ~2-10 s of imports (trainer utilities): only for a rarer name

        schedulers = [t.value for t in SchedulerType]
        if self.lr_scheduler not in schedulers:
            raise InputError(f"unknown scheduler {self.lr_scheduler!r} (expected one of {schedulers})",
                             key="lr_scheduler")


COMMON_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
"""Learning-rate schedules every supported transformers has (a test checks them against its SchedulerType): a
config naming one is validated without importing the trainer utilities, most of a cached study rerun's time."""


# ------------------------------------------------------------------------------------------- data
def load_instruction_records(source: str, split: str = "train") -> list[dict]:
    """CONTRACT instruction records from a JSONL/JSON file, a ``save_to_disk`` folder or an offline HF dataset
    id, validated. ``.json`` files and folders are read as ``itlens data convert`` reads them (a BOM, JSON Lines
    named ``.json``, NaN and lone surrogates: see :mod:`itlens.data`)."""
    from itlens.data import Where, _json_rows, _load_hub_dataset, _saved_dataset_rows
    from itlens.io import _validate_instruction

    path = Path(source)
    if path.suffix == ".jsonl" or (path.is_file() and path.suffix != ".json"):
        return read_records(path, "instruction")
    if path.suffix == ".json":
        if not path.is_file():
            raise InputError("is a folder, expected a JSON file" if path.is_dir() else "file not found", file=path)
        rows = list(_json_rows(path))
    elif path.is_dir():
        rows = list(_saved_dataset_rows(path, split))
    else:
        # as `data convert` loads it: the local HF cache first, the hub only when it answers (no retries)
        rows = [(Where(source, key=f"[{i}]"), dict(r)) for i, r in enumerate(_load_hub_dataset(source, split))]
    out = []
    seen: dict[str, Where] = {}
    for i, (at, row) in enumerate(rows):
        row = dict(row)
        row.setdefault("id", f"{path.stem if path.suffix or path.is_dir() else source}:{i}")
        rid = row["id"]
        if rid is None:
            raise at.error("missing required field", "id")
        if not isinstance(rid, str) or not rid:
            raise at.error(f"expected a non-empty string id, got {json.dumps(rid, default=str)[:40]}", "id")
        if rid in seen:
            first = seen[rid]
            raise at.error(f"duplicate id {rid!r} (first at "
                           f"{f'line {first.line}' if first.line is not None else first.key})", "id")
        seen[rid] = at
        try:
            _validate_instruction(row, Path(at.file), None)
        except InputError as e:
            e.line, e.key = at.line, at.key
            e.args = (e.format(),)
            raise
        out.append(row)
    if not out:
        raise InputError("dataset is empty (no records)", file=source)
    return out


def to_prompt_completion(records: list[dict]) -> list[dict]:
    """Records -> TRL conversational prompt-completion rows (loss on the completion only).

    Every assistant turn is trained, as open-instruct does: a record with k assistant turns gives k
    rows, each with the turns before it as the prompt and that turn as the completion, in record
    order (a single-turn record gives one row, as before). An assistant turn before any user turn
    (a conversation the assistant opens) answers no prompt and is not trained.
    """
    rows = []
    for r in records:
        if "messages" not in r:
            rows.append({"prompt": to_messages(r, with_response=False),
                         "completion": [{"role": "assistant", "content": response_text(r)}]})
            continue
        msgs = to_messages(r)
        asked = False
        for k, m in enumerate(msgs):
            asked = asked or m["role"] == "user"
            if m["role"] == "assistant" and asked:
                rows.append({"prompt": msgs[:k], "completion": [{"role": "assistant", "content": m["content"]}]})
    return rows


def example_lengths(tokenizer, rows: list[dict]) -> list[int]:
    """Tokens of each prompt-completion example, rendered with the chat template as the trainer sees it."""
    return [len(tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True,
                                              return_dict=True)["input_ids"]) for row in rows]


def count_overlong(tokenizer, rows: list[dict], max_length: int,
                   lengths: list[int] | None = None) -> tuple[int, int]:
    """(truncated, dropped): examples longer than max_length, and those whose prompt alone fills it.
    ``lengths``: :func:`example_lengths` of ``rows``, when already computed."""
    truncated = dropped = 0
    for row, n_full in zip(rows, lengths if lengths is not None else example_lengths(tokenizer, rows)):
        if n_full > max_length:
            truncated += 1
            n_prompt = len(tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True,
                                                         return_dict=True)["input_ids"])
            dropped += n_prompt >= max_length
    return truncated, dropped


# -------------------------------------------------------------------------------------- callbacks
def _callbacks_module():
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        """Appends one JSON line per logged step to ``train_log.jsonl`` and drives the progress bar."""

        def __init__(self, path: Path, progress: bool):
            self.path, self.progress, self.bar = path, progress, None
            self.t0 = time.perf_counter()
            self.tokens0 = None

        def on_train_begin(self, args, state, control, **kw):
            if not state.is_world_process_zero:
                return
            if self.path.exists():  # resuming: drop steps after the restored checkpoint
                keep = [ln for ln in self.path.read_text(encoding="utf-8").splitlines()
                        if ln.strip() and json.loads(ln)["step"] <= state.global_step]
                self.path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
            if self.progress:
                from tqdm import tqdm

                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="tune", unit="step",
                                file=sys.stderr, dynamic_ncols=True)

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            elapsed = time.perf_counter() - self.t0
            tokens = logs.get("num_tokens")
            if self.tokens0 is None and tokens is not None:
                self.tokens0 = (tokens, elapsed)
            rec = {"step": state.global_step, "epoch": round(float(state.epoch or 0), 4),
                   "loss": logs["loss"], "learning_rate": logs.get("learning_rate"),
                   "grad_norm": logs.get("grad_norm"), "num_tokens": tokens,
                   "token_accuracy": logs.get("mean_token_accuracy"), "elapsed_s": round(elapsed, 3)}
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)
                post = {"loss": f"{logs['loss']:.4f}"}
                if tokens is not None and elapsed > self.tokens0[1]:
                    post["tok/s"] = f"{(tokens - self.tokens0[0]) / (elapsed - self.tokens0[1]):.0f}"
                self.bar.set_postfix(post)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

    class EqualFit(TrainerCallback):
        """Stops training at the first epoch end where the epoch's mean fit measure reaches the target.

        The measure is read from ``state.log_history``, which every checkpoint carries, so a resumed run
        judges an epoch exactly as an uninterrupted one (see :func:`equal_fit_verdict`).
        """

        def __init__(self, settings: EqualFitSettings):
            self.s, self.reached_epoch, self.last = settings, None, None

        def _judge(self, state) -> bool:
            self.last, ok = equal_fit_verdict(self.s, state.log_history, state.epoch)
            if ok:
                self.reached_epoch = round(float(state.epoch), 4)
            return ok

        def on_train_begin(self, args, state, control, **kw):
            # resumed from the checkpoint of an epoch end (or of the last step): restore what was judged there
            if state.global_step > 0 and (float(state.epoch or 0).is_integer() or state.global_step >= state.max_steps):
                self._judge(state)

        def on_epoch_end(self, args, state, control, **kw):
            if self._judge(state):
                control.should_training_stop = True

    return StepLog, EqualFit


def equal_fit_verdict(settings: EqualFitSettings, log_history: list[dict], epoch) -> tuple[float | None, bool]:
    """(the mean fit measure of the epoch ending at ``epoch``, whether it reaches the target).

    The epoch's logged steps are those with ``ceil(epoch) - 1 < step epoch <= epoch`` (a last epoch cut
    short by max_steps counts its steps so far). (None, False) when the epoch logged no measure.
    """
    if epoch is None:
        return None, False
    key = "mean_token_accuracy" if settings.metric == "token_accuracy" else "loss"
    end = float(epoch)
    start = math.ceil(end) - 1
    values = [float(h[key]) for h in log_history if key in h and "epoch" in h and start < float(h["epoch"]) <= end]
    if not values:
        return None, False
    last = sum(values) / len(values)
    return last, (last >= settings.target if settings.metric == "token_accuracy" else last <= settings.target)


def _stopped_by_equal_fit(cfg: TuneConfig, checkpoint: str | None) -> int | None:
    """The global step of ``checkpoint`` when equal fit ended training there, else None."""
    if checkpoint is None or not cfg.equal_fit.enabled:
        return None
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    epoch = state.get("epoch")
    if epoch is None or not float(epoch).is_integer():
        return None
    return int(state["global_step"]) if equal_fit_verdict(cfg.equal_fit, state.get("log_history", []), epoch)[1] \
        else None


# ------------------------------------------------------------------------------------------ train
def batch_plan(cfg: TuneConfig, world_size: int) -> tuple[int, int]:
    """(examples per forward pass on one process, gradient accumulation steps) giving exactly
    ``effective_batch_size`` examples per optimizer step over ``world_size`` processes.

    ``per_device_batch_size`` is the most that fits; where it does not divide the per-process share it is
    lowered to the largest divisor that does (32 over 8 GPUs at 8 per device: 4 per device, no
    accumulation; rounding the accumulation up instead had made it 64, halving the optimizer steps).
    """
    if cfg.effective_batch_size % world_size:
        raise InputError(f"{cfg.effective_batch_size} examples per step cannot be split evenly over "
                         f"{world_size} processes: use a multiple of {world_size}", key="effective_batch_size")
    share = cfg.effective_batch_size // world_size
    per_device = max(d for d in range(1, min(cfg.per_device_batch_size, share) + 1) if share % d == 0)
    return per_device, share // per_device


def sft_config(cfg: TuneConfig, work_dir: Path, *, world_size: int = 1):
    """The TRL ``SFTConfig`` for ``cfg`` (also used by the benchmark's plain-TRL baseline)."""
    import torch
    from trl import SFTConfig

    epochs = cfg.equal_fit.max_epochs if cfg.equal_fit.enabled else cfg.epochs
    per_device, accumulation = batch_plan(cfg, world_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing -> activation_checkpointing
        return SFTConfig(
            output_dir=str(work_dir), num_train_epochs=epochs, max_steps=cfg.max_steps,
            learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup,
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
            per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
            max_length=cfg.max_length, completion_only_loss=True, packing=False,
            neftune_noise_alpha=cfg.neftune_alpha if cfg.method == "neftune" else None,
            seed=cfg.seed, data_seed=cfg.seed, bf16=cfg.bf16, use_cpu=not torch.cuda.is_available(),
            gradient_checkpointing=cfg.gradient_checkpointing, torch_compile=cfg.torch_compile,
            logging_steps=1, report_to="none", disable_tqdm=True,
            save_strategy="steps" if cfg.save_steps > 0 else "epoch", save_steps=max(cfg.save_steps, 1),
            save_total_limit=1, dataloader_num_workers=0, ddp_find_unused_parameters=False,
        )


def lora_config(cfg: TuneConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, use_rslora=cfg.lora.use_rslora,
                      bias="none", task_type="CAUSAL_LM")


def check_target_modules(model, targets: str | list[str]) -> None:
    """Every listed LoRA target must name a module of ``model``: peft adapts the names that match and
    silently skips a listed one that matches nothing, so a typo ([q_prj, v_proj]) would train v_proj only.
    A string other than 'all-linear' is a regex over full module names, as in peft."""
    import re

    names = [n for n, _ in model.named_modules() if n]
    if isinstance(targets, str):
        if targets != "all-linear" and not any(re.fullmatch(targets, n) for n in names):
            raise InputError(f"{targets!r} matches no module of the base model (give 'all-linear' or a list of "
                             "module names such as [q_proj, v_proj])", key="lora.target_modules")
        return
    unknown = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unknown:
        known = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if n and type(m).__name__ in ("Linear", "Conv1D")})
        raise InputError(f"no module of the base model is named {', '.join(map(repr, unknown))} "
                         f"(its linear layers: {', '.join(known)})", key="lora.target_modules")


def work_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.work"


def build_trainer(cfg: TuneConfig, work_dir: Path, *, records: list[dict] | None = None,
                  callbacks: list | None = None):
    """An ``SFTTrainer`` for ``cfg`` plus facts about the data: (trainer, tokenizer, info)."""
    import datasets
    import torch
    from transformers import PrinterCallback, set_seed
    from trl import SFTTrainer

    from itlens.models import is_adapter_dir, load_causal_lm, load_tokenizer, model_fingerprint, resolve_model

    base = resolve_model(cfg.base)
    if is_adapter_dir(base):
        raise InputError("the base must be a full model, not a LoRA adapter (merge it first)", file=base)
    records = records if records is not None else load_instruction_records(cfg.data, cfg.data_split)
    tokenizer = load_tokenizer(base)  # gets the project's chat template when the base has none
    rows = to_prompt_completion(records)  # one row per assistant turn
    if not rows:
        raise InputError("no assistant turn that answers a user turn; nothing to train on", file=cfg.data)
    lengths = example_lengths(tokenizer, rows)
    truncated, dropped = count_overlong(tokenizer, rows, cfg.max_length, lengths)
    if dropped == len(rows):
        raise InputError(f"every prompt is at least max_length={cfg.max_length} tokens long; nothing to train on",
                         file=cfg.data, key="max_length")
    if truncated:
        warnings.warn(f"{truncated} of {len(rows)} examples are longer than max_length={cfg.max_length} tokens "
                      f"and are truncated ({dropped} of them lose their whole response and are dropped)",
                      stacklevel=2)

    # the training arguments first, and kept alive: under DeepSpeed ZeRO-3 they are what makes
    # from_pretrained load the model partitioned (zero3_init_flag), not whole on every rank
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args = sft_config(cfg, work_dir, world_size=world_size)
    set_seed(cfg.seed)  # LoRA init happens inside SFTTrainer, before Trainer seeds
    with _quiet_progress():
        model = load_causal_lm(base, dtype=torch.float32)
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and 0 < positions < cfg.max_length:  # trained past the model's positions?
        past = sum(n > positions for n in lengths)
        if past:
            warnings.warn(f"{past} of {len(rows)} examples are longer than the model's max_position_embeddings "
                          f"({positions}) and max_length={cfg.max_length} keeps them: training runs past the "
                          f"positions the model was made for (lower max_length to {positions})", stacklevel=2)
    if cfg.method == "lora":
        check_target_modules(model, cfg.lora.target_modules)
    fingerprint = model_fingerprint(model)
    StepLog, EqualFit = _callbacks_module()
    step_log = StepLog(work_dir / "train_log.jsonl", cfg.progress)
    equal_fit = EqualFit(cfg.equal_fit) if cfg.equal_fit.enabled else None
    cbs = [step_log] + ([equal_fit] if equal_fit else []) + list(callbacks or [])
    with warnings.catch_warnings(), _quiet_progress():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=cbs,
                             peft_config=lora_config(cfg) if cfg.method == "lora" else None)
    trainer.remove_callback(PrinterCallback)  # StepLog reports instead of raw dicts on stdout
    info = {"base": base, "base_fingerprint": fingerprint, "records": len(records), "examples": len(rows),
            "truncated": truncated, "dropped": dropped, "world_size": world_size,
            "per_device_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "equal_fit": equal_fit}
    return trainer, tokenizer, info


def tune(cfg: TuneConfig, out_dir: str | Path | None = None, *, callbacks: list | None = None) -> Path:
    """Tune ``cfg.base`` on ``cfg.data`` with ``cfg.method``; returns the output dir.

    The output dir is a loadable model dir: a PEFT adapter (LoRA) or a full model (full, neftune, or
    LoRA with ``merge_adapter``), with the tokenizer and its chat template, ``tune_config.yaml``,
    ``train_log.jsonl``, ``train_summary.json`` and ``itlens_model.json`` (base fingerprint).
    """
    import torch

    from itlens.models import TUNE_META, is_adapter_dir, load_model, relative_base, resolve_model
    from itlens.tokenizer import end_of_turn_ids

    cfg.validate()
    if not cfg.base:
        raise InputError("a base model is required (--base)", key="base")
    if not cfg.data:
        raise InputError("instruction data are required (--data)", key="data")
    out = Path(out_dir or cfg.output_dir or "")
    if not str(out_dir or cfg.output_dir):
        raise InputError("an output dir is required (--out)", key="output_dir")
    cfg = dataclasses.replace(cfg, output_dir=str(out))
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)

    work = work_dir_for(out)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # every input is checked before the work folder is touched, so bad input leaves nothing behind
    base = resolve_model(cfg.base)
    if is_adapter_dir(base):
        raise InputError("the base must be a full model, not a LoRA adapter (merge it first)", file=base)
    records = load_instruction_records(cfg.data, cfg.data_split)
    try:
        sft_config(cfg, work, world_size=world_size)  # what transformers/TRL refuse (creates no folder)
    except ValueError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"training settings refused by transformers/TRL: {first[:300]}") from None
    key = config_hash({k: v for k, v in key_dict(cfg).items()
                       if k not in ("output_dir", "progress", "resume", "keep_checkpoints", "num_threads")})
    stamp = work / "config_hash"
    run_key = config_hash(key, _inputs_digest(cfg.data, base))  # same paths, other contents: not resumable
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main and work.exists() and (not cfg.resume or not stamp.is_file() or stamp.read_text() != run_key):
        shutil.rmtree(work)  # a different or unresumable run: start over
    _wait_for_all()
    work.mkdir(parents=True, exist_ok=True)
    if is_main:
        stamp.write_text(run_key)

    try:
        trainer, tokenizer, info = build_trainer(cfg, work, records=records, callbacks=callbacks)
    except BaseException:
        if is_main and not any(work.glob("checkpoint-*")):  # nothing to resume from: leave nothing behind
            shutil.rmtree(work, ignore_errors=True)
        raise
    last = _last_complete_checkpoint(work, remove_incomplete=is_main) if cfg.resume else None
    stopped_at = _stopped_by_equal_fit(cfg, last)
    if stopped_at is not None:  # killed after equal fit stopped the run: finish there, train no further
        trainer.args.max_steps = stopped_at
    tokens_before = _tokens_at(last)
    if tokens_before and hasattr(trainer, "_total_train_tokens"):
        # TRL counts tokens from 0 in every train() call: carry the checkpoint's count on, so the logged
        # num_tokens and the summary's tokens are the run's, as in an uninterrupted run
        trainer._total_train_tokens = tokens_before
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' own v6 renames, not ours to fix
        result = trainer.train(resume_from_checkpoint=last)
    wall = time.perf_counter() - t0
    eot = end_of_turn_ids(tokenizer)
    if cfg.method != "lora":
        trainer.model.generation_config.eos_token_id = eot  # plain HF generate stops at the end of turn
        trainer.model.generation_config.pad_token_id = tokenizer.pad_token_id
    final = work / "final"
    with _quiet_progress():
        trainer.save_model(str(final))  # on every process: gathers FSDP / ZeRO-3 shards, writes on the main one
    if not trainer.is_world_process_zero():
        return out
    if not _has_weights(final):
        # DeepSpeed ZeRO-3 without a 16-bit consolidated save writes a config and sharded optimizer states
        # (zero_to_fp32.py) but no loadable weights; such a folder must not become the tuned model
        raise InputError(f"training finished but {final} holds no model weights (under DeepSpeed ZeRO-3 set "
                         "zero3_save_16bit_model: true in the accelerate config, or "
                         "stage3_gather_16bit_weights_on_model_save in the DeepSpeed one; under FSDP "
                         "fsdp_state_dict_type: FULL_STATE_DICT) and run again: it resumes from the last checkpoint")

    history = [h for h in trainer.state.log_history if "loss" in h]
    tokens = trainer._total_train_tokens if hasattr(trainer, "_total_train_tokens") else None
    runtime = result.metrics.get("train_runtime", wall)
    mean_loss = result.metrics.get("train_loss")
    if last and history:  # transformers averages over the steps of this train() call only (0.0 if none were left)
        mean_loss = sum(float(h["loss"]) for h in history) / len(history)
    run_tokens = tokens - (tokens_before or 0) if tokens is not None else None  # what this call processed
    fit = info["equal_fit"]
    summary = {
        "method": cfg.method, "base": info["base"], "records": info["records"], "examples": info["examples"],
        "truncated": info["truncated"], "dropped": info["dropped"], "world_size": info["world_size"],
        "per_device_batch_size": info["per_device_batch_size"],
        "gradient_accumulation_steps": info["gradient_accumulation_steps"],
        "effective_batch_size": info["per_device_batch_size"] * info["gradient_accumulation_steps"] * info["world_size"],
        "steps": trainer.state.global_step, "epochs": round(float(trainer.state.epoch or 0), 4),
        "resumed_from_step": int(last.rsplit("-", 1)[1]) if last else None,
        "train_runtime_s": round(runtime, 3), "tokens": tokens,
        "tokens_per_s": round(run_tokens / runtime, 1) if run_tokens and runtime else None,
        "final_loss": history[-1]["loss"] if history else None,
        "final_token_accuracy": history[-1].get("mean_token_accuracy") if history else None,
        "mean_train_loss": mean_loss,
        "merged": bool(cfg.method == "lora" and cfg.merge_adapter),
        "neftune_alpha": cfg.neftune_alpha if cfg.method == "neftune" else None,
        "equal_fit": None if fit is None else {"metric": cfg.equal_fit.metric, "target": cfg.equal_fit.target,
                                               "reached": fit.reached_epoch is not None,
                                               "epochs": fit.reached_epoch, "last_epoch_value": fit.last},
    }
    with atomic_dir(out) as tmp, _quiet_progress():
        if cfg.method == "lora" and cfg.merge_adapter:
            shutil.copytree(final, tmp / "adapter", ignore=shutil.ignore_patterns("training_args.bin"))
            tokenizer.save_pretrained(tmp / "adapter")
            merged = load_model(final, merge=True).model  # a fresh fp32 base + adapter, merged on CPU
            merged.generation_config.eos_token_id = eot
            merged.generation_config.pad_token_id = tokenizer.pad_token_id
            merged.save_pretrained(tmp)
        else:
            shutil.copytree(final, tmp, dirs_exist_ok=True)
            (tmp / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "tune_config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
        log = work / "train_log.jsonl"
        if log.exists():
            shutil.copyfile(log, tmp / "train_log.jsonl")
        else:
            (tmp / "train_log.jsonl").touch()
        atomic_write_json(tmp / "train_summary.json", summary)
        meta = {"base": info["base"], "base_fingerprint": info["base_fingerprint"], "method": cfg.method,
                "merged": summary["merged"], "config_hash": key}
        local_base = Path(cfg.base).is_dir()  # base_relative: a moved folder (base beside it) still loads

        def meta_for(folder: Path) -> dict:
            return {**meta, **({"base_relative": relative_base(info["base"], folder)} if local_base else {})}

        atomic_write_json(tmp / TUNE_META, meta_for(out))
        if cfg.merge_adapter and cfg.method == "lora":
            atomic_write_json(tmp / "adapter" / TUNE_META, meta_for(out / "adapter"))
    if not cfg.keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _inputs_digest(data: str, base: str) -> dict:
    """What the resume stamp adds to the config: the data file's sha256 and the base's files (name, size,
    mtime), so a run whose data or base was rewritten in place starts over instead of resuming checkpoints
    trained on the old ones. A hub dataset or hub snapshot is named by the config (and its commit) already."""
    from itlens.transforms import sha256_file

    digest: dict[str, Any] = {"data": sha256_file(data) if Path(data).is_file() else None}
    if Path(base).is_dir():
        digest["base"] = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(base).iterdir()
                                if f.is_file())
    return digest


def _has_weights(folder: Path) -> bool:
    """Whether ``folder`` holds saved weights (safetensors or torch bins, a full model's or an adapter's)."""
    return any(f.is_file() and f.stat().st_size > 0 for pattern in ("*.safetensors", "*.bin")
               for f in folder.glob(pattern) if f.name != "training_args.bin")


def _tokens_at(checkpoint: str | None) -> int | None:
    """The training tokens counted up to ``checkpoint`` (the last ``num_tokens`` of its log), or None."""
    if checkpoint is None:
        return None
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    counts = [h["num_tokens"] for h in state.get("log_history", []) if h.get("num_tokens") is not None]
    return int(counts[-1]) if counts else None


def _last_complete_checkpoint(work: Path, *, remove_incomplete: bool) -> str | None:
    """The newest checkpoint written to the end, or None.

    transformers writes a checkpoint's ``trainer_state.json`` last; a run killed while writing one leaves a
    folder without it (or with it cut short), which ``get_last_checkpoint`` would pick, and every restart
    would then fail on it. Such folders are skipped (and removed by the main process)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    found = []
    for d in work.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = d.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if d.is_dir() and step.isdigit():
            found.append((int(step), d))
    for _, d in sorted(found, reverse=True):
        try:
            json.loads((d / "trainer_state.json").read_text(encoding="utf-8"))
            return str(d)
        except (OSError, ValueError):
            if remove_incomplete:
                shutil.rmtree(d, ignore_errors=True)
    return None


def _wait_for_all() -> None:
    """Barrier across processes under ``accelerate launch`` (no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def load_tune_config(path: str | Path | None = None, overrides: list[str] | None = None,
                     **fields: Any) -> TuneConfig:
    """A TuneConfig from YAML + ``--set`` overrides + explicit fields (CLI flags win)."""
    from itlens.config import load_config

    base = {k: v for k, v in fields.items() if v is not None}
    cfg = load_config(TuneConfig, path, overrides)
    return dataclasses.replace(cfg, **base) if base else cfg
