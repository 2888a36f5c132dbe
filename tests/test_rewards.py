"""Rewards of the text task: the built-ins, terms from config with weights, user callables
by ``_target_``, the reward model, and every way a reward can misbehave ending the run in one
line."""

from __future__ import annotations

import math
import re

import pytest
import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2Config

from klsweep.config import ConfigError, choice_config
from klsweep.errors import RunFailed
from klsweep.rewards import (
    REWARDS,
    RewardModel,
    RewardTerm,
    arithmetic_reward,
    format_reward,
    length_reward,
    main,
    make_arithmetic,
    reward_terms,
    score_terms,
    sentiment_reward,
)
from klsweep.rollout import Rollout
from klsweep.tasks.text import TextTask
from tests.hf_fixtures import build_tokenizer

HERE = __name__  # the import path of this module, for _target_


def words_reward(prompts, completions, *, scale: float = 1.0, **row_fields):
    """A user reward of TRL's shape: ``scale`` × the number of words."""
    return [scale * len(c.split()) for c in completions]


def echo_bonus(prompts, completions, bonus, **row_fields):
    """A user reward that reads a row field."""
    return [float(b) for b in bonus]


def exploding_reward(prompts, completions, **row_fields):
    raise KeyError("no such thing\nsecond line")


def short_reward(prompts, completions, **row_fields):
    return [1.0]


def nan_reward(prompts, completions, **row_fields):
    return [math.nan] * len(completions)


def none_reward(prompts, completions, **row_fields):
    return [None] * len(completions)


def text_reward(prompts, completions, **row_fields):
    return ["0.5" for _ in completions]


def bool_reward(prompts, completions, **row_fields):
    return [True for _ in completions]


def strict_reward(prompts, completions):
    return [0.0] * len(completions)


def scalar_reward(prompts, completions, **row_fields):
    return 1.0


NOT_CALLABLE = 3


def _score(spec, completions, **row_fields):
    return score_terms(reward_terms(spec), [""] * len(completions), completions, row_fields)


def test_sentiment_scores_positive_text_above_neutral_above_negative():
    scores = sentiment_reward([""] * 3, ["What a wonderful day, I love it!",
                                          "The cat sat on the mat.",
                                          "This is terrible, I hate it."])
    assert scores[0] > 0.75 and scores[1] == 0.5 and scores[2] < 0.25
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_length_reward_is_one_at_the_target_and_falls_linearly():
    scores = length_reward([""] * 4, ["a b c d", "a b", "", "a b c d e f g h"], target_words=4)
    assert scores == [1.0, 0.5, 0.0, 0.0]


def test_format_reward_searches_its_pattern():
    assert format_reward([""] * 2, ["It ends.", "it does not"]) == [1.0, 0.0]
    assert format_reward([""] * 2, ["<a>7</a>", "7"], pattern=r"^<a>\d+</a>$") == [1.0, 0.0]


def test_arithmetic_reward_reads_the_tagged_answer_else_the_last_number():
    completions = [" 19", "The answer is 19.", "18, no, 19", "no idea", " -48 apples", "2.50",
                   "49 - 97 = -48", "19 is close; <answer>20</answer>", "<answer>x = 19</answer>",
                   "19 + 1 = 20", "1,019", "5-3"]
    answers = [19, "19", 19, 19, -48, 2.5, -48, 20, 19, 19, 1019, 3]
    assert arithmetic_reward([""] * 12, completions, answers) == [1, 1, 1, 0, 1, 1, 1, 1, 1, 0,
                                                                  1, 1]


def test_make_arithmetic_is_reproducible_and_its_answers_are_right():
    rows = make_arithmetic(200, seed=3)
    assert rows == make_arithmetic(200, seed=3) and rows != make_arithmetic(200, seed=4)
    for row in rows:
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\? Answer:", row["prompt"]).groups()
        assert row["answer"] == eval(f"{a} {op} {b}")
    assert {row["prompt"].split()[3] for row in rows} == {"+", "-", "*"}


def test_make_arithmetic_command_writes_a_prompt_file_the_reward_scores(tmp_path, capsys):
    out = tmp_path / "arith.jsonl"
    main(["make-arithmetic", str(out), "--n", "20", "--seed", "0", "--ops", "+"])
    rows = list(load_dataset("json", data_files=str(out), split="train", streaming=True,
                             cache_dir=str(tmp_path / "cache")))
    assert rows == make_arithmetic(20, seed=0, ops="+")
    answers = [row["answer"] for row in rows]
    assert _score("arithmetic", [f" {a}" for a in answers], answer=answers).tolist() == [1.0] * 20
    assert "wrote 20 problems" in capsys.readouterr().out


def test_a_single_name_is_one_built_in_term_of_weight_one():
    (term,) = reward_terms("sentiment")
    assert term == RewardTerm("sentiment", REWARDS["sentiment"], 1.0)


def test_weighted_terms_sum_with_options_bound():
    spec = [{"name": "length", "weight": 2.0, "target_words": 2},
            {"_target_": f"{HERE}.words_reward", "weight": 0.5, "scale": 3.0}]
    total = _score(spec, ["a b", "a"])
    # a b: 2·1 + 0.5·3·2 = 5;  a: 2·0.5 + 0.5·3·1 = 2.5
    assert total.tolist() == [5.0, 2.5] and total.dtype == torch.float32


def test_a_target_node_gets_the_row_fields_as_keywords():
    assert _score({"_target_": f"{HERE}.echo_bonus"}, ["x", "y"], bonus=[2, 3]).tolist() == [2, 3]


def test_a_callable_without_a_python_signature_is_accepted_unchecked():
    # callables implemented in C may have no signature: they are called, not checked
    (term,) = reward_terms({"_target_": "builtins.print"})
    assert term.name == "builtins.print"


@pytest.mark.parametrize(("target", "message"), [
    ("exploding_reward", "reward {t} raised KeyError: 'no such thing"),
    ("short_reward", "reward {t} returned 1 values for 2 completions"),
    ("nan_reward", "reward {t} returned nan for completion 0 (a finite number is needed)"),
    ("none_reward", "reward {t} returned None for completion 0 (a finite number is needed)"),
    ("scalar_reward", "reward {t} returned a float, not a list of 2 numbers"),
    ("text_reward", "reward {t} returned '0.5' for completion 0 (a finite number is needed)"),
    ("bool_reward", "reward {t} returned True for completion 0 (a finite number is needed)"),
])
def test_a_misbehaving_reward_ends_the_run_in_one_line(target, message):
    target = f"{HERE}.{target}"
    with pytest.raises(RunFailed) as err:
        _score([{"name": "length"}, {"_target_": target}], ["a", "b"])
    assert str(err.value).startswith(message.format(t=target))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("spec", "columns", "message"), [
    ("sentimental", None,
     "task.reward.name must be one of sentiment, length, format, arithmetic "
     "(got 'sentimental')"),
    ([{"name": "length"}, {"name": "nope"}], None,
     "task.reward[1].name must be one of sentiment, length, format, arithmetic (got 'nope')"),
    ({"_target_": "no_such_module.reward"}, None,
     "task.reward._target_ must name an importable callable (got 'no_such_module.reward': "
     "Error locating target 'no_such_module.reward')"),
    ({"_target_": f"{HERE}.NOT_CALLABLE"}, None,
     "task.reward._target_ must name an importable callable (got '{HERE}.NOT_CALLABLE': "
     "Expected a callable target, got '3' of type 'int')"),
    ({"name": "length", "target_wrods": 3}, None,
     "task.reward.target_wrods is not an option of reward length (allowed: target_words)"),
    ({"name": "length", "_target_": f"{HERE}.words_reward"}, None,
     "task.reward must be a built-in reward name"),
    ({"name": "length", "weight": "heavy"}, None,
     "task.reward.weight must be a number (got 'heavy')"),
    (3, None, "task.reward must be a built-in reward name"),
    ("arithmetic", ["question"],
     "task.reward: reward arithmetic cannot be called as f(prompts, completions, **row_fields) "
     "with the prompt data's fields (question): missing a required argument: 'answer'"),
])
def test_a_bad_reward_spec_fails_before_training_in_one_line(spec, columns, message):
    with pytest.raises(ConfigError) as err:
        reward_terms(spec, columns=columns)
    assert str(err.value).startswith(message.replace("{HERE}", HERE))
    assert "\n" not in str(err.value)


def test_a_reward_without_row_keywords_cannot_take_extra_columns():
    with pytest.raises(ConfigError, match="got an unexpected keyword argument 'answer'"):
        reward_terms({"_target_": f"{HERE}.strict_reward"}, columns=["answer"])


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rm")
    tokenizer = build_tokenizer(directory)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1,
                        n_head=2, num_labels=1, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
    return directory


def test_reward_model_scores_prompt_plus_completion_alike_in_any_batch(reward_model_dir):
    prompts, completions = ["The movie was", "What", "I"], [" good.", " is 2 + 3?", " hate it"]
    model = RewardModel(str(reward_model_dir), batch_size=2)
    scores = model(prompts, completions)
    reference = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    with torch.inference_mode():
        alone = [reference(**tokenizer(p + c, return_tensors="pt")).logits[0, 0].item()
                 for p, c in zip(prompts, completions, strict=True)]
    assert scores == pytest.approx(alone, abs=1e-5)  # right padding is invisible to the score
    assert len(set(scores)) == 3


def test_the_text_task_adds_its_reward_model_with_its_weight(reward_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    Dataset.from_list([{"prompt": "The movie was"}]).to_json(str(prompts))
    config = choice_config("task", "text", prompts=str(prompts), reward="length",
                           reward_model=str(reward_model_dir), reward_model_weight=0.5,
                           reward_batch_size=1)
    task = TextTask(config, AutoTokenizer.from_pretrained(reward_model_dir))
    completion = task.tokenizer(" good.", add_special_tokens=False)["input_ids"] + [task.eos_id]
    index = torch.tensor([0, 0])
    rollout = Rollout(tokens=torch.cat([task.prompt_tokens[index],
                                        torch.tensor([completion] * 2)], dim=1),
                      prompt_mask=task.prompt_mask[index], mask=torch.ones(2, len(completion),
                                                                            dtype=torch.bool),
                      old_logp=torch.zeros(2, len(completion)), prompt_index=index)
    (score,) = RewardModel(str(reward_model_dir), 1)(["The movie was"], [" good."])
    expected = length_reward([""], [" good."])[0] + 0.5 * score
    assert task.reward(rollout).tolist() == pytest.approx([expected] * 2, abs=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reward_model_runs_in_bf16_on_the_gpu_close_to_float32(reward_model_dir):
    texts = (["The movie was", "What"], [" good.", " is 2 + 3?"])
    on_cpu = RewardModel(str(reward_model_dir), batch_size=2)(*texts)
    model = RewardModel(str(reward_model_dir), batch_size=2).to(torch.device("cuda"))
    assert next(model.model.parameters()).dtype == torch.bfloat16
    assert model(*texts) == pytest.approx(on_cpu, abs=0.05)
