"""Rewards of the text task: built-in offline rewards, user callables and a reward model, all
with TRL's shape ``f(prompts, completions, **row_fields) -> list[float]``, and the weighted
sum the task returns.

``task.reward`` takes one of three forms (``weight`` defaults to 1; any other key of a node
is a keyword option of the function, bound with ``functools.partial``)::

    reward: sentiment                              # a built-in by name
    reward: {_target_: mypkg.rewards.f, scale: 2}  # a callable by import path
    reward:                                        # a weighted sum of terms
      - {name: sentiment, weight: 1.0}
      - {name: length, weight: 0.5, target_words: 30}
      - {_target_: mypkg.rewards.f, weight: 0.5}

``row_fields`` are the prompt data set's other columns for the scored rows, one list each.

Also a generator of arithmetic prompt files with answers, for a ready offline task::

    python -m klsweep.rewards make-arithmetic out.jsonl --n 1000 --seed 0
"""

from __future__ import annotations

import argparse
import functools
import inspect
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor

from klsweep.answers import numeric_answer
from klsweep.errors import RunFailed
from klsweep.schema import ConfigError, check_value

RewardFn = Callable[..., Sequence[float]]


@functools.cache
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()  # reads the lexicon bundled with the wheel


def sentiment_reward(prompts: list[str], completions: list[str], **row_fields: Any) -> list[float]:
    """VADER's compound sentiment of each completion, mapped from [-1, 1] to [0, 1] (0.5:
    neutral), the scale of the synthetic tasks' rewards so that β compares across tasks.
    Positive continuations under a KL penalty are the setting of Ziegler et al. (2019)."""
    return [(_vader().polarity_scores(c)["compound"] + 1.0) / 2.0 for c in completions]


def length_reward(prompts: list[str], completions: list[str], *, target_words: int = 20,
                  **row_fields: Any) -> list[float]:
    """Closeness of each completion's word count w to ``target_words`` t (>= 1):
    max(0, 1 − |w − t| / t), 1 at the target and 0 at no words or at 2t and beyond."""
    if target_words < 1:
        raise ValueError(f"target_words must be >= 1 (got {target_words})")
    return [max(0.0, 1.0 - abs(len(c.split()) - target_words) / target_words)
            for c in completions]


def format_reward(prompts: list[str], completions: list[str], *, pattern: str = r"[.!?]\s*$",
                  **row_fields: Any) -> list[float]:
    """1 where the regular expression ``pattern`` matches somewhere in the completion
    (``re.search``; anchor it with ^ and $ to match the whole text), else 0. The default
    asks for a completion that ends a sentence."""
    regex = re.compile(pattern)
    return [float(regex.search(c) is not None) for c in completions]


def arithmetic_reward(prompts: list[str], completions: list[str], answer: list[Any],
                      **row_fields: Any) -> list[float]:
    """Exact answer: 1 where the completion's answer equals the row's ``answer`` column, else
    0 (also when it has none). The answer is read as real instruction-tuned models write it
    (klsweep.answers): the number in the last ``<answer>…</answer>``, else the last number
    of the completion ("49 - 97 = -48" answers -48)."""
    scores = []
    for completion, expected in zip(completions, answer, strict=True):
        found = numeric_answer(completion)
        scores.append(float(found is not None and found == float(expected)))
    return scores


REWARDS: dict[str, RewardFn] = {"sentiment": sentiment_reward, "length": length_reward,
                                "format": format_reward, "arithmetic": arithmetic_reward}


# ---------------------------------------------------------------------------------------------
# Terms of the reward, from config


@dataclass(frozen=True)
class RewardTerm:
    """One term of the task reward: ``weight`` × ``fn``; ``name`` names it in errors."""

    name: str
    fn: RewardFn
    weight: float = 1.0


def reward_terms(spec: Any, key: str = "task.reward",
                 columns: Sequence[str] | None = None) -> list[RewardTerm]:
    """The terms ``spec`` describes (a name, a node or a list of them, see the module's
    docstring; None: no term). Raises ConfigError, in one line, on an unknown name, a target
    that does not import, an unknown option, or, when the data's ``columns`` (its fields
    besides the prompt) are given, a function that cannot be called with them."""
    if isinstance(spec, (DictConfig, ListConfig)):
        spec = OmegaConf.to_container(spec, resolve=True)
    if spec is None:
        return []
    if isinstance(spec, list):
        return [_term(item, f"{key}[{i}]", columns) for i, item in enumerate(spec)]
    return [_term(spec, key, columns)]


def _term(item: Any, key: str, columns: Sequence[str] | None) -> RewardTerm:
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict) or ("name" in item) == ("_target_" in item):
        raise ConfigError(f"{key} must be a built-in reward name ({', '.join(REWARDS)}), a node "
                          f"with exactly one of name or _target_, or a list of them "
                          f"(got {item!r})")
    options = dict(item)
    weight = options.pop("weight", 1.0)
    check_value(f"{key}.weight", weight, {"kind": "number"})
    if "name" in options:
        name = options.pop("name")
        fn = _builtin(name, key)
    else:
        name = options.pop("_target_")
        fn = _import(name, key)
    _check_options(fn, options, key, name)
    bound = functools.partial(fn, **options) if options else fn
    if columns is not None:
        _check_fits(bound, columns, key, name)
    return RewardTerm(name, bound, float(weight))


def _builtin(name: Any, key: str) -> RewardFn:
    if name not in REWARDS:
        raise ConfigError(f"{key}.name must be one of {', '.join(REWARDS)} (got {name!r})")
    return REWARDS[name]


# the tail of Hydra's messages, which points at an environment variable, not at the config
_HYDRA_HINT = re.compile(r",? set env var HYDRA_FULL_ERROR=1 to see chained exception\.?$")


def _import(target: Any, key: str) -> RewardFn:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if not isinstance(target, str):
        raise ConfigError(f"{key}._target_ must be an import path (got {target!r})")
    try:
        # _partial_ only locates the callable; Hydra's target policy then applies to its calls
        deferred = instantiate({"_target_": target, "_partial_": True})
    except InstantiationException as err:
        reason = _HYDRA_HINT.sub("", str(err).splitlines()[0])
        raise ConfigError(f"{key}._target_ must name an importable callable "
                          f"(got {target!r}: {reason})") from None
    return deferred


def _signature(fn: RewardFn) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some callables implemented in C have none
        return None


def _check_options(fn: RewardFn, options: dict[str, Any], key: str, name: str) -> None:
    """Options must be named parameters: a typo would vanish into ``**row_fields``."""
    signature = _signature(fn)
    if signature is None:
        return
    named = [p.name for p in signature.parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             and p.name not in ("prompts", "completions")]
    for option in options:
        if option not in named:
            raise ConfigError(f"{key}.{option} is not an option of reward {name} "
                              f"(allowed: {', '.join(named) or 'none'})")


def _check_fits(fn: RewardFn, columns: Sequence[str], key: str, name: str) -> None:
    """The call the task makes, bound without running: TRL's keywords plus every column."""
    signature = _signature(fn)
    if signature is None:
        return
    try:
        signature.bind(prompts=[], completions=[], **dict.fromkeys(columns))
    except TypeError as err:
        raise ConfigError(f"{key}: reward {name} cannot be called as f(prompts, completions, "
                          f"**row_fields) with the prompt data's fields "
                          f"({', '.join(columns) or 'none'}): {err}") from None


# ---------------------------------------------------------------------------------------------
# Scoring


def score_terms(terms: Sequence[RewardTerm], prompts: list[str], completions: list[str],
                row_fields: dict[str, list[Any]]) -> Tensor:
    """Σ weight × term over ``terms``, [B] float32; a term that raises, returns the wrong
    number of values or a value that is not a finite number ends the run (RunFailed)."""
    total = torch.zeros(len(completions))
    for term in terms:
        total += term.weight * torch.tensor(_call(term, prompts, completions, row_fields))
    return total


def _call(term: RewardTerm, prompts: list[str], completions: list[str],
          row_fields: dict[str, list[Any]]) -> list[float]:
    n = len(completions)
    try:
        values = term.fn(prompts=prompts, completions=completions, **row_fields)
    except Exception as err:
        what = type(err).__name__ + (f": {str(err).splitlines()[0]}" if str(err) else "")
        raise RunFailed(f"reward {term.name} raised {what}") from err
    try:
        values = list(values)
    except TypeError:
        raise RunFailed(f"reward {term.name} returned a {type(values).__name__}, "
                        f"not a list of {n} numbers") from None
    if len(values) != n:
        raise RunFailed(f"reward {term.name} returned {len(values)} values "
                        f"for {n} completions")
    return [_number(term.name, i, v) for i, v in enumerate(values)]


def _number(name: str, i: int, value: Any) -> float:
    try:
        # float() would also read "0.5" and True: a reward of the wrong type is a bug to name
        number = math.nan if isinstance(value, (str, bytes, bool)) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise RunFailed(f"reward {name} returned {value!r} for completion {i} "
                        f"(a finite number is needed)")
    return number


class RewardModel:
    """A sequence-classification reward model with one label: the score of a completion is
    ``.logits[:, 0]`` on prompt + completion text (TRL's concatenation), right-padded, in
    batches of ``batch_size``; bf16 on a GPU."""

    def __init__(self, path: str, batch_size: int) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = path
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        # the classifier reads the last token before the first pad: it must know the pad id
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval().requires_grad_(False)
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> RewardModel:
        if device != self.device:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            self.model.to(device=device, dtype=dtype)
            self.device = device
        return self

    @torch.inference_mode()
    def __call__(self, prompts: list[str], completions: list[str],
                 **row_fields: Any) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True,
                                   truncation=True, return_tensors="pt").to(self.device)
            scores += self.model(**batch).logits[:, 0].float().tolist()
        return scores


# ---------------------------------------------------------------------------------------------
# An offline arithmetic task


def make_arithmetic(n: int, seed: int, max_operand: int = 99,
                    ops: str = "+-*") -> list[dict[str, Any]]:
    """``n`` rows ``{"prompt": "What is 12 + 7? Answer:", "answer": 19}`` with operands in
    0..``max_operand`` and operators from ``ops``, reproducible from ``seed``."""
    compute = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(ops)
        rows.append({"prompt": f"What is {a} {op} {b}? Answer:", "answer": compute[op](a, b)})
    return rows


def write_arithmetic(path: str, n: int, seed: int, max_operand: int = 99,
                     ops: str = "+-*") -> None:
    """Write ``make_arithmetic``'s rows to ``path`` as JSON lines, for ``task.prompts``
    with ``task.reward: arithmetic``."""
    from datasets import Dataset

    Dataset.from_list(make_arithmetic(n, seed, max_operand, ops)).to_json(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m klsweep.rewards")
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-arithmetic",
                               help="write an arithmetic prompt file with answers (JSON lines)")
    make.add_argument("out")
    make.add_argument("--n", type=int, default=1000, help="number of problems")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--max-operand", type=int, default=99)
    make.add_argument("--ops", default="+-*", help="operators to draw from, of + - *")
    args = parser.parse_args(argv)
    if args.n < 1 or args.max_operand < 0 or not args.ops or set(args.ops) - set("+-*"):
        parser.error("--n must be >= 1, --max-operand >= 0 and --ops made of + - *")
    from datasets import disable_progress_bars

    disable_progress_bars()  # this command says what it wrote in one line
    write_arithmetic(args.out, args.n, args.seed, args.max_operand, args.ops)
    print(f"wrote {args.n} problems to {args.out}")


if __name__ == "__main__":
    main()
