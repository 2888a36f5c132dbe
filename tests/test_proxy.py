"""task.reward_source=proxy: the proxy reward model's data, its cache and random state, what
the policy is rewarded with, and the gold and proxy figures the tasks log."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from klsweep.config import ConfigError, choice_config, compose_and_validate
from klsweep.exact_math import expected_reward
from klsweep.kl.divergences import make_divergence
from klsweep.models.tiny import TinyGPT
from klsweep.preferences import bradley_terry_loss
from klsweep.rollout import Prompts, generate
from klsweep.tasks.digits import DigitsTask, digit_reward
from klsweep.tasks.exact import ExactTask
from klsweep.tasks.proxy import last_positions

SMALL_PROXY = {"pairs": 64, "steps": 20, "batch_size": 16}


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as a run has by default (``threads: 1``): a tiny model's ops are
    overhead, and on a busy machine more threads make its training many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _exact(tmp_path, reward_source="proxy", proxy=None, **task):
    return ExactTask(choice_config(
        "task", "exact", vocab_size=4, completion_len=3, n_prompts=2, cache_dir=str(tmp_path),
        reward_source=reward_source, proxy={**SMALL_PROXY, **(proxy or {})}, **task))


def _model(task, seed=0):
    torch.manual_seed(seed)
    model = TinyGPT(choice_config("model", "tiny", n_layer=1, n_head=2, n_embd=16),
                    task.vocab_size, task.prompt_len + task.max_new_tokens)
    with torch.no_grad():
        model.wte.weight.mul_(30.0)  # far from uniform, so policy and reference differ
    return model.eval()


def test_the_gold_default_builds_no_proxy_and_keeps_the_reference_cache_key(tmp_path):
    task = _exact(tmp_path, reward_source="gold")
    assert task.proxy is None and not list(tmp_path.iterdir())
    language = task.reference_recipe().key["language"]
    assert "reward_source" not in language and "proxy" not in language
    digits = DigitsTask(choice_config("task", "digits"))
    assert digits.proxy is None
    assert {"reward_source", "proxy"}.isdisjoint(digits.reference_recipe().key["language"])


@pytest.mark.parametrize("make", [
    lambda: ExactTask(choice_config("task", "exact")),
    lambda: DigitsTask(choice_config("task", "digits")),
])
def test_pairs_are_two_completions_of_one_prompt_from_the_language(make):
    task = make()
    tokens, mask = task.sample_pairs(200, torch.Generator().manual_seed(0))
    assert tokens.shape == (400, task.prompt_len + task.max_new_tokens)
    assert mask.shape == (400, task.max_new_tokens) and mask.dtype == torch.bool
    prompts = tokens[:, :task.prompt_len]
    assert torch.equal(prompts[0::2], prompts[1::2])
    assert not torch.equal(tokens[0::2], tokens[1::2])  # two draws, not one twice
    # the last completion token (EOS for digits) is where the reward model reads
    last = last_positions(mask, task.prompt_len)
    if isinstance(task, DigitsTask):
        assert (tokens[torch.arange(400), last] == task.EOS).all()
    else:
        assert (last == task.prompt_len + task.max_new_tokens - 1).all()


def test_the_proxy_is_cached_and_leaves_the_run_random_state_as_no_proxy_does(tmp_path):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    trained = _exact(tmp_path)
    assert torch.equal(torch.rand(3), expected)  # trained inside a forked random state
    assert len(list(tmp_path.glob("exact-proxy-*.pt"))) == 1
    torch.manual_seed(0)
    loaded = _exact(tmp_path)
    assert torch.equal(torch.rand(3), expected)  # a cache hit leaves it alone too
    np.testing.assert_array_equal(trained.reward_table, loaded.reward_table)
    other = _exact(tmp_path, proxy={"seed": 1})
    assert len(list(tmp_path.glob("exact-proxy-*.pt"))) == 2
    assert not np.array_equal(other.reward_table, trained.reward_table)


def test_bradley_terry_loss_is_log_2_at_a_tie_and_falls_as_the_chosen_wins():
    zero = torch.zeros(4)
    assert float(bradley_terry_loss(zero, zero)) == pytest.approx(np.log(2))
    assert float(bradley_terry_loss(zero + 3, zero)) < float(bradley_terry_loss(zero, zero + 3))


def test_the_proxy_learns_the_gold_ranking_from_informative_labels(tmp_path):
    # ×10 gold reward: Bradley–Terry labels are far from coin flips; 1024 pairs
    task = _exact(tmp_path, reward_scale=10.0,
                  proxy={"pairs": 1024, "steps": 300, "batch_size": 64})
    gold = task.gold_table.ravel()
    assert np.corrcoef(task.reward_table.ravel(), gold)[0, 1] > 0.8


def test_the_policy_is_rewarded_with_the_proxy_and_every_batch_logs_gold_and_proxy(tmp_path):
    task = _exact(tmp_path)
    rollout = generate(_model(task), Prompts.unpadded(task.prompts), n_per_prompt=50,
                       max_new_tokens=task.max_new_tokens, eos_id=task.eos_id)
    rewards = task.reward(rollout)
    # the batch's rewards are the enumerated table's entries of those completions
    index = (rollout.completions * torch.tensor([16, 4, 1])).sum(1)
    prompt = torch.arange(2).repeat_interleave(50)
    table = torch.from_numpy(task.reward_table)[prompt, index]
    torch.testing.assert_close(rewards.double(), table, rtol=0, atol=1e-5)
    metrics = task.reward_metrics(rollout, rewards)
    gold = task.completion_reward(rollout.completions, rollout.mask)
    assert metrics == {"reward/proxy": pytest.approx(float(rewards.mean())),
                       "reward/gold": pytest.approx(float(gold.mean()))}
    assert _exact(tmp_path, reward_source="gold").reward_metrics(rollout, gold) == {}


def test_exact_figures_are_on_the_proxy_beside_the_exact_gold_reward(tmp_path):
    task = _exact(tmp_path)
    pair = SimpleNamespace(policy=_model(task, 1), reference=_model(task, 2), initial=None,
                           temperature=1.0, divergence=make_divergence("reverse_kl"),
                           kl=SimpleNamespace(unit="token"))
    metrics = task.evaluate(pair, step=0, beta_seq=0.1)
    policy_logp = task.sequence_logprobs(pair.policy)
    assert metrics["exact/proxy_reward"] == metrics["exact/reward"] == pytest.approx(
        float(expected_reward(policy_logp, task.reward_table).mean()))
    assert metrics["exact/gold_reward"] == pytest.approx(
        float(expected_reward(policy_logp, task.gold_table).mean()))
    task.finalize(pair, tmp_path)
    record = json.loads((tmp_path / "exact.json").read_text())
    assert record["reward_source"] == "proxy"
    first = record["prompts"][0]
    np.testing.assert_allclose(first["reward"], task.reward_table[0])
    np.testing.assert_allclose(first["gold_reward"], task.gold_table[0])
    # best-of-n chooses by the proxy; its gold reward is reported beside
    bon = record["best_of_n"]
    assert bon["n"] == [1, 2, 4, 8, 16, 32, 64] and len(bon["gold_reward"]) == 7
    assert bon["reward"][0] == pytest.approx(
        float(expected_reward(task.sequence_logprobs(pair.reference), task.reward_table).mean()))


def test_digits_rewards_the_proxy_read_at_eos_and_logs_the_gold_digit_mean(tmp_path):
    task = DigitsTask(choice_config("task", "digits", cache_dir=str(tmp_path),
                                    reward_source="proxy", proxy=SMALL_PROXY))
    tokens, mask = task.sample_pairs(8, torch.Generator().manual_seed(1))
    rollout = SimpleNamespace(tokens=tokens, mask=mask, completions=tokens[:, task.prompt_len:])
    rewards = task.reward(rollout)
    assert rewards.shape == (16,) and rewards.dtype == torch.float32
    # tokens after EOS do not change the score (causal attention, read at EOS)
    changed = tokens.clone()
    changed[:, -1] = torch.where(mask[:, -1], changed[:, -1], 3)
    torch.testing.assert_close(task.proxy.score(changed, mask), rewards)
    metrics = task.reward_metrics(rollout, rewards)
    assert metrics["reward/gold"] == pytest.approx(
        float(digit_reward(rollout.completions, mask).mean()))


@pytest.mark.parametrize("overrides, message", [
    ({"task.reward_source": "learned"}, "task.reward_source must be one of gold, proxy"),
    ({"task.proxy.n_embd": "30", "task.proxy.n_head": "4"}, "multiple of task.proxy.n_head"),
    ({"+task.proxy.width": "8"}, "task.proxy.width is not a known key"),
    ({"task.proxy.pairs": "0"}, "task.proxy.pairs must be an integer >= 1"),
])
@pytest.mark.parametrize("task", ["exact", "digits"])
def test_bad_proxy_settings_fail_before_training(task, overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_and_validate({"task": task, **overrides})


@pytest.mark.slow
def test_a_proxy_run_logs_the_gold_and_the_proxy_reward_of_every_batch(tmp_path):
    from tests.conftest import run_and_read

    _, rows = run_and_read(tmp_path, "task.reward_source=proxy", "task.proxy.pairs=64",
                           "task.proxy.steps=5", "steps=2", "algo.prompts_per_step=2")
    for row in rows:
        assert row["reward/proxy"] == row["reward/mean"]  # the policy optimises the proxy
        assert 0.0 <= row["reward/gold"] <= 1.0
