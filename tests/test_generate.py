"""Batched greedy generation: real tiny models, real HF generate, CONTRACT records out."""

from __future__ import annotations

import pytest
import torch

from itlens.errors import InputError
from itlens.generate import generate_responses, render_prompts
from itlens.io import atomic_write_jsonl, read_records
from itlens.models import load_model
from itlens.templates import FRAME_STOP, frame_prompt, load_frame
from itlens.tune import TuneConfig, tune

torch.set_num_threads(1)

QA = [("where is the river?", "north."), ("who is the doctor?", "a teacher."), ("what is red?", "the city."),
      ("which year?", "the blue year.")]


@pytest.fixture(scope="module")
def qa_records():
    return [{"id": f"q:{i}", "instruction": q, "response": a, "group": "known"} for i, (q, a) in enumerate(QA)]


@pytest.fixture(scope="module")
def memorised(tiny_model_dir, qa_records, tmp_path_factory):
    """A tiny model fully fine-tuned until it answers the four questions and closes its turn."""
    d = tmp_path_factory.mktemp("memorised")
    data = atomic_write_jsonl(d / "it.jsonl", qa_records)
    cfg = TuneConfig(base=str(tiny_model_dir), data=str(data), method="full", epochs=25, learning_rate=1e-2,
                     effective_batch_size=4, per_device_batch_size=4, max_length=128, warmup=0,
                     lr_scheduler="constant", save_steps=10_000, progress=False)
    return tune(cfg, d / "sft")


def test_a_tuned_model_answers_and_stops_at_the_end_of_turn(memorised, qa_records):
    prompts = [{k: v for k, v in r.items() if k != "response"} for r in qa_records]
    out = generate_responses(load_model(memorised), prompts, max_new_tokens=40, model_name="sft")
    assert [r["id"] for r in out] == [r["id"] for r in qa_records]  # input order kept
    assert [r["response"] for r in out] == [a for _, a in QA]
    for r in out:
        assert r["finish"] == "stop" and r["n_tokens"] < 40 and "<|end|>" not in r["response"]
        assert r["model"] == "sft" and r["group"] == "known" and r["mode"] == "chat"  # extras carried


def test_batched_equals_one_at_a_time(untied_model_dir, it_records):
    """Records (text, generated ids, finish) do not depend on batch-mates."""
    lm = load_model(untied_model_dir)
    prompts = [{"id": r["id"], "instruction": r["instruction"]} for r in it_records[:8]]
    batched = generate_responses(lm, prompts, max_new_tokens=12, batch_size=8)
    single = generate_responses(lm, prompts, max_new_tokens=12, batch_size=1)
    assert batched == single
    assert sum(r["finish"] == "length" for r in batched) >= 4 and all(r["response"] for r in batched)


def test_greedy_tokens_equal_teacher_forced_argmax_in_fp32(tiny_model_dir, it_records):
    """What the token-shift analysis relies on: rank-1 tokens under teacher forcing are the generated ones."""
    lm = load_model(tiny_model_dir)
    tok = lm.tokenizer
    prompt = render_prompts(tok, [it_records[0]])[0]
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                                pad_token_id=tok.pad_token_id)
        logits = lm.model(gen).logits
    n = ids.shape[1]
    assert torch.equal(logits[0, n - 1:-1].argmax(-1), gen[0, n:])


def test_frame_mode_uses_the_frame_prompt(tiny_model_dir, it_records):
    lm = load_model(tiny_model_dir)
    rec = it_records[0]
    assert render_prompts(lm.tokenizer, [rec], mode="frame") == [frame_prompt(load_frame(), rec)]
    out = generate_responses(lm, [rec], mode="frame", max_new_tokens=6)
    assert out[0]["mode"] == "frame" and FRAME_STOP not in out[0]["response"]
    with pytest.raises(InputError, match="mode"):
        render_prompts(lm.tokenizer, [rec], mode="chatml")


def test_base_model_stops_where_the_frame_starts_its_next_query(tiny_model_dir, tmp_path):
    """Fine-tune on frame-format text so the model continues with the next '# Query'; the cut removes it."""
    text = "# Query:\nwhat is red?\n\n# Answer:\nthe city.\n\n# Query:\nwhat is red?"
    frame = tmp_path / "frame.txt"
    frame.write_text("# Query:\n{instruction}\n\n# Answer:\n")
    # a few Adam steps of language modelling on the frame text itself
    lm = load_model(tiny_model_dir)
    model, tok = lm.model.train(), lm.tokenizer
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    out = generate_responses(lm, [{"id": "p", "instruction": "what is red?"}], mode="frame", frame=str(frame),
                             max_new_tokens=30)
    assert out[0]["response"] == "the city." and out[0]["finish"] == "stop"


def test_cli_generate_with_an_adapter_writes_contract_responses(tiny_model_dir, it_records, tmp_path, capsys):
    from itlens.cli import main

    data = atomic_write_jsonl(tmp_path / "it.jsonl", it_records)
    adapter = tune(TuneConfig(base=str(tiny_model_dir), data=str(data), method="lora", max_steps=1,
                              effective_batch_size=4, per_device_batch_size=4, max_length=256, progress=False,
                              learning_rate=1e-2), tmp_path / "lft")
    prompts = atomic_write_jsonl(tmp_path / "p.jsonl", [{"id": r["id"], "instruction": r["instruction"],
                                                         "gold": "x"} for r in it_records[:5]])
    main(["generate", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--prompts", str(prompts),
          "--out", str(tmp_path / "r.jsonl"), "--name", "lft", "--set", "max_new_tokens=8"])
    rows = read_records(tmp_path / "r.jsonl", "response")
    assert len(rows) == 5 and all(r["model"] == "lft" and r["gold"] == "x" for r in rows)

    main(["generate", "--model", str(adapter), "--prompts", str(prompts),  # the adapter dir alone finds its base
          "--out", str(tmp_path / "r2.jsonl"), "--name", "lft", "--set", "max_new_tokens=8"])
    assert (tmp_path / "r2.jsonl").read_text() == (tmp_path / "r.jsonl").read_text()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"}\n')
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tiny_model_dir), "--prompts", str(bad), "--out", str(tmp_path / "x.jsonl")])
    assert e.value.code == 2 and "bad.jsonl:1" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_models_fail_clearly_offline(tmp_path):
    with pytest.raises(InputError, match="does not download"):
        load_model("some-org/not-cached-model")
    with pytest.raises(InputError, match="not found"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a model directory"):
        load_model(tmp_path / "empty")


def test_sampling_is_seeded_and_greedy_stays_the_default(tiny_model_dir, it_records):
    lm = load_model(str(tiny_model_dir))
    prompts = it_records[:6]
    greedy = generate_responses(lm, prompts, max_new_tokens=8, batch_size=4)
    a = generate_responses(lm, prompts, max_new_tokens=8, batch_size=4, temperature=2.0, seed=3)
    b = generate_responses(lm, prompts, max_new_tokens=8, batch_size=4, temperature=2.0, seed=3)
    c = generate_responses(lm, prompts, max_new_tokens=8, batch_size=4, temperature=2.0, seed=4)
    texts = lambda rows: [r["response"] for r in rows]  # noqa: E731
    assert texts(a) == texts(b)  # same seed, same samples
    assert texts(a) != texts(c) and texts(a) != texts(greedy)  # a random model at T=2 is far from greedy
    assert all(r["temperature"] == 2.0 for r in a) and all("temperature" not in r for r in greedy)
    assert texts(greedy) == texts(generate_responses(lm, prompts, max_new_tokens=8, batch_size=4, seed=9))
    with pytest.raises(InputError, match="temperature"):
        generate_responses(lm, prompts, temperature=-1.0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_responses(lm, prompts, max_new_tokens=4, batch_size=4, temperature=2.0, seed=3)
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG stream is left as it was


def test_prompts_past_the_models_positions_are_warned_about(tiny_model_dir, it_records):
    """transformers decodes past max_position_embeddings (256 here) where vLLM refuses: say so."""
    import warnings

    lm = load_model(tiny_model_dir)
    prompts = [{"id": r["id"], "instruction": r["instruction"]} for r in it_records[:3]]
    lengths = [len(lm.tokenizer(t, add_special_tokens=False)["input_ids"])
               for t in render_prompts(lm.tokenizer, prompts, mode="frame")]
    assert min(lengths) + 16 > 256 > max(lengths)  # the frame fits, but not with 16 more tokens
    with pytest.warns(UserWarning, match=rf"3 of 3 prompts \(first: 'toy:0', {lengths[0]} tokens\) can pass the "
                                         r"model's 256 positions with max_new_tokens 16"):
        generate_responses(lm, prompts, mode="frame", max_new_tokens=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # short chat prompts: no warning
        generate_responses(lm, prompts, mode="chat", max_new_tokens=4)


def test_n_tokens_count_the_kept_answer_only(tiny_tokenizer):
    """Padding after a stop string (a finished row waiting for its batch-mates) and the cut-off stop string
    are not counted, so n_tokens is the same alone and in a batch."""
    from itlens.generate import _response_record
    from itlens.tokenizer import end_of_turn_ids

    tok = tiny_tokenizer
    stop_ids = end_of_turn_ids(tok)
    assert tok.pad_token_id is not None and tok.pad_token_id not in stop_ids
    answer = tok("the city.", add_special_tokens=False)["input_ids"]
    ids = tok("the city." + FRAME_STOP + ":\nwhat", add_special_tokens=False)["input_ids"]
    assert ids[:len(answer)] == answer
    common = dict(tok=tok, stop_ids=stop_ids, stop_strings=[FRAME_STOP], max_new_tokens=30, mode="frame", model="m")
    alone = _response_record({"id": "p"}, ids, **common)
    batched = _response_record({"id": "p"}, ids + [tok.pad_token_id] * 7, **common)
    assert alone == batched
    assert alone["response"] == "the city." and alone["finish"] == "stop" and alone["n_tokens"] == len(answer)


def test_generate_config_sizes_must_be_positive(tiny_model_dir, tmp_path):
    from itlens.config import load_config
    from itlens.generate import GenerateConfig, generate_file

    for bad, key in (("batch_size=0", "batch_size"), ("max_new_tokens=0", "max_new_tokens"),
                     ("max_new_tokens=-1", "max_new_tokens"), ("dtype=fp8", "dtype")):
        with pytest.raises(InputError, match=f"key '{key}'"):
            load_config(GenerateConfig, overrides=[bad])
    prompts = atomic_write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "instruction": "what is red?"}])
    with pytest.raises(InputError, match="key 'batch_size'"):
        generate_file(str(tiny_model_dir), prompts, tmp_path / "r.jsonl", cfg=GenerateConfig(batch_size=0))
    assert not (tmp_path / "r.jsonl").exists()
    with pytest.raises(InputError, match="key 'max_new_tokens'"):
        generate_responses(str(tiny_model_dir), [{"id": "a", "instruction": "x"}], max_new_tokens=0)


@pytest.fixture()
def bos_model_dir(tiny_tokenizer, tmp_path):
    """A tiny model whose tokenizer starts every text with BOS, as Gemma's and Llama's do."""
    import copy

    from conftest import make_tiny_llama
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None  # a base model's tokenizer: itlens gives it its default template
    bos = tok.bos_token
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)])
    return make_tiny_llama(tok, tmp_path / "bos-model", seed=0)


def test_a_model_whose_tokenizer_starts_with_bos_reads_bos_first_everywhere(bos_model_dir, tiny_model_dir):
    """Generation (chat and frame), TRL's rendering of training examples and the token-shift analysis
    all put exactly one BOS first when the tokenizer's own encoding does; none when it does not."""
    from itlens.analysis.token_shift import ShiftConfig, _encode_all
    from itlens.models import load_tokenizer
    from itlens.study import _bos_key
    from itlens.templates import adds_bos, chat_prompt, encode_prompt

    rec = {"id": "a", "instruction": "where is the city?", "response": "the city.", "model": "m"}
    for model_dir, has_bos in ((bos_model_dir, True), (tiny_model_dir, False)):
        tok = load_tokenizer(model_dir)
        bos = tok.bos_token_id
        assert adds_bos(tok) is has_bos and _bos_key(str(model_dir)) == ({"bos": 1} if has_bos else {})
        frame = load_frame(None)
        for text in (chat_prompt(tok, rec), frame_prompt(frame, rec)):
            ids = encode_prompt(tok, text)
            assert (ids[0] == bos) is has_bos and ids[1] != bos
        msgs = [{"role": "user", "content": rec["instruction"]}, {"role": "assistant", "content": rec["response"]}]
        trained = tok.apply_chat_template(msgs, tokenize=True)
        trained = trained["input_ids"] if isinstance(trained, dict) or hasattr(trained, "keys") else trained
        assert (trained[0] == bos) is has_bos and trained[1] != bos
        for ctx in ("frame", "template"):
            e = _encode_all(tok, [rec], ShiftConfig(base_context=ctx), frame)[0]
            for ids in (e.tuned_ids, e.base_ids):
                assert (ids[0] == bos) is has_bos and ids[1] != bos
        out = generate_responses(load_model(model_dir), [rec], mode="frame", frame=None, max_new_tokens=4)
        assert out[0]["model"] and isinstance(out[0]["response"], str)


def test_chat_generation_stops_at_the_end_of_turn_text_when_it_is_not_a_token(tiny_tokenizer, tmp_path):
    """A base whose vocabulary lacks <|end|> writes it as several tokens: decoding stops there (a stop
    string), and the record is what it was when decoding ran on to max_new_tokens and was cut after."""
    from conftest import gpt2_like_tokenizer, make_tiny_llama

    base = make_tiny_llama(gpt2_like_tokenizer(), tmp_path / "base")
    rows = [{"id": f"t:{i}", "instruction": "what is the city", "response": "the river is blue."} for i in range(8)]
    out = tune(TuneConfig(base=str(base), data=str(atomic_write_jsonl(tmp_path / "it.jsonl", rows)), method="full",
                          max_steps=60, learning_rate=3e-3, warmup=0, lr_scheduler="constant",
                          effective_batch_size=8, per_device_batch_size=8, progress=False), tmp_path / "sft")
    lm = load_model(out)
    assert "<|end|>" not in lm.tokenizer.get_vocab()
    real, decoded = lm.model.generate, []

    def spy(*a, legacy=False, **k):
        if legacy:  # what generate did before: no stop strings in chat mode
            k.pop("stop_strings", None), k.pop("tokenizer", None)
        o = real(*a, **k)
        decoded.append(o.shape[1] - k["input_ids"].shape[1])
        return o

    def both(prompts, batch_size):
        lm.model.generate = spy
        now = generate_responses(lm, prompts, max_new_tokens=40, batch_size=batch_size)
        lm.model.generate = lambda *a, **k: spy(*a, legacy=True, **k)
        return now, generate_responses(lm, prompts, max_new_tokens=40, batch_size=batch_size)

    now, before = both([{"id": "p", "instruction": "what is the city"}], 1)
    assert now[0]["response"] == "the river is blue." and now[0]["finish"] == "stop"
    assert now == before  # byte-identical records (response, n_tokens, finish)
    assert decoded[0] < 40 and decoded[1] == 40  # only fewer tokens decoded
    now, before = both([{"id": "p", "instruction": "what is the city"}, {"id": "q", "instruction": "the river"}], 2)
    assert now == before  # a row that stopped early is padded while its batch-mate goes on: the same records
    # a vocabulary with <|end|> as a token stops on its id alone; frame mode always watches its string
    from itlens.generate import decoding_stop_strings

    assert decoding_stop_strings(lm.tokenizer, "chat") == ["<|end|>"]
    assert decoding_stop_strings(tiny_tokenizer, "chat") is None
    assert decoding_stop_strings(tiny_tokenizer, "frame") == [FRAME_STOP]
    assert decoding_stop_strings(lm.tokenizer, "frame") == [FRAME_STOP]


def test_training_and_generation_read_the_same_ids_for_a_bos_tokenizer_with_its_own_template(tiny_tokenizer):
    """A tokenizer that adds BOS and ships a chat template without {{ bos_token }} (zephyr style): TRL renders
    training examples without special tokens, generation puts BOS first; the template gets BOS put in front
    so both read the same prompt ids (and a template that renders BOS already is left alone)."""
    import copy

    from tokenizers.processors import TemplateProcessing
    from trl.data_utils import _tokenize

    from itlens.templates import chat_prompt, encode_prompt, ensure_chat_template
    from itlens.tune import to_prompt_completion

    tok = copy.deepcopy(tiny_tokenizer)
    bos = tok.bos_token
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)])
    own = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
           "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.chat_template = own
    ensure_chat_template(tok)  # what load_tokenizer does before tune and generate
    rec = {"id": "x", "instruction": "what is the city", "response": "the river."}
    row = to_prompt_completion([rec])[0]
    trained = _tokenize(tok, row["prompt"], add_generation_prompt=True)["input_ids"]
    assert trained == encode_prompt(tok, chat_prompt(tok, rec))
    assert trained[0] == tok.bos_token_id and trained[1] != tok.bos_token_id
    full = _tokenize(tok, row["prompt"] + row["completion"])["input_ids"]
    assert full[:len(trained)] == trained
    ensure_chat_template(tok)
    assert tok.chat_template == "{{ bos_token }}" + own  # once
    tok.chat_template = "{{ bos_token }}" + own.replace("<|end|>", "<|end|>\n")
    ensure_chat_template(tok)
    assert tok.chat_template.count("bos_token") == 1
    tok.chat_template = own  # changed after a (remembered) check: checked again, not skipped
    ensure_chat_template(tok)
    assert tok.chat_template == "{{ bos_token }}" + own


def test_a_hub_model_is_named_by_its_hub_id_not_its_snapshot_hash(hub_model_id, tiny_model_dir):
    lm = load_model(hub_model_id)
    assert lm.path.endswith("0123456789abcdef0123456789abcdef01234567") and lm.name == "acme/tiny-llama"
    out = generate_responses(lm, [{"id": "a", "instruction": "where is the city?"}], max_new_tokens=2)
    assert out[0]["model"] == "acme/tiny-llama"
    assert load_model(tiny_model_dir).name == tiny_model_dir.name  # a local dir: its folder name
    from itlens.models import model_label

    assert model_label(str(tiny_model_dir), str(tiny_model_dir)) == tiny_model_dir.name


def test_the_cache_key_says_when_tuning_data_changed_meaning(bos_model_dir, tmp_path):
    """A BOS tokenizer whose own template gets BOS put in front, and multi-turn IT data (every assistant
    turn trained), enter the study's keys: stages cached by an itlens that did neither are not reused."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from itlens.study import _bos_key, _has_multi_turn

    assert _bos_key(str(bos_model_dir)) == {"bos": 1}  # no template of its own: the default one, as before
    own = tmp_path / "own-template"
    shutil.copytree(bos_model_dir, own)
    tok = AutoTokenizer.from_pretrained(own)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(own)
    assert _bos_key(str(own)) == {"bos": 1, "template_bos": 1}
    one = {"id": "c:0", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    two = {"id": "c:1", "messages": [*one["messages"], {"role": "user", "content": "q2"},
                                     {"role": "assistant", "content": "b"}]}
    (tmp_path / "one.jsonl").write_text(json.dumps(one) + "\n"
                                        + json.dumps({"id": "c:2", "instruction": "q", "response": "a"}) + "\n")
    (tmp_path / "two.jsonl").write_text(json.dumps(one) + "\n" + json.dumps(two) + "\n")
    assert not _has_multi_turn(tmp_path / "one.jsonl") and _has_multi_turn(tmp_path / "two.jsonl")


def _broken_model_dirs(model_dir, tmp_path):
    """Folders a user may point at that look like models but are not loadable ones."""
    import json
    import shutil

    def copy(name, *files):
        d = tmp_path / name
        d.mkdir()
        for f in files:
            shutil.copy(model_dir / f, d / f)
        return d

    tok = [f.name for f in model_dir.iterdir() if f.name.startswith("tokenizer")]
    bad_config = copy("bad-config", "model.safetensors", *tok)
    (bad_config / "config.json").write_text("{not json")
    no_weights = copy("no-weights", "config.json", *tok)
    cut_weights = copy("cut-weights", "config.json", *tok)
    (cut_weights / "model.safetensors").write_bytes(b"junk")
    no_tokenizer = copy("no-tokenizer", "config.json", "model.safetensors")
    wrong_type = copy("wrong-type", "model.safetensors", *tok)
    cfg = json.loads((model_dir / "config.json").read_text())
    (wrong_type / "config.json").write_text(json.dumps({**cfg, "hidden_size": "big"}))
    adapter = tmp_path / "bad-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{not json")
    return {"bad-config": (bad_config, "cannot load the model"), "no-weights": (no_weights, "cannot load the model"),
            "cut-weights": (cut_weights, "cannot load the model"), "no-tokenizer": (no_tokenizer, "no tokenizer"),
            "wrong-type": (wrong_type, "cannot load the model"),
            "bad-adapter": (adapter, "adapter_config.json:1: malformed JSON")}


def test_a_folder_that_is_not_a_loadable_model_is_an_input_error(tiny_model_dir, tmp_path, capsys):
    """A damaged config.json, missing or cut weights, no tokenizer, a damaged adapter_config.json: one line
    naming the folder (or file), exit 2, no traceback and no output (was: a traceback and exit 1)."""
    from itlens.cli import main

    prompts = atomic_write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "instruction": "where is the river?"}])
    for name, (folder, needle) in _broken_model_dirs(tiny_model_dir, tmp_path).items():
        with pytest.raises(InputError, match=needle):
            load_model(str(folder))
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["generate", "--model", str(folder), "--prompts", str(prompts), "--out", str(tmp_path / "r.jsonl")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err, (name, err)
        assert err.strip().splitlines()[-1].startswith(f"itlens: error: {folder}"), (name, err)
        assert not (tmp_path / "r.jsonl").exists()
    with pytest.raises(InputError, match="adapter_config.json:1: malformed JSON"):  # not "another base"
        load_model(str(tiny_model_dir), adapter=tmp_path / "bad-adapter")
    with pytest.raises(InputError, match="is a file, expected a model directory"):
        load_model(str(prompts))


def test_an_answer_ends_at_a_turn_marker_and_records_its_generated_ids(tiny_model_dir, tmp_path):
    """A model that writes a special token mid-answer (here taught to write '<|user|>' after 'the city') has
    begun another turn: the answer ends there (before, the token was skipped in the text and decoding went
    on, joining 'the city' to what followed). Each record carries the ids it generated, which decode to its
    response."""
    from itlens.tokenizer import USER, answer_stop_ids

    qa = [("what is red?", f"the city{USER} of the doctor."), ("where is the river?", "north.")]
    recs = [{"id": f"q:{i}", "instruction": q, "response": a} for i, (q, a) in enumerate(qa)]
    data = atomic_write_jsonl(tmp_path / "it.jsonl", recs)
    cfg = TuneConfig(base=str(tiny_model_dir), data=str(data), method="full", epochs=30, learning_rate=1e-2,
                     effective_batch_size=2, per_device_batch_size=2, max_length=128, warmup=0,
                     lr_scheduler="constant", save_steps=10_000, progress=False)
    lm = load_model(tune(cfg, tmp_path / "sft"))
    assert lm.tokenizer.convert_tokens_to_ids(USER) in answer_stop_ids(lm.tokenizer)
    out = generate_responses(lm, [{k: v for k, v in r.items() if k != "response"} for r in recs], max_new_tokens=30)
    assert [r["response"] for r in out] == ["the city", "north."]
    for r in out:
        assert r["finish"] == "stop" and len(r["response_token_ids"]) == r["n_tokens"]
        assert lm.tokenizer.decode(r["response_token_ids"]).strip() == r["response"]


def _bare_tokenizer():
    """A byte-level BPE tokenizer trained with no special tokens at all (no pad, eos, bos, chat template)."""
    from conftest import tiny_corpus
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(tiny_corpus(), trainers.BpeTrainer(vocab_size=300, min_frequency=1, show_progress=False,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t)


def test_a_tokenizer_without_a_pad_token_generates_in_batches(tiny_tokenizer, tmp_path):
    """A tokenizer with neither a pad nor an eos token (load_tokenizer has no eos to pad with) decodes batches
    of prompts of different lengths, each as it decodes alone (was: tokenizer.pad's ValueError, a traceback);
    so does a tokenizer handed in with pad unset and right padding, as AutoTokenizer gives a Llama-2 one."""
    import copy

    from conftest import make_tiny_llama

    from itlens.models import LoadedModel

    lm = load_model(make_tiny_llama(_bare_tokenizer(), tmp_path / "bare", seed=3, tie_embeddings=False))
    assert lm.tokenizer.pad_token_id is None and lm.tokenizer.eos_token_id is None
    prompts = [{"id": f"p{i}", "instruction": "what is the red city " * (i + 1)} for i in range(3)]
    batched = generate_responses(lm, prompts, max_new_tokens=6, batch_size=8)
    assert batched == generate_responses(lm, prompts, max_new_tokens=6, batch_size=1)
    assert [r["n_tokens"] for r in batched] == [6, 6, 6]

    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token, tok.padding_side = None, "right"
    model = load_model(make_tiny_llama(tiny_tokenizer, tmp_path / "llama", seed=3, tie_embeddings=False))
    raw = LoadedModel(model=model.model, tokenizer=tok, name="raw", path=model.path)
    assert generate_responses(raw, prompts, max_new_tokens=6, batch_size=3) == \
        generate_responses(model, prompts, max_new_tokens=6, batch_size=1, model_name="raw")


def test_a_model_with_learned_positions_refuses_prompts_past_them(tmp_path):
    """GPT-2-style learned position embeddings cannot be read past n_positions: a prompt (or prompt + answer)
    longer than that is one input error naming the prompt and max_new_tokens (was: IndexError, a traceback);
    a rotary model (Llama) decodes on with a warning, as before; prompts that fit are decoded."""
    from conftest import gpt2_like_tokenizer, make_tiny_llama
    from transformers import GPT2Config, GPT2LMHeadModel

    from itlens.generate import GenerateConfig, generate_file

    tok = gpt2_like_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=48, n_embd=32, n_layer=1, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    prompts = [{"id": "short", "instruction": "the red city"}, {"id": "long", "instruction": "the red city " * 40}]
    lm = load_model(tmp_path / "gpt2")
    assert generate_responses(lm, prompts[:1], max_new_tokens=4)[0]["n_tokens"] <= 4
    with pytest.raises(InputError, match=r"key 'max_new_tokens': prompt 'long' has \d+ tokens: with max_new_tokens 4 "
                                         r"it passes the model's 48 positions"):
        generate_responses(lm, prompts, max_new_tokens=4)
    with pytest.raises(InputError, match=r"prompt 'short' .* max_new_tokens 60 it passes the model's 48 positions"):
        generate_responses(lm, prompts[:1], max_new_tokens=60)
    path = atomic_write_jsonl(tmp_path / "p.jsonl", prompts)
    with pytest.raises(InputError, match="prompt 'long'"):
        generate_file(str(tmp_path / "gpt2"), path, tmp_path / "r.jsonl", cfg=GenerateConfig(max_new_tokens=4),
                      progress=False)
    assert not (tmp_path / "r.jsonl").exists()
    llama = load_model(make_tiny_llama(tok, tmp_path / "llama", max_positions=48))
    with pytest.warns(UserWarning, match="can pass the model's 48 positions"):
        assert len(generate_responses(llama, prompts, max_new_tokens=4)) == 2


def test_a_chat_template_that_refuses_a_record_is_an_input_error_naming_it(tiny_tokenizer):
    """Gemma 2's template raises 'System role not supported': rendering such a record was a jinja
    TemplateError traceback; it is one input error naming the record and its field."""
    import copy

    from itlens.templates import chat_prompt

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    rec = {"id": "tulu:7", "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                                        {"role": "assistant", "content": "Yo"}]}
    with pytest.raises(InputError, match=r"field 'messages': the model's chat template refuses record 'tulu:7': "
                                         r"System role not supported"):
        chat_prompt(tok, rec)
    assert chat_prompt(tok, {"id": "a", "instruction": "Hi"}) == "<|user|>Hi<|end|><|assistant|>"


def test_a_frame_file_from_a_windows_editor_reads_as_its_text(tmp_path):
    """A frame saved with a BOM and CRLF line ends is the same frame (the BOM was read as text and put in
    front of every base prompt); one saved in a legacy code page is an input error (was: UnicodeDecodeError)."""
    frame = "# Query:\nWhat is red?\n\n# Answer:\nA colour.\n\n# Query:\n{instruction}\n\n# Answer:\n"
    win = tmp_path / "frame_win.txt"
    win.write_bytes(b"\xef\xbb\xbf" + frame.replace("\n", "\r\n").encode())
    assert load_frame(str(win)) == frame
    legacy = tmp_path / "frame_cp1252.txt"
    legacy.write_bytes(frame.replace("A colour", "Rouge, comme un caf\u00e9").encode("cp1252"))
    with pytest.raises(InputError, match=r"frame_cp1252.txt: not UTF-8 text"):
        load_frame(str(legacy))


def test_a_model_path_starting_with_a_tilde_is_the_home_folder(tiny_model_dir, tmp_path, monkeypatch):
    """A YAML config's `base: ~/models/x` is no shell word, so nothing expanded it: 'model directory not found'."""
    import shutil

    from itlens.models import resolve_model

    home = tmp_path / "home"
    shutil.copytree(tiny_model_dir, home / "models" / "tiny")
    monkeypatch.setenv("HOME", str(home))
    assert resolve_model("~/models/tiny") == str((home / "models" / "tiny").resolve())


_FROM_THE_HUB_CACHE = """
import json, socket, sys
attempts = []
real_connect = socket.socket.connect
def connect(self, address):
    if self.family != socket.AF_UNIX:
        attempts.append(str(address))
    return real_connect(self, address)
socket.socket.connect = connect
from itlens.errors import InputError
from itlens.models import load_model, resolve_model
out = {"resolved": {}, "errors": {}}
for name in sys.argv[1:]:
    try:
        out["resolved"][name] = resolve_model(name)
    except InputError as e:
        out["errors"][name] = str(e)
lm = load_model("org/tiny")
out.update(name=lm.name, path=lm.path, attempts=attempts)
print(json.dumps(out))
"""


@pytest.mark.parametrize("setting", ["HF_HUB_CACHE", "HF_HOME"])
def test_a_hub_model_in_a_custom_hf_cache_loads_offline_by_id_and_revision(setting, tiny_model_dir, tmp_path):
    """A model saved in huggingface_hub's cache layout (models--org--name/snapshots/HASH + refs/main), in
    the cache folder HF_HUB_CACHE or HF_HOME names, loads by its id, by id@branch and by id@commit,
    with the hub 'online' but never asked; `org/name@rev` was read as a hub id with an @ in it."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub" if setting == "HF_HUB_CACHE" else tmp_path / "hf-home" / "hub"
    repo = cache / "models--org--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE") and k not in ("HF_HOME", "HF_HUB_CACHE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", **{setting: str(cache if setting == "HF_HUB_CACHE" else cache.parent)})
    names = ["org/tiny", "org/tiny@main", f"org/tiny@{commit}", "org/tiny@v2", "org/other"]
    result = subprocess.run([sys.executable, "-c", _FROM_THE_HUB_CACHE, *names], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    snapshot = str(repo / "snapshots" / commit)
    assert out["resolved"] == {"org/tiny": snapshot, "org/tiny@main": snapshot, f"org/tiny@{commit}": snapshot}
    assert out["name"] == "org/tiny" and out["path"] == snapshot and out["attempts"] == []
    assert "no hub model 'org/tiny' at revision 'v2' in the local HF cache" in out["errors"]["org/tiny@v2"]
    other = out["errors"]["org/other"]
    assert other.startswith("org/other: no local model folder of that name") and str(cache) in other
    assert "needs a token" in other


def test_a_model_that_needs_its_own_code_is_an_input_error_and_its_code_never_runs(tiny_model_dir, tmp_path):
    """transformers asks on stdin whether to run a model's own code (config.json auto_map); a 'y' piped
    into an itlens command ran it. itlens never runs it: the load is an input error, stdin is not read."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    model = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type="itlens-custom", auto_map={"AutoConfig": "custom.CustomConfig",
                                                     "AutoModelForCausalLM": "custom.CustomModel"})
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "custom.py").write_text(
        "import os, pathlib\n"
        "pathlib.Path(os.environ['RAN_MARKER']).write_text('the model code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'itlens-custom'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    marker = tmp_path / "RAN"
    env = dict(os.environ, RAN_MARKER=str(marker), HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", "import sys\nfrom itlens.models import load_model\n"
                             "from itlens.errors import InputError\ntry:\n    load_model(sys.argv[1])\n"
                             "except InputError as e:\n    print(e)\n", str(model)],
                            input="y\ny\ny\n", capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    assert result.stdout.startswith(f"{model}: cannot load the model: ") and "custom code" in result.stdout
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr


def test_a_composite_models_positions_are_read_from_its_text_config(tiny_tokenizer):
    """Gemma 3 (4B and up), Llava and Qwen2-VL keep max_position_embeddings in their text model's config: read only
    at the top, it was None, and prompts past the positions passed without the warning (the token shift read it
    there already)."""
    from conftest import make_tiny_llava

    from itlens.generate import _check_positions, trained_positions

    net = make_tiny_llava(tiny_tokenizer, max_positions=16, layers=1)
    assert getattr(net.config, "max_position_embeddings", None) is None and trained_positions(net.config) == 16
    with pytest.warns(UserWarning, match="1 of 2 prompts .* can pass the model's 16 positions"):
        _check_positions(net, [{"id": "short"}, {"id": "long"}], [[1] * 4, [1] * 14], max_new_tokens=4)


def test_a_hub_revision_with_a_slash_resolves_from_the_cache(hub_model_id):
    """A revision may hold slashes (a pull request's refs/pr/1, a branch feature/x): `org/name@refs/pr/1` was
    refused as 'model directory not found', its slashes counted as a path's. A missing one's hint names it."""
    from pathlib import Path

    from itlens.models import resolve_model

    refs = Path(resolve_model(hub_model_id)).parents[1] / "refs"
    sha = (refs / "main").read_text()
    for rev in ("refs/pr/1", "feature/x"):
        (refs / rev).parent.mkdir(parents=True, exist_ok=True)
        (refs / rev).write_text(sha)
        assert resolve_model(f"{hub_model_id}@{rev}") == resolve_model(hub_model_id)
    with pytest.raises(InputError, match=f"`hf download {hub_model_id} --revision feature/y`"):
        resolve_model(f"{hub_model_id}@feature/y")
    with pytest.raises(InputError, match="model directory not found"):
        resolve_model("a/b/c@main")


def test_a_models_generation_config_does_not_change_the_greedy_answer(tiny_model_dir, it_records, tmp_path):
    """transformers fills every setting a generate call leaves unset from the model's generation_config.json:
    a shipped repetition_penalty (Qwen2.5-Instruct: 1.05), no_repeat_ngram_size or min_new_tokens used to
    turn the greedy answer into another (not the argmax, not vLLM's). The tied random model repeats one
    token in the frame and closes its chat turn at once, which each of them would change."""
    prompts = [{"id": r["id"], "instruction": r["instruction"]} for r in it_records[:2]]
    frame = tmp_path / "frame.txt"
    frame.write_text("# Query:\n{instruction}\n\n# Answer:\n")
    for mode in ("frame", "chat"):
        plain = generate_responses(load_model(tiny_model_dir), prompts, mode=mode, frame=str(frame), max_new_tokens=8)
        assert all(r["finish"] == ("length" if mode == "frame" else "stop") for r in plain)
        for key, value in (("repetition_penalty", 5.0), ("no_repeat_ngram_size", 1), ("min_new_tokens", 8)):
            lm = load_model(tiny_model_dir)
            setattr(lm.model.generation_config, key, value)
            assert generate_responses(lm, prompts, mode=mode, frame=str(frame), max_new_tokens=8) == plain, (mode, key)
    # sampling draws from the full distribution (temperature only), whatever truncation the file sets
    sample = dict(mode="frame", frame=str(frame), max_new_tokens=8, temperature=2.0, seed=3)
    plain = generate_responses(load_model(tiny_model_dir), prompts, **sample)
    for key, value in (("min_p", 0.5), ("typical_p", 0.2), ("epsilon_cutoff", 0.05)):
        lm = load_model(tiny_model_dir)
        setattr(lm.model.generation_config, key, value)
        assert generate_responses(lm, prompts, **sample) == plain, key


def test_a_frame_answer_that_opens_the_next_query_is_empty_on_both_backends(tiny_model_dir, tiny_tokenizer, tmp_path):
    """The frame prompt ends with '\\n', so a base model that writes '\\n# Query' first has given an empty answer.
    HF's stop-string check reads the prompt's last token too and stopped there, but the record was cut only
    at a '\\n\\n# Query' inside the answer: it kept '# Query' (7 tokens); vLLM, which watches the answer
    alone, would decode on to the next '\\n\\n# Query' and keep more."""
    from itlens.generate import _response_record
    from itlens.tokenizer import answer_stop_ids

    frame = tmp_path / "frame.txt"
    frame.write_text("# Query:\n{instruction}\n\n# Answer:\n")
    text = "# Query:\nwhat is red?\n\n# Answer:\n\n# Query:\nwhat is red?\n\n# Answer:\n\n# Query:\nwhat"
    lm = load_model(tiny_model_dir)
    model, tok = lm.model.train(), lm.tokenizer
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    out = generate_responses(lm, [{"id": "p", "instruction": "what is red?"}], mode="frame", frame=str(frame),
                             max_new_tokens=30)
    assert (out[0]["response"], out[0]["n_tokens"], out[0]["response_token_ids"], out[0]["finish"]) == ("", 0, [],
                                                                                                         "stop")

    # the same record from the ids each backend returns: HF's (stopped at once) and vLLM's (decoded on)
    tok = tiny_tokenizer
    prompt = frame.read_text().replace("{instruction}", "what is red?")
    common = dict(tok=tok, stop_ids=answer_stop_ids(tok), stop_strings=[FRAME_STOP], max_new_tokens=30,
                  mode="frame", model="m", context=prompt)
    hf = _response_record({"id": "p"}, tok("\n# Query", add_special_tokens=False)["input_ids"], **common)
    vl = _response_record({"id": "p"}, tok("\n# Query:\nwhat is red?\n\n# Query", add_special_tokens=False)
                          ["input_ids"], **common)
    assert hf == vl and hf["response"] == "" and hf["n_tokens"] == 0 and hf["finish"] == "stop"
    # an answer is still cut where its own text starts the next query, and not before
    ok = _response_record({"id": "p"}, tok("the city.\n\n# Query", add_special_tokens=False)["input_ids"], **common)
    assert ok["response"] == "the city." and ok["finish"] == "stop"
