"""task=reasoning on small reasoning-gym data sets: the training pool and the held-out set
share neither a seed nor a question, prompts fit the model (plain from scratch, chat with
reasoning-gym's answer-format instruction for instruct tokenizers), the reward is the
dataset's own score_answer of the answer the rule reads, and the reference's SFT learns the
answer and EOS only."""

from __future__ import annotations

import dataclasses

import pytest
import reasoning_gym
import torch
from reasoning_gym.utils import SYSTEM_PROMPTS

from klsweep.config import choice_config
from klsweep.rollout import Prompts, Rollout
from klsweep.tasks import EvalConfig
from klsweep.tasks.reasoning import ReasoningTask
from klsweep.tasks.reasoning_data import evaluation_set, source_of, training_pool
from tests.hf_fixtures import build_tokenizer

EVAL = EvalConfig(every=2, prompts=16, samples=4, k=[1, 2, 4], temperature=None, seed=0)


def small_task(tokenizer=None, evaluation=EVAL, **task) -> ReasoningTask:
    """A reasoning task of 600 pool items; ``dataset_config`` and ``datasets`` replace the
    YAML's (a merge would mix two datasets' options)."""
    replaced = {key: task.pop(key) for key in ("dataset_config", "datasets") if key in task}
    config = choice_config("task", "reasoning", **{"train_size": 600, "cache_dir": "unused",
                                                   "max_prompt_tokens": 1024, **task})
    return ReasoningTask(dataclasses.replace(config, **replaced), tokenizer, evaluation)


def test_the_training_pool_and_the_held_out_set_share_no_seed_and_no_question():
    # two-term one-digit sums have 200 distinct questions: 600 draws repeat many, so the
    # text check, not only the seeds, keeps the held-out questions out of training
    task = small_task(dataset="basic_arithmetic",
                      dataset_config={"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                      "max_digits": 1, "operators": ["+", "-"],
                                      "allow_parentheses": False, "allow_negation": False})
    train, held = task.train, task.held_out
    assert not set(train.seeds) & set(held.seeds)
    held_questions = {e["question"] for e in held.entries}
    assert len(held_questions) == EVAL.prompts  # distinct held-out questions
    assert not held_questions & {e["question"] for e in train.entries}
    raw = reasoning_gym.create_dataset(task.config.dataset, size=600, seed=0,
                                       **task.config.dataset_config)
    dropped = [e for e in raw if e["question"] in held_questions]
    assert dropped and len(train.entries) == 600 - len(dropped)  # the check had work to do


def test_the_pool_is_the_datasets_own_items_from_its_seed():
    source = source_of("chain_sum", {"min_terms": 2, "max_terms": 2}, None)
    held = evaluation_set(source, 10_000, 4)
    pool = training_pool(source, 7, 50, frozenset(e["question"] for e in held.entries))
    expected = reasoning_gym.create_dataset("chain_sum", size=50, seed=7, min_terms=2,
                                            max_terms=2)
    assert pool.entries == [e for e in expected if e["question"] not in
                            {h["question"] for h in held.entries}]


def test_a_from_scratch_model_reads_plain_prompts_in_its_own_characters():
    task = small_task()
    assert not task.pretrained and task.text.tokenizer.chars[0] == "\n"
    prompts = task.sample_prompts(5, torch.Generator().manual_seed(0))
    for tokens, mask, i in zip(prompts.tokens, prompts.mask, prompts.index, strict=True):
        ids = tokens[mask].tolist()
        assert ids[0] == task.text.bos_id
        assert task.text.decode([ids])[0] == task.train.entries[i]["question"] + "\n"
    # room for the longest answer and EOS, no more
    longest = max(len(e["answer"]) for e in task.train.entries + task.held_out.entries)
    assert task.max_new_tokens == longest + 1


def test_an_instruct_tokenizer_gets_the_chat_template_with_the_answer_format(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    task = small_task(tokenizer)
    prompts = task.held_out_prompts
    text = tokenizer.decode(prompts.tokens[0][prompts.mask[0]])
    question = task.held_out.entries[0]["question"]
    assert text == tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM_PROMPTS["default"]},
         {"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    assert "<answer>" in text and task.max_new_tokens == 64
    plain = small_task(tokenizer, prompt_format="plain").held_out_prompts
    assert tokenizer.decode(plain.tokens[0][plain.mask[0]], skip_special_tokens=True) == (
        question + "\n")


def rollout_of(task: ReasoningTask, completions: list[str], index: list[int]) -> Rollout:
    """A rollout whose completions are ``completions`` (EOS-terminated) of pool items."""
    if task.pretrained:
        encoded = task.text.tokenizer(completions, add_special_tokens=False)["input_ids"]
    else:
        encoded = task.text.tokenizer.encode(completions)
    ids = [row + [task.eos_id] for row in encoded]
    width = max(len(row) for row in ids)
    tokens = torch.full((len(ids), width), task.eos_id)
    mask = torch.zeros(len(ids), width, dtype=torch.bool)
    for i, row in enumerate(ids):
        tokens[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), True
    prompts = task.sample_prompts(len(ids), torch.Generator().manual_seed(0))
    return Rollout(tokens=torch.cat([prompts.tokens, tokens], 1), prompt_mask=prompts.mask,
                   mask=mask, old_logp=torch.zeros(mask.shape),
                   prompt_index=torch.tensor(index))


def test_the_reward_is_score_answer_of_the_answer_read_plus_the_format_term(tmp_path):
    task = small_task(build_tokenizer(tmp_path), format_weight=0.5, dataset="basic_arithmetic",
                      dataset_config={"min_terms": 2, "max_terms": 3, "min_digits": 1,
                                      "max_digits": 1})
    dataset = task.train.dataset
    entries = task.train.entries[:4]
    answer = entries[0]["answer"]
    completions = [answer, f"<answer>{answer}</answer>", f"so 1 then {entries[2]['answer']}",
                   f"<answer>{answer}9</answer>"]
    rollout = rollout_of(task, completions, [0, 0, 2, 0])
    rewards = task.reward(rollout)
    # the tag wins; without it the last number (these answers are numbers); the tagged wrong
    # answer gets basic_arithmetic's partial credit for containing the right one
    expected = [dataset.score_answer(answer, entries[0]),
                dataset.score_answer(answer, entries[0]) + 0.5,
                dataset.score_answer(entries[2]["answer"], entries[2]),
                dataset.score_answer(answer + "9", entries[0]) + 0.5]
    torch.testing.assert_close(rewards, torch.tensor(expected))
    assert 0 < expected[3] - 0.5 < 1  # a partial score: the test covers one
    metrics = task.reward_metrics(rollout, rewards)
    assert metrics["reward/format_rate"] == 0.5
    assert metrics["reward/score"] == pytest.approx((sum(expected) - 1.0) / 4)


def test_a_text_answer_falls_back_to_the_whole_completion():
    task = small_task(dataset="spell_backward", dataset_config={"min_word_len": 3,
                                                               "max_word_len": 5})
    entry = task.train.entries[0]
    rewards = task.reward(rollout_of(task, [f"  {entry['answer']} ", "x 12"], [0, 0]))
    assert rewards.tolist() == [1.0, 0.0]


def test_the_reference_learns_the_answer_and_eos_after_the_plain_prompt():
    task = small_task()
    tokens, targets = task._sft_batch(torch.Generator().manual_seed(0))
    for row, target in zip(tokens, targets, strict=True):
        learned = row[1:][target.bool()].tolist()
        assert learned[-1] == task.eos_id
        prompt_end = (row == task.text.tokenizer.encode(["\n"])[0][0]).nonzero()[0, 0]
        text = task.text.decode([row[1:prompt_end + 1].tolist()])[0]
        entry = next(e for e in task.train.entries if e["question"] + "\n" == text)
        assert task.text.decode([learned[:-1]])[0] == entry["answer"]


def test_a_composite_mixes_its_datasets_by_weight_and_leaves_weight_zero_out():
    datasets = {"chain_sum": {"weight": 1.0, "config": {"min_terms": 2, "max_terms": 2}},
                "count_bits": {"weight": 3.0}, "spell_backward": {"weight": 0}}
    task = small_task(dataset="composite", datasets=datasets, train_size=400)
    sources = [e["metadata"]["source_dataset"] for e in task.train.entries]
    assert set(sources) == {"chain_sum", "count_bits"}
    assert 0.15 < sources.count("chain_sum") / len(sources) < 0.35  # 1/4 ± 4.6 SE at n=400
    entry = task.train.entries[sources.index("count_bits")]
    rewards = task.reward(rollout_of(task, [entry["answer"]], [sources.index("count_bits")]))
    assert rewards.tolist() == [1.0]


def test_held_out_prompts_index_the_held_out_questions():
    task = small_task()
    prompts: Prompts = task.held_out_prompts
    assert prompts.index.tolist() == list(range(EVAL.prompts))
    assert task.prompt_len == max(task.prompt_tokens.shape[1], prompts.tokens.shape[1])
