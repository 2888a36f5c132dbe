"""Each algorithm's step, without a Trainer: the run's own wiring (``build_module`` on the
composed config, so every default is the real YAML's) around tiny random models, and an
``optimize`` that is a plain torch optimiser step. A step reports the KL its fresh samples
measured, how many there were, the sequence-KL coefficient it applied, and it trains."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from klsweep.algos.common import StepResult
from klsweep.config import choice_config, compose_and_validate
from klsweep.kl import masked_sum
from klsweep.models.tiny import TinyGPT
from klsweep.module import KLPolicyModule
from klsweep.policy import PolicyPair
from klsweep.rollout import Prompts, Rollout
from klsweep.tasks import build_task
from klsweep.tasks.base import Task
from klsweep.train import build_module

BETA = 0.3  # the β handed to each step; not the config's kl.beta, so it must be the one used


def _models(task: Task, perturb: float) -> tuple[TinyGPT, TinyGPT]:
    """A random one-layer reference with peaked next-token distributions, and the policy: its
    copy, every weight moved by ``perturb`` standard deviations (0: π = π_ref)."""
    torch.manual_seed(0)
    reference = TinyGPT(choice_config("model", "tiny", n_layer=1, n_head=2, n_embd=32),
                        vocab_size=task.vocab_size,
                        block_size=task.prompt_len + task.max_new_tokens)
    with torch.no_grad():
        reference.wte.weight.mul_(5.0)
    policy = copy.deepcopy(reference).train()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(perturb * p.std() * torch.randn_like(p))
    return policy, reference.requires_grad_(False)


def _module(algo: str, overrides: dict[str, str], task: Task | None = None,
            perturb: float = 0.5) -> KLPolicyModule:
    """The run's own objects for ``algo`` on the exact task (or ``task``), tiny models."""
    cfg = compose_and_validate({"algo": algo, "task": "exact", **overrides})
    task = task or build_task(cfg.task)
    return build_module(cfg, task=task, models=_models(task, perturb))


def _optimize(optimizer: torch.optim.Optimizer):
    def optimize(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return optimize


class _Samples:
    """Records every rollout the policy samples (the pair's ``sample``, wrapped)."""

    def __init__(self, pair: PolicyPair, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rollouts: list[Rollout] = []
        sample = pair.sample

        def recording(prompts: Prompts, n_per_prompt: int) -> Rollout:
            self.rollouts.append(sample(prompts, n_per_prompt))
            return self.rollouts[-1]
        monkeypatch.setattr(pair, "sample", recording)

    @property
    def rows(self) -> int:
        return sum(r.tokens.shape[0] for r in self.rollouts)


def _step(module: KLPolicyModule, optimizer: torch.optim.Optimizer | None = None,
          seed: int = 0) -> StepResult:
    prompts = module.task.sample_prompts(module.algo.prompts_per_step(),
                                         torch.Generator().manual_seed(seed))
    optimizer = optimizer or module.configure_optimizers()  # AdamW as the run's optim node
    return module.algo.step(module.pair, module.task, prompts, BETA, _optimize(optimizer))


def _snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _changed(model: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


SMALL = {"grpo": {"algo.prompts_per_step": "4", "algo.group_size": "4"},
         "ppo": {"algo.prompts_per_step": "4", "algo.samples_per_prompt": "2"},
         "dpo": {"algo.pairs_per_step": "8", "algo.dataset_pairs": "16",
                 "algo.eval_prompts": "4", "algo.eval_samples_per_prompt": "2"}}


# (algo, overrides, β_seq as a function of the step's metrics): in the reward the coefficient
# on sequence KL is β; in the loss β times what the advantages were divided by; DPO's is β.
CASES = [
    ("grpo", {"kl.placement": "loss", "algo.scale_rewards": "group"},
     lambda m: BETA * m["policy/advantage_scale"]),
    ("grpo", {"kl.placement": "reward"}, lambda m: BETA),
    ("grpo", {"kl.placement": "none"}, lambda m: 0.0),
    ("grpo", {"kl.unit": "sequence"}, lambda m: BETA),  # scale_rewards=none divides by 1
    ("ppo", {}, lambda m: BETA),  # placement=reward
    ("ppo", {"kl.placement": "loss"}, lambda m: BETA * m["policy/advantage_scale"]),
    ("dpo", {}, lambda m: BETA),  # offline
    ("dpo", {"algo.online": "true"}, lambda m: BETA),
]


@pytest.mark.parametrize(("algo", "overrides", "beta_seq"), CASES,
                         ids=[f"{a}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}"
                              for a, o, _ in CASES])
def test_a_step_reports_its_fresh_measurement_and_trains_the_policy(algo, overrides, beta_seq,
                                                                    monkeypatch):
    module = _module(algo, {**SMALL[algo], **overrides})
    samples = _Samples(module.pair, monkeypatch)
    policy_before = _snapshot(module.policy)
    head_before = None if module.algo_module is None else _snapshot(module.algo_module)

    result = _step(module)

    m = result.metrics
    assert all(math.isfinite(v) for v in m.values()), {k: v for k, v in m.items()
                                                       if not math.isfinite(v)}
    # the KL the schedule steers is the fresh samples' own, in kl.unit
    unit = module.pair.kl.unit
    assert result.kl == m["kl/mean" if unit == "token" else "kl/seq"]
    assert m["kl/full"] > 0 and abs(m["kl/seq"]) > 1.5 * abs(m["kl/mean"]) > 0  # π ≠ π_ref
    # measured on every completion the policy sampled this step, and only on those
    assert result.n_samples == samples.rows == m["perf/samples"] > 0
    assert result.beta_seq == pytest.approx(beta_seq(m), rel=1e-12)
    if algo != "dpo":  # a KL term in the loss exactly when kl.placement says so
        assert (m["loss/kl"] != 0) == (module.pair.kl.placement == "loss")
    assert _changed(module.policy, policy_before)
    if algo == "ppo":  # the value head from setup trains beside the policy
        assert head_before is not None and _changed(module.algo_module, head_before)


def test_grpo_in_the_loss_weighs_kl_by_beta_times_the_mean_group_std(monkeypatch):
    module = _module("grpo", {**SMALL["grpo"], "kl.placement": "loss",
                              "algo.scale_rewards": "group"})
    samples = _Samples(module.pair, monkeypatch)
    result = _step(module)
    rewards = module.task.reward(samples.rollouts[0]).view(-1, 4)
    scale = float(rewards.std(dim=1).mean())  # TRL's ε = 1e-4 in the divisor aside
    assert scale < 0.5  # far from 1, so β and β·scale are told apart
    assert result.beta_seq == pytest.approx(BETA * scale, abs=BETA * 2e-4)


def test_offline_dpo_between_measurements_carries_the_kl_with_no_samples(monkeypatch):
    module = _module("dpo", {**SMALL["dpo"], "algo.eval_every": "2"})
    samples = _Samples(module.pair, monkeypatch)
    optimizer = module.configure_optimizers()
    first = _step(module, optimizer, seed=0)
    second = _step(module, optimizer, seed=1)
    assert first.n_samples == samples.rows == 8 and first.metrics["dpo/fresh_eval"] == 1
    # nothing sampled: β must stay where it is, and the KL shown is the last one measured
    assert second.n_samples == 0 and second.metrics["perf/samples"] == 0
    assert second.kl == first.kl and second.metrics["dpo/fresh_eval"] == 0
    assert samples.rows == 8


# --- DPO's step points the right way ------------------------------------------------------------
class BaseVNumber(Task):
    """A stand-in task whose reward never ties: fixed-length completions (no EOS) over V
    tokens, rewarded by reading the completion as a base-V number scaled to [0, 1]. Two
    completions of one prompt have equal rewards only when they are the same completion, so
    deterministic labels are exactly the reward's order."""

    name = "base_v_number"
    vocab_size, prompt_len, max_new_tokens = 6, 2, 4
    eos_id = 6  # outside the vocabulary: never sampled

    def sample_prompts(self, n: int, generator: torch.Generator) -> Prompts:
        return Prompts.unpadded(torch.randint(0, self.vocab_size, (n, self.prompt_len),
                                              generator=generator))

    def reward(self, rollout: Rollout) -> torch.Tensor:
        V, L = self.vocab_size, self.max_new_tokens
        place = V ** torch.arange(L - 1, -1, -1, dtype=torch.float64)
        return (rollout.completions.double() @ place / (V**L - 1)).float()


LR = 0.01


@pytest.mark.parametrize("online", [False, True])
def test_a_dpo_step_raises_the_chosen_log_ratio_over_the_rejected_one(online, monkeypatch):
    task = BaseVNumber()
    pairs = 32
    module = _module("dpo", {"algo.labels": "deterministic", "algo.online": str(online).lower(),
                             "algo.pairs_per_step": str(pairs),
                             # offline: the data set is one step's batch, so it is what trained
                             "algo.dataset_pairs": str(pairs),
                             "algo.eval_prompts": "4", "algo.eval_samples_per_prompt": "2"},
                     task=task, perturb=0.0)  # DPO starts from π = π_ref
    before = copy.deepcopy(module.pair)
    samples = _Samples(module.pair, monkeypatch)
    # plain SGD: Adam's per-weight normalisation would hide which way the gradient points
    optimizer = torch.optim.SGD(module.policy.parameters(), lr=LR)

    result = _step(module, optimizer)

    if online:  # the pairs are the step's own samples, rows (2i, 2i+1) one prompt's two
        rollout = samples.rollouts[0]
        rewards = task.reward(rollout).view(-1, 2)
        sign = torch.sign(rewards[:, 0] - rewards[:, 1])  # +1 where the first is chosen
    else:  # the data set, in the DPO object's state, rows (2i, 2i+1) = (chosen, rejected)
        rollout = module.algo.dataset.rollout
        rewards = module.algo.dataset.rewards.view(-1, 2)
        assert (rewards[:, 0] >= rewards[:, 1]).all()  # deterministic: never the lower one
        sign = torch.ones(pairs)
    assert rewards.shape == (pairs, 2)
    gaps = (rewards[:, 0] - rewards[:, 1]) * sign
    assert result.metrics["dpo/score_gap"] >= 0
    assert result.metrics["dpo/score_gap"] == pytest.approx(float(gaps.mean()), rel=1e-5)

    def margin(pair: PolicyPair, grad: bool = False) -> torch.Tensor:
        """Mean over pairs of log π(y_w)/π_ref(y_w) − log π(y_l)/π_ref(y_l)."""
        scored = pair.score(rollout, grad=grad)
        logratio = masked_sum(scored.logp - scored.ref_logp, scored.mask).view(-1, 2)
        return (sign * (logratio[:, 0] - logratio[:, 1])).mean()

    start = margin(before, grad=True)
    assert float(start.detach()) == 0.0  # π = π_ref: every log-ratio is zero
    assert float(margin(module.pair)) > 1e-4  # float noise in these sums is ~1e-6
    # and by as much as one gradient step on DPO's loss should: at π = π_ref every pair's
    # weight in the gradient is β·σ(0) = β/2, so to first order in lr the step moves the mean
    # margin by lr·(β/2)·|∇ mean margin|² (second-order terms are ~1e-4 of it at this lr)
    grads = torch.autograd.grad(start, list(before.policy.parameters()))
    first_order = LR * BETA / 2 * sum(float(g.square().sum()) for g in grads)
    assert float(margin(module.pair)) == pytest.approx(first_order, rel=0.02)
    assert result.n_samples == samples.rows and result.beta_seq == BETA
