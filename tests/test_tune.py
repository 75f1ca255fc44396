"""Instruction tuning on tiny random Llamas through the real TRL/PEFT stack (issue 3 acceptance)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from itlens.config import load_config
from itlens.errors import InputError
from itlens.io import atomic_write_jsonl
from itlens.tune import EqualFitSettings, TuneConfig, build_trainer, tune, work_dir_for

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@pytest.fixture()
def it_file(it_records, tmp_path) -> Path:
    return atomic_write_jsonl(tmp_path / "it.jsonl", it_records)


def _cfg(base, data, **kw) -> TuneConfig:
    """A few steps at a high learning rate: enough to move a tiny model, seconds on a CPU."""
    defaults = dict(base=str(base), data=str(data), epochs=1, learning_rate=1e-2, effective_batch_size=8,
                    per_device_batch_size=4, max_length=256, warmup=0, progress=False)
    defaults.update(kw)
    return TuneConfig(**defaults)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    assert files, f"no weights in {model_dir}"
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def _logits(model, tokenizer, text="what is the city of the river?"):
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**ids).logits


def _base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_lora_adapter_loads_with_plain_peft_and_changes_outputs(tiny_model_dir, tiny_tokenizer, it_file, tmp_path):
    from peft import PeftModel

    out = tune(_cfg(tiny_model_dir, it_file, method="lora", max_steps=3), tmp_path / "lft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (8, 16, 0.0)
    adapted = {name.rsplit(".", 1)[-1] for name in cfg["target_modules"]}  # all-linear, resolved by peft
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not (out / "model.safetensors").exists()  # an adapter, not a full copy
    assert not work_dir_for(out).exists()  # checkpoints cleaned after success

    base = _base(tiny_model_dir)
    before = _logits(base, tiny_tokenizer)
    tuned = PeftModel.from_pretrained(_base(tiny_model_dir), str(out)).eval()
    assert not torch.allclose(before, _logits(tuned, tiny_tokenizer), atol=1e-4)

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["method"] == "lora" and summary["steps"] == 3 and summary["merged"] is False
    assert summary["tokens"] > 0 and summary["tokens_per_s"] > 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] > 0 for r in log)
    resolved = load_config(TuneConfig, out / "tune_config.yaml")  # the saved config loads strictly
    assert resolved.method == "lora" and resolved.output_dir == str(out)
    assert "<|assistant|>" in (out / "chat_template.jinja").read_text()  # template saved with the tokenizer


def test_lora_merge_is_recorded_and_matches_the_adapter(tiny_model_dir, tiny_tokenizer, it_file, tmp_path):
    from peft import PeftModel

    out = tune(_cfg(tiny_model_dir, it_file, method="lora", max_steps=2, merge_adapter=True), tmp_path / "m")
    assert json.loads((out / "train_summary.json").read_text())["merged"] is True
    merged = _base(out)
    unmerged = PeftModel.from_pretrained(_base(tiny_model_dir), str(out / "adapter")).eval()
    torch.testing.assert_close(_logits(merged, tiny_tokenizer), _logits(unmerged, tiny_tokenizer),
                               atol=1e-5, rtol=1e-5)


def test_full_finetuning_changes_the_weights(tiny_model_dir, it_file, tmp_path):
    out = tune(_cfg(tiny_model_dir, it_file, method="full", max_steps=2), tmp_path / "sft")
    before, after = _weights(tiny_model_dir), _weights(out)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)  # every tensor moved (all parameters are trained)
    from itlens.tokenizer import END

    from transformers import AutoTokenizer

    gen = json.loads((out / "generation_config.json").read_text())  # plain HF generate stops at the turn's end
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(END) in gen["eos_token_id"]


def test_neftune_changes_training_but_not_inference(tiny_model_dir, it_file, tmp_path):
    from transformers import TrainerCallback

    hooks_seen = []

    class WatchEmbeddingHooks(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            hooks_seen.append(len(model.get_input_embeddings()._forward_hooks))

    full = tune(_cfg(tiny_model_dir, it_file, method="full", max_steps=2), tmp_path / "sft")
    neft = tune(_cfg(tiny_model_dir, it_file, method="neftune", max_steps=2), tmp_path / "nft",
                callbacks=[WatchEmbeddingHooks()])
    assert hooks_seen and all(n >= 1 for n in hooks_seen)  # the noise hook is on while training
    a, b = _weights(full), _weights(neft)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # same seed and data: only the noise differs
    assert json.loads((neft / "train_summary.json").read_text())["neftune_alpha"] == 5.0

    model = _base(neft)
    assert len(model.get_input_embeddings()._forward_hooks) == 0
    ids = torch.arange(3, 20).unsqueeze(0)
    model.train()  # even in train mode nothing adds noise to the saved model
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_loss_is_on_response_tokens_only(tiny_model_dir, tiny_tokenizer, it_records, tmp_path):
    from itlens.templates import chat_prompt

    cfg = _cfg(tiny_model_dir, "unused.jsonl", method="full")
    trainer, tok, _ = build_trainer(cfg, tmp_path / "work", records=it_records[:4])
    example = trainer.train_dataset[0]
    prompt_ids = tok(chat_prompt(tok, it_records[0]), add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert example["input_ids"][:n] == prompt_ids
    assert example["labels"][:n] == [-100] * n  # prompt tokens carry no target
    assert example["labels"][n:] == example["input_ids"][n:]
    end = tok.convert_tokens_to_ids("<|end|>")
    assert example["labels"][-1] == end  # the model learns to close its turn

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model.eval()
    with torch.no_grad():
        trainer_loss = trainer.compute_loss(model, dict(batch)).item()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten().clamp(min=0),
                                                  reduction="none").view_as(targets)
    response = targets != -100
    assert trainer_loss == pytest.approx(per_token[response].mean().item(), rel=1e-4)
    # the same positions with the prompt's own next-token targets counted would give another loss
    with_prompt = batch["input_ids"][:, 1:]
    seq = batch["attention_mask"][:, 1:].bool()
    full_ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), with_prompt.flatten(),
                                                reduction="none").view_as(with_prompt)[seq].mean().item()
    assert abs(full_ce - trainer_loss) > 1e-3


def test_same_seed_gives_the_same_weights(tiny_model_dir, it_file, tmp_path):
    a = tune(_cfg(tiny_model_dir, it_file, method="lora", max_steps=2, seed=3), tmp_path / "a")
    b = tune(_cfg(tiny_model_dir, it_file, method="lora", max_steps=2, seed=3), tmp_path / "b")
    c = tune(_cfg(tiny_model_dir, it_file, method="lora", max_steps=2, seed=4), tmp_path / "c")
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tiny_model_dir, it_file, tmp_path):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyboardInterrupt  # as if the user pressed Ctrl-C after step 3

    cfg = _cfg(tiny_model_dir, it_file, method="full", max_steps=4, save_steps=2)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        tune(cfg, out, callbacks=[Crash()])
    assert not out.exists()  # no half-written model
    assert (work_dir_for(out) / "checkpoint-2").is_dir()

    tune(cfg, out)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # step 3 of the crashed run was dropped and redone

    straight = tune(cfg, tmp_path / "straight")
    wa, wb = _weights(out), _weights(straight)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kill_at", ["step 4", "train end"])
def test_a_resumed_run_reports_the_whole_runs_loss_and_tokens(tiny_model_dir, it_file, tmp_path, kill_at):
    """train_summary.json and train_log.jsonl of a resumed run count every step, not only those after the
    checkpoint: transformers' train_loss and TRL's token count restart at each train() call (a run killed
    after its last checkpoint, while the model was being saved, had mean_train_loss 0.0 and tokens 0)."""
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if kill_at == "step 4" and state.global_step == 4:
                raise KeyboardInterrupt

        def on_train_end(self, args, state, control, **kw):
            if kill_at == "train end":
                raise KeyboardInterrupt

    cfg = _cfg(tiny_model_dir, it_file, method="full", epochs=2)  # 3 steps an epoch, a checkpoint at each end
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        tune(cfg, out, callbacks=[Kill()])
    tune(cfg, out)
    straight = tune(cfg, tmp_path / "straight")
    a, b = (json.loads((d / "train_summary.json").read_text()) for d in (out, straight))
    assert a["resumed_from_step"] == (3 if kill_at == "step 4" else 6) and b["resumed_from_step"] is None
    assert a["steps"] == b["steps"] == 6
    assert a["tokens"] == b["tokens"] > 0
    assert a["mean_train_loss"] == pytest.approx(b["mean_train_loss"], rel=1e-5)
    logs = [[json.loads(line)["num_tokens"] for line in (d / "train_log.jsonl").read_text().splitlines()]
            for d in (out, straight)]
    assert logs[0] == logs[1]


def test_equal_fit_stops_once_the_data_is_fit(tiny_model_dir, it_file, tmp_path):
    reached = tune(_cfg(tiny_model_dir, it_file, method="full", lr_scheduler="constant",
                        equal_fit=EqualFitSettings(True, "loss", 100.0, 3)),
                   tmp_path / "fit")
    fit = json.loads((reached / "train_summary.json").read_text())
    assert fit["equal_fit"]["reached"] is True and fit["equal_fit"]["epochs"] == 1.0 and fit["steps"] == 3
    capped = tune(_cfg(tiny_model_dir, it_file, method="full", lr_scheduler="constant",
                       equal_fit=EqualFitSettings(True, "token_accuracy", 1.0, 2)),
                  tmp_path / "cap")
    cap = json.loads((capped / "train_summary.json").read_text())
    assert cap["equal_fit"]["reached"] is False and cap["epochs"] == 2.0


def test_conversational_records_train(tiny_model_dir, tmp_path):
    rows = [{"id": f"m:{i}", "messages": [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": f"what is {i}?"},
                                         {"role": "assistant", "content": f"it is {i}."}]} for i in range(8)]
    out = tune(_cfg(tiny_model_dir, atomic_write_jsonl(tmp_path / "m.jsonl", rows), method="full", max_steps=1),
               tmp_path / "o")
    assert json.loads((out / "train_summary.json").read_text())["examples"] == 8


# ----------------------------------------------------------------------------------------- bad input
def test_empty_dataset_and_rows_without_a_response_are_input_errors(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match="empty"):
        tune(_cfg(tiny_model_dir, empty), tmp_path / "o")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "instruction": "hi", "response": "yo"}\n{"id": "b", "instruction": "hi"}\n')
    with pytest.raises(InputError) as e:
        tune(_cfg(tiny_model_dir, bad), tmp_path / "o")
    assert "bad.jsonl:2" in str(e.value) and "response" in str(e.value)
    assert not (tmp_path / "o").exists()


def test_unknown_method_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="method"):
        load_config(TuneConfig, overrides=["method=qlora"])


def test_overlong_responses_are_truncated_with_a_counted_warning(tiny_model_dir, it_file, tmp_path):
    with pytest.warns(UserWarning, match=r"\d+ of 24 examples are longer than max_length=40"):
        out = tune(_cfg(tiny_model_dir, it_file, method="full", max_steps=1, max_length=40), tmp_path / "o")
    summary = json.loads((out / "train_summary.json").read_text())
    assert 0 < summary["truncated"] <= 24


def test_an_adapter_made_for_another_base_is_refused(tiny_model_dir, tiny_model_dir_b, tiny_tokenizer, it_file,
                                                     tmp_path):
    from itlens.models import attach_adapter, load_model
    from conftest import make_tiny_llama

    out = tune(_cfg(tiny_model_dir, it_file, method="lora", max_steps=1), tmp_path / "lft")
    assert load_model(out).adapter == str(out)  # its own base: fine (base read from adapter_config.json)
    with pytest.raises(InputError, match="another base"):
        attach_adapter(_base(tiny_model_dir_b), out)  # same shapes, different weights
    wider = make_tiny_llama(tiny_tokenizer, tmp_path / "wide", hidden=48)
    (out / "itlens_model.json").unlink()  # without our record, peft's shape check still catches it
    with pytest.raises(InputError, match="does not fit"):
        attach_adapter(_base(wider), out)


def test_cli_tune_writes_a_model_and_maps_bad_input_to_exit_2(tiny_model_dir, it_file, tmp_path, capsys):
    from itlens.cli import main

    common = ["tune", "--base", str(tiny_model_dir), "--data", str(it_file)]
    main(common + ["--method", "full", "--out", str(tmp_path / "o"), "--set", "max_steps=1",
                   "--set", "progress=false", "--set", "per_device_batch_size=4"])
    assert (tmp_path / "o" / "model.safetensors").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(common + ["--method", "dpo", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().count("\n") == 0 and "method" in err
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_two_process_ddp_trains(tiny_model_dir, it_file, tmp_path):
    """DDP across two CPU processes via accelerate launch: same loss as one process, world size 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--base", str(tiny_model_dir), "--data", str(it_file), "--method", "full",
              "--set", "max_steps=2", "--set", "per_device_batch_size=2", "--set", "effective_batch_size=8",
              "--set", "progress=false", "--set", "learning_rate=1e-2", "--set", "warmup=0",
              "--set", "max_length=256"]
    accelerate = Path(sys.executable).with_name("accelerate")
    ddp = subprocess.run([str(accelerate), "launch", "--config_file",
                          str(REPO / "configs/accelerate/cpu_ddp_2proc.yaml"), "--main_process_port", "29541",
                          "-m", "itlens.cli", "tune", "--out", str(tmp_path / "ddp"), *common],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    two = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert two["world_size"] == 2 and two["gradient_accumulation_steps"] == 2 and two["steps"] == 2
    one = json.loads((tune(_cfg(tiny_model_dir, it_file, method="full", max_steps=2, per_device_batch_size=2),
                           tmp_path / "one") / "train_summary.json").read_text())
    assert one["world_size"] == 1 and one["gradient_accumulation_steps"] == 4
    # 2 processes x 2 accumulation steps x 2 examples == 1 x 4 x 2: the same batches, the same mean loss
    assert two["mean_train_loss"] == pytest.approx(one["mean_train_loss"], rel=1e-4)


def test_torch_compile_reaches_the_trainer_and_keys_only_when_set(tiny_model_dir, tmp_path):
    """``torch_compile`` is passed to TRL; left at its default it stays out of cache keys, so runs made
    before the option existed keep their keys."""
    from itlens.config import key_dict
    from itlens.tune import sft_config

    plain, compiled = _cfg(tiny_model_dir, "unused.jsonl"), _cfg(tiny_model_dir, "unused.jsonl", torch_compile=True)
    assert sft_config(compiled, tmp_path / "w").torch_compile is True
    assert sft_config(plain, tmp_path / "w").torch_compile is False
    assert "torch_compile" not in key_dict(plain) and key_dict(compiled)["torch_compile"] is True


def test_examples_past_the_models_positions_are_warned_about(tiny_tokenizer, it_file, tmp_path):
    """max_length above max_position_embeddings trains past the positions the model was made for: say so."""
    import warnings

    from conftest import make_tiny_llama

    short = make_tiny_llama(tiny_tokenizer, tmp_path / "short", max_positions=32)
    with pytest.warns(UserWarning, match=r"\d+ of 24 examples are longer than the model's max_position_embeddings "
                                         r"\(32\) and max_length=64 keeps them"):
        tune(_cfg(short, it_file, method="lora", max_steps=1, max_length=64), tmp_path / "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tune(_cfg(short, it_file, method="lora", max_steps=1, max_length=32), tmp_path / "b")
    assert not [w for w in caught if "max_position_embeddings" in str(w.message)]
    assert [w for w in caught if "longer than max_length=32" in str(w.message)]  # truncated to fit instead


# --------------------------------------------------------------------------------- review regressions
def test_an_adapter_loads_on_its_base_in_float16(tiny_model_dir, tiny_model_dir_b, it_file, tmp_path):
    """The base fingerprint does not depend on the load dtype: float32 -> float16 -> bf16 rounds differently
    from float32 -> bf16, so it is read from the checkpoint; an adapter is still refused on another base."""
    import hashlib

    from itlens.models import load_model

    out = tune(_cfg(tiny_model_dir, it_file, method="lora", max_steps=1), tmp_path / "lft")
    for dtype in ("float32", "bfloat16", "float16"):
        assert load_model(tiny_model_dir, adapter=out, dtype=dtype).adapter == str(out)
    with pytest.raises(InputError, match="another base"):
        load_model(tiny_model_dir_b, adapter=out, dtype="float16")
    # what earlier versions recorded (bf16 of the float32 embeddings) is what is checked now
    emb = _base(tiny_model_dir).get_input_embeddings().weight.detach().to(torch.bfloat16).contiguous()
    old = hashlib.sha256(emb.view(torch.int16).numpy().tobytes())
    old.update(json.dumps(list(emb.shape)).encode())
    assert json.loads((out / "itlens_model.json").read_text())["base_fingerprint"] == old.hexdigest()[:16]


def test_an_equal_fit_stop_survives_a_kill_after_its_checkpoint(tiny_model_dir, it_file, tmp_path):
    """Killed after the checkpoint where equal fit stopped, a resumed run stops there too (not max_epochs)."""
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_train_end(self, args, state, control, **kw):
            raise KeyboardInterrupt  # after the last checkpoint, before the model is moved into place

    cfg = _cfg(tiny_model_dir, it_file, method="full", lr_scheduler="constant",
               equal_fit=EqualFitSettings(True, "loss", 100.0, 3))
    out = tmp_path / "fit"
    with pytest.raises(KeyboardInterrupt):
        tune(cfg, out, callbacks=[Crash()])
    assert (work_dir_for(out) / "checkpoint-3").is_dir() and not out.exists()
    summary = json.loads((tune(cfg, out) / "train_summary.json").read_text())
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 3 and summary["epochs"] == 1.0
    assert summary["equal_fit"]["reached"] is True and summary["equal_fit"]["epochs"] == 1.0
    assert summary["equal_fit"]["last_epoch_value"] is not None


def test_bad_settings_are_input_errors_and_leave_no_work_folder(tiny_model_dir, it_file, tmp_path):
    with pytest.raises(InputError, match="lr_scheduler"):
        load_config(TuneConfig, overrides=["lr_scheduler=cosin"])
    with pytest.raises(InputError, match="lr_scheduler"):
        tune(_cfg(tiny_model_dir, it_file, lr_scheduler="cosin"), tmp_path / "o")
    with pytest.raises(InputError, match="warmup"):
        load_config(TuneConfig, overrides=["warmup=-1"])
    assert not work_dir_for(tmp_path / "o").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("overrides, key", [
    (["lora.alpha=0"], "lora.alpha"),  # scaling 0: LoRA's B gets no gradient, the run trains nothing
    (["lora.target_modules=[]"], "lora.target_modules"),
    (["method=neftune", "neftune_alpha=0"], "neftune_alpha"),  # no noise: method full under another name
    (["max_steps=0"], "max_steps"),  # transformers would run every epoch
    (["equal_fit.enabled=true", "equal_fit.target=95"], "equal_fit.target"),  # an accuracy never reached
    (["equal_fit.enabled=true", "equal_fit.metric=loss", "equal_fit.target=0"], "equal_fit.target"),
])
def test_settings_that_would_silently_change_the_run_are_input_errors(overrides, key):
    with pytest.raises(InputError) as e:
        load_config(TuneConfig, overrides=overrides)
    assert e.value.key == key or key in str(e.value)


def test_a_save_without_weights_is_not_made_the_tuned_model(tiny_model_dir, it_file, tmp_path, monkeypatch):
    """DeepSpeed ZeRO-3 without its 16-bit consolidated save has save_model write a config and no weights
    (transformers removes the dummy model.safetensors): that folder must not become a 'finished' output."""
    from trl import SFTTrainer

    def save_like_zero3_without_gather(self, output_dir=None, _internal_call=False):
        self.model.config.save_pretrained(output_dir)  # what is left after remove_dummy_checkpoint

    monkeypatch.setattr(SFTTrainer, "save_model", save_like_zero3_without_gather)
    out = tmp_path / "o"
    with pytest.raises(InputError, match="no model weights.*zero3_save_16bit_model"):
        tune(_cfg(tiny_model_dir, it_file, method="full", max_steps=1), out)
    assert not out.exists()
    assert any(work_dir_for(out).glob("checkpoint-*"))  # kept: a rerun with the fixed config resumes


def test_bad_input_leaves_no_work_folder(tiny_model_dir, it_file, tmp_path):
    out = tmp_path / "o"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "instruction": "hi", "response": ""}) + "\n")
    for data in (tmp_path / "missing.jsonl", bad):
        with pytest.raises(InputError):
            tune(_cfg(tiny_model_dir, data, method="full"), out)
        assert not work_dir_for(out).exists()
    with pytest.raises(InputError, match="base"):
        tune(_cfg(tmp_path / "no-base", it_file, method="full"), out)
    with pytest.raises(InputError, match="max_length"):  # found only once the data are tokenized
        tune(_cfg(tiny_model_dir, it_file, method="full", max_length=4), out)
    assert not work_dir_for(out).exists() and not out.exists()


def test_json_list_errors_name_the_position_and_ids_are_checked(tmp_path):
    from itlens.tune import load_instruction_records

    p = tmp_path / "it.json"
    rows = [{"id": f"x:{i}", "instruction": "q", "response": "a"} for i in range(3)]
    rows[2]["response"] = ""
    p.write_text(json.dumps(rows, indent=2))
    with pytest.raises(InputError) as e:
        load_instruction_records(str(p))
    assert str(e.value) == f"{p}: key '[2]': field 'response': must not be empty"
    p.write_text(json.dumps([{"id": 5, "instruction": "q", "response": "a"}]))
    with pytest.raises(InputError, match=r"key '\[0\]': field 'id': expected a non-empty string id"):
        load_instruction_records(str(p))
    p.write_text(json.dumps([{"id": "a", "instruction": "q", "response": "a"},
                             {"id": "a", "instruction": "q", "response": "b"}]))
    with pytest.raises(InputError, match=r"key '\[1\]': field 'id': duplicate id 'a'"):
        load_instruction_records(str(p))
    p.write_text(json.dumps([{"instruction": "q", "response": "a"}, {"instruction": "r", "response": "b"}]))
    assert [r["id"] for r in load_instruction_records(str(p))] == ["it:0", "it:1"]  # ids made up when absent


def test_tune_reads_json_and_saved_datasets_as_data_convert_does(tmp_path):
    """`itlens tune --data x.json` had a loader of its own: a BOM (Windows editors), JSON Lines named .json (hub
    exports, pandas lines=True) and a save_to_disk folder were refused, and NaN passed."""
    import datasets

    from itlens.tune import load_instruction_records

    rows = [{"id": f"x:{i}", "instruction": f"q{i}", "response": f"a{i}"} for i in range(3)]
    bom = tmp_path / "bom.json"
    bom.write_text("\ufeff" + json.dumps(rows), encoding="utf-8")
    assert load_instruction_records(str(bom)) == rows
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_instruction_records(str(lines)) == rows
    lines.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "response": ""}) + "\n")
    with pytest.raises(InputError) as e:
        load_instruction_records(str(lines))
    assert str(e.value) == f"{lines}:2: field 'response': must not be empty"
    nan = tmp_path / "nan.json"
    nan.write_text('[{"id": "a", "instruction": "q", "response": "r", "score": NaN}]')
    with pytest.raises(InputError, match="NaN is not a JSON value"):
        load_instruction_records(str(nan))
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(saved))
    assert load_instruction_records(str(saved)) == rows
    with pytest.raises(InputError, match="has no split 'test'"):
        load_instruction_records(str(saved), split="test")


def test_an_adapter_tuned_on_a_relative_base_loads_from_anywhere_and_after_its_folder_moves(
        tiny_model_dir, tiny_model_dir_b, it_records, tmp_path, monkeypatch):
    """`itlens tune --base base` (a path relative to the working folder) records an absolute base, and
    itlens_model.json the base relative to the adapter, so a study folder moved as a whole still loads;
    the base found that way is still checked by its fingerprint."""
    import shutil

    from itlens.models import load_model

    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copytree(tiny_model_dir, proj / "base")
    atomic_write_jsonl(proj / "it.jsonl", it_records[:8])
    monkeypatch.chdir(proj)
    out = tune(_cfg("base", "it.jsonl", method="lora", max_steps=1, effective_batch_size=4), "lft")
    cfg = json.loads((proj / "lft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((proj / "base").resolve())
    assert json.loads((proj / "lft" / "itlens_model.json").read_text())["base_relative"] == "../base"
    monkeypatch.chdir(tmp_path)  # `itlens generate --model proj/lft` from elsewhere
    assert load_model(proj / out).adapter is not None
    moved = tmp_path / "elsewhere" / "proj"
    shutil.move(str(proj), str(moved))  # the recorded absolute base is gone now
    lm = load_model(moved / "lft")
    assert lm.path == str((moved / "base").resolve()) and lm.name == "lft"
    shutil.rmtree(moved / "base")
    shutil.copytree(tiny_model_dir_b, moved / "base")  # another base in its place: refused
    with pytest.raises(InputError, match="another base"):
        load_model(moved / "lft")
    shutil.rmtree(moved / "base")
    with pytest.raises(InputError, match="base model .* is not found"):
        load_model(moved / "lft")


def test_every_assistant_turn_of_a_multi_turn_record_is_trained(tiny_model_dir, it_records, tmp_path):
    from itlens.tune import to_prompt_completion

    rec = {"id": "tulu:1", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is the city"}, {"role": "assistant", "content": "the river is blue."},
        {"role": "user", "content": "and the mountain"}, {"role": "assistant", "content": "north of the city."}]}
    rows = to_prompt_completion([rec])
    assert [r["prompt"] for r in rows] == [rec["messages"][:2], rec["messages"][:4]]
    assert [r["completion"] for r in rows] == [[rec["messages"][2]], [rec["messages"][4]]]
    # single-turn records give exactly the rows they always gave
    single = it_records[:2] + [{"id": "m", "messages": rec["messages"][:3]}]
    assert to_prompt_completion(single) == [
        {"prompt": [{"role": "user", "content": r["instruction"]}],
         "completion": [{"role": "assistant", "content": r["response"]}]} for r in it_records[:2]] + [
        {"prompt": rec["messages"][:2], "completion": [rec["messages"][2]]}]

    trainer, tok, info = build_trainer(_cfg(tiny_model_dir, "unused", method="full", max_steps=1,
                                            effective_batch_size=1, per_device_batch_size=1),
                                       tmp_path / "work", records=[rec])
    assert info["records"] == 1 and info["examples"] == 2 and len(trainer.train_dataset) == 2
    trained = [tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100])
               for ex in trainer.train_dataset]
    assert trained == ["the river is blue.<|end|>", "north of the city.<|end|>"]


@pytest.mark.parametrize("effective, per_device, world, plan", [
    (32, 8, 1, (8, 4)), (32, 8, 8, (4, 1)), (32, 8, 2, (8, 2)), (4, 8, 1, (4, 1)), (24, 16, 1, (12, 2)),
    (32, 8, 3, None)])
def test_every_optimizer_step_sees_exactly_the_effective_batch(effective, per_device, world, plan, monkeypatch):
    """Over 8 GPUs at 8 per device the accumulation used to round up to 1 and make the batch 64 (and 48
    on 3 GPUs): the per-device batch is lowered instead, and a batch that cannot be split is refused."""
    from itlens.tune import batch_plan, sft_config

    cfg = TuneConfig(base="b", data="d", effective_batch_size=effective, per_device_batch_size=per_device)
    if plan is None:
        with pytest.raises(InputError, match="effective_batch_size"):
            batch_plan(cfg, world)
        return
    assert batch_plan(cfg, world) == plan
    assert plan[0] * plan[1] * world == effective
    args = sft_config(cfg, Path("unused"), world_size=world)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == plan


def test_the_training_arguments_exist_before_the_model_is_loaded(tiny_model_dir, it_file, tmp_path, monkeypatch):
    """Under DeepSpeed ZeRO-3 the live training arguments make from_pretrained load the model partitioned;
    built after the load, every rank held the whole fp32 model first."""
    import transformers

    from itlens import tune as tune_mod

    order = []
    real_cfg, real_load = tune_mod.sft_config, transformers.AutoModelForCausalLM.from_pretrained

    def cfg_spy(*a, **k):
        order.append("args")
        return real_cfg(*a, **k)

    def load_spy(*a, **k):
        order.append("model")
        return real_load(*a, **k)

    monkeypatch.setattr(tune_mod, "sft_config", cfg_spy)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load_spy)
    trainer, _, info = tune_mod.build_trainer(_cfg(tiny_model_dir, it_file, method="full"), tmp_path / "w")
    assert order[:2] == ["args", "model"] and trainer.args is not None
    assert info["per_device_batch_size"] == 4 and info["gradient_accumulation_steps"] == 2


def test_a_checkpoint_cut_short_by_a_kill_is_skipped_on_resume(tiny_model_dir, it_file, tmp_path, monkeypatch):
    """Killed while writing checkpoint-4 (before its trainer_state.json): the restart resumes from
    checkpoint-2; it had picked the cut-short folder and failed on it at every restart."""
    from transformers import Trainer

    real = Trainer._save_rng_state

    def killed_at_4(self, output_dir):
        if self.state.global_step == 4:
            raise KeyboardInterrupt
        return real(self, output_dir)

    cfg = _cfg(tiny_model_dir, it_file, method="full", max_steps=4, save_steps=2)
    out = tmp_path / "run"
    monkeypatch.setattr(Trainer, "_save_rng_state", killed_at_4)
    with pytest.raises(KeyboardInterrupt):
        tune(cfg, out)
    assert (work_dir_for(out) / "checkpoint-4").is_dir()
    monkeypatch.setattr(Trainer, "_save_rng_state", real)
    tune(cfg, out)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4


def test_data_rewritten_in_place_starts_over_instead_of_resuming(tiny_model_dir, it_records, it_file, tmp_path):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyboardInterrupt

    cfg = _cfg(tiny_model_dir, it_file, method="full", max_steps=4, save_steps=2)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        tune(cfg, out, callbacks=[Crash()])
    atomic_write_jsonl(it_file, [dict(r, response="Sure. " + r["response"]) for r in it_records])
    tune(cfg, out)  # same config, other data: checkpoint-2 was trained on the old data
    assert json.loads((out / "train_summary.json").read_text())["resumed_from_step"] is None


@pytest.mark.parametrize("targets,needle", [(["q_prj", "v_proj"], "'q_prj'"), ("q_proj", "'q_proj' matches no")])
def test_lora_targets_that_name_no_module_are_input_errors(tiny_model_dir, it_records, tmp_path, targets, needle):
    """peft skipped a listed name that matched nothing: [q_prj, v_proj] trained v_proj alone, silently."""
    from itlens.tune import LoraSettings

    cfg = _cfg(tiny_model_dir, "unused.jsonl", method="lora", lora=LoraSettings(target_modules=targets))
    with pytest.raises(InputError, match=needle) as e:
        build_trainer(cfg, tmp_path / "work", records=it_records[:4])
    assert "lora.target_modules" in str(e.value)
    ok = _cfg(tiny_model_dir, "unused.jsonl", method="lora", lora=LoraSettings(target_modules=["q_proj"]))
    trainer, _, _ = build_trainer(ok, tmp_path / "work2", records=it_records[:4])
    adapted = {n.rsplit(".", 2)[-2] for n, _ in trainer.model.named_modules() if n.endswith(".lora_A")}
    assert adapted == {"q_proj"}


def test_common_schedulers_are_transformers_own_and_need_not_import_its_trainer(tmp_path):
    """The names validated without importing transformers' trainer utilities (most of a cached study rerun's time)
    are all real SchedulerType values; a rarer real one is still accepted, a typo still refused."""
    import subprocess
    import sys

    from transformers import SchedulerType

    from itlens.tune import COMMON_SCHEDULERS

    assert set(COMMON_SCHEDULERS) <= {t.value for t in SchedulerType}
    load_config(TuneConfig, overrides=["lr_scheduler=warmup_stable_decay"]).validate()
    code = ("import sys; from itlens.config import load_config; from itlens.tune import TuneConfig; "
            "load_config(TuneConfig, overrides=['lr_scheduler=cosine']).validate(); "
            "print('transformers.trainer_utils' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_tune_data_from_an_uncached_hub_id_fails_in_seconds_like_data_convert(tmp_path):
    """`tune --data org/name` had a hub loader of its own: without a hub it retried for half a minute and said
    only the exception's type. It loads as `data convert` does (the local cache first, the hub only if it answers)."""
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:  # a port nothing listens on: the hub is unreachable at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"))
    code = "from itlens.tune import load_instruction_records as f; f('myorg/nothing')"
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and time.perf_counter() - start < 15
    last = r.stderr.strip().splitlines()[-1]
    assert "not in the local HF cache" in last and "is unreachable" in last, r.stderr[-2000:]
