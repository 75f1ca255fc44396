"""Shared fixtures: a locally trained tokenizer and tiny random-init Llama models (no hub access)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("the a of to and in is was born city works at studied river mountain north south red blue green "
         "happy help let me know anything else question answer what where when who which year field "
         "university company doctor teacher music science history").split()


def tiny_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) + "." for _ in range(n)]


def make_tiny_llama(tokenizer, out_dir: Path, *, seed: int = 0, hidden: int = 32, layers: int = 2,
                    max_positions: int = 256, tie_embeddings: bool = True) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=max_positions, tie_word_embeddings=tie_embeddings,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from itlens.tokenizer import train_tokenizer

    return train_tokenizer(tiny_corpus(), vocab_size=300, min_frequency=1)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    return make_tiny_llama(tiny_tokenizer, tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir_b(tiny_tokenizer, tmp_path_factory) -> Path:
    """A second random model with the same tokenizer (a stand-in 'tuned' model)."""
    return make_tiny_llama(tiny_tokenizer, tmp_path_factory.mktemp("tiny-llama-b"), seed=1)


@pytest.fixture()
def it_records() -> list[dict]:
    rng = random.Random(1)
    rows = []
    for i in range(24):
        q = " ".join(rng.choice(WORDS) for _ in range(6))
        a = " ".join(rng.choice(WORDS) for _ in range(8)) + "."
        rows.append({"id": f"toy:{i}", "instruction": f"what {q}?", "response": f"Happy to help! {a}"})
    return rows
