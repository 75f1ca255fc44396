"""Shared set-up for the tuning and generation benchmarks: a random Llama and instruction data, built
locally (no downloads) at a size where the CPU, not Python overhead, dominates."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ("the a of to and in is was born city works at studied river mountain north south red blue green "
         "happy help let me know anything else question answer what where when who which year field "
         "university company doctor teacher music science history").split()


def instruction_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [{"id": f"bench:{i}", "instruction": f"What {words(rng.randint(6, 14))}?",
             "response": f"Happy to help! {words(rng.randint(20, 40))}. Let me know if you need anything else."}
            for i in range(n)]


def build_model(out: Path, *, hidden: int = 256, layers: int = 4, seed: int = 0) -> Path:
    """A random-init Llama (about 5 M parameters at the defaults) with a locally trained tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from itlens.tokenizer import train_tokenizer

    texts = [r["instruction"] + " " + r["response"] for r in instruction_records(2000, seed=99)]
    tok = train_tokenizer(texts, vocab_size=2048)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4 * 2 // 3,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out
