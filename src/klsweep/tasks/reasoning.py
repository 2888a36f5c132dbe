"""``task=reasoning``: RL with verifiable rewards on reasoning-gym's procedural datasets.

Questions come from any reasoning-gym dataset by name (``task.dataset``, options in
``task.dataset_config``) or from several with weights (``task.dataset=composite``,
``task.datasets``); klsweep.tasks.reasoning_data builds the training pool and the held-out
set, which share neither a seed nor a question text.

Prompts: ``plain`` is the question and a newline (after BOS), for models trained from scratch
on it; ``chat`` is a system turn with reasoning-gym's answer-format instruction
(``task.system_prompt``, a key of its SYSTEM_PROMPTS or the text itself) and the question as
the user turn, through the tokenizer's chat template, for instruction-tuned models. ``auto``
picks chat when the model's tokenizer has a template.

Reward: the dataset's own verifier, ``score_answer`` (0 to 1), on the answer read from the
completion (klsweep.answers: the last ``<task.answer_tag>`` pair, else the fallback:
``auto`` takes the last number where the question's answer is a number, else the whole
completion), plus ``task.format_weight`` where the tag was used.

Models: a pretrained ``model.name`` brings its tokenizer (which must encode every character
of the task's text) and is its own reference. A model trained from scratch (``model=tiny``, or
``model=hf`` with ``model.name=null``) gets a character-level tokenizer of the task's text
(klsweep.tasks.char_tokenizer), and its reference is trained by supervised fine-tuning on
question → answer pairs of the training pool (``task.reference.*``), cached as the digits
task's reference is.

Evaluation (``eval.*``, klsweep.tasks.evaluation): the reference once, at the first step
(``eval/ref_*``, its held-out accuracy also printed), and the policy every ``eval.every`` steps
and at the last (``eval/*``). Each evaluation's samples go to ``RUN_DIR/samples/`` and W&B.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from klsweep.answers import FALLBACKS, Extracted, extract_answer, number_value
from klsweep.models.reference import ReferenceRecipe
from klsweep.policy import PolicyPair
from klsweep.rollout import Prompts, Rollout
from klsweep.schema import ConfigError, from_node, spec
from klsweep.sharding import gathered
from klsweep.tasks.base import Task
from klsweep.tasks.char_tokenizer import CharTokenizer
from klsweep.tasks.evaluation import EvalConfig, evaluation_metrics, sample_for_evaluation
from klsweep.tasks.reasoning_data import (
    Questions,
    Source,
    check_disjoint,
    evaluation_set,
    source_of,
    training_pool,
)
from klsweep.tasks.reasoning_text import CharText, PretrainedText, TaskText

log = logging.getLogger("klsweep")

PROMPT_FORMATS = ("auto", "plain", "chat")


@dataclass
class ReferenceSFT:
    """``task.reference``: supervised fine-tuning of a from-scratch reference."""

    steps: int = spec(kind="integer", ge=1, help="SFT steps (AdamW, cosine decay)")
    batch_size: int = spec(kind="integer", ge=1, help="question-answer pairs per SFT step")
    lr: float = spec(kind="number", gt=0, help="SFT learning rate")
    seed: int = spec(kind="integer", ge=0, help="SFT seed (initial weights and batches)")


@dataclass
class ReasoningConfig:
    """``task=reasoning`` (defaults and their sources: conf/task/reasoning.yaml)."""

    name: str = spec(kind="choice", choices=("reasoning",), help="the task")
    steps: int = spec(kind="integer", ge=1,
                      help="policy updates a run of this task takes by default (the run's steps)")
    dataset: str = spec(kind="string", help="a reasoning-gym dataset, or composite")
    dataset_config: dict | None = spec(kind="node", optional=True,
                                       help="the dataset's options (create_dataset's keywords)")
    datasets: dict | None = spec(kind="node", optional=True,
                                 help="composite: {name: {weight: w, config: {...}}}")
    train_size: int = spec(kind="integer", ge=1, help="items drawn for the training pool")
    train_seed: int = spec(kind="integer", ge=0, help="seed of the training pool")
    eval_seed: int = spec(kind="integer", ge=0, help="seed of the held-out questions")
    prompt_format: str = spec(kind="choice", choices=PROMPT_FORMATS,
                              help="plain | chat (system prompt + template) | auto")
    system_prompt: str = spec(kind="string",
                              help="chat: a reasoning-gym SYSTEM_PROMPTS key, or the text")
    answer_tag: str = spec(kind="string", help="the answer is read from <tag>...</tag>")
    answer_fallback: str = spec(kind="choice", choices=("auto", *FALLBACKS),
                                help="without the tag: auto | last_number | completion | none")
    format_weight: float = spec(kind="number", help="reward += weight where the tag was used")
    max_new_tokens: int | None = spec(kind="integer", ge=1, optional=True,
                                      help="longest completion; null: longest answer + EOS "
                                           "from scratch, 64 for a pretrained model")
    max_prompt_tokens: int = spec(kind="integer", ge=1, help="longer prompts keep their end")
    reference: ReferenceSFT = spec(kind="node", help="SFT of a from-scratch reference")
    cache_dir: str = spec(kind="string", help="where trained references are cached")

    def __post_init__(self) -> None:
        if not isinstance(self.reference, ReferenceSFT):
            self.reference = from_node(ReferenceSFT, self.reference)

    @staticmethod
    def check_run(cfg: DictConfig) -> None:
        """Every bad setting of the task, refused in one line before training: it builds
        the questions (cached for the run) and, for a pretrained model, loads its
        tokenizer."""
        from klsweep.models import load_tokenizer

        config = from_node(ReasoningConfig, cfg.task)
        evaluation = from_node(EvalConfig, cfg.eval)
        _, train, held_out = questions(config, evaluation)
        tokenizer = load_tokenizer(cfg.model)
        if tokenizer is None:
            if config.prompt_format == "chat":
                raise ConfigError("task.prompt_format=chat needs a pretrained model.name whose "
                                  "tokenizer has a chat template (a from-scratch model reads "
                                  "plain prompts)")
            return
        _pretrained_text(tokenizer, config).check_encodes(_texts(train, held_out),
                                                          cfg.model.name)


def questions(config: ReasoningConfig,
              evaluation: EvalConfig) -> tuple[Source, Questions, Questions]:
    """The questions' source, the training pool and the held-out questions, checked
    disjoint."""
    source = source_of(config.dataset, config.dataset_config, config.datasets)
    held_out = evaluation_set(source, config.eval_seed, evaluation.prompts)
    train = training_pool(source, config.train_seed, config.train_size,
                          frozenset(e["question"] for e in held_out.entries))
    check_disjoint(train.seeds, held_out.seeds)
    return source, train, held_out


def _texts(*sets: Questions) -> list[str]:
    return [e[field] for q in sets for e in q.entries for field in ("question", "answer")]


def _pretrained_text(tokenizer: Any, config: ReasoningConfig) -> PretrainedText:
    """A pretrained tokenizer's prompts: chat where asked, or (auto) where it has a template."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if config.prompt_format == "chat" and not has_template:
        raise ConfigError("task.prompt_format must be plain or auto for a tokenizer without a "
                          "chat template (got chat)")
    chat = config.prompt_format == "chat" or (config.prompt_format == "auto" and has_template)
    return PretrainedText(tokenizer, chat=chat, system_prompt=config.system_prompt,
                          max_prompt_tokens=config.max_prompt_tokens)


def _is_number(text: str) -> bool:
    try:
        number_value(text)
    except ValueError:
        return False
    return True


class ReasoningTask(Task):
    """reasoning-gym questions, scored by the dataset's own verifier."""

    name = "reasoning"
    Config = ReasoningConfig
    needs_tokenizer = True
    needs_evaluation = True

    def __init__(self, config: ReasoningConfig, tokenizer: Any = None,
                 evaluation: EvalConfig | None = None) -> None:
        self.config = config
        self.evaluation = evaluation
        if evaluation is None:
            raise ValueError("task=reasoning needs the eval node (build_task passes it)")
        self.source, self.train, self.held_out = questions(config, evaluation)
        if tokenizer is None:
            self.text: TaskText = CharText(
                CharTokenizer([*_texts(self.train, self.held_out), "\n"]))
        else:
            self.text = _pretrained_text(tokenizer, config)
        self.pretrained = tokenizer is not None
        self.vocab_size, self.eos_id = self.text.vocab_size, self.text.eos_id
        # each distinct question is tokenised once; the pool's items point at theirs
        questions_ = sorted({e["question"] for e in self.train.entries})
        row_of = {q: i for i, q in enumerate(questions_)}
        self.question_row = torch.tensor([row_of[e["question"]] for e in self.train.entries])
        held = [e["question"] for e in self.held_out.entries]
        tokens, mask = self.text.prompts(questions_ + held)
        self.prompt_tokens, self.prompt_mask = tokens[:len(questions_)], mask[:len(questions_)]
        self.held_out_prompts = Prompts(tokens[len(questions_):], mask[len(questions_):],
                                        torch.arange(len(held)))
        self.prompt_len = tokens.shape[1]
        # from scratch the model answers at once: the longest answer and EOS; a pretrained
        # model writes its reasoning first
        self.max_new_tokens = config.max_new_tokens or (
            64 if self.pretrained else 1 + max(len(ids) for ids in self.text.answer_ids(
                [e["answer"] for e in (*self.train.entries, *self.held_out.entries)])))
        self._last: tuple[Tensor, np.ndarray, np.ndarray] | None = None
        self._samples: list[tuple[str, list[dict[str, Any]]]] = []
        self.reference_metrics: dict[str, float] | None = None
        self._policy_due = False  # set by should_evaluate, read by evaluate

    # --- prompts and rewards ----------------------------------------------------------------
    def sample_prompts(self, n: int, generator: torch.Generator) -> Prompts:
        """``n`` items of the training pool drawn uniformly with replacement; ``index``
        holds their positions in the pool."""
        index = torch.randint(len(self.train.entries), (n,), generator=generator)
        rows = self.question_row[index]
        return Prompts(self.prompt_tokens[rows], self.prompt_mask[rows], index)

    def _fallback(self, entry: dict[str, Any]) -> str:
        fallback = self.config.answer_fallback
        if fallback != "auto":
            return fallback
        return "last_number" if _is_number(entry["answer"]) else "completion"

    def _score(self, rollout: Rollout, questions_: Questions) -> tuple[list[str], list[Extracted],
                                                                        np.ndarray]:
        """Completion texts, the answers read from them, and their scores by the dataset."""
        if rollout.prompt_index is None:
            raise ValueError("task=reasoning scores rollouts of its own prompts: "
                             "rollout.prompt_index must be set")
        texts = self.text.completions(rollout)
        entries = [questions_.entries[i] for i in rollout.prompt_index.tolist()]
        answers = [extract_answer(text, tag=self.config.answer_tag,
                                  fallback=self._fallback(entry))
                   for text, entry in zip(texts, entries, strict=True)]
        scores = np.array([float(questions_.dataset.score_answer(a.answer, entry))
                           for a, entry in zip(answers, entries, strict=True)])
        return texts, answers, scores

    def reward(self, rollout: Rollout) -> Tensor:
        """The dataset's score of each completion's answer, plus the format term."""
        _, answers, scores = self._score(rollout, self.train)
        tagged = np.array([a.tagged for a in answers], dtype=np.float64)
        self._last = (rollout.tokens, scores, tagged)
        rewards = scores + self.config.format_weight * tagged
        return torch.tensor(rewards, dtype=torch.float32, device=rollout.tokens.device)

    def reward_metrics(self, rollout: Rollout, rewards: Tensor) -> dict[str, float]:
        """``reward/score`` (the verifier's mean score, without the format term) and
        ``reward/format_rate`` (the share of completions that used the tag)."""
        if self._last is None or self._last[0] is not rollout.tokens:
            return {}
        _, scores, tagged = self._last
        return {"reward/score": float(scores.mean()), "reward/format_rate": float(tagged.mean())}

    def reference_recipe(self) -> ReferenceRecipe | None:
        """A from-scratch model's reference: SFT on question → answer pairs of the pool.
        None with a pretrained model, which is its own reference."""
        if self.pretrained:
            return None
        c = self.config
        key = {"task": self.name, "source": asdict(self.source), "train_seed": c.train_seed,
               "train_size": c.train_size, "held_out": [c.eval_seed, len(self.held_out.entries)],
               "prompt": "plain", "chars": self.text.tokenizer.chars,
               "reference": asdict(c.reference)}
        return ReferenceRecipe(key=key, sample_batch=self._sft_batch, steps=c.reference.steps,
                               lr=c.reference.lr, seed=c.reference.seed, cache_dir=c.cache_dir)

    def _sft_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``reference.batch_size`` pool items as BOS + question + newline + answer + EOS,
        right-padded: tokens [B, T] and the mask [B, T−1] of the targets to learn (the
        answer and EOS)."""
        index = torch.randint(len(self.train.entries), (self.config.reference.batch_size,),
                              generator=generator).tolist()
        entries = [self.train.entries[i] for i in index]
        prompts = self.text.prompt_ids([e["question"] for e in entries])
        answers = [ids + [self.eos_id] for ids in self.text.answer_ids([e["answer"]
                                                                          for e in entries])]
        width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
        tokens = torch.full((len(entries), width), self.text.pad_id, dtype=torch.long)
        targets = torch.zeros(len(entries), width - 1)
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            tokens[i, :len(p) + len(a)] = torch.tensor(p + a)
            targets[i, len(p) - 1:len(p) + len(a) - 1] = 1.0
        return tokens, targets

    # --- evaluation -------------------------------------------------------------------------
    def should_evaluate(self, step: int, total_steps: int) -> bool:
        self._policy_due = (step + 1) % self.evaluation.every == 0 or step + 1 == total_steps
        return self.reference_metrics is None or self._policy_due

    def evaluate(self, pair: PolicyPair, step: int, beta_seq: float) -> dict[str, float]:
        """The reference's metrics once (``eval/ref_*``, at the first step), the policy's
        every ``eval.every`` steps and at the last (``eval/*``)."""
        metrics: dict[str, float] = {}
        if self.reference_metrics is None:
            start = pair.reference if pair.initial is None else pair.initial
            self.reference_metrics = self._evaluate(pair, start, "eval/ref_", "reference",
                                                    self.evaluation.seed)
            metrics.update(self.reference_metrics)
            e, acc = self.evaluation, self.reference_metrics["eval/ref_accuracy"]
            log.info(f"klsweep: the reference's held-out accuracy is {acc:.3f} "
                     f"({len(self.held_out.entries)} questions × {e.samples} samples; "
                     f"pass@{max(e.k)} {self.reference_metrics[f'eval/ref_pass@{max(e.k)}']:.3f})")
        if self._policy_due:
            metrics.update(self._evaluate(pair, pair.policy, "eval/", f"step_{step}",
                                          self.evaluation.seed + step + 1))
        return metrics

    def _evaluate(self, pair: PolicyPair, model: torch.nn.Module, prefix: str, name: str,
                  seed: int) -> dict[str, float]:
        e = self.evaluation
        with gathered(model):
            sampled = sample_for_evaluation(
                model, self.held_out_prompts.to(pair.device), samples=e.samples,
                temperature=e.temperature or pair.temperature,
                max_new_tokens=self.max_new_tokens, eos_id=self.eos_id, seed=seed)
        texts, answers, scores = self._score(sampled.rollout, self.held_out)
        tagged = np.array([a.tagged for a in answers], dtype=np.float64)
        shape = (len(self.held_out.entries), e.samples)
        self._samples.append((name, [
            {"question": self.held_out.entries[i]["question"], "completion": text,
             "extracted_answer": a.answer, "tagged": a.tagged, "score": float(s),
             "entry": self.held_out.entries[i]}
            for i, text, a, s in zip(sampled.rollout.prompt_index.tolist(), texts, answers,
                                     scores, strict=True)]))
        return evaluation_metrics(scores.reshape(shape), tagged.reshape(shape),
                                  sampled.entropy.cpu(), sampled.rollout.mask.cpu(), e.k, prefix)

    def take_samples(self) -> list[tuple[str, list[dict[str, Any]]]]:
        samples, self._samples = self._samples, []
        return samples

    def state_dict(self) -> dict[str, Any]:
        return {"reference_metrics": self.reference_metrics}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference_metrics = state.get("reference_metrics")

    def finalize(self, pair: PolicyPair, run_dir: Path) -> None:
        """A from-scratch model's tokenizer goes beside the run's record (tokenizer.json)."""
        if not self.pretrained:
            self.text.tokenizer.save(Path(run_dir) / "tokenizer.json")
