"""Tiny transformers models and a tokenizer built locally, for tests of ``model=hf`` and
``task=text``: nothing is downloaded, and each builds in well under a second.

    directory = save_tiny_model(tmp_path / "gpt2", "gpt2")   # model + tokenizer, one dir
    tokenizer = build_tokenizer(tmp_path / "tok")            # tokenizer alone
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

BOS, EOS = "<|bos|>", "<|eos|>"
TOKENIZER_VOCAB = 300
# One role marker per turn, the assistant's left open by add_generation_prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>"
    "{{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Sentiment words for VADER-style rewards, digits and symbols for arithmetic rewards.
SENTENCES = [
    "The movie was good.", "The food was great and I am happy.", "What a wonderful day!",
    "I love this, it is excellent.", "She felt happy and grateful.", "This is the best book.",
    "The service was bad.", "That was a terrible idea.", "I hate waiting, it is awful.",
    "The weather is sad and grey.", "He was angry and upset.", "This is the worst film.",
    "It was fine, nothing special.", "The cat sat on the mat.", "We walked to the park.",
    "Tell me a story about a dog.", "Write a short review of the film.",
    "Answer with a number only.", "What is 2 + 3?", "What is 7 - 4?", "What is 6 * 8?",
    "What is 9 / 3?", "2 + 3 = 5", "7 - 4 = 3", "6 * 8 = 48", "9 / 3 = 3", "10 + 15 = 25",
    "0 1 2 3 4 5 6 7 8 9", "12 + 34 = 46", "100 - 1 = 99", "The answer is 42.",
    "Yes, no, maybe.", "Thank you very much!", "Please be kind and helpful.",
    "I think it is good, but not great.", "It is not bad at all.",
]

ARCHS = ("gpt2", "llama", "qwen2")


def build_tokenizer(directory: str | os.PathLike) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``SENTENCES`` (any text encodes), with BOS and
    EOS but no pad token (so a loader's pad -> EOS fallback runs) and ``CHAT_TEMPLATE``,
    saved into ``directory``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def tiny_config(arch: str, vocab_size: int, bos_id: int, eos_id: int):
    """A transformers config of ``arch``: 2 layers, 32 wide, 4 heads, 64-wide MLP. Llama
    has 2 key/value heads (grouped-query attention, as real Llamas); GPT-2 keeps its
    0.1 dropouts (as the hub checkpoint)."""
    ids = dict(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=None)
    if arch == "gpt2":
        return GPT2Config(n_positions=128, n_embd=32, n_layer=2, n_head=4, n_inner=64, **ids)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=128, **ids)
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **sizes)
    if arch == "qwen2":
        return Qwen2Config(num_key_value_heads=4, tie_word_embeddings=True, **sizes)
    raise ValueError(f"unknown arch {arch!r} (allowed: {', '.join(ARCHS)})")


def save_tiny_model(directory: str | os.PathLike, arch: str, vocab_size: int | None = None,
                    seed: int = 0) -> Path:
    """A randomly initialised tiny ``arch`` causal LM (seeded by ``seed``, without moving
    the global random state) and ``build_tokenizer``'s tokenizer, saved together into
    ``directory`` as a hub checkpoint would be; returns the directory. ``vocab_size``
    defaults to the tokenizer's size rounded up to a multiple of 64: hub checkpoints pad
    their embeddings so (Qwen2's 151,936 rows for 151,665 tokens), the logits then span ids
    no token has, and transformers loads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer,
    which adds its <|endoftext|> pad token inside that padding."""
    directory = Path(directory)
    tokenizer = build_tokenizer(directory)
    vocab_size = vocab_size or -(-len(tokenizer) // 64) * 64
    config = tiny_config(arch, vocab_size, tokenizer.bos_token_id,
                         tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    return directory


def write_prompt_file(directory: str | os.PathLike, prompts: list[str]) -> Path:
    """A prompts.jsonl of ``prompts`` in ``directory``, as task.prompts reads it."""
    path = Path(directory) / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path
