"""The text side of ``task=reasoning``: questions into prompt token ids and completions back
into text, for a model trained from scratch (``CharText``: a character tokenizer built from
the task's text, plain prompts) or a pretrained one (``PretrainedText``: its own tokenizer,
plain or chat-templated prompts with reasoning-gym's answer-format instruction)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from klsweep.rollout import Rollout
from klsweep.schema import ConfigError
from klsweep.tasks.char_tokenizer import CharTokenizer


def pad_left(rows: list[list[int]], value: int) -> tuple[Tensor, Tensor]:
    """Token lists as a [n, longest] tensor padded with ``value`` on the left, and the mask
    of real tokens."""
    width = max(len(row) for row in rows)
    tokens = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = True
    return tokens, mask


class TaskText:
    """What the task needs of a tokenizer: prompt ids, completion texts, special ids."""

    vocab_size: int
    eos_id: int
    pad_id: int

    def prompt_ids(self, questions: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, rows: list[list[int]]) -> list[str]:
        raise NotImplementedError

    def prompts(self, questions: list[str]) -> tuple[Tensor, Tensor]:
        """Prompts of ``questions``, left-padded: tokens [n, P] and mask [n, P]."""
        return pad_left(self.prompt_ids(questions), self.pad_id)

    def completions(self, rollout: Rollout) -> list[str]:
        """Each completion's text up to, not including, EOS, without special tokens."""
        completions = rollout.completions.cpu()
        keep = (rollout.mask & (rollout.completions != self.eos_id)).cpu()
        return self.decode([row[k].tolist() for row, k in zip(completions, keep, strict=True)])


class CharText(TaskText):
    """Plain prompts for a model trained from scratch: BOS, the question's characters and a
    newline; the answer follows, then EOS (the reference's SFT sequences)."""

    def __init__(self, tokenizer: CharTokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.eos_id, self.pad_id, self.bos_id = tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id

    def prompt_ids(self, questions: list[str]) -> list[list[int]]:
        return [[self.bos_id, *ids] for ids in self.tokenizer.encode([q + "\n" for q in questions])]

    def answer_ids(self, answers: list[str]) -> list[list[int]]:
        return self.tokenizer.encode(answers)

    def decode(self, rows: list[list[int]]) -> list[str]:
        return self.tokenizer.decode(rows)


class PretrainedText(TaskText):
    """A pretrained model's tokenizer. Chat: a system turn with ``system_prompt`` (a key of
    reasoning-gym's SYSTEM_PROMPTS, or the text) and the question as the user turn, through
    the tokenizer's chat template with the assistant's turn opened; plain: the question and a
    newline, with the tokenizer's own special tokens. Prompts keep their last
    ``max_prompt_tokens`` tokens."""

    def __init__(self, tokenizer: Any, *, chat: bool, system_prompt: str,
                 max_prompt_tokens: int) -> None:
        from reasoning_gym.utils import SYSTEM_PROMPTS

        if tokenizer.eos_token_id is None:
            raise ConfigError("model.name must have a tokenizer with an EOS token, which ends "
                              "completions (got none)")
        self.tokenizer = tokenizer
        self.chat = chat
        self.system_prompt = SYSTEM_PROMPTS.get(system_prompt, system_prompt)
        self.max_prompt_tokens = max_prompt_tokens
        self.vocab_size = len(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    def prompt_ids(self, questions: list[str]) -> list[list[int]]:
        if self.chat:
            texts = self.tokenizer.apply_chat_template(
                [[{"role": "system", "content": self.system_prompt},
                  {"role": "user", "content": q}] for q in questions],
                tokenize=False, add_generation_prompt=True)
        else:
            texts = [q + "\n" for q in questions]
        # a chat template writes its own special tokens (BOS among them)
        ids = self.tokenizer(texts, add_special_tokens=not self.chat)["input_ids"]
        return [row[-self.max_prompt_tokens:] for row in ids]

    def decode(self, rows: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def check_encodes(self, texts: list[str], model_name: str) -> None:
        """Every character of the task's text must have a token: one that maps to the
        unknown token, or to nothing, is refused with the characters named."""
        chars = sorted(set().union(*(set(text) for text in texts)))
        unk = self.tokenizer.unk_token_id
        ids = self.tokenizer(chars, add_special_tokens=False)["input_ids"]
        missing = [c for c, row in zip(chars, ids, strict=True) if not row or unk in row]
        if missing:
            shown = "".join(missing[:20]) + ("…" if len(missing) > 20 else "")
            raise ConfigError(f"model.name={model_name!r}: its tokenizer cannot encode "
                              f"{len(missing)} character(s) of the task's text ({shown!r}); "
                              f"choose a tokenizer that covers them (byte-level ones do), or "
                              f"model.name=null for a character tokenizer")
