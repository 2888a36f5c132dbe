"""The exact task: its enumeration is the sampler's support and distribution, its figures are
recomputable from exact.json alone, and the real command logs them."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from klsweep.algos.common import sequence_kl_coefficient
from klsweep.algos.grpo import advantage_scale, group_advantages, grpo_loss
from klsweep.config import ConfigError, choice_config, compose_and_validate
from klsweep.kl import kl_penalty_per_token
from klsweep.models.tiny import TinyGPT
from klsweep.rollout import Prompts, generate, token_logprobs
from klsweep.tasks.exact import ExactTask

EXACT_KEYS = ("kl", "reward", "objective", "optimal_objective", "optimal_kl", "optimal_reward",
              "frontier_gap", "improvement_left", "beta_seq")


def _peaked_model(task: ExactTask, seed: int = 0) -> TinyGPT:
    """A random tiny model with large tied embeddings, so that its next-token distributions
    are far from uniform (a flat one would hide a mismatch between sampler and enumeration)."""
    torch.manual_seed(seed)
    model = TinyGPT(choice_config("model", "tiny", n_layer=1, n_head=2, n_embd=32),
                    task.vocab_size, task.prompt_len + task.max_new_tokens)
    with torch.no_grad():
        model.wte.weight.mul_(60.0)
    return model.eval()


def test_the_sampler_never_stops_early_and_stays_in_the_enumerated_set():
    task = ExactTask(choice_config("task", "exact", vocab_size=4, completion_len=3,
                                    n_prompts=3))
    assert not 0 <= task.eos_id < task.vocab_size  # the sampler cannot emit it
    rollout = generate(_peaked_model(task), Prompts.unpadded(task.prompts), n_per_prompt=200,
                       max_new_tokens=task.max_new_tokens, eos_id=task.eos_id)
    assert rollout.mask.all()  # every completion has exactly completion_len tokens
    sampled = {tuple(row) for row in rollout.completions.tolist()}
    assert sampled <= {tuple(row) for row in task.completions.tolist()}
    assert len(task.completions) == 4**3


def test_enumerated_logprobs_are_a_distribution_and_match_the_training_logprobs():
    task = ExactTask(choice_config("task", "exact", vocab_size=5, completion_len=3,
                                    n_prompts=2))
    model = _peaked_model(task, seed=1)
    table = task.sequence_logprobs(model)  # [X, Y]
    assert table.shape == (2, 5**3) and table.dtype == np.float64
    np.testing.assert_allclose(np.exp(table).sum(-1), 1.0, atol=1e-12)
    # the per-token log-probs the algorithms train on, summed, give the same numbers
    tokens = torch.cat([task.prompts.repeat_interleave(len(task.completions), 0),
                        task.completions.repeat(2, 1)], dim=1)
    with torch.no_grad():
        logits = model.completion_logits(tokens, None, task.prompt_len)
        per_token = token_logprobs(logits, task.completions.repeat(2, 1))
    np.testing.assert_allclose(table.reshape(-1), per_token.sum(-1).double().numpy(), atol=1e-4)


def test_sampled_frequencies_follow_the_enumerated_probabilities():
    task = ExactTask(choice_config("task", "exact", vocab_size=4, completion_len=3,
                                    n_prompts=1))
    model = _peaked_model(task, seed=2)
    probs = np.exp(task.sequence_logprobs(model)[0])
    n = 20000
    torch.manual_seed(3)
    rollout = generate(model, Prompts.unpadded(task.prompts), n_per_prompt=n, max_new_tokens=3,
                       eos_id=task.eos_id)
    index = (rollout.completions * torch.tensor([16, 4, 1])).sum(1).numpy()  # lexicographic
    freq = np.bincount(index, minlength=len(probs)) / n
    # each frequency is a binomial mean: 5 standard errors, √(p(1−p)/n), plus float slack
    assert (np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / n) + 1e-6).all()
    reward = task.rewards.numpy()
    mean_reward = float(task.reward(rollout).mean())
    assert mean_reward == pytest.approx(probs @ reward, abs=5 * reward.std() / math.sqrt(n))


def test_prompts_are_distinct_and_sampled_from_the_fixed_set():
    task = ExactTask(choice_config("task", "exact", vocab_size=3, prompt_len=2, n_prompts=9))
    assert len({tuple(p) for p in task.prompts.tolist()}) == 9  # all 3² prompts
    drawn = task.sample_prompts(50, torch.Generator().manual_seed(0)).tokens
    assert {tuple(p) for p in drawn.tolist()} <= {tuple(p) for p in task.prompts.tolist()}


def test_reward_is_the_mean_token_value_scaled_to_reward_scale():
    completions = torch.tensor([[5, 5, 5, 5], [0, 0, 0, 0], [1, 2, 3, 4]])
    mask = torch.ones(3, 4, dtype=torch.bool)
    for scale in (1.0, 10.0):
        task = ExactTask(choice_config("task", "exact", vocab_size=6, completion_len=4,
                                       reward_scale=scale))
        torch.testing.assert_close(task.completion_reward(completions, mask),
                                   scale * torch.tensor([1.0, 0.0, 0.5]))


def test_evaluation_runs_every_eval_every_steps_and_at_the_last():
    task = ExactTask(choice_config("task", "exact", eval_every=4))
    assert [s for s in range(10) if task.should_evaluate(s, 10)] == [3, 7, 9]


@pytest.mark.parametrize("overrides, message", [
    ({"task.n_prompts": "40"}, "task.n_prompts must be <= "),
    ({"task.completion_len": "12"}, "to enumerate"),
    ({"task.vocab_size": "1"}, "task.vocab_size must be an integer >= 2"),
])
def test_sizes_that_cannot_be_enumerated_fail_before_training(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_and_validate({"task": "exact", **overrides})


@pytest.mark.parametrize("scale", ["none", "batch"])
def test_a_loss_placed_beta_weighs_kl_against_reward_as_beta_times_advantage_scale(scale):
    """The β_seq the exact task uses for KL in the loss: per token, GRPO's gradient is
    (−A + β·∇k)/(B·L) with A = (r − mean)/s, i.e. in reward units −(r − mean) + β·s·l for k2:
    the length cancels and the advantage scale stays."""
    generator = torch.Generator().manual_seed(0)
    n, length, beta = 8, 5, 0.3
    rewards = torch.rand(n, generator=generator, dtype=torch.float64)
    logp = (-torch.rand(n, length, generator=generator, dtype=torch.float64)).requires_grad_()
    ref_logp = -torch.rand(n, length, generator=generator, dtype=torch.float64)
    mask = torch.ones(n, length, dtype=torch.bool)
    advantages = group_advantages(rewards, 4, scale)
    s = advantage_scale(rewards, 4, scale)
    kl = kl_penalty_per_token(logp, ref_logp, "k2")
    loss, _ = grpo_loss(logp, logp.detach(), advantages, mask, clip_eps=0.2, loss_agg="token",
                        kl=kl, beta=beta)
    (grad,) = torch.autograd.grad(loss, logp)
    centred = (rewards.view(-1, 4) - rewards.view(-1, 4).mean(1, keepdim=True)).reshape(-1)
    in_reward_units = grad * n * length * s + centred[:, None]
    beta_seq = sequence_kl_coefficient("loss", beta, s)
    torch.testing.assert_close(in_reward_units, beta_seq * (logp - ref_logp).detach(),
                               rtol=1e-9, atol=1e-12)


def recompute_from_exact_json(path) -> dict[str, float]:
    """Exact KL, reward, J* and pass@k from exact.json with numpy alone: the user's check."""
    record = json.loads(path.read_text())
    beta = record["beta_seq"]
    kl, reward, j_star, p_top = [], [], [], []
    for prompt in record["prompts"]:
        logp = np.array(prompt["policy_logp"])
        ref = np.array(prompt["ref_logp"])
        r = np.array(prompt["reward"])
        p = np.exp(logp)
        kl.append(np.sum(p * (logp - ref)))
        reward.append(np.sum(p * r))
        top = r.max()
        j_star.append(top + beta * np.log(np.sum(np.exp(ref + (r - top) / beta))))
        p_top.append(np.sum(p[r >= top]))
    # pass@k of eval.k's default: at least one of k samples reaches the top reward
    return {"kl": float(np.mean(kl)), "reward": float(np.mean(reward)),
            "optimal_objective": float(np.mean(j_star)),
            **{f"pass@{k}": float(np.mean(1 - (1 - np.array(p_top)) ** k))
               for k in (1, 2, 4, 8, 16)}}


@pytest.mark.slow
def test_command_logs_exact_figures_that_exact_json_alone_reproduces(tmp_path):
    subprocess.run([sys.executable, "-m", "klsweep", "task=exact", "algo=grpo",
                    "schedule=fixed", "kl.beta=0.1", "kl.placement=reward", "estimator=k1",
                    "steps=5", "task.eval_every=2", "logger=none",
                    f"hydra.run.dir={tmp_path}"], check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "summary.json").read_text())
    evaluated = [row["step"] for row in rows if "exact/kl" in row]
    assert evaluated == [1, 3, 4]
    last = rows[-1]
    record = json.loads((tmp_path / "exact.json").read_text())
    assert record["step"] == 4 and record["beta_seq"] == 0.1 == last["exact/beta_seq"]
    assert len(record["prompts"]) == 4 and len(record["prompts"][0]["completions"]) == 6**4
    recomputed = recompute_from_exact_json(tmp_path / "exact.json")
    for key, value in recomputed.items():
        assert last[f"exact/{key}"] == pytest.approx(value, abs=1e-6), key
        assert summary[f"exact/{key}_final"] == pytest.approx(value, abs=1e-6), key
    for key in EXACT_KEYS:
        assert summary[f"exact/{key}_final"] == last[f"exact/{key}"]
    assert last["exact/kl"] > 0  # the policy has moved
    assert last["exact/optimal_objective"] >= last["exact/objective"]
    assert last["exact/frontier_gap"] >= -1e-9
    assert last["exact/improvement_left"] > 0
