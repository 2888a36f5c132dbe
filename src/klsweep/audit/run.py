"""One audit: bring the run's policy to where it is audited (``audit.train_steps`` updates of
the run's own algorithm, then ``audit.staleness`` optimizer steps on one batch), then measure
every way training forms the KL term against the targets: by enumeration on the exact task,
by Monte Carlo elsewhere."""

from __future__ import annotations

import copy
from dataclasses import asdict, replace
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from klsweep.algos.common import Optimize
from klsweep.audit.config import INNER_UPDATES, AuditConfig, rollouts_per_step, run_config
from klsweep.audit.gradients import (
    Batch,
    MeanGradients,
    Variant,
    estimated,
    flat_grad,
    target,
    variants,
)
from klsweep.audit.measure import Figures, exact_figures, sampled_figures
from klsweep.audit.sampling import enumerate_batch, sampled_groups
from klsweep.kl import forms, masked_sum
from klsweep.kl.forms import Form
from klsweep.module import KLPolicyModule
from klsweep.tasks.exact import ExactTask


def train_policy(module: KLPolicyModule, steps: int, cfg: DictConfig,
                 generator: torch.Generator) -> Optimize:
    """``steps`` updates of the run's algorithm and schedule, as training takes them (AdamW,
    the same gradient clipping); returns the optimizer's step, for the stale steps."""
    params = [p for p in module.policy.parameters() if p.requires_grad]
    if module.algo_module is not None:
        params += list(module.algo_module.parameters())
    o = module.optim  # the learning rate filled in as training fills it (optim.lr: null)
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas),
                                  weight_decay=o.weight_decay)

    def optimize(loss: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        optimizer.step()

    for _ in range(steps):
        prompts = module.task.sample_prompts(module.algo.prompts_per_step(), generator)
        result = module.algo.step(module.pair, module.task, prompts, module.schedule.beta,
                                  optimize)
        module.schedule.update(kl=result.kl, n_samples=result.n_samples)
    return optimize


def go_stale(module: KLPolicyModule, staleness: int, optimize: Optimize,
             generator: torch.Generator) -> nn.Module:
    """π_old, a copy of the policy, then ``staleness`` optimizer steps of the run's algorithm
    on one batch that π_old sampled (its inner updates set to ``staleness``)."""
    old = copy.deepcopy(module.policy).requires_grad_(False)
    algo = module.algo
    key = INNER_UPDATES[algo.config.name]
    inner = copy.copy(algo)
    inner.config = replace(algo.config, **{key: staleness})
    prompts = module.task.sample_prompts(algo.prompts_per_step(), generator)
    inner.step(module.pair, module.task, prompts, module.schedule.beta, optimize)
    return old


def _mean_length(batch: Batch, weights: Tensor) -> float:
    return float((batch.mask.sum(1).double() * weights).sum())


def _group_means(fn, groups: list[MeanGradients]) -> Tensor:
    """[G, P]: each group's mean gradient of f = fn(batch)."""
    return torch.stack([mean(fn(mean.batch)) for mean in groups])


def audit(cfg: DictConfig, config: AuditConfig) -> dict[str, Any]:
    """Train, go stale, measure: the table's rows and what they were measured at."""
    from klsweep.train import build_module

    run = run_config(cfg)
    torch.manual_seed(run.seed)
    module = build_module(run)
    generator = torch.Generator().manual_seed(run.seed)
    optimize = train_policy(module, config.train_steps, run, generator)
    old = go_stale(module, config.staleness, optimize, generator) if config.staleness else None
    pair, task = module.pair, module.task
    params = [p for p in pair.policy.parameters() if p.requires_grad]
    pair.policy.eval()  # the audited distribution is the sampler's (no dropout)
    torch.manual_seed(config.seed)
    batches = sampled_groups(pair, old, task, config.samples, config.groups,
                             torch.Generator().manual_seed(config.seed))
    per_group = config.samples // config.groups
    groups = [MeanGradients(b, torch.full((per_group,), 1.0 / per_group, dtype=torch.float64),
                            params) for b in batches]
    batch_size = config.batch_size or rollouts_per_step(run)
    exact = isinstance(task, ExactTask) and config.method == "auto"
    if exact:
        batch, weights, _ = enumerate_batch(pair, old, task)
        enumerated = MeanGradients(batch, weights, params)
        mean_length = _mean_length(batch, weights)
        targets = {name: _exact_target(name, enumerated, params) for name in config.targets}
    else:
        mean_length = sum(float(b.mask.sum()) for b in batches) / (per_group * len(batches))
        targets = {name: _group_means(lambda b, n=name: target(n, b), groups)
                   for name in config.targets}
    rows = []
    stale = config.staleness > 0
    for variant in (v for v in variants(config.refused, stale) if v.unit == "sequence"):
        group_means = _group_means(lambda b, v=variant: estimated(pair, v, b), groups)
        mean = enumerated(estimated(pair, variant, batch)) if exact else None
        for name, target_grad in targets.items():
            figures = (exact_figures(mean, target_grad, group_means, per_group, batch_size)
                       if exact else
                       sampled_figures(group_means, target_grad, per_group, batch_size))
            for unit in ("token", "sequence"):
                rows.append(_row(replace(variant, unit=unit), name, figures, mean_length,
                                 config.staleness))
    return {"method": "enumeration" if exact else "monte_carlo", "task": task.name,
            "algo": run.algo.name, "train_steps": config.train_steps,
            "staleness": config.staleness, "samples": per_group * config.groups,
            "groups": config.groups, "batch_size": batch_size, "mean_length": mean_length,
            "parameters": sum(p.numel() for p in params), "rows": rows}


def _exact_target(name: str, enumerated: MeanGradients, params: list[Tensor]) -> Tensor:
    """g* by enumeration: ``reverse_kl`` by autograd of the enumerated sequence-level KL,
    Σ_y π(y)·log π(y)/π_ref(y) (the prompts uniform); the per-position targets as the
    π-weighted sum of their per-position gradients."""
    batch, weights = enumerated.batch, enumerated.weights
    if name == "reverse_kl":
        logp = masked_sum(batch.logp, batch.mask).double()
        ref_logp = masked_sum(batch.ref_logp, batch.mask).double()
        prompt_weight = weights / torch.exp(masked_sum(batch.old_logp, batch.mask).double())
        kl = (prompt_weight * torch.exp(logp) * (logp - ref_logp)).sum()
        return flat_grad(kl, params)
    return enumerated(target(name, batch))


def _row(variant: Variant, target_name: str, figures: Figures, mean_length: float,
         staleness: int) -> dict[str, Any]:
    """A table row: what the table says the form follows and whether training accepts it,
    on-policy or (``staleness`` > 0) at ``rollout.lag`` > 0. The token unit divides the term
    and the target by the mean completion length (per token, as kl/mean): the direction,
    rel_bias, cosine and relative MSE stay, the variance scales by 1/length²."""
    form = Form(variant.placement, variant.estimator, variant.gradient, variant.is_correction)
    stale = staleness > 0
    accepted = forms.breaking_correction(form) is None and (
        not stale or forms.stale_refusal(form, staleness) is None)
    row: dict[str, Any] = {**asdict(variant), "target": target_name,
                           "follows": forms.follows(form, stale) or "none",
                           "accepted": accepted, **asdict(figures)}
    if variant.unit == "token":
        row["variance"] /= mean_length ** 2
        row["variance_se"] /= mean_length ** 2
    return row

