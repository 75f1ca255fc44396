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


def make_chain_model(net, chain: list[int]) -> None:
    """Make a real (untied) Llama a chain: the layers add nothing and the head maps each token of ``chain`` to
    the next, so greedy decoding from ``chain[0]`` writes exactly the rest of it."""
    import torch

    with torch.no_grad():
        for layer in net.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = net.model.embed_tokens.weight
        net.lm_head.weight.zero_()
        for cur, nxt in zip(chain, chain[1:]):
            net.lm_head.weight[nxt] = 10 * emb[cur] / emb[cur].norm()


def make_tiny_llava(tokenizer, *, max_positions: int, layers: int = 2):
    """A tiny random Llava: a composite model whose max_position_embeddings is in its text config only (as
    Gemma 3 4B and up, Qwen2-VL)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_positions)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=8, patch_size=4)
    return LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision,
                                                     image_token_id=len(tokenizer) - 1)).eval()


def gpt2_like_tokenizer():
    """A base tokenizer with only <|endoftext|> (as GPT-2's), no pad and no chat template: like Llama-2,
    Mistral and Gemma bases, its vocabulary lacks the default template's <|user|>/<|end|> markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(tiny_corpus(), trainers.BpeTrainer(
        vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from itlens.tokenizer import train_tokenizer

    return train_tokenizer(tiny_corpus(), vocab_size=300, min_frequency=1)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    return make_tiny_llama(tiny_tokenizer, tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def untied_model_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    """A random tiny Llama that writes ordinary tokens: with tied embeddings a random model repeats the
    prompt's last token, the template's '<|assistant|>', a special token that ends an answer at once."""
    return make_tiny_llama(tiny_tokenizer, tmp_path_factory.mktemp("tiny-llama-untied"), seed=3,
                           tie_embeddings=False)


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


@pytest.fixture()
def hub_model_id(tiny_model_dir, tmp_path, monkeypatch) -> str:
    """``acme/tiny-llama``: the tiny model as a hub model in a local HF cache (a snapshot folder named by
    its commit hash, as ``snapshot_download`` leaves it)."""
    import shutil

    import huggingface_hub.constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return "acme/tiny-llama"
