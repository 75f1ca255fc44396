"""The optional vLLM generation backend: same greedy answers as transformers; a clear error without it."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from itlens.errors import InputError
from itlens.generate import GenerateConfig, generate_file, generate_responses, generate_responses_vllm
from itlens.io import atomic_write_jsonl
from itlens.models import load_model

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


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (optional backend: pip install vllm)")
@pytest.mark.parametrize("mode", ["chat", "frame"])
def test_vllm_greedy_outputs_equal_the_transformers_backend(tiny_model_dir, it_records, mode):
    prompts = [{"id": r["id"], "instruction": r["instruction"], "extra": i} for i, r in enumerate(it_records[:6])]
    ref = generate_responses(load_model(tiny_model_dir), prompts, mode=mode, max_new_tokens=8, batch_size=3)
    got = generate_responses_vllm(str(tiny_model_dir), prompts, mode=mode, max_new_tokens=8, dtype="float32",
                                  engine_args={"enforce_eager": True, "gpu_memory_utilization": 0.2})
    assert [r["id"] for r in got] == [p["id"] for p in prompts]
    assert [(r["response"], r["n_tokens"], r["finish"]) for r in got] == \
        [(r["response"], r["n_tokens"], r["finish"]) for r in ref]
    assert got == ref  # extra fields carried, same model name and mode
