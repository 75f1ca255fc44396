"""Pretraining the world's base model (tiny sizes): saves a plain HF model, deterministic, resumable;
and the teacher-forced probes agree with greedy decoding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from itlens.pretrain import PretrainConfig, load_pretrain_config, pretrain
from itlens.world import World, WorldConfig, build_world

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, batch_size=4, seq_len=64,
            warmup_steps=2, threads=1, log_every=2, probe_every=4, probe_people=4, save_every=4)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    cfg = WorldConfig(n_families=3, n_unknown_pairs=1, n_bios=2, n_chatter=5, company_docs_per_employer=1,
                      it_size=10, tokenizer_vocab_size=400)
    return build_world(cfg, tmp_path_factory.mktemp("pw") / "world")


@pytest.fixture(scope="module")
def base_dir(world_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pb") / "base"
    return pretrain(PretrainConfig(steps=8, **TINY), world_dir, out, log=lambda s: None)


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_pretrain_saves_a_plain_hf_model_with_logs_and_probes(base_dir, world_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    assert model.config.model_type == "llama" and model.config.hidden_size == 32
    assert tok.convert_tokens_to_ids("<|end|>") in model.generation_config.eos_token_id
    assert tok.chat_template and "<|assistant|>" in tok.chat_template
    out = model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] >= 2
    summary = json.loads((base_dir / "pretrain_summary.json").read_text())
    base = summary["knowledge"]["base"]
    assert 0 <= base["cloze_acc"] <= 1 and 0 <= base["qa_acc"] <= 1
    assert base["cloze"]["n"] == 3 * 4 * 5 and base["qa"]["n"] == 3 * 2 * 5
    assert set(base["cloze"]["by_group"]) == {"qa_it", "qa_only", "heldout", "control"}
    assert summary["steps"] == 8 and summary["tokens_seen"] == 8 * 4 * 64 and summary["tokens_per_s"] > 0
    rows = [json.loads(x) for x in (base_dir / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6, 8]
    assert [r["step"] for r in rows if "cloze_acc" in r] == [4, 8]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    assert not (base_dir / "checkpoint").exists()


def test_pretraining_lowers_the_loss_and_is_deterministic(world_dir, base_dir, tmp_path):
    again = pretrain(PretrainConfig(steps=8, **TINY), world_dir, tmp_path / "again", log=lambda s: None)
    a, b = _weights(base_dir), _weights(again)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    other = pretrain(PretrainConfig(steps=8, **{**TINY, "seed": 1}), world_dir, tmp_path / "other", log=lambda s: None)
    assert any((a[k] != _weights(other)[k]).any() for k in a)
    losses = [json.loads(x)["loss"] for x in (base_dir / "loss_log.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses[-1] < losses[0]


def test_a_finished_run_is_reused(world_dir, base_dir):
    before = (base_dir / "model.safetensors").stat().st_mtime_ns
    msgs = []
    pretrain(PretrainConfig(steps=8, **TINY), world_dir, base_dir, log=msgs.append)
    assert "reusing" in msgs[0] and (base_dir / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_to_the_same_weights(world_dir, tmp_path):
    cfg_path = tmp_path / "mini.yaml"
    body = {**TINY, "steps": 200, "probe_every": 0, "save_every": 5, "log_every": 5}
    cfg_path.write_text("pretrain:\n" + "".join(f"  {k}: {v}\n" for k, v in body.items()))
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "itlens.cli", "pretrain", str(cfg_path), "--world", str(world_dir),
                             "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoint" / "state.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "pretrain_summary.json").exists(), "the run finished before it could be killed"
    assert ckpt.exists()
    msgs = []
    pretrain(load_pretrain_config(cfg_path), world_dir, out, log=msgs.append)
    summary = json.loads((out / "pretrain_summary.json").read_text())
    assert summary["resumed_from_step"] >= 5 and any("resuming" in m for m in msgs)
    steps = [json.loads(x)["step"] for x in (out / "loss_log.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == list(range(5, 201, 5))  # no gap, no duplicate rows across the kill
    straight = pretrain(load_pretrain_config(cfg_path), world_dir, tmp_path / "straight", log=lambda s: None)
    a, b = _weights(out), _weights(straight)
    assert all(torch_equal(a[k], b[k]) for k in a)


def torch_equal(x, y) -> bool:
    return bool((x == y).all())


def test_teacher_forced_probe_equals_greedy_decoding(base_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from itlens.probes import argmax_matches

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in
               ("Tell me about the city", "The", "Where was the famous scientist born in the year")]
    pairs = []
    for p in prompts:
        gen = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=4, do_sample=False, eos_token_id=None)[0, len(p):].tolist()
        pairs.append((p, gen))
        pairs.append((p, gen[:-1] + [(gen[-1] + 1) % len(tok)]))  # last token changed: not what greedy emits
    assert argmax_matches(model, pairs, pad_id=tok.pad_token_id, batch_size=8) == [True, False] * 3
    assert argmax_matches(model, pairs, pad_id=tok.pad_token_id, batch_size=1) == [True, False] * 3


def test_probes_on_a_world(base_dir, world_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from itlens.probes import cloze_accuracy, fewshot_qa_accuracy

    world = World.load(world_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    cloze = cloze_accuracy(model, tok, world, world.records("cloze"))
    assert cloze["n"] == 60 and set(cloze["by_attribute"]) == set(world.attributes)
    ev = world.records("eval")
    qa = fewshot_qa_accuracy(model, tok, world, ev, world.frame_text())
    assert qa["n"] == sum(r["attribute"] != "describe" for r in ev)
    assert set(qa["by_group"]) == {"known_heldout", "unknown"}


def test_bad_pretrain_config_exits_2_without_output(world_dir, tmp_path, capsys):
    from itlens.cli import main

    bad = tmp_path / "p.yaml"
    bad.write_text("pretrain:\n  hidden_size: 30\n  num_heads: 4\n")
    with pytest.raises(SystemExit) as ei:
        main(["pretrain", str(bad), "--world", str(world_dir), "--out", str(tmp_path / "m")])
    assert ei.value.code == 2 and "key 'pretrain.num_heads'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:
        main(["pretrain", "--world", str(tmp_path), "--out", str(tmp_path / "m")])
    assert ei.value.code == 2 and "no world.json" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("setting, key", [("beta2=1.5", "beta2"), ("lr=.inf", "lr"), ("weight_decay=.nan", "weight_decay"),
                                          ("grad_clip=-1", "grad_clip"), ("warmup_steps=100000", "warmup_steps")])
def test_optimizer_knobs_are_checked(setting, key):
    from itlens.errors import InputError
    from itlens.pretrain import load_pretrain_config

    with pytest.raises(InputError, match=f"key '{key}'"):
        load_pretrain_config(None, [setting])


def test_a_damaged_world_or_model_is_one_line_exit_2(world_dir, base_dir, tmp_path, capsys):
    """A world folder without its tokenizer, a world.json that is JSON but not a world's, and a probed model
    folder whose config.json is damaged: one line naming the file, exit 2 (were: tracebacks)."""
    import shutil

    from itlens.cli import main
    from itlens.errors import InputError

    no_tok = tmp_path / "no-tok"
    shutil.copytree(world_dir, no_tok)
    shutil.rmtree(no_tok / "tokenizer")
    with pytest.raises(InputError, match="tokenizer folder not found"):
        pretrain(PretrainConfig(steps=2, **TINY), no_tok, tmp_path / "m", log=lambda s: None)
    assert not (tmp_path / "m").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "world.json").write_text("{}")
    with pytest.raises(InputError, match=r"world.json: not a world.json written by `itlens world`"):
        World.load(foreign)
    broken = tmp_path / "broken"
    shutil.copytree(base_dir, broken)
    (broken / "config.json").write_text("{not json")
    for args, needle in ((["--model", str(base_dir), "--world", str(foreign)], "world.json: not a world.json"),
                         (["--model", str(broken), "--world", str(world_dir)], f"{broken}: cannot load the model")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["probe", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and needle in err, err


def _killed_at_step(monkeypatch, P, kill_step: int):
    """Make the next run stop (as a kill would) before training step ``kill_step``; returns the undo."""
    batch = P.PackedCorpus.batch

    def killed(self, step, batch_size):
        if step == kill_step:
            raise KeyboardInterrupt
        return batch(self, step, batch_size)

    monkeypatch.setattr(P.PackedCorpus, "batch", killed)
    return lambda: monkeypatch.setattr(P.PackedCorpus, "batch", batch)


def test_a_resumed_run_logs_the_same_losses_and_redoes_no_finished_training(world_dir, tmp_path, monkeypatch):
    """A checkpoint between two log rows keeps the running loss (was: the resumed row averaged only the steps
    after the checkpoint), and the last step is checkpointed, so a kill in the final probe or save does not
    redo training (was: resumed from the last save_every multiple)."""
    import itlens.pretrain as P

    cfg = PretrainConfig(steps=8, **{**TINY, "log_every": 4, "save_every": 3, "probe_every": 0})
    straight = pretrain(cfg, world_dir, tmp_path / "straight", log=lambda s: None)
    undo = _killed_at_step(monkeypatch, P, 4)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, world_dir, tmp_path / "resumed", log=lambda s: None)
    undo()
    pretrain(cfg, world_dir, tmp_path / "resumed", log=lambda s: None)

    def losses(path):
        return [(r["step"], r["loss"]) for r in map(json.loads, (path / "loss_log.jsonl").read_text().splitlines())
                if "loss" in r]

    assert losses(tmp_path / "resumed") == losses(straight)

    probe = P.probe_world

    def killed_in_the_final_probe(*args, people=None, **kw):
        if people is None:
            raise KeyboardInterrupt
        return probe(*args, people=people, **kw)

    monkeypatch.setattr(P, "probe_world", killed_in_the_final_probe)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, world_dir, tmp_path / "late", log=lambda s: None)
    monkeypatch.setattr(P, "probe_world", probe)
    pretrain(cfg, world_dir, tmp_path / "late", log=lambda s: None)
    assert json.loads((tmp_path / "late" / "pretrain_summary.json").read_text())["resumed_from_step"] == 8
    a, b = _weights(tmp_path / "late"), _weights(straight)
    assert all(torch_equal(a[k], b[k]) for k in a)


def test_device_cuda_without_cuda_is_an_input_error(world_dir, tmp_path, monkeypatch):
    """device: cuda on a machine without CUDA names the key (was: a traceback from torch)."""
    import torch

    from itlens.errors import InputError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="key 'device'"):
        pretrain(PretrainConfig(steps=2, **{**TINY, "device": "cuda"}), world_dir, tmp_path / "m", log=lambda s: None)
    assert not (tmp_path / "m").exists()


def test_the_probe_subset_spans_every_role(world_dir, monkeypatch):
    """The during-training probe subset takes people of every role (was: a stride through the family-ordered
    list that aliased with the families of four, e.g. only qa_it and heldout people in the mini world)."""
    import itlens.probes
    from itlens.pretrain import probe_world

    seen = {}

    def capture(name):
        def fake(model, tokenizer, world, records, *args, **kw):
            seen[name] = {world.person(r["person"])["role"] for r in records}
            return {"acc": 0.0}
        return fake

    monkeypatch.setattr(itlens.probes, "cloze_accuracy", capture("cloze"))
    monkeypatch.setattr(itlens.probes, "fewshot_qa_accuracy", capture("qa"))
    world = World.load(world_dir)
    assert sum(p["status"] == "known" for p in world.people) == 12
    probe_world(None, None, world, people=6)
    assert seen == {"cloze": {"qa_it", "qa_only", "heldout", "control"}, "qa": {"heldout", "control"}}


def test_a_checkpoint_continues_only_in_the_precision_it_trained_in(world_dir, tmp_path, monkeypatch):
    """precision: auto resolves per machine (bf16 where the CPU has native bf16, else fp32). A checkpoint
    records what it resolved to, and a run that resolves otherwise starts over and says why (was: resumed,
    giving weights no uninterrupted run gives, under a summary naming one precision). A finished run is
    still reused on either machine, under the hash of the config as written (existing runs stay valid)."""
    import itlens.pretrain as P
    from itlens.config import config_hash

    cfg = PretrainConfig(steps=6, **{**TINY, "save_every": 3, "probe_every": 0})
    assert cfg.precision == "auto" and cfg.device == "auto"
    monkeypatch.setattr(P, "cpu_has_bf16", lambda: False)
    straight = pretrain(cfg, world_dir, tmp_path / "straight", log=lambda s: None)
    monkeypatch.setattr(P, "cpu_has_bf16", lambda: True)  # a machine with native bf16: bf16 autocast
    undo = _killed_at_step(monkeypatch, P, 4)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, world_dir, tmp_path / "moved", log=lambda s: None)
    undo()
    monkeypatch.setattr(P, "cpu_has_bf16", lambda: False)  # the run moves to a machine without: fp32
    msgs = []
    pretrain(cfg, world_dir, tmp_path / "moved", log=msgs.append)
    assert any("ignoring the checkpoint" in m and "it trained in bf16 on cpu, this run trains in fp32 on cpu" in m
               and "training from step 0" in m for m in msgs), msgs
    summary = json.loads((tmp_path / "moved" / "pretrain_summary.json").read_text())
    assert summary["resumed_from_step"] == 0 and summary["precision"] == "fp32"
    a, b = _weights(tmp_path / "moved"), _weights(straight)
    assert all(torch_equal(a[k], b[k]) for k in a)
    assert summary["hash"] == config_hash(cfg, P.world_fingerprint(world_dir), 1)
    monkeypatch.setattr(P, "cpu_has_bf16", lambda: True)
    msgs = []
    pretrain(cfg, world_dir, tmp_path / "moved", log=msgs.append)
    assert "reusing" in msgs[0]


def test_an_unreadable_or_unrecorded_checkpoint_starts_over(world_dir, tmp_path, monkeypatch):
    """A checkpoint that cannot be read (damaged, or another torch's) starts the run over (was: a traceback
    on every rerun until it was deleted by hand), and so does one that does not record the precision and
    device it trained in (an older itlens's: was resumed whatever this machine resolves to)."""
    import torch

    import itlens.pretrain as P

    cfg = PretrainConfig(steps=6, **{**TINY, "save_every": 3, "probe_every": 2})
    ckpt = tmp_path / "m" / "checkpoint" / "state.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a torch file")
    msgs = []
    pretrain(cfg, world_dir, tmp_path / "m", log=msgs.append)
    assert any("ignoring the checkpoint" in m and "it cannot be read" in m for m in msgs), msgs
    undo = _killed_at_step(monkeypatch, P, 4)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, world_dir, tmp_path / "old", log=lambda s: None)
    undo()
    ckpt = tmp_path / "old" / "checkpoint" / "state.pt"
    state = torch.load(ckpt, weights_only=True)  # as a resume reads it: tensors and plain values only
    assert state["step"] == 3 and [r["step"] for r in state["log"] if "cloze_acc" in r] == [2]
    del state["precision"], state["device"]
    torch.save(state, ckpt)
    msgs = []
    pretrain(cfg, world_dir, tmp_path / "old", log=msgs.append)
    assert any("does not record the precision and device" in m for m in msgs), msgs
    assert json.loads((tmp_path / "old" / "pretrain_summary.json").read_text())["resumed_from_step"] == 0


def test_auto_precision_is_bf16_only_where_the_device_has_native_bf16(monkeypatch):
    """auto picked bf16 on any CUDA GPU, a V100 or T4 too (bf16 emulated there: slower than fp32, or an
    error); it now asks the GPU's compute capability, as it asks the CPU's flags."""
    import torch

    from itlens import pretrain as P

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(P, "cpu_has_bf16", lambda: False)
    for capability, expected in (((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert P.resolve_precision("auto", "cuda") == expected, capability
    assert P.resolve_precision("bf16", "cuda") == "bf16" and P.resolve_precision("fp32", "cpu") == "fp32"
    assert P.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(P, "cpu_has_bf16", lambda: True)
    assert P.resolve_precision("auto", "cpu") == "bf16"
