"""Every number a run records, declared once: its name, unit and meaning, when it is logged
and what summary.json keeps of it. The run logs through this registry: ``check_row`` guards
each step's row before it reaches metrics.jsonl and W&B, ``check_summary`` the summary, and
a name that is not declared here fails the run at once (``UndeclaredMetric``), so that the
site's metrics reference, generated from ``METRICS`` and ``SUMMARY``, lists everything a run
writes. Adding a metric is one ``step(...)`` (or ``summary(...)``) line below; a family of
names (``eval/pass@{k}``) is one line too. This module imports nothing of klsweep."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# how summary.json condenses a step metric: the mean over the last quarter of the steps (one
# batch is too noisy to rank runs by), or the last value (exact figures, β)
MEAN, LAST = "last-quarter mean", "last value"


class UndeclaredMetric(KeyError):
    """A run logged a name that ``klsweep.metrics`` does not declare."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Metric:
    """One logged name (or family of names: a ``{placeholder}`` stands for any one segment),
    its unit, its meaning, when it is logged, and how summary.json condenses it."""

    name: str
    unit: str
    meaning: str
    when: str
    final: str | None = None

    @property
    def summary_name(self) -> str | None:
        """Its key in summary.json (None: summary.json keeps nothing of it)."""
        return None if self.final is None else final_name(self.name)


def final_name(name: str) -> str:
    """The summary.json key of a step metric's final value: ``reward/final`` for
    ``reward/mean`` (``kl/final`` for ``kl/mean``), else ``<name>_final``."""
    group, _, leaf = name.partition("/")
    return f"{group}/final" if leaf == "mean" else f"{name}_final"


METRICS: dict[str, Metric] = {}   # one step's row: metrics.jsonl and the W&B history
SUMMARY: dict[str, Metric] = {}   # summary.json (and the W&B run's summary)

EVERY_STEP = "every step"
EXACT_EVAL = "task=exact: every task.eval_every steps and after the last"


def step(name: str, unit: str, meaning: str, when: str = EVERY_STEP,
         final: str | None = None) -> Metric:
    """Declare a name of a step's row."""
    METRICS[name] = Metric(name, unit, meaning, when, final)
    return METRICS[name]


def summary(name: str, unit: str, meaning: str) -> Metric:
    """Declare a key of summary.json that no step metric condenses into."""
    SUMMARY[name] = Metric(name, unit, meaning, "summary.json, at the end of the run")
    return SUMMARY[name]


NATS_TOKEN, NATS_SEQ, REWARD, FRACTION = "nats/token", "nats/sequence", "reward", "fraction"

step("step", "count", "the policy update the row belongs to (0-based): every chart's x-axis")
# --- the KL, from the same batch as the update (policy.PolicyPair.measure) --------------------
step("kl/mean", NATS_TOKEN, "KL(π‖π_ref) to the current reference by the configured "
     "kl.estimator, mean per completion token", final=MEAN)
step("kl/seq", NATS_SEQ, "the same estimate summed over each completion, mean over completions",
     final=MEAN)
step("kl/k1", NATS_TOKEN, "k1 = l = log π − log π_ref, mean per token", final=MEAN)
step("kl/k2", NATS_TOKEN, "k2 = l²/2, mean per token", final=MEAN)
step("kl/k3", NATS_TOKEN, "k3 = exp(−l) − 1 + l, mean per token", final=MEAN)
step("kl/abs", NATS_TOKEN, "|l|, mean per token")
step("kl/full", NATS_TOKEN, "the exact KL of each position's next-token distributions, summed "
     "over the vocabulary, mean per token", final=MEAN)
step("kl/to_init", NATS_TOKEN, "the configured estimator against the initial model: the drift, "
     "= kl/mean with a frozen reference (kl.reference.sync_every=0)", final=MEAN)
step("kl/divergence", "kl.divergence per token", "the configured divergence D_f(π‖π_ref) by "
     "kl.estimator, mean per token; the KL's is kl/mean", final=MEAN)
step("kl/divergence_seq", "kl.divergence per sequence", "the same summed over each completion; "
     "the number β steers with kl.unit=sequence", final=MEAN)
step("kl/beta", "β", "the KL coefficient this step applied (the schedule's)", final=LAST)
step("kl/target", "kl.unit", "kl.target, the KL the schedule steers toward")
# --- reward --------------------------------------------------------------------------------------
step("reward/mean", REWARD, "the task reward of the step's samples, mean (with a proxy: the "
     "proxy's, what the policy optimises)", final=MEAN)
step("reward/std", REWARD, "its standard deviation over the step's samples")
step("reward/max", REWARD, "its largest value among the step's samples")
step("reward/proxy", REWARD, "the proxy reward model's score, = reward/mean",
     "task.reward_source=proxy: every step", final=MEAN)
step("reward/gold", REWARD, "the gold (true) reward of the same samples",
     "task.reward_source=proxy: every step", final=MEAN)
step("reward/shaped", REWARD, "the shaped reward per sequence (task reward − β·KL terms)",
     "algo=ppo: every step")
# --- the policy ----------------------------------------------------------------------------------
step("policy/entropy", NATS_TOKEN, "entropy of π's next-token distribution, mean per token",
     final=MEAN)
step("policy/length", "tokens", "completion length, mean")
step("policy/distinct", FRACTION, "distinct completions / completions in the batch (collapse: "
     "it falls)", final=MEAN)
step("policy/clipfrac", FRACTION, "tokens whose ratio π/π_old the clip bounded",
     "algo=grpo, ppo: every step")
step("policy/ratio", "ratio", "π/π_old, mean per token", "algo=grpo, ppo: every step")
step("policy/advantage_scale", REWARD, "s, what the advantages were divided by (1 unscaled); "
     "β_seq = β·s in the loss", "algo=grpo, ppo: every step")
step("policy/approx_kl", NATS_TOKEN, "KL(π_old‖π) by k3 on the ratio, mean per token",
     "algo=ppo: every step")
# --- losses --------------------------------------------------------------------------------------
step("loss/total", "loss", "the loss the step minimised (the last update's)")
step("loss/policy", "loss", "the clipped surrogate", "algo=grpo, ppo: every step")
step("loss/kl", "loss", "β times the KL term in the loss (0 unless kl.placement=loss)",
     "algo=grpo, ppo: every step")
step("loss/value", "loss", "vf_coef × the clipped value loss", "algo=ppo: every step")
step("loss/dpo", "loss", "the DPO loss (algo.loss) of the step's pairs", "algo=dpo: every step")
# --- PPO's critic ---------------------------------------------------------------------------------
step("value/loss", "loss", "the value head's loss (= loss/value)", "algo=ppo: every step")
step("value/mean", REWARD, "the value head's prediction, mean per token", "algo=ppo: every step")
step("value/explained_variance", FRACTION, "1 − Var(returns − values)/Var(returns)",
     "algo=ppo: every step")
step("value/clipfrac", FRACTION, "tokens whose value update vf_clip bounded",
     "algo=ppo: every step")
# --- DPO -----------------------------------------------------------------------------------------
DPO = "algo=dpo: every step"
step("dpo/margin", REWARD, "dpo/chosen_reward − dpo/rejected_reward, mean over pairs", DPO)
step("dpo/accuracy", FRACTION, "pairs whose chosen implicit reward exceeds the rejected's", DPO)
step("dpo/chosen_reward", REWARD, "the implicit reward β·log π/π_ref of the chosen, mean", DPO)
step("dpo/rejected_reward", REWARD, "the implicit reward of the rejected, mean", DPO)
step("dpo/score_gap", REWARD, "the task reward of the chosen minus the rejected, mean", DPO)
step("dpo/pairs", "count", "preference pairs in the step", DPO)
step("dpo/fresh_eval", "0 or 1", "1 when kl/* and reward/* were measured this step (every "
     "algo.eval_every steps offline), 0 when the last measurement is carried", DPO)
# --- the rollout engine -------------------------------------------------------------------------
VLLM = "rollout.engine=vllm or rollout.lag > 0: every step"
step("rollout/mismatch_k3", NATS_TOKEN, "KL(π_engine‖π_train) by k3 on the sampled tokens, "
     "mean per token: how far off-policy the engine's samples are (its kernels, its lag)", VLLM)
step("rollout/mismatch_max", "nats", "the largest |log π_engine − log π_train|", VLLM)
CORRECTED = "a rollout.correction other than none on an engine's samples: every step"
step("rollout/is_mean", "weight", "the policy-gradient term's importance weight "
     "(rollout.correction), mean per completion token", CORRECTED)
step("rollout/is_max", "ratio", "the largest importance ratio before the cap", CORRECTED)
step("rollout/is_cut", FRACTION, "completion tokens whose weight was truncated or masked",
     CORRECTED)
LAGGED = "rollout.lag > 0: every step"
step("rollout/lag", "steps", "optimiser steps between the weights that sampled the step's "
     "rollout and the trainer's (below rollout.lag in the first steps)", LAGGED)
step("perf/trainer_busy_s", "s", "the trainer's time from the last rollout it took to asking "
     "for this one: training, logging", LAGGED)
step("perf/trainer_idle_s", "s", "the trainer's wait for this step's rollout", LAGGED)
step("perf/engine_busy_s", "s", "the engine process's sampling time since the last step",
     LAGGED)
step("perf/engine_idle_s", "s", "the engine process's wait for work since the last step",
     LAGGED)
# --- speed ---------------------------------------------------------------------------------------
step("perf/tokens", "tokens", "completion tokens the step generated")
step("perf/samples", "count", "completions the KL and reward were measured on (DPO: 0 when "
     "the last measurement is carried)")
step("perf/step_s", "s", "wall time of the step")
step("perf/tokens_per_s", "tokens/s", "perf/tokens / perf/step_s", final=MEAN)
# --- data parallel -------------------------------------------------------------------------------
DIST = "trainer.devices > 1: every step"
step("dist/world_size", "count", "ranks the step's metrics were averaged over", DIST)
step("dist/beta_spread", "β", "largest minus smallest β applied across ranks (0: they agree)",
     DIST)
step("dist/reward_spread", REWARD, "largest minus smallest reward/mean across ranks", DIST)
# --- the exact task, by enumeration (float64, KL per sequence, means over prompts) ---------------
step("exact/kl", NATS_SEQ, "KL(π‖π_ref) of the policy, exact", EXACT_EVAL, LAST)
step("exact/reward", REWARD, "E_π[r], exact", EXACT_EVAL, LAST)
step("exact/beta_seq", "β", "β_seq, the coefficient on sequence KL the algorithm applies",
     EXACT_EVAL, LAST)
step("exact/objective", REWARD, "J = E_π[r] − β_seq·D of the run's divergence", EXACT_EVAL, LAST)
step("exact/optimal_objective", REWARD, "J*, reached by the optimum π* of that objective",
     EXACT_EVAL, LAST)
step("exact/optimal_kl", NATS_SEQ, "KL(π*‖π_ref)", EXACT_EVAL, LAST)
step("exact/optimal_reward", REWARD, "E_π*[r]", EXACT_EVAL, LAST)
step("exact/frontier_gap", REWARD, "the most reward any policy gets at the run's KL, minus the "
     "run's", EXACT_EVAL, LAST)
step("exact/improvement_left", FRACTION, "(J* − J)/(J* − J_ref): the share of the gain over "
     "π_ref still to take", EXACT_EVAL, LAST)
step("exact/kl_to_init", NATS_SEQ, "KL to the initial model (= exact/kl with a frozen "
     "reference)", EXACT_EVAL, LAST)
step("exact/divergence", "kl.divergence per sequence", "the run's divergence D(π‖π_ref), exact",
     EXACT_EVAL, LAST)
step("exact/optimal_divergence", "kl.divergence per sequence", "D(π*‖π_ref)", EXACT_EVAL, LAST)
step("exact/gold_reward", REWARD, "E_π[gold reward]", "task=exact, task.reward_source=proxy: "
     "at each evaluation", LAST)
step("exact/proxy_reward", REWARD, "E_π[proxy reward] (= exact/reward)", "task=exact, "
     "task.reward_source=proxy: at each evaluation", LAST)
step("exact/pass@{k}", FRACTION, "for each k of eval.k: the probability that at least one of "
     "k samples reaches the top reward, 1 − (1 − p_top)^k, mean over prompts", EXACT_EVAL, LAST)
# --- task=reasoning: the held-out evaluation (tasks.evaluation; eval.prompts × eval.samples) ---
REASONING = "task=reasoning: every step"
EVAL = "task=reasoning: every eval.every steps and after the last"
REF_EVAL = "task=reasoning: at the first step (the reference, the run's own baseline)"
step("reward/score", REWARD, "the verifier's score_answer of the step's samples, mean (the "
     "reward without its format term)", REASONING)
step("reward/format_rate", FRACTION, "the step's completions that tagged their answer "
     "(<answer>…</answer>)", REASONING)
for prefix, model, when in (("eval/", "the policy", EVAL), ("eval/ref_", "the reference",
                                                            REF_EVAL)):
    step(f"{prefix}accuracy", REWARD, f"{model}'s mean score on the held-out questions",
         when, LAST)
    step(f"{prefix}pass@{{k}}", REWARD, f"for each k of eval.k: {model}'s expected best score "
         "of k of the eval.samples completions (Chen et al.'s unbiased estimator for 0/1 "
         "scores, a partial score counting as its value)", when, LAST)
    step(f"{prefix}entropy", NATS_TOKEN, f"{model}'s next-token entropy on its held-out "
         "completions, mean per sampled token", when, LAST)
    step(f"{prefix}format_rate", FRACTION, f"{model}'s held-out completions that tagged "
         "their answer", when, LAST)
step("perf/eval_s", "s", "wall time of the step's evaluation (included in perf/step_s)",
     "a task with a held-out evaluation (task=reasoning, exact): each step that evaluates")

# --- summary.json: the run ------------------------------------------------------------------------
summary("status", "text", "completed | failed | diverged | interrupted | pruned")
summary("reason", "text", "why a run did not complete (null when it did)")
summary("name", "text", "the run's name (name; default algo-estimator-schedule-s<seed>, in a "
        "sweep followed by the swept values it does not show)")
summary("swept", "mapping", "in a sweep: the job's value of each key the sweep varies ({} else)")
for key in ("algo", "estimator", "schedule", "placement", "divergence", "task"):
    summary(key, "text", f"the run's {key} (its config's choice)")
summary("seed", "count", "the run's seed")
summary("lr", "learning rate", "the optimiser's learning rate (optim.lr; null: the model's "
        "default, model=hf's by pretrained, LoRA or from scratch)")
summary("steps", "count", "policy updates the run was configured for")
summary("steps_done", "count", "policy updates in the record (a resumed run's earlier ones too)")
summary("resumed_from_step", "count", "the step this invocation resumed from (0: a fresh run)")
summary("wall_time_s", "s", "this invocation's wall time, start-up and record included")
summary("fit_time_s", "s", "this invocation's time in Lightning's fit")
summary("perf/tokens_per_s", "tokens/s", "completion tokens this invocation generated / fit_time_s")
summary("checkpoint/saves", "count", "checkpoints this invocation wrote")
summary("checkpoint/save_ms", "ms", "their mean time to write")
summary("tracking/steps_to_target", "steps", "the first step from which the 10-step mean of the "
        "steered KL stays within kl.target·(1 ± 0.2); null: never settled")
summary("tracking/overshoot", "ratio", "the 10-step mean's peak / kl.target")
summary("tracking/error", FRACTION, "mean |KL − target| / target over the second half")
summary("tracking/beta_volatility", "ratio", "std of β's changes / mean β")
summary("group", "text", "the W&B group (a sweep's name)")
summary("run_dir", "path", "the run dir")
summary("wandb_dir", "path", "the W&B run's files (logger=wandb)")
summary("versions", "text", "python, klsweep, torch, lightning, hydra, optuna and wandb versions")


def _pattern(name: str) -> re.Pattern[str] | None:
    """A family's name as a regular expression (each {placeholder}: one /-free segment)."""
    if "{" not in name:
        return None
    parts = re.split(r"\{[^}]*\}", name)
    return re.compile("[^/]+".join(re.escape(part) for part in parts) + r"\Z")


def find(name: str, table: Mapping[str, Metric] | None = None) -> Metric | None:
    """The declaration of ``name`` in ``table`` (default: the step metrics; a family's, for
    one of its names)."""
    table = METRICS if table is None else table
    if name in table:
        return table[name]
    return next((m for m in table.values()
                 if (pattern := _pattern(m.name)) is not None and pattern.match(name)), None)


def summary_names() -> dict[str, Metric]:
    """Every key summary.json may hold: the run's own and each step metric's final value."""
    finals = {m.summary_name: m for m in METRICS.values() if m.summary_name is not None}
    return {**finals, **SUMMARY}


def check_row(row: Iterable[str]) -> None:
    """Raise UndeclaredMetric for the first name of a step's row that is not declared."""
    for name in row:
        if name not in METRICS and find(name) is None:
            raise UndeclaredMetric(f"metric {name!r} is logged but not declared: add it to "
                                   f"klsweep/metrics.py (step(name, unit, meaning, when))")


def check_summary(payload: Mapping[str, Any]) -> None:
    """Raise UndeclaredMetric for the first key of summary.json that is not declared."""
    names = summary_names()
    for name in payload:
        if name not in names and find(name, names) is None:
            raise UndeclaredMetric(f"summary key {name!r} is written but not declared: add it "
                                   f"to klsweep/metrics.py (summary(name, unit, meaning))")


def final_keys(how: str) -> tuple[str, ...]:
    """The step metrics (families left out) that summary.json condenses ``how`` (MEAN or
    LAST)."""
    return tuple(m.name for m in METRICS.values() if m.final == how and "{" not in m.name)
