"""The audit's two ways to take expectations over sequences from the sampling policy π_old:
``enumerate_batch`` (the exact task: every completion of every prompt, weighted by its
probability, no sampling noise) and ``sampled_groups`` (any task: N draws in groups, whose
means give the per-sample covariance and the jackknife errors)."""

from __future__ import annotations

import torch
from torch import nn

from klsweep.audit.gradients import Batch
from klsweep.policy import PolicyPair
from klsweep.rollout import Rollout, completion_logits, generate, token_logprobs
from klsweep.tasks.base import Task
from klsweep.tasks.exact import ExactTask


def score(pair: PolicyPair, old: nn.Module | None, rollout: Rollout) -> Batch:
    """``rollout`` scored by the policy (with gradient), the reference, and π_old (``old``;
    None: on-policy, the policy itself, detached)."""
    scored = pair.score(rollout, grad=True)
    if old is None:
        old_logits, old_logp = scored.logits.detach(), scored.logp.detach()
    else:
        with torch.no_grad():
            old.eval()
            old_logits = completion_logits(old, rollout, pair.temperature)
            old_logp = token_logprobs(old_logits, rollout.completions)
    return Batch(scored.logits, scored.logp, scored.ref_logits, scored.ref_logp,
                 old_logits, old_logp, rollout.mask)


def enumerate_batch(pair: PolicyPair, old: nn.Module | None,
                    task: ExactTask) -> tuple[Batch, torch.Tensor, int]:
    """Every completion of every prompt, scored, with its weight under π_old and the uniform
    prompt distribution [X·Y] (summing to 1), and the number of prompts X."""
    n_prompts, n_completions = len(task.prompts), len(task.completions)
    tokens = torch.cat([task.prompts.repeat_interleave(n_completions, dim=0),
                        task.completions.repeat(n_prompts, 1)], dim=1).to(pair.device)
    rows, length = tokens.shape[0], task.max_new_tokens
    mask = torch.ones(rows, length, dtype=torch.bool, device=pair.device)
    rollout = Rollout(tokens=tokens, prompt_mask=torch.ones_like(tokens[:, :task.prompt_len],
                                                                 dtype=torch.bool),
                      mask=mask, old_logp=torch.zeros(rows, length, device=pair.device))
    batch = score(pair, old, rollout)
    weights = torch.exp(batch.old_logp.double().sum(1)) / n_prompts
    return batch, weights, n_prompts


def sampled_groups(pair: PolicyPair, old: nn.Module | None, task: Task, samples: int,
                   groups: int, generator: torch.Generator) -> list[Batch]:
    """``samples`` completions drawn from π_old, one per prompt drawn from the task, in
    ``groups`` equal groups (the remainder of samples/groups is left out), each scored."""
    per_group = samples // groups
    sampler = old if old is not None else pair.policy
    was_training = sampler.training
    sampler.eval()
    batches = []
    for _ in range(groups):
        prompts = task.sample_prompts(per_group, generator).to(pair.device)
        with torch.no_grad():
            rollout = generate(sampler, prompts, n_per_prompt=1,
                               max_new_tokens=task.max_new_tokens, eos_id=task.eos_id,
                               temperature=pair.temperature)
        batches.append(score(pair, old, rollout))
    sampler.train(was_training)
    return batches
